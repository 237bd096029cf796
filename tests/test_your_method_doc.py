"""docs/your-method.md runs as written: its method file (at most about 30 lines), its commands run -> score ->
table -> report, and its Python API snippet.

What the test adds to the documented commands, and only that: the offline COCO slice (``--coco-root``), the CPU,
no progress bars, the test's folder instead of ``results/``, ``--limit 1`` instead of 4 (two images, the same code
path) and, for ``score``, randomly initialised scorers built offline (the real YOLO11n-seg and DINO ViT-S/16
architectures; CLIP's metrics are left out because a random ViT-B/32 takes 10 s to build) in place of
``weights fetch``, which needs the network."""

from __future__ import annotations

import functools
import glob
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from msibench.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "your-method.md"
TINY_SCORING = ["--detector", "yolo11n-seg.yaml", "--dino-weights", "random", "--imgsz", "160",
                "--metrics", "yolo_subj,yolo_l,z_acc,dino_i,collapse"]  # fmt: skip


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def _commands() -> list[list[str]]:
    block = next(b for b in _blocks("bash") if "msibench run --method my_method.py:" in b)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.startswith("msibench ")]


@pytest.fixture
def method_file(tmp_path: Path) -> Path:
    source = _blocks("python")[0]
    assert len(source.strip().splitlines()) <= 30, "the page promises a method in at most 30 lines"
    path = tmp_path / "my_method.py"
    path.write_text(source)
    return path


def test_the_documented_commands_give_table_one_and_a_report(method_file, tmp_path, coco_root, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the commands name my_method.py and results/ relative to where they run
    commands = _commands()
    assert [c[1] for c in commands] == ["weights", "run", "score", "table", "report"]
    outputs = {}
    for argv in commands[1:]:  # weights fetch needs the network: the scorers below are built offline instead
        args = [a for pattern in argv[1:] for a in (sorted(glob.glob(pattern)) if "*" in pattern else [pattern])]
        args = [{"4": "1"}.get(a, a) if i and args[i - 1] == "--limit" else a for i, a in enumerate(args)]
        if args[0] in ("run", "score", "report"):
            args += ["--coco-root", str(coco_root), "--no-progress"]
        if args[0] in ("run", "score"):
            args += ["--device", "cpu"]
        if args[0] == "score":
            args += TINY_SCORING
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, (args, res.output)
        outputs[args[0]] = res.output
    (run_dir,) = (tmp_path / "results" / "runs").glob("mean-colour-*")
    assert "2 generated, 0 failed, 0 skipped" in outputs["run"]
    assert "2 scored, 0 already current, 0 failed" in outputs["score"]
    row = next(line for line in outputs["table"].splitlines() if line.startswith("| mean-colour (partial:"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert cells[0] != "–" and cells[3] != "–"  # single DINO-I and multi YOLO-Subj have values
    assert (tmp_path / "results" / "report" / "index.html").is_file()
    assert "mean-colour" in (tmp_path / "results" / "report" / "index.html").read_text()
    source = json.loads((run_dir / "run.json").read_text())["method_source"]
    assert source["kind"] == "file" and source["file"] == str(method_file.resolve())


def test_the_documented_python_api_snippet(method_file, tmp_path, coco_root, monkeypatch, capsys):
    import msibench
    from msibench import api
    from msibench.scoring.scorer import Scorer, ScorerConfig

    snippet = next(b for b in _blocks("python") if "msibench.evaluate(" in b)
    scorer = Scorer(ScorerConfig(detector="yolo11n-seg.yaml", imgsz=160, metrics=("yolo_subj", "yolo_l", "z_acc")))
    tiny = functools.partial(
        api.evaluate, scorer=scorer, coco_root=coco_root, out=tmp_path / "runs", device="cpu", progress=False
    )
    monkeypatch.setattr(msibench, "evaluate", tiny)
    monkeypatch.syspath_prepend(str(method_file.parent))
    exec(compile(snippet, str(DOC), "exec"), {})
    printed = capsys.readouterr().out
    assert "| mean-colour (partial: multi 4/" in printed and "YOLO-L" in printed
    (run_dir,) = (tmp_path / "runs").glob("mean-colour-*")
    assert len((run_dir / "records.jsonl").read_text().splitlines()) == 4  # limit=4 on the multi track
    sys.modules.pop("my_method", None)
