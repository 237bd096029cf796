"""The resumable, shardable, crash-safe generation runner.

Work units are (task, sample index) pairs. For each unit the image is written to a temp file and
``os.replace``d into ``images/``; then one record is appended to ``records.jsonl`` and flushed: the record is
the commit marker, so a run killed at any moment loses at most the image in flight, and re-running the
same command skips every recorded unit. Seeds come from (base seed, task id, sample index) only, so the
output never depends on order, sharding or resumption.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from msibench.bench.manifest import Manifest, Task, load_manifest
from msibench.bench.prepare import missing_references, prepare, reference_paths
from msibench.cache import atomic_write_bytes
from msibench.methods.base import GenerationRequest, Method, SubjectInput
from msibench.records import RECORDS_FILE, append_record, locked, read_records, record_key

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


@dataclass
class RunSummary:
    run_dir: Path
    total: int = 0
    done_before: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """The number of failed samples (capped at 125, beyond which shells give codes other meanings)."""
        return min(self.failed, 125)


def sample_seed(base_seed: int, task_id: str, sample_index: int) -> int:
    digest = hashlib.sha256(f"{base_seed}:{task_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def shard_of(task_id: str, sample_index: int, num_shards: int) -> int:
    digest = hashlib.sha256(f"{task_id}#{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N); without a spec, torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if spec:
        try:
            index, count = (int(p) for p in spec.split("/"))
        except ValueError as err:
            raise ValueError(f"--shard must look like I/N (e.g. 0/2), got {spec!r}") from err
        if not 0 <= index < count:
            raise ValueError(f"--shard {spec}: need 0 <= I < N")
        return index, count
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def default_device(requested: str | None) -> str:
    """The device for this process: under torchrun each rank takes its own GPU (LOCAL_RANK)."""
    if requested and requested != "cuda":
        return requested
    if requested == "cuda" or requested is None and _cuda_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def _cuda_available() -> bool:
    if "torch" not in sys.modules:
        try:
            import torch  # noqa: F401
        except ImportError:
            return False
    return sys.modules["torch"].cuda.is_available()


def run_dir_for(method: Method, out: str | Path) -> Path:
    return Path(out) / f"{method.name}-{method.fingerprint_hash()}"


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
) -> RunSummary:
    """Generate every pending (task, sample) of this shard into ``run_dir``; see the module docstring."""
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    if seeds < 1:
        raise ValueError("seeds must be >= 1")
    run_path = Path(run_dir) if run_dir is not None else run_dir_for(method, out)
    tasks = manifest.select(track, limit)
    shard_index, num_shards = shard
    units = [(task, i) for task in tasks for i in range(seeds) if shard_of(task.id, i, num_shards) == shard_index]
    _open_run(run_path, method, manifest, base_seed, device, overwrite, argv)
    records_path = run_path / RECORDS_FILE
    summary = RunSummary(run_dir=run_path, total=len(units))

    done = {
        record_key(r)
        for r in read_records(records_path)
        if r.get("status") in ("ok", "skipped") or (r.get("status") == "failed" and not retry_failed)
    }
    pending = [(t, i) for t, i in units if (t.id, i) not in done]
    summary.done_before = len(units) - len(pending)
    if not pending:
        logger.info("%s: all %d samples already recorded", run_path, len(units))
        return summary

    runnable = []
    for task, i in pending:
        reason = method.can_do(task)
        if reason is None:
            runnable.append((task, i))
            continue
        append_record(records_path, _record(task, i, base_seed, method, manifest, status="skipped", reason=reason))
        summary.skipped += 1

    if runnable:
        with locked(run_path / ".prepare.lock"):
            needed = [t for t, _ in runnable]
            if missing_references(manifest, needed):
                prepare(manifest, coco_root, tasks=needed, verify_all=False)
        try:
            method.setup(device)
        except Exception as err:
            raise MethodSetupError(f"{method.name}: setup on {device} failed: {type(err).__name__}: {err}") from err
    _generate_all(method, runnable, run_path, manifest, base_seed, device, summary, progress)
    logger.info(
        "%s: %d ok, %d failed, %d skipped, %d already done",
        run_path,
        summary.ok,
        summary.failed,
        summary.skipped,
        summary.done_before,
    )
    return summary


def _generate_all(method, units, run_path, manifest, base_seed, device, summary, progress) -> None:
    from tqdm import tqdm

    records_path = run_path / RECORDS_FILE
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
                    _fail(records_path, task, i, base_seed, method, manifest, f"reference: {err}", summary)
                    bar.update(1)
            for request, image, seconds, peak, error in _generate_batch(method, requests, device):
                task, i = request.task, request.sample_index
                if error is not None:
                    _fail(records_path, task, i, base_seed, method, manifest, error, summary)
                else:
                    rel = f"{IMAGES_DIR}/{task.id}_s{i}.png"
                    buf = io.BytesIO()
                    image.save(buf, format="PNG")
                    atomic_write_bytes(run_path / rel, buf.getvalue())
                    rec = _record(
                        task,
                        i,
                        base_seed,
                        method,
                        manifest,
                        status="ok",
                        image=rel,
                        seconds=round(seconds, 4),
                        peak_memory_mb=peak,
                        width=image.width,
                        height=image.height,
                    )
                    append_record(records_path, rec)
                    summary.ok += 1
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
        except (OSError, ValueError) as err:
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


def _record(task: Task, i: int, base_seed: int, method: Method, manifest: Manifest, **fields: Any) -> dict:
    return {
        "task_id": task.id,
        "track": task.track,
        "k": task.k,
        "sample_index": i,
        "seed": sample_seed(base_seed, task.id, i),
        "method": method.name,
        "fingerprint": method.fingerprint_hash(),
        "manifest_version": manifest.version,
        "image": None,
        "reason": None,
        "seconds": None,
        "peak_memory_mb": None,
        **fields,
    }


def _fail(records_path, task, i, base_seed, method, manifest, reason: str, summary: RunSummary) -> None:
    append_record(records_path, _record(task, i, base_seed, method, manifest, status="failed", reason=reason))
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


def _open_run(run_path: Path, method, manifest, base_seed, device, overwrite, argv) -> None:
    run_path.mkdir(parents=True, exist_ok=True)
    identity = _identity(method, manifest, base_seed)
    with locked(run_path / ".run.lock"):
        run_file = run_path / RUN_FILE
        if run_file.exists():
            try:
                existing = json.loads(run_file.read_text())
            except json.JSONDecodeError as err:
                raise RunConflictError(f"{run_file}: unreadable ({err}); use --overwrite to start afresh") from err
            old = {k: existing.get(k) for k in identity}
            if old == identity:
                return
            if not overwrite:
                diff = ", ".join(f"{k}: {old[k]!r} -> {identity[k]!r}" for k in identity if old[k] != identity[k])
                raise RunConflictError(
                    f"{run_path} holds results of another configuration ({diff}); refusing to mix them. "
                    "Use another --out/--run-dir, or --overwrite to discard the old results."
                )
            logger.warning("%s: --overwrite: discarding results of %s", run_path, old)
            (run_path / RECORDS_FILE).unlink(missing_ok=True)
            shutil.rmtree(run_path / IMAGES_DIR, ignore_errors=True)
        info = {
            **identity,
            "fingerprint": method.fingerprint(),
            "capabilities": method.capabilities.__dict__,
            "manifest": {
                "name": manifest.name,
                "path": manifest.path,
                "version": manifest.version,
                "sha256": manifest.sha256,
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
