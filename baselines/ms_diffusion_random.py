"""Random-weight stand-ins for the files ``ms-diffusion`` loads, in their hub layouts, at ``tiny`` size (the tests and
the parity script, on a CPU) or ``real`` size (``benchmarks/bench_gpu.py``): a StableDiffusionXLPipeline folder
(stabilityai/stable-diffusion-xl-base-1.0's layout), a CLIP vision tower (config.json + model.safetensors, as
laion/CLIP-ViT-bigG-14-laion2B-39B-b160k) and ``ms_adapter.bin`` under the official keys (as doge1516/MS-Diffusion).

Real size: diffusers' SDXL UNet config (stable-diffusion-xl-base-1.0 unet/config.json values), the SDXL VAE, CLIP
ViT-L/14 text and ViT-bigG/14 text / vision, the resampler of ``inference.py:51-62``. Tokenizers are small BPE
vocabularies over the words given (the real vocab files are not here); prompts pad to 77 tokens either way.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

TINY_RESOLUTION = 64  # tiny VAE: /2 -> 32x32 latents; attention at 16x16 (second block, mid, first up block)
TINY_TOKENS_PER_SUBJECT = 4

# Tiny SDXL as diffusers' own SDXL pipeline tests build it (tests/pipelines/stable_diffusion_xl), one layer a block.
TINY_UNET: dict[str, Any] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "sample_size": TINY_RESOLUTION // 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": (1, 2),
    "projection_class_embeddings_input_dim": 80,  # 6 x 8 time ids + text_encoder_2's 32
    "cross_attention_dim": 64,  # 32 + 32: both text encoders' penultimate states
    "norm_num_groups": 1,
}
# stable-diffusion-xl-base-1.0 unet/config.json (the values that differ from UNet2DConditionModel's defaults).
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "cross_attention_dim": 2048,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
# stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (EulerDiscreteScheduler).
SDXL_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}
_TEXT_SPECIAL = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, "max_position_embeddings": 77}
_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
              "projection_dim": 32}  # fmt: skip
_VIT_L_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
               "projection_dim": 768, "hidden_act": "quick_gelu"}  # fmt: skip
_BIGG_TEXT = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
              "projection_dim": 1280, "hidden_act": "gelu"}  # fmt: skip
_TINY_VISION = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 3,
                "image_size": 224, "patch_size": 32, "projection_dim": 16}  # fmt: skip
_BIGG_VISION = {"hidden_size": 1664, "intermediate_size": 8192, "num_attention_heads": 16, "num_hidden_layers": 48,
                "image_size": 224, "patch_size": 14, "projection_dim": 1280, "hidden_act": "gelu"}  # fmt: skip
PROMPT_WORDS = ("best", "quality", "high", "monochrome", "lowres", "bad", "anatomy", "worst", "low")


def resampler_config(size: str) -> Any:
    from baselines.ms_diffusion_modules import ResamplerConfig

    if size == "real":
        return ResamplerConfig()
    return ResamplerConfig(dim=32, depth=2, heads=2, num_queries=TINY_TOKENS_PER_SUBJECT, embedding_dim=32,
                           output_dim=64, ff_mult=2, phrase_dim=32)  # fmt: skip


def write_random_weights(root: Path, words: Iterable[str], size: str = "tiny", dtype: Any = None, seed: int = 0):
    """Write the three folders under ``root``; return the method's -M options pointing at them (tiny: 2 steps at
    64 px in float32; real: the defaults)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from baselines.ms_diffusion_modules import nest, official_shapes
    from baselines.testing import bpe_clip_tokenizer

    if size not in ("tiny", "real"):
        raise ValueError(f"size must be 'tiny' or 'real', got {size!r}")
    root = Path(root)
    dtype = dtype or torch.float32
    torch.manual_seed(seed)
    tokenizer = bpe_clip_tokenizer(root / "_vocab", {*words, *PROMPT_WORDS})
    vocab = {"vocab_size": 49408 if size == "real" else len(tokenizer)}  # the real embedding table
    if size == "tiny":
        unet = UNet2DConditionModel(**TINY_UNET)
        vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                            sample_size=TINY_RESOLUTION)  # fmt: skip
        text_1 = CLIPTextConfig(**_TEXT_SPECIAL, **_TINY_TEXT, **vocab)
        text_2 = CLIPTextConfig(**_TEXT_SPECIAL, **_TINY_TEXT, **vocab)
        vision = CLIPVisionConfig(**_TINY_VISION)
    else:
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            sample_size=1024, scaling_factor=0.13025, force_upcast=True)  # fmt: skip
        text_1 = CLIPTextConfig(**_TEXT_SPECIAL, **_VIT_L_TEXT, **vocab)
        text_2 = CLIPTextConfig(**_TEXT_SPECIAL, **_BIGG_TEXT, **vocab)
        vision = CLIPVisionConfig(**_BIGG_VISION)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_1),
        text_encoder_2=CLIPTextModelWithProjection(text_2),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        add_watermarker=False,
    )
    pipe.to(dtype=dtype).save_pretrained(root / "sdxl")
    CLIPVisionModelWithProjection(vision).to(dtype).save_pretrained(root / "clip-bigg")
    shapes = official_shapes(resampler_config(size), unet)
    del pipe, unet
    g = torch.Generator().manual_seed(seed)
    # Large enough that the subject attention visibly changes a tiny model's output.
    flat = {k: (torch.randn(s, generator=g) * (0.3 if "_ip." in k else 0.1)).to(dtype) for k, s in shapes.items()}
    (root / "ms-diffusion").mkdir(parents=True, exist_ok=True)
    state = nest(flat)
    # MSAdapter.save_to_checkpoint stores the background tokens as the nn.Parameter itself (model.py:72).
    state["dummy_image_tokens"] = torch.nn.Parameter(state["dummy_image_tokens"])
    torch.save(state, root / "ms-diffusion" / "ms_adapter.bin")
    options: dict[str, Any] = {"base_model": str(root / "sdxl"), "image_encoder": str(root / "clip-bigg"),
                               "adapter": str(root / "ms-diffusion")}  # fmt: skip
    if size == "tiny":
        options.update(steps=2, resolution=TINY_RESOLUTION, dtype="float32")
    return options


__all__ = ["SDXL_UNET", "TINY_RESOLUTION", "TINY_TOKENS_PER_SUBJECT", "resampler_config", "write_random_weights"]
