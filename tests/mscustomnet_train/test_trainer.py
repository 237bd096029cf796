"""The training loop on a tiny model and a real MSI build from coco2017-mini."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import TINY_RESOLUTION, tiny_train_config

from mscustomnet.model.io import load_model
from mscustomnet.train.checkpoint import find_checkpoint, load_checkpoint
from mscustomnet.train.config import ConfigError
from mscustomnet.train.logger import read_log
from mscustomnet.train.trainer import train


def _trainable(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_dst_lr_and_curriculum_k_per_epoch(msi_val, tiny_customnet_dir, tmp_path):
    # 4 scenes, effective batch 2 = 1 x 1 process x 2 accumulated: 2 steps per epoch; stages 1 + 2 epochs.
    config = tiny_train_config(msi_val, tiny_customnet_dir)
    result = train(config, tmp_path / "run")
    assert result.finished and result.global_step == 6 and result.epoch == 3
    rows = read_log(tmp_path / "run" / "log.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in rows] == [1, 1, 2, 2, 3, 3]
    assert [r["stage"] for r in rows] == [1, 1, 2, 2, 2, 2]
    assert [r["lr"] for r in rows] == [1e-3, 1e-3, 5e-4, 5e-4, 5e-4, 5e-4]
    # K(e) = 2 + floor(e/3 * 2) = 2, 3, 4, and the scenes (>= 8 salient subjects each) really carry K subjects.
    assert [r["k"] for r in rows] == [2, 2, 3, 3, 4, 4]
    assert [r["subjects"] for r in rows] == [2, 2, 3, 3, 4, 4]
    assert [config.lr_for_epoch(r["epoch"]) for r in rows] == [r["lr"] for r in rows]
    # The text-attention projections train at 10x the stage lr (CustomNet's learning_rate_scale).
    state = load_checkpoint(find_checkpoint(tmp_path / "run", "latest"))
    lrs = {g["name"]: g["lr"] for g in state["optimizer"]["param_groups"]}
    assert lrs == {"text_attention": pytest.approx(5e-3), "unet": 5e-4, "projection": 5e-4}
    assert state["progress"] == {"epoch": 3, "steps_done_in_epoch": 2, "global_step": 6, "steps_per_epoch": 2}

    no_clsq = tiny_train_config(msi_val, tiny_customnet_dir, curriculum={"enabled": False}, train={"max_steps": 2})
    train(no_clsq, tmp_path / "flat")
    assert [r["subjects"] for r in read_log(tmp_path / "flat" / "log.csv")] == [4, 4]


def test_loss_goes_down_on_two_fixed_samples(msi_val, tiny_customnet_dir, tmp_path):
    # Two scenes with all their subjects (k_max above any scene's count, no curriculum): the same two samples every
    # step; 30 steps of 2 (accumulated 1 + 1) at lr 1e-3.
    config = tiny_train_config(
        msi_val,
        tiny_customnet_dir,
        data={"max_scenes": 2},
        train={"stages": [{"epochs": 30, "lr": 1e-3}]},
        curriculum={"enabled": False, "k_max": 16},
    )
    result = train(config, tmp_path / "run")
    assert result.global_step == 30
    rows = read_log(tmp_path / "run" / "log.csv")
    scenes = [json.loads(line) for line in (msi_val / "manifest.jsonl").read_text().splitlines()[:2]]
    assert {r["subjects"] for r in rows} == {max(len(s["subjects"]) for s in scenes)}  # whole scenes every step
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < 0.6 * first, (first, last, result.losses)


def _assert_same_trainable(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(find_checkpoint(a, "latest")), load_checkpoint(find_checkpoint(b, "latest"))
    assert sa["progress"] == sb["progress"]
    for name, tensor in sa["model"].items():
        assert torch.equal(tensor, sb["model"][name]), name
    for key, value in sa["optimizer"]["state"].items():
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(value[field], sb["optimizer"]["state"][key][field]), (key, field)
    assert sa["scaler"] == sb["scaler"]


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_resume_continues_exactly(msi_val, tiny_customnet_dir, tmp_path, precision):
    config = tiny_train_config(msi_val, tiny_customnet_dir, train={"mixed_precision": precision})
    whole = train(config, tmp_path / "whole")
    assert whole.global_step == 6

    # Stop after step 3: in the middle of epoch 2, after the stage change; resume with new objects (model rebuilt
    # from model.init, fresh optimizer) and a changed max_steps (allowed: it changes nothing it trains).
    first = train(dataclasses.replace(config, train=dataclasses.replace(config.train, max_steps=3)), tmp_path / "cut")
    assert (first.global_step, first.epoch, first.finished) == (3, 2, False)
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint's RNG states must win
    rest = train(config, tmp_path / "cut", resume="latest")
    assert rest.finished and rest.global_step == 6
    assert first.losses + rest.losses == whole.losses  # bitwise on CPU
    _assert_same_trainable(tmp_path / "whole", tmp_path / "cut")
    whole_rows, cut_rows = read_log(tmp_path / "whole" / "log.csv"), read_log(tmp_path / "cut" / "log.csv")
    timing = ("samples_per_s", "time_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in cut_rows] == [
        {k: v for k, v in r.items() if k not in timing} for r in whole_rows
    ]
    a, b = _trainable(tmp_path / "whole" / "model"), _trainable(tmp_path / "cut" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_an_older_checkpoint_drops_later_log_rows(msi_val, tiny_customnet_dir, tmp_path):
    config = tiny_train_config(msi_val, tiny_customnet_dir)
    whole = train(config, tmp_path / "run")
    step2 = tmp_path / "run" / "checkpoints" / "step-00000002"
    again = train(config, tmp_path / "run", resume=step2)
    assert again.losses == whole.losses[2:]
    assert [r["step"] for r in read_log(tmp_path / "run" / "log.csv")] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_changed_configuration(msi_val, tiny_customnet_dir, tmp_path):
    config = tiny_train_config(msi_val, tiny_customnet_dir, train={"max_steps": 1})
    train(config, tmp_path / "run")
    changed = tiny_train_config(msi_val, tiny_customnet_dir, train={"stages": [{"epochs": 3, "lr": 1e-3}]})
    with pytest.raises(ConfigError, match=r"tiny test config: cannot resume .*train.stages"):
        train(changed, tmp_path / "run", resume="latest")
    with pytest.raises(FileExistsError, match="already holds a run with checkpoints: continue it with --resume"):
        train(config, tmp_path / "run")
    # --resume latest before any checkpoint starts fresh (test_resume_latest_before_the_first_checkpoint_...)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        train(config, tmp_path / "run", resume=tmp_path / "nope")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt: not a readable training checkpoint"):
        train(config, tmp_path / "run", resume=broken)


def _cpu_autocast_supported(dtype: torch.dtype) -> str | None:
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.nn.functional.conv2d(torch.randn(1, 2, 4, 4), torch.randn(2, 2, 3, 3))
        torch.amp.GradScaler("cpu")
    except (RuntimeError, TypeError, AttributeError) as err:
        return f"this torch has no CPU autocast {dtype} / CPU GradScaler: {err}"
    return None


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_cpu(msi_val, tiny_customnet_dir, tmp_path, precision):
    reason = _cpu_autocast_supported(torch.float16 if precision == "fp16" else torch.bfloat16)
    if reason:
        pytest.skip(reason)
    config = tiny_train_config(msi_val, tiny_customnet_dir, train={"mixed_precision": precision, "max_steps": 3})
    result = train(config, tmp_path / "run")
    assert result.global_step == 3 and all(np.isfinite(result.losses))
    scales = [r["grad_scale"] for r in read_log(tmp_path / "run" / "log.csv")]
    state = load_checkpoint(find_checkpoint(tmp_path / "run", "latest"))
    if precision == "fp16":  # GradScaler on: its scale is logged and checkpointed
        assert scales[0] == 65536.0 and state["scaler"]["scale"] == scales[-1]
    else:  # bf16 needs no loss scaling
        assert scales == [1.0, 1.0, 1.0] and state["scaler"] == {}
    # Master weights stay float32 under autocast.
    assert all(t.dtype == torch.float32 for t in state["model"].values())


def test_only_trainable_parts_change(msi_val, tiny_customnet_dir, tmp_path):
    config = tiny_train_config(msi_val, tiny_customnet_dir, train={"max_steps": 2, "grad_checkpointing": True})
    result = train(config, tmp_path / "run")
    init = load_file(str(tiny_customnet_dir / "model.safetensors"))
    trained = _trainable(result.model_dir)
    frozen = ("vae.", "image_encoder.", "text_encoder.")
    for name, tensor in trained.items():
        if name.startswith(frozen):
            assert torch.equal(tensor, init[name]), name
    assert not torch.equal(trained["unet.conv_in.weight"], init["unet.conv_in.weight"])
    # F_proj grew category columns (zero at step 0) that training moved; Phi_c trains too.
    width = init["projection.weight"].shape[1]
    assert trained["projection.weight"][:, width:].abs().sum() > 0
    state = load_checkpoint(result.checkpoint)
    assert not any(name.startswith(frozen) for name in state["model"])
    assert {"category_encoder.weight", "projection.weight"} <= set(state["model"])
    model = load_model(result.model_dir)
    assert model.config.multi_subject and model.config.use_layout and model.config.category_dim == 16


def test_sample_grids(msi_val, tiny_customnet_dir, tmp_path):
    config = tiny_train_config(msi_val, tiny_customnet_dir, train={"max_steps": 2}, samples={"every": 2, "count": 2})
    train(config, tmp_path / "run")
    grid = Image.open(tmp_path / "run" / "samples" / "step-00000002.png")
    r = TINY_RESOLUTION
    assert grid.size == (3 * r, 2 * r)  # rows: target | layout | sample
    arr = np.asarray(grid.convert("RGB"))
    layout = arr[:r, r : 2 * r]
    assert (layout == 0).all(axis=-1).mean() > 0.2 and (layout != 0).any()  # M_L: subjects on black

    blank = tiny_train_config(
        msi_val, tiny_customnet_dir, model={"use_layout": False}, train={"max_steps": 1}, samples={"every": 1}
    )
    train(blank, tmp_path / "blank")
    arr = np.asarray(Image.open(tmp_path / "blank" / "samples" / "step-00000001.png").convert("RGB"))
    assert (arr[:, r : 2 * r] == 255).all()  # trained without M_L: the blank white canvas
    assert not load_model(tmp_path / "blank" / "model").config.use_layout


def test_bad_inputs_are_named(msi_val, tiny_customnet_dir, tmp_path):
    missing = tiny_train_config(msi_val, tmp_path / "no_weights")
    with pytest.raises(FileNotFoundError, match="no_weights"):
        train(missing, tmp_path / "run")
    wrong_dim = tiny_train_config(msi_val, tiny_customnet_dir, train={"max_steps": 1})
    result = train(wrong_dim, tmp_path / "run")
    from_ms = tiny_train_config(msi_val, result.model_dir, model={"category_dim": 8})
    with pytest.raises(ConfigError, match="model.category_dim is 8, but .* category_dim 16"):
        train(from_ms, tmp_path / "run2")
    too_small = tiny_train_config(
        msi_val, tiny_customnet_dir, data={"max_scenes": 1}, train={"effective_batch": 4, "per_gpu_batch": 2}
    )
    with pytest.raises(ValueError, match="1 scene.* make no full optimiser step of 4 samples"):
        train(too_small, tmp_path / "run3")


def test_a_second_trainer_on_one_out_is_refused_naming_the_holder(msi_val, tiny_customnet_dir, tmp_path):
    from click.testing import CliRunner
    from train_helpers import tiny_dict

    from mscustomnet.cli import main as mscustomnet_main
    from mscustomnet.train.trainer import TRAIN_LOCK
    from msibench import exitcodes
    from msibench.records import LockBusyError, exclusive_or_busy

    out = tmp_path / "run"
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(json.dumps(tiny_dict(msi_val, tiny_customnet_dir)))  # JSON is YAML
    with exclusive_or_busy(out / TRAIN_LOCK, "a training run", "wait"):
        with pytest.raises(LockBusyError, match=r"training run in .*pid \d+"):
            train(tiny_train_config(msi_val, tiny_customnet_dir), out)
        res = CliRunner().invoke(
            mscustomnet_main, ["train", "--config", str(config_file), "--out", str(out), "--quiet"]
        )
        assert res.exit_code == exitcodes.BUSY and "is being written by pid" in res.output
    assert not (out / "log.csv").exists()  # nothing was written by the refused trainers


def test_resume_latest_before_the_first_checkpoint_starts_fresh(msi_val, tiny_customnet_dir, tmp_path, caplog):
    config = tiny_train_config(msi_val, tiny_customnet_dir)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, max_steps=1))
    with caplog.at_level("WARNING"):
        result = train(config, tmp_path / "run", resume="latest")
    assert result.global_step == 1 and "holds no checkpoint yet" in caplog.text
