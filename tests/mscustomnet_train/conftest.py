"""Fixtures of the trainer tests: a tiny CustomNet folder (built in code) and a small real MSI build from
coco2017-mini val2017. Tiny training configurations are in train_helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mscustomnet.data.build import BuildConfig, build_msi
from mscustomnet.model.io import init_tiny


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on 2 shared cores run fastest (and reproducibly) single-threaded.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_customnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted-CustomNet-style model folder of the tiny configuration (what model.init names): what
    `mscustomnet init --tiny` writes."""
    return init_tiny(tmp_path_factory.mktemp("tiny_customnet"), seed=0)


@pytest.fixture(scope="session")
def msi_val(coco_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MSI build of the real val2017 slice, kept small: scenes with >= 8 salient subjects (9 kept, 6 written: a
    scene never gets the same reference twice, and the slice has too few usable oranges, sheep and suitcases for the
    other three), default pools."""
    out = tmp_path_factory.mktemp("msi_val")
    build_msi(BuildConfig(coco_root=coco_root, split="val2017", out=out, alpha=8), progress=False)
    return out
