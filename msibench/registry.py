"""Method name or path -> method class, and where the class came from.

A method is named the way lm-eval names models and pytest finds plugins (the ``--method`` value, everywhere):

- a built-in name (:data:`METHODS`, lazy ``"module:Class"`` strings, so listing never imports torch);
- ``path/to/file.py:Class``: a Python file of your own, imported under a private module name;
- ``package.module:Class``: an importable module (on ``sys.path``, e.g. an installed package);
- the name of an installed package's entry point in the group ``msibench.methods`` (``pyproject.toml``:
  ``[project.entry-points."msibench.methods"] my-method = "my_pkg.method:MyMethod"``).

:func:`origin` says where a class came from (built-in; file + sha256; module; distribution + version), for the run
header (``run.json`` ``method_source``). Errors about a plugin (:class:`PluginError`) name the file or module, the
class and what is wrong: the import failed, it is not a :class:`~msibench.methods.base.Method` subclass, or its name
is taken (by a built-in or another entry point).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    from msibench.methods.base import Method

# Method modules keep torch/diffusers imports inside functions or in companion modules, so that
# constructing a method (cheap, no weights) and reading its capabilities stays light.
METHODS: dict[str, str] = {
    "paste": "msibench.methods.paste:PasteMethod",
    "ip-adapter": "baselines.ip_adapter:IPAdapterMethod",
    "lambda-eclipse": "baselines.lambda_eclipse:LambdaEclipseMethod",
    "ssr-encoder": "baselines.ssr_encoder:SSREncoderMethod",
    "customnet": "baselines.customnet:CustomNetMethod",
    "ms-diffusion": "baselines.ms_diffusion:MSDiffusionMethod",
    "mscustomnet": "mscustomnet.adapter:MSCustomNetMethod",
    "uno": "baselines.uno:UNOMethod",
    "qwen-image-edit": "baselines.qwen_image_edit:QwenImageEditMethod",
}

ENTRY_POINT_GROUP = "msibench.methods"
# Module names that plugin files are imported under: private, one per file path, never a user's module name.
_FILE_MODULE_PREFIX = "msibench_plugin_"


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this one is meant to be read
        return str(self.args[0])


class MethodUnavailableError(ImportError):
    """The method is registered but its module is not present in this installation."""


class PluginError(UnknownMethodError):
    """A ``--method`` naming a file, module or entry point that does not give a usable Method class; the message
    names the file (or module, or entry point), the class and what is wrong."""


@dataclass(frozen=True)
class MethodSource:
    """Where a method class came from: ``kind`` is builtin, file, module or entry-point.

    ``target`` is ``module:Class`` (for a file: ``path:Class``); ``file`` and ``sha256`` identify the file that
    defines the class (a plugin file, or the module's file); ``distribution`` and ``version`` the installed package
    that provides it, when there is one."""

    kind: str
    spec: str
    target: str
    file: str | None = None
    sha256: str | None = None
    distribution: str | None = None
    version: str | None = None
    entry_point: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        """One line for ``msibench ls``."""
        if self.kind == "builtin":
            return self.target
        if self.kind == "file":
            return f"file {self.target} (sha256 {str(self.sha256)[:12]})"
        dist = f"{self.distribution} {self.version}: " if self.distribution else ""
        if self.kind == "entry-point":
            return f"entry point {self.entry_point} ({dist}{self.target})"
        return f"module {dist}{self.target}"


# Classes resolved from a plugin spec, with their source: the runner asks origin(type(method)) for run.json.
_ORIGINS: dict[type, MethodSource] = {}


def is_path_spec(spec: str) -> bool:
    """Whether ``spec`` names a method by ``file.py:Class`` or ``module:Class`` (not by a registered name)."""
    return ":" in spec


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- entry points


def entry_points() -> dict[str, list[EntryPoint]]:
    """Installed entry points of :data:`ENTRY_POINT_GROUP`, by name (a name listed twice is a conflict)."""
    from importlib.metadata import entry_points as _entry_points

    out: dict[str, list[EntryPoint]] = {}
    seen: set[tuple[str, str, str | None]] = set()
    for ep in _entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else None
        key = (ep.name, ep.value, dist)
        if key in seen:  # the same distribution found twice on sys.path (e.g. an editable install and a build)
            continue
        seen.add(key)
        out.setdefault(ep.name, []).append(ep)
    return out


def _dist_of(ep: EntryPoint) -> tuple[str | None, str | None]:
    return (ep.dist.name, ep.dist.version) if ep.dist is not None else (None, None)


def _describe_entry(ep: EntryPoint) -> str:
    dist, version = _dist_of(ep)
    return f"{ep.name} = {ep.value}" + (f" (from {dist} {version})" if dist else "")


# ------------------------------------------------------------------------------------------------- resolve


def resolve(name: str) -> type[Method]:
    """Import and return the method class that ``name`` designates (see the module docstring)."""
    return resolve_source(name)[0]


def resolve_source(spec: str) -> tuple[type[Method], MethodSource]:
    """The class ``spec`` designates and where it came from."""
    spec = str(spec).strip()
    if spec in METHODS:
        shadowing = entry_points().get(spec)
        if shadowing:
            raise PluginError(
                f"method {spec!r}: duplicate name: the installed entry point "
                + "; ".join(_describe_entry(ep) for ep in shadowing)
                + f" ({ENTRY_POINT_GROUP}) takes the name of a built-in method. Rename or uninstall it"
            )
        cls = _import_builtin(spec)
        return cls, MethodSource("builtin", spec, METHODS[spec])
    if is_path_spec(spec):
        location, _, class_name = spec.rpartition(":")
        if not location or not class_name.isidentifier():
            raise PluginError(
                f"--method {spec!r}: expected path/to/file.py:Class or package.module:Class (the class after the "
                "last ':')"
            )
        if location.endswith(".py") or "/" in location or "\\" in location:
            cls, source = _load_file(spec, Path(location), class_name)
        else:
            cls, source = _load_module(spec, location, class_name)
    else:
        found = entry_points().get(spec)
        if not found:
            known = [*METHODS, *entry_points()]
            close = difflib.get_close_matches(spec, known, n=3, cutoff=0.4)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise UnknownMethodError(
                f"unknown method {spec!r}.{hint} Known methods: {', '.join(sorted(known))}; or name your own "
                "class: --method path/to/file.py:Class or --method package.module:Class"
            )
        if len(found) > 1:
            raise PluginError(
                f"method {spec!r}: duplicate name: {len(found)} installed entry points ({ENTRY_POINT_GROUP}) are "
                f"called {spec!r}: " + "; ".join(_describe_entry(ep) for ep in found) + ". Uninstall one, or name "
                "the class you mean with --method package.module:Class"
            )
        cls, source = _load_entry_point(found[0])
    _ORIGINS[cls] = source
    return cls, source


def _import_builtin(name: str) -> type[Method]:
    module_name, _, class_name = METHODS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise MethodUnavailableError(f"method {name!r}: module {module_name} is not installed") from err
        raise
    try:
        return getattr(module, class_name)
    except AttributeError as err:
        raise MethodUnavailableError(f"method {name!r}: {module_name} has no class {class_name}") from err


def _file_module_name(path: Path) -> str:
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:10]
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    return f"{_FILE_MODULE_PREFIX}{stem}_{digest}"


def _load_file(spec: str, path: Path, class_name: str) -> tuple[type[Method], MethodSource]:
    path = path.expanduser().resolve()
    where = f"--method {spec!r}: file {path}"
    if not path.is_file():
        raise PluginError(f"{where}: no such file")
    if path.suffix != ".py":
        raise PluginError(f"{where}: not a Python file (expected path/to/file.py:Class)")
    module_name = _file_module_name(path)
    module = sys.modules.get(module_name)
    if module is None:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise PluginError(f"{where}: cannot be imported")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # before exec: dataclasses and pickling look the module up by name
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[module_name]
            raise PluginError(f"{where}: import failed: {type(err).__name__}: {err}") from err
    cls = _method_class(module, class_name, where)
    source = MethodSource("file", spec, f"{path}:{class_name}", file=str(path), sha256=_sha256(path))
    return cls, source


def _load_module(spec: str, module_name: str, class_name: str) -> tuple[type[Method], MethodSource]:
    where = f"--method {spec!r}: module {module_name}"
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise PluginError(f"{where}: import failed: {type(err).__name__}: {err}") from err
    cls = _method_class(module, class_name, where)
    return cls, _module_source("module", spec, module, class_name)


def _load_entry_point(ep: EntryPoint) -> tuple[type[Method], MethodSource]:
    where = f"method {ep.name!r}: entry point {_describe_entry(ep)}"
    module_name, _, attr = ep.value.partition(":")
    try:
        module = importlib.import_module(module_name.strip())
    except Exception as err:
        raise PluginError(f"{where}: import failed: {type(err).__name__}: {err}") from err
    cls = _method_class(module, attr.strip(), where)
    dist, version = _dist_of(ep)
    source = _module_source("entry-point", ep.name, module, attr.strip())
    return cls, MethodSource(
        "entry-point",
        ep.name,
        source.target,
        file=source.file,
        sha256=source.sha256,
        distribution=dist or source.distribution,
        version=version or source.version,
        entry_point=f"{ENTRY_POINT_GROUP}:{ep.name}",
    )


def _module_source(kind: str, spec: str, module: Any, class_name: str) -> MethodSource:
    file = getattr(module, "__file__", None)
    dist, version = _distribution_of(module.__name__)
    return MethodSource(
        kind,
        spec,
        f"{module.__name__}:{class_name}",
        file=file,
        sha256=_sha256(Path(file)) if file and Path(file).is_file() else None,
        distribution=dist,
        version=version,
    )


def _distribution_of(module_name: str) -> tuple[str | None, str | None]:
    """The installed distribution that provides the top-level package of ``module_name``, with its version."""
    from importlib import metadata

    top = module_name.partition(".")[0]
    dists = metadata.packages_distributions().get(top) or []
    if len(dists) != 1:
        return None, None
    try:
        return dists[0], metadata.version(dists[0])
    except metadata.PackageNotFoundError:
        return dists[0], None


def _method_class(module: Any, class_name: str, where: str) -> type[Method]:
    from msibench.methods.base import Method

    try:
        cls = getattr(module, class_name)
    except AttributeError:
        classes = [n for n, v in vars(module).items() if inspect.isclass(v) and _is_method(v, Method)]
        hint = f"; Method classes there: {', '.join(classes)}" if classes else ""
        raise PluginError(f"{where}: has no class {class_name!r}{hint}") from None
    if not _is_method(cls, Method):
        what = f"a {type(cls).__name__}" if not inspect.isclass(cls) else f"class {cls.__module__}.{cls.__qualname__}"
        raise PluginError(
            f"{where}: {class_name!r} is not a Method subclass ({what}); derive it from "
            "msibench.methods.base.Method (see docs/your-method.md)"
        )
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise PluginError(f"{where}: class {class_name!r} is abstract: it does not implement {missing}")
    builtin = METHODS.get(cls.name)
    if cls.name == Method.name:
        raise PluginError(
            f'{where}: class {class_name!r} keeps the base name {Method.name!r}: set `name = "my-method"` (it '
            "names the run folder and the table row)"
        )
    if builtin is not None and builtin != f"{cls.__module__}:{cls.__qualname__}":
        raise PluginError(
            f"{where}: class {class_name!r} has the name {cls.name!r}, a duplicate name: the built-in method "
            f"{cls.name!r} ({builtin}) has it. Choose another `name` (it names the run folder and the table row)"
        )
    return cls


def _is_method(obj: Any, base: type) -> bool:
    return inspect.isclass(obj) and issubclass(obj, base) and obj is not base


# ------------------------------------------------------------------------------------------------ build, ls


def build(name: str, options: dict[str, Any] | None = None) -> Method:
    """Construct the method ``name`` with ``-M`` style options (cheap: no weights are loaded)."""
    return resolve(name)(**(options or {}))


def origin(cls: type) -> MethodSource:
    """Where the method class ``cls`` came from: as it was resolved, else from its module (a class handed to the
    Python API directly)."""
    if cls in _ORIGINS:
        return _ORIGINS[cls]
    target = f"{cls.__module__}:{cls.__qualname__}"
    for name, builtin in METHODS.items():
        if builtin == target:
            return MethodSource("builtin", name, target)
    module = sys.modules.get(cls.__module__)
    file = getattr(module, "__file__", None)
    if cls.__module__.startswith(_FILE_MODULE_PREFIX) and file:
        return MethodSource(
            "file", f"{file}:{cls.__qualname__}", f"{file}:{cls.__qualname__}", file, _sha256(Path(file))
        )
    if module is None:
        return MethodSource("module", target, target)
    return _module_source("module", target, module, cls.__qualname__)


def listing(extra: Iterable[str] = ()) -> list[tuple[str, str | MethodSource]]:
    """(name, source) of every method ``msibench ls`` shows: the built-ins (their lazy ``module:Class`` string;
    nothing is imported), the installed entry points and the ``extra`` specs (their :class:`MethodSource`, or a
    string saying why they cannot be used). The built-ins come first, then the rest in the order given."""
    out: list[tuple[str, str | MethodSource]] = list(METHODS.items())
    for spec in [*sorted(entry_points()), *extra]:
        try:
            out.append((spec, resolve_source(spec)[1]))
        except (UnknownMethodError, MethodUnavailableError) as err:
            out.append((spec, f"unusable: {err}"))
    return out
