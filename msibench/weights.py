"""Every weight file Table I needs, declared as data, fetched by one command, checked by another.

``msibench weights fetch [--scorers] [--method NAME|all]`` downloads the declared files by hub id + revision into
the caches that ``msibench score`` and ``msibench run`` search, and records the sha256 of each;
``msibench weights ls`` says for each file whether it is present, missing or different from what was fetched.
Nothing else in msibench downloads a scorer weight: the scorer reads these caches offline and names every missing
file in one message (see :mod:`msibench.scoring.backbones`).

Declarations (:class:`WeightFiles`): the scorers' in :data:`msibench.scoring.backbones.SCORER_WEIGHTS`; each
method's in its class attribute ``weights`` (``Method.weights``), reached through the lazy registry, so a method
module declares its files without msibench importing it until asked.

Where files go:
- ``hf``: the Hugging Face hub cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``), through
  ``huggingface_hub.hf_hub_download``: the cache ``from_pretrained`` and the scorer's loaders read.
- ``github``: a GitHub release asset (``repo_id`` = owner/name, ``revision`` = the release tag), into
  ``$MSIBENCH_CACHE/weights/`` (where the scorer looks for YOLO weights).
- ``manual``: not downloadable by a program (a Google Drive folder, weights you train); ``note`` says how to get
  them and where to point the method.

The record of what was fetched (repo, revision, resolved commit, file, sha256, size) is
``$MSIBENCH_CACHE/weights/fetched.json``. This module imports nothing heavy: ``huggingface_hub`` only inside
the functions that download or look up the hub cache.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import logging
import os
import re
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msibench.cache import atomic_write_bytes, cache_dir, mkstemp, sha256_file

logger = logging.getLogger(__name__)

FETCHED_FILE = "fetched.json"
SOURCES = ("hf", "github", "manual")
_GLOB = re.compile(r"[*?\[]")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class WeightFiles:
    """Files of one repository at one revision that a method or a scorer loads.

    ``files`` are paths inside the repository; one with ``*``, ``?`` or ``[`` is a pattern matched against the
    repository's file list at fetch time (for files whose exact names differ between revisions, e.g. shards).
    ``revision`` is a commit (pinned), or a branch or tag; None means the default branch, not pinned (``ls`` says
    so). ``sha256`` optionally pins file contents ({path: sha256}); a fetched file that differs is refused.
    """

    repo_id: str
    files: tuple[str, ...]
    revision: str | None = None
    what: str = ""
    source: str = "hf"
    note: str = ""
    sha256: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"WeightFiles({self.repo_id!r}): source must be one of {SOURCES}, got {self.source!r}")
        if not self.files:
            raise ValueError(f"WeightFiles({self.repo_id!r}): no files declared")
        if self.source == "github" and not self.revision:
            raise ValueError(f"WeightFiles({self.repo_id!r}): a GitHub release asset needs its tag as revision")

    @property
    def pinned(self) -> bool:
        """A commit for the hub; a release tag for GitHub; manual files are what you put there."""
        if self.source == "hf":
            return bool(self.revision and _COMMIT.match(self.revision))
        return True

    @property
    def label(self) -> str:
        at = f"@{self.revision}" if self.revision else "@main"
        return f"{self.what or self.repo_id}: {self.repo_id}{at if self.source != 'manual' else ''}"


@dataclass(frozen=True)
class FileStatus:
    """One declared file: ``status`` is present, missing, different, unverified (present but fetched by something
    else, so there is no sha256 to compare) or manual."""

    owner: str  # "scorers" or the method name
    spec: WeightFiles
    file: str  # the path in the repository (a pattern when not yet resolved)
    status: str
    path: str | None = None
    sha256: str | None = None
    detail: str = ""


class WeightsError(RuntimeError):
    """Weights could not be fetched; the message lists every file that failed and why."""


# --------------------------------------------------------------------------------------------- declarations


def scorer_weights() -> list[WeightFiles]:
    from msibench.scoring.backbones import SCORER_WEIGHTS

    return list(SCORER_WEIGHTS)


def grounding_weights() -> list[WeightFiles]:
    """The optional open-vocabulary detector's (``msibench score --detector owlv2+sam``): not in Table I's set."""
    from msibench.scoring.backbones import GROUNDING_WEIGHTS

    return list(GROUNDING_WEIGHTS)


def method_weights(name: str) -> list[WeightFiles]:
    """The weight files the method ``name`` declares (``Method.weights``), through the lazy registry."""
    from msibench import registry

    declared = getattr(registry.resolve(name), "weights", ())
    out = list(declared)
    bad = [w for w in out if not isinstance(w, WeightFiles)]
    if bad:
        raise TypeError(f"method {name!r}: weights must be WeightFiles, got {bad[:1]}")
    return out


def selection(scorers: bool, methods: Sequence[str], grounding: bool = False) -> list[tuple[str, WeightFiles]]:
    """(owner, declaration) for the scorers and/or ``methods`` ("all" = every registered method) and/or the optional
    grounding detector; none given: everything Table I needs (which does not include the grounding detector)."""
    from msibench import registry

    if not scorers and not methods and not grounding:
        scorers, methods = True, ["all"]
    names: list[str] = []
    for m in methods:
        names.extend(registry.METHODS if m == "all" else [m])
    out: list[tuple[str, WeightFiles]] = []
    if scorers:
        out += [("scorers", w) for w in scorer_weights()]
    if grounding:
        out += [("grounding", w) for w in grounding_weights()]
    for name in dict.fromkeys(names):
        out += [(name, w) for w in method_weights(name)]
    return out


# ------------------------------------------------------------------------------------------------ locations


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def github_dir() -> Path:
    return cache_dir() / "weights"


GITHUB_URL = "https://github.com"
# Seconds a fetch waits for the first TCP connection to a host before calling it unreachable.
CONNECT_TIMEOUT_S = 5.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def github_url(spec: WeightFiles, file: str) -> str:
    return f"{GITHUB_URL}/{spec.repo_id}/releases/download/{spec.revision}/{file}"


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def unreachable(source: str) -> str | None:
    """Why nothing can be fetched from ``source``'s host ("hf" or "github"), or None when it answers.

    One TCP connection per host and fetch, so that an offline fetch fails at once for every file instead of
    retrying each one (huggingface_hub backs off 1 + 2 + 4 + 8 + 8 s per file before giving up: 23 s a file, about
    20 minutes for everything Table I needs). ``HF_HUB_OFFLINE`` is honoured for the hub. Behind a proxy (the
    ``*_PROXY`` variables) a direct connection says nothing, so the downloads are left to try."""
    if source == "hf":
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE is set (unset it, and TRANSFORMERS_OFFLINE, to fetch)"
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    url = urllib.parse.urlsplit(hub_endpoint() if source == "hf" else GITHUB_URL)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as err:
        return f"cannot reach {url.hostname}:{port} ({err.strerror or err})"


# What the hub probe answered, per endpoint and proxy setting: asked once per process (see hub_offline).
_HUB_PROBES: dict[tuple[str | None, ...], str | None] = {}


def hub_offline() -> str | None:
    """Why a method adapter must read hub ids from the local hub cache only, or None when the hub answers.

    ``HF_HUB_OFFLINE`` is read each time; the TCP probe of :func:`unreachable` runs once per process for a given
    endpoint and proxy setting, so a setup that loads twenty files asks once. Offline, a cached file then loads at
    once and a missing one fails at once, instead of huggingface_hub retrying it for 23 s."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return unreachable("hf")
    key = (hub_endpoint(), *(os.environ.get(v) for v in _PROXY_VARS))
    if key not in _HUB_PROBES:
        _HUB_PROBES[key] = unreachable("hf")
    return _HUB_PROBES[key]


def hub_kwargs() -> dict[str, Any]:
    """The keywords of a method's hub load (``hf_hub_download``, ``from_pretrained``): ``local_files_only`` when
    the hub cannot be reached (:func:`hub_offline`), else none, so that an online machine downloads as usual."""
    return {"local_files_only": True} if hub_offline() else {}


def hub_download(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """``hf_hub_download`` of one file with :func:`hub_kwargs`: from the cache only when the hub is unreachable."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, revision=revision, **hub_kwargs()))


def hub_failure(err: BaseException) -> str:
    """Why a method's hub load failed, in a few words: offline, that the hub cache lacks the file (not the
    library's advice to turn downloads on); online, the library's error."""
    why = hub_offline()
    if why and isinstance(err, OSError):
        return f"not in the hub cache {hub_cache_dir()}, and the hub is unreachable: {why}"
    return f"{type(err).__name__}: {err}"


def fetch_remedy(method: str, local: str) -> str:
    """The remedies a method's "cannot get weights" message names: the one command first, then a local copy."""
    return f"Fetch it with `msibench weights fetch --method {method}`, or pass a local copy with {local}."


def locate_hub_file(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """A file of a hub repo in the local hub cache, or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache_dir(), revision=revision or "main")
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def locate(spec: WeightFiles, file: str) -> Path | None:
    """Where a declared (non-pattern) file is on this machine, or None."""
    if spec.source == "hf":
        return locate_hub_file(spec.repo_id, file, spec.revision)
    if spec.source == "github":
        path = github_dir() / Path(file).name
        return path if path.is_file() else None
    return None


# ----------------------------------------------------------------------------------------------- the record


def _record_path() -> Path:
    return github_dir() / FETCHED_FILE


def read_fetched() -> dict[str, dict[str, Any]]:
    path = _record_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        logger.warning("%s: unreadable (%s); treating every file as not fetched by msibench", path, err)
        return {}
    return data.get("files", {}) if isinstance(data, dict) else {}


def _write_fetched(files: dict[str, dict[str, Any]]) -> None:
    blob = json.dumps({"format": "msibench-weights-fetched", "files": files}, indent=1, sort_keys=True) + "\n"
    atomic_write_bytes(_record_path(), blob.encode())


def record_key(spec: WeightFiles, file: str) -> str:
    return f"{spec.source}:{spec.repo_id}@{spec.revision or 'main'}:{file}"


# -------------------------------------------------------------------------------------------------- status


def status(entries: Iterable[tuple[str, WeightFiles]], *, verify: bool = False) -> list[FileStatus]:
    """Present / missing / different / unverified / manual for every declared file.

    A file fetched by msibench is compared with its recorded sha256: by size and modification time (cheap), or
    by re-hashing its content with ``verify``. Patterns are resolved from the record of a past fetch."""
    fetched = read_fetched()
    out = []
    for owner, spec in entries:
        pinned = dict(spec.sha256)
        for pattern in spec.files:
            if spec.source == "manual":
                out.append(FileStatus(owner, spec, pattern, "manual", detail=spec.note))
                continue
            if _GLOB.search(pattern):
                prefix = record_key(spec, "")
                names = sorted(
                    k[len(prefix) :]
                    for k in fetched
                    if k.startswith(prefix) and fnmatch.fnmatch(k[len(prefix) :], pattern)
                )
                if not names:
                    out.append(FileStatus(owner, spec, pattern, "missing", detail="pattern: fetch to resolve it"))
                    continue
            else:
                names = [pattern]
            for name in names:
                out.append(
                    _file_status(owner, spec, name, fetched.get(record_key(spec, name)), pinned.get(name), verify)
                )
    return out


def _file_status(owner, spec, name, rec, pinned_sha, verify) -> FileStatus:
    path = locate(spec, name)
    if path is None and rec is not None and Path(rec.get("path", "")).is_file():
        path = Path(rec["path"])
    if path is None:
        return FileStatus(owner, spec, name, "missing")
    expected = pinned_sha or (rec or {}).get("sha256")
    if expected is None:
        return FileStatus(owner, spec, name, "unverified", str(path), detail="present, not fetched by msibench")
    stat = path.stat()
    same_stamp = rec is not None and rec.get("size") == stat.st_size and rec.get("mtime_ns") == stat.st_mtime_ns
    # unchanged since msibench fetched (and checked) it: no need to hash it again, unless asked
    if same_stamp and not verify and rec.get("sha256") == expected:
        return FileStatus(owner, spec, name, "present", str(path), rec.get("sha256"))
    actual = sha256_file(path)
    if actual != expected:
        return FileStatus(
            owner, spec, name, "different", str(path), actual, detail=f"sha256 {actual[:12]}, expected {expected[:12]}"
        )
    return FileStatus(owner, spec, name, "present", str(path), actual)


# --------------------------------------------------------------------------------------------------- fetch


def _download_url(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` through a temp file in the same folder (never a torn file)."""
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp(dest.parent, prefix=f".{dest.name}.", suffix=".part")  # the umask's mode, not 0600
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 (https only)
            for block in iter(lambda: resp.read(1 << 20), b""):
                out.write(block)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _hub_files(spec: WeightFiles, pattern: str) -> list[str]:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_endpoint())
    names = [n for n in api.list_repo_files(spec.repo_id, revision=spec.revision) if fnmatch.fnmatch(n, pattern)]
    if not names:
        raise FileNotFoundError(f"no file of {spec.repo_id}@{spec.revision or 'main'} matches {pattern!r}")
    return sorted(names)


def fetch(
    entries: Iterable[tuple[str, WeightFiles]],
    *,
    progress: Callable[[str], None] | None = None,
) -> list[FileStatus]:
    """Download every declared file that is not present with its recorded sha256; record what was fetched.

    Every failure is collected and raised at the end in one :class:`WeightsError` (files fetched before it are
    kept and recorded). Manual files are listed, not fetched. A host that cannot be reached (:func:`unreachable`,
    asked once per host, only when a file must be downloaded from it) fails its files at once, without a try."""
    import huggingface_hub

    say = progress or (lambda msg: logger.info("%s", msg))
    fetched = read_fetched()
    done: list[FileStatus] = []
    errors: list[str] = []
    down: dict[str, str | None] = {}

    def host_down(source: str) -> str | None:
        if source not in down:
            down[source] = unreachable(source)
        return down[source]

    for owner, spec in entries:
        pinned = dict(spec.sha256)
        if spec.source == "manual":
            done += [FileStatus(owner, spec, f, "manual", detail=spec.note) for f in spec.files]
            continue
        names: list[str] = []
        for pattern in spec.files:
            if spec.source == "hf" and _GLOB.search(pattern) and host_down("hf"):
                errors.append(f"{spec.label}: {pattern}: not fetched: {host_down('hf')}")
                continue
            try:
                names += _hub_files(spec, pattern) if spec.source == "hf" and _GLOB.search(pattern) else [pattern]
            except Exception as err:  # offline, unknown repo or revision, no match
                errors.append(f"{spec.label}: {pattern}: {type(err).__name__}: {err}")
        for name in names:
            key = record_key(spec, name)
            current = _file_status(owner, spec, name, fetched.get(key), pinned.get(name), verify=False)
            if current.status == "present":
                done.append(current)
                continue
            why = host_down(spec.source)
            if why:
                errors.append(f"{spec.label}: {name}: not fetched: {why}")
                continue
            say(f"fetching {spec.repo_id}@{spec.revision or 'main'}: {name}")
            try:
                if spec.source == "hf":
                    path = Path(
                        huggingface_hub.hf_hub_download(
                            spec.repo_id, name, revision=spec.revision, endpoint=hub_endpoint()
                        )
                    )
                else:
                    path = github_dir() / Path(name).name
                    _download_url(github_url(spec, name), path)
                sha = sha256_file(path)
            except Exception as err:  # offline, missing file, HTTP errors: all reported together below
                errors.append(f"{spec.label}: {name}: {type(err).__name__}: {err}")
                continue
            if name in pinned and sha != pinned[name]:
                errors.append(f"{spec.label}: {name}: sha256 {sha} differs from the pinned {pinned[name]}")
                continue
            stat = path.stat()
            fetched[key] = {
                "repo_id": spec.repo_id,
                "source": spec.source,
                "revision": spec.revision,
                "commit": snapshot_commit(path),
                "file": name,
                "path": str(path),
                "sha256": sha,
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            _write_fetched(fetched)  # after every file: an interrupted fetch keeps what it got
            done.append(FileStatus(owner, spec, name, "present", str(path), sha, detail="fetched"))
    if errors:
        present = sum(d.status == "present" for d in done)
        manual = len(done) - present
        raise WeightsError(
            f"{len(errors)} weight file(s) could not be fetched ({present} present or fetched"
            + (f", {manual} to be put in place by hand" if manual else "")
            + "):\n"
            + "\n".join(f"- {e}" for e in errors)
        )
    return done


def snapshot_commit(path: str | Path) -> str | None:
    """The commit a hub-cache path belongs to (``.../snapshots/<commit>/file``), else None."""
    parts = Path(path).parts
    if "snapshots" in parts:
        i = parts.index("snapshots")
        if i + 1 < len(parts) and _COMMIT.match(parts[i + 1]):
            return parts[i + 1]
    return None
