"""The training configuration: the shipped configs, validation messages, the DST and CLSQ schedules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mscustomnet.train.config import ConfigError, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ABLATIONS = ["baseline", "ml", "ml_dst", "full"]
MINIMAL = {"data": {"msi": "msi"}, "model": {"init": "weights"}}


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_full_config_holds_the_paper_settings():
    config = load_config(CONFIGS / "mscustomnet.yaml")
    t, c = config.train, config.curriculum
    assert [(s.epochs, s.lr) for s in t.stages] == [(7, 1e-4), (3, 5e-5)]
    assert (c.enabled, c.k_min, c.k_max, c.gamma) == (True, 2, 5, 1.0)
    assert (t.mixed_precision, t.effective_batch, t.per_gpu_batch, t.grad_checkpointing) == ("fp16", 4, 2, True)
    assert t.text_attention_lr_scale == 10
    assert config.model.use_layout and config.data.resolution == 256
    # 2 V100s: no accumulation; one GPU accumulates 2 micro-batches to keep the effective batch at 4.
    assert (config.grad_accum_for(2), config.grad_accum_for(1)) == (1, 2)
    assert config.to_dict() == load_config(CONFIGS / "full.yaml").to_dict()


def test_dst_lr_and_curriculum_k_per_epoch():
    config = load_config(CONFIGS / "mscustomnet.yaml")
    assert [config.lr_for_epoch(e) for e in range(1, 11)] == [1e-4] * 7 + [5e-5] * 3
    assert [config.stage_of_epoch(e) for e in range(1, 11)] == [0] * 7 + [1] * 3
    # K(e) = 2 + floor(e / 10 * 3): 2 until 0.3, 3 from 0.4, 4 from 0.7, K_max at the last epoch.
    assert [config.k_for_epoch(e) for e in range(1, 11)] == [2, 2, 2, 3, 3, 3, 4, 4, 4, 5]
    no_clsq = load_config(CONFIGS / "ml_dst.yaml")
    assert [no_clsq.k_for_epoch(e) for e in range(1, 11)] == [5] * 10
    steep = config_from_dict({**MINIMAL, "curriculum": {"gamma": 2.0}})
    assert [steep.k_for_epoch(e) for e in range(1, 11)] == [2, 2, 2, 2, 2, 3, 3, 3, 4, 5]
    with pytest.raises(ValueError, match="epoch must be in 1..10"):
        config.lr_for_epoch(11)


def test_ablation_configs_differ_only_in_their_switches():
    flat = {name: _flat(load_config(CONFIGS / f"{name}.yaml").to_dict()) for name in ABLATIONS}
    switch = {("baseline", "ml"): {"model.use_layout"}, ("ml", "ml_dst"): {"train.stages"},
              ("ml_dst", "full"): {"curriculum.enabled"}}  # fmt: skip
    for (a, b), keys in switch.items():
        changed = {k for k in flat[a] if flat[a][k] != flat[b][k]}
        assert changed == keys, (a, b, changed)
    base = load_config(CONFIGS / "baseline.yaml")
    assert not base.model.use_layout and len(base.train.stages) == 1 and not base.curriculum.enabled
    assert {load_config(CONFIGS / f"{n}.yaml").total_epochs for n in ABLATIONS} == {10}


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, source="cfg.yaml")
    return str(info.value)


def test_validation_messages_name_file_and_key():
    assert _error({**MINIMAL, "train": {"lr": 1e-4}}).startswith("cfg.yaml: unknown key train.lr")
    assert _error({"data": {"msi": "m"}}) == "cfg.yaml: missing key model"
    assert _error({"data": {}, "model": {"init": "w"}}) == "cfg.yaml: missing key data.msi"
    msg = _error({**MINIMAL, "train": {"per_gpu_batch": "two"}})
    assert msg == "cfg.yaml: train.per_gpu_batch: expected an integer, got str 'two'"
    assert "train.stages[1].lr" in _error(
        {**MINIMAL, "train": {"stages": [{"epochs": 1, "lr": 1}, {"epochs": 1, "lr": "x"}]}}
    )
    assert "train.stages[0].epochs: must be >= 1" in _error({**MINIMAL, "train": {"stages": [{"epochs": 0, "lr": 1}]}})
    assert "unknown key train.stages[0].warmup" in _error(
        {**MINIMAL, "train": {"stages": [{"epochs": 1, "lr": 1, "warmup": 5}]}}
    )
    assert "model.use_layout: expected true or false" in _error({**MINIMAL, "model": {"init": "w", "use_layout": 1}})
    assert "train.mixed_precision: must be one of" in _error({**MINIMAL, "train": {"mixed_precision": "fp8"}})
    assert "train.grad_accum: must be an integer or 'auto'" in _error({**MINIMAL, "train": {"grad_accum": "many"}})
    assert "curriculum.k_min" in _error({**MINIMAL, "curriculum": {"k_min": 4, "k_max": 3}})
    assert "data.reference_object_size" in _error({"data": {"msi": "m", "reference_object_size": 300},
                                                   "model": {"init": "w"}})  # fmt: skip
    assert "train.effective_batch: 4 is not a multiple" in _error({**MINIMAL, "train": {"per_gpu_batch": 3}})


def test_effective_batch_is_checked_against_the_world_size():
    config = config_from_dict({**MINIMAL, "train": {"per_gpu_batch": 1}}, source="cfg.yaml")
    assert [config.grad_accum_for(w) for w in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ConfigError, match=r"cfg.yaml: train.effective_batch: 4 cannot be split .* 3 GPU"):
        config.grad_accum_for(3)
    fixed = config_from_dict({**MINIMAL, "train": {"per_gpu_batch": 2, "grad_accum": 2}}, source="cfg.yaml")
    assert fixed.grad_accum_for(1) == 2
    with pytest.raises(ConfigError, match=r"cfg.yaml: train.grad_accum: .* 2 GPU\(s\) x grad_accum 2 = 8"):
        fixed.grad_accum_for(2)


def test_yaml_files(tmp_path: Path):
    path = tmp_path / "x.yaml"
    # PyYAML reads 1e-4 (no dot) as a string; a plain number string is taken as the number it spells.
    path.write_text("data: {msi: m}\nmodel: {init: w}\ntrain:\n  stages: [{epochs: 2, lr: 1e-4}]\n")
    assert load_config(path).train.stages[0].lr == 1e-4
    assert load_config(path).source == str(path)
    path.write_text("data: {msi: m}\nmodel: {init: w}\ntrain: {stages: [{epochs: 2, lr: fast}]}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: train.stages\[0\].lr: expected a number, got str 'fast'"):
        load_config(path)
    path.write_text("data: {msi: m\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_resume_fingerprint_ignores_only_harmless_keys():
    a = config_from_dict(MINIMAL)
    b = config_from_dict({"data": {"msi": "elsewhere", "workers": 9}, "model": {"init": "weights"},
                          "train": {"max_steps": 5, "log_every": 7}, "samples": {"every": 3}})  # fmt: skip
    assert a.resume_fingerprint() == b.resume_fingerprint()
    c = config_from_dict({**MINIMAL, "train": {"stages": [{"epochs": 7, "lr": 2e-4}, {"epochs": 3, "lr": 5e-5}]}})
    assert a.resume_fingerprint() != c.resume_fingerprint()


def test_reading_configs_and_the_cli_import_no_torch():
    code = (
        "import sys; import mscustomnet.cli; from mscustomnet.train import load_config; "
        f"load_config({str(CONFIGS / 'mscustomnet.yaml')!r}); "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'train' in mscustomnet.cli.main.commands"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
