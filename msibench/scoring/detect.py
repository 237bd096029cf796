"""COCO-80 detections (boxes, classes, scores and optional instance masks) of generated images.

:class:`YoloDetector` runs an ultralytics YOLO11 network directly as a torch module: our own letterbox (every
generated image of a run has the same size, so a batch is one tensor), one batched forward pass, then
ultralytics' own NMS. It does not go through ``YOLO.predict``, which handles one image list at a time, may
download a missing weight file and draws labels with a font it downloads.

Masks are materialized lazily, per detection, from the prototype masks: Z-Acc needs them only for the few
detections matched to a subject.

Tests inject detections with :class:`Detections.build` and :class:`CallableDetector`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

    from msibench.scoring.backbones import YoloModel

logger = logging.getLogger(__name__)

# Bump when letterboxing or mask decoding changes: it is part of the scorer version.
LETTERBOX_VERSION = "pil-bilinear-center-pad114-v1"


@dataclass(frozen=True, eq=False)
class Detections:
    """Detections of one image. ``boxes`` are normalized (x0, y0, x1, y1) in the image; ``category_ids`` are
    COCO ids; ``masks`` is None, a sequence of (H, W) boolean arrays, or a callable index -> (H, W) mask."""

    boxes: np.ndarray
    category_ids: np.ndarray
    scores: np.ndarray
    image_size: tuple[int, int]  # (width, height)
    masks: Sequence[np.ndarray] | Callable[[int], np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    def mask(self, index: int) -> np.ndarray:
        """Boolean (H, W) instance mask of detection ``index``, in image pixels."""
        if self.masks is None:
            raise ValueError("these detections carry no masks (use a -seg model for Z-Acc)")
        mask = self.masks(index) if callable(self.masks) else self.masks[index]
        mask = np.asarray(mask, dtype=bool)
        w, h = self.image_size
        if mask.shape != (h, w):
            raise ValueError(f"mask {index} has shape {mask.shape}, expected {(h, w)}")
        return mask

    def counts(self) -> Counter[int]:
        """Number of detections per COCO category id."""
        return Counter(int(c) for c in self.category_ids)

    @classmethod
    def build(
        cls,
        boxes: Sequence[Sequence[float]],
        category_ids: Sequence[int],
        *,
        image_size: tuple[int, int],
        scores: Sequence[float] | None = None,
        masks: Sequence[np.ndarray] | Callable[[int], np.ndarray] | None = None,
    ) -> Detections:
        """Detections from plain lists (normalized boxes, COCO ids); scores default to 1."""
        arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        ids = np.asarray(category_ids, dtype=np.int64).reshape(-1)
        if len(ids) != len(arr):
            raise ValueError(f"{len(arr)} boxes but {len(ids)} category ids")
        sc = np.ones(len(arr), dtype=np.float32) if scores is None else np.asarray(scores, dtype=np.float32)
        if masks is not None and not callable(masks) and len(masks) != len(arr):
            raise ValueError(f"{len(arr)} boxes but {len(masks)} masks")
        return cls(boxes=arr, category_ids=ids, scores=sc, image_size=tuple(image_size), masks=masks)


class Detector(Protocol):
    """Anything that turns images into :class:`Detections`; ``identity`` names it in the scorer version."""

    identity: str
    has_masks: bool

    def config(self) -> dict[str, Any]: ...

    def __call__(self, images: Sequence[Image.Image]) -> list[Detections]: ...


class CallableDetector:
    """An injected detector: ``fn(images) -> list[Detections]``."""

    def __init__(self, fn: Callable[[Sequence[Image.Image]], list[Detections]], *, name: str, has_masks: bool) -> None:
        self.fn = fn
        self.identity = name
        self.has_masks = has_masks

    def config(self) -> dict[str, Any]:
        return {"identity": self.identity, "has_masks": self.has_masks}

    def __call__(self, images: Sequence[Image.Image]) -> list[Detections]:
        out = list(self.fn(images))
        if len(out) != len(images):
            raise ValueError(f"detector {self.identity} returned {len(out)} results for {len(images)} images")
        return out


# ------------------------------------------------------------------------------------------------- letterbox


@dataclass(frozen=True)
class Letterbox:
    """Where an image of ``image_size`` sits inside the ``size`` x ``size`` network input."""

    size: int
    image_size: tuple[int, int]  # (W, H)
    content: tuple[int, int]  # resized (w, h)
    left: int
    top: int

    def to_image(self, boxes: np.ndarray) -> np.ndarray:
        """Network-input xyxy pixels -> image xyxy pixels, clipped to the image."""
        w, h = self.image_size
        cw, ch = self.content
        out = boxes.astype(np.float64).copy()
        out[:, [0, 2]] = (out[:, [0, 2]] - self.left) * (w / cw)
        out[:, [1, 3]] = (out[:, [1, 3]] - self.top) * (h / ch)
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
        return out


def letterbox(image: Image.Image, size: int) -> tuple[np.ndarray, Letterbox]:
    """Resize to fit ``size`` (aspect kept, PIL bilinear), pad centered with grey 114 as ultralytics does."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    r = min(size / w, size / h)
    cw, ch = max(1, round(w * r)), max(1, round(h * r))
    if (cw, ch) != (w, h):
        image = image.resize((cw, ch), Image.Resampling.BILINEAR)
    # Same rounding of the split padding as ultralytics' LetterBox (centered, the odd pixel at the bottom/right).
    top, left = round((size - ch) / 2 - 0.1), round((size - cw) / 2 - 0.1)
    canvas = np.full((size, size, 3), 114, dtype=np.uint8)
    canvas[top : top + ch, left : left + cw] = np.asarray(image)
    return canvas, Letterbox(size=size, image_size=(w, h), content=(cw, ch), left=left, top=top)


# --------------------------------------------------------------------------------------------------- YOLO


class YoloDetector:
    """Batched YOLO11 inference with ultralytics' NMS; see the module docstring."""

    def __init__(
        self,
        model: YoloModel,
        *,
        conf: float = 0.25,
        iou: float = 0.7,
        imgsz: int = 640,
        max_det: int = 300,
        batch_size: int = 8,
        channels_last: bool = True,
    ) -> None:
        if imgsz % 32:
            raise ValueError(f"detector image size must be a multiple of 32, got {imgsz}")
        if not 0.0 <= conf <= 1.0 or not 0.0 <= iou <= 1.0:
            raise ValueError(f"detector conf and iou must lie in [0, 1], got conf={conf}, iou={iou}")
        self.model = model
        self.conf = float(conf)
        self.iou = float(iou)
        self.imgsz = int(imgsz)
        self.max_det = int(max_det)
        self.batch_size = max(1, int(batch_size))
        self.channels_last = channels_last
        self.identity = model.identity
        self.has_masks = model.has_masks
        if channels_last:
            model.module.to(memory_format=_channels_last())

    def config(self) -> dict[str, Any]:
        return {
            "weights": self.model.weights,
            "identity": self.model.identity,
            "conf": self.conf,
            "iou": self.iou,
            "imgsz": self.imgsz,
            "max_det": self.max_det,
            "nms": "ultralytics non_max_suppression, class-aware",
            "letterbox": LETTERBOX_VERSION,
        }

    def __call__(self, images: Sequence[Image.Image]) -> list[Detections]:
        out: list[Detections] = []
        for start in range(0, len(images), self.batch_size):
            out.extend(self._run(images[start : start + self.batch_size]))
        return out

    def _run(self, images: Sequence[Image.Image]) -> list[Detections]:
        import torch
        from ultralytics.utils.nms import non_max_suppression

        boxed = [letterbox(im, self.imgsz) for im in images]
        x = torch.from_numpy(np.stack([arr for arr, _ in boxed])).permute(0, 3, 1, 2).float().div_(255.0)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            preds, protos = _split_output(self.model.module(x.to(self.model.device)))
            kept = non_max_suppression(
                preds,
                conf_thres=self.conf,
                iou_thres=self.iou,
                max_det=self.max_det,
                nc=len(self.model.class_ids),
                end2end=self.model.end2end,
            )
        class_ids = np.asarray(self.model.class_ids, dtype=np.int64)
        results = []
        for b, (det, (_, geom)) in enumerate(zip(kept, boxed, strict=True)):
            det = det.float().cpu()
            px = geom.to_image(det[:, :4].numpy())
            w, h = geom.image_size
            norm = px / np.array([w, h, w, h], dtype=np.float64)
            masks = None
            if protos is not None:
                masks = _LazyMasks(protos[b].float().cpu(), det[:, 6:].contiguous(), px, geom)
            results.append(
                Detections(
                    boxes=norm,
                    category_ids=class_ids[det[:, 5].long().numpy()],
                    scores=det[:, 4].numpy().astype(np.float32),
                    image_size=(w, h),
                    masks=masks,
                )
            )
        return results


def _channels_last():
    import torch

    return torch.channels_last


def _split_output(out: Any) -> tuple[Any, Any]:
    """(predictions (B, 4+nc+nm, A), prototypes (B, nm, mh, mw) or None) from a YOLO module's eval output."""
    first = out[0] if isinstance(out, (tuple, list)) else out
    if isinstance(first, (tuple, list)):  # segmentation: ((preds, protos), extras)
        return first[0], first[1]
    return first, None


class _LazyMasks:
    """Decodes one instance mask on demand: prototype mix -> letterbox crop -> bilinear to the image -> box crop,
    the order ultralytics' ``process_mask_native`` uses (upsample first, then threshold and crop)."""

    def __init__(self, protos, coeffs, boxes_px: np.ndarray, geom: Letterbox) -> None:
        self.protos = protos
        self.coeffs = coeffs
        self.boxes_px = boxes_px
        self.geom = geom

    def __call__(self, index: int) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        c, mh, mw = self.protos.shape
        g = self.geom
        sx, sy = mw / g.size, mh / g.size
        y0, y1 = int(round(g.top * sy)), max(int(round((g.top + g.content[1]) * sy)), int(round(g.top * sy)) + 1)
        x0, x1 = int(round(g.left * sx)), max(int(round((g.left + g.content[0]) * sx)), int(round(g.left * sx)) + 1)
        with torch.inference_mode():
            logits = (self.coeffs[index] @ self.protos.view(c, -1)).view(mh, mw)[y0:y1, x0:x1]
            w, h = g.image_size
            up = F.interpolate(logits[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            mask = (up > 0).numpy()
        bx0, by0, bx1, by1 = self.boxes_px[index]
        cols = np.arange(w) + 0.5
        rows = np.arange(h) + 0.5
        mask &= ((cols >= bx0) & (cols < bx1))[None, :]
        mask &= ((rows >= by0) & (rows < by1))[:, None]
        return mask
