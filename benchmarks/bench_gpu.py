"""What a Table I run costs on one device: scoring throughput, and every method's seconds per image and peak memory.

One prepared script for one CUDA device, meant to finish in under 10 minutes (``--size real``, the default):

1. Scoring: the real scorer architectures (YOLO11x-seg at 640, DINO ViT-S/16, CLIP ViT-B/32) with random weights,
   batch 32, on paste images of the MSIBench tasks (512 px): images per second, per track.
2. Methods: every registered method built at its real size with random weights, written to disk in its official
   folder layout and loaded through its own ``setup`` (the real loader path), then ``generate`` on MSIBench tasks
   of each track it supports, at its default steps, resolution and dtype: seconds per image (after one untimed
   warm-up batch) and peak memory (CUDA: ``max_memory_allocated`` from before ``setup``; CPU: the process's max
   RSS). Each method runs in its own subprocess, so its memory is its own. UNO at real size is the exception to
   "written to disk": FLUX.1-dev + its rank-512 LoRA (12.86 G parameters) and T5-XXL are made in bfloat16 on the
   device and handed to ``UNOMethod.load_components`` (setup's key mapping and assembly, minus reading 24 GB).

Random weights cost what trained ones cost; what they cannot show is quality. References are synthetic cut-outs of
each subject's recorded size (no COCO data needed on the device), so every task's shapes are the real ones.
With random YOLO weights nothing is detected at conf 0.25: subject crops fall back to the whole image, so the
scoring figure omits mask decoding (a few ms per subject).

Real-size configurations: SD1.5 (diffusers' UNet2DConditionModel defaults with cross_attention_dim 768 and 8 heads,
the SD VAE, CLIP ViT-L/14 text), CLIP ViT-H/14 (IP-Adapter), ViT-L/14 (SSR-Encoder), ViT-bigG/14 text and vision
(λ-ECLIPSE), the Kandinsky 2.2 decoder UNet and MoVQ, the λ-ECLIPSE prior's official config, CustomNet /
MS-CustomNet from mscustomnet.model.config, MS-Diffusion's SDXL (UNet, VAE, ViT-L/14 + ViT-bigG/14 text),
ViT-bigG/14 vision and resampler from baselines.ms_diffusion_random. The Kandinsky and CLIP-bigG values are written
from their published config files as recalled here (no hub access where this was written): check them against the
hub when online.
Tokenizers are small BPE vocabularies covering the benchmark's words (the real vocab files are not here); prompts
are padded to 77 tokens either way, so the cost is the same. IP-Adapter keeps the base model's VAE (the default
swaps in sd-vae-ft-mse, of the same architecture).

    python benchmarks/bench_gpu.py --device cuda --out results/benchmarks/gpu        # on the GPU machine
    python benchmarks/bench_gpu.py --size tiny --device cpu --out /tmp/gpu-tiny      # the test suite's smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
METHODS = (
    "paste",
    "ip-adapter",
    "lambda-eclipse",
    "ssr-encoder",
    "customnet",
    "mscustomnet",
    "ms-diffusion",
    "uno",
    "qwen-image-edit",
)
TINY_RES = 32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("real", "tiny"), default="real")
    p.add_argument("--device", default="cuda")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated registered methods")
    p.add_argument("--tasks", type=int, default=2, help="timed tasks per track and method (after one warm-up)")
    p.add_argument("--score-images", type=int, default=128, help="images per track for the scoring throughput")
    p.add_argument("--score-batch", type=int, default=32)
    p.add_argument("--out", type=Path, default=None, help="folder for gpu.json and gpu.md")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one method, in a subprocess
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- the requests


def synthetic_reference(size: tuple[int, int], seed: int):
    """A coloured ellipse on white and its mask, of the reference's recorded size."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    colour = tuple(rng.randrange(30, 220) for _ in range(3))
    image = Image.new("RGB", size, (255, 255, 255))
    mask = Image.new("L", size, 0)
    for canvas, fill in ((image, colour), (mask, 255)):
        ImageDraw.Draw(canvas).ellipse((0, 0, size[0] - 1, size[1] - 1), fill=fill)
    return image, mask


def requests_for(tasks):
    from msibench.methods.base import GenerationRequest, SubjectInput
    from msibench.runner import sample_seed

    out = []
    for task in tasks:
        subjects = []
        for j, s in enumerate(task.subjects):
            ref, mask = synthetic_reference(s.reference.size, j)
            subjects.append(SubjectInput(s.category, s.category_id, tuple(s.box), s.z, ref, mask))
        out.append(GenerationRequest(task, 0, sample_seed(0, task.id, 0), tuple(subjects)))
    return out


def pick_tasks(manifest, track: str, n: int, can_do=None):
    """``n`` tasks of ``track`` (that ``can_do`` accepts, when given); for multi, K spread over the accepted range
    (2 to 5 for a method without a subject limit)."""
    tasks = [t for t in manifest.tasks if t.track == track and (can_do is None or can_do(t) is None)]
    if not tasks:
        return []
    if track == "single":
        return tasks[:n]
    by_k: dict[int, list] = {}
    for t in tasks:
        by_k.setdefault(t.k, []).append(t)
    ks = sorted(by_k)
    picked = [by_k[ks[round(i * (len(ks) - 1) / max(1, n - 1))]][i] for i in range(n)] if n > 1 else [by_k[ks[-1]][0]]
    return picked


# ------------------------------------------------------------------------------------- components, by size


def benchmark_words() -> set[str]:
    """The words of the benchmark's prompts and categories."""
    from msibench.bench.manifest import load_manifest

    text = " ".join(t.prompt + " " + " ".join(s.category for s in t.subjects) for t in load_manifest().tasks)
    return set(re.findall(r"[a-z]+", text.lower())) | {"a", "photo", "of"}


def tokenizer(folder: Path):
    """A CLIPTokenizer whose BPE merges spell out the benchmark's words (each word one token)."""
    from baselines.testing import bpe_clip_tokenizer

    return bpe_clip_tokenizer(folder, benchmark_words())


def clip_text_config(size: str, vocab: int, **kw):
    from transformers import CLIPTextConfig

    special = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, "max_position_embeddings": 77}
    if size == "tiny":
        dims = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    else:  # CLIP ViT-L/14 text (SD1.5) unless overridden (bigG: see lambda_eclipse)
        dims = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12}
    return CLIPTextConfig(vocab_size=49408 if size == "real" else vocab, **{**special, **dims, **kw})


VISION = {  # CLIP vision towers at real size: (hidden, intermediate, heads, layers, patch, projection)
    "vit-l-14": (1024, 4096, 16, 24, 14, 768),
    "vit-h-14": (1280, 5120, 16, 32, 14, 1024),
    "vit-bigg-14": (1664, 8192, 16, 48, 14, 1280),
}


def clip_vision_config(size: str, kind: str, *, tiny_layers: int = 2, tiny_hidden: int = 32, tiny_proj: int = 16):
    from transformers import CLIPVisionConfig

    if size == "tiny":
        return CLIPVisionConfig(hidden_size=tiny_hidden, intermediate_size=37, num_attention_heads=4,
                                num_hidden_layers=tiny_layers, image_size=32, patch_size=8,
                                projection_dim=tiny_proj)  # fmt: skip
    hidden, inter, heads, layers, patch, proj = VISION[kind]
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                            num_hidden_layers=layers, image_size=224, patch_size=patch, projection_dim=proj,
                            hidden_act="gelu")  # fmt: skip


def sd15_pipeline(size: str, root: Path, dtype=None):
    """A saved StableDiffusionPipeline folder (SD1.5 at real size) and its UNet."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    if size == "tiny":
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=TINY_RES // 2,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=4, norm_num_groups=8)  # fmt: skip
        vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                            norm_num_groups=8)  # fmt: skip
    else:
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            sample_size=512)  # fmt: skip
    tok = tokenizer(root / "_vocab")
    text = CLIPTextModel(clip_text_config(size, len(tok)))
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", set_alpha_to_one=False, skip_prk_steps=True,
                              steps_offset=1)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)  # fmt: skip
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.save_pretrained(root / "sd15")
    return root / "sd15", unet


def default_dtype(name: str) -> str:
    """The dtype a method runs in on CUDA with its default options ("auto" resolves to float16 there)."""
    from msibench import registry

    options = getattr(registry.resolve(name), "DEFAULTS", None)
    if options is None:
        module = sys.modules[registry.resolve(name).__module__]
        options = module._default_options() if hasattr(module, "_default_options") else {}
    dtype = str(options.get("dtype", "float32"))
    return "float16" if dtype == "auto" else dtype


def build(name: str, size: str, root: Path, device: str = "cpu") -> dict[str, Any]:
    """Write ``name``'s weights (random, at ``size``) under ``root``; return its -M options (and, for a method built
    in memory on ``device``, the model under ``"_pipeline"``)."""
    import torch

    torch.manual_seed(0)
    tiny = {"steps": 2, "resolution": TINY_RES} if size == "tiny" else {}
    # Methods that run in float16 by default get float16 files at real size: half the bytes to write and read.
    half = torch.float16 if size == "real" and default_dtype(name) == "float16" else None
    if name == "paste":
        return {"resolution": 64} if size == "tiny" else {}
    if name == "ip-adapter":
        from transformers import CLIPVisionModelWithProjection

        from baselines.ip_adapter_modules import expected_ip_adapter_shapes, nest

        base, unet = sd15_pipeline(size, root, half)
        vision = clip_vision_config(size, "vit-h-14")
        encoder = CLIPVisionModelWithProjection(vision).to(half or torch.float32)
        encoder.save_pretrained(root / "adapter" / "models" / "image_encoder")
        shapes = expected_ip_adapter_shapes(unet, vision.projection_dim)
        torch.save(nest({k: torch.randn(s, dtype=half or torch.float32) * 0.02 for k, s in shapes.items()}),
                   root / "adapter" / "models" / "ip-adapter_sd15.bin")  # fmt: skip
        return {"base_model": str(base), "vae": "", "adapter": str(root / "adapter"), **tiny}
    if name == "ssr-encoder":
        from transformers import CLIPVisionModel

        from baselines.ssr_encoder_modules import layers_key_map, processor_width

        base, unet = sd15_pipeline(size, root)
        vision = clip_vision_config(size, "vit-l-14", tiny_layers=24, tiny_hidden=16)
        CLIPVisionModel(vision).save_pretrained(root / "image_encoder")
        cross, inner = unet.config.cross_attention_dim, 512 if size == "real" else 16
        aligner = {"aligner.to_q.weight": torch.randn(inner, cross) * 0.02,
                   "aligner.to_k.weight": torch.randn(inner, vision.hidden_size) * 0.02,
                   "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}  # fmt: skip
        for level in range(6):
            aligner[f"aligner.processor.to_v.{level}.weight"] = torch.randn(inner, vision.hidden_size) * 0.02
            aligner[f"aligner.processor.to_out.{level}.weight"] = torch.randn(cross, inner) * 0.02
        channels = list(unet.config.block_out_channels)
        layers = {k: torch.randn(processor_width(proc, channels), cross) * 0.02
                  for k, (proc, _) in layers_key_map(unet.attn_processors).items()}  # fmt: skip
        (root / "ssr").mkdir()
        torch.save(aligner, root / "ssr" / "pytorch_model.bin")
        torch.save(layers, root / "ssr" / "pytorch_model_1.bin")
        return {"base_model": str(base), "image_encoder": str(root / "image_encoder"), "weights": str(root / "ssr"),
                **tiny}  # fmt: skip
    if name == "lambda-eclipse":
        return build_lambda_eclipse(size, root, tiny, half)
    if name == "ms-diffusion":
        from baselines.ms_diffusion_random import write_random_weights

        options = write_random_weights(root, benchmark_words(), size, half)
        return {**options, **tiny}
    if name == "qwen-image-edit":
        return build_qwen_image_edit(size, root, tiny, device)
    if name in ("customnet", "mscustomnet"):
        from mscustomnet.model.config import customnet_config, mscustomnet_config, tiny_config
        from mscustomnet.model.io import save_model
        from mscustomnet.model.network import CustomNetModel

        multi = name == "mscustomnet"
        if size == "tiny":
            config = tiny_config(multi_subject=multi, resolution=TINY_RES)
        else:
            config = mscustomnet_config() if multi else customnet_config()
        folder = save_model(CustomNetModel(config).eval(), root / "model")
        return {"weights": str(folder), **tiny}
    if name == "uno":
        if size == "real":
            return {}  # built on the device by load_uno_in_memory: 24 GB of FLUX files would cost more than the run
        from baselines.testing import tiny_uno_folders

        folders = tiny_uno_folders(root / "uno")
        return {"flux": str(folders["flux"]), "lora": str(folders["uno"]), "t5": str(folders["t5"]),
                "clip": str(folders["clip"]), "ref_long_side_single": 64, "ref_long_side_multi": 48,
                "dtype": "float32", **tiny}  # fmt: skip
    raise ValueError(f"no random-weight builder for method {name!r}")


def load_uno_in_memory(method, device: str) -> None:
    """UNO at real size, bfloat16, made on the device: FLUX.1-dev + the rank-512 LoRA (12.9 G parameters) as
    random state dicts in the official layouts, the FLUX autoencoder, T5-XXL v1.1 and CLIP ViT-L/14 text, handed
    to ``UNOMethod.load_components`` (the key mapping and assembly of ``setup``, without writing and reading the
    files). The tokenizers are small vocabularies; T5 pads to 512 tokens and CLIP to 77 either way."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

    from baselines import uno_modules as m

    dev, bf16 = torch.device(device), torch.bfloat16
    gen = torch.Generator(dev).manual_seed(0)

    def random(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
        out = {}
        for key, shape in shapes.items():
            t = torch.randn(shape, generator=gen, device=dev, dtype=bf16).mul_(
                shape[-1] ** -0.5 if len(shape) > 1 else 0.1
            )
            out[key] = t.add_(1.0) if key.endswith(".scale") else t
        return out

    config = m.FLUX_DEV_TRANSFORMER
    flux, lora = random(m.official_flux_shapes(config)), random(m.official_lora_shapes(config, 512))
    with torch.device(dev):
        ae = m.official_ae_state_dict(AutoencoderKL(**m.FLUX_AE))
    default = torch.get_default_dtype()
    torch.set_default_dtype(bf16)  # build the 4.7 G-parameter T5 in bfloat16 directly
    try:
        with torch.device(dev):  # google/t5-v1_1-xxl (the xflux_text_encoders config)
            t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                         num_heads=64, feed_forward_proj="gated-gelu"))  # fmt: skip
            clip = CLIPTextModel(clip_text_config("real", 49408))
    finally:
        torch.set_default_dtype(default)
    words = "a an the of on in with and photo".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + [("\u2581", -3.0)]
    method.load_components(flux=flux, lora=lora, ae=ae, t5=t5, t5_tokenizer=T5Tokenizer(vocab=vocab, extra_ids=0),
                           clip=clip, clip_tokenizer=tokenizer(Path(tempfile.mkdtemp()) / "_vocab"),
                           device=device)  # fmt: skip


# Methods whose real-size weights are made on the device instead of written to files and read back by setup().
IN_MEMORY = {"uno": load_uno_in_memory}


def build_lambda_eclipse(size: str, root: Path, tiny: dict[str, Any], half) -> dict[str, Any]:
    import torch
    from diffusers import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel
    from transformers import CLIPImageProcessor, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from baselines.lambda_eclipse_prior import LambdaEclipsePrior, LambdaPriorConfig, save_prior

    dim = 32 if size == "tiny" else 1280  # prior embedding = CLIP projections = decoder encoder_hid_dim
    prior_cfg = LambdaPriorConfig(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=dim) \
        if size == "tiny" else LambdaPriorConfig()  # fmt: skip
    dtype = half or torch.float32
    save_prior(LambdaEclipsePrior(prior_cfg).to(dtype), root / "prior")
    tok = tokenizer(root / "_vocab")
    big = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32}
    text_cfg = clip_text_config(size, len(tok), projection_dim=dim, **({} if size == "tiny" else big))
    CLIPTextModelWithProjection(text_cfg).to(dtype).save_pretrained(root / "text_encoder")
    tok.save_pretrained(root / "text_encoder")
    vision = clip_vision_config(size, "vit-bigg-14", tiny_proj=dim)
    CLIPVisionModelWithProjection(vision).to(dtype).save_pretrained(root / "image_prior" / "image_encoder")
    px = vision.image_size
    CLIPImageProcessor(size={"shortest_edge": px}, crop_size={"height": px, "width": px}).save_pretrained(
        root / "image_prior" / "image_processor"
    )
    if size == "tiny":
        unet = UNet2DConditionModel(in_channels=4, out_channels=8, addition_embed_type="image", encoder_hid_dim=dim,
                                    encoder_hid_dim_type="image_proj",
                                    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                                    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                                    mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(8, 16),
                                    layers_per_block=1, cross_attention_dim=16, attention_head_dim=4,
                                    resnet_time_scale_shift="scale_shift", norm_num_groups=4)  # fmt: skip
        movq = VQModel(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                       up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
                       layers_per_block=1, norm_num_groups=8, norm_type="spatial", num_vq_embeddings=12,
                       vq_embed_dim=4)  # fmt: skip
    else:  # kandinsky-community/kandinsky-2-2-decoder unet/ and movq/ configs
        unet = UNet2DConditionModel(in_channels=4, out_channels=8, addition_embed_type="image", encoder_hid_dim=dim,
                                    encoder_hid_dim_type="image_proj",
                                    down_block_types=("ResnetDownsampleBlock2D", *("SimpleCrossAttnDownBlock2D",) * 3),
                                    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
                                    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                                    block_out_channels=(384, 768, 1152, 1536), layers_per_block=3,
                                    cross_attention_dim=768, attention_head_dim=64,
                                    resnet_time_scale_shift="scale_shift", sample_size=64)  # fmt: skip
        movq = VQModel(block_out_channels=(128, 256, 256, 512),
                       down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
                       up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3, latent_channels=4,
                       layers_per_block=2, norm_type="spatial", num_vq_embeddings=16384, vq_embed_dim=4)  # fmt: skip
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, steps_offset=1, prediction_type="epsilon")  # fmt: skip
    KandinskyV22Pipeline(unet=unet.to(dtype), scheduler=scheduler, movq=movq.to(dtype)).save_pretrained(
        root / "decoder"
    )
    extra = {"dtype": "float32", **tiny} if size == "tiny" else {}
    return {"prior": str(root / "prior"), "text_encoder": str(root / "text_encoder"),
            "image_encoder": str(root / "image_prior"), "decoder": str(root / "decoder"), **extra}  # fmt: skip


def qwen_image_edit_components(device: str, dtype) -> dict[str, Any]:
    """Qwen-Image-Edit-2511 at real size with random weights, built on ``device`` in ``dtype``: the transformer is
    diffusers' QwenImageTransformer2DModel defaults (60 layers, 24 x 128 heads, joint_attention_dim 3584) with
    2511's zero_cond_t; the VAE AutoencoderKLQwenImage's defaults; the text encoder Qwen2.5-VL-7B-Instruct's
    configuration as recalled here (no hub access: check it against text_encoder/config.json when online). The
    tokenizer is byte-level (baselines.testing.byte_qwen2_processor): prompts are ~4x more tokens than the real BPE,
    a few hundred text tokens beside thousands of image tokens."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from baselines.testing import QWEN_SPECIAL_TOKENS, byte_qwen2_processor

    processor = byte_qwen2_processor()
    ids = dict(zip(QWEN_SPECIAL_TOKENS, processor.tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS)),
                   strict=True))  # fmt: skip
    text = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 128000, "tie_word_embeddings": False,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24], "rope_type": "default"}}  # fmt: skip
    vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
              "fullatt_block_indexes": [7, 15, 23, 31]}  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, vocab_size=152064,
                              vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                              image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"])  # fmt: skip
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the run's dtype: 27 B parameters never exist in float32
    try:
        with torch.device(device):
            transformer = QwenImageTransformer2DModel(zero_cond_t=True)
            vae = AutoencoderKLQwenImage()
            text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return {"transformer": transformer.eval(), "vae": vae.eval(),
            "text_encoder": text_encoder.to(dtype).eval(), "tokenizer": processor.tokenizer, "processor": processor,
            "scheduler": FlowMatchEulerDiscreteScheduler()}  # fmt: skip


def build_qwen_image_edit(size: str, root: Path, tiny: dict[str, Any], device: str) -> dict[str, Any]:
    """Tiny: the test pipeline saved in the hub layout and loaded by setup; its reference areas shrunk to 64^2 (the
    pipeline resizes every reference to a 1024^2 area whatever the model's width). Real: built on the device and
    handed to the method (QwenImageEditMethod.from_pipeline): writing and reading 57 GB of bf16 would cost more than
    this script's budget, so its setup_s excludes loading."""
    import torch
    from diffusers import QwenImageEditPlusPipeline

    if size == "tiny":
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

        from baselines.testing import tiny_qwen_image_edit_pipeline

        plus.CONDITION_IMAGE_SIZE = plus.VAE_IMAGE_SIZE = 64 * 64
        tiny_qwen_image_edit_pipeline().save_pretrained(root / "qwen-image-edit")
        return {"model": str(root / "qwen-image-edit"), "dtype": "float32", **tiny}
    return {"_pipeline": QwenImageEditPlusPipeline(**qwen_image_edit_components(device, torch.bfloat16))}


# ------------------------------------------------------------------------------------------------ timings


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _reset_peak_rss() -> None:
    """Forget the high-water mark of resident memory inherited from the parent (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:  # VmHWM: this process's peak resident memory since _reset_peak_rss
        status = Path("/proc/self/status").read_text()
        return round(int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024, 1)
    except (OSError, AttributeError):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def time_method(name: str, args) -> dict[str, Any]:
    """Build, load and time one method (run in its own process)."""
    import torch

    from msibench import registry
    from msibench.bench.manifest import load_manifest

    root = Path(tempfile.mkdtemp(prefix=f"gpu-{name}-", dir=args.workdir))
    start = time.perf_counter()
    options = build(name, args.size, root, args.device)
    built = time.perf_counter() - start
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(args.device)
    pipeline = options.pop("_pipeline", None)
    if pipeline is not None:  # built in memory on the device: its weights count in the peak (they stay allocated)
        method = registry.resolve(name).from_pipeline(pipeline, **options)
    else:
        method = registry.build(name, options)
    start = time.perf_counter()
    if args.size == "real" and name in IN_MEMORY:
        IN_MEMORY[name](method, args.device)
    else:
        method.setup(args.device)
    _sync(args.device)
    setup_s = time.perf_counter() - start
    manifest = load_manifest()
    out: dict[str, Any] = {"method": name, "config": method.config(), "build_s": round(built, 1),
                           "setup_s": round(setup_s, 1), "tracks": {}}  # fmt: skip
    for track in ("single", "multi"):
        tasks = (
            pick_tasks(manifest, track, args.tasks + 1, method.can_do) if track in method.capabilities.tracks else []
        )
        if len(tasks) < 2:
            continue
        warm, timed = requests_for(tasks[:1]), requests_for(tasks[1:])
        method.generate(warm)  # one-off costs (kernel selection, allocator) belong to no image
        _sync(args.device)
        size = max(1, int(getattr(method, "batch_size", 1)))
        start = time.perf_counter()
        for b in range(0, len(timed), size):
            images = method.generate(timed[b : b + size])
            assert len(images) == len(timed[b : b + size])
        _sync(args.device)
        out["tracks"][track] = {
            "images": len(timed),
            "k": [r.task.k for r in timed],
            "s_per_image": round((time.perf_counter() - start) / len(timed), 3),
        }
    out["peak_memory_mb"] = _peak_mb(args.device)
    return out


def time_scoring(args) -> dict[str, Any]:
    """Images per second of the real-size scorer (random weights), per track, on paste images."""
    import hashlib

    import torch

    from msibench.bench.manifest import load_manifest
    from msibench.methods.paste import PasteMethod
    from msibench.scoring.scorer import ScoreItem, Scorer, ScorerConfig

    manifest = load_manifest()
    if args.size == "tiny":
        cfg = ScorerConfig(detector="yolo11n-seg.yaml", dino="random", clip="random", imgsz=160,
                           batch_size=args.score_batch)  # fmt: skip
    else:
        cfg = ScorerConfig(detector="yolo11x-seg.yaml", dino="random", clip="random", batch_size=args.score_batch)
    scorer = Scorer(cfg, device=args.device, feature_cache=False)
    scorer.setup()
    paste = PasteMethod(resolution=512 if args.size == "real" else 64)
    refs_dir = Path(tempfile.mkdtemp(prefix="gpu-refs-", dir=args.workdir))
    out = {}
    for track in ("single", "multi"):
        tasks = [t for t in manifest.tasks if t.track == track]
        tasks = (tasks * (args.score_images // len(tasks) + 1))[: args.score_images]
        items = []
        for n, request in enumerate(requests_for(tasks)):
            refs = []
            for j, s in enumerate(request.subjects):
                path = refs_dir / f"{request.task.id}_{j}.png"
                if not path.exists():
                    s.reference.save(path)
                refs.append((hashlib.sha256(path.read_bytes()).hexdigest(), path))
            items.append(ScoreItem(request.task, {"sample_index": n}, paste.generate([request])[0], f"{n}", refs))
        scorer.warm_references({sha: p for it in items for sha, p in it.references})
        scorer.score_batch(items[: min(len(items), args.score_batch)])  # warm-up
        _sync(args.device)
        start = time.perf_counter()
        for b in range(0, len(items), args.score_batch):
            scorer.score_batch(items[b : b + args.score_batch])
        _sync(args.device)
        seconds = time.perf_counter() - start
        out[track] = {"images": len(items), "img_per_s": round(len(items) / seconds, 2)}
    out["threads"] = torch.get_num_threads()
    return out


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_gpu_"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MSIBENCH_CACHE", str(args.workdir / "cache"))
    if args.only:  # child process: one method, JSON on the last line of stdout
        _reset_peak_rss()
        print(json.dumps(time_method(args.only, args)))
        return {}
    import torch

    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"{device_name}, size {args.size}, torch {torch.__version__}", flush=True)
    command = " ".join(["python", "benchmarks/bench_gpu.py", *(sys.argv[1:] if argv is None else argv)])
    result: dict[str, Any] = {"device": device_name, "size": args.size, "torch": torch.__version__,
                              "command": command, "methods": {}}  # fmt: skip
    start = time.perf_counter()
    result["scoring"] = time_scoring(args)
    print(f"scoring: {json.dumps(result['scoring'])} ({time.perf_counter() - start:.0f} s)", flush=True)
    base = [sys.executable, str(Path(__file__).resolve()), "--size", args.size, "--device", args.device,
            "--tasks", str(args.tasks), "--workdir", str(args.workdir)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for name in [m for m in args.methods.split(",") if m]:
        start = time.perf_counter()
        proc = subprocess.run([*base, "--only", name], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            result["methods"][name] = {"method": name, "error": " | ".join(tail)}
        else:
            result["methods"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: {json.dumps(result['methods'][name])[:400]} ({time.perf_counter() - start:.0f} s)", flush=True)
    table = render(result)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "gpu.md").write_text(table)
    return result


def render(result: dict[str, Any]) -> str:
    s = result["scoring"]
    lines = [f"Device: {result['device']} (size {result['size']}); scoring {s['single']['img_per_s']} img/s single, "
             f"{s['multi']['img_per_s']} img/s multi", "",
             "| method | dtype | steps | resolution | s/img single | s/img multi (K) | peak memory MiB | setup s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, m in result["methods"].items():
        if "error" in m:
            lines.append(f"| {name} | failed: {m['error'][:200]} | | | | | | |")
            continue
        cfg, tracks = m.get("config", {}), m["tracks"]
        single = tracks.get("single", {}).get("s_per_image", "–")
        multi = tracks.get("multi")
        multi_text = f"{multi['s_per_image']} ({', '.join(map(str, multi['k']))})" if multi else "–"
        lines.append(f"| {name} | {cfg.get('dtype', '–')} | {cfg.get('steps', '–')} | {cfg.get('resolution', '–')} | "
                     f"{single} | {multi_text} | {m['peak_memory_mb']} | {m['setup_s']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
