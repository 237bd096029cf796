"""``qwen-image-edit``: Qwen-Image-Edit-2511 through diffusers' QwenImageEditPlusPipeline, tested with a tiny random
pipeline of the same architecture (``baselines.testing.tiny_qwen_image_edit_pipeline``) saved in the hub layout and
loaded by the method's own ``setup``.

The pipeline sizes every reference to a 1024x1024-pixel area for its VAE and 384x384 for Qwen2.5-VL, whatever the
model's width: at those sizes one tiny generation takes ~40 s on two CPU cores. The CPU tests shrink the two areas
(module constants of diffusers' pipeline, the same for the method and the reference call); parity/qwen_image_edit.py
compares the two at the real areas.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from baselines.qwen_image_edit import MODEL_ID, MODEL_REVISION, WEIGHTS_ENV, QwenImageEditMethod
from msibench import inventory, weights
from msibench.methods.base import GenerationRequest, WeightsUnavailableError
from msibench.records import read_records
from msibench.runner import run_method

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_RESOLUTION = 32
SMALL_AREA = 64 * 64  # the tests' reference area, for the VAE and for Qwen2.5-VL alike


@pytest.fixture(autouse=True)
def _no_weights_env(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)


@pytest.fixture
def small_references(monkeypatch):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", SMALL_AREA)
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", SMALL_AREA)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny pipeline written by ``save_pretrained``: model_index.json, transformer/, text_encoder/, vae/, ..."""
    from baselines.testing import tiny_qwen_image_edit_pipeline

    folder = tmp_path_factory.mktemp("tiny-qwen-image-edit") / "Qwen-Image-Edit-2511"
    tiny_qwen_image_edit_pipeline().save_pretrained(folder)
    return folder


def _options(folder: Path, **more) -> dict:
    return {"model": str(folder), "steps": 2, "resolution": TINY_RESOLUTION, "dtype": "float32", **more}


def _request(manifest, task_id: str, seed: int) -> GenerationRequest:
    """The runner's request for ``task_id`` (references read from the prepared cache), with ``seed``."""
    from msibench.runner import _request

    task = next(t for t in manifest.tasks if t.id == task_id)
    return dataclasses.replace(_request(task, 0, 0, manifest), seed=seed)


# ----------------------------------------------------------------------------------------------- light


def test_import_and_capabilities_stay_light():
    code = (
        "import sys; from msibench import registry; m = registry.build('qwen-image-edit'); caps = m.capabilities; "
        "assert (caps.max_subjects, caps.uses_layout, caps.uses_zorder) == (3, False, False), caps; "
        "assert set(caps.tracks) == {'single', 'multi'}; "
        "heavy = [x for x in ('torch', 'diffusers', 'transformers') if x in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_defaults_are_the_model_cards_and_options_are_checked():
    method = QwenImageEditMethod()
    cfg = method.config()
    assert cfg["model"] == {"source": MODEL_ID, "revision": MODEL_REVISION}
    assert (cfg["steps"], cfg["true_cfg_scale"], cfg["negative_prompt"]) == (40, 4.0, " ")
    assert (cfg["resolution"], cfg["dtype"]) == (1024, "bfloat16")
    assert "no layout" in cfg["prompt"]
    with pytest.raises(ValueError, match="option 'dtype'"):
        QwenImageEditMethod(dtype="half")
    with pytest.raises(ValueError, match="option 'resolution': must be a multiple of 16"):
        QwenImageEditMethod(resolution=1000)
    with pytest.raises(ValueError, match="option 'guidance': -1.0 is outside"):
        QwenImageEditMethod(guidance=-1)
    with pytest.raises(ValueError, match="option 'distilled_guidance': must be >= 0"):
        QwenImageEditMethod(distilled_guidance=-1)
    with pytest.raises(ValueError, match="unknown option 'layout'"):
        QwenImageEditMethod(layout="true")
    assert QwenImageEditMethod(steps="20").fingerprint_hash() != method.fingerprint_hash()


def test_weights_are_declared_pinned_with_every_pipeline_folder():
    (spec,) = inventory.method_weights("qwen-image-edit")
    assert spec.repo_id == MODEL_ID and spec.revision == MODEL_REVISION and spec.pinned
    for folder in ("transformer", "text_encoder", "vae", "tokenizer", "processor", "scheduler"):
        assert f"{folder}/*" in spec.files
    assert "model_index.json" in spec.files


def test_more_than_three_subjects_are_skipped_with_the_reason(manifest):
    method = QwenImageEditMethod()
    big = next(t for t in manifest.tasks if len(t.subjects) > 3)
    assert "at most 3 subject(s)" in method.can_do(big) and "1 to 3 input images" in method.can_do(big)
    assert method.can_do(next(t for t in manifest.tasks if len(t.subjects) == 3)) is None


def test_missing_weights_fail_clearly(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(WeightsUnavailableError) as err:
        QwenImageEditMethod(dtype="float32").setup("cpu")
    message = str(err.value)
    for needed in (MODEL_ID, f"at revision {MODEL_REVISION}", "msibench weights fetch --method qwen-image-edit",
                   "-M model=DIR", WEIGHTS_ENV):  # fmt: skip
        assert needed in message, (needed, message)
    empty = tmp_path / "not-a-pipeline"
    empty.mkdir()
    with pytest.raises(WeightsUnavailableError, match=f"from the local folder {empty}"):
        QwenImageEditMethod(model=str(empty), dtype="float32").setup("cpu")


def test_generate_before_setup_says_so():
    with pytest.raises(RuntimeError, match=r"call setup\(device\) before generate"):
        QwenImageEditMethod().generate([])


# ----------------------------------------------------------------------------------------------- tiny pipeline


def test_the_request_becomes_the_model_cards_call(tiny_folder, manifest, prepared):
    method = QwenImageEditMethod(**_options(tiny_folder))
    method.setup("cpu")
    request = _request(manifest, "multi-k2-000", seed=11)
    kwargs = method.pipeline_call(request)
    assert [im.tobytes() for im in kwargs["image"]] == [s.reference.convert("RGB").tobytes() for s in request.subjects]
    assert kwargs["prompt"] == request.task.prompt  # no layout in the prompt
    assert (kwargs["negative_prompt"], kwargs["true_cfg_scale"], kwargs["num_inference_steps"]) == (" ", 4.0, 2)
    assert (kwargs["height"], kwargs["width"]) == (TINY_RESOLUTION, TINY_RESOLUTION)
    assert "guidance_scale" not in kwargs  # 2511's transformer has no guidance embedding: the card's 1.0 is ignored
    import torch

    assert torch.equal(torch.randn(3, generator=kwargs["generator"]), torch.randn(3, generator=torch.manual_seed(11)))


def test_method_equals_the_pipeline_called_as_the_card_does(tiny_folder, manifest, prepared, small_references):
    """The adapter's image is the one QwenImageEditPlusPipeline gives for the card's arguments, bit for bit."""
    import torch
    from diffusers import QwenImageEditPlusPipeline

    method = QwenImageEditMethod(**_options(tiny_folder))
    method.setup("cpu")
    request = _request(manifest, "multi-k2-000", seed=0)
    ours = np.asarray(method.generate([request])[0])
    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        theirs = pipe(image=[s.reference.convert("RGB") for s in request.subjects], prompt=request.task.prompt,
                      generator=torch.manual_seed(0), true_cfg_scale=4.0, negative_prompt=" ", num_inference_steps=2,
                      guidance_scale=1.0, num_images_per_prompt=1, height=TINY_RESOLUTION,
                      width=TINY_RESOLUTION).images[0]  # fmt: skip
    assert ours.shape == (TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert np.array_equal(ours, np.asarray(theirs))
    # The references reach the output: other references, another image.
    other = dataclasses.replace(request, subjects=request.subjects[::-1])
    assert not np.array_equal(ours, np.asarray(method.generate([other])[0]))


def test_runner_generates_deterministically_from_a_hub_layout_folder(
    tiny_folder, coco_root, tmp_path, small_references, monkeypatch
):
    monkeypatch.setenv(WEIGHTS_ENV, str(tiny_folder))  # the env default, as a user points at a downloaded copy
    options = {k: v for k, v in _options(tiny_folder).items() if k != "model"}
    runs = []
    for name in ("a", "b"):
        summary = run_method(QwenImageEditMethod(**options), run_dir=tmp_path / name, track="all", limit=1,
                             coco_root=coco_root, progress=False)  # fmt: skip
        assert summary.failed == 0 and summary.ok == 2, summary
        runs.append({p.name: p.read_bytes() for p in sorted((tmp_path / name / "images").glob("*.png"))})
    assert runs[0] == runs[1] and len(runs[0]) == 2
    records = read_records(tmp_path / "a" / "records.jsonl")
    assert {r["task_id"] for r in records} == {"single-000", "multi-k2-000"}
    from PIL import Image

    image = Image.open(next(iter((tmp_path / "a" / "images").glob("*.png"))))
    assert image.size == (TINY_RESOLUTION, TINY_RESOLUTION) and image.mode == "RGB"


def test_weights_fetch_gets_every_pipeline_file_and_setup_loads_the_hub_id_from_them(
    tiny_folder, tmp_path, monkeypatch
):
    """``msibench weights fetch --method qwen-image-edit`` against a hub serving the tiny pipeline's files at the
    pinned revision: every file of the pipeline's folders is fetched (shards found by pattern), nothing else; then
    the default hub id loads from that cache with the hub unreachable, as on a GPU machine after the fetch."""
    import huggingface_hub
    from huggingface_hub import constants

    served = sorted(str(p.relative_to(tiny_folder)) for p in tiny_folder.rglob("*") if p.is_file())
    cache = tmp_path / "hub"

    def hf_hub_download(repo_id, filename, revision=None, **kwargs):
        assert (repo_id, revision) == (MODEL_ID, MODEL_REVISION)
        path = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / revision / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiny_folder / filename, path)
        return str(path)

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, revision=None, **kw: [
        *served, "README.md", ".gitattributes"])  # fmt: skip
    monkeypatch.setattr(weights, "unreachable", lambda source: None)
    done = weights.fetch(inventory.selection(False, ["qwen-image-edit"]))
    assert sorted(d.file for d in done) == served and {d.status for d in done} == {"present"}
    assert any(f.startswith("transformer/diffusion_pytorch_model") for f in served)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    method = QwenImageEditMethod(steps=1, resolution=TINY_RESOLUTION, dtype="float32")
    method.setup("cpu")
    assert type(method._pipe).__name__ == "QwenImageEditPlusPipeline"
    assert method._pipe.transformer.config.zero_cond_t  # 2511's reference conditioning at t = 0


def test_a_pipeline_built_in_memory_is_used_as_given(manifest, prepared, small_references):
    """benchmarks/bench_gpu.py hands a real-size pipeline built on the device; setup moves it instead of loading."""
    from baselines.testing import tiny_qwen_image_edit_pipeline

    pipe = tiny_qwen_image_edit_pipeline()
    method = QwenImageEditMethod.from_pipeline(pipe, steps=1, resolution=TINY_RESOLUTION, dtype="float32")
    assert method.config()["model"] == {"source": "in-memory QwenImageEditPlusPipeline"}
    method.setup("cpu")
    assert method._pipe is pipe
    image = method.generate([_request(manifest, "single-000", seed=3)])[0]
    assert image.size == (TINY_RESOLUTION, TINY_RESOLUTION)
