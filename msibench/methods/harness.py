"""What every method adapter repeats around its model code, in one place: option checks, weight sources (a local
copy or a hub id + revision), loading with one readable error, dtypes, and quiet loading.

The adapters (``baselines/*``, ``mscustomnet.adapter``) keep their model code to themselves (diffusers' single-file
policy); the harness machinery around it lives here, below them in the layers: this module imports nothing from
``baselines`` or ``mscustomnet``, and nothing heavy at module level (torch, diffusers, transformers and
huggingface_hub are imported inside the functions that need them), so that ``msibench ls`` stays light.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from msibench.methods.base import WeightsUnavailableError
from msibench.weights import fetch_remedy, hub_download, hub_failure, hub_kwargs

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: The floating dtypes a method may run in (an ``auto`` choice, where a method offers one, is its own).
DTYPES = ("float32", "float16", "bfloat16")


# ------------------------------------------------------------------------------------------------ options


def check_choice(options: Mapping[str, Any], key: str, choices: Iterable[str], method: str) -> None:
    """Refuse ``options[key]`` outside ``choices``, naming the method, the option and the valid values."""
    choices = tuple(choices)
    if options[key] not in choices:
        raise ValueError(f"{method} option {key!r}: {options[key]!r} is not one of {', '.join(choices)}")


def check_positive(options: Mapping[str, Any], keys: Iterable[str], method: str) -> None:
    """Refuse an integer option below 1 (steps, resolution)."""
    for key in keys:
        if int(options[key]) < 1:
            raise ValueError(f"{method} option {key!r}: must be a positive integer, got {options[key]!r}")


def check_non_negative(options: Mapping[str, Any], keys: Iterable[str], method: str) -> None:
    """Refuse a number option below 0 (guidance, scales); None means "the method's own default" and passes."""
    for key in keys:
        if options[key] is not None and float(options[key]) < 0:
            raise ValueError(f"{method} option {key!r}: must be >= 0, got {options[key]!r}")


def env_default(env: str, default: str) -> str:
    """An option's default read from environment variable ``env`` when set (a local copy of the weights)."""
    return os.environ.get(env, "") or default


# ------------------------------------------------------------------------------------------------ sources


def local_path(source: str) -> Path | None:
    """The resolved local path of ``source``, or None when it is not on disk (a hub id, or empty)."""
    if not source:
        return None
    path = Path(source).expanduser()
    return path.resolve() if path.exists() else None


def source_record(source: str, revision: str | None) -> dict[str, Any]:
    """Fingerprint of a model source: a local copy by its resolved path, a hub id by its revision (a local folder
    has none: recording one would suggest a pin that does not exist)."""
    local = local_path(source)
    if local is not None:
        return {"source": str(local)}
    return {"source": source, "revision": revision}


def from_pretrained(
    loader: Callable[..., Any],
    source: str,
    what: str,
    error: type[Exception],
    option: str,
    method: str,
    **kwargs: Any,
) -> Any:
    """``loader(source, **kwargs)``; a failure becomes ``error`` naming ``msibench weights fetch`` and ``option``.

    A ``revision`` keyword applies to hub ids only (a local folder has none). A hub id is read from the hub cache
    only when the hub cannot be reached (:func:`msibench.weights.hub_kwargs`): no retries, a missing file fails at
    once.
    """
    local = Path(source).expanduser()
    revision = kwargs.pop("revision", None)
    if not local.exists():
        kwargs.update(hub_kwargs())
        if revision:
            kwargs["revision"] = revision
    try:
        return loader(str(local) if local.exists() else source, **kwargs)
    except (OSError, ValueError) as err:
        if local.exists():
            raise error(
                f"{method}: cannot load the {what} from the local folder {local}: {err}. Point {option} at a "
                "folder that holds it in the diffusers/transformers layout."
            ) from err
        subfolder = kwargs.get("subfolder")
        raise error(
            f"{method}: cannot load the {what} from the hub repo {source}"
            f"{f' (subfolder {subfolder})' if subfolder else ''}{f' at revision {revision}' if revision else ''}: "
            f"{hub_failure(err)}. {fetch_remedy(method, option)}"
        ) from err


def hub_file(repo_id: str, filename: str, revision: str | None, *, method: str, what: str, option: str) -> Path:
    """One file of a hub repo (from the hub cache only when the hub is unreachable); any failure becomes one
    :class:`WeightsUnavailableError` naming the file, the revision and the remedies."""
    try:
        return hub_download(repo_id, filename, revision)
    except Exception as err:  # offline, unknown repo, revision or file: huggingface_hub raises several types
        raise WeightsUnavailableError(
            f"{method}: cannot get the {what} {filename!r} from the hub repo {repo_id!r} at revision {revision}: "
            f"{hub_failure(err)}. {fetch_remedy(method, option)}"
        ) from err


def weight_file(
    source: str, filename: str, revision: str | None, *, method: str, what: str, option: str, repo_id: str = ""
) -> Path:
    """``filename`` of ``source``: ``source`` itself when it is a local file, ``source/filename`` when it is a local
    folder, else the file of the hub repo ``source`` at ``revision``. Each way that fails names the file and
    ``option`` (how to point elsewhere); ``repo_id`` is the hub repo to download it from, for the messages."""
    if not source:
        raise WeightsUnavailableError(
            f"{method}: no source given for the {what}; use {option}, or a local folder holding {filename}."
        )
    local = local_path(source)
    if local is not None and local.is_file():
        return local
    if local is not None:
        if (local / filename).is_file():
            return local / filename
        where = f" Download {filename} from the hub repo {repo_id}" if repo_id else ""
        where += f" (revision {revision})" if repo_id and revision else ""
        where += f" into {local}, keeping its relative path." if repo_id else ""
        raise WeightsUnavailableError(
            f"{method}: {what} not found: {local / filename} does not exist ({option}).{where}"
        )
    return hub_file(source, filename, revision, method=method, what=what, option=option)


# ------------------------------------------------------------------------------------------------ dtypes


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``."""
    import torch

    return getattr(torch, name)


def warn_if_half_on_cpu(method: str, dtype_name: str, device: str) -> None:
    """Half precision on the CPU runs (the fingerprint records it) but slowly; say so once at setup."""
    if dtype_name in ("float16", "bfloat16") and not str(device).startswith("cuda"):
        logger.warning(
            "%s: running %s on %s (the fingerprint says so); expect it to be slow", method, dtype_name, device
        )


def diffusers_dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """``{"dtype": ...}`` where diffusers takes it (``torch_dtype`` is deprecated there), else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def transformers_dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """``dtype=`` since transformers 4.56, ``torch_dtype=`` before (now deprecated)."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence the transformers/diffusers loading bars while a method's components load, then restore them."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    restore = []
    for lib in (transformers_logging, diffusers_logging):
        if lib.is_progress_bar_enabled():
            lib.disable_progress_bar()
            restore.append(lib)
    try:
        yield
    finally:
        for lib in restore:
            lib.enable_progress_bar()


def seeded_generator(seed: int) -> torch.Generator:
    """The generator of one sample: on the CPU, so that the initial noise does not depend on the device."""
    import torch

    return torch.Generator("cpu").manual_seed(int(seed))


def require_setup(loaded: object, method: str) -> None:
    """The one message for ``generate`` called before ``setup``."""
    if loaded is None:
        raise RuntimeError(f"{method}: call setup(device) before generate()")


__all__ = [
    "DTYPES",
    "check_choice",
    "check_non_negative",
    "check_positive",
    "diffusers_dtype_kwarg",
    "env_default",
    "from_pretrained",
    "hub_file",
    "local_path",
    "quiet_loading",
    "require_setup",
    "seeded_generator",
    "source_record",
    "torch_dtype",
    "transformers_dtype_kwarg",
    "warn_if_half_on_cpu",
]
