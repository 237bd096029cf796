from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from baselines.ssr_encoder import SSREncoderMethod, WeightsUnavailableError
from msibench.records import read_records
from msibench.runner import run_method

# Official ModuleList index -> width of the tiny UNet's cross-attention processors (conftest.tiny_sd15_config):
# down_blocks.0 (32 ch) = 1, up_blocks.1 attentions 0/1 (32 ch) = 3/5, mid_block (64 ch) = 7. Written out by hand
# so that the test does not derive its input from the code under test.
TINY_LAYER_WIDTHS = {1: 32, 3: 32, 5: 32, 7: 64}
TINY_IMAGE_DIM = 16  # hidden size of the tiny CLIP vision tower (24 layers, so hidden_states[4::4] has 6 levels)
TINY_ALIGNER_WIDTH = 16  # 8 heads x 2
TINY_TEXT_DIM = 32  # conftest.TINY_TEXT_DIM: the tiny text encoder's width


def _official_tiny_state_dicts(text_dim: int, seed: int = 0):
    """pytorch_model.bin / pytorch_model_1.bin contents in the official key layout, tiny shapes."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    aligner = {
        "aligner.to_q.weight": rand(TINY_ALIGNER_WIDTH, text_dim),
        "aligner.to_k.weight": rand(TINY_ALIGNER_WIDTH, TINY_IMAGE_DIM),
        "norm.weight": 1 + rand(text_dim, scale=0.1),
        "norm.bias": rand(text_dim, scale=0.1),
    }
    for level in range(6):
        aligner[f"aligner.processor.to_v.{level}.weight"] = rand(TINY_ALIGNER_WIDTH, TINY_IMAGE_DIM)
        aligner[f"aligner.processor.to_out.{level}.weight"] = rand(text_dim, TINY_ALIGNER_WIDTH)
    layers = {}
    for index, width in TINY_LAYER_WIDTHS.items():
        layers[f"{index}.to_k_SSR.weight"] = rand(width, text_dim)
        layers[f"{index}.to_v_SSR.weight"] = rand(width, text_dim)
    return aligner, layers


def _write_tiny_weights(folder: Path, text_dim: int, seed: int = 0) -> Path:
    import torch

    aligner, layers = _official_tiny_state_dicts(text_dim, seed)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(aligner, folder / "pytorch_model.bin")
    torch.save(layers, folder / "pytorch_model_1.bin")
    return folder


def _write_tiny_image_encoder(folder: Path) -> Path:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=TINY_IMAGE_DIM,
            intermediate_size=32,
            num_hidden_layers=24,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory, tiny_sd15) -> dict:
    root = tmp_path_factory.mktemp("tiny-ssr")
    return {
        "weights": _write_tiny_weights(root / "ssr_model", tiny_sd15.text_dim),
        "image_encoder": _write_tiny_image_encoder(root / "image_encoder"),
    }


@pytest.fixture
def tiny_options(tiny_sd15, tiny_parts) -> dict:
    return {
        "base_model": str(tiny_sd15.path),
        "image_encoder": str(tiny_parts["image_encoder"]),
        "weights": str(tiny_parts["weights"]),
        "steps": 2,
        "resolution": tiny_sd15.resolution,
    }


@pytest.fixture(autouse=True)
def _no_weights_env(monkeypatch):
    monkeypatch.delenv("MSIBENCH_SSR_WEIGHTS", raising=False)


def _images(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "images").glob("*.png"))}


def _run(tmp_path, name, coco_root, **options):
    run_dir = tmp_path / name
    summary = run_method(
        SSREncoderMethod(**options), run_dir=run_dir, track="all", limit=1, coco_root=coco_root, progress=False
    )
    return summary, run_dir


# ----------------------------------------------------------------------------------------------- light


def test_import_and_capabilities_stay_light():
    code = (
        "import sys; from msibench import registry; caps = registry.build('ssr-encoder').capabilities; "
        "assert caps.max_subjects >= 5 and not caps.uses_layout and not caps.uses_zorder, caps; "
        "assert registry.build('ssr-encoder', {'use_layout': 'true'}).capabilities.uses_layout; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_missing_weights_say_where_to_get_them(tmp_path, monkeypatch):
    with pytest.raises(WeightsUnavailableError, match=r"drive\.google\.com.*MSIBENCH_SSR_WEIGHTS"):
        SSREncoderMethod().config()
    half = tmp_path / "ssr_model"
    half.mkdir()
    (half / "pytorch_model.bin").write_bytes(b"")
    monkeypatch.setenv("MSIBENCH_SSR_WEIGHTS", str(half))
    with pytest.raises(WeightsUnavailableError, match=r"pytorch_model_1\.bin not found"):
        SSREncoderMethod().config()


def test_options_and_fingerprint(tiny_parts):
    weights = str(tiny_parts["weights"])
    cfg = SSREncoderMethod(weights=weights).config()
    assert (cfg["scheduler"], cfg["steps"], cfg["guidance"]) == ("unipc", 30, 5.0)
    assert (cfg["resolution"], cfg["dtype"], cfg["use_layout"]) == (512, "float32", False)
    # diffusers 0.23.1 (vendored in Xiaojiu-z/SSR_Encoder@7bb5f68, diffusers/__init__.py) ends UniPC at sigma_min.
    assert cfg["scheduler_config"] == {"final_sigmas_type": "sigma_min"}
    # One subject: infer_text.py:30-32,35-46 (scale = 0.65, negative_prompt = "bad quality", generate sets the scale).
    assert cfg["one_subject"] == {"scale": 0.65, "token_scale": 1.0, "negative_prompt": "bad quality"}
    # Several: infer_multi.py (negative_prompt="", scales=[0.8, ...]) through generate_multi (ssr_encoder.py:343-378:
    # no set_scale, so the layers keep 1; every subject's tokens times scale[0]).
    assert cfg["several_subjects"] == {"scale": 1.0, "token_scale": 0.8, "negative_prompt": ""}
    text = SSREncoderMethod(weights=weights, recipe="text").config()
    assert text["one_subject"] == text["several_subjects"] == cfg["one_subject"]
    override = SSREncoderMethod(weights=weights, scale="0.5", negative_prompt="").config()
    assert override["one_subject"] == {"scale": 0.5, "token_scale": 1.0, "negative_prompt": ""}
    assert override["several_subjects"] == {"scale": 0.5, "token_scale": 0.8, "negative_prompt": ""}
    assert cfg["image_encoder"] == {
        "source": "openai/clip-vit-large-patch14",
        "revision": "32bd64288804d66eefd0ccbe215aa642df71cc41",
    }
    assert len(cfg["weights"]["aligner_sha256"]) == 64 and "source" not in cfg["weights"]
    # Every option that changes the image changes the fingerprint.
    variants = [
        {},
        {"scale": "0.8"},
        {"token_scale": "0.9"},
        {"recipe": "text"},
        {"recipe": "multi"},
        {"use_layout": "true"},
        {"use_layout": "true", "mask_weight": 5},
        {"steps": 25},
        {"guidance": 7.5},
        {"resolution": 256},
        {"scheduler": "ddim"},
        {"dtype": "float16"},
        {"negative_prompt": "ugly"},
        {"uncond_concept": " "},
        {"base_revision": "main"},
        {"image_encoder_revision": "main"},
    ]
    hashes = {SSREncoderMethod(weights=weights, **v).fingerprint_hash() for v in variants}
    assert len(hashes) == len(variants)
    with pytest.raises(ValueError, match="unknown option 'weight'"):
        SSREncoderMethod(weight="x")
    with pytest.raises(ValueError, match="dtype"):
        SSREncoderMethod(dtype="fp8")
    with pytest.raises(ValueError, match="token_scale"):
        SSREncoderMethod(token_scale=-1)
    with pytest.raises(ValueError, match="option 'scale': cannot read 'big'"):
        SSREncoderMethod(scale="big")
    with pytest.raises(ValueError, match="option 'recipe'"):
        SSREncoderMethod(recipe="demo")


# ----------------------------------------------------------------------------------- official key layout


def test_official_keys_and_shapes_map_onto_our_modules(checkpoint_keys_dir):
    """Both released files, with exactly the official keys and shapes, fill every parameter of our aligner and
    attention processors for a full-size SD1.5 UNet; nothing is ignored, nothing left over."""
    import torch
    from diffusers import UNet2DConditionModel

    from baselines import ssr_encoder_modules as modules

    spec = json.loads((checkpoint_keys_dir / "ssr_encoder.json").read_text())
    files: dict[str, dict[str, tuple[int, ...]]] = {"pytorch_model.bin": {}, "pytorch_model_1.bin": {}}
    for key, shape in spec["keys"].items():
        file, _, name = key.partition(":")
        files[file][name] = tuple(shape)
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

    # 1. The key maps cover exactly the official keys, and put each layer where the official code has it.
    assert set(modules.aligner_key_map(6)) == set(files["pytorch_model.bin"])
    layer_map = modules.layers_key_map(unet.attn_processors)
    assert set(layer_map) == set(files["pytorch_model_1.bin"])
    for index, module in spec["layer_index_to_unet_module"].items():
        assert layer_map[f"{index}.to_k_SSR.weight"] == (f"{module}.processor", "to_k_subject.weight")

    # 2. Meta tensors with the official shapes load strictly into our modules: shapes agree everywhere.
    meta = {f: {k: torch.empty(s, device="meta") for k, s in keys.items()} for f, keys in files.items()}
    aligner, processors = modules.build_ssr_modules(unet, meta["pytorch_model.bin"], meta["pytorch_model_1.bin"])
    ours = sum(p.numel() for p in aligner.parameters()) + sum(
        p.numel() for proc in processors.values() for p in proc.parameters()
    )
    assert ours == sum(math.prod(s) for keys in files.values() for s in keys.values()) == 25_593_344
    assert len(processors) == 16 and (aligner.to_q.in_features, aligner.to_k.in_features, len(aligner.to_v)) == (
        768,
        1024,
        6,
    )

    # 3. Real tensors: every one of our parameters IS the file's tensor (strict, assigned, none initialised).
    g = torch.Generator().manual_seed(0)
    real = {f: {k: torch.randn(s, generator=g).half() for k, s in keys.items()} for f, keys in files.items()}
    aligner, processors = modules.build_ssr_modules(unet, real["pytorch_model.bin"], real["pytorch_model_1.bin"])
    assert not any(p.is_meta for p in aligner.parameters())
    assert not any(p.is_meta for proc in processors.values() for p in proc.parameters())
    assert torch.equal(aligner.to_out[5].weight, real["pytorch_model.bin"]["aligner.processor.to_out.5.weight"])
    mid = processors["mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
    assert torch.equal(mid.to_v_subject.weight, real["pytorch_model_1.bin"]["31.to_v_SSR.weight"])
    first = processors["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"]
    assert torch.equal(first.to_k_subject.weight, real["pytorch_model_1.bin"]["1.to_k_SSR.weight"])

    # 4. Anything else is refused with the file and the keys named.
    aligner_sd, layers_sd = meta["pytorch_model.bin"], meta["pytorch_model_1.bin"]
    dropped = {k: v for k, v in layers_sd.items() if k != "13.to_v_SSR.weight"}
    with pytest.raises(modules.SSRLayoutError, match=r"pytorch_model_1\.bin.*1 missing.*13\.to_v_SSR"):
        modules.build_ssr_modules(unet, aligner_sd, dropped)
    extra = dict(layers_sd, **{"0.to_k_SSR.weight": torch.empty(320, 768, device="meta")})
    with pytest.raises(modules.SSRLayoutError, match=r"1 unexpected.*0\.to_k_SSR"):
        modules.build_ssr_modules(unet, aligner_sd, extra)
    wrong = dict(layers_sd, **{"3.to_k_SSR.weight": torch.empty(640, 768, device="meta")})
    with pytest.raises(modules.SSRLayoutError, match=r"another shape.*3\.to_k_SSR"):
        modules.build_ssr_modules(unet, aligner_sd, wrong)
    with pytest.raises(modules.SSRLayoutError, match="is this the aligner file"):
        modules.build_ssr_modules(unet, layers_sd, aligner_sd)


# ------------------------------------------------------------------------------------------- the maths


def test_aligner_matches_a_plain_attention_with_the_mask_query_bias():
    import torch

    from baselines import ssr_encoder_modules as modules

    torch.manual_seed(0)
    aligner = modules.SSRAligner(query_dim=12, image_dim=10, inner_dim=16, levels=3).eval()
    text = torch.randn(2, 5, 12)
    levels = [torch.randn(2, 5, 10) for _ in range(3)]  # 1 class token + a 2x2 patch grid
    coverage = modules.mask_on_patch_grid(modules.box_masks([(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 1.0)], 8), 2)
    assert coverage.tolist() == [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]]
    bias = modules.mask_query_bias(coverage, weight=5.0)
    # Official score bias: class token +1, inside the mask +w^2, outside -w.
    assert bias[0].tolist() == [1.0, 25.0, -5.0, -5.0, -5.0]
    assert modules.mask_query_bias(coverage, 1.0)[1].tolist() == [1.0, -1.0, 1.0, -1.0, 1.0]

    def reference(patch_bias):
        heads, d = 8, 2
        q = aligner.to_q(text).view(2, 5, heads, d).transpose(1, 2)
        k = aligner.to_k(levels[-1]).view(2, 5, heads, d).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        if patch_bias is not None:
            scores = scores + patch_bias[:, None, None, :]
        probs = scores.softmax(-1)
        outs = []
        for level, to_v, to_out in zip(levels, aligner.to_v, aligner.to_out, strict=True):
            v = to_v(level).view(2, 5, heads, d).transpose(1, 2)
            outs.append(to_out((probs @ v).transpose(1, 2).reshape(2, 5, heads * d)))
        return torch.nn.functional.layer_norm(
            torch.cat(outs, 1), (12,), aligner.norm.weight, aligner.norm.bias, aligner.norm.eps
        )

    with torch.no_grad():
        for patch_bias in (None, bias):
            got = aligner(text, levels, patch_bias)
            assert got.shape == (2, 15, 12)
            torch.testing.assert_close(got, reference(patch_bias), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(aligner(text, levels, bias), aligner(text, levels))


def test_box_mask_reaches_the_patch_grid_as_the_official_code_resizes_it():
    """ssr_encoder.py:498-500 (get_image_embeds_mask: ToTensor, > 0.5) and attention_processor.py:586-589
    (transforms.Resize([h, w]) of the tensor, first channel): bilinear, align_corners False, no antialias, so a
    10 px canvas on a 2 x 2 grid samples its pixels 2 and 7 (source (i + 0.5) * 5 - 0.5), written out here."""
    import torch

    from baselines import ssr_encoder_modules as modules

    masks = modules.box_masks([(0.0, 0.0, 0.3, 1.0), (0.0, 0.0, 0.25, 1.0), (0.0, 0.0, 0.75, 0.75)], 10)
    assert masks[0, 0, 0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    grid = modules.mask_on_patch_grid(masks, 2)
    # Columns 0-2 cover pixel 2, columns 0-1 do not: 1 and 0 per patch (an area average would give 0.6 and 0.4).
    assert grid[0].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert grid[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert grid[2].tolist() == [1.0, 1.0, 1.0, 1.0]  # pixel 7 lies inside columns/rows 0-7 (round(7.5) = 8)
    # Between sample points the bilinear weights show: 8 px -> 3 patches samples at 0.833, 3.5, 6.167.
    third = modules.mask_on_patch_grid(modules.box_masks([(0.0, 0.0, 0.5, 1.0)], 8), 3).view(3, 3)[0]
    torch.testing.assert_close(third, torch.tensor([1.0, 0.5, 0.0]))
    # The threshold comes first: a grey mask of 0.4 is empty, 0.6 full.
    grey = torch.tensor([0.4, 0.6]).view(2, 1, 1, 1).expand(2, 3, 4, 4)
    assert modules.mask_on_patch_grid(grey, 2).tolist() == [[0.0] * 4, [1.0] * 4]


def test_the_method_builds_its_mask_query_the_official_way(tiny_options):
    """-M use_layout=true: the box, rasterised on the 32 px canvas the encoder sees, reaches the tiny encoder's 4 x 4
    patch grid (patch 8) thresholded and resized bilinearly without antialias (attention_processor.py:586-589). A
    box over columns 0-9 (0.3 * 32 = 9.6 -> 10) is sampled at columns 3.5, 11.5, 19.5, 27.5: 1, 0, 0, 0 per row (an
    area average would give 1, 0.25, 0, 0); with mask_weight 1 the aligner's score bias (get_attention_scores_mask:
    mask_1 - mask_2) is +1 on the class token and 2m - 1 on each patch."""
    import dataclasses

    method = SSREncoderMethod(**tiny_options, use_layout=True, mask_weight=1.0)
    method.setup("cpu")
    request = _request("single-000")
    subject = dataclasses.replace(request.subjects[0], box=(0.0, 0.0, 0.3, 1.0))
    images, bias = method._subject_images(dataclasses.replace(request, subjects=(subject,)))
    assert [im.size for im in images] == [(32, 32)]
    assert bias.tolist() == [[1.0] + [1.0, -1.0, -1.0, -1.0] * 4]


def test_processor_adds_the_scaled_subject_attention_to_the_text_attention():
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from baselines.ssr_encoder_modules import SSRAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    processor = SSRAttnProcessor(hidden_size=16, cross_attention_dim=12, text_tokens=4, scale=0.0)
    hidden = torch.randn(2, 9, 16)
    text, subject = torch.randn(2, 4, 12), torch.randn(2, 6, 12)
    with torch.no_grad():
        plain = AttnProcessor2_0()(attn, hidden, encoder_hidden_states=text)
        # scale 0, or no subject tokens: exactly SD's cross-attention over the prompt.
        torch.testing.assert_close(processor(attn, hidden, torch.cat([text, subject], 1)), plain)
        processor.scale = 0.7
        torch.testing.assert_close(processor(attn, hidden, text), plain)
        got = processor(attn, hidden, torch.cat([text, subject], 1))
        q = attn.to_q(hidden).view(2, 9, 2, 8).transpose(1, 2)
        k = processor.to_k_subject(subject).view(2, 6, 2, 8).transpose(1, 2)
        v = processor.to_v_subject(subject).view(2, 6, 2, 8).transpose(1, 2)
        extra = ((q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 16)
        torch.testing.assert_close(got, plain + 0.7 * attn.to_out[0].weight.matmul(extra.unsqueeze(-1)).squeeze(-1))


def _request(task_id: str, seed: int = 3):
    import numpy as np
    from PIL import Image

    from msibench.bench.manifest import load_manifest
    from msibench.methods.base import GenerationRequest, SubjectInput

    task = load_manifest().by_id[task_id]
    rng = np.random.default_rng(0)
    subjects = tuple(
        SubjectInput(
            s.category,
            s.category_id,
            s.box,
            s.z,
            Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)),
            Image.new("L", (40, 24), 255),
        )
        for s in task.subjects
    )
    return GenerationRequest(task=task, sample_index=0, seed=seed, subjects=subjects)


def test_subject_tokens_are_the_official_ones(tiny_options):
    """The context every SSR layer receives, written out from Xiaojiu-z/SSR_Encoder@7bb5f68 (get_image_embeds,
    generate, generate_multi): [prompt (77) | subject 1 | subject 2 ...], each subject the aligner over CLIP
    hidden_states 4, 8, ..., 24 of its image with its category's SD text states as query; the negative half has the
    negative prompt, and the uncond concept "" over an all-zero pixel tensor for every subject."""
    import numpy as np
    import torch
    from PIL import Image

    method = SSREncoderMethod(**tiny_options, recipe="text")  # infer_text.py's guidance for two subjects
    method.setup("cpu")
    parts = method._parts
    pipe, encoder, aligner = parts["pipe"], parts["image_encoder"], parts["aligner"]
    seen: dict = {"pixels": []}

    def keep_pixels(module, args, kwargs):
        seen["pixels"].append(args[0] if args else kwargs["pixel_values"])

    def keep_context(module, args, kwargs):
        seen.setdefault("context", kwargs["encoder_hidden_states"])

    name = "mid_block.attentions.0.transformer_blocks.0.attn2"
    hooks = [
        encoder.register_forward_pre_hook(keep_pixels, with_kwargs=True),
        pipe.unet.get_submodule(name).register_forward_pre_hook(keep_context, with_kwargs=True),
    ]
    request = _request("multi-k2-000")
    try:
        image = method.generate([request])[0]
    finally:
        for hook in hooks:
            hook.remove()

    def text_states(texts):
        ids = pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return pipe.text_encoder(ids.input_ids)[0]

    def levels(pixels):
        states = encoder(pixels, output_hidden_states=True).hidden_states
        assert len(states) == 25  # embeddings + 24 layers, as CLIP ViT-L/14
        return [states[i] for i in (4, 8, 12, 16, 20, 24)]

    categories = [s.category for s in request.subjects]
    images, zeros = seen["pixels"]
    assert images.shape == (2, 3, 32, 32) and not zeros.any() and zeros.shape == images.shape
    # CLIPImageProcessor() of transformers 4 (the official code's PIL path) at the encoder's 32 px: each 40 x 24
    # cut-out resized bicubic on its uint8 pixels to 53 x 32, centre-cropped at x = 10, / 255, OpenAI mean/std.
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    for pixels, subject in zip(images, request.subjects, strict=True):
        resized = subject.reference.resize((53, 32), Image.Resampling.BICUBIC).crop((10, 0, 42, 32))
        expected = (torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255).permute(2, 0, 1) - mean) / std
        torch.testing.assert_close(pixels, expected, atol=2e-6, rtol=0)
    with torch.no_grad():
        cond = aligner(text_states(categories), levels(images))
        uncond = aligner(text_states(["", ""]), levels(zeros))
        prompt = text_states([request.prompt, "bad quality"])
    context = seen["context"]
    assert context.shape == (2, 77 + 2 * 6 * 77, TINY_TEXT_DIM)
    # The pipeline's CFG batch is [negative, positive].
    torch.testing.assert_close(context[1], torch.cat([prompt[0], cond[0], cond[1]]))
    torch.testing.assert_close(context[0], torch.cat([prompt[1], uncond[0], uncond[1]]))

    # The request's seed drives the noise: same seed, same image; another seed, another image.
    same, other = (np.asarray(method.generate([_request("multi-k2-000", seed)])[0]) for seed in (3, 4))
    assert np.array_equal(np.asarray(image), same) and not np.array_equal(same, other)

    assert {p.scale for p in parts["processors"]} == {0.65}
    # diffusers 0.23.1's UniPC (the official run's) ends at sigma_min, not at 0 as current diffusers by default.
    pipe.scheduler.set_timesteps(30)
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert pipe.scheduler.config.final_sigmas_type == "sigma_min" and float(pipe.scheduler.sigmas[-1]) > 0

    # The default for two subjects is infer_multi.py's: generate_multi multiplies the conditional subject tokens by
    # scale[0] = 0.8, keeps the SSR layers at scale 1 and uses the negative prompt "".
    official = SSREncoderMethod(**tiny_options)
    official._parts = parts  # the same loaded models, another option
    seen.pop("context")
    hook = pipe.unet.get_submodule(name).register_forward_pre_hook(keep_context, with_kwargs=True)
    try:
        official.generate([request])
        assert {p.scale for p in parts["processors"]} == {1.0}
        multi_context = seen.pop("context")
        official.generate([_request("single-000")])
        assert {p.scale for p in parts["processors"]} == {0.65}  # one subject: infer_text.py's set_scale(0.65)
        single_context = seen["context"]
    finally:
        hook.remove()
    with torch.no_grad():
        empty = text_states([""])[0]
    torch.testing.assert_close(multi_context[1, 77:], 0.8 * context[1, 77:])
    torch.testing.assert_close(multi_context[1, :77], context[1, :77])
    torch.testing.assert_close(multi_context[0], torch.cat([empty, uncond[0], uncond[1]]))
    torch.testing.assert_close(single_context[0, :77], prompt[1])  # "bad quality"


# ------------------------------------------------------------------------------- generation via the runner


def test_runner_generates_two_tasks_deterministically(tmp_path, coco_root, tiny_options):
    first, run_a = _run(tmp_path, "a", coco_root, **tiny_options)
    again, run_b = _run(tmp_path, "b", coco_root, **tiny_options)
    for summary in (first, again):
        assert (summary.ok, summary.skipped, summary.failed) == (2, 0, 0), summary.failures
    images = _images(run_a)
    assert len(images) == 2 and images == _images(run_b)
    records = list(read_records(run_a))
    assert {r["track"] for r in records} == {"single", "multi"} and all(r["seconds"] > 0 for r in records)
    assert json.loads((run_a / "run.json").read_text())["capabilities"]["uses_layout"] is False

    # The subject tokens condition the image: at scale 0 the same seeds give other images.
    _, run_plain = _run(tmp_path, "plain", coco_root, **tiny_options, scale=0.0)
    plain = _images(run_plain)
    assert plain.keys() == images.keys() and all(plain[k] != images[k] for k in images)

    # The layout as mask query (subject placed in its box, box as mask) changes what is encoded.
    layout, run_layout = _run(tmp_path, "layout", coco_root, **tiny_options, use_layout=True)
    assert (layout.ok, layout.failed) == (2, 0), layout.failures
    assert json.loads((run_layout / "run.json").read_text())["capabilities"]["uses_layout"] is True
    with_layout = _images(run_layout)
    assert with_layout.keys() == images.keys() and all(with_layout[k] != images[k] for k in images)
