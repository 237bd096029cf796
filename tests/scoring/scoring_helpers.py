"""Helpers shared by the scoring tests (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib

import numpy as np


def image_key(image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def stats_encoder(name: str = "test-stats-v1"):
    """A cheap deterministic identity backbone: per-channel mean and std of the preprocessed crop."""
    from msibench.scoring.backbones import image_encoder_from_callable

    def fn(x):
        import torch

        flat = x.flatten(2)
        return torch.cat([flat.mean(-1), flat.std(-1)], dim=1)

    return image_encoder_from_callable(fn, name=name)
