"""What the Stable Diffusion 1.5 adapters (``ip-adapter``, ``ssr-encoder``) share: the base model, dtype handling,
loading with readable errors, schedulers, the CLIP image preprocessing and the fingerprint pieces.

Both adapters run a diffusers ``StableDiffusionPipeline`` of the same SD1.5 checkpoint and add an image encoder;
like diffusers' pipeline mixins, the common setup lives here once and each adapter keeps what is its own (its
attention processors, its checkpoint mapping, its generation). Nothing here imports torch at module level, so that
``msibench ls`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from msibench.methods.harness import (
    check_choice,
    check_positive,
    diffusers_dtype_kwarg,
    from_pretrained,
)
from msibench.weights import WeightFiles

if TYPE_CHECKING:
    import torch

BASE_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The community mirror of runwayml/stable-diffusion-v1-5 (removed from the hub); same commit history.
BASE_MODEL_REVISION = "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"
DTYPES = ("auto", "float16", "bfloat16", "float32")
# The files of the base model the adapters load (msibench weights fetch); each adapter adds its own.
BASE_WEIGHTS = WeightFiles(
    BASE_MODEL_ID,
    (
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ),
    BASE_MODEL_REVISION,
    "Stable Diffusion 1.5",
)


def check_options(options: dict[str, Any], method: str, schedulers: tuple[str, ...]) -> None:
    """The option checks every SD1.5 adapter makes: scheduler, dtype, positive steps, resolution a multiple of 8."""
    check_choice(options, "scheduler", schedulers, method)
    check_choice(options, "dtype", DTYPES, method)
    check_positive(options, ("steps", "resolution"), method)
    if int(options["resolution"]) % 8:
        raise ValueError(f"{method} option 'resolution': must be a multiple of 8, got {options['resolution']}")


def resolved_dtype(option: str) -> str:
    """``auto`` is float16 on CUDA (the official adapters run half precision there) and float32 elsewhere."""
    if option != "auto":
        return option
    import torch

    return "float16" if torch.cuda.is_available() else "float32"


def load_sd15_pipeline(
    base_model: str,
    base_revision: str,
    dtype: torch.dtype,
    error: type[Exception],
    method: str,
    **components: Any,
) -> Any:
    """Stable Diffusion 1.5 without safety checker (as every official demo), ``components`` replacing its own."""
    from diffusers import StableDiffusionPipeline

    return from_pretrained(
        StableDiffusionPipeline.from_pretrained,
        base_model,
        "Stable Diffusion 1.5 base model",
        error,
        "-M base_model=DIR",
        method,
        revision=base_revision,
        safety_checker=None,
        requires_safety_checker=False,
        **diffusers_dtype_kwarg(dtype),
        **components,
    )


def scheduler_from_config(name: str, base_config: Any, **overrides: Any) -> Any:
    """A diffusers scheduler of the given family built from the base model's scheduler config (and ``overrides``)."""
    import diffusers

    classes = {
        "ddim": diffusers.DDIMScheduler,
        "pndm": diffusers.PNDMScheduler,
        "unipc": diffusers.UniPCMultistepScheduler,
        "dpmsolver++": diffusers.DPMSolverMultistepScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
    }
    if name == "dpmsolver++":
        overrides = {"algorithm_type": "dpmsolver++", **overrides}
    return classes[name].from_config(base_config, **overrides)


def clip_image_processor(size: int) -> Any:
    """``CLIPImageProcessor()`` defaults at ``size`` (short side resized bicubic, centre crop, OpenAI mean/std) on
    transformers 4's PIL path, as the official code ran it, whatever transformers is installed
    (``baselines.clip_pixels``)."""
    from baselines.clip_pixels import pil_clip_processor

    return pil_clip_processor(size)


#: The fingerprint's words for :func:`clip_image_processor`.
CLIP_PREPROCESSING = "PIL path of transformers 4 CLIPImageProcessor: short side bicubic, int() long side, centre crop"


__all__ = [
    "BASE_MODEL_ID",
    "BASE_MODEL_REVISION",
    "CLIP_PREPROCESSING",
    "DTYPES",
    "check_options",
    "clip_image_processor",
    "load_sd15_pipeline",
    "resolved_dtype",
    "scheduler_from_config",
]
