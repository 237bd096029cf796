"""The resumable, shardable, crash-safe generation runner.

Work units are (task, sample index) pairs. For each unit the image is written to a temp file and
``os.replace``d into ``images/``; then one record (with the image's sha256) is appended to ``records.jsonl`` and
flushed: the record is the commit marker, so a run killed at any moment loses at most the image in flight, and
re-running the same command skips every recorded unit whose image is still there unchanged (a deleted or altered
image is generated again). Seeds come from (base seed, task id, sample index) only, so the output never depends
on order, sharding or resumption.

Concurrency: one writer per shard (a second one is refused with :class:`~msibench.records.LockBusyError`); every
writer of the folder holds a shared lock, so only a writer alone in it removes stale temp files or replaces the
run (``overwrite``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from msibench import exitcodes, registry
from msibench.bench.manifest import RUN_MANIFEST_COPY, TRACKS, Manifest, Task, keep_manifest_copy, load_manifest
from msibench.bench.prepare import missing_references, prepare, reference_paths
from msibench.cache import atomic_write_bytes, mkdtemp, remove_stale_temp_files, sha256_file
from msibench.methods.base import GenerationRequest, Method, SubjectInput
from msibench.records import (
    RECORDS_FILE,
    FolderWriters,
    LockBusyError,
    RecordLog,
    exclusive_or_busy,
    locked,
    read_records,
    record_key,
)

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
IMAGES_DIR = "images"
_PACKAGES = (
    "msibench",
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "open_clip_torch",
    "timm",
    "ultralytics",
    "numpy",
    "pillow",
    "pycocotools",
)


class RunConflictError(RuntimeError):
    """The run folder holds results of another method fingerprint, manifest or base seed."""


class MethodSetupError(RuntimeError):
    """A method could not load its weights or models; nothing was generated, nothing recorded is lost."""


class OptionError(ValueError):
    """A bad option or environment value (``--limit 0``, ``RANK=x``, ``--device tpu``); the message names it."""


@dataclass
class RunSummary:
    run_dir: Path
    total: int = 0
    done_before: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    repaired: int = 0  # recorded images found missing or changed, so generated again
    by_other_writer: int = 0  # units another process recorded while this one generated them too
    failed_recorded: int = 0  # units of this selection whose latest record is a failure, after this invocation
    failures: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """:data:`msibench.exitcodes.FAILURES` while any selected sample is recorded as failed, else OK."""
        return exitcodes.FAILURES if self.failed_recorded else exitcodes.OK


def sample_seed(base_seed: int, task_id: str, sample_index: int) -> int:
    digest = hashlib.sha256(f"{base_seed}:{task_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def shard_of(task_id: str, sample_index: int, num_shards: int) -> int:
    digest = hashlib.sha256(f"{task_id}#{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def _env_int(name: str, minimum: int) -> int | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise OptionError(f"environment variable {name}={raw!r}: expected an integer >= {minimum}") from None
    if value < minimum:
        raise OptionError(f"environment variable {name}={raw!r}: expected an integer >= {minimum}")
    return value


def torchrun_env() -> tuple[int, int, int] | None:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun sets them, validated; None outside torchrun.

    Checked before anything else reads them (ultralytics parses WORLD_SIZE at import and crashes on a bad one)."""
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if rank is None and world is None:
        if local is not None and local != 0:
            raise OptionError(f"environment variable LOCAL_RANK={local} is set without RANK and WORLD_SIZE")
        return None
    if rank is None or world is None:
        have, missing = ("RANK", "WORLD_SIZE") if world is None else ("WORLD_SIZE", "RANK")
        raise OptionError(f"environment variable {have} is set but {missing} is not; torchrun sets both")
    if rank >= world:
        raise OptionError(f"environment variables RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return rank, world, local or 0


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N); without a spec, torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    env = torchrun_env()
    if spec:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if match is None:
            raise OptionError(f"--shard must look like I/N (e.g. 0/2), got {spec!r}")
        index, count = int(match[1]), int(match[2])
        if not 0 <= index < count:
            raise OptionError(f"--shard {spec}: need 0 <= I < N")
        return index, count
    if env is not None:
        return env[0], env[1]
    return 0, 1


_DEVICE = re.compile(r"(cpu|mps|cuda)(?::(\d+))?")


def _cuda_device_count() -> int:
    if "torch" not in sys.modules:
        try:
            import torch  # noqa: F401
        except ImportError:
            return 0
    torch = sys.modules["torch"]
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(requested: str | None) -> str:
    """The device for this process, checked to exist here: ``cpu``, ``cuda`` (under torchrun each rank takes its own
    GPU, ``cuda:LOCAL_RANK``), ``cuda:N`` or ``mps``; None picks ``cuda`` when a GPU is visible, else ``cpu``."""
    env = torchrun_env()
    local_rank = env[2] if env is not None else 0
    if requested is None:
        return f"cuda:{local_rank}" if _cuda_device_count() > local_rank else "cpu"
    match = _DEVICE.fullmatch(requested.strip().lower())
    if match is None:
        raise OptionError(f"--device {requested!r}: unknown device; use cpu, cuda, cuda:N or mps")
    kind, index = match[1], match[2]
    if kind == "cpu":
        if index is not None:
            raise OptionError(f"--device {requested!r}: use plain cpu")
        return "cpu"
    if kind == "mps":
        torch = _torch_or_none()
        if torch is None or not torch.backends.mps.is_available():
            raise OptionError(f"--device {requested}: no MPS (Apple GPU) device is available on this machine")
        return "mps"
    count = _cuda_device_count()
    if count == 0:
        raise OptionError(
            f"--device {requested}: no CUDA device is available on this machine (torch sees none); use --device cpu"
        )
    number = int(index) if index is not None else local_rank
    if number >= count:
        raise OptionError(f"--device {requested}: cuda:{number} does not exist, this machine has {count} GPU(s)")
    return f"cuda:{number}"


def default_device(requested: str | None) -> str:
    """Kept for callers of the old name: :func:`resolve_device`."""
    return resolve_device(requested)


def _torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


def run_dir_for(method: Method, out: str | Path) -> Path:
    return Path(out) / f"{method.name}-{method.fingerprint_hash()}"


def _check_run_options(track: str, limit: int | None, seeds: int, base_seed: int, shard: tuple[int, int]) -> None:
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if track not in (*TRACKS, "all"):
        raise OptionError(f"--track {track!r}: choose single, multi or all")
    if limit is not None and not (whole(limit) and limit >= 1):
        raise OptionError(f"--limit {limit!r}: must be a positive number of tasks per track (omit it for all)")
    if not (whole(seeds) and seeds >= 1):
        raise OptionError(f"--seeds {seeds!r}: must be at least 1 sample per task")
    if not (whole(base_seed) and base_seed >= 0):
        raise OptionError(f"--seed {base_seed!r}: must be an integer >= 0")
    index, count = shard
    if not (whole(index) and whole(count) and 0 <= index < count):
        raise OptionError(f"--shard {index}/{count}: need 0 <= I < N")


def run_method(
    method: Method,
    *,
    run_dir: str | Path | None = None,
    out: str | Path = "results/runs",
    manifest: Manifest | str | Path | None = None,
    track: str = "all",
    limit: int | None = None,
    seeds: int = 1,
    base_seed: int = 0,
    shard: tuple[int, int] = (0, 1),
    device: str = "cpu",
    coco_root: str | Path | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    progress: bool = True,
    argv: list[str] | None = None,
    wait_for_peers: bool = False,
    repair: bool = False,
) -> RunSummary:
    """Generate every pending (task, sample) of this shard into ``run_dir``; see the module docstring.

    ``wait_for_peers``: before returning with failures recorded, wait until the other writers of the folder (the
    other torchrun ranks) are done, because torchrun stops every rank when one exits with a non-zero code."""
    _check_run_options(track, limit, seeds, base_seed, shard)
    device = resolve_device(device)
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    run_path = Path(run_dir) if run_dir is not None else run_dir_for(method, out)
    tasks = manifest.select(track, limit)
    if not tasks:
        raise OptionError(f"--track {track}: manifest {manifest.path} has no task in this track")
    shard_index, num_shards = shard
    units = [(task, i) for task in tasks for i in range(seeds) if shard_of(task.id, i, num_shards) == shard_index]
    run_path.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        stack.enter_context(
            exclusive_or_busy(
                run_path / f".shard-{shard_index}-of-{num_shards}.lock",
                f"shard {shard_index}/{num_shards} of {run_path}",
                "wait for it to end or stop it (other shards, --shard I/N, may run beside it)",
            )
        )
        writers = stack.enter_context(FolderWriters(run_path))
        _open_run(run_path, method, manifest, base_seed, device, overwrite, argv, alone=writers.alone, repair=repair)
        if writers.alone:
            remove_stale_temp_files([run_path, run_path / IMAGES_DIR])
        writers.share()
        summary = _run_units(
            method, units, run_path, manifest, base_seed, device, retry_failed, coco_root, progress, seeds
        )
        if summary.failed_recorded and wait_for_peers and not writers.alone:
            logger.warning("%s: failures recorded; waiting for the other ranks to finish first", run_path)
            writers.wait_alone()
    return summary


def _run_units(
    method, units, run_path, manifest, base_seed, device, retry_failed, coco_root, progress, seeds
) -> RunSummary:
    log = RecordLog(run_path / RECORDS_FILE)
    recorded = {record_key(r): r for r in log.read()}
    summary = RunSummary(run_dir=run_path, total=len(units))
    pending = []
    for task, i in units:
        rec = recorded.get((task.id, i))
        status = rec.get("status") if rec else None
        if status == "ok":
            damage = _image_damage(run_path, rec)
            if damage is None:
                continue
            logger.warning("%s sample %d: %s; generating it again", task.id, i, damage)
            summary.repaired += 1
        elif status == "skipped" or (status == "failed" and not retry_failed):
            continue
        pending.append((task, i))
    summary.done_before = len(units) - len(pending)
    if pending:
        runnable = []
        for task, i in pending:
            reason = method.can_do(task)
            if reason is None:
                runnable.append((task, i))
            elif log.append(_record(task, i, base_seed, method, manifest, seeds, status="skipped", reason=reason)):
                summary.skipped += 1
            else:
                summary.by_other_writer += 1
        if runnable:
            needed = [t for t, _ in runnable]
            if missing_references(manifest, needed):
                prepare(manifest, coco_root, tasks=needed, verify_all=False)
            try:
                method.setup(device)
            except Exception as err:
                raise MethodSetupError(
                    f"{method.name}: setup on {device} failed: {type(err).__name__}: {err}"
                ) from err
        _generate_all(method, runnable, run_path, log, manifest, base_seed, seeds, device, summary, progress)
    else:
        logger.info("%s: all %d samples already recorded", run_path, len(units))
    latest = {record_key(r): r for r in read_records(run_path / RECORDS_FILE)}
    summary.failed_recorded = sum(1 for t, i in units if (latest.get((t.id, i)) or {}).get("status") == "failed")
    logger.info(
        "%s: %d ok, %d failed, %d skipped, %d regenerated after damage, %d already done, %d failed in all",
        run_path,
        summary.ok,
        summary.failed,
        summary.skipped,
        summary.repaired,
        summary.done_before,
        summary.failed_recorded,
    )
    return summary


def _image_damage(run_path: Path, rec: dict[str, Any]) -> str | None:
    """Why the image of an ok record cannot be trusted (missing, changed since it was recorded), or None."""
    path = run_path / str(rec.get("image"))
    try:
        sha = sha256_file(path)
    except OSError as err:
        return f"image {rec.get('image')} is missing or unreadable ({type(err).__name__})"
    expected = rec.get("image_sha256")
    if expected is not None and sha != expected:
        return f"image {rec.get('image')} changed since it was recorded (sha256 {sha[:12]}, recorded {expected[:12]})"
    return None


def _generate_all(method, units, run_path, log, manifest, base_seed, seeds, device, summary, progress) -> None:
    from tqdm import tqdm

    batch_size = max(1, int(getattr(method, "batch_size", 1)))
    bar = tqdm(total=len(units), desc=f"{method.name}", unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, len(units), batch_size):
            batch = units[start : start + batch_size]
            requests = []
            for task, i in batch:
                try:
                    requests.append(_request(task, i, base_seed, manifest))
                except Exception as err:  # a corrupt or missing reference fails this sample only
                    _fail(log, task, i, base_seed, method, manifest, seeds, f"reference: {err}", summary)
                    bar.update(1)
            for request, image, seconds, peak, error in _generate_batch(method, requests, device):
                task, i = request.task, request.sample_index
                if error is not None:
                    _fail(log, task, i, base_seed, method, manifest, seeds, error, summary)
                else:
                    rel = f"{IMAGES_DIR}/{task.id}_s{i}.png"
                    buf = io.BytesIO()
                    image.save(buf, format="PNG")
                    data = buf.getvalue()
                    atomic_write_bytes(run_path / rel, data)
                    rec = _record(
                        task,
                        i,
                        base_seed,
                        method,
                        manifest,
                        seeds,
                        status="ok",
                        image=rel,
                        image_sha256=hashlib.sha256(data).hexdigest(),
                        seconds=round(seconds, 4),
                        peak_memory_mb=peak,
                        width=image.width,
                        height=image.height,
                    )
                    if log.append(rec):
                        summary.ok += 1
                    else:
                        summary.by_other_writer += 1
                bar.update(1)
    finally:
        bar.close()


def _generate_batch(method: Method, requests: list[GenerationRequest], device: str):
    """Yield (request, image, seconds, peak MB, error) per request; a failing batch is retried one by one so a
    single bad sample only fails itself."""
    if not requests:
        return
    try:
        images, seconds, peak = _timed_generate(method, requests, device)
        for request, image in zip(requests, images, strict=True):
            yield request, image, seconds / len(requests), peak, None
        return
    except Exception as err:
        if len(requests) == 1:
            logger.warning("%s sample %d failed: %s", requests[0].task.id, requests[0].sample_index, err)
            yield requests[0], None, 0.0, None, f"{type(err).__name__}: {err}"
            return
        logger.warning("batch of %d failed (%s); retrying one by one", len(requests), err)
    for request in requests:
        yield from _generate_batch(method, [request], device)


def _timed_generate(method: Method, requests: list[GenerationRequest], device: str):
    cuda = device.startswith("cuda") and "torch" in sys.modules
    if cuda:
        torch = sys.modules["torch"]
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    images = method.generate(requests)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None
    if len(images) != len(requests):
        raise RuntimeError(f"{method.name}.generate returned {len(images)} images for {len(requests)} requests")
    for image in images:
        if not hasattr(image, "save") or getattr(image, "mode", None) not in ("RGB", "RGBA", "L"):
            raise TypeError(f"{method.name}.generate must return PIL images, got {type(image).__name__}")
    return [im.convert("RGB") for im in images], seconds, peak


def _request(task: Task, sample_index: int, base_seed: int, manifest: Manifest) -> GenerationRequest:
    from PIL import Image

    subjects = []
    for subject in task.subjects:
        source = manifest.sources[subject.reference.image_id]
        paths = reference_paths(subject.reference, source)
        try:
            with Image.open(paths.image) as img:
                reference = img.convert("RGB")
            with Image.open(paths.mask) as msk:
                mask = msk.convert("L")
        except Exception as err:  # any decoder error (PIL raises more than OSError for a damaged file)
            raise ValueError(
                f"cannot read the {subject.category} reference (annotation {subject.reference.annotation_id}) "
                f"from {paths.image}: {err}"
            ) from err
        if reference.size != subject.reference.size or mask.size != reference.size:
            raise ValueError(
                f"{paths.image}: size {reference.size} / mask {mask.size}, expected {subject.reference.size}"
            )
        subjects.append(
            SubjectInput(
                category=subject.category,
                category_id=subject.category_id,
                box=subject.box,
                z=subject.z,
                reference=reference,
                mask=mask,
            )
        )
    return GenerationRequest(
        task=task,
        sample_index=sample_index,
        seed=sample_seed(base_seed, task.id, sample_index),
        subjects=tuple(subjects),
    )


def _record(task: Task, i: int, base_seed: int, method: Method, manifest: Manifest, seeds: int, **fields: Any) -> dict:
    """A generation record. ``samples_per_task`` is the --seeds of the command that made it: a table counts a task
    with fewer samples than that as partly generated (a second seed added by one shard of two, say)."""
    return {
        "task_id": task.id,
        "track": task.track,
        "k": task.k,
        "sample_index": i,
        "seed": sample_seed(base_seed, task.id, i),
        "method": method.name,
        "fingerprint": method.fingerprint_hash(),
        "manifest_version": manifest.version,
        "samples_per_task": seeds,
        "image": None,
        "image_sha256": None,
        "reason": None,
        "seconds": None,
        "peak_memory_mb": None,
        **fields,
    }


def _fail(log: RecordLog, task, i, base_seed, method, manifest, seeds, reason: str, summary: RunSummary) -> None:
    if not log.append(_record(task, i, base_seed, method, manifest, seeds, status="failed", reason=reason)):
        summary.by_other_writer += 1
        return
    summary.failed += 1
    summary.failures.append(f"{task.id}#{i}: {reason}")


# --------------------------------------------------------------------------------------------- run.json


def _identity(method: Method, manifest: Manifest, base_seed: int) -> dict[str, Any]:
    return {
        "method": method.name,
        "fingerprint_hash": method.fingerprint_hash(),
        "manifest_sha256": manifest.sha256,
        "base_seed": base_seed,
    }


# Everything of a run's results that --overwrite must not leave behind: the generation records and images, and the
# scores of them (msibench.scoring.store's scores.json[l] and its archives scores-<hash>.json[l]).
_RESULT_GLOBS = (RECORDS_FILE, IMAGES_DIR, "scores.json", "scores.jsonl", "scores-*.json", "scores-*.jsonl")


def _results_present(run_path: Path) -> list[Path]:
    return sorted({p for pattern in _RESULT_GLOBS for p in run_path.glob(pattern)})


def _discard_results(run_path: Path) -> None:
    """Move every result of the old run into one temp folder, then delete it: a kill in between leaves a temp
    folder that the next writer alone in the run removes, never a half-discarded run that looks current."""
    trash = Path(mkdtemp(run_path, prefix=".discarded-"))
    for path in _results_present(run_path):
        os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def _repair_problem(run_path: Path, method: Method, manifest: Manifest, base_seed: int) -> str | None:
    """Why the records of ``run_path`` cannot be kept under this configuration's new ``run.json`` (None: every one
    was made by this method fingerprint, from this manifest's version, with seeds of this base seed)."""
    fingerprint = method.fingerprint_hash()
    records = read_records(run_path / RECORDS_FILE)
    for rec in records:
        key = f"{rec.get('task_id')}#{rec.get('sample_index')}"
        if rec.get("fingerprint") != fingerprint:
            return (
                f"record {key} was made by fingerprint {rec.get('fingerprint')}, this configuration is {fingerprint}"
            )
        if rec.get("manifest_version") != manifest.version or rec.get("task_id") not in manifest.by_id:
            return f"record {key} is not of manifest {manifest.name} (version {manifest.version})"
        try:
            seed_ok = rec.get("seed") == sample_seed(base_seed, str(rec["task_id"]), int(rec["sample_index"]))
        except (KeyError, TypeError, ValueError):
            seed_ok = False
        if not seed_ok:
            return f"record {key} has seed {rec.get('seed')}, not one of --seed {base_seed}"
    return None


def _open_run(
    run_path: Path, method, manifest, base_seed, device, overwrite, argv, alone: bool, repair: bool = False
) -> None:
    """Check ``run.json`` against this configuration (write it for a new run); ``overwrite`` replaces an old run,
    which only a writer alone in the folder may do. ``repair`` rewrites a damaged (unreadable) ``run.json`` for this
    configuration when every record of the folder was made by it, keeping the images and records."""
    identity = _identity(method, manifest, base_seed)
    with locked(run_path / ".run.lock"):
        run_file = run_path / RUN_FILE
        if run_file.exists():
            try:
                existing = json.loads(run_file.read_text())
                old = {k: existing.get(k) for k in identity}
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
                existing, old = None, {"run.json": f"unreadable ({err})"}
            if old == identity:
                if not (run_path / RUN_MANIFEST_COPY).is_file():  # a run made before run folders kept the copy
                    keep_manifest_copy(run_path, manifest)
                return
            diff = (
                ", ".join(f"{k}: {old[k]!r} -> {identity[k]!r}" for k in identity if old[k] != identity[k])
                if existing is not None
                else f"{run_file} is unreadable: {old['run.json']}"
            )
        elif _results_present(run_path):
            diff = f"results without a {RUN_FILE}, of an unknown configuration"
        else:
            diff = None
        if diff is not None and repair and run_file.exists() and existing is None:
            problem = _repair_problem(run_path, method, manifest, base_seed)
            if problem is not None:
                raise RunConflictError(
                    f"{run_path}: --repair cannot rewrite {RUN_FILE} for this configuration: {problem}. Run the "
                    "command that made the folder with --repair, or --overwrite to discard its results."
                )
            logger.warning("%s: --repair: %s rewritten; the images and records are kept", run_path, RUN_FILE)
            diff = None
        if diff is not None:
            if not overwrite:
                repair_hint = (
                    " If this command made the folder, --repair rewrites its damaged run.json and keeps the images "
                    "and records."
                    if run_file.exists() and existing is None
                    else ""
                )
                raise RunConflictError(
                    f"{run_path} holds results of another configuration ({diff}); refusing to mix them. "
                    "Use another --out/--run-dir, or --overwrite to discard the old results." + repair_hint
                )
            if not alone:
                raise LockBusyError(
                    f"{run_path}: --overwrite would discard results that another process is writing or scoring "
                    "right now; wait for it to end or stop it"
                )
            logger.warning("%s: --overwrite: discarding the results of %s", run_path, diff)
            _discard_results(run_path)
        copied = keep_manifest_copy(run_path, manifest)
        if not copied:
            logger.warning("%s: %s changed since it was loaded: no copy kept in the run", run_path, manifest.path)
        info = {
            **identity,
            "fingerprint": method.fingerprint(),
            # where the class came from: a built-in, a plugin file (path + sha256), a module or an entry point
            # (distribution + version); recorded, not part of the identity (the fingerprint is)
            "method_source": registry.origin(type(method)).to_json(),
            "capabilities": method.capabilities.__dict__,
            "manifest": {
                "name": manifest.name,
                "path": manifest.path,
                "version": manifest.version,
                "sha256": manifest.sha256,
                # the byte copy in the run folder (sha256 above): score, table, report, compare and plot fall back
                # on it when the original path is gone
                "copy": RUN_MANIFEST_COPY if copied else None,
            },
            "packages": _package_versions(),
            "git": _git_hash(),
            "device": device,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": argv if argv is not None else sys.argv,
        }
        atomic_write_bytes(run_file, (json.dumps(info, indent=2, sort_keys=True, default=str) + "\n").encode())


def _package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_hash() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    ).stdout.strip()
    return res.stdout.strip() + ("-dirty" if dirty else "")
