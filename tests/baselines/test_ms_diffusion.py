"""``ms-diffusion``: options and fingerprint, missing weights, the official checkpoint layout (full-size SDXL on the
meta device), the layout masks and box features against hand-made values, and the whole generate path through the
runner with tiny random-weight SDXL / CLIP / resampler folders in the hub layout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from baselines.ms_diffusion import MSDiffusionMethod, WeightsUnavailableError
from baselines.ms_diffusion_random import (
    SDXL_UNET,
    TINY_RESOLUTION,
    TINY_TOKENS_PER_SUBJECT,
    TINY_UNET,
    resampler_config,
    write_random_weights,
)
from msibench.bench.manifest import load_manifest
from msibench.records import read_records
from msibench.runner import run_method


def manifest_words() -> set[str]:
    from msibench.bench.manifest import load_manifest

    text = " ".join(t.prompt + " " + " ".join(s.category for s in t.subjects) for t in load_manifest().tasks)
    return set(re.findall(r"[a-z]+", text.lower()))


@pytest.fixture(scope="module")
def tiny_options(tmp_path_factory) -> dict:
    return write_random_weights(tmp_path_factory.mktemp("tiny-ms-diffusion"), manifest_words())


@pytest.fixture(autouse=True)
def _no_weights_env(monkeypatch):
    monkeypatch.delenv("MSIBENCH_MS_DIFFUSION_WEIGHTS", raising=False)


def _images(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "images").glob("*.png"))}


def _run(tmp_path, name, coco_root, **options):
    run_dir = tmp_path / name
    summary = run_method(
        MSDiffusionMethod(**options), run_dir=run_dir, track="all", limit=1, coco_root=coco_root, progress=False
    )
    return summary, run_dir


# ----------------------------------------------------------------------------------------------- light


def test_import_and_capabilities_stay_light():
    code = (
        "import sys; from msibench import registry; caps = registry.build('ms-diffusion').capabilities; "
        "assert caps.max_subjects == 4 and caps.tracks == ('single', 'multi'), caps; "
        "assert caps.uses_layout and not caps.uses_zorder, caps; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_defaults_are_the_official_scripts_and_every_option_changes_the_fingerprint():
    cfg = MSDiffusionMethod(dtype="float16").config()
    assert (cfg["steps"], cfg["scale"], cfg["resolution"], cfg["guidance"]) == (30, 0.6, 1024, 7.5)
    assert cfg["negative_prompt"] == "monochrome, lowres, bad anatomy, worst quality, low quality"
    assert cfg["prompt_prefix"] == "best quality, high quality, " and cfg["reference_size"] == 512
    assert cfg["base_model"] == {
        "source": "stabilityai/stable-diffusion-xl-base-1.0",
        "revision": "462165984030d82259a11f4367a4eed129e94a7b",
    }
    assert cfg["adapter"] == {"source": "doge1516/MS-Diffusion", "weights": "ms_adapter.bin", "revision": "main"}
    variants = [{}, {"scale": 0.5}, {"dtype": "float32"}, {"steps": 20}, {"guidance": 5.0}, {"resolution": 512},
                {"reference_size": 224}, {"prompt_prefix": ""}, {"negative_prompt": ""}, {"adapter_revision": "v1"},
                {"image_encoder_revision": "v1"}, {"base_revision": "main"}]  # fmt: skip
    hashes = {MSDiffusionMethod(**{"dtype": "float16", **v}).fingerprint_hash() for v in variants}
    assert len(hashes) == len(variants)
    five = next(t for t in load_manifest().tasks if t.k == 5)
    assert "at most 4 subject(s), task has 5" in MSDiffusionMethod().can_do(five)
    assert all(MSDiffusionMethod().can_do(t) is None for t in load_manifest().tasks if t.k <= 4)
    with pytest.raises(ValueError, match="unknown option 'scales'"):
        MSDiffusionMethod(scales=1)
    with pytest.raises(ValueError, match="multiple of 8"):
        MSDiffusionMethod(resolution=100)
    with pytest.raises(ValueError, match="'scale': must be >= 0"):
        MSDiffusionMethod(scale=-1)


def test_missing_weights_name_what_to_download(tmp_path, monkeypatch, tiny_options):
    empty = tmp_path / "ms"
    empty.mkdir()
    with pytest.raises(WeightsUnavailableError, match=r"ms_adapter\.bin.*doge1516/MS-Diffusion"):
        MSDiffusionMethod(adapter=str(empty)).config()
    monkeypatch.setenv("MSIBENCH_MS_DIFFUSION_WEIGHTS", str(empty))
    with pytest.raises(WeightsUnavailableError, match=str(empty)):
        MSDiffusionMethod().config()
    monkeypatch.delenv("MSIBENCH_MS_DIFFUSION_WEIGHTS")
    fetch = re.escape("`msibench weights fetch --method ms-diffusion`")
    # Offline (tests set HF_HUB_OFFLINE=1): the hub ids cannot be fetched, each is named with its option.
    with pytest.raises(WeightsUnavailableError, match=rf"'doge1516/MS-Diffusion'.*{fetch}.*-M adapter="):
        MSDiffusionMethod(dtype="float32").setup("cpu")
    with pytest.raises(WeightsUnavailableError, match=rf"stable-diffusion-xl-base-1.0 at revision 4621659.*{fetch}"):
        MSDiffusionMethod(adapter=tiny_options["adapter"], dtype="float32").setup("cpu")
    with pytest.raises(WeightsUnavailableError, match=rf"CLIP image encoder.*laion/CLIP-ViT-bigG.*{fetch}"):
        MSDiffusionMethod(adapter=tiny_options["adapter"], base_model=tiny_options["base_model"],
                          dtype="float32").setup("cpu")  # fmt: skip


def test_weights_fetch_declares_sdxl_the_image_encoder_and_the_checkpoint():
    repos = {w.repo_id: w for w in MSDiffusionMethod.weights}
    assert set(repos) == {"stabilityai/stable-diffusion-xl-base-1.0", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
                          "doge1516/MS-Diffusion"}  # fmt: skip
    assert repos["stabilityai/stable-diffusion-xl-base-1.0"].pinned
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in repos["stabilityai/stable-diffusion-xl-base-1.0"].files
    assert repos["doge1516/MS-Diffusion"].files == ("ms_adapter.bin",)


# ----------------------------------------------------------------------------------- official key layout


def test_official_keys_and_shapes_fit_a_full_size_sdxl_unet():
    import torch
    from diffusers import UNet2DConditionModel

    from baselines.ms_diffusion_modules import MSDiffusionAdapter, ResamplerConfig, nest, official_shapes

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    shapes = official_shapes(ResamplerConfig(), unet)
    processors = {k for k in shapes if k.startswith("ms_adapter.")}
    indices = sorted({int(k.split(".")[1]) for k in processors})
    # Transformer blocks: down 2 x 2 + 2 x 10, up 3 x 10 + 3 x 2, mid 10 = 70 cross-attentions, odd indices.
    assert len(indices) == 70 and indices == list(range(1, 140, 2))
    assert shapes["ms_adapter.1.to_k_ip.weight"] == (640, 2048)  # down_blocks.1 (640 ch)
    assert shapes["ms_adapter.139.to_v_ip.weight"] == (1280, 2048)  # the mid block comes last in the official order
    assert shapes["image_proj.latent_proj.0.weight"] == (2 * (768 + 64), 768 + 64)
    assert shapes["image_proj.latent_proj.2.weight"] == (1280 * 16, 2 * (768 + 64))
    assert shapes["image_proj.proj_in.weight"] == (1280, 1664)
    assert shapes["image_proj.layers.3.0.to_kv.weight"] == (2560, 1280)
    assert shapes["dummy_image_tokens"] == (1, 4, 2048)
    resampler = {k.partition(".")[2]: torch.empty(s, device="meta") for k, s in shapes.items() if "image_proj" in k}
    assert ResamplerConfig.from_state_dict(resampler) == ResamplerConfig()

    # Loading: every official key lands on its own parameter of ours, and all of ours are covered.
    with torch.device("meta"):
        adapter = MSDiffusionAdapter(ResamplerConfig(), unet, 0.6)
    targets = adapter.official_targets()
    assert set(targets) == set(shapes)
    assert len({id(t) for t in targets.values()}) == len(targets) == len(list(adapter.parameters()))
    state = nest({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    assert set(state) == {"image_proj", "ms_adapter", "dummy_image_tokens"}


def test_a_checkpoint_that_does_not_fit_is_refused_with_the_key(tiny_options):
    import torch
    from diffusers import UNet2DConditionModel

    from baselines.ms_diffusion_modules import CheckpointLayoutError, MSDiffusionAdapter, read_checkpoint

    state = read_checkpoint(Path(tiny_options["adapter"]) / "ms_adapter.bin")
    unet = UNet2DConditionModel(**TINY_UNET)
    adapter = MSDiffusionAdapter(resampler_config("tiny"), unet, 0.6)
    adapter.load_official(state)
    proc = adapter.processors["down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"]
    assert torch.equal(proc.to_k_image.weight, state["ms_adapter"]["1.to_k_ip.weight"])
    assert torch.equal(adapter.resampler.blocks[1].ff[3].weight, state["image_proj"]["layers.1.1.3.weight"])
    assert torch.equal(adapter.background_tokens, state["dummy_image_tokens"])
    del state["ms_adapter"]["3.to_v_ip.weight"]
    with pytest.raises(CheckpointLayoutError, match=r"1 missing .*ms_adapter\.3\.to_v_ip\.weight"):
        adapter.load_official(state)
    state["ms_adapter"]["3.to_v_ip.weight"] = torch.zeros(5, 64)
    with pytest.raises(CheckpointLayoutError, match=r"ms_adapter\.3\.to_v_ip\.weight has shape \(5, 64\)"):
        adapter.load_official(state)


# ------------------------------------------------------------------------------------- masks and features


def test_layout_bias_allows_each_subject_only_inside_its_box():
    import torch

    from baselines.ms_diffusion_modules import subject_attention_bias

    # 4x4 grid; subject 0 spans x 0.1..0.5 -> cells [0, 2), y 0..0.25 -> [0, 1); subject 1 = no box (zeros).
    boxes = torch.tensor([[[0.1, 0.0, 0.5, 0.25], [0.0, 0.0, 0.0, 0.0]]])
    bias, background = subject_attention_bias(boxes, 16, tokens_per_subject=2, background_tokens=1)
    assert bias.shape == (1, 16, 1 + 2 * 2)
    inside = torch.zeros(16, dtype=torch.bool)
    inside[[0, 1]] = True  # row 0, columns 0 and 1
    assert torch.equal(background[0], ~inside)
    assert torch.equal(bias[0, :, 0] == 0, ~inside)  # the background token: only outside every box
    assert torch.equal(bias[0, :, 1] == 0, inside) and torch.equal(bias[0, :, 2] == 0, inside)
    assert (bias[0, :, 3:] == -10000).all()  # an empty box allows nothing
    with pytest.raises(ValueError, match="square latent grid"):
        subject_attention_bias(boxes, 12, 2)


def test_box_features_are_sin_cos_per_frequency_and_coordinate():
    import math

    import torch

    from baselines.ms_diffusion_modules import BoxFourierEmbedding

    box = torch.tensor([[0.1, 0.2, 0.6, 0.9]])
    out = BoxFourierEmbedding(freqs=3, temperature=100)(box)[0]
    expected = []
    for i in range(3):
        f = 100 ** (i / 3)
        expected += [math.sin(f * c) for c in box[0].tolist()] + [math.cos(f * c) for c in box[0].tolist()]
    assert torch.allclose(out, torch.tensor(expected), atol=1e-5)


# ------------------------------------------------------------------------------- generation via the runner


def test_runner_generates_both_tracks_deterministically_from_hub_layout_folders(tmp_path, coco_root, tiny_options):
    summary, run_a = _run(tmp_path, "a", coco_root, **tiny_options)
    again, run_b = _run(tmp_path, "b", coco_root, **tiny_options)
    for result in (summary, again):
        assert (result.ok, result.skipped, result.failed) == (2, 0, 0), result.failures
    images = _images(run_a)
    assert len(images) == 2 and images == _images(run_b)
    records = {r["track"]: r for r in read_records(run_a)}
    assert records["multi"]["width"] == records["multi"]["height"] == TINY_RESOLUTION
    run_json = json.loads((run_a / "run.json").read_text())
    assert len(run_json["fingerprint"]["config"]["adapter"]["weights_sha256"]) == 64
    assert run_json["capabilities"]["uses_layout"] is True
    # The subjects really condition the image: without the image attention the same seeds give other images.
    _, run_plain = _run(tmp_path, "plain", coco_root, **tiny_options, scale=0.0)
    plain = _images(run_plain)
    assert plain.keys() == images.keys() and all(plain[k] != images[k] for k in images)


def test_boxes_and_phrases_change_the_subject_tokens(tiny_options):
    """The resampler's queries come from phrase + box: moving a box or renaming a subject changes its tokens."""
    import torch
    from PIL import Image

    from baselines.ms_diffusion import subject_tokens

    method = MSDiffusionMethod(**tiny_options)
    method.setup("cpu")
    refs = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (20, 50), (30, 30, 200))]
    with torch.inference_mode():
        base = subject_tokens(method._parts, refs, ["dog", "cat"], [(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)], 512, "cpu")
        moved = subject_tokens(method._parts, refs, ["dog", "cat"], [(0, 0, 0.5, 0.5), (0.1, 0.5, 1, 1)], 512, "cpu")
        renamed = subject_tokens(method._parts, refs, ["dog", "car"], [(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)], 512, "cpu")
    n = TINY_TOKENS_PER_SUBJECT
    assert base.shape == (1, 4 + 2 * n, 64)
    assert torch.equal(base[:, : 4 + n], moved[:, : 4 + n]) and not torch.allclose(base[:, 4 + n :], moved[:, 4 + n :])
    assert not torch.allclose(base[:, 4 + n :], renamed[:, 4 + n :])


def test_default_hub_ids_load_offline_from_the_hub_cache(tmp_path, monkeypatch, tiny_options):
    """With nothing but hub ids (the defaults), offline: the three repos are read from a hub cache laid out as the
    hub's (models--org--name/snapshots/<commit>/, refs/main), the SDXL one at its pinned commit."""
    import shutil

    import torch
    from diffusers import StableDiffusionXLPipeline
    from huggingface_hub import constants

    from baselines.ms_diffusion import ADAPTER_ID, BASE_MODEL_ID, BASE_MODEL_REVISION, IMAGE_ENCODER_ID

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    sources = {BASE_MODEL_ID: "base_model", IMAGE_ENCODER_ID: "image_encoder", ADAPTER_ID: "adapter"}
    for repo_id, option in sources.items():
        root = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
        commit = BASE_MODEL_REVISION if repo_id == BASE_MODEL_ID else "0123456789abcdef0123456789abcdef01234567"
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(commit)
        if repo_id == BASE_MODEL_ID:  # the hub's SDXL files are the fp16 variant ones (what weights fetch gets)
            pipe = StableDiffusionXLPipeline.from_pretrained(tiny_options[option]).to(dtype=torch.float16)
            pipe.save_pretrained(root / "snapshots" / commit, variant="fp16")
            assert (root / "snapshots" / commit / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
        else:
            shutil.copytree(tiny_options[option], root / "snapshots" / commit)
    method = MSDiffusionMethod(steps=1, resolution=TINY_RESOLUTION, dtype="float32")
    assert method.config()["adapter"] == {"source": ADAPTER_ID, "weights": "ms_adapter.bin", "revision": "main"}
    method.setup("cpu")
    assert method._parts["pipe"].unet.config.cross_attention_dim == 64
    assert method._parts["adapter"].resampler.cfg == resampler_config("tiny")


def test_the_parity_script_needs_the_official_code(tmp_path):
    """parity/ms_diffusion.py refuses, as a usage error, a folder without the official msdiffusion package."""
    script = Path(__file__).resolve().parents[2] / "parity" / "ms_diffusion.py"
    proc = subprocess.run([sys.executable, str(script), "--official", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "official msdiffusion/ package" in proc.stderr
