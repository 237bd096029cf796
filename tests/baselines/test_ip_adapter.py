from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from baselines.ip_adapter import IPAdapterMethod, WeightsUnavailableError
from msibench.bench.manifest import load_manifest
from msibench.records import read_records
from msibench.runner import run_method

# Official ModuleList index -> width of the tiny UNet's cross-attention processors (conftest.tiny_sd15_config):
# down_blocks.0 (32 ch) = 1, up_blocks.1 attentions 0/1 (32 ch) = 3/5, mid_block (64 ch) = 7. Written out by hand
# so that the test does not derive its input from the code under test.
TINY_LAYER_WIDTHS = {1: 32, 3: 32, 5: 32, 7: 64}
TINY_IMAGE_EMBED_DIM = 16
TINY_TEXT_DIM = 32  # conftest.TINY_TEXT_DIM: the tiny UNet's cross_attention_dim


def _official_layout_state_dict(widths, cross_dim, embed_dim, seed=0, dtype=None):
    import torch

    g = torch.Generator().manual_seed(seed)
    image_proj = {
        "proj.weight": torch.randn(4 * cross_dim, embed_dim, generator=g) * 0.05,
        "proj.bias": torch.randn(4 * cross_dim, generator=g) * 0.05,
        "norm.weight": 1 + 0.1 * torch.randn(cross_dim, generator=g),
        "norm.bias": 0.1 * torch.randn(cross_dim, generator=g),
    }
    ip_adapter = {}
    for index, width in widths.items():
        ip_adapter[f"{index}.to_k_ip.weight"] = torch.randn(width, cross_dim, generator=g) * 0.2
        ip_adapter[f"{index}.to_v_ip.weight"] = torch.randn(width, cross_dim, generator=g) * 0.2
    state = {"image_proj": image_proj, "ip_adapter": ip_adapter}
    if dtype is not None:
        state = {part: {k: v.to(dtype) for k, v in sub.items()} for part, sub in state.items()}
    return state


def _write_tiny_adapter(root: Path, text_dim: int, seed: int = 0) -> Path:
    """A folder laid out like h94/IP-Adapter: models/ip-adapter_sd15.bin + models/image_encoder/."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            projection_dim=TINY_IMAGE_EMBED_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    )
    (root / "models").mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(root / "models" / "image_encoder")
    state = _official_layout_state_dict(TINY_LAYER_WIDTHS, text_dim, TINY_IMAGE_EMBED_DIM, seed=seed)
    torch.save(state, root / "models" / "ip-adapter_sd15.bin")
    return root


@pytest.fixture(scope="module")
def tiny_adapter_dir(tmp_path_factory, tiny_sd15) -> Path:
    return _write_tiny_adapter(tmp_path_factory.mktemp("tiny-ip-adapter"), tiny_sd15.text_dim)


@pytest.fixture
def tiny_options(tiny_sd15, tiny_adapter_dir) -> dict:
    return {
        "base_model": str(tiny_sd15.path),
        "vae": "",
        "adapter": str(tiny_adapter_dir),
        "steps": 2,
        "resolution": tiny_sd15.resolution,
    }


@pytest.fixture(autouse=True)
def _no_weights_env(monkeypatch):
    monkeypatch.delenv("MSIBENCH_IP_ADAPTER_WEIGHTS", raising=False)


def _images(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "images").glob("*.png"))}


def _run(tmp_path, name, coco_root, **options):
    run_dir = tmp_path / name
    summary = run_method(
        IPAdapterMethod(**options), run_dir=run_dir, track="all", limit=1, coco_root=coco_root, progress=False
    )
    return summary, run_dir


# ----------------------------------------------------------------------------------------------- light


def test_import_and_capabilities_stay_light():
    code = (
        "import sys; from msibench import registry; caps = registry.build('ip-adapter').capabilities; "
        "assert caps.max_subjects == 1 and caps.tracks == ('single',), caps; "
        "assert not caps.uses_layout and not caps.uses_zorder, caps; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_options_capabilities_and_fingerprint():
    method = IPAdapterMethod(use_layout="true", scale="0.7", steps="30", dtype="float32")
    caps = method.capabilities
    assert caps.uses_layout and not caps.uses_zorder and caps.max_subjects > 5
    cfg = method.config()
    assert cfg["adapter"] == {
        "source": "h94/IP-Adapter",
        "weights": "models/ip-adapter_sd15.bin",
        "image_encoder": "models/image_encoder",
        "revision": "018e402774aeeddd60609b4ecdb7e298259dc729",
    }
    assert cfg["base_model"]["source"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (cfg["scale"], cfg["steps"], cfg["dtype"], cfg["use_layout"]) == (0.7, 30, "float32", True)
    default = IPAdapterMethod(dtype="float32").config()
    assert (default["scheduler"], default["steps"], default["guidance"], default["scale"]) == ("ddim", 50, 7.5, 0.5)
    assert default["resolution"] == 512 and default["vae"]["source"] == "stabilityai/sd-vae-ft-mse"
    # Every option that changes the image changes the fingerprint.
    variants = [
        {},
        {"scale": 0.6},
        {"dtype": "float16"},
        {"adapter_revision": "main"},
        {"use_layout": True},
        {"steps": 30},
        {"guidance": 5.0},
        {"resolution": 256},
        {"scheduler": "unipc"},
        {"negative_prompt": ""},
        {"vae": ""},
        {"vae_revision": "main"},
        {"base_revision": "main"},
        {"base_model": "runwayml/stable-diffusion-v1-5"},
    ]
    hashes = {IPAdapterMethod(**{"dtype": "float32", **v}).fingerprint_hash() for v in variants}
    assert len(hashes) == len(variants)
    with pytest.raises(ValueError, match="unknown option 'scales'"):
        IPAdapterMethod(scales=1)
    with pytest.raises(ValueError, match="scheduler"):
        IPAdapterMethod(scheduler="magic")
    with pytest.raises(ValueError, match="multiple of 8"):
        IPAdapterMethod(resolution=100)


def test_the_multi_subject_skip_reason_says_how_to_enable_it():
    multi = next(t for t in load_manifest().tasks if t.track == "multi")
    reason = IPAdapterMethod().can_do(multi)
    assert "multi-subject track" in reason and "use_layout=true" in reason
    assert IPAdapterMethod(use_layout=True).can_do(multi) is None


def test_missing_weights_name_what_to_download(tmp_path, monkeypatch, tiny_adapter_dir):
    empty = tmp_path / "ip-adapter"
    empty.mkdir()
    with pytest.raises(WeightsUnavailableError, match=r"models/ip-adapter_sd15\.bin.*h94/IP-Adapter"):
        IPAdapterMethod(adapter=str(empty)).config()
    monkeypatch.setenv("MSIBENCH_IP_ADAPTER_WEIGHTS", str(empty))
    with pytest.raises(WeightsUnavailableError, match=str(empty)):
        IPAdapterMethod().config()
    monkeypatch.delenv("MSIBENCH_IP_ADAPTER_WEIGHTS")
    # Offline (tests set HF_HUB_OFFLINE=1) the hub id cannot be fetched: the error gives the fetch command.
    fetch = re.escape("`msibench weights fetch --method ip-adapter`")
    with pytest.raises(WeightsUnavailableError, match=rf"'h94/IP-Adapter' at revision 018e402.*{fetch}.*-M adapter="):
        IPAdapterMethod(dtype="float32").setup("cpu")
    # With the adapter at hand, each missing hub component is named with the fetch command and its option.
    vae = rf"VAE .*stabilityai/sd-vae-ft-mse at revision 31f26fd.*{fetch}.*-M vae="
    with pytest.raises(WeightsUnavailableError, match=vae):
        IPAdapterMethod(adapter=str(tiny_adapter_dir), dtype="float32").setup("cpu")
    base = rf"stable-diffusion-v1-5/stable-diffusion-v1-5 at revision 451f4fe.*{fetch}.*-M base_model=DIR"
    with pytest.raises(WeightsUnavailableError, match=base):
        IPAdapterMethod(adapter=str(tiny_adapter_dir), vae="", dtype="float32").setup("cpu")
    # A bare weights file is accepted, but then the image encoder has to be named as well.
    bare = IPAdapterMethod(adapter=str(tiny_adapter_dir / "models" / "ip-adapter_sd15.bin"), dtype="float32")
    assert len(bare.config()["adapter"]["weights_sha256"]) == 64
    with pytest.raises(WeightsUnavailableError, match="image_encoder=DIR"):
        bare.setup("cpu")


def test_the_image_encoder_is_the_adapters_own(tmp_path, monkeypatch, tiny_adapter_dir):
    """A models/image_encoder folder in the working directory never replaces the local adapter's or the hub's."""
    (tmp_path / "models" / "image_encoder").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    local = IPAdapterMethod(adapter=str(tiny_adapter_dir), dtype="float32")
    own = str((tiny_adapter_dir / "models" / "image_encoder").resolve())
    assert local._image_encoder_location() == (own, None)
    assert local.config()["adapter"]["image_encoder"] == own
    assert IPAdapterMethod(dtype="float32")._image_encoder_location() == ("h94/IP-Adapter", "models/image_encoder")
    # A folder named on purpose is taken from the working directory.
    (tmp_path / "vit-h").mkdir()
    named = IPAdapterMethod(image_encoder="vit-h", dtype="float32")
    assert named._image_encoder_location() == (str((tmp_path / "vit-h").resolve()), None)


# ----------------------------------------------------------------------------------- official key layout


def test_official_keys_and_shapes_load_onto_a_full_size_sd15_unet(checkpoint_keys_dir):
    """Every key of the released ip-adapter_sd15.bin lands, through diffusers' loader, on the parameter the
    official code loads it into; nothing is left over on either side."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from baselines import ip_adapter_modules as modules

    spec = json.loads((checkpoint_keys_dir / "ip_adapter_sd15.json").read_text())
    # The SD1.5 unet/config.json values that shape the adapter; built on meta, then given uninitialised storage.
    sd15 = {
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "sample_size": 64,
    }
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15)
    unet = unet.to(torch.float16).to_empty(device="cpu")

    expected = modules.expected_ip_adapter_shapes(unet, image_embed_dim=1024)
    assert expected == {k: tuple(v) for k, v in spec["keys"].items()}
    targets = modules.official_to_unet_parameters(unet)
    for index, module in spec["layer_index_to_unet_module"].items():
        assert targets[f"ip_adapter.{index}.to_k_ip.weight"] == f"{module}.processor.to_k_ip.0.weight"

    g = torch.Generator().manual_seed(0)
    flat = {k: torch.randn(v, generator=g).to(torch.float16) for k, v in spec["keys"].items()}
    state = modules.nest(flat)
    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    modules.attach_ip_adapter(pipe, state, source="ip_adapter_sd15.json")  # verifies every tensor's landing
    params = dict(unet.named_parameters())
    loaded = {n for n in params if ".processor." in n or n.startswith("encoder_hid_proj.")}
    assert loaded == set(targets.values()) and len(loaded) == len(spec["keys"]) == 36
    mid = "mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_v_ip.0.weight"
    assert torch.equal(params[mid], flat["ip_adapter.31.to_v_ip.weight"])

    # The same check refuses anything but exactly the official layout, naming the problem.
    broken = modules.nest({k: v for k, v in flat.items() if k != "ip_adapter.13.to_k_ip.weight"})
    with pytest.raises(modules.IPAdapterLayoutError, match=r"1 missing .*ip_adapter\.13\.to_k_ip\.weight"):
        modules.check_ip_adapter_state_dict(broken, unet, 1024, source="broken.bin")
    wrong = dict(flat, **{"ip_adapter.1.to_v_ip.weight": torch.empty(640, 768, dtype=torch.float16)})
    with pytest.raises(modules.IPAdapterLayoutError, match=r"another shape .*ip_adapter\.1\.to_v_ip"):
        modules.check_ip_adapter_state_dict(modules.nest(wrong), unet, 1024)
    extra = dict(flat, **{"ip_adapter.0.to_k_ip.weight": torch.empty(320, 768)})
    with pytest.raises(modules.IPAdapterLayoutError, match="1 unexpected"):
        modules.check_ip_adapter_state_dict(modules.nest(extra), unet, 1024)


def test_weights_file_formats_are_read_alike(tmp_path):
    import torch
    from safetensors.torch import save_file

    from baselines import ip_adapter_modules as modules

    state = _official_layout_state_dict({1: 8}, 4, 6)
    torch.save(state, tmp_path / "nested.bin")
    save_file(modules.flatten(state), tmp_path / "flat.safetensors")
    for name in ("nested.bin", "flat.safetensors"):
        read = modules.flatten(modules.read_ip_adapter_file(tmp_path / name))
        assert read.keys() == modules.flatten(state).keys()
        assert all(torch.equal(read[k], v) for k, v in modules.flatten(state).items())
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.bin")
    with pytest.raises(modules.IPAdapterLayoutError, match=r"other\.bin.*something"):
        modules.read_ip_adapter_file(tmp_path / "other.bin")


def test_layout_masks_cover_exactly_the_boxes():
    from baselines.ip_adapter_modules import layout_masks

    masks = layout_masks([(0.0, 0.0, 0.5, 0.5), (0.25, 0.5, 1.0, 1.0)], 32)
    assert tuple(masks.shape) == (1, 2, 32, 32)
    assert masks[0, 0, :16, :16].min() == 1 and masks[0, 0].sum() == 16 * 16
    assert masks[0, 1, 16:, 8:].min() == 1 and masks[0, 1].sum() == 16 * 24


# ------------------------------------------------------------------------------------- the official maths


def _single_request(seed: int = 3):
    import numpy as np
    from PIL import Image

    from msibench.methods.base import GenerationRequest, SubjectInput

    task = next(t for t in load_manifest().tasks if t.track == "single")
    subject = task.subjects[0]
    # Not square, textured: the centre crop and the resampling both show in the pixels.
    reference = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    mask = Image.new("L", reference.size, 255)
    inputs = SubjectInput(subject.category, subject.category_id, subject.box, 0, reference, mask)
    return GenerationRequest(task=task, sample_index=0, seed=seed, subjects=(inputs,))


def test_image_prompt_tokens_are_the_official_ones(tiny_options, tiny_adapter_dir):
    """What the UNet's image attention receives, written out from tencent-ailab/IP-Adapter@62e4af9
    (ip_adapter/ip_adapter.py): pixels from CLIPImageProcessor() defaults (short side resized bicubic, centre crop,
    OpenAI CLIP mean/std), CLIP ``image_embeds``, ImageProjModel = LayerNorm(proj(e).reshape(-1, 4, dim)) with 4
    tokens; the negative branch is the projection of all-zero embeddings (get_image_embeds)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    method = IPAdapterMethod(**tiny_options, dtype="float32")
    method.setup("cpu")
    pipe = method._pipe
    seen: dict = {}

    def keep_pixels(module, args, kwargs):
        seen.setdefault("pixels", args[0] if args else kwargs["pixel_values"])

    def keep_tokens(module, args, out):
        seen.setdefault("tokens", (args[0][0], out[0]))  # first denoising step, adapter 0

    hooks = [
        pipe.image_encoder.register_forward_pre_hook(keep_pixels, with_kwargs=True),
        pipe.unet.encoder_hid_proj.register_forward_hook(keep_tokens),
    ]
    request = _single_request()
    try:
        method.generate([request])
    finally:
        for hook in hooks:
            hook.remove()

    # CLIPImageProcessor() at the encoder's input size: 40x24 -> 53x32 (bicubic) -> centre 32x32, normalised.
    resized = request.subjects[0].reference.resize((53, 32), Image.Resampling.BICUBIC).crop((10, 0, 42, 32))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    expected_pixels = (torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255).permute(2, 0, 1) - mean) / std
    assert seen["pixels"].shape == (1, 3, 32, 32)
    # The PIL path of transformers 4 (the official code's): PIL's uint8 resize, whatever transformers is installed.
    torch.testing.assert_close(seen["pixels"][0], expected_pixels, atol=2e-6, rtol=0)

    state = torch.load(tiny_adapter_dir / "models" / "ip-adapter_sd15.bin", weights_only=True)["image_proj"]
    dim = TINY_TEXT_DIM

    def image_proj_model(embeds):
        tokens = F.linear(embeds, state["proj.weight"], state["proj.bias"]).reshape(-1, 4, dim)
        return F.layer_norm(tokens, (dim,), state["norm.weight"], state["norm.bias"])

    with torch.no_grad():
        clip_embeds = pipe.image_encoder(seen["pixels"]).image_embeds
    embeds_in, tokens = seen["tokens"]
    # Classifier-free guidance batch: [negative, positive], one image each.
    torch.testing.assert_close(embeds_in, torch.cat([torch.zeros_like(clip_embeds), clip_embeds])[:, None])
    assert tokens.shape == (2, 1, 4, dim)
    torch.testing.assert_close(tokens[1, 0], image_proj_model(clip_embeds)[0])
    torch.testing.assert_close(tokens[0, 0], image_proj_model(torch.zeros_like(clip_embeds))[0])

    # The request's seed drives the noise: same seed, same image; another seed, another image.
    same, other = (np.asarray(method.generate([_single_request(seed)])[0]) for seed in (3, 4))
    first = np.asarray(method.generate([request])[0])
    assert np.array_equal(first, same) and not np.array_equal(first, other)


# ------------------------------------------------------------------------------- generation via the runner


def test_runner_generates_two_tasks_deterministically(tmp_path, coco_root, tiny_options):
    # With layout masks both tracks run; the same command into another folder gives the same bytes.
    summary, run_a = _run(tmp_path, "layout-a", coco_root, **tiny_options, use_layout=True)
    again, run_b = _run(tmp_path, "layout-b", coco_root, **tiny_options, use_layout=True)
    for result in (summary, again):
        assert (result.ok, result.skipped, result.failed) == (2, 0, 0), result.failures
    images = _images(run_a)
    assert len(images) == 2 and images == _images(run_b)
    records = {r["track"]: r for r in read_records(run_a)}
    assert all(r["status"] == "ok" and r["seconds"] > 0 for r in records.values())
    assert records["single"]["width"] == records["single"]["height"] == tiny_options["resolution"]
    run_json = json.loads((run_a / "run.json").read_text())
    assert run_json["fingerprint"]["config"]["adapter"]["weights_sha256"]
    assert run_json["capabilities"]["uses_layout"] is True

    # The paper's single-subject use: the multi task is skipped with its reason, the single one is unmasked,
    # which changes the image w.r.t. the box-restricted one.
    default, run_default = _run(tmp_path, "default", coco_root, **tiny_options)
    assert (default.ok, default.skipped, default.failed) == (1, 1, 0), default.failures
    skipped = next(r for r in read_records(run_default) if r["status"] == "skipped")
    assert skipped["track"] == "multi" and "use_layout=true" in skipped["reason"]
    single = next(name for name in images if name.startswith("single"))
    assert list(_images(run_default)) == [single] and _images(run_default)[single] != images[single]

    # The adapter really conditions the image: without it (scale 0) the same seeds give other images.
    _, run_plain = _run(tmp_path, "plain", coco_root, **tiny_options, use_layout=True, scale=0.0)
    plain = _images(run_plain)
    assert plain.keys() == images.keys() and all(plain[k] != images[k] for k in images)
