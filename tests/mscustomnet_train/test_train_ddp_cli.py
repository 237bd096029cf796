"""The ``mscustomnet train`` command, and DDP under torchrun: 2 CPU processes (gloo, gradient checkpointing on)
against one process accumulating 2 micro-batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from train_helpers import tiny_dict

from mscustomnet.cli import main
from mscustomnet.train.checkpoint import load_checkpoint
from mscustomnet.train.config import config_from_dict
from mscustomnet.train.logger import read_log
from mscustomnet.train.trainer import train


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_train_stop_and_resume(msi_val, tiny_customnet_dir, tmp_path):
    cfg = _write(tmp_path / "tiny.yaml", tiny_dict(msi_val, tiny_customnet_dir))
    out = tmp_path / "run"
    runner = CliRunner()
    first = runner.invoke(main, ["train", "--config", str(cfg), "--out", str(out), "--max-steps", "2", "--quiet"])
    assert first.exit_code == 0, first.output
    assert "stopped at step 2 (resume with --resume latest)" in first.output
    second = runner.invoke(main, ["train", "--config", str(cfg), "--out", str(out), "--resume", "latest", "--quiet"])
    assert second.exit_code == 0, second.output
    assert "training finished: epoch 3, 6 steps" in second.output and f"weights={out / 'model'}" in second.output
    assert [r["step"] for r in read_log(out / "log.csv")] == [1, 2, 3, 4, 5, 6]


def test_cli_reports_bad_configs(msi_val, tiny_customnet_dir, tmp_path):
    data = tiny_dict(msi_val, tiny_customnet_dir)
    data["train"]["lr"] = 1e-4
    cfg = _write(tmp_path / "bad.yaml", data)
    result = CliRunner().invoke(main, ["train", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert f"Error: {cfg}: unknown key train.lr" in result.output
    data = tiny_dict(msi_val, tmp_path / "missing_weights")
    cfg = _write(tmp_path / "nowts.yaml", data)
    result = CliRunner().invoke(main, ["train", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "missing_weights" in result.output and "model.init" in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ddp_two_processes_match_one_process_accumulating(msi_val, tiny_customnet_dir, tmp_path):
    # Effective batch 2: 2 gloo ranks x 1 sample, or 1 process x 1 sample x 2 accumulated. Same samples (the
    # epoch's permutation is split by rank exactly as the accumulation walks it) and same per-sample random draws.
    data = tiny_dict(msi_val, tiny_customnet_dir, train={"stages": [{"epochs": 1, "lr": 1e-3}, {"epochs": 1,
                     "lr": 5e-4}], "checkpoint_every": 1, "grad_checkpointing": True})  # fmt: skip
    cfg = _write(tmp_path / "ddp.yaml", data)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mscustomnet.train", "--config", str(cfg), "--out", str(tmp_path / "ddp"), "--device", "cpu",
               "--quiet"]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = train(config_from_dict(data), tmp_path / "single")

    ddp_rows = read_log(tmp_path / "ddp" / "log.csv")
    assert [r["step"] for r in ddp_rows] == [1, 2, 3, 4]  # one writer: rank 0
    assert [r["loss"] for r in ddp_rows] == pytest.approx(list(single.losses), rel=1e-5)
    ddp_w = load_file(str(tmp_path / "ddp/model/model.safetensors"))
    single_w = load_file(str(single.model_dir / "model.safetensors"))
    for name, tensor in single_w.items():
        torch.testing.assert_close(ddp_w[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    state = load_checkpoint(tmp_path / "ddp/checkpoints/step-00000004")
    assert state["world_size"] == 2 and len(state["rng"]) == 2

    # A mid-epoch DDP checkpoint cannot be resumed by another number of processes (its data split would differ).
    with pytest.raises(ValueError, match="mid-epoch with 1 process"):
        train(config_from_dict(data), tmp_path / "ddp", resume=tmp_path / "ddp/checkpoints/step-00000003")
