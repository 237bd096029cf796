from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from baselines.customnet import WEIGHTS_ENV, CustomNetMethod
from msibench.methods.base import GenerationRequest, SubjectInput, WeightsUnavailableError
from msibench.records import read_records
from msibench.runner import run_method

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_RESOLUTION = 32


@pytest.fixture(autouse=True)
def _no_weights_env(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)


@pytest.fixture(autouse=True)
def _empty_hub_cache(tmp_path, monkeypatch):
    """A hub cache of our own: a machine that holds the real customnet_v1.pt must not load 5 GB in a unit test."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A tiny random CustomNet (single-subject configuration) saved in our model folder format."""
    import torch

    from mscustomnet.model.config import tiny_config
    from mscustomnet.model.io import save_model
    from mscustomnet.model.network import CustomNetModel

    torch.manual_seed(0)
    model = CustomNetModel(tiny_config(multi_subject=False, resolution=TINY_RESOLUTION))
    # Seeded noise everywhere: zero-initialised layers would hide whether a condition reaches the output.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return save_model(model.eval(), tmp_path_factory.mktemp("tiny-customnet") / "model")


@pytest.fixture(scope="module")
def official_keys(checkpoint_keys_dir) -> dict[str, tuple[int, ...]]:
    path = checkpoint_keys_dir / "customnet_v1.json"
    if not path.is_file():
        pytest.skip(f"CustomNet key list not found at {path}")
    return {k: tuple(s) for k, s in json.loads(path.read_text())["keys"].items()}


def _official_layout_checkpoint(keys: dict[str, tuple[int, ...]]) -> dict:
    """Exactly the official keys and shapes, each tensor a one-element storage broadcast to its shape (a few bytes
    on disk and in memory for 1.43 G elements) whose value is the key's index, so every tensor of ours can be traced
    back to the official key it came from."""
    import torch

    checkpoint = {}
    for index, (key, shape) in enumerate(keys.items()):
        dtype = torch.int64 if key.endswith("position_ids") else torch.float32
        checkpoint[key] = torch.full((1,) * len(shape), index, dtype=dtype).expand(shape)
    # The converter compares the DDPM betas with the configured schedule (LDM "linear" 0.00085..0.012).
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    checkpoint["betas"] = betas.float()
    return checkpoint


@pytest.fixture(scope="module")
def official_layout_file(tmp_path_factory, official_keys) -> Path:
    import torch

    path = tmp_path_factory.mktemp("official") / "customnet_v1.pt"
    torch.save(_official_layout_checkpoint(official_keys), path)
    assert path.stat().st_size < 2_000_000  # broadcast tensors are saved as their one-element storage
    return path


def _images(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "images").glob("*.png"))}


def _run(tmp_path, name, coco_root, **options):
    run_dir = tmp_path / name
    summary = run_method(
        CustomNetMethod(**options), run_dir=run_dir, track="all", limit=2, coco_root=coco_root, progress=False
    )
    return summary, run_dir


# ----------------------------------------------------------------------------------------------- light


def test_listing_builds_the_method_without_torch():
    code = (
        "import sys; from msibench import registry; m = registry.build('customnet'); c = m.capabilities; "
        "assert (c.max_subjects, c.uses_layout, c.uses_zorder, c.tracks) == (1, True, False, ('single',)), c; "
        "w = m.config()['weights']; "
        "assert w == {'repo': 'TencentARC/CustomNet', 'file': 'customnet_v1.pt', 'revision': 'main'}, w; "
        "heavy = [n for n in ('torch', 'diffusers', 'transformers') if n in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_msibench_ls_lists_customnet_with_its_capabilities():
    from click.testing import CliRunner

    from msibench.cli import main

    result = CliRunner().invoke(main, ["ls", "methods"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines()[1:]}
    assert rows["customnet"] == ["1", "yes", "no", "single", "baselines.customnet:CustomNetMethod"]


def test_official_defaults_options_and_fingerprint(tiny_weights, monkeypatch):
    cfg = CustomNetMethod(weights=str(tiny_weights)).config()
    # TencentARC/CustomNet@23a378f main/app.py: S=50, "all": 3.0, 256 px, float32 model, sliders at 0.
    assert (cfg["steps"], cfg["guidance"], cfg["resolution"], cfg["dtype"]) == (50, 3.0, 256, "float32")
    assert cfg["viewpoint"] == {"polar": 0.0, "azimuth": 0.0}
    # customnet/ddim.py:134,149: t_start=-1 drops the noisiest grid point (49 timesteps for S=50).
    assert "t_start=-1" in cfg["sampler"] and "[:-1]" in cfg["sampler"]
    # main/app.py + ldm/util.py:82: the reference is only shrunk (thumbnail), the square goes into the box.
    assert "thumbnail" in cfg["reference"] and cfg["placement"].startswith("main/app.py")
    assert "truncated" in cfg["output"]
    sha = json.loads((tiny_weights / "config.json").read_text())["weights_sha256"]
    assert cfg["weights"] == {"format": "mscustomnet-model", "model": "customnet-tiny", "weights_sha256": sha}

    monkeypatch.setenv(WEIGHTS_ENV, str(tiny_weights))
    assert CustomNetMethod().config()["weights"]["weights_sha256"] == sha
    monkeypatch.delenv(WEIGHTS_ENV)

    variants = [
        {},
        {"steps": "20"},
        {"guidance": "5"},
        {"resolution": "512"},
        {"dtype": "float16"},
        {"polar": "15"},
        {"azimuth": "-30"},
        {"schedule": "all-steps"},
        {"reference_fit": "upscale"},
        {"placement": "dataset"},
    ]
    hashes = {CustomNetMethod(weights=str(tiny_weights), **v).fingerprint_hash() for v in variants}
    hub = [{}, {"revision": "0123abc"}, {"weights_file": "customnet_v1.pth"}]
    hashes |= {CustomNetMethod(**v).fingerprint_hash() for v in hub}
    assert len(hashes) == len(variants) + len(hub)

    with pytest.raises(ValueError, match="unknown option 'step'"):
        CustomNetMethod(step=3)
    with pytest.raises(ValueError, match="dtype"):
        CustomNetMethod(dtype="float8")
    with pytest.raises(ValueError, match="steps"):
        CustomNetMethod(steps=0)
    with pytest.raises(ValueError, match="option 'steps': the official CustomNet DDIM schedule visits no timestep"):
        CustomNetMethod(steps=1)
    with pytest.raises(ValueError, match="option 'schedule'"):
        CustomNetMethod(schedule="ddpm")
    with pytest.raises(ValueError, match="option 'placement'"):
        CustomNetMethod(placement="centre")


def test_ms_customnet_weights_are_refused(tmp_path):
    import torch

    from mscustomnet.model.config import tiny_config
    from mscustomnet.model.io import save_model
    from mscustomnet.model.network import CustomNetModel

    torch.manual_seed(0)
    folder = save_model(CustomNetModel(tiny_config(multi_subject=True)), tmp_path / "ms")
    with pytest.raises(ValueError, match=r"category encoder.*mscustomnet method"):
        CustomNetMethod(weights=str(folder)).config()


def test_missing_weights_name_what_to_download(tmp_path):
    # Default: the hub file, which tests (offline, empty cache) cannot reach.
    method = CustomNetMethod()
    with pytest.raises(WeightsUnavailableError) as err:
        method.setup("cpu")
    message = str(err.value)
    for needed in ("TencentARC/CustomNet customnet_v1.pt", "revision main", "-M weights=PATH", WEIGHTS_ENV):
        assert needed in message, (needed, message)

    with pytest.raises(WeightsUnavailableError, match=r"nope/customnet_v1\.pt.*no such file.*-M weights=PATH"):
        CustomNetMethod(weights=str(tmp_path / "nope" / "customnet_v1.pt")).config()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsUnavailableError, match=rf"empty.*config\.json.*{WEIGHTS_ENV}"):
        CustomNetMethod(weights=str(empty)).config()


def test_msibench_run_without_weights_is_a_clean_error(tmp_path, coco_root):
    from click.testing import CliRunner

    from msibench.cli import main

    args = ["run", "--method", "customnet", "--limit", "1", "--track", "single", "--device", "cpu",
            "--run-dir", str(tmp_path / "run"), "--coco-root", str(coco_root), "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert "TencentARC/CustomNet customnet_v1.pt" in result.output and WEIGHTS_ENV in result.output
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------------- official key layout


def test_official_checkpoint_file_fills_every_tensor_through_setup(official_keys, official_layout_file):
    """The method's own loader (setup on the .pt path) takes a file with exactly the official 1,479 keys and
    shapes: every key feeds one of our tensors or is on the converter's commented ignore list, every parameter of
    ours is the checkpoint's tensor (never initialised), nothing is left over."""
    from mscustomnet.model.convert import IGNORED_KEYS

    names = list(official_keys)
    assert len(names) == 1479
    method = CustomNetMethod(weights=str(official_layout_file))
    assert method.config()["weights"]["file"] == "customnet_v1.pt"
    method.setup("cpu")
    model = method._pipeline.model

    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    source_of = {}
    for key, param in model.named_parameters():
        # Still the checkpoint's one-element storage: assigned from the file, not a copy and not an init.
        assert param.untyped_storage().nbytes() == param.element_size(), key
        source_of[key] = names[int(param[(0,) * param.dim()].item())]
    used = set(source_of.values())
    assert used.isdisjoint(IGNORED_KEYS)
    assert used | set(IGNORED_KEYS) == set(names)
    assert all(reason for reason in IGNORED_KEYS.values())
    # A few of the mapping's landmarks, written out by hand.
    unet, visual = "model.diffusion_model.", "cond_stage_model.model.visual."
    assert source_of["unet.conv_in.weight"] == unet + "input_blocks.0.0.weight"
    assert tuple(model.unet.conv_in.weight.shape) == (320, 8, 3, 3)
    assert (
        source_of["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_text.weight"]
        == unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k_text.weight"
    )
    assert source_of["projection.weight"] == "cc_projection.weight"
    assert tuple(model.projection.weight.shape) == (768, 772)
    assert source_of["image_encoder.visual_projection.weight"] == visual + "proj"
    for qkv in "qkv":
        key = f"image_encoder.vision_model.encoder.layers.0.self_attn.{qkv}_proj.weight"
        assert source_of[key] == visual + "transformer.resblocks.0.attn.in_proj_weight"
    # LDM numbers the decoder levels from the bottom up, diffusers from the top down.
    assert (
        source_of["vae.decoder.up_blocks.0.resnets.0.conv1.weight"]
        == "first_stage_model.decoder.up.3.block.0.conv1.weight"
    )
    assert source_of["text_encoder.final_layer_norm.weight"].startswith("text_encoder.transformer.text_model.")


def test_a_checkpoint_of_another_layout_is_refused_naming_file_and_key(tmp_path, official_keys):
    import torch

    from mscustomnet.model.convert import ConversionError

    checkpoint = _official_layout_checkpoint(official_keys)
    del checkpoint["cc_projection.bias"]
    path = tmp_path / "customnet_v1.pt"
    torch.save(checkpoint, path)
    with pytest.raises(ConversionError, match=rf"{re.escape(str(path))}.*1 missing key.*cc_projection\.bias"):
        CustomNetMethod(weights=str(path)).setup("cpu")
    checkpoint = _official_layout_checkpoint(official_keys)
    checkpoint["model.diffusion_model.extra.weight"] = torch.zeros(3)
    torch.save(checkpoint, path)
    with pytest.raises(ConversionError, match=r"1 unaccounted key.*model\.diffusion_model\.extra\.weight"):
        CustomNetMethod(weights=str(path)).setup("cpu")


def test_hub_weights_are_downloaded_by_id_file_and_revision(official_layout_file, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        return str(official_layout_file)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    method = CustomNetMethod(revision="0123abc")
    assert method.config()["weights"] == {
        "repo": "TencentARC/CustomNet",
        "file": "customnet_v1.pt",
        "revision": "0123abc",
    }
    method.setup("cpu")
    assert calls == [("TencentARC/CustomNet", "customnet_v1.pt", "0123abc")]
    assert tuple(method._pipeline.model.projection.weight.shape) == (768, 772)


# ------------------------------------------------------------------------------- generation via the runner


def test_runner_generates_single_tasks_deterministically_and_skips_multi(tmp_path, coco_root, tiny_weights):
    options = {"weights": str(tiny_weights), "steps": 2, "resolution": TINY_RESOLUTION}
    first, run_a = _run(tmp_path, "a", coco_root, **options)
    again, run_b = _run(tmp_path, "b", coco_root, **options)
    for summary in (first, again):
        assert (summary.ok, summary.skipped, summary.failed) == (2, 2, 0), summary.failures
    images = _images(run_a)
    assert len(images) == 2 and images == _images(run_b)

    records = list(read_records(run_a))
    ok = [r for r in records if r["status"] == "ok"]
    skipped = [r for r in records if r["status"] == "skipped"]
    assert {r["track"] for r in ok} == {"single"} and {r["track"] for r in skipped} == {"multi"}
    assert all(r["seconds"] > 0 and r["peak_memory_mb"] is None for r in ok)  # peak memory is measured on CUDA
    for record in skipped:
        assert "multi-subject track" in record["reason"] and "one object per image" in record["reason"]
        assert record["image"] is None
    run_info = json.loads((run_a / "run.json").read_text())
    assert run_info["capabilities"]["max_subjects"] == 1 and run_info["capabilities"]["uses_layout"] is True

    from PIL import Image

    for name in images:
        image = Image.open(run_a / "images" / name)
        assert image.size == (TINY_RESOLUTION, TINY_RESOLUTION) and image.mode == "RGB"

    # The viewpoint reaches the model: another azimuth gives other images for the same seeds.
    turned, run_turned = _run(tmp_path, "turned", coco_root, **options, azimuth=45.0)
    assert (turned.ok, turned.failed) == (2, 0), turned.failures
    other = _images(run_turned)
    assert other.keys() == images.keys() and all(other[k] != images[k] for k in images)


def test_a_resolution_the_model_cannot_take_stops_the_run_at_setup(tmp_path, coco_root, tiny_weights):
    """-M resolution=36 on a model whose latent halves once (multiples of 8): refused at setup, naming the option,
    instead of recording every single-track sample as failed."""
    from msibench.runner import MethodSetupError

    with pytest.raises(MethodSetupError, match=r"option 'resolution': resolution 36 must be a positive multiple of 8"):
        _run(tmp_path, "r", coco_root, weights=str(tiny_weights), steps=2, resolution=36)
    assert {r["status"] for r in read_records(tmp_path / "r")} <= {"skipped"}  # the multi tasks it cannot do


def _request(task, box, seed=7, subjects=1):
    from PIL import Image

    reference = Image.new("RGB", (40, 24), (200, 60, 30))
    mask = Image.new("L", reference.size, 255)
    subject = SubjectInput(task.subjects[0].category, task.subjects[0].category_id, box, 0, reference, mask)
    return GenerationRequest(task=task, sample_index=0, seed=seed, subjects=(subject,) * subjects)


def test_the_box_places_the_object(tiny_weights):
    import numpy as np

    from msibench.bench.manifest import load_manifest

    task = next(t for t in load_manifest().tasks if t.track == "single")
    method = CustomNetMethod(weights=str(tiny_weights), steps=2, resolution=TINY_RESOLUTION)
    with pytest.raises(RuntimeError, match="setup"):
        method.generate([_request(task, (0.1, 0.1, 0.5, 0.5))])
    method.setup("cpu")
    left, same, right = method.generate(
        [
            _request(task, (0.0, 0.2, 0.5, 0.8)),
            _request(task, (0.0, 0.2, 0.5, 0.8)),
            _request(task, (0.5, 0.2, 1.0, 0.8)),
        ]
    )
    assert np.array_equal(np.asarray(left), np.asarray(same))
    assert not np.array_equal(np.asarray(left), np.asarray(right))
    with pytest.raises(ValueError, match=rf"task {task.id}.*exactly one subject, got 2"):
        method.generate([_request(task, (0.0, 0.2, 0.5, 0.8), subjects=2)])
    # A request's image does not depend on the batch it came in, and its seed drives the noise.
    alone, reseeded = method.generate([_request(task, (0.5, 0.2, 1.0, 0.8)), _request(task, (0.5, 0.2, 1.0, 0.8), 8)])
    assert np.array_equal(np.asarray(alone), np.asarray(right))
    assert not np.array_equal(np.asarray(reseeded), np.asarray(right))


def test_the_method_samples_and_places_as_its_options_say(tiny_weights, monkeypatch):
    """The options the fingerprint states reach the sampler and the concat input: 5 requested steps evaluate
    (range(0, 1000, 200) + 1)[:-1] reversed = 601, 401, 201, 1 (customnet/ddim.py t_start=-1) by default and the
    whole grid with -M schedule=all-steps; the canvas is the app's square-into-box unless -M placement=dataset."""
    import torch

    from mscustomnet.model.pipeline import app_canvas, customnet_canvas, prepare_reference
    from msibench.bench.manifest import load_manifest

    task = next(t for t in load_manifest().tasks if t.track == "single")
    request = _request(task, (0.1, 0.2, 0.6, 0.7))
    s = request.subjects[0]
    loaded = CustomNetMethod(weights=str(tiny_weights), steps=5, resolution=TINY_RESOLUTION)
    loaded.setup("cpu")
    model = loaded._pipeline.model
    seen: dict = {"t": [], "layout": []}
    predict, encode = model.predict_noise, model.encode_layout
    monkeypatch.setattr(model, "predict_noise", lambda x, t, *a: (seen["t"].append(int(t[0])), predict(x, t, *a))[1])
    monkeypatch.setattr(model, "encode_layout", lambda x: (seen["layout"].append(x), encode(x))[1])
    for options, timesteps, place, fit in (
        ({}, [601, 401, 201, 1], app_canvas, "thumbnail"),
        ({"schedule": "all-steps"}, [801, 601, 401, 201, 1], app_canvas, "thumbnail"),
        ({"placement": "dataset", "reference_fit": "upscale"}, [601, 401, 201, 1], customnet_canvas, "upscale"),
    ):
        method = CustomNetMethod(weights=str(tiny_weights), steps=5, resolution=TINY_RESOLUTION, **options)
        method._pipeline = loaded._pipeline  # the same loaded model, other options
        seen["t"].clear()
        method.generate([request])
        assert seen["t"] == timesteps, options
        expected = place(prepare_reference(s.reference, s.mask, fit=fit), s.box, TINY_RESOLUTION)
        assert torch.equal(seen["layout"][-1][0], expected), options


@pytest.mark.slow
def test_full_size_official_layout_generates_a_256px_image(tmp_path, official_keys):
    """The released network at full size (1.43 G elements held as broadcast constants) through setup and one DDIM
    step at the official 256 px: the shapes of every stage (CLIP 224 input, 772-d projection, 8-channel UNet input,
    VAE) fit. About a minute on two CPU cores."""
    import torch

    from msibench.bench.manifest import load_manifest

    checkpoint = {}
    for index, (key, shape) in enumerate(official_keys.items()):
        if key.endswith("position_ids"):
            checkpoint[key] = torch.arange(shape[-1])[None]
            continue
        is_scale = key.endswith("weight") and ("norm" in key or "ln_" in key)
        value = 1.0 if is_scale else 0.01 * ((index % 7) - 3) / 3
        checkpoint[key] = torch.full((1,) * len(shape), value).expand(shape)
    checkpoint["betas"] = (torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2).float()
    path = tmp_path / "customnet_v1.pt"
    torch.save(checkpoint, path)

    task = next(t for t in load_manifest().tasks if t.track == "single")
    method = CustomNetMethod(weights=str(path), steps=2)
    method.setup("cpu")
    (image,) = method.generate([_request(task, (0.2, 0.3, 0.7, 0.8))])
    assert image.size == (256, 256) and image.mode == "RGB"
