"""Sample grids during training: for fixed training scenes, one row ``target | layout input | sample``.

The samples go through :class:`MSCustomNetPipeline` exactly as ``msibench run`` does (reference squares, M_L built
from the boxes and masks, DDIM + CFG), from each scene's subjects at K_max (the last epoch's subset).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mscustomnet.data.dataset import MSIDataset
from mscustomnet.model.network import CustomNetModel
from mscustomnet.model.pipeline import MSCustomNetPipeline, Subject, layout_map
from mscustomnet.train.config import TrainConfig
from msibench.coco import CATEGORY_INDEX

SAMPLES_DIR = "samples"


def _pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] float in [0, 1] -> RGB."""
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def scene_subjects(sample: dict, resolution: int) -> list[Subject]:
    """A Dataset sample's subjects as pipeline inputs (normalised boxes, z order, contiguous category index)."""
    subjects = []
    for k in range(sample["num_subjects"]):
        box = (sample["boxes"][k] / resolution).clamp(0, 1).tolist()
        mask = (sample["reference_masks"][k, 0] > 0.5).numpy().astype(np.uint8) * 255
        subjects.append(
            Subject(
                reference=_pil(sample["references"][k]),
                mask=Image.fromarray(mask),
                box=tuple(box),
                z=int(sample["z_ranks"][k]),
                category_index=CATEGORY_INDEX[int(sample["category_ids"][k])],
            )
        )
    return subjects


@torch.no_grad()
def sample_grid(model: CustomNetModel, dataset: MSIDataset, config: TrainConfig, count: int) -> Image.Image:
    """The grid image for the first ``count`` scenes of ``dataset``."""
    res = config.data.resolution
    scenes = [dataset.sample(i, config.total_epochs) for i in range(min(count, len(dataset)))]
    rows = [scene_subjects(s, res) for s in scenes]
    s = config.samples
    was_training = model.training
    model.eval()
    autocast = (
        torch.autocast("cuda", dtype=torch.float16 if config.train.mixed_precision == "fp16" else torch.bfloat16)
        if model.device.type == "cuda" and config.train.mixed_precision != "no"
        else contextlib.nullcontext()
    )
    try:
        with autocast:
            images = MSCustomNetPipeline(model)(
                [sc["prompt"] for sc in scenes],
                rows,
                [s.seed + i for i in range(len(scenes))],
                steps=s.steps,
                guidance=s.guidance,
                resolution=res,
            )
    finally:
        model.train(was_training)
    grid = Image.new("RGB", (3 * res, len(scenes) * res), (0, 0, 0))
    for i, (scene, subjects, image) in enumerate(zip(scenes, rows, images, strict=True)):
        layout = layout_map(subjects, res) if model.config.use_layout else Image.new("RGB", (res, res), "white")
        for j, tile in enumerate((_pil(scene["image"]), layout, image.resize((res, res)))):
            grid.paste(tile, (j * res, i * res))
    return grid


def save_grid(grid: Image.Image, out: str | Path, global_step: int) -> Path:
    folder = Path(out) / SAMPLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{global_step:08d}.png"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".grid.", suffix=".png")
    os.close(fd)
    try:
        grid.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = ["SAMPLES_DIR", "sample_grid", "save_grid", "scene_subjects"]
