"""What the Stable Diffusion 1.5 adapters (``ip-adapter``, ``ssr-encoder``) share: the base model, dtype handling,
loading with readable errors, schedulers, the CLIP image preprocessing and the fingerprint pieces.

Both adapters run a diffusers ``StableDiffusionPipeline`` of the same SD1.5 checkpoint and add an image encoder;
like diffusers' pipeline mixins, the common setup lives here once and each adapter keeps what is its own (its
attention processors, its checkpoint mapping, its generation). Nothing here imports torch at module level, so that
``msibench ls`` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from msibench.weights import WeightFiles, fetch_remedy, hub_failure, hub_kwargs

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


def local_path(source: str) -> Path | None:
    """The resolved local path of ``source``, or None when it is not on disk (a hub id, or empty)."""
    if not source:
        return None
    path = Path(source).expanduser()
    return path.resolve() if path.exists() else None


def source_record(source: str, revision: str) -> dict[str, str]:
    """Fingerprint of a model source: a local copy by its resolved path, a hub id by its revision."""
    local = local_path(source)
    if local is not None:
        return {"source": str(local)}
    return {"source": source, "revision": revision}


def check_options(options: dict[str, Any], method: str, schedulers: tuple[str, ...]) -> None:
    """The option checks every SD1.5 adapter makes: scheduler, dtype, positive steps, resolution a multiple of 8."""
    if options["scheduler"] not in schedulers:
        raise ValueError(f"{method} option 'scheduler': {options['scheduler']!r} is not one of {schedulers}")
    if options["dtype"] not in DTYPES:
        raise ValueError(f"{method} option 'dtype': {options['dtype']!r} is not one of {DTYPES}")
    for key in ("steps", "resolution"):
        if int(options[key]) < 1:
            raise ValueError(f"{method} option {key!r}: must be a positive integer, got {options[key]!r}")
    if int(options["resolution"]) % 8:
        raise ValueError(f"{method} option 'resolution': must be a multiple of 8, got {options['resolution']}")


def resolved_dtype(option: str) -> str:
    """``auto`` is float16 on CUDA (the official adapters run half precision there) and float32 elsewhere."""
    if option != "auto":
        return option
    import torch

    return "float16" if torch.cuda.is_available() else "float32"


def diffusers_dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """``{"dtype": ...}`` where diffusers takes it (``torch_dtype`` is deprecated there), else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def from_pretrained(
    loader: Any, source: str, what: str, error: type[Exception], option: str, method: str, **kwargs: Any
) -> Any:
    """``loader(source, **kwargs)``; a failure becomes ``error`` naming ``msibench weights fetch`` and ``option``.

    A ``revision`` keyword applies to hub ids only (a local folder has none). A hub id is read from the hub cache
    only when the hub cannot be reached (:func:`msibench.weights.hub_kwargs`): no retries, a missing file fails at
    once.
    """
    local = Path(source).expanduser()
    revision = kwargs.pop("revision", None)
    if not local.exists():
        kwargs.update(hub_kwargs())
        if revision:
            kwargs["revision"] = revision
    try:
        return loader(str(local) if local.exists() else source, **kwargs)
    except (OSError, ValueError) as err:
        if local.exists():
            raise error(
                f"{method}: cannot load the {what} from the local folder {local}: {err}. Point {option} at a "
                "folder that holds it in the diffusers/transformers layout."
            ) from err
        subfolder = kwargs.get("subfolder")
        raise error(
            f"{method}: cannot load the {what} from the hub repo {source}"
            f"{f' (subfolder {subfolder})' if subfolder else ''}{f' at revision {revision}' if revision else ''}: "
            f"{hub_failure(err)}. {fetch_remedy(method, option)}"
        ) from err


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
    "diffusers_dtype_kwarg",
    "from_pretrained",
    "load_sd15_pipeline",
    "local_path",
    "resolved_dtype",
    "scheduler_from_config",
    "source_record",
]
