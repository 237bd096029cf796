"""The CPU smoke path of docs/training.md: the commands in configs/tiny_cpu.yaml's header, as written (build-msi on
the COCO slice -> ``mscustomnet init --tiny`` -> ``mscustomnet train --config configs/tiny_cpu.yaml`` -> ``msibench
run --method mscustomnet -M weights=...``), in one folder, in process. The test only points the COCO root at the
shared slice, gives ``msibench run`` that root too (to prepare the benchmark references offline) and turns the
progress bars off."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from click.testing import CliRunner

from mscustomnet.cli import main as mscustomnet_main
from msibench.cli import main as msibench_main

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"


def _header_commands() -> list[list[str]]:
    lines = [line.lstrip("#").strip() for line in CONFIG.read_text().splitlines() if line.startswith("#   ")]
    return [shlex.split(line, comments=True) for line in lines if line.startswith(("mscustomnet ", "msibench "))]


def test_build_msi_init_train_and_run_on_the_cpu(tmp_path, coco_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny_cpu.yaml").write_bytes(CONFIG.read_bytes())  # the command names it relatively
    commands = _header_commands()
    assert [c[:2] for c in commands] == [
        ["mscustomnet", "data"],
        ["mscustomnet", "init"],
        ["mscustomnet", "train"],
        ["msibench", "run"],
    ]
    outputs = []
    for program, *args in commands:
        args = [str(coco_root) if a == "../shared/data/coco2017-mini" else a for a in args]
        if program == "msibench":
            args += ["--coco-root", str(coco_root), "--no-progress"]
        elif args[0] in ("train",) or args[:2] == ["data", "build-msi"]:
            args += ["--quiet"]
        res = CliRunner().invoke(mscustomnet_main if program == "mscustomnet" else msibench_main, args)
        assert res.exit_code == 0, (args, res.output, res.exception)
        outputs.append(res.output)
    assert "training finished: epoch 2, 4 steps" in outputs[2]  # 4 scenes, batch 2, 1 + 1 epochs
    model = tmp_path / "runs" / "tiny_cpu" / "model"
    info = json.loads((model / "config.json").read_text())
    assert info["config"]["category_dim"] == 16 and info["config"]["resolution"] == 32  # the tiny network, trained
    assert "4 generated, 0 failed, 0 skipped" in outputs[3]  # --limit 2: two tasks of each track
    (run_dir,) = (tmp_path / "results" / "runs").glob("mscustomnet-*")
    run = json.loads((run_dir / "run.json").read_text())
    assert run["fingerprint"]["config"]["weights_sha256"] == info["weights_sha256"]
    assert run["fingerprint"]["config"]["training"] == {"use_layout": True, "dual_stage": True, "curriculum": True}


def test_init_tiny_writes_the_same_weights_for_a_seed_and_refuses_what_it_cannot_do(tmp_path):
    runner = CliRunner()
    for name in ("a", "b"):
        res = runner.invoke(mscustomnet_main, ["init", "--tiny", str(tmp_path / name), "--seed", "3"])
        assert res.exit_code == 0, res.output
    a, b = (json.loads((tmp_path / n / "config.json").read_text()) for n in ("a", "b"))
    assert a["weights_sha256"] == b["weights_sha256"] and a["config"]["name"] == "customnet-tiny"
    res = runner.invoke(mscustomnet_main, ["init", "--tiny", str(tmp_path / "c"), "--seed", "4", "--multi-subject"])
    assert res.exit_code == 0, res.output
    c = json.loads((tmp_path / "c" / "config.json").read_text())
    assert c["config"]["name"] == "mscustomnet-tiny" and c["weights_sha256"] != a["weights_sha256"]

    res = runner.invoke(mscustomnet_main, ["init", str(tmp_path / "d")])
    assert res.exit_code == 2 and "only --tiny" in res.output and not (tmp_path / "d").exists()
    res = runner.invoke(mscustomnet_main, ["init", "--tiny", str(tmp_path / "a")])
    assert res.exit_code == 2 and "not empty" in res.output
    res = runner.invoke(mscustomnet_main, ["init", "--tiny", str(tmp_path / "e"), "--resolution", "30"])
    assert res.exit_code == 2 and "multiple of 8" in res.output
