"""Sample grids during training: for fixed training scenes, one row ``target | layout input | sample``.

The samples go through :class:`MSCustomNetPipeline` exactly as ``msibench run`` does: each subject is handed over
as ``msibench run`` hands a benchmark subject (its reference cut-out at original size with its mask, its box
normalised to the canvas, its z rank, its category), so the pipeline builds the very layout map M_L the model trains
on (``MSIDataset.sample``) and cuts the reference squares as training does. The scenes use their subjects at K_max
(the last epoch's subset).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mscustomnet.data.dataset import MSIDataset
from mscustomnet.model.network import CustomNetModel
from mscustomnet.model.pipeline import MSCustomNetPipeline, Subject, layout_map
from mscustomnet.train.config import TrainConfig
from msibench.cache import mkstemp as umask_mkstemp
from msibench.coco import CATEGORY_INDEX

SAMPLES_DIR = "samples"


def _pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] float in [0, 1] -> RGB."""
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def scene_subjects(dataset: MSIDataset, index: int, epoch: int) -> list[Subject]:
    """Sample ``index`` of ``dataset`` at ``epoch`` as pipeline inputs: reference cut-outs at original size with their
    masks, boxes normalised to the training canvas (not clipped: the layout clips them as training does), z ranks and
    contiguous category indices."""
    res = dataset.resolution
    subjects = []
    for placed in dataset.placed_subjects(index, epoch):
        subjects.append(
            Subject(
                reference=Image.fromarray(placed.rgb),
                mask=Image.fromarray(placed.mask.astype(np.uint8) * 255),
                box=tuple(v / res for v in placed.box),
                z=placed.z_rank,
                category_index=CATEGORY_INDEX[int(placed.record["category_id"])],
            )
        )
    return subjects


@torch.no_grad()
def sample_grid(model: CustomNetModel, dataset: MSIDataset, config: TrainConfig, count: int) -> Image.Image:
    """The grid image for the first ``count`` scenes of ``dataset``."""
    res = config.data.resolution
    if dataset.resolution != res:
        raise ValueError(f"the dataset's resolution {dataset.resolution} is not data.resolution {res}")
    indices = range(min(count, len(dataset)))
    scenes = [dataset.sample(i, config.total_epochs) for i in indices]
    rows = [scene_subjects(dataset, i, config.total_epochs) for i in indices]
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
    fd, tmp = umask_mkstemp(folder, prefix=".grid.", suffix=".png")
    os.close(fd)
    try:
        grid.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = ["SAMPLES_DIR", "sample_grid", "save_grid", "scene_subjects"]
