"""CLIP image preprocessing on transformers 4's PIL path (baselines.clip_pixels), the same on every version.

The expected values were computed by ``CLIPImageProcessor(size={"shortest_edge": 12}, crop_size=12x12)`` of
transformers 4.46.3 (the PIL path the official IP-Adapter / SSR-Encoder / λ-ECLIPSE code ran:
``models/clip/image_processing_clip.py`` ``preprocess`` -> ``image_transforms.resize`` with PIL bicubic,
``center_crop``, ``rescale`` in float64, ``normalize``) and are written out here. transformers 5 gives 0.0038 instead
of 0.0188 at [1, 3, 1] and 0.2953 instead of 0.3099 at [0, 1, 11] for the same image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from baselines.clip_pixels import PILCLIPImageProcessor, clip_pixels, pil_clip_processor


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(711).integers(0, 256, (7, 11, 3), dtype=np.uint8))


ROW_0_1 = [0.368305, 0.324509, -0.60979, -0.682782, -0.405412, -0.317821, 0.266116, 1.171218, 0.704068, 0.032541,
           -0.040451, 0.309911]  # fmt: skip


def test_pixels_are_transformers_4s_pil_path():
    pixels = clip_pixels([_image()], shortest_edge=12, crop=(12, 12))
    assert pixels.shape == (1, 3, 12, 12) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[0, 0, 1], torch.tensor(ROW_0_1), atol=1e-6, rtol=0)
    assert abs(float(pixels[0, 1, 3, 1]) - 0.01881953) < 1e-6
    assert abs(float(pixels[0, 2, 5, 9]) - 1.1220524) < 1e-6
    sums = [round(float(pixels[0, c].sum()), 4) for c in range(3)]
    assert sums == pytest.approx([27.57621, 24.06607, 67.16852], abs=1e-3)


def test_the_processor_object_gives_the_same_pixels_and_keeps_a_loaded_configuration():
    from transformers import CLIPImageProcessor

    expected = clip_pixels([_image()], shortest_edge=12, crop=(12, 12))
    processor = pil_clip_processor(12)
    assert isinstance(processor, CLIPImageProcessor)  # diffusers checks a feature_extractor's class
    assert torch.equal(processor(images=[_image()], return_tensors="pt").pixel_values, expected)
    assert torch.equal(processor(_image(), return_tensors="pt").pixel_values, expected)  # diffusers' call
    # A configuration as the Kandinsky prior's image_processor/preprocessor_config.json states it (ints).
    loaded = CLIPImageProcessor.from_dict({"size": 12, "crop_size": 12, "resample": 3, "do_center_crop": True})
    assert torch.equal(PILCLIPImageProcessor.like(loaded)(images=[_image()]).pixel_values, expected)
    # Short side first: a portrait image is resized to 12 x int(12 * 11 / 7) = 12 x 18, then centre-cropped.
    portrait = _image().transpose(Image.Transpose.ROTATE_90)
    rotated = clip_pixels([portrait], shortest_edge=12, crop=(12, 12))
    assert rotated.shape == (1, 3, 12, 12)
    with pytest.raises(TypeError, match="no overrides"):
        processor(images=[_image()], do_resize=False)
