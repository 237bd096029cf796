"""Training MS-CustomNet: ``mscustomnet train --config configs/mscustomnet.yaml`` (``torchrun`` for several GPUs).

- ``config``: the YAML configuration as a validated frozen dataclass tree (no torch import);
- ``trainer``: the loop (AdamW, Dual Stage Training, CLSQ, AMP, accumulation, DDP, exact resume);
- ``checkpoint``: checkpoint files and RNG states; ``logger``: log.csv / TensorBoard; ``samples``: sample grids;
- ``distributed``: the torchrun process layout; ``command``: the click command.

Names are imported lazily so that reading a configuration never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from mscustomnet.train.config import ConfigError, TrainConfig, config_from_dict, load_config

_LAZY = {
    "Trainer": "mscustomnet.train.trainer",
    "TrainResult": "mscustomnet.train.trainer",
    "train": "mscustomnet.train.trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConfigError", "TrainConfig", "config_from_dict", "load_config", *_LAZY]
