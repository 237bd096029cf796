"""Identity and background similarity: subject crops, reference features (cached on disk) and cosines.

DINO-I and CLIP-I compare a reference cut-out (white background, as materialized by ``msibench data prepare``)
with the subject's crop in the generated image. Crop modes (``--identity-crop``):

- ``category`` (default, layout-free): the box of a detection of the subject's category, wherever it was drawn:
  :func:`msibench.scoring.match.find_subjects` picks which detections stand for a category's subjects (the
  detection overlapping a target box first, else the most confident remaining ones); the scorer then pairs them
  with the category's subjects by appearance (``--identity-pairing appearance``, the default) or keeps the
  positional assignment (``position``). A subject not found (fewer instances of its category detected than asked
  for) has no crop and scores 0: cropping the whole image instead gave a method that draws nothing a similarity
  above that of a failed generation.
- ``matched`` (layout-bound): the detection matched to the target box (IoU >= 0.1), else not found (0).
- ``target``: always the target box; ``full``: always the whole image (diagnostics).

Reference features are cached under ``$MSIBENCH_CACHE/features/`` keyed by the encoder identity (model weights +
preprocessing version) and the sha256 of the reference file, so a changed model, preprocessing or reference
never reuses a stale feature.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from msibench.cache import atomic_write_bytes, cache_dir

if TYPE_CHECKING:
    from PIL import Image

    from msibench.scoring.backbones import ImageEncoder

logger = logging.getLogger(__name__)

CROP_MODES = ("category", "matched", "target", "full")
CLIP_B_MODES = ("full", "masked")
# Grey that replaces the subjects' boxes for ``--clip-b-mode masked``.
MASK_GREY = (128, 128, 128)


def pixel_box(box: Sequence[float], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Normalized xyxy -> the smallest integer pixel box covering it, clipped, at least 1x1."""
    w, h = image_size
    # 1e-6 px absorbs float noise (0.6 * 10 = 6.000000000000001 must not reach pixel 7)
    x0 = min(max(math.floor(box[0] * w + 1e-6), 0), w - 1)
    y0 = min(max(math.floor(box[1] * h + 1e-6), 0), h - 1)
    x1 = max(min(math.ceil(box[2] * w - 1e-6), w), x0 + 1)
    y1 = max(min(math.ceil(box[3] * h - 1e-6), h), y0 + 1)
    return x0, y0, x1, y1


def crop(image: Image.Image, box: Sequence[float] | None) -> Image.Image:
    """The region ``box`` (normalized xyxy) of ``image``; the whole image when ``box`` is None."""
    image = image.convert("RGB")
    if box is None:
        return image
    return image.crop(pixel_box(box, image.size))


def grey_out(image: Image.Image, boxes: Sequence[Sequence[float]]) -> Image.Image:
    """A copy of ``image`` with every box filled with :data:`MASK_GREY` (CLIP-B ``masked`` mode)."""
    from PIL import ImageDraw

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    for box in boxes:
        x0, y0, x1, y1 = pixel_box(box, out.size)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=MASK_GREY)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two feature vectors (the encoders already return unit vectors; normalized again for safety)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else 0.0


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FeatureCache:
    """Features on disk: ``<root>/<sha of encoder identity>/<reference sha256>.npy`` plus ``identity.json``."""

    def __init__(self, root: str | Path | None = None) -> None:
        self._root = Path(root) if root is not None else None

    @property
    def root(self) -> Path:
        # Resolved at use time, so $MSIBENCH_CACHE set after construction is honoured.
        return self._root if self._root is not None else cache_dir() / "features"

    def _folder(self, identity: str) -> Path:
        return self.root / hashlib.sha256(identity.encode()).hexdigest()[:16]

    def get(self, identity: str, checksum: str) -> np.ndarray | None:
        path = self._folder(identity) / f"{checksum}.npy"
        if not path.is_file():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:  # a torn file from another process: recompute it
            logger.warning("%s: unreadable cached feature (%s); recomputing", path, err)
            return None

    def put(self, identity: str, checksum: str, feature: np.ndarray) -> None:
        folder = self._folder(identity)
        meta = folder / "identity.json"
        if not meta.is_file():
            atomic_write_bytes(meta, (json.dumps({"identity": identity}, indent=1) + "\n").encode())
        buf = io.BytesIO()
        np.save(buf, np.asarray(feature, dtype=np.float32), allow_pickle=False)
        atomic_write_bytes(folder / f"{checksum}.npy", buf.getvalue())


def reference_features(
    encoder: ImageEncoder,
    references: dict[str, Image.Image],
    cache: FeatureCache | None = None,
) -> dict[str, np.ndarray]:
    """Features of reference images keyed by their checksum; cached ones are read, the rest encoded in batches."""
    out: dict[str, np.ndarray] = {}
    missing = []
    for checksum, image in references.items():
        hit = cache.get(encoder.identity, checksum) if cache is not None else None
        if hit is not None:
            out[checksum] = hit
        else:
            missing.append((checksum, image))
    if missing:
        feats = encoder.encode([image for _, image in missing])
        for (checksum, _), feat in zip(missing, feats, strict=True):
            out[checksum] = feat
            if cache is not None:
                cache.put(encoder.identity, checksum, feat)
    logger.debug("%s: %d reference features cached, %d computed", encoder.name, len(out) - len(missing), len(missing))
    return out
