"""Open-vocabulary detection by text queries: OWLv2 through transformers, instance masks from SAM (optional).

:class:`GroundingDetector` is a :class:`~msibench.scoring.detect.Detector` like the YOLO one, so the scorer uses it
unchanged (``msibench score --detector owlv2`` or ``owlv2+sam``). It queries every image with one text per
category of its ``vocabulary`` (category id -> name; default the COCO-80 names, so it stands in for YOLO on
MSIBench tasks): OWLv2 scores every predicted box against every query, a box keeps its best query (transformers'
``post_process_grounded_object_detection``) when its score reaches ``conf``, then class-aware NMS at ``iou``
(torchvision ``batched_nms``; OWLv2 itself predicts one box per image patch, so one object gets several) and the
``max_det`` most confident are kept. Boxes come back in the padded square OWLv2 sees (images are padded at the
bottom and right), so they are clipped to the image and normalised by its size.

Masks (Z-Acc needs them) come from SAM prompted with each detection's box, computed lazily per detection as YOLO's
are: the image embedding once per image, then one prompt decode per requested mask.

Weights: ``google/owlv2-base-patch16-ensemble`` and ``facebook/sam-vit-base`` at pinned commits
(:data:`msibench.scoring.backbones.GROUNDING_WEIGHTS`, ``msibench weights fetch --grounding``), or local folders;
tests build both from tiny configs in code. The COCO-80 YOLO stays the default for Table I.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from msibench.coco import CATEGORY_NAME
from msibench.scoring.detect import Detections

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

# How each category is asked for (OWL-ViT's and OWLv2's own evaluation prompt style).
QUERY_TEMPLATE = "a photo of a {}"
# Part of the detector config: bump when box post-processing or mask decoding changes.
GROUNDING_VERSION = "owlv2-best-query-batched-nms-clip-v1"


class GroundingDetector:
    """Batched OWLv2 detection of a fixed vocabulary of text queries, with optional SAM masks; see the module
    docstring. ``model``/``processor`` are transformers' ``Owlv2ForObjectDetection``/``Owlv2Processor`` (or
    compatible), ``sam``/``sam_processor`` ``SamModel``/``SamProcessor``; ``identity``/``sam_identity`` name their
    weights exactly (they enter the scorer version)."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        identity: str,
        vocabulary: Mapping[int, str] | None = None,
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 300,
        batch_size: int = 8,
        device: str = "cpu",
        sam: Any = None,
        sam_processor: Any = None,
        sam_identity: str | None = None,
        template: str = QUERY_TEMPLATE,
    ) -> None:
        if not 0.0 <= conf <= 1.0 or not 0.0 <= iou <= 1.0:
            raise ValueError(f"detector conf and iou must lie in [0, 1], got conf={conf}, iou={iou}")
        if (sam is None) != (sam_processor is None):
            raise ValueError("SAM masks need both the model and its processor")
        vocabulary = dict(CATEGORY_NAME if vocabulary is None else vocabulary)
        if not vocabulary or not all(isinstance(v, str) and v.strip() for v in vocabulary.values()):
            raise ValueError("the grounding vocabulary must map category ids to non-empty names")
        self.model = model.eval().to(device)
        self.processor = processor
        self.sam = sam.eval().to(device) if sam is not None else None
        self.sam_processor = sam_processor
        self.category_ids = np.asarray(list(vocabulary), dtype=np.int64)
        self.queries = [template.format(name) for name in vocabulary.values()]
        self.conf, self.iou = float(conf), float(iou)
        self.max_det = int(max_det)
        self.batch_size = max(1, int(batch_size))
        self.device = device
        self.identity = identity if sam is None else f"{identity}+{sam_identity}"
        self._owl_identity, self._sam_identity = identity, sam_identity
        self.has_masks = sam is not None
        self._text_length = int(getattr(self.model.config.text_config, "max_position_embeddings", 16))

    def config(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "detector": self._owl_identity,
            "masks": self._sam_identity,
            "queries": self.queries,
            "category_ids": self.category_ids.tolist(),
            "conf": self.conf,
            "iou": self.iou,
            "max_det": self.max_det,
            "nms": "torchvision batched_nms, class-aware",
            "post_process": GROUNDING_VERSION,
        }

    def __call__(self, images: Sequence[Image.Image]) -> list[Detections]:
        out: list[Detections] = []
        for start in range(0, len(images), self.batch_size):
            out.extend(self._run(images[start : start + self.batch_size]))
        return out

    def _run(self, images: Sequence[Image.Image]) -> list[Detections]:
        import torch
        from torchvision.ops import batched_nms

        images = [im.convert("RGB") for im in images]
        # queries padded (and cut) to the text encoder's length, as OWLv2 was trained (16 tokens)
        inputs = self.processor(
            text=[self.queries] * len(images),
            images=images,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self._text_length,
        )
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        with torch.inference_mode():
            outputs = self.model(**inputs)
        # OWLv2 pads each image to a square at the bottom/right: boxes are relative to that square
        squares = [(max(im.size), max(im.size)) for im in images]
        results = self.processor.post_process_grounded_object_detection(
            outputs, threshold=self.conf, target_sizes=squares
        )
        dets = []
        for image, res in zip(images, results, strict=True):
            w, h = image.size
            boxes = res["boxes"].float().cpu()
            scores = res["scores"].float().cpu()
            labels = res["labels"].long().cpu()
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clamp(0, w)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clamp(0, h)
            keep = batched_nms(boxes, scores, labels, self.iou)[: self.max_det]
            px = boxes[keep].numpy().astype(np.float64)
            norm = px / np.array([w, h, w, h], dtype=np.float64)
            masks = _SamMasks(self, image, px) if self.sam is not None else None
            dets.append(
                Detections(
                    boxes=norm,
                    category_ids=self.category_ids[labels[keep].numpy()],
                    scores=scores[keep].numpy().astype(np.float32),
                    image_size=(w, h),
                    masks=masks,
                )
            )
        return dets


class _SamMasks:
    """Instance mask of detection ``index``: SAM prompted with its box (image embedding computed once)."""

    def __init__(self, owner: GroundingDetector, image: Image.Image, boxes_px: np.ndarray) -> None:
        self.owner = owner
        self.image = image
        self.boxes_px = boxes_px
        self._embedding = None

    def __call__(self, index: int) -> np.ndarray:
        import torch

        sam, processor, device = self.owner.sam, self.owner.sam_processor, self.owner.device
        box = [[[float(v) for v in self.boxes_px[index]]]]
        inputs = processor(self.image, input_boxes=box, return_tensors="pt")
        with torch.inference_mode():
            if self._embedding is None:
                self._embedding = sam.get_image_embeddings(inputs["pixel_values"].to(device))
            out = sam(
                image_embeddings=self._embedding,
                input_boxes=inputs["input_boxes"].to(device),
                multimask_output=False,
            )
        masks = processor.image_processor.post_process_masks(
            out.pred_masks.cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"]
        )
        return np.asarray(masks[0][0, 0].numpy(), dtype=bool)
