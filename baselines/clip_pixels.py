"""CLIP image preprocessing on the PIL path, the same pixels on every transformers version.

The official code of IP-Adapter, SSR-Encoder and λ-ECLIPSE ran ``CLIPImageProcessor`` of transformers 4, which
resizes with PIL. Under transformers 5 the same class resizes with torchvision, and the pixels move (by up to
0.195 after normalisation on the 268 MSIBench v1 references at 224 px; this module: 0.0). :func:`clip_pixels`
is the transformers 4 algorithm written out (``transformers/models/clip/image_processing_clip.py``
``preprocess`` with ``image_transforms.resize``, ``center_crop``, ``rescale``, ``normalize`` of transformers 4.46):

1. ``convert("RGB")``;
2. resize so the short side is ``shortest_edge`` and the long side ``int(shortest_edge * long / short)``
   (truncated), PIL ``Image.resize(..., resample)`` on the uint8 image, ``reducing_gap=None``;
3. centre crop: top = (h - crop_h) // 2, left = (w - crop_w) // 2;
4. ``uint8.astype(float64) * (1/255)`` cast to float32;
5. ``(x - mean) / std`` in float32, channels first.

:class:`PILCLIPImageProcessor` is a ``CLIPImageProcessor`` (diffusers checks a pipeline's ``feature_extractor``
type) whose ``preprocess`` is :func:`clip_pixels` with the processor's own configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, CLIPImageProcessor

#: transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (CLIPImageProcessor() defaults).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _resize_short_side(image: Image.Image, shortest_edge: int, resample: Image.Resampling) -> Image.Image:
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    size = (shortest_edge, new_long) if width <= height else (new_long, shortest_edge)
    return image.resize(size, resample=resample, reducing_gap=None)


def _centre_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if crop_h > h or crop_w > w:
        # transformers pads a smaller image with zeros around it before cropping; never reached when the short
        # side is resized to at least the crop, as in every CLIP configuration used here.
        padded = np.zeros((max(h, crop_h), max(w, crop_w), arr.shape[2]), dtype=arr.dtype)
        top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
        padded[top : top + h, left : left + w] = arr
        arr, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return arr[top : top + crop_h, left : left + crop_w]


def clip_pixels(
    images: Sequence[Image.Image],
    shortest_edge: int = 224,
    crop: tuple[int, int] = (224, 224),
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    resample: int = Image.Resampling.BICUBIC,
    rescale_factor: float = 1 / 255,
    do_resize: bool = True,
    do_center_crop: bool = True,
    do_normalize: bool = True,
) -> torch.Tensor:
    """float32 pixel values [N, 3, crop_h, crop_w] as transformers 4's ``CLIPImageProcessor`` computes them."""
    out = []
    mean32, std32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    for image in images:
        image = image.convert("RGB")
        if do_resize:
            image = _resize_short_side(image, int(shortest_edge), Image.Resampling(int(resample)))
        arr = np.array(image)
        if do_center_crop:
            arr = _centre_crop(arr, int(crop[0]), int(crop[1]))
        x = (arr.astype(np.float64) * rescale_factor).astype(np.float32)
        if do_normalize:
            x = (x - mean32) / std32
        out.append(np.ascontiguousarray(x.transpose(2, 0, 1)))
    return torch.from_numpy(np.stack(out))


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _edge(size: Any) -> int:
    """The short-side target of a ``size`` setting (an int, or a dict with shortest_edge / height)."""
    if isinstance(size, int):
        return size
    for key in ("shortest_edge", "height"):
        value = _get(size, key)
        if value is not None:
            return int(value)
    raise ValueError(f"CLIP image processor: cannot read a short-side size from {size!r}")


def _crop(crop_size: Any) -> tuple[int, int]:
    if isinstance(crop_size, int):
        return crop_size, crop_size
    return int(_get(crop_size, "height")), int(_get(crop_size, "width"))


def _resample(value: Any) -> int:
    if value is None:
        return int(Image.Resampling.BICUBIC)
    return int(getattr(value, "value", value))


class PILCLIPImageProcessor(CLIPImageProcessor):
    """A ``CLIPImageProcessor`` that always preprocesses on transformers 4's PIL path (:func:`clip_pixels`)."""

    @classmethod
    def like(cls, processor: CLIPImageProcessor) -> PILCLIPImageProcessor:
        """The same configuration as ``processor`` (e.g. one loaded with ``from_pretrained``), on the PIL path."""
        keys = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor")
        keys += ("do_normalize", "image_mean", "image_std", "do_convert_rgb")
        settings = {k: getattr(processor, k) for k in keys if getattr(processor, k, None) is not None}
        if not settings.get("do_rescale", True):
            raise ValueError("CLIP image processor without rescaling: not a configuration of the official code")
        return cls(**{k: (dict(v) if hasattr(v, "keys") else v) for k, v in settings.items()})

    def preprocess(self, images: Any, return_tensors: Any = None, **kwargs: Any) -> BatchFeature:
        if kwargs:
            raise TypeError(f"PILCLIPImageProcessor.preprocess takes no overrides, got {sorted(kwargs)}")
        if isinstance(images, Image.Image):
            images = [images]
        pixels = clip_pixels(
            list(images),
            shortest_edge=_edge(self.size),
            crop=_crop(self.crop_size),
            mean=tuple(self.image_mean),
            std=tuple(self.image_std),
            resample=_resample(self.resample),
            rescale_factor=float(self.rescale_factor),
            do_resize=bool(self.do_resize),
            do_center_crop=bool(self.do_center_crop),
            do_normalize=bool(self.do_normalize),
        )
        return BatchFeature({"pixel_values": pixels})


def pil_clip_processor(size: int) -> PILCLIPImageProcessor:
    """``CLIPImageProcessor()`` defaults at ``size`` (short side resized bicubic, centre crop, OpenAI mean/std)."""
    return PILCLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "PILCLIPImageProcessor", "clip_pixels", "pil_clip_processor"]
