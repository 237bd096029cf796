"""The scorer: turns generated images of MSIBench tasks into per-image score records (the metric).

It knows nothing about run folders or files; :mod:`msibench.scoring.score` drives it over a run and
:mod:`msibench.scoring.store` keeps ``scores.jsonl`` / ``scores.json``.

- The scorer version is everything that changes a score: the detector weights (file name + sha256), confidence,
  NMS IoU, image size, max detections, letterbox version, the matching rule with its minimum IoU, the identity
  backbones with their preprocessing, the crop mode and how crops are paired with subjects, the not-found rule,
  the Z-Acc pair rule, the collapse tests, the CLIP-B mode and the metric code version. Its short hash tags every
  score record.
- Identity crops (``--identity-crop category``, the default) are found by category, then paired with the
  category's subjects by appearance (``--identity-pairing appearance``, the default: the Hungarian assignment that
  maximises the total DINO similarity of crops and references), so two dogs drawn perfectly, each on the other's
  side, score as themselves; ``--identity-pairing position`` keeps the positional pairing of code version 2.
- A subject that was not found (no detection assigned, in the ``category`` and ``matched`` modes) has no crop: it
  scores 0 on DINO-I and CLIP-I, counts as confused in the collapse tests, and lowers the ``found`` rate (found
  subjects / K), so drawing nothing cannot score above a failed generation.

What each image needs (:meth:`Scorer.needs_detection`): a detector pass when a requested metric of its track is a
detector metric (YOLO-Subj, YOLO-L, Z-Acc: multi track only) or when identity (DINO-I, CLIP-I, collapse) is
cropped from detections (``--identity-crop category``, the default, and ``matched``): a layout-free crop still has
to *find* the subject. So with the defaults both tracks need one pass; the single track needs none with
``--identity-crop target|full`` or with only CLIP-B requested, and CLIP-B never needs one.

Speed: one batched pass of the segmentation detector serves detection, matching and masks (YOLO11x-seg carries a
full COCO-80 detection head, and the detector costs far more than everything else), only on the images that need
it; crops of a whole batch go through each identity backbone in one call, together with the CLIP-B images;
reference features come from the on-disk cache, and the background texts are encoded once per run.
``--detector yolo11x.pt --segmenter yolo11x-seg.pt`` gives the two-network variant (boxes from the box model,
masks from the segmenter, which then runs only on images with Z-Acc pairs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from msibench.bench.manifest import Task
from msibench.coco import CATEGORY_NAME
from msibench.scoring.identity import CLIP_B_MODES, CROP_MODES, MASK_GREY, FeatureCache, cosine, crop, grey_out
from msibench.scoring.match import MIN_MATCH_IOU, Found, Match, box_iou, find_subjects, match_targets
from msibench.scoring.metrics import (
    Z_MIN_OVERLAP,
    collapse,
    yolo_l,
    yolo_subj,
    z_order_pairs,
    z_pair_indices,
)

if TYPE_CHECKING:
    from PIL import Image

    from msibench.scoring.backbones import ClipBackbone, ImageEncoder
    from msibench.scoring.detect import Detections, Detector

logger = logging.getLogger(__name__)

# Bump when a metric's definition or the record layout changes.
# 2: layout-free identity crop by default (--identity-crop category), Z-Acc pairs from the manifest's boxes with a
#    5 % minimum overlap, identity collapse, every detection in the record.
# 3: crops paired with same-category subjects by appearance (Hungarian on DINO similarity), matching needs IoU >=
#    0.1, a subject not found scores 0 (found rate), same-category collapse, exact Z-Acc 5 % boundary.
SCORER_CODE_VERSION = "3"

METRIC_GROUPS = ("yolo_subj", "yolo_l", "z_acc", "dino_i", "clip_i", "clip_b", "collapse")
DETECTOR_METRICS = ("yolo_subj", "yolo_l", "z_acc")
IDENTITY_METRICS = ("dino_i", "clip_i")
# Metrics computed on subject crops (collapse reuses DINO-I's crop and reference features).
CROP_METRICS = ("dino_i", "clip_i", "collapse")
# The single-subject track reports identity and background only (as in the paper's Table I); collapse needs a
# second subject.
TRACK_METRICS = {"single": ("dino_i", "clip_i", "clip_b"), "multi": METRIC_GROUPS}
# The keys each metric group writes into a record's "metrics".
METRIC_KEYS = {
    "yolo_subj": ("yolo_subj", "yolo_subj_exact"),
    "yolo_l": ("yolo_l", "yolo_l50"),
    "z_acc": ("z_acc", "z_correct", "z_pairs"),
    "dino_i": ("dino_i",),
    "clip_i": ("clip_i",),
    "clip_b": ("clip_b",),
    "collapse": ("collapse", "collapse_confused", "collapse_subjects"),
}
# Written when the crops come from detections (``--identity-crop category|matched``): found subjects / K.
FOUND_KEY = "found"
# Same-category collapse: written with collapse when crops are paired by appearance (see Scorer docstring).
SAME_COLLAPSE_KEYS = ("collapse_same", "collapse_same_confused", "collapse_same_subjects")
DETECTION_CROP_MODES = ("category", "matched")
CROP_RULES = {
    "category": "layout-free: the detections find_subjects picks per category (IoU matching first, then the most "
    "confident remaining detections of the category); not found: no crop, identity 0",
    "matched": "the detection matched to the target box (IoU >= 0.1); not found: no crop, identity 0",
    "target": "the target box",
    "full": "the whole image",
}
PAIRING_MODES = ("appearance", "position")
PAIRING_RULES = {
    "appearance": "per category, the picked detections are assigned to the category's subjects by the Hungarian "
    "algorithm (scipy linear_sum_assignment) maximising the total cosine between crop and reference features",
    "position": "per category, IoU with the target box first, then Hungarian on box-centre distance",
}


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
    identity_crop: str = "category"
    identity_pairing: str = "appearance"  # only --identity-crop category pairs crops; the other modes are positional
    clip_b_mode: str = "full"
    metrics: tuple[str, ...] = METRIC_GROUPS
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.identity_crop not in CROP_MODES:
            raise ValueError(f"identity_crop must be one of {CROP_MODES}, got {self.identity_crop!r}")
        if self.identity_pairing not in PAIRING_MODES:
            raise ValueError(f"identity_pairing must be one of {PAIRING_MODES}, got {self.identity_pairing!r}")
        if self.clip_b_mode not in CLIP_B_MODES:
            raise ValueError(f"clip_b_mode must be one of {CLIP_B_MODES}, got {self.clip_b_mode!r}")
        for name, low, high in (("conf", 0.0, 1.0), ("iou", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        for name, low in (("imgsz", 32), ("max_det", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.imgsz % 32:
            raise ValueError(f"imgsz must be a multiple of 32 (the detector's stride), got {self.imgsz}")
        if self.detector is not None and str(self.detector).split(":", 1)[0].split("+", 1)[0] == "owlv2":
            from msibench.scoring.backbones import parse_grounding_spec

            parse_grounding_spec(self.detector)  # a malformed spec is a usage error before anything loads
        unknown = [m for m in self.metrics if m not in METRIC_GROUPS]
        if unknown or not self.metrics:
            raise ValueError(f"metrics must be a non-empty subset of {METRIC_GROUPS}, got {list(self.metrics)}")
        object.__setattr__(self, "metrics", tuple(m for m in METRIC_GROUPS if m in self.metrics))

    def track_metrics(self, track: str) -> tuple[str, ...]:
        """The requested metric groups that ``track`` reports."""
        return tuple(m for m in TRACK_METRICS[track] if m in self.metrics)

    def metric_keys(self, track: str) -> list[str]:
        """The keys an ok record of ``track`` carries in ``metrics`` (a failed generation counts on these)."""
        tm = self.track_metrics(track)
        keys = [key for m in tm for key in METRIC_KEYS[m]]
        if self.reports_found(track):
            keys.append(FOUND_KEY)
        if "collapse" in tm and self.pairs_by_appearance:
            keys.extend(SAME_COLLAPSE_KEYS)
        return keys

    @property
    def pairs_by_appearance(self) -> bool:
        """Whether same-category crops are paired with subjects by appearance (and same-category collapse is
        measured): the ``category`` crop with ``identity_pairing="appearance"``."""
        return self.identity_crop == "category" and self.identity_pairing == "appearance"

    def reports_found(self, track: str) -> bool:
        """Whether records of ``track`` carry the found rate: identity is cropped from detections."""
        tm = self.track_metrics(track)
        return self.identity_crop in DETECTION_CROP_MODES and any(m in CROP_METRICS for m in tm)

    def needs_detection(self, track: str) -> bool:
        """Whether an image of ``track`` needs a detector pass (see the module docstring)."""
        tm = self.track_metrics(track)
        return any(m in DETECTOR_METRICS for m in tm) or (
            self.identity_crop in DETECTION_CROP_MODES and any(m in CROP_METRICS for m in tm)
        )

    @property
    def needs_detector(self) -> bool:
        return any(self.needs_detection(track) for track in TRACK_METRICS)


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

    def setup(self, announce: Callable[[str], None] | None = None) -> None:
        """Load every backbone the configured metrics need and that was not injected.

        Nothing is downloaded (see :mod:`msibench.scoring.backbones`); every backbone that cannot be loaded is
        reported in one :class:`~msibench.scoring.backbones.BackboneError`, not one per attempt. ``announce`` (e.g.
        a print to stderr) hears each load as it starts and ends: loading can take minutes on a CPU."""
        if self._ready:
            return
        say = announce or (lambda message: None)
        from msibench.scoring import backbones
        from msibench.scoring.detect import YoloDetector

        cfg = self.config
        errors: list[str] = []

        def load(loader, *args, **kwargs):
            what = loader.__name__.removeprefix("load_")
            say(f"loading the {what} weights ({args[0] or 'default'}) on {self.device} ...")
            start = time.perf_counter()
            try:
                model = loader(*args, **kwargs)
            except backbones.BackboneError as err:
                errors.append(str(err))
                return None
            say(f"  {what} loaded in {time.perf_counter() - start:.1f} s")
            return model

        def yolo(spec: str | None) -> YoloDetector | None:
            model = load(backbones.load_yolo, spec, device=self.device, seed=self.seed)
            if model is None:
                return None
            return YoloDetector(
                model, conf=cfg.conf, iou=cfg.iou, imgsz=cfg.imgsz, max_det=cfg.max_det, batch_size=cfg.batch_size
            )

        def grounding(spec: str):
            from msibench.scoring.grounding import GroundingDetector

            parts = backbones.parse_grounding_spec(spec)
            owl = load(backbones.load_grounding_model, "owlv2", parts["owlv2"], device=self.device)
            sam = (
                load(backbones.load_grounding_model, "sam", parts["sam"], device=self.device)
                if "sam" in parts
                else None
            )
            if owl is None or ("sam" in parts and sam is None):
                return None
            return GroundingDetector(
                owl[0],
                owl[1],
                identity=owl[2],
                conf=cfg.conf,
                iou=cfg.iou,
                max_det=cfg.max_det,
                batch_size=cfg.batch_size,
                device=self.device,
                sam=sam[0] if sam else None,
                sam_processor=sam[1] if sam else None,
                sam_identity=sam[2] if sam else None,
            )

        if cfg.needs_detector and self.detector is None:
            self.detector = (
                grounding(cfg.detector) if backbones.is_grounding_spec(cfg.detector) else yolo(cfg.detector)
            )
        if "z_acc" in cfg.metrics and self.segmenter is None and cfg.segmenter:
            self.segmenter = yolo(cfg.segmenter)
        if ("dino_i" in cfg.metrics or "collapse" in cfg.metrics) and self.dino is None:
            self.dino = load(backbones.load_dino, cfg.dino, device=self.device, seed=self.seed)
        if ("clip_i" in cfg.metrics or "clip_b" in cfg.metrics) and self.clip is None:
            self.clip = load(backbones.load_clip, cfg.clip, device=self.device, seed=self.seed)
        if errors:
            raise backbones.BackboneError(
                f"{len(errors)} scoring backbone(s) cannot be loaded offline; `msibench weights fetch --scorers` "
                "downloads every default one (pinned revisions) into the cache that `msibench score` searches:\n"
                + "\n".join(f"- {e}" for e in errors)
            )
        if "z_acc" in cfg.metrics and not self._mask_source_has_masks():
            raise ScoreError(
                f"Z-Acc needs instance masks but detector {self.detector.identity} has none: use a -seg detector "
                "(--detector yolo11x-seg.pt), add --segmenter yolo11x-seg.pt, or leave z_acc out of --metrics"
            )
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
            "matching": (
                "per category, Hungarian (scipy linear_sum_assignment) on IoU; "
                f"pairs with IoU < {MIN_MATCH_IOU} are unmatched"
            ),
            "z_pairs": (
                {"from": "manifest boxes", "min_overlap_of_smaller_box": Z_MIN_OVERLAP, "arithmetic": "exact decimal"}
                if "z_acc" in metrics
                else None
            ),
            "dino": self.dino.identity if self.dino is not None else None,
            "clip": self.clip.identity if self.clip is not None else None,
            "identity_crop": (
                {
                    "mode": cfg.identity_crop,
                    "rule": CROP_RULES[cfg.identity_crop],
                    "pairing": self._pairing_version(),
                    "not_found": (
                        "no crop: DINO-I/CLIP-I 0, confused in collapse; found rate = found subjects / K"
                        if cfg.identity_crop in DETECTION_CROP_MODES
                        else None
                    ),
                }
                if any(m in metrics for m in CROP_METRICS)
                else None
            ),
            "collapse": (
                {
                    "other": "DINO K x K, confused = closer to another category's reference than to its own "
                    "(strict), or not found",
                    "same": (
                        "confused = after the appearance pairing, closer to another same-category subject's "
                        "reference than to its own (strict), or not found"
                        if cfg.pairs_by_appearance
                        else None
                    ),
                }
                if "collapse" in metrics
                else None
            ),
            "clip_b_mode": cfg.clip_b_mode if "clip_b" in metrics else None,
        }
        if out["clip_b_mode"] == "masked":
            out["clip_b_mask_grey"] = list(MASK_GREY)
        return out

    def _pairing_version(self) -> dict[str, Any] | str:
        cfg = self.config
        if cfg.identity_crop != "category":
            return "position: one crop per subject by definition of the mode"
        if cfg.identity_pairing == "position":
            return {"mode": "position", "rule": PAIRING_RULES["position"]}
        return {"mode": "appearance", "rule": PAIRING_RULES["appearance"], "features": self._pairing_backbone()}

    def _pairing_backbone(self) -> str | None:
        """The identity of the encoder whose features pair crops by appearance: DINO's, CLIP's without DINO."""
        if self.dino is not None and ("dino_i" in self.config.metrics or "collapse" in self.config.metrics):
            return self.dino.identity
        if self.clip is not None and "clip_i" in self.config.metrics:
            return self.clip.image.identity
        return None

    def version_hash(self) -> str:
        blob = json.dumps(self.version(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    # ------------------------------------------------------------------------------------- references

    def warm_references(self, references: dict[str, Path], announce: Callable[[str], None] | None = None) -> None:
        """Make reference features of ``references`` (sha256 -> path) available, from the cache or in batches;
        ``announce`` hears what is being done (``setup``'s)."""
        from msibench.scoring.identity import reference_features

        for encoder in self._identity_encoders():
            have = self._ref_feats.setdefault(encoder.identity, {})
            missing = {sha: path for sha, path in references.items() if sha not in have}
            if missing:
                if announce is not None:
                    announce(f"reference features of {len(missing)} references ({encoder.name}, cached after) ...")
                start = time.perf_counter()
                have.update(reference_features(encoder, _LazyImages(missing), self.feature_cache))
                if announce is not None:
                    announce(f"  reference features ready in {time.perf_counter() - start:.1f} s")

    def _identity_encoders(self) -> list[ImageEncoder]:
        out = []
        if ("dino_i" in self.config.metrics or "collapse" in self.config.metrics) and self.dino is not None:
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
        track_metrics = [cfg.track_metrics(it.task.track) for it in items]
        dets: list[Detections | None] = [None] * len(items)
        box_idx = [i for i, it in enumerate(items) if cfg.needs_detection(it.task.track)]
        if box_idx:
            for i, det in zip(box_idx, self.detector([items[i].image for i in box_idx]), strict=True):
                dets[i] = det
        matches: list[list[Match] | None] = [
            match_targets([s.box for s in it.task.subjects], [s.category_id for s in it.task.subjects], det)
            if det is not None
            else None
            for it, det in zip(items, dets, strict=True)
        ]
        found: list[list[Found] | None] = [None] * len(items)
        if cfg.identity_crop == "category":
            for i, it in enumerate(items):
                if dets[i] is not None:
                    subs = it.task.subjects
                    found[i] = find_subjects([s.box for s in subs], [s.category_id for s in subs], dets[i], matches[i])
        mask_dets, mask_matches = self._mask_detections(items, track_metrics, dets, matches)

        crops_per_item = [
            self._crops(it, tm, m, f, d)
            for it, tm, m, f, d in zip(items, track_metrics, matches, found, dets, strict=True)
        ]
        # Crops of the whole batch, item after item, in one list (None: subject not found, no crop); feat_index
        # gives each subject's row in both feature arrays.
        flat_crops: list[Image.Image] = []
        feat_index: list[list[int | None]] = []
        for crops in crops_per_item:
            rows: list[int | None] = []
            for image, _ in crops:
                rows.append(len(flat_crops) if image is not None else None)
                if image is not None:
                    flat_crops.append(image)
            feat_index.append(rows)
        wants_dino = "dino_i" in metrics or "collapse" in metrics
        dino_feats = self.dino.encode(flat_crops) if wants_dino and flat_crops else None
        clip_b_images = []
        clip_b_index: dict[int, int] = {}
        for i, it in enumerate(items):
            if "clip_b" not in track_metrics[i]:
                continue
            image = it.image.convert("RGB")
            if cfg.clip_b_mode == "masked":
                image = grey_out(image, [s.box for s in it.task.subjects])
            clip_b_index[i] = len(clip_b_images)
            clip_b_images.append(image)
        # One CLIP image call for the crops and the CLIP-B images of the whole batch.
        clip_crops = flat_crops if "clip_i" in metrics else []
        clip_inputs = clip_crops + clip_b_images
        clip_feats = self.clip.image.encode(clip_inputs) if clip_inputs else None
        texts = self._texts([it.task.background for it in items]) if clip_b_images else {}
        if any(m in CROP_METRICS for m in metrics):
            self.warm_references({sha: path for it in items for sha, path in it.references})
        if cfg.pairs_by_appearance:
            pair_feats = dino_feats if wants_dino else clip_feats
            pair_refs = self._ref_feats.get(self._pairing_backbone() or "", {})
            for i, it in enumerate(items):
                if found[i] is not None and crops_per_item[i] and pair_feats is not None:
                    found[i], feat_index[i] = pair_by_appearance(
                        it, found[i], feat_index[i], dets[i], pair_feats, pair_refs
                    )

        records = []
        for i, it in enumerate(items):
            subs = it.task.subjects
            index = feat_index[i]
            crops = self._crop_reasons(it, crops_per_item[i], matches[i], found[i], dets[i])
            rec = base_record(it, scorer_hash)
            values: dict[str, Any] = {}
            reasons = []
            assigned = self._assignment(matches[i], found[i])
            subjects = [self._subject_entry(it, j, matches[i], dets[i], crops, assigned) for j in range(len(subs))]
            tm = track_metrics[i]
            if dets[i] is not None:
                rec["detections"] = detection_entries(dets[i], assigned)
            if "yolo_subj" in tm:
                expected = Counter(s.category_id for s in subs)
                res = yolo_subj(expected, dets[i].counts())
                values["yolo_subj"] = res.value
                values["yolo_subj_exact"] = 1.0 if res.exact else 0.0
                rec["counts"] = {name: [res.expected[name], res.detected[name]] for name in res.expected}
                reasons.append(res.reason)
            if "yolo_l" in tm:
                lay = yolo_l(matches[i], [s.category_id for s in subs])
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
                    reasons.append(f"no subjects overlapping by >= {Z_MIN_OVERLAP:.0%}: Z-Acc not evaluated")
                else:
                    reasons.append(f"z-order {correct}/{len(pairs)} pairs correct")
            for metric, feats in (("dino_i", dino_feats), ("clip_i", clip_feats)):
                if metric not in tm or not crops:  # no features at all: every subject of the batch not found
                    continue
                ref_feats = self._ref_feats[(self.dino if metric == "dino_i" else self.clip.image).identity]
                per_subject = []
                for j in range(len(crops)):
                    # not found: nothing of the subject to compare, so no credit (see the module docstring)
                    value = cosine(feats[index[j]], ref_feats[it.references[j][0]]) if index[j] is not None else 0.0
                    subjects[j][metric] = value
                    per_subject.append(value)
                values[metric] = float(np.mean(per_subject))
            if crops and cfg.reports_found(it.task.track):
                values[FOUND_KEY] = sum(r is not None for r in index) / len(index)
            if "collapse" in tm and crops:
                ref_feats = self._ref_feats[self.dino.identity]
                k = len(crops)
                sim = np.full((k, k), np.nan)
                for j in range(k):
                    if index[j] is not None:
                        sim[j] = [cosine(dino_feats[index[j]], ref_feats[it.references[r][0]]) for r in range(k)]
                is_found = [r is not None for r in index]
                cats = [s.category_id for s in subs]
                res = collapse(sim, cats, is_found)
                values["collapse_confused"] = res.n_confused
                values["collapse_subjects"] = res.n_subjects
                values["collapse"] = res.n_confused / res.n_subjects if res.n_subjects else None
                rec["collapse"] = {
                    "similarity": [[None if np.isnan(v) else round(float(v), 6) for v in row] for row in sim],
                    "confused": list(res.confused),
                    "rival": list(res.rival),
                    "reason": res.reason,
                }
                reasons.append(f"collapse {res.reason}")
                if cfg.pairs_by_appearance:
                    same = collapse(sim, cats, is_found, scope="same")
                    values["collapse_same_confused"] = same.n_confused
                    values["collapse_same_subjects"] = same.n_subjects
                    values["collapse_same"] = same.n_confused / same.n_subjects if same.n_subjects else None
                    rec["collapse_same"] = {
                        "confused": list(same.confused),
                        "rival": list(same.rival),
                        "reason": same.reason,
                    }
                    if same.n_subjects:
                        reasons.append(f"same-category collapse {same.reason}")
            if "clip_b" in tm:
                image_feat = clip_feats[len(clip_crops) + clip_b_index[i]]
                values["clip_b"] = cosine(image_feat, texts[it.task.background])
            if crops:
                if it.task.track == "single":
                    reasons.append(f"{subjects[0]['category']}: {subjects[0]['crop_reason']}")
                else:
                    reasons.append("identity crops: " + _crop_summary([c for c, _ in crops]))
            rec["metrics"] = values
            rec["subjects"] = subjects
            rec["reason"] = "; ".join(reasons) if reasons else None
            records.append(rec)
        seconds = (time.perf_counter() - start) / max(1, len(items))
        for rec in records:
            rec["seconds"] = round(seconds, 4)
        return records

    def _assignment(self, matches: list[Match] | None, found: list[Found] | None) -> dict[int, int]:
        """detection index -> subject index: the identity crop's assignment in the ``category`` mode, else the
        IoU matching."""
        if found is not None:
            return {f.detection: f.target for f in found if f.found}
        if matches is not None:
            return {m.detection: m.target for m in matches if m.matched}
        return {}

    @staticmethod
    def _subject_entry(item, j, matches, det, crops, assigned) -> dict[str, Any]:
        subject = item.task.subjects[j]
        entry: dict[str, Any] = {
            "category": subject.category,
            "category_id": subject.category_id,
            "z": subject.z,
            "box": [round(v, 6) for v in subject.box],
        }
        if matches is not None:
            m = matches[j]
            entry["matched"] = m.matched
            entry["iou"] = round(m.iou, 6)
            entry["detection"] = (
                {
                    "index": int(m.detection),
                    "box": [round(float(v), 6) for v in det.boxes[m.detection]],
                    "score": round(float(det.scores[m.detection]), 6),
                }
                if m.matched
                else None
            )
        if crops:
            source, reason = crops[j]
            entry["crop"] = source
            entry["crop_reason"] = reason
            entry["crop_detection"] = (
                next((d for d, t in assigned.items() if t == j), None) if source == "detection" else None
            )
            entry["reference"] = item.references[j][0][:16]
        return entry

    def _mask_detections(self, items, track_metrics, dets, matches):
        """Detections (and matches) whose masks judge Z-Acc: the detector's own, or the segmenter's, which then
        runs only on images with at least one Z-Acc pair."""
        n = len(items)
        if "z_acc" not in self.config.metrics:
            return [None] * n, [None] * n
        if self.segmenter is None:
            return dets, matches
        mask_dets: list[Detections | None] = [None] * n
        mask_matches: list[list[Match] | None] = [None] * n
        need = [
            i
            for i, it in enumerate(items)
            if "z_acc" in track_metrics[i] and z_pair_indices([s.box for s in it.task.subjects])
        ]
        if need:
            for i, det in zip(need, self.segmenter([items[i].image for i in need]), strict=True):
                mask_dets[i] = det
                subs = items[i].task.subjects
                mask_matches[i] = match_targets([s.box for s in subs], [s.category_id for s in subs], det)
        return mask_dets, mask_matches

    def _z_pairs(self, item: ScoreItem, det: Detections | None, matches: list[Match] | None):
        subs = item.task.subjects
        # decode masks only for subjects of a Z-Acc pair (each decode upsamples a prototype mix to the image)
        in_pairs = {k for pair in z_pair_indices([s.box for s in subs]) for k in pair}
        masks: list[np.ndarray | None] = []
        for j in range(len(subs)):
            m = matches[j] if matches is not None else None
            found = det is not None and m is not None and m.matched and j in in_pairs
            masks.append(det.mask(m.detection) if found else None)
        return z_order_pairs(
            [s.box for s in subs], [s.z for s in subs], [s.category_id for s in subs], masks, item.image.size
        )

    def _crops(
        self,
        item: ScoreItem,
        track_metrics: tuple[str, ...],
        matches: list[Match] | None,
        found: list[Found] | None,
        det: Detections | None,
    ) -> list[tuple[Image.Image | None, str]]:
        """(crop, where it came from: detection | target | full | none) per subject; [] when no crop metric
        applies. ``none``: the subject was not found, it has no crop (identity 0)."""
        if not any(m in CROP_METRICS for m in track_metrics):
            return []
        mode = self.config.identity_crop
        out: list[tuple[Image.Image | None, str]] = []
        for j, subject in enumerate(item.task.subjects):
            if mode == "full":
                out.append((crop(item.image, None), "full"))
            elif mode == "target":
                out.append((crop(item.image, subject.box), "target"))
            else:
                d = matches[j].detection if mode == "matched" else found[j].detection
                out.append((crop(item.image, det.boxes[d]), "detection") if d is not None else (None, "none"))
        return out

    def _crop_reasons(
        self,
        item: ScoreItem,
        crops: list[tuple[Image.Image | None, str]],
        matches: list[Match] | None,
        found: list[Found] | None,
        det: Detections | None,
    ) -> list[tuple[str, str]]:
        """(source, why) per subject, after the pairing (which may give a subject another detection)."""
        if not crops:
            return []
        mode = self.config.identity_crop
        subs = item.task.subjects
        out = []
        for j, subject in enumerate(subs):
            name = subject.category
            if mode == "full":
                out.append(("full", "whole image (--identity-crop full)"))
            elif mode == "target":
                out.append(("target", "target box (--identity-crop target)"))
            elif mode == "matched":
                m = matches[j]
                if m.matched:
                    out.append(("detection", _on_target(name, m.detection, det, m.iou)))
                else:
                    why = (
                        f"no {name} detection overlaps the target box by IoU >= {MIN_MATCH_IOU}: not found, identity 0"
                    )
                    out.append(("none", why))
            else:  # category
                f = found[j]
                if not f.found:
                    asked = sum(1 for s in subs if s.category_id == subject.category_id)
                    seen = int(np.count_nonzero(det.category_ids == subject.category_id))
                    out.append(("none", f"{name} not found ({asked} asked, {seen} detected): no crop, identity 0"))
                    continue
                conf = f"{name} detection {f.detection} (conf {det.scores[f.detection]:.2f})"
                if f.rule == "iou":
                    why = _on_target(name, f.detection, det, f.iou)
                elif f.rule == "appearance":
                    why = (
                        f"{conf} (IoU {f.iou:.2f} with the target): paired by appearance, the best assignment of "
                        f"the {name} crops to the {name} references"
                    )
                else:
                    why = (
                        f"{conf} away from the target (IoU {f.iou:.2f}): found by category, the most confident "
                        f"{name} left, nearest centre"
                    )
                out.append(("detection", why))
        return out


def pair_by_appearance(
    item: ScoreItem,
    found: list[Found],
    feat_index: list[int | None],
    det: Detections,
    feats: np.ndarray,
    ref_feats: dict[str, np.ndarray],
) -> tuple[list[Found], list[int | None]]:
    """Re-pair the found detections of each category with that category's subjects by appearance.

    Which detections stand for a category is decided before (``find_subjects``: IoU first, then confidence; never
    by appearance, so drawing extra copies cannot pick the best-looking one). Among them, the Hungarian algorithm
    assigns detections to subjects so that the total cosine between crop and reference is largest. Returns the new
    ``found`` and the new row of each subject's crop features (None: not found)."""
    from scipy.optimize import linear_sum_assignment

    subs = item.task.subjects
    cats = [s.category_id for s in subs]
    new_found, new_index = list(found), list(feat_index)
    for category in sorted(set(cats)):
        members = [j for j, c in enumerate(cats) if c == category]
        holders = [j for j in members if found[j].found]
        if len(members) < 2 or not holders:
            continue
        sim = np.array(
            [[cosine(feats[feat_index[h]], ref_feats[item.references[s][0]]) for h in holders] for s in members]
        )
        rows, cols = linear_sum_assignment(sim, maximize=True)
        for s in members:
            new_found[s], new_index[s] = Found(s, None, None, 0.0), None
        for r, c in zip(rows, cols, strict=True):
            s, h = members[r], holders[c]
            d = found[h].detection
            if s == h:
                new_found[s] = found[h]
            else:
                iou = float(box_iou(np.asarray(subs[s].box), det.boxes[d])[0, 0])
                new_found[s] = Found(s, d, "appearance", iou)
            new_index[s] = feat_index[h]
    return new_found, new_index


def _on_target(name: str, index: int, det: Detections, iou: float) -> str:
    return f"{name} detection {index} (conf {det.scores[index]:.2f}) on the target, IoU {iou:.2f}"


def detection_entries(det: Detections, assigned: dict[int, int]) -> list[dict[str, Any]]:
    """Every detection of an image, for the record: normalised box, class, confidence and assigned subject."""
    out = []
    for d in range(len(det)):
        cid = int(det.category_ids[d])
        out.append(
            {
                "box": [round(float(v), 6) for v in det.boxes[d]],
                "category_id": cid,
                "category": CATEGORY_NAME.get(cid, f"category {cid}"),
                "score": round(float(det.scores[d]), 6),
                "subject": assigned.get(d),
            }
        )
    return out


def _crop_summary(sources: list[str]) -> str:
    counts = Counter(sources)
    return ", ".join(
        f"{counts[s]} {label}"
        for s, label in (
            ("detection", "from detections"),
            ("target", "from target boxes"),
            ("full", "whole image"),
            ("none", "not found (identity 0)"),
        )
        if counts[s]
    )


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


def base_record(item: ScoreItem, scorer_hash: str) -> dict[str, Any]:
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
