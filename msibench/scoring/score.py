"""Score a run folder: drive the :class:`~msibench.scoring.scorer.Scorer` over every generated image of a run and
append one line per image to ``scores.jsonl`` (files and their versioning: :mod:`msibench.scoring.store`).

Scoring is a stage of its own: it reads ``run.json`` and ``records.jsonl`` of a run (never the method), so old
images are re-scored after a scorer change without regenerating them. A score record is appended and flushed per
image, so a killed pass loses at most the batch in flight; the next pass skips every image whose score is current
(same scorer hash, same image sha256).

An image that is missing, or whose sha256 differs from the one its generation record holds (altered after it was
generated), is not scored: it is recorded as a scoring failure that says so, and ``msibench run`` with the same
options generates it again. An image that cannot be decoded is a scoring failure with the decoder's reason. One
scoring pass per run folder at a time (a second one is refused with :class:`~msibench.records.LockBusyError`).

Shards: ``shard=(I, N)`` scores only the units whose hash falls in shard I (the runner's :func:`~msibench.runner.
shard_of`, so the shards of a run folder cover every unit once), under a lock of its own: N processes score one run
folder side by side, appending to the one ``scores.jsonl`` under its append lock. The scores header is opened and the
summary in ``scores.json`` is rewritten under the folder's scores lock, from every current score record of the
folder, so whichever shard finishes last leaves the summary of the whole run: the same records and summary as one
process scoring it alone.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from msibench import exitcodes
from msibench.bench.manifest import Manifest, Task, keep_manifest_copy
from msibench.bench.prepare import missing_references, prepare, reference_paths
from msibench.cache import remove_stale_temp_files
from msibench.images import load_rgb, why_undecodable
from msibench.records import (
    RECORDS_FILE,
    FolderWriters,
    append_record,
    exclusive_or_busy,
    read_records,
    record_key,
)
from msibench.scoring.metrics import collapse_evaluable, z_pair_indices
from msibench.scoring.scorer import CROP_METRICS, ScoreError, ScoreItem, Scorer, base_record
from msibench.scoring.store import (
    SCORES_FILE,
    finish_scores,
    open_scores,
    read_run_info,
    resolve_run_manifest,
    score_is_current,
)

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


@dataclass
class ScoreSummary:
    run_dir: Path
    scorer_hash: str
    total: int = 0
    scored: int = 0
    reused: int = 0
    failed: int = 0
    not_generated: int = 0
    damaged: int = 0  # images missing, or changed since their generation record: not scored
    # current score records that are failures (generation or scoring), and damaged images, after this pass
    failed_recorded: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """:data:`msibench.exitcodes.FAILURES` while the run folder holds failed samples, else OK."""
        return exitcodes.FAILURES if self.failed_recorded else exitcodes.OK


def score_run(
    run_dir: str | Path,
    scorer: Scorer,
    *,
    manifest: Manifest | str | Path | None = None,
    coco_root: str | Path | None = None,
    rescore: bool = False,
    limit: int | None = None,
    progress: bool = True,
    argv: list[str] | None = None,
    shard: tuple[int, int] = (0, 1),
    workers: int = 0,
) -> ScoreSummary:
    """Score every generated image of ``run_dir`` (of shard ``shard``) whose score is not current; ``workers``
    threads decode the images of a batch (0: in this thread). See the module docstring."""
    run_path = Path(run_dir)
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= I < N")
    info = read_run_info(run_path)
    lock, what = (".score.lock", f"scoring of {run_path}")
    if count > 1:
        lock, what = f".score-shard-{index}-of-{count}.lock", f"scoring of shard {index}/{count} of {run_path}"
    with (
        exclusive_or_busy(run_path / lock, what, "wait for that pass to end or stop it"),
        FolderWriters(run_path) as writers,
    ):
        if writers.alone:  # nobody generates or scores here: temp files are leftovers of killed writers
            remove_stale_temp_files([run_path, run_path / "images"])
        writers.share()
        return _score_run(run_path, info, scorer, manifest, coco_root, rescore, limit, progress, argv, shard, workers)


def _score_run(
    run_path, info, scorer, manifest, coco_root, rescore, limit, progress, argv, shard=(0, 1), workers=0
) -> ScoreSummary:
    from tqdm import tqdm

    from msibench.runner import shard_of

    manifest = resolve_run_manifest(run_path, info, manifest)
    keep_manifest_copy(run_path, manifest)  # a run made before run folders kept one: self-contained from now on
    generated = sorted(read_records(run_path / RECORDS_FILE), key=record_key)
    if not generated:
        raise ScoreError(f"{run_path / RECORDS_FILE}: no generation records to score")
    index, count = shard
    if count > 1:
        generated = [g for g in generated if shard_of(g["task_id"], int(g["sample_index"]), count) == index]
    version = scorer.version()
    scorer_hash = scorer.version_hash()
    open_scores(run_path, info, version, scorer_hash, scorer.device, rescore, argv)
    scores_path = run_path / SCORES_FILE
    previous = {record_key(r): r for r in read_records(scores_path) if r.get("scorer") == scorer_hash}
    summary = ScoreSummary(run_dir=run_path, scorer_hash=scorer_hash)

    pending: list[tuple[dict[str, Any], Task, Path, str]] = []
    for gen in generated:
        key = record_key(gen)
        task = manifest.by_id.get(gen["task_id"])
        if task is None:
            raise ScoreError(f"{run_path / RECORDS_FILE}: task {gen['task_id']!r} is not in manifest {manifest.path}")
        summary.total += 1
        old = previous.get(key)
        if old is not None and not score_is_current(old, gen):
            old = None
        if gen.get("status") != "ok":
            if old is not None:
                summary.reused += 1
                continue
            append_record(scores_path, _not_generated(gen, task, scorer_hash, scorer.config.metric_keys(task.track)))
            summary.not_generated += 1
            continue
        image_path = run_path / str(gen.get("image"))
        regenerate = "run `msibench run` again with the same options to generate it again"
        try:
            sha = hashlib.sha256(image_path.read_bytes()).hexdigest()
        except OSError as err:
            summary.damaged += 1
            _fail(
                scores_path,
                gen,
                task,
                scorer_hash,
                None,
                f"image missing or unreadable ({err}); {regenerate}",
                summary,
            )
            continue
        expected = gen.get("image_sha256")
        if expected is not None and sha != expected:
            summary.damaged += 1
            reason = (
                f"image changed since it was generated (sha256 {sha[:12]}, recorded {expected[:12]}); {regenerate}"
            )
            _fail(scores_path, gen, task, scorer_hash, sha, reason, summary)
            continue
        if old is not None and old.get("status") == "ok" and old.get("image_sha256") == sha:
            summary.reused += 1
            continue
        pending.append((gen, task, image_path, sha))
    if limit is not None:
        pending = pending[: max(0, limit)]
    if not pending:
        summary.failed_recorded = finish_scores(run_path, scorer_hash, manifest)["failed"] + summary.damaged
        return summary

    start = time.perf_counter()  # from here on: reference features (cached or computed) count as scoring time
    if any(m in CROP_METRICS for m in scorer.config.metrics):
        tasks = list({task.id: task for _, task, _, _ in pending}.values())
        if missing_references(manifest, tasks):  # missing or damaged: cut out of COCO again
            prepare(manifest, coco_root, tasks=tasks, verify_all=False)
    ref_sha: dict[Path, str] = {}
    uses_references = any(m in CROP_METRICS for m in scorer.config.metrics)

    def references(task: Task) -> list[tuple[str, Path]]:
        if not uses_references:
            return []
        out = []
        for subject in task.subjects:
            path = reference_paths(subject.reference, manifest.sources[subject.reference.image_id]).image
            if path not in ref_sha:
                ref_sha[path] = hashlib.sha256(path.read_bytes()).hexdigest()
            out.append((ref_sha[path], path))
        return out

    if uses_references:
        announce = (lambda message: tqdm.write(message, file=sys.stderr)) if progress else None
        scorer.warm_references({sha: p for _, task, _, _ in pending for sha, p in references(task)}, announce)

    bar = tqdm(total=len(pending), desc=f"score {run_path.name}", unit="img", disable=not progress, leave=False)
    pool = None
    if workers > 0:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="msibench-decode")

    def decode(path: Path):
        try:
            return load_rgb(path), None
        except Exception as err:  # PIL raises many kinds for a damaged file (msibench.images)
            return None, err

    try:
        size = max(1, scorer.config.batch_size)
        for b in range(0, len(pending), size):
            chunk = pending[b : b + size]
            paths = [image_path for _, _, image_path, _ in chunk]
            decoded = list(pool.map(decode, paths)) if pool is not None else [decode(p) for p in paths]
            items = []
            for (gen, task, _, sha), (image, err) in zip(chunk, decoded, strict=True):
                if err is not None:
                    _fail(
                        scores_path,
                        gen,
                        task,
                        scorer_hash,
                        sha,
                        f"image cannot be decoded: {why_undecodable(err)}",
                        summary,
                    )
                    continue
                try:
                    items.append(ScoreItem(task, gen, image, sha, references(task)))
                except OSError as err:
                    _fail(scores_path, gen, task, scorer_hash, sha, f"reference unreadable: {err}", summary)
            for rec in _score_isolating_failures(scorer, items, scorer_hash, summary):
                append_record(scores_path, rec)
                if rec["status"] == "ok":
                    summary.scored += 1
            bar.update(len(chunk))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    summary.seconds = time.perf_counter() - start
    summary.failed_recorded = finish_scores(run_path, scorer_hash, manifest)["failed"] + summary.damaged
    logger.info(
        "%s: %d scored, %d current, %d failed, %d not generated (scorer %s)",
        run_path,
        summary.scored,
        summary.reused,
        summary.failed,
        summary.not_generated,
        scorer_hash,
    )
    return summary


def _score_isolating_failures(scorer: Scorer, items: list[ScoreItem], scorer_hash: str, summary: ScoreSummary):
    """Score a batch; when it fails, score its items one by one so one bad image fails only itself."""
    if not items:
        return
    try:
        yield from scorer.score_batch(items, scorer_hash)
        return
    except ScoreError:
        raise
    except Exception as err:
        if len(items) == 1:
            item = items[0]
            logger.warning("%s sample %s: scoring failed: %s", item.task.id, item.record.get("sample_index"), err)
            summary.failed += 1
            summary.failures.append(f"{item.task.id}#{item.record.get('sample_index')}: {err}")
            rec = base_record(item, scorer_hash)
            rec.update(status="failed", reason=f"scoring: {type(err).__name__}: {err}", metrics={}, stage="scoring")
            yield rec
            return
        logger.warning("scoring a batch of %d failed (%s); retrying one by one", len(items), err)
    for item in items:
        yield from _score_isolating_failures(scorer, [item], scorer_hash, summary)


def _not_generated(
    gen: dict[str, Any], task: Task, scorer_hash: str, metric_keys: list[str] | None = None
) -> dict[str, Any]:
    return {
        "task_id": task.id,
        "sample_index": int(gen["sample_index"]),
        "track": task.track,
        "k": task.k,
        "seed": gen.get("seed"),
        "method": gen.get("method"),
        "fingerprint": gen.get("fingerprint"),
        "image": None,
        "image_sha256": None,
        "status": gen.get("status"),
        "scorer": scorer_hash,
        "metrics": {},
        "reason": f"generation {gen.get('status')}: {gen.get('reason')}",
        # aggregate counts a failed generation as 0 on these metrics (its task's Z-Acc pairs as wrong, its
        # subjects as collapsed), not a gap; they come from the task alone, the same as for a scored image
        "stage": "generation",
        "metrics_expected": metric_keys,
        "overlap_pairs": len(z_pair_indices([s.box for s in task.subjects])) if task.track == "multi" else None,
        "collapse_subjects": (
            sum(collapse_evaluable([s.category_id for s in task.subjects])) if task.track == "multi" else None
        ),
        "collapse_same_subjects": (
            sum(collapse_evaluable([s.category_id for s in task.subjects], "same")) if task.track == "multi" else None
        ),
    }


def _fail(scores_path, gen, task, scorer_hash, sha, reason: str, summary: ScoreSummary) -> None:
    rec = _not_generated(gen, task, scorer_hash)
    rec.update(status="failed", image=gen.get("image"), image_sha256=sha, reason=reason, stage="scoring")
    append_record(scores_path, rec)
    summary.failed += 1
    summary.failures.append(f"{task.id}#{gen['sample_index']}: {reason}")
