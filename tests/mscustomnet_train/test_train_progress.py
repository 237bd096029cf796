"""What ``mscustomnet train`` shows: one progress bar over the whole run (global step, smoothed loss, lr, K; tqdm's
ETA), log messages printed above it (not through it), a ``train.log`` beside ``log.csv``, and a closing hint whose
command works and generates at the model's resolution."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner
from train_helpers import TINY_RESOLUTION, tiny_dict

from mscustomnet.train.logger import read_log
from mscustomnet.train.trainer import TrainProgress


def test_one_bar_checkpoint_lines_train_log_and_a_hint_that_works(msi_val, tiny_customnet_dir, tmp_path, coco_root):
    data = tiny_dict(msi_val, tiny_customnet_dir, train={"checkpoint_every": 1}, data={"max_scenes": 2})
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    command = [sys.executable, "-m", "mscustomnet.train", "--config", str(cfg), "--out", str(out), "--device", "cpu"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = len(read_log(out / "log.csv"))
    assert steps == 3  # 3 epochs x 1 step

    err = proc.stderr
    # one bar for the whole run: every bar state counts the global step out of the run's total
    states = re.findall(r"train:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", err)
    assert states and {total for _, total in states} == {str(steps)} and states[-1][0] == str(steps)
    last = [seg for seg in re.split(r"[\r\n]", err) if seg.startswith("train:")][-1]
    assert f"step {steps}" in last and "loss " in last and "lr " in last and "K=4" in last and "epoch 3/3" in last
    assert "<00:00" in last or "?" not in last.split("[", 1)[1]  # tqdm's elapsed<remaining (ETA)
    # log messages go above the bar: each checkpoint line, after the bar's last carriage return, is the message
    saved = [line for line in err.split("\n") if "saved checkpoint" in line]
    assert len(saved) == steps
    for line in saved:
        assert line.split("\r")[-1].startswith("INFO"), repr(line)

    train_log = (out / "train.log").read_text()
    assert train_log.count("saved checkpoint") == steps
    assert len(re.findall(r"mscustomnet\.train\.trainer\.steps: step \d/3 epoch \d/3 stage \d K=\d", train_log)) == 3
    assert "model written to" in train_log

    # the closing hint: its command works as printed, and generates at the model's resolution
    hint = next(line for line in proc.stdout.splitlines() if line.startswith("generate with it: "))
    argv = shlex.split(hint.split(": ", 1)[1])
    assert argv[:4] == ["msibench", "run", "--method", "mscustomnet"]
    from msibench.cli import main as msibench_main

    extra = ["--limit", "1", "--track", "multi", "--run-dir", str(tmp_path / "gen"), "--coco-root", str(coco_root),
             "--device", "cpu", "--no-progress", "-M", "steps=2"]  # fmt: skip
    res = CliRunner().invoke(msibench_main, argv[1:] + extra)
    assert res.exit_code == 0, res.output
    from PIL import Image

    image = next((tmp_path / "gen" / "images").glob("*.png"))
    assert Image.open(image).size == (TINY_RESOLUTION, TINY_RESOLUTION)
    assert any(
        line.startswith("generate and score: msibench eval --method mscustomnet") for line in proc.stdout.splitlines()
    )


def test_smoothed_loss_is_a_bias_corrected_moving_average():
    progress = TrainProgress(10, 0, enabled=False, epochs=1)
    assert progress.step(1, 2.0, lr=1e-4, k=2, epoch=1, stage=1) == 2.0  # the first value, not 0.1 * 2
    second = progress.step(2, 1.0, lr=1e-4, k=2, epoch=1, stage=1)
    assert second == pytest.approx((0.9 * 0.1 * 2.0 + 0.1 * 1.0) / (1 - 0.9**2))
    assert progress.step(3, float("nan"), lr=1e-4, k=2, epoch=1, stage=1) == second  # a NaN step is not averaged in
