"""msibench grid: the emitted jobs run (plain scripts, on the CPU with paste), resubmit safely, and the SLURM array's
index arithmetic covers every (method, shard) exactly once."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from msibench.cli import main
from msibench.grid import GridError, build_jobs, load_grid_file, spec_from_mapping, write_grid
from msibench.records import read_records
from msibench.runner import run_method

REPO = Path(__file__).resolve().parents[1]
MSIBENCH = f"{shlex.quote(sys.executable)} -m msibench"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _grid(tmp_path: Path, coco_root: Path, **extra) -> dict:
    return {
        "out": str(tmp_path / "runs"),
        "shards": 3,
        "gpus": 2,
        "device": "cpu",
        "limit": 2,
        "manifest": "v2",
        "coco_root": str(coco_root),
        "msibench": MSIBENCH,
        "score": False,
        "methods": [
            {"name": "paste", "options": {"resolution": 32}},
            {"name": "paste", "options": {"resolution": 32, "background": [10, 20, 30]}},
        ],
        **extra,
    }


def _unit_images(run_dir: Path) -> dict[tuple[str, int], str]:
    return {(r["task_id"], r["sample_index"]): r["image_sha256"] for r in read_records(run_dir / "records.jsonl")}


def test_plain_scripts_generate_what_one_process_does_and_resubmit_safely(tmp_path, coco_root):
    from msibench import registry

    spec = spec_from_mapping(_grid(tmp_path, coco_root))
    written = write_grid(spec, tmp_path / "grid", engines=["plain"])
    names = sorted(p.name for p in written["plain"])
    assert names == ["gpu-0.sh", "gpu-1.sh", "run_all.sh"]

    run_all = ["bash", str(tmp_path / "grid/plain/run_all.sh")]
    done = subprocess.run(run_all, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    jobs = json.loads((tmp_path / "grid/grid.json").read_text())["jobs"]
    run_dirs = sorted({job["run_dir"] for job in jobs})
    assert len(jobs) == 6 and len(run_dirs) == 2

    for method in spec.methods:  # the same method run in one process, unsharded, elsewhere
        instance = registry.build(method.name, dict(method.options))
        alone = run_method(
            instance, out=tmp_path / "alone", manifest="v2", limit=2, device="cpu", coco_root=coco_root, progress=False
        )
        sharded = Path(spec.out) / alone.run_dir.name
        assert str(sharded) in run_dirs
        assert _unit_images(sharded) == _unit_images(alone.run_dir)
        assert len(_unit_images(sharded)) == 4  # --limit 2 per track, both tracks

    before = {d: (Path(d) / "records.jsonl").read_bytes() for d in run_dirs}
    again = subprocess.run(run_all, env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "0 generated" in again.stdout and " generated" not in again.stdout.replace("0 generated", "")
    assert {d: (Path(d) / "records.jsonl").read_bytes() for d in run_dirs} == before


def test_slurm_array_covers_every_method_and_shard_once(tmp_path, coco_root):
    grid = _grid(tmp_path, coco_root, score=True, slurm={"partition": "gpu", "time": "02:00:00", "max_parallel": 4})
    grid["msibench"] = "echo msibench"  # each array task prints the command it would run
    spec = spec_from_mapping(grid)
    write_grid(spec, tmp_path / "grid", engines=["slurm"])
    folder = tmp_path / "grid/slurm"
    for script in ("run.sbatch", "score.sbatch", "submit.sh"):
        assert subprocess.run(["bash", "-n", str(folder / script)]).returncode == 0, script
    text = (folder / "run.sbatch").read_text()
    assert "#SBATCH --array=0-5%4" in text and "#SBATCH --partition=gpu" in text and "#SBATCH --time=02:00:00" in text

    expected = {(j.run_dir, f"{j.shard}/{j.shards}") for j in build_jobs(spec)}
    seen = []
    for task_id in range(6):
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task_id)}
        out = subprocess.run(["bash", str(folder / "run.sbatch")], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        printed = out.stdout.strip().splitlines()[-1]
        run_dir = re.search(r"--run-dir (\S+)", printed)[1]
        shard = re.search(r"--shard (\S+)", printed)[1]
        seen.append((run_dir, shard))
    assert sorted(seen) == sorted(expected) and len(set(seen)) == 6
    outside = subprocess.run(
        ["bash", str(folder / "run.sbatch")], env={**os.environ, "SLURM_ARRAY_TASK_ID": "6"}, capture_output=True
    )
    assert outside.returncode == 2

    scored = set()
    for task_id in range(2):
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task_id)}
        out = subprocess.run(["bash", str(folder / "score.sbatch")], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        scored.add(out.stdout.strip().splitlines()[-1].split()[2])
    assert scored == {d for d, _ in expected}


def test_torchrun_script_one_command_per_method(tmp_path, coco_root):
    spec = spec_from_mapping(_grid(tmp_path, coco_root, gpus=8, score=True))
    write_grid(spec, tmp_path / "grid", engines=["torchrun"])
    script = tmp_path / "grid/torchrun/run_all.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    lines = [line for line in script.read_text().splitlines() if line.startswith("torchrun")]
    assert len(lines) == 2
    for line in lines:
        assert "--nproc-per-node=8" in line and "--shard" not in line and "--device" not in line  # ranks pick both
    assert script.read_text().count(" score ") == 2


def test_bad_grid_files_name_the_file_and_field(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("methods: [paste]\nshard: 4\n")
    with pytest.raises(GridError, match=r"grid.yaml: unknown field\(s\) \['shard'\]"):
        load_grid_file(path)
    path.write_text("methods:\n  - {name: paste, options: [1]}\n")
    with pytest.raises(GridError, match=r"grid.yaml: field 'methods\[0\]'.options"):
        load_grid_file(path)
    path.write_text("methods: [paste, paste]\n")
    with pytest.raises(GridError, match=r"methods\[1\]' repeats methods\[0\]"):
        load_grid_file(path)
    path.write_text("methods: [paste]\nshards: 0\n")
    with pytest.raises(GridError, match="field 'shards': expected an integer >= 1"):
        load_grid_file(path)
    path.write_text("methods: [nosuch]\n")
    with pytest.raises(GridError, match="unknown method 'nosuch'"):
        build_jobs(load_grid_file(path))
    path.write_text("methods: [paste]\nslurm: {partition: gpu, gpus: 2}\n")
    with pytest.raises(GridError, match=r"field 'slurm': unknown key\(s\) \['gpus'\]"):
        load_grid_file(path)


def test_grid_command(tmp_path):
    result = CliRunner().invoke(
        main, ["grid", "--method", "paste", "--shards", "2", "--out", str(tmp_path / "g"), "--engine", "slurm"]
    )
    assert result.exit_code == 0, result.output
    assert "1 method(s) x 2 shard(s) = 2 job(s)" in result.output
    assert (tmp_path / "g/slurm/run.sbatch").is_file() and not (tmp_path / "g/plain").exists()
    result = CliRunner().invoke(main, ["grid", "--out", str(tmp_path / "h")])
    assert result.exit_code == 2 and "grid file or at least one --method" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [paste]\ntrack: both\n")
    result = CliRunner().invoke(main, ["grid", str(bad), "--out", str(tmp_path / "h")])
    assert result.exit_code == 2 and "bad.yaml: field 'track'" in result.output


def test_a_plugin_file_is_named_by_its_absolute_path(tmp_path, monkeypatch):
    plugin = tmp_path / "mine.py"
    plugin.write_text(
        "from msibench.methods.paste import PasteMethod\n\n\nclass Mine(PasteMethod):\n    name = 'mine'\n"
    )
    monkeypatch.chdir(tmp_path)
    spec = spec_from_mapping({"methods": ["mine.py:Mine"], "out": "runs", "device": "cpu"})
    (job,) = build_jobs(spec)
    assert f"--method {plugin}:Mine" in job.command() and job.run_dir.startswith(str(tmp_path / "runs" / "mine-"))
