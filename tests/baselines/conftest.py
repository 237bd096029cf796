"""Tiny Stable Diffusion 1.5-shaped components built in code for the baseline tests (no hub, no weights).

The pipeline folder is written with ``save_pretrained`` so that the methods load it through their real
``setup`` path (``-M base_model=<folder>``). Shapes follow diffusers' ``get_dummy_components`` style, with the
SD1.5 block pattern (cross-attention in the first down block and the last up block, plus the mid block) so the
official adapter key layouts (odd attention-processor indices) apply unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

# Official SD1.5 scheduler values (stable-diffusion-v1-5 scheduler/scheduler_config.json: PNDM, scaled_linear).
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
TINY_TEXT_DIM = 32  # the tiny UNet's cross_attention_dim = the tiny text encoder's hidden size
TINY_RESOLUTION = 32  # pixels; the tiny VAE downsamples by 2 -> 16x16 latents


def tiny_sd15_config() -> dict:
    return {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "sample_size": TINY_RESOLUTION // 2,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": TINY_TEXT_DIM,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    }


def build_tiny_tokenizer():
    """A real CLIPTokenizer over a character vocabulary: without merges every word splits into its letters."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789,.'-":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_tiny_sd15_pipeline(root: Path):
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_sd15_config())
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
    )
    tokenizer = build_tiny_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=TINY_TEXT_DIM,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root)
    return root


@dataclass(frozen=True)
class TinySD15:
    path: Path
    text_dim: int = TINY_TEXT_DIM
    resolution: int = TINY_RESOLUTION


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory: pytest.TempPathFactory) -> TinySD15:
    """A saved tiny StableDiffusionPipeline folder (SD1.5 block pattern, 32 px), for ``-M base_model=<path>``."""
    return TinySD15(build_tiny_sd15_pipeline(tmp_path_factory.mktemp("tiny-sd15")))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: thread hand-offs cost more than the maths (100x on a busy 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
