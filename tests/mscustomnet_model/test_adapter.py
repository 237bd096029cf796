from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mscustomnet.adapter import WEIGHTS_ENV, MSCustomNetMethod
from mscustomnet.model.io import WeightsNotFoundError, save_model
from msibench.bench.manifest import load_manifest
from msibench.methods.base import GenerationRequest, SubjectInput
from msibench.records import read_records
from msibench.registry import build, resolve
from msibench.runner import run_method


@pytest.fixture
def tiny_weights(tiny_ms, tmp_path):
    return save_model(tiny_ms, tmp_path / "tiny-ms")


def test_listing_the_method_imports_no_torch():
    code = (
        "import sys; from msibench.registry import build; m = build('mscustomnet', {'steps': '7'}); "
        "print(m.capabilities.max_subjects, m.config()['steps'], 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["5", "7", "False"]
    assert resolve("mscustomnet") is MSCustomNetMethod


def test_options_capabilities_and_fingerprint(tiny_weights, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    method = build("mscustomnet", {"weights": str(tiny_weights), "steps": "20", "guidance": "2.5"})
    caps = method.capabilities
    assert (caps.max_subjects, caps.uses_layout, caps.uses_zorder) == (5, True, True)
    cfg = method.config()
    # the resolution is the model's own (its config.json: the tiny model is trained at 32 px), read without torch
    assert cfg["steps"] == 20 and cfg["guidance"] == 2.5 and cfg["resolution"] == 32 and cfg["dtype"] == "float32"
    assert build("mscustomnet", {"weights": str(tiny_weights), "resolution": "64"}).config()["resolution"] == 64
    assert MSCustomNetMethod(weights="someone/a-hub-model", revision="abc").config()["resolution"] == "model"
    sha = json.loads((tiny_weights / "config.json").read_text())["weights_sha256"]
    assert cfg["weights_sha256"] == sha
    assert (
        method.fingerprint_hash()
        != build("mscustomnet", {"weights": str(tiny_weights), "steps": "21"}).fingerprint_hash()
    )
    monkeypatch.setenv(WEIGHTS_ENV, str(tiny_weights))
    assert MSCustomNetMethod().config()["weights"] == str(tiny_weights)
    # CustomNet's own DDIM schedule by default (customnet/ddim.py:149, t_start=-1), the full grid on request.
    assert "t_start=-1" in cfg["sampler"]
    assert (
        build("mscustomnet", {"weights": str(tiny_weights), "schedule": "all-steps"}).fingerprint_hash()
        != build("mscustomnet", {"weights": str(tiny_weights)}).fingerprint_hash()
    )
    with pytest.raises(ValueError, match="option 'steps'"):
        MSCustomNetMethod(steps=1)
    with pytest.raises(ValueError, match="dtype"):
        MSCustomNetMethod(dtype="float8")
    with pytest.raises(ValueError, match="unknown option 'step'"):
        MSCustomNetMethod(step=3)


def test_a_model_trained_without_layout_declares_no_layout(tiny_ms, tmp_path):
    import dataclasses

    from mscustomnet.model.network import CustomNetModel

    no_layout = CustomNetModel(dataclasses.replace(tiny_ms.config, use_layout=False))
    no_layout.load_state_dict(tiny_ms.state_dict())
    folder = save_model(no_layout, tmp_path / "baseline")
    method = MSCustomNetMethod(weights=str(folder))
    assert (method.capabilities.uses_layout, method.capabilities.uses_zorder) == (False, False)
    assert method.config()["layout"].startswith("none")


def test_setup_without_weights_says_how_to_provide_them(monkeypatch, tiny_customnet, tmp_path):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(WeightsNotFoundError, match=f"MS-CustomNet.*{WEIGHTS_ENV}"):
        MSCustomNetMethod().setup("cpu")
    with pytest.raises(WeightsNotFoundError, match="revision v1"):
        MSCustomNetMethod(weights="nobody/no-such-model", revision="v1").setup("cpu")
    single = save_model(tiny_customnet, tmp_path / "customnet")
    with pytest.raises(ValueError, match="without a category encoder"):
        MSCustomNetMethod(weights=str(single)).setup("cpu")


def _request(task, seed):
    subjects = []
    for i, s in enumerate(task.subjects):
        ref = Image.new("RGB", (30 + 5 * i, 20), (40 * i, 100, 200))
        subjects.append(SubjectInput(s.category, s.category_id, s.box, s.z, ref, Image.new("L", ref.size, 255)))
    return GenerationRequest(task=task, sample_index=0, seed=seed, subjects=tuple(subjects))


def test_customnet_conditioning_options_reach_the_pipeline_and_the_fingerprint(tiny_weights):
    """-M reference_fit=thumbnail -M canvas=white (issue 20 item 5); the defaults keep version 2's fingerprint."""
    default = MSCustomNetMethod(weights=str(tiny_weights))
    assert default.config()["layout"].startswith("M_L") and "scaled to 200" in default.config()["reference"]
    app = MSCustomNetMethod(weights=str(tiny_weights), reference_fit="thumbnail", canvas="white", steps=2)
    assert app.config()["layout"].startswith("CustomNet's app canvas") and "thumbnail" in app.config()["reference"]
    assert app.fingerprint_hash() != default.fingerprint_hash()
    with pytest.raises(ValueError, match="option 'canvas'"):
        MSCustomNetMethod(canvas="grey")
    with pytest.raises(ValueError, match="option 'reference_fit'"):
        MSCustomNetMethod(reference_fit="crop")
    seen = {}
    app.setup("cpu")
    call = app._pipeline.__class__.__call__
    app._pipeline.__class__.__call__ = lambda self, *a, **kw: (seen.update(kw), call(self, *a, **kw))[1]
    try:
        task = next(t for t in load_manifest().tasks if t.k == 2)
        app.generate([_request(task, 0)])
    finally:
        app._pipeline.__class__.__call__ = call
    assert (seen["reference_fit"], seen["canvas"]) == ("thumbnail", "white")


def test_generate_is_seeded_and_sized(tiny_weights):
    task = next(t for t in load_manifest().tasks if t.k == 3)
    method = MSCustomNetMethod(weights=str(tiny_weights), steps=2, resolution=32)
    with pytest.raises(RuntimeError, match="setup"):
        method.generate([_request(task, 0)])
    method.setup("cpu")
    a, b, c = method.generate([_request(task, 11), _request(task, 11), _request(task, 12)])
    assert a.size == (32, 32) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))

    # The sampler follows the schedule the fingerprint states: 3 requested steps on CustomNet's schedule evaluate
    # (range(0, 1000, 333) + 1)[:-1] reversed = 667, 334, 1 (customnet/ddim.py t_start=-1); the former full grid
    # (-M schedule=all-steps) also its last point, clipped to 999.
    model = method._pipeline.model
    seen = []
    predict = model.predict_noise
    model.predict_noise = lambda x, t, *args: (seen.append(int(t[0])), predict(x, t, *args))[1]
    try:
        for options, timesteps in (({}, [667, 334, 1]), ({"schedule": "all-steps"}, [999, 667, 334, 1])):
            other = MSCustomNetMethod(weights=str(tiny_weights), steps=3, resolution=32, **options)
            other._pipeline = method._pipeline  # the same loaded model, other options
            seen.clear()
            other.generate([_request(task, 0)])
            assert seen == timesteps, options
    finally:
        del model.predict_noise


def test_generates_through_the_msibench_runner(tiny_weights, tmp_path, coco_root):
    method = MSCustomNetMethod(weights=str(tiny_weights), steps=2, resolution=32)
    summary = run_method(
        method, run_dir=tmp_path / "run", track="all", limit=1, seeds=1, coco_root=coco_root, progress=False
    )
    assert summary.failed == 0 and summary.ok == 2, summary.failures
    records = read_records(tmp_path / "run" / "records.jsonl")
    assert {r["status"] for r in records} == {"ok"}
    for record in records:
        image = Image.open(tmp_path / "run" / record["image"])
        assert image.size == (32, 32) and image.mode == "RGB"


def test_msibench_run_cli_without_weights_is_a_clean_error(tmp_path, coco_root, monkeypatch):
    from click.testing import CliRunner

    from msibench.cli import main

    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    args = ["run", "--method", "mscustomnet", "--limit", "1", "--track", "single", "--device", "cpu",
            "--run-dir", str(tmp_path / "run"), "--coco-root", str(coco_root), "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert WEIGHTS_ENV in result.output and "Traceback" not in result.output


def test_the_fingerprint_states_the_papers_training_switches(tiny_ms, tmp_path):
    """The table matches a run to the paper's configuration (M_L + DST + CLSQ) through these fields."""
    full = {"model": {"use_layout": True}, "train": {"stages": [{"epochs": 7}, {"epochs": 3}]}}
    full["curriculum"] = {"enabled": True}
    folder = save_model(tiny_ms, tmp_path / "full", training={"config": full})
    assert MSCustomNetMethod(weights=str(folder)).config()["training"] == {
        "use_layout": True,
        "dual_stage": True,
        "curriculum": True,
    }
    baseline = {"model": {"use_layout": False}, "train": {"stages": [{"epochs": 10}]}}
    baseline["curriculum"] = {"enabled": False}
    folder = save_model(tiny_ms, tmp_path / "baseline", training={"config": baseline})
    assert MSCustomNetMethod(weights=str(folder)).config()["training"] == {
        "use_layout": False,
        "dual_stage": False,
        "curriculum": False,
    }
    assert MSCustomNetMethod(weights=str(save_model(tiny_ms, tmp_path / "plain"))).config()["training"] is None


def test_only_the_full_method_sampled_as_customnet_is_the_papers_configuration(tiny_ms, tmp_path):
    """--paper: the full method at 256 px on CustomNet's own DDIM schedule (the default); the former full grid
    (-M schedule=all-steps), another guidance or an ablation is another configuration."""
    from msibench.scoring.table import RunResult, load_paper_table, paper_match

    full = {"model": {"use_layout": True}, "train": {"stages": [{"epochs": 7}, {"epochs": 3}]}}
    full["curriculum"] = {"enabled": True}
    folder = str(save_model(tiny_ms, tmp_path / "full", training={"config": full}))
    paper = load_paper_table()

    def match(**options):
        method = MSCustomNetMethod(weights=folder, resolution=256, **options)
        return paper_match(paper, RunResult("x", "mscustomnet", "", None, [], method.config()))

    assert match() == (True, "")
    assert match(dtype="float16") == (True, "")  # the paper does not state the inference dtype
    ok, why = match(schedule="all-steps")
    assert not ok and why.startswith("sampler = 'ddim eta=0, all-steps")
    assert not match(guidance=5.0)[0] and not match(steps=30)[0]


def test_generates_at_the_model_resolution_or_says_why_not(tiny_weights, caplog):
    import logging

    from mscustomnet.model.io import LOAD_STAGES

    task = next(t for t in load_manifest().tasks if t.k == 2)
    method = MSCustomNetMethod(weights=str(tiny_weights), steps=2)
    with caplog.at_level(logging.INFO, logger="mscustomnet"):
        method.setup("cpu")
    # loading reports each stage, in order, then the resolution it generates at and why
    messages = [r.getMessage() for r in caplog.records]
    stages = [m for m in messages if m.startswith("MS-CustomNet: ")]
    assert [s.split(": ")[1] for s in stages] == list(LOAD_STAGES)
    assert any("generating at 32 px, the resolution of the model" in m for m in messages)
    assert method.generate([_request(task, 3)])[0].size == (32, 32)

    caplog.clear()
    method = MSCustomNetMethod(weights=str(tiny_weights), steps=2, resolution=48)
    with caplog.at_level(logging.INFO, logger="mscustomnet"):
        method.setup("cpu")
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "generating at 48 px as -M resolution=48 asks, although the model was trained at 32 px" in warning.message
    assert method.generate([_request(task, 3)])[0].size == (48, 48)
    with pytest.raises(ValueError, match="resolution"):
        MSCustomNetMethod(weights=str(tiny_weights), resolution=4)


def test_a_resolution_the_model_cannot_take_stops_the_run_at_setup(tiny_weights, tmp_path, coco_root):
    """-M resolution=36 on a model whose latent halves once (multiples of 8): refused at setup, naming the option,
    instead of recording every sample as failed."""
    from msibench.runner import MethodSetupError

    method = MSCustomNetMethod(weights=str(tiny_weights), steps=2, resolution=36)
    with pytest.raises(MethodSetupError, match=r"option 'resolution': resolution 36 must be a positive multiple of 8"):
        run_method(method, run_dir=tmp_path / "r", track="multi", limit=2, coco_root=coco_root, progress=False)
    assert read_records(tmp_path / "r") == []
