"""The Python API (msibench.api, reachable from ``msibench``): evaluate = run + score + Table I's row, resumable, with
the same numbers as ``msibench table``; the stages and the method loader; bad arguments named."""

from __future__ import annotations

import subprocess
import sys

import pytest

import msibench
from msibench.methods.paste import PasteMethod
from msibench.scoring.scorer import Scorer, ScorerConfig


@pytest.fixture(scope="module")
def detector_scorer():
    # the real YOLO11n-seg architecture, random weights, built offline: the detector metrics only (fast)
    scorer = Scorer(ScorerConfig(detector="yolo11n-seg.yaml", imgsz=160, metrics=("yolo_subj", "yolo_l", "z_acc")))
    scorer.setup()
    return scorer


def test_evaluate_runs_scores_and_returns_table_one_data_resumably(tmp_path, coco_root, detector_scorer):
    kw = dict(tracks=["multi"], limit=2, out=tmp_path, coco_root=coco_root, device="cpu", progress=False)
    result = msibench.evaluate("paste", options={"resolution": "64"}, scorer=detector_scorer, **kw)
    assert result.run_dir.name == f"paste-{PasteMethod(resolution=64).fingerprint_hash()}"
    assert (result.generation.ok, result.scoring.scored, result.exit_code) == (2, 2, 0)
    assert set(result.metrics) == {"single", "multi"}
    assert result.metrics["multi"]["yolo_subj"] == 0.0  # random weights find nothing at conf 0.25
    assert result.metrics["multi"]["dino_i"] is None and result.metrics["single"]["dino_i"] is None  # not scored
    table = result.table()
    assert "| Paste (oracle) (partial: multi 2/" in table and "0.000 [0.000, 0.000]" in table
    assert table == msibench.table([result.run_dir], ci=True, allow_partial=True)  # the CLI's table, same numbers

    again = msibench.evaluate(PasteMethod(resolution=64), scorer=detector_scorer, **kw)  # an instance, resumed
    assert (again.generation.ok, again.generation.done_before, again.scoring.reused) == (0, 2, 2)
    assert again.metrics == result.metrics


def test_the_stages_and_the_loader(tmp_path, coco_root, detector_scorer):
    method = msibench.load_method("paste", {"resolution": "48"})
    assert isinstance(method, PasteMethod) and method.config()["resolution"] == 48
    assert msibench.load_method(PasteMethod, {"resolution": 40}).config()["resolution"] == 40
    summary = msibench.run_method(method, run_dir=tmp_path / "r", track="single", limit=1, coco_root=coco_root,
                                  progress=False)  # fmt: skip
    assert summary.ok == 1
    scored = msibench.score_run(tmp_path / "r", detector_scorer, coco_root=coco_root, progress=False)
    assert scored.scored == 1


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="tracks=.*'both'"):
        msibench.evaluate("paste", tracks="both")
    with pytest.raises(ValueError, match="options .* with a method instance"):
        msibench.load_method(PasteMethod(), {"resolution": "64"})
    with pytest.raises(TypeError, match="not a Method subclass"):
        msibench.load_method(dict)
    with pytest.raises(AttributeError, match="no_such_function"):
        msibench.no_such_function  # noqa: B018


def test_import_msibench_and_reaching_the_api_import_no_torch():
    code = "import sys, msibench; msibench.evaluate; msibench.table; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
