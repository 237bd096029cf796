"""Training Dataset over an MSI build, with Curriculum Learning on Subject Quantity (paper Eq. 15-16).

For epoch e, a scene with more subjects than K(e) trains on a random subset of K(e) of them, drawn from
(seed, epoch, image id); the layout map is recomposed from exactly that subset, so dropped subjects vanish from it.
The target image, boxes and layout map share one geometric transform to the training resolution:

- ``fit="pad"`` (default): the long side is scaled to the resolution and the image centred on a black square, so no
  subject is ever cut (the paper trains on whole scenes);
- ``fit="crop"``: the short side is scaled to the resolution and the centre square kept; subjects whose box falls
  entirely outside it are not candidates for the subset.

Use ``set_epoch`` before each epoch (with DataLoader workers that are not persistent, so they see the new epoch), or
call ``sample(index, epoch)`` directly.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mscustomnet.data.build import CONFIG_FILE, MANIFEST_FILE
from mscustomnet.data.curriculum import GAMMA, K_MAX, K_MIN, choose_subjects, curriculum_k, subset_rng
from mscustomnet.data.layout import Placement, compose_layout_map, paint_order, reference_square

log = logging.getLogger(__name__)

RESOLUTION = 256  # CustomNet trains at 256 x 256
_SUBJECT_FIELDS = ("ann_id", "category_id", "bbox", "mask_area", "z_rank", "reference_id", "reference_file",
                   "reference_mask_file")  # fmt: skip
_SCENE_FIELDS = ("image_id", "file_name", "width", "height", "caption", "subjects")


@dataclass(frozen=True)
class FitTransform:
    """Scale then translate from scene pixels to training pixels: x' = x * scale + offset_x."""

    scale: float
    offset_x: float
    offset_y: float
    resized: tuple[int, int]  # (width, height) of the scaled image before padding or cropping

    @classmethod
    def create(cls, width: int, height: int, resolution: int, fit: str) -> FitTransform:
        if fit == "pad":
            scale = resolution / max(width, height)
        elif fit == "crop":
            scale = resolution / min(width, height)
        else:
            raise ValueError(f"fit must be 'pad' or 'crop', got {fit!r}")
        resized = (max(1, round(width * scale)), max(1, round(height * scale)))
        return cls(scale, (resolution - resized[0]) // 2, (resolution - resized[1]) // 2, resized)

    def box(self, bbox: list[float]) -> tuple[float, float, float, float]:
        """COCO [x, y, w, h] to training-pixel xyxy (not clipped)."""
        x, y, w, h = bbox
        s = self.scale
        return (x * s + self.offset_x, y * s + self.offset_y, (x + w) * s + self.offset_x, (y + h) * s + self.offset_y)

    def content_mask(self, resolution: int) -> np.ndarray:
        """float32 [R, R]: 1 where the canvas shows the photo, 0 on the letterbox padding (``fit="pad"``)."""
        mask = np.zeros((resolution, resolution), dtype=np.float32)
        ox, oy = int(self.offset_x), int(self.offset_y)
        mask[max(0, oy) : max(0, oy + self.resized[1]), max(0, ox) : max(0, ox + self.resized[0])] = 1.0
        return mask

    def image(self, image: Image.Image, resolution: int) -> np.ndarray:
        """The scene photo on the training canvas (uint8 [R, R, 3]), black where padded."""
        scaled = np.asarray(image.convert("RGB").resize(self.resized, Image.Resampling.BICUBIC))
        canvas = np.zeros((resolution, resolution, 3), dtype=np.uint8)
        ox, oy = int(self.offset_x), int(self.offset_y)
        # Source and destination windows of the overlap between the scaled image and the canvas.
        sx0, sy0 = max(0, -ox), max(0, -oy)
        dx0, dy0 = max(0, ox), max(0, oy)
        w = min(self.resized[0] - sx0, resolution - dx0)
        h = min(self.resized[1] - sy0, resolution - dy0)
        canvas[dy0 : dy0 + h, dx0 : dx0 + w] = scaled[sy0 : sy0 + h, sx0 : sx0 + w]
        return canvas


@dataclass(frozen=True)
class PlacedSubject:
    """One subject of a sample: its manifest record, its reference crop (RGB uint8, white outside the bool mask) at
    original size, its xyxy box on the training canvas (not clipped) and its paint rank (0 = back)."""

    record: dict[str, Any]
    rgb: np.ndarray
    mask: np.ndarray
    box: tuple[float, float, float, float]
    z_rank: int

    @property
    def placement(self) -> Placement:
        return Placement(rgb=self.rgb, mask=self.mask, box=self.box)


def square_reference(
    rgb: np.ndarray, mask: np.ndarray, size: int, object_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A reference crop as the image encoder sees it, by the function inference uses too
    (:func:`mscustomnet.data.layout.reference_square`): cropped to the mask's box, the long edge scaled (Lanczos) to
    ``object_size`` (default ``size``) and centred on a white ``size`` square; its mask likewise."""
    return reference_square(rgb, mask, size, object_size)


def load_manifest(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Scenes of an MSI ``manifest.jsonl``, checked for the fields the Dataset reads."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MSI manifest not found: {path}")
    scenes = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            scene = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {number} is not valid JSON ({e})") from e
        for field in _SCENE_FIELDS:
            if field not in scene:
                raise ValueError(f"{path}: line {number} lacks field '{field}'")
        if not scene["subjects"]:
            raise ValueError(f"{path}: line {number} has no subjects")
        for k, subject in enumerate(scene["subjects"]):
            for field in _SUBJECT_FIELDS:
                if field not in subject:
                    raise ValueError(f"{path}: line {number} subject {k} lacks field '{field}'")
        scenes.append(scene)
    return scenes


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float32 CHW in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


class MSIDataset(Dataset):
    """Samples of an MSI build at a training resolution, with the subject-quantity curriculum.

    Each sample is a dict:
      image [3, R, R] and layout_map [3, R, R]: float in [0, 1] (layout map black where empty);
      content_mask [1, R, R]: 1 where the photo is, 0 on the letterbox padding of ``fit="pad"`` (the trainer keeps
      the padding out of the loss with it);
      layout_index [R, R] int64: which returned subject is visible at each layout pixel, -1 where empty;
      references [K, 3, r, r] float in [0, 1] on white (the object's long edge spans r, or
      ``reference_object_size`` when given), reference_masks [K, 1, r, r] float 0/1;
      category_ids, ann_ids, reference_ids [K] int64; boxes [K, 4] float32 xyxy in training pixels;
      z_ranks [K] int64: paint order of the returned subjects (0 = back: largest mask area);
      num_subjects (K), prompt (str), image_id (int), epoch (int).
    Subjects keep the manifest's order (annotation id).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        resolution: int = RESOLUTION,
        reference_resolution: int | None = None,
        reference_object_size: int | None = None,
        total_epochs: int = 1,
        k_min: int = K_MIN,
        k_max: int = K_MAX,
        gamma: float = GAMMA,
        curriculum: bool = True,
        seed: int = 0,
        fit: str = "pad",
        image_root: str | os.PathLike[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.scenes = load_manifest(self.root / MANIFEST_FILE)
        if image_root is None:
            config_path = self.root / CONFIG_FILE
            if not config_path.is_file():
                raise FileNotFoundError(f"{config_path} not found: pass image_root to locate the scene photos")
            config = json.loads(config_path.read_text())
            image_root = Path(config["coco_root"]) / config["split"]
        self.image_root = Path(image_root)
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        FitTransform.create(1, 1, resolution, fit)  # validates ``fit``
        curriculum_k(1, total_epochs, k_min, k_max, gamma)  # validates the curriculum parameters
        self.resolution = resolution
        self.reference_resolution = reference_resolution or resolution
        if reference_object_size is not None and not 1 <= reference_object_size <= self.reference_resolution:
            raise ValueError(
                f"reference_object_size must be in 1..{self.reference_resolution}, got {reference_object_size}"
            )
        self.reference_object_size = reference_object_size
        self.total_epochs = total_epochs
        self.k_min, self.k_max, self.gamma = k_min, k_max, gamma
        self.curriculum = curriculum
        self.seed = seed
        self.fit = fit
        self.epoch = 1

    def __len__(self) -> int:
        return len(self.scenes)

    def set_epoch(self, epoch: int) -> None:
        """Select the (1-based) epoch whose K(e) and subsets the following samples use."""
        self.k_for_epoch(epoch)
        self.epoch = epoch

    def k_for_epoch(self, epoch: int) -> int:
        """Subjects per sample at ``epoch``: K(e) under the curriculum, else K_max."""
        k = curriculum_k(epoch, self.total_epochs, self.k_min, self.k_max, self.gamma)
        return k if self.curriculum else self.k_max

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.sample(index, self.epoch)

    def subject_indices(self, index: int, epoch: int) -> list[int]:
        """Manifest positions of the subjects that sample ``index`` uses at ``epoch``."""
        scene = self.scenes[index]
        transform = FitTransform.create(scene["width"], scene["height"], self.resolution, self.fit)
        visible = [k for k, s in enumerate(scene["subjects"]) if self._visible(transform.box(s["bbox"]))]
        rng = subset_rng(self.seed, epoch, int(scene["image_id"]))
        return [visible[i] for i in choose_subjects(len(visible), self.k_for_epoch(epoch), rng)]

    def _visible(self, box: tuple[float, float, float, float]) -> bool:
        x0, y0, x1, y1 = box
        r = self.resolution
        return min(x1, r) - max(x0, 0) >= 1 and min(y1, r) - max(y0, 0) >= 1

    def placed_subjects(self, index: int, epoch: int) -> list[PlacedSubject]:
        """The subjects sample ``index`` uses at ``epoch`` (manifest order), each with its reference crop at original
        size, its box on the training canvas and its paint rank: what both the layout map and the sample grids
        (``mscustomnet.train.samples``) are made from."""
        scene = self.scenes[index]
        transform = FitTransform.create(scene["width"], scene["height"], self.resolution, self.fit)
        subjects = [scene["subjects"][k] for k in self.subject_indices(index, epoch)]
        order = paint_order([s["mask_area"] for s in subjects], [s["ann_id"] for s in subjects])
        z_ranks = {k: rank for rank, k in enumerate(order)}
        placed = []
        for k, s in enumerate(subjects):
            rgb, mask = self._reference(s)
            placed.append(PlacedSubject(s, rgb, mask, transform.box(s["bbox"]), z_ranks[k]))
        return placed

    def sample(self, index: int, epoch: int) -> dict[str, Any]:
        scene = self.scenes[index]
        res, ref_res = self.resolution, self.reference_resolution
        transform = FitTransform.create(scene["width"], scene["height"], res, self.fit)
        placed = self.placed_subjects(index, epoch)
        subjects = [p.record for p in placed]

        image_path = self.image_root / scene["file_name"]
        try:
            with Image.open(image_path) as photo:
                image = transform.image(photo, res)
        except (OSError, SyntaxError) as e:
            raise OSError(f"MSI scene {scene['image_id']}: cannot read {image_path} ({e})") from e

        order = sorted(range(len(placed)), key=lambda k: placed[k].z_rank)
        layout_map, painted = compose_layout_map(res, res, [placed[k].placement for k in order])
        # compose_layout_map indexes placements in paint order; map back to the returned subject order.
        slot_of_paint = torch.tensor(order + [-1], dtype=torch.int64)
        layout_index = slot_of_paint[torch.from_numpy(painted.astype(np.int64))]

        refs = [square_reference(p.rgb, p.mask, ref_res, self.reference_object_size) for p in placed]
        references = torch.zeros(len(refs), 3, ref_res, ref_res)
        reference_masks = torch.zeros(len(refs), 1, ref_res, ref_res)
        for k, (rgb, mask) in enumerate(refs):
            references[k] = _to_tensor(rgb)
            reference_masks[k, 0] = torch.from_numpy(mask)
        return {
            "image": _to_tensor(image),
            "content_mask": torch.from_numpy(transform.content_mask(res))[None],
            "layout_map": _to_tensor(layout_map),
            "layout_index": layout_index,
            "references": references,
            "reference_masks": reference_masks,
            "category_ids": torch.tensor([s["category_id"] for s in subjects], dtype=torch.int64),
            "ann_ids": torch.tensor([s["ann_id"] for s in subjects], dtype=torch.int64),
            "reference_ids": torch.tensor([s["reference_id"] for s in subjects], dtype=torch.int64),
            "boxes": torch.tensor([p.box for p in placed], dtype=torch.float32).reshape(len(placed), 4),
            "z_ranks": torch.tensor([p.z_rank for p in placed], dtype=torch.int64),
            "num_subjects": len(subjects),
            "prompt": scene["caption"],
            "image_id": int(scene["image_id"]),
            "epoch": epoch,
        }

    def _reference(self, subject: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        rgb_path, mask_path = self.root / subject["reference_file"], self.root / subject["reference_mask_file"]
        try:
            with Image.open(rgb_path) as rgb, Image.open(mask_path) as mask:
                return np.asarray(rgb.convert("RGB")), np.asarray(mask.convert("L")) > 127
        except OSError as e:
            raise OSError(f"MSI reference {subject['reference_id']}: cannot read {rgb_path} or its mask ({e})") from e


_PAD = {"category_ids": -1, "ann_ids": -1, "reference_ids": -1, "z_ranks": -1, "boxes": 0.0,
        "references": 0.0, "reference_masks": 0.0}  # fmt: skip


def collate_msi(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples with different K: per-subject tensors padded to the batch's largest K.

    ``subject_mask`` [B, K_max] is True for real subjects; padding is -1 for ids and ranks, 0 for boxes and images.
    """
    if not batch:
        raise ValueError("collate_msi needs at least one sample")
    k_max = max(s["num_subjects"] for s in batch)
    out: dict[str, Any] = {
        key: torch.stack([s[key] for s in batch]) for key in ("image", "content_mask", "layout_map", "layout_index")
    }
    for key, fill in _PAD.items():
        first = batch[0][key]
        padded = torch.full((len(batch), k_max, *first.shape[1:]), fill, dtype=first.dtype)
        for i, s in enumerate(batch):
            padded[i, : s["num_subjects"]] = s[key]
        out[key] = padded
    counts = torch.tensor([s["num_subjects"] for s in batch], dtype=torch.int64)
    out["subject_mask"] = torch.arange(k_max)[None, :] < counts[:, None]
    out["num_subjects"] = counts
    out["prompt"] = [s["prompt"] for s in batch]
    out["image_id"] = torch.tensor([s["image_id"] for s in batch], dtype=torch.int64)
    out["epoch"] = torch.tensor([s["epoch"] for s in batch], dtype=torch.int64)
    return out
