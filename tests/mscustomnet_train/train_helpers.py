"""Tiny training configurations for the trainer tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from mscustomnet.train.config import TrainConfig, config_from_dict

TINY_RESOLUTION = 32


def tiny_dict(msi: Path, init: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A tiny training configuration as YAML-like data; ``sections`` update its sections key by key."""
    data: dict[str, Any] = {
        "data": {"msi": str(msi), "resolution": TINY_RESOLUTION, "reference_resolution": TINY_RESOLUTION,
                 "reference_object_size": 25, "workers": 0, "max_scenes": 4},
        "model": {"init": str(init), "category_dim": 16},
        "train": {"stages": [{"epochs": 1, "lr": 1e-3}, {"epochs": 2, "lr": 5e-4}], "effective_batch": 2,
                  "per_gpu_batch": 1, "mixed_precision": "no", "grad_checkpointing": False, "checkpoint_every": None,
                  "keep_checkpoints": 5},
        "curriculum": {"enabled": True, "k_min": 2, "k_max": 4, "gamma": 1.0},
        "samples": {"every": None, "count": 2, "steps": 2},
    }  # fmt: skip
    data = copy.deepcopy(data)
    for section, values in sections.items():
        data[section].update(values)
    return data


def tiny_train_config(msi: Path, init: Path, **sections: dict[str, Any]) -> TrainConfig:
    return config_from_dict(tiny_dict(msi, init, **sections), source="tiny test config")
