from __future__ import annotations

import hashlib
import json

import pytest
import torch

from mscustomnet.model.config import ModelConfig, tiny_config
from mscustomnet.model.io import (
    WeightsNotFoundError,
    load_model,
    read_model_info,
    resolve_weights,
    save_model,
)
from mscustomnet.model.network import CustomNetModel
from msibench.methods.base import WeightsUnavailableError


def test_save_and_load_round_trip(tiny_ms, tmp_path):
    folder = save_model(tiny_ms, tmp_path / "m", run="unit-test")
    info = read_model_info(folder)
    assert ModelConfig.from_dict(info["config"]) == tiny_config()
    assert info["metadata"] == {"run": "unit-test"}
    assert info["weights_sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    loaded = load_model(folder)
    assert loaded.config == tiny_ms.config and not loaded.training
    ours, theirs = tiny_ms.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(b.device.type == "cpu" for b in loaded.buffers())
    assert not any(p.requires_grad for m in loaded.frozen_modules() for p in m.parameters())
    assert all(p.requires_grad for group in loaded.parameter_groups().values() for p in group)
    half = load_model(folder, dtype=torch.float16)
    assert half.unet.conv_in.weight.dtype == torch.float16
    assert half.alphas_cumprod().dtype == torch.float32


def test_missing_or_foreign_weights_are_named(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="no MS-CustomNet weights given. set X"):
        resolve_weights("", what="MS-CustomNet", hint="set X")
    with pytest.raises(WeightsNotFoundError, match="not a MS-CustomNet folder"):
        resolve_weights(str(tmp_path), what="MS-CustomNet")
    with pytest.raises(WeightsNotFoundError, match="no such folder"):
        resolve_weights(str(tmp_path / "absent"))
    # A hub id while offline (tests set HF_HUB_OFFLINE=1): the error names the id, the revision and the way out.
    with pytest.raises(WeightsNotFoundError, match=r"'someone/ms-customnet' \(revision abc123\).*set X"):
        resolve_weights("someone/ms-customnet", "abc123", what="MS-CustomNet", hint="set X")
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="config.json: not an mscustomnet-model folder"):
        load_model(tmp_path)


def test_weights_of_another_shape_are_refused_by_key(tiny_ms, tmp_path):
    save_model(tiny_ms, tmp_path)
    other = CustomNetModel.empty(tiny_config(multi_subject=False))
    state = tiny_ms.state_dict()
    with pytest.raises(KeyError, match="category_encoder"):
        other.load_weights(state)
    state = {k: v for k, v in tiny_ms.state_dict().items()}
    state["projection.weight"] = state["projection.weight"][:, :-1]
    fresh = CustomNetModel.empty(tiny_config())
    with pytest.raises(ValueError, match="projection.weight"):
        fresh.load_weights(state)
