"""Score a run folder: one line per generated image in ``scores.jsonl``, the scorer's version in ``scores.json``.

Scoring is a stage of its own: it reads ``run.json`` and ``records.jsonl`` of a run (never the method), so old
images are re-scored after a scorer change without regenerating them.

- The scorer version is everything that changes a score: the detector weights (file name + sha256), confidence,
  NMS IoU, image size, max detections, letterbox version, the identity backbones with their preprocessing, the
  crop mode, the CLIP-B mode and the metric code version. Its short hash tags every score record.
- ``scores.json`` holds that version (with packages, date, command) and, once a pass ends, the aggregate summary.
  Scoring a run whose ``scores.json`` has another version is refused unless ``rescore=True``, which archives the
  old files as ``scores-<old hash>.json[l]`` (nothing is lost) and starts afresh.
- A score record is appended and flushed per image, so a killed pass loses at most the batch in flight; the
  next pass skips every image whose score is current (same scorer hash, same image sha256).

Speed: one batched pass of the segmentation detector serves detection, matching and masks (YOLO11x-seg carries a
full COCO-80 detection head, and the detector costs far more than everything else), crops of a whole batch go
through each identity backbone in one call, reference features come from the on-disk cache, and the background
texts are encoded once per run. ``--detector yolo11x.pt --segmenter yolo11x-seg.pt`` gives the two-network
variant (boxes from the box model, masks from the segmenter, which then runs only on images with overlaps).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import platform
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from msibench.bench.manifest import Manifest, ManifestError, Task, default_manifest_path, load_manifest
from msibench.bench.prepare import missing_references, prepare, reference_paths
from msibench.cache import atomic_write_bytes
from msibench.records import RECORDS_FILE, append_record, locked, read_records, record_key
from msibench.scoring.identity import CLIP_B_MODES, CROP_MODES, MASK_GREY, FeatureCache, cosine, crop, grey_out
from msibench.scoring.match import Match, match_targets
from msibench.scoring.metrics import overlap_rect, yolo_l, yolo_subj, z_order_pairs

if TYPE_CHECKING:
    from PIL import Image

    from msibench.scoring.backbones import ClipBackbone, ImageEncoder
    from msibench.scoring.detect import Detections, Detector

logger = logging.getLogger(__name__)

# Bump when a metric's definition or the record layout changes.
SCORER_CODE_VERSION = "1"
SCORES_FILE = "scores.jsonl"
SCORES_HEADER = "scores.json"
SCORES_FORMAT = "msibench-scores"
RUN_FILE = "run.json"

METRIC_GROUPS = ("yolo_subj", "yolo_l", "z_acc", "dino_i", "clip_i", "clip_b")
DETECTOR_METRICS = ("yolo_subj", "yolo_l", "z_acc")
IDENTITY_METRICS = ("dino_i", "clip_i")
# The single-subject track reports identity and background only (as in the paper's Table I).
TRACK_METRICS = {"single": ("dino_i", "clip_i", "clip_b"), "multi": METRIC_GROUPS}


class ScoreError(RuntimeError):
    """A run cannot be scored; the message names the file and what to do."""


class ScoreConflictError(ScoreError):
    """The run folder holds scores of another scorer version."""


@dataclass(frozen=True)
class ScorerConfig:
    """Everything the user chooses about scoring (backbone identities are added when they are loaded)."""

    # spec for backbones.load_yolo; None: $MSIBENCH_YOLO_WEIGHTS when it names a file, else yolo11x-seg.pt
    detector: str | None = None
    segmenter: str | None = None  # masks for Z-Acc from another network; None: the detector's own masks
    conf: float = 0.25
    iou: float = 0.7
    imgsz: int = 640
    max_det: int = 300
    dino: str | None = None  # spec for backbones.load_dino; None: $MSIBENCH_DINO_WEIGHTS or facebook/dino-vits16
    clip: str | None = None  # spec for backbones.load_clip; None: $MSIBENCH_CLIP_WEIGHTS or openai
    identity_crop: str = "matched"
    clip_b_mode: str = "full"
    metrics: tuple[str, ...] = METRIC_GROUPS
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.identity_crop not in CROP_MODES:
            raise ValueError(f"identity_crop must be one of {CROP_MODES}, got {self.identity_crop!r}")
        if self.clip_b_mode not in CLIP_B_MODES:
            raise ValueError(f"clip_b_mode must be one of {CLIP_B_MODES}, got {self.clip_b_mode!r}")
        unknown = [m for m in self.metrics if m not in METRIC_GROUPS]
        if unknown or not self.metrics:
            raise ValueError(f"metrics must be a non-empty subset of {METRIC_GROUPS}, got {list(self.metrics)}")
        object.__setattr__(self, "metrics", tuple(m for m in METRIC_GROUPS if m in self.metrics))

    @property
    def needs_detector(self) -> bool:
        return any(m in self.metrics for m in DETECTOR_METRICS) or (
            self.identity_crop == "matched" and any(m in self.metrics for m in IDENTITY_METRICS)
        )


@dataclass
class ScoreSummary:
    run_dir: Path
    scorer_hash: str
    total: int = 0
    scored: int = 0
    reused: int = 0
    failed: int = 0
    not_generated: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


@dataclass
class ScoreItem:
    """One generated image to score, with its task and the checksums of its subjects' references."""

    task: Task
    record: dict[str, Any]
    image: Image.Image
    image_sha256: str
    references: list[tuple[str, Path]]  # (sha256, path) per subject, in subject order


class Scorer:
    """Stateless per image: turns a batch of :class:`ScoreItem` into score records.

    Backbones come from ``config`` specs through :mod:`msibench.scoring.backbones`, unless injected: a
    ``detector``/``segmenter`` (see :class:`~msibench.scoring.detect.Detector`), a ``dino``
    :class:`~msibench.scoring.backbones.ImageEncoder` and a ``clip``
    :class:`~msibench.scoring.backbones.ClipBackbone`.
    """

    def __init__(
        self,
        config: ScorerConfig | None = None,
        *,
        detector: Detector | None = None,
        segmenter: Detector | None = None,
        dino: ImageEncoder | None = None,
        clip: ClipBackbone | None = None,
        device: str = "cpu",
        seed: int = 0,
        feature_cache: FeatureCache | None | bool = True,
    ) -> None:
        self.config = config or ScorerConfig()
        self.device = device
        self.seed = seed
        self.detector = detector
        self.segmenter = segmenter
        self.dino = dino
        self.clip = clip
        if feature_cache is True:
            feature_cache = FeatureCache()
        self.feature_cache: FeatureCache | None = feature_cache or None
        self._ready = False
        self._ref_feats: dict[str, dict[str, np.ndarray]] = {}
        self._text_feats: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Load every backbone the configured metrics need and that was not injected."""
        if self._ready:
            return
        from msibench.scoring import backbones
        from msibench.scoring.detect import YoloDetector

        cfg = self.config

        def yolo(spec: str) -> YoloDetector:
            model = backbones.load_yolo(spec, device=self.device, seed=self.seed)
            return YoloDetector(
                model, conf=cfg.conf, iou=cfg.iou, imgsz=cfg.imgsz, max_det=cfg.max_det, batch_size=cfg.batch_size
            )

        if cfg.needs_detector and self.detector is None:
            self.detector = yolo(cfg.detector)
        if "z_acc" in cfg.metrics and self.segmenter is None and cfg.segmenter:
            self.segmenter = yolo(cfg.segmenter)
        if "z_acc" in cfg.metrics and not self._mask_source_has_masks():
            raise ScoreError(
                f"Z-Acc needs instance masks but detector {self.detector.identity} has none: use a -seg detector "
                "(--detector yolo11x-seg.pt), add --segmenter yolo11x-seg.pt, or leave z_acc out of --metrics"
            )
        if "dino_i" in cfg.metrics and self.dino is None:
            self.dino = backbones.load_dino(cfg.dino, device=self.device, seed=self.seed)
        if ("clip_i" in cfg.metrics or "clip_b" in cfg.metrics) and self.clip is None:
            self.clip = backbones.load_clip(cfg.clip, device=self.device, seed=self.seed)
        self._ready = True

    def _mask_source(self) -> Detector | None:
        return self.segmenter if self.segmenter is not None else self.detector

    def _mask_source_has_masks(self) -> bool:
        source = self._mask_source()
        return source is not None and bool(source.has_masks)

    def version(self) -> dict[str, Any]:
        """Everything that changes a score (see the module docstring)."""
        self.setup()
        cfg = self.config
        metrics = list(cfg.metrics)
        out: dict[str, Any] = {
            "code": SCORER_CODE_VERSION,
            "metrics": metrics,
            "detector": self.detector.config() if self.detector is not None else None,
            "segmenter": (
                (self.segmenter.config() if self.segmenter is not None else "detector") if "z_acc" in metrics else None
            ),
            "matching": "per category, Hungarian (scipy linear_sum_assignment) on IoU; IoU 0 = unmatched",
            "dino": self.dino.identity if self.dino is not None else None,
            "clip": self.clip.identity if self.clip is not None else None,
            "identity_crop": cfg.identity_crop if any(m in metrics for m in IDENTITY_METRICS) else None,
            "clip_b_mode": cfg.clip_b_mode if "clip_b" in metrics else None,
        }
        if out["clip_b_mode"] == "masked":
            out["clip_b_mask_grey"] = list(MASK_GREY)
        return out

    def version_hash(self) -> str:
        blob = json.dumps(self.version(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    # ------------------------------------------------------------------------------------- references

    def warm_references(self, references: dict[str, Path]) -> None:
        """Make reference features of ``references`` (sha256 -> path) available, from the cache or in batches."""
        from msibench.scoring.identity import reference_features

        for encoder in self._identity_encoders():
            have = self._ref_feats.setdefault(encoder.identity, {})
            missing = {sha: path for sha, path in references.items() if sha not in have}
            if missing:
                have.update(reference_features(encoder, _LazyImages(missing), self.feature_cache))

    def _identity_encoders(self) -> list[ImageEncoder]:
        out = []
        if "dino_i" in self.config.metrics and self.dino is not None:
            out.append(self.dino)
        if "clip_i" in self.config.metrics and self.clip is not None:
            out.append(self.clip.image)
        return out

    def _texts(self, texts: list[str]) -> dict[str, np.ndarray]:
        missing = sorted({t for t in texts if t not in self._text_feats})
        if missing:
            for text, feat in zip(missing, self.clip.text.encode(missing), strict=True):
                self._text_feats[text] = feat
        return self._text_feats

    # ---------------------------------------------------------------------------------------- scoring

    def score_batch(self, items: list[ScoreItem], scorer_hash: str | None = None) -> list[dict[str, Any]]:
        """Score records for ``items`` (same order)."""
        self.setup()
        cfg = self.config
        scorer_hash = scorer_hash or self.version_hash()
        start = time.perf_counter()
        metrics = cfg.metrics
        track_metrics = [[m for m in TRACK_METRICS[it.task.track] if m in metrics] for it in items]
        needs_boxes = [
            any(m in DETECTOR_METRICS for m in tm)
            or (cfg.identity_crop == "matched" and any(m in IDENTITY_METRICS for m in tm))
            for tm in track_metrics
        ]
        dets: list[Detections | None] = [None] * len(items)
        box_idx = [i for i, need in enumerate(needs_boxes) if need]
        if box_idx:
            for i, det in zip(box_idx, self.detector([items[i].image for i in box_idx]), strict=True):
                dets[i] = det
        matches: list[list[Match] | None] = [
            match_targets([s.box for s in it.task.subjects], [s.category_id for s in it.task.subjects], det)
            if det is not None
            else None
            for it, det in zip(items, dets, strict=True)
        ]
        mask_dets, mask_matches = self._mask_detections(items, track_metrics, dets, matches)

        crops_per_item = [self._crops(it, m, d) for it, m, d in zip(items, matches, dets, strict=True)]
        flat_crops = [c for crops in crops_per_item for c, _ in crops]
        dino_feats = self.dino.encode(flat_crops) if "dino_i" in metrics and flat_crops else None
        clip_b_images = []
        if "clip_b" in metrics:
            for it in items:
                image = it.image.convert("RGB")
                if cfg.clip_b_mode == "masked":
                    image = grey_out(image, [s.box for s in it.task.subjects])
                clip_b_images.append(image)
        clip_inputs = (flat_crops if "clip_i" in metrics else []) + clip_b_images
        clip_feats = self.clip.image.encode(clip_inputs) if clip_inputs else None
        texts = self._texts([it.task.background for it in items]) if "clip_b" in metrics else {}
        if any(m in IDENTITY_METRICS for m in metrics):
            self.warm_references({sha: path for it in items for sha, path in it.references})

        records = []
        offset = 0
        n_crops = len(flat_crops)
        for i, it in enumerate(items):
            crops = crops_per_item[i]
            rec = _base_record(it, scorer_hash)
            values: dict[str, Any] = {}
            subjects = []
            reasons = []
            for j, subject in enumerate(it.task.subjects):
                entry: dict[str, Any] = {
                    "category": subject.category,
                    "category_id": subject.category_id,
                    "z": subject.z,
                    "box": [round(v, 6) for v in subject.box],
                }
                if matches[i] is not None:
                    m = matches[i][j]
                    entry["matched"] = m.matched
                    entry["iou"] = round(m.iou, 6)
                    entry["detection"] = (
                        {
                            "box": [round(float(v), 6) for v in dets[i].boxes[m.detection]],
                            "score": round(float(dets[i].scores[m.detection]), 6),
                        }
                        if m.matched
                        else None
                    )
                if crops:
                    entry["crop"] = crops[j][1]
                    entry["reference"] = it.references[j][0][:16]
                subjects.append(entry)
            tm = track_metrics[i]
            if "yolo_subj" in tm:
                expected = Counter(s.category_id for s in it.task.subjects)
                res = yolo_subj(expected, dets[i].counts())
                values["yolo_subj"] = res.value
                values["yolo_subj_exact"] = 1.0 if res.exact else 0.0
                rec["counts"] = {name: [res.expected[name], res.detected[name]] for name in res.expected}
                reasons.append(res.reason)
            if "yolo_l" in tm:
                lay = yolo_l(matches[i], [s.category_id for s in it.task.subjects])
                values["yolo_l"] = lay.value
                values["yolo_l50"] = lay.at50
                rec["layout_reason"] = lay.reason
            if "z_acc" in tm:
                pairs = self._z_pairs(it, mask_dets[i], mask_matches[i])
                correct = sum(p.correct for p in pairs)
                values["z_correct"] = correct
                values["z_pairs"] = len(pairs)
                values["z_acc"] = correct / len(pairs) if pairs else None
                rec["pairs"] = [asdict(p) for p in pairs]
                if not pairs:
                    reasons.append("no overlapping subjects: Z-Acc not evaluated")
                else:
                    reasons.append(f"z-order {correct}/{len(pairs)} pairs correct")
            # Crops of the whole batch are laid out item after item, in both feature arrays.
            for metric, feats in (("dino_i", dino_feats), ("clip_i", clip_feats)):
                if metric not in tm or feats is None:
                    continue
                ref_feats = self._ref_feats[(self.dino if metric == "dino_i" else self.clip.image).identity]
                per_subject = []
                for j in range(len(crops)):
                    value = cosine(feats[offset + j], ref_feats[it.references[j][0]])
                    subjects[j][metric] = value
                    per_subject.append(value)
                values[metric] = float(np.mean(per_subject))
            if "clip_b" in tm:
                image_feat = clip_feats[(n_crops if "clip_i" in metrics else 0) + i]
                values["clip_b"] = cosine(image_feat, texts[it.task.background])
            if crops and it.task.track == "single" and matches[i] is not None:
                s, m = subjects[0], matches[i][0]
                found = f"matched (IoU {m.iou:.2f})" if m.matched else "not detected"
                reasons.append(f"{s['category']} {found}; crop from {s['crop']}")
            offset += len(crops)
            rec["metrics"] = values
            rec["subjects"] = subjects
            rec["reason"] = "; ".join(reasons) if reasons else None
            records.append(rec)
        seconds = (time.perf_counter() - start) / max(1, len(items))
        for rec in records:
            rec["seconds"] = round(seconds, 4)
        return records

    def _mask_detections(self, items, track_metrics, dets, matches):
        """Detections (and matches) whose masks judge Z-Acc: the detector's own, or the segmenter's, which then
        runs only on images with at least one overlapping pair."""
        n = len(items)
        if "z_acc" not in self.config.metrics:
            return [None] * n, [None] * n
        if self.segmenter is None:
            return dets, matches
        mask_dets: list[Detections | None] = [None] * n
        mask_matches: list[list[Match] | None] = [None] * n
        need = [
            i for i, it in enumerate(items) if "z_acc" in track_metrics[i] and _has_overlap(it.task, it.image.size)
        ]
        if need:
            for i, det in zip(need, self.segmenter([items[i].image for i in need]), strict=True):
                mask_dets[i] = det
                subs = items[i].task.subjects
                mask_matches[i] = match_targets([s.box for s in subs], [s.category_id for s in subs], det)
        return mask_dets, mask_matches

    def _z_pairs(self, item: ScoreItem, det: Detections | None, matches: list[Match] | None):
        subs = item.task.subjects
        masks: list[np.ndarray | None] = []
        for j in range(len(subs)):
            m = matches[j] if matches is not None else None
            masks.append(det.mask(m.detection) if det is not None and m is not None and m.matched else None)
        return z_order_pairs(
            [s.box for s in subs], [s.z for s in subs], [s.category_id for s in subs], masks, item.image.size
        )

    def _crops(
        self, item: ScoreItem, matches: list[Match] | None, det: Detections | None
    ) -> list[tuple[Image.Image, str]]:
        """(crop, where it came from) per subject, or [] when no identity metric applies."""
        if not any(m in self.config.metrics for m in IDENTITY_METRICS):
            return []
        mode = self.config.identity_crop
        out = []
        for j, subject in enumerate(item.task.subjects):
            if mode == "full":
                out.append((crop(item.image, None), "full"))
            elif mode == "matched" and matches is not None and det is not None and matches[j].matched:
                out.append((crop(item.image, det.boxes[matches[j].detection]), "matched"))
            else:
                out.append((crop(item.image, subject.box), "target"))
        return out


class _LazyImages(dict):
    """sha256 -> reference image, opened only when a feature must be computed."""

    def __init__(self, paths: dict[str, Path]) -> None:
        super().__init__(paths)

    def items(self):
        from PIL import Image

        for sha, path in super().items():
            with Image.open(path) as im:
                im.load()
                yield sha, im.convert("RGB")


def _has_overlap(task: Task, size: tuple[int, int]) -> bool:
    subs = task.subjects
    return any(
        overlap_rect(subs[i].box, subs[j].box, size) is not None
        for i in range(len(subs))
        for j in range(i + 1, len(subs))
    )


def _base_record(item: ScoreItem, scorer_hash: str) -> dict[str, Any]:
    gen = item.record
    return {
        "task_id": item.task.id,
        "sample_index": int(gen["sample_index"]),
        "track": item.task.track,
        "k": item.task.k,
        "seed": gen.get("seed"),
        "method": gen.get("method"),
        "fingerprint": gen.get("fingerprint"),
        "image": gen.get("image"),
        "image_sha256": item.image_sha256,
        "status": "ok",
        "scorer": scorer_hash,
    }


# ------------------------------------------------------------------------------------------------ run level


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
) -> ScoreSummary:
    """Score every generated image of ``run_dir`` whose score is not current; see the module docstring."""
    from tqdm import tqdm

    run_path = Path(run_dir)
    info = read_run_info(run_path)
    manifest = resolve_run_manifest(run_path, info, manifest)
    generated = sorted(read_records(run_path / RECORDS_FILE), key=record_key)
    if not generated:
        raise ScoreError(f"{run_path / RECORDS_FILE}: no generation records to score")
    version = scorer.version()
    scorer_hash = scorer.version_hash()
    _open_scores(run_path, info, version, scorer_hash, scorer.device, rescore, argv)
    scores_path = run_path / SCORES_FILE
    current = {record_key(r): r for r in read_records(scores_path) if r.get("scorer") == scorer_hash}
    summary = ScoreSummary(run_dir=run_path, scorer_hash=scorer_hash)

    pending: list[tuple[dict[str, Any], Task, Path, str]] = []
    for gen in generated:
        key = record_key(gen)
        task = manifest.by_id.get(gen["task_id"])
        if task is None:
            raise ScoreError(f"{run_path / RECORDS_FILE}: task {gen['task_id']!r} is not in manifest {manifest.path}")
        summary.total += 1
        old = current.get(key)
        if gen.get("status") != "ok":
            if old is not None and old.get("status") == gen.get("status"):
                summary.reused += 1
                continue
            append_record(scores_path, _not_generated(gen, task, scorer_hash))
            summary.not_generated += 1
            continue
        image_path = run_path / str(gen.get("image"))
        try:
            sha = hashlib.sha256(image_path.read_bytes()).hexdigest()
        except OSError as err:
            _fail(scores_path, gen, task, scorer_hash, None, f"image unreadable: {err}", summary)
            continue
        if old is not None and old.get("status") == "ok" and old.get("image_sha256") == sha:
            summary.reused += 1
            continue
        pending.append((gen, task, image_path, sha))
    if limit is not None:
        pending = pending[: max(0, limit)]
    if not pending:
        _finish(run_path, scorer_hash)
        return summary

    start = time.perf_counter()  # from here on: reference features (cached or computed) count as scoring time
    if any(m in IDENTITY_METRICS for m in scorer.config.metrics):
        tasks = list({task.id: task for _, task, _, _ in pending}.values())
        with locked(run_path / ".prepare.lock"):
            if missing_references(manifest, tasks):
                prepare(manifest, coco_root, tasks=tasks, verify_all=False)
    ref_sha: dict[Path, str] = {}
    uses_references = any(m in IDENTITY_METRICS for m in scorer.config.metrics)

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
        scorer.warm_references({sha: p for _, task, _, _ in pending for sha, p in references(task)})

    bar = tqdm(total=len(pending), desc=f"score {run_path.name}", unit="img", disable=not progress, leave=False)
    try:
        size = max(1, scorer.config.batch_size)
        for b in range(0, len(pending), size):
            chunk = pending[b : b + size]
            items = []
            for gen, task, image_path, sha in chunk:
                try:
                    items.append(ScoreItem(task, gen, _load_image(image_path), sha, references(task)))
                except (OSError, ValueError) as err:
                    _fail(scores_path, gen, task, scorer_hash, sha, f"image or reference unreadable: {err}", summary)
            for rec in _score_isolating_failures(scorer, items, scorer_hash, summary):
                append_record(scores_path, rec)
                if rec["status"] == "ok":
                    summary.scored += 1
            bar.update(len(chunk))
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start
    _finish(run_path, scorer_hash)
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
            rec = _base_record(item, scorer_hash)
            rec.update(status="failed", reason=f"scoring: {type(err).__name__}: {err}", metrics={}, stage="scoring")
            yield rec
            return
        logger.warning("scoring a batch of %d failed (%s); retrying one by one", len(items), err)
    for item in items:
        yield from _score_isolating_failures(scorer, [item], scorer_hash, summary)


def _load_image(path: Path) -> Image.Image:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def _not_generated(gen: dict[str, Any], task: Task, scorer_hash: str) -> dict[str, Any]:
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
        # aggregate counts a failed generation as 0 (and its task's overlapping pairs as wrong), not a gap
        "stage": "generation",
        "overlap_pairs": _overlap_pairs(task) if task.track == "multi" else None,
    }


def _overlap_pairs(task: Task) -> int:
    """Pairs of subjects whose target boxes overlap with positive area (the Z-Acc pairs of a missing image)."""
    subs = task.subjects
    return sum(
        1
        for i in range(len(subs))
        for j in range(i + 1, len(subs))
        if min(subs[i].box[2], subs[j].box[2]) > max(subs[i].box[0], subs[j].box[0])
        and min(subs[i].box[3], subs[j].box[3]) > max(subs[i].box[1], subs[j].box[1])
    )


def _fail(scores_path, gen, task, scorer_hash, sha, reason: str, summary: ScoreSummary) -> None:
    rec = _not_generated(gen, task, scorer_hash)
    rec.update(status="failed", image=gen.get("image"), image_sha256=sha, reason=reason, stage="scoring")
    append_record(scores_path, rec)
    summary.failed += 1
    summary.failures.append(f"{task.id}#{gen['sample_index']}: {reason}")


def read_run_info(run_path: Path) -> dict[str, Any]:
    run_file = run_path / RUN_FILE
    if not run_file.is_file():
        raise ScoreError(f"{run_file}: not found; is {run_path} a run folder made by `msibench run`?")
    try:
        return json.loads(run_file.read_text())
    except json.JSONDecodeError as err:
        raise ScoreError(f"{run_file}: not valid JSON: {err}") from err


def resolve_run_manifest(run_path: Path, info: dict[str, Any], override: Manifest | str | Path | None) -> Manifest:
    """The manifest a run was generated from: the override, else the recorded path, else the packaged one; the
    sha256 recorded in run.json must match."""
    expected = info.get("manifest_sha256") or (info.get("manifest") or {}).get("sha256")
    if isinstance(override, Manifest):
        candidates: list[Any] = [override]
    elif override is not None:
        candidates = [Path(override)]
    else:
        recorded = (info.get("manifest") or {}).get("path")
        candidates = [Path(recorded)] if recorded else []
        candidates.append(default_manifest_path())
    tried = []
    for cand in candidates:
        try:
            manifest = cand if isinstance(cand, Manifest) else load_manifest(cand)
        except ManifestError as err:
            tried.append(f"{cand} ({err})")
            continue
        if expected is None or manifest.sha256 == expected:
            return manifest
        tried.append(f"{manifest.path} (sha256 {manifest.sha256[:12]})")
    raise ScoreError(
        f"{run_path / RUN_FILE}: the run was made from manifest sha256 {str(expected)[:12]}, "
        f"not found in: {'; '.join(tried)}. Pass --manifest PATH to that manifest."
    )


def _open_scores(run_path, info, version, scorer_hash, device, rescore, argv) -> None:
    header_path = run_path / SCORES_HEADER
    with locked(run_path / ".scores.lock"):
        if header_path.is_file():
            try:
                header = json.loads(header_path.read_text())
            except json.JSONDecodeError as err:
                raise ScoreConflictError(f"{header_path}: unreadable ({err}); move it away or use --rescore") from err
            old = header.get("scorer_hash")
            if old == scorer_hash:
                return
            if not rescore:
                diff = _version_diff(header.get("scorer") or {}, version)
                raise ScoreConflictError(
                    f"{run_path} holds scores of scorer {old} ({diff}); this scorer is {scorer_hash}. "
                    "Use --rescore to archive them as scores-<hash>.json[l] and score again."
                )
            _archive(run_path, str(old))
        elif (run_path / SCORES_FILE).exists():
            if not rescore:
                raise ScoreConflictError(
                    f"{run_path / SCORES_FILE} exists without {SCORES_HEADER}; use --rescore to archive it"
                )
            _archive(run_path, "unknown")
        header = {
            "format": SCORES_FORMAT,
            "scorer_hash": scorer_hash,
            "scorer": version,
            "run": {
                "method": info.get("method"),
                "fingerprint_hash": info.get("fingerprint_hash"),
                "manifest_sha256": info.get("manifest_sha256"),
            },
            "packages": _package_versions(),
            "device": device,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": argv if argv is not None else sys.argv,
        }
        atomic_write_bytes(header_path, (json.dumps(header, indent=2, sort_keys=True) + "\n").encode())


def _version_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r:.80} -> {new.get(k)!r:.80}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs) or "same settings, other hash"


def _archive(run_path: Path, old_hash: str) -> None:
    suffix = old_hash
    n = 1
    while (run_path / f"scores-{suffix}.jsonl").exists() or (run_path / f"scores-{suffix}.json").exists():
        n += 1
        suffix = f"{old_hash}.{n}"
    for name, new in ((SCORES_FILE, f"scores-{suffix}.jsonl"), (SCORES_HEADER, f"scores-{suffix}.json")):
        if (run_path / name).exists():
            (run_path / name).rename(run_path / new)
    logger.warning("%s: archived scores of scorer %s as scores-%s.json[l]", run_path, old_hash, suffix)


def _finish(run_path: Path, scorer_hash: str) -> None:
    """Store the aggregate of the current scores in scores.json (a convenience; tables recompute it)."""
    from msibench.scoring.aggregate import aggregate, summary_to_json

    header_path = run_path / SCORES_HEADER
    with locked(run_path / ".scores.lock"):
        header = json.loads(header_path.read_text())
        if header.get("scorer_hash") != scorer_hash:
            return
        records = [r for r in read_records(run_path / SCORES_FILE) if r.get("scorer") == scorer_hash]
        header["summary"] = summary_to_json(aggregate(records))
        header["counts"] = dict(Counter(str(r.get("status")) for r in records))
        atomic_write_bytes(header_path, (json.dumps(header, indent=2, sort_keys=True) + "\n").encode())


def load_scores(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(scores.json header, current score records) of a scored run folder."""
    run_path = Path(run_dir)
    header_path = run_path / SCORES_HEADER
    if not header_path.is_file():
        raise ScoreError(f"{header_path}: not found; score the run first with `msibench score {run_path}`")
    try:
        header = json.loads(header_path.read_text())
    except json.JSONDecodeError as err:
        raise ScoreError(f"{header_path}: not valid JSON: {err}") from err
    scorer_hash = header.get("scorer_hash")
    records = [r for r in read_records(run_path / SCORES_FILE) if r.get("scorer") == scorer_hash]
    return header, records


def _package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in (
        "msibench",
        "torch",
        "torchvision",
        "ultralytics",
        "open_clip_torch",
        "timm",
        "transformers",
        "scipy",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
