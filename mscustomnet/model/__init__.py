"""The CustomNet / MS-CustomNet network on current torch + diffusers.

- ``config``: :class:`ModelConfig` and ``customnet_config()`` / ``mscustomnet_config()`` / ``tiny_config()``;
- ``network``: :class:`CustomNetModel` (encoders, subject tokens, ``predict_noise``, ``training_loss``);
- ``unet``: the dual (subject + text) cross-attention processor;
- ``convert``: the official ``customnet_v1.pt`` -> our folder (``mscustomnet convert-customnet``);
- ``pipeline``: DDIM + classifier-free guidance, :class:`MSCustomNetPipeline`, :class:`CustomNetPipeline`;
- ``io``: our folder format (config.json + model.safetensors), by local path or hub id + revision.

Names are imported lazily so that reading a config never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from mscustomnet.model.config import ModelConfig, customnet_config, mscustomnet_config, tiny_config

_LAZY = {
    "CustomNetModel": "mscustomnet.model.network",
    "LossOutput": "mscustomnet.model.network",
    "CustomNetPipeline": "mscustomnet.model.pipeline",
    "MSCustomNetPipeline": "mscustomnet.model.pipeline",
    "Subject": "mscustomnet.model.pipeline",
    "load_model": "mscustomnet.model.io",
    "save_model": "mscustomnet.model.io",
    "WeightsNotFoundError": "mscustomnet.model.io",
    "convert_customnet": "mscustomnet.model.convert",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ModelConfig", "customnet_config", "mscustomnet_config", "tiny_config", *_LAZY]
