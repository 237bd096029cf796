from __future__ import annotations

import json

import pytest
import torch

from mscustomnet.model.config import tiny_config
from mscustomnet.model.network import CustomNetModel


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Fill every parameter with seeded noise: zero-initialised layers (proj_out, conv_out...) would hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


@pytest.fixture(name="randomize")
def _randomize_fixture():
    return randomize


@pytest.fixture
def tiny_customnet() -> CustomNetModel:
    torch.manual_seed(0)
    return randomize(CustomNetModel(tiny_config(multi_subject=False)), seed=1).eval()


@pytest.fixture
def tiny_ms() -> CustomNetModel:
    torch.manual_seed(0)
    return randomize(CustomNetModel(tiny_config()), seed=2).eval()


@pytest.fixture(scope="session")
def customnet_keys(checkpoint_keys_dir) -> dict[str, list[int]]:
    path = checkpoint_keys_dir / "customnet_v1.json"
    if not path.is_file():
        pytest.skip(f"CustomNet key list not found at {path}")
    return json.loads(path.read_text())["keys"]
