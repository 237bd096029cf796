"""torch / diffusers side of the ``ip-adapter`` baseline: the official weight layout, loading, layout masks.

The official checkpoint (tencent-ailab/IP-Adapter@62e4af9d0c1ac7d5f8dd386a0ccf2211346af1a2,
``ip_adapter/ip_adapter.py``: ``IPAdapter.load_ip_adapter``) is ``torch.save({"image_proj": ..., "ip_adapter":
...})``: ``image_proj`` is ``ImageProjModel`` (``proj`` Linear(image_embed_dim -> 4 x cross_attention_dim) +
``norm`` LayerNorm) and ``ip_adapter`` the state dict of ``torch.nn.ModuleList(unet.attn_processors.values())``,
where only the cross-attention (attn2) slots, the odd indices, hold ``to_k_ip`` / ``to_v_ip`` weights of shape
[hidden_size, cross_attention_dim]. The ``.safetensors`` variant flattens both as ``image_proj.*`` /
``ip_adapter.*``. diffusers (``load_ip_adapter``) converts that layout itself; this module checks a file against
the layout before handing it over and afterwards verifies that every tensor sits on the parameter the official
code would load it into, so a change of processor order in diffusers can never mis-map weights silently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: ImageProjModel's clip_extra_context_tokens for ip-adapter_sd15 (IPAdapter(num_tokens=4)).
NUM_IMAGE_TOKENS = 4
_BLOCK_GROUP_ORDER = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}

# diffusers' parameter names of the image projection it builds from ``image_proj`` (ImageProjection:
# proj -> image_embeds, norm -> norm), inside MultiIPAdapterImageProjection slot 0.
_IMAGE_PROJ_TARGETS = {
    "image_proj.proj.weight": "encoder_hid_proj.image_projection_layers.0.image_embeds.weight",
    "image_proj.proj.bias": "encoder_hid_proj.image_projection_layers.0.image_embeds.bias",
    "image_proj.norm.weight": "encoder_hid_proj.image_projection_layers.0.norm.weight",
    "image_proj.norm.bias": "encoder_hid_proj.image_projection_layers.0.norm.bias",
}


class IPAdapterLayoutError(ValueError):
    """A weights file does not match the official IP-Adapter layout for this UNet."""


def official_processor_order(processor_names: Iterable[str]) -> list[str]:
    """Attention-processor names in the order of the official ``ModuleList(unet.attn_processors.values())``.

    Under the diffusers 0.2x the official code ran on, ``attn_processors`` lists down_blocks, then up_blocks,
    then mid_block (the UNet's module registration order), each block depth-first (attn1 before attn2). The
    order is rebuilt from the names here so that it never depends on the installed diffusers' registration order.
    """
    names = list(processor_names)
    unknown = [n for n in names if n.split(".", 1)[0] not in _BLOCK_GROUP_ORDER]
    if unknown:
        raise IPAdapterLayoutError(f"unexpected attention processors outside the UNet blocks: {unknown[:3]}")
    return sorted(names, key=lambda n: _BLOCK_GROUP_ORDER[n.split(".", 1)[0]])  # stable: keeps depth-first order


def _hidden_size(name: str, block_out_channels: Sequence[int]) -> int:
    # As IPAdapter.set_ip_adapter: the processor's width is its block's channel count.
    if name.startswith("mid_block"):
        return block_out_channels[-1]
    block_id = int(name.split(".")[1])
    if name.startswith("up_blocks"):
        return list(reversed(block_out_channels))[block_id]
    return block_out_channels[block_id]


def expected_ip_adapter_shapes(unet: Any, image_embed_dim: int) -> dict[str, tuple[int, ...]]:
    """Flattened official key -> shape for this UNet and an image encoder with ``projection_dim=image_embed_dim``."""
    cross = int(unet.config.cross_attention_dim)
    channels = list(unet.config.block_out_channels)
    shapes: dict[str, tuple[int, ...]] = {
        "image_proj.proj.weight": (NUM_IMAGE_TOKENS * cross, image_embed_dim),
        "image_proj.proj.bias": (NUM_IMAGE_TOKENS * cross,),
        "image_proj.norm.weight": (cross,),
        "image_proj.norm.bias": (cross,),
    }
    for index, name in enumerate(official_processor_order(unet.attn_processors)):
        if name.endswith("attn1.processor"):
            continue  # self-attention slots are parameter-free AttnProcessor2_0 in the official code
        hidden = _hidden_size(name, channels)
        shapes[f"ip_adapter.{index}.to_k_ip.weight"] = (hidden, cross)
        shapes[f"ip_adapter.{index}.to_v_ip.weight"] = (hidden, cross)
    return shapes


def official_to_unet_parameters(unet: Any) -> dict[str, str]:
    """Flattened official key -> name of the UNet parameter diffusers loads it into (after ``load_ip_adapter``)."""
    targets = dict(_IMAGE_PROJ_TARGETS)
    for index, name in enumerate(official_processor_order(unet.attn_processors)):
        if name.endswith("attn1.processor"):
            continue
        # IPAdapterAttnProcessor2_0 keeps one Linear per loaded adapter; this is adapter 0.
        targets[f"ip_adapter.{index}.to_k_ip.weight"] = f"{name}.to_k_ip.0.weight"
        targets[f"ip_adapter.{index}.to_v_ip.weight"] = f"{name}.to_v_ip.0.weight"
    return targets


def flatten(state_dict: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{part}.{key}": value for part, sub in state_dict.items() for key, value in sub.items()}


def nest(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        part, _, rest = key.partition(".")
        if part not in nested or not rest:
            raise IPAdapterLayoutError(f"unexpected key {key!r}: expected image_proj.* or ip_adapter.*")
        nested[part][rest] = value
    return nested


def read_ip_adapter_file(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The official nested ``{"image_proj": ..., "ip_adapter": ...}`` dict from a .bin or .safetensors file."""
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return nest(load_file(str(path)))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except IPAdapterLayoutError as err:
        raise IPAdapterLayoutError(f"{path}: {err}") from err
    except Exception as err:
        raise IPAdapterLayoutError(
            f"{path}: cannot read an IP-Adapter checkpoint ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(loaded, dict):
        raise IPAdapterLayoutError(f"{path}: expected a dict of state dicts, found {type(loaded).__name__}")
    if set(loaded) == {"image_proj", "ip_adapter"}:
        return {part: dict(sub) for part, sub in loaded.items()}
    try:
        return nest(loaded)  # a flat .bin in the .safetensors layout
    except IPAdapterLayoutError as err:
        raise IPAdapterLayoutError(f"{path}: {err}") from err


def check_ip_adapter_state_dict(
    state_dict: dict[str, dict[str, torch.Tensor]], unet: Any, image_embed_dim: int, source: str = "state dict"
) -> None:
    """Raise :class:`IPAdapterLayoutError` unless ``state_dict`` has exactly the official keys and shapes."""
    expected = expected_ip_adapter_shapes(unet, image_embed_dim)
    found = {key: tuple(value.shape) for key, value in flatten(state_dict).items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            problems.append(
                f"{len(wrong)} with another shape (e.g. {wrong[0]}: {found[wrong[0]]}, expected {expected[wrong[0]]})"
            )
        raise IPAdapterLayoutError(
            f"{source}: not an ip-adapter_sd15 checkpoint for this UNet "
            f"(cross_attention_dim {unet.config.cross_attention_dim}, image embeddings {image_embed_dim}): "
            + "; ".join(problems)
        )


def verify_loaded(unet: Any, state_dict: dict[str, dict[str, torch.Tensor]], source: str = "state dict") -> None:
    """Check that every official tensor sits on its official parameter and no IP-Adapter parameter is left over."""
    import torch

    targets = official_to_unet_parameters(unet)
    params = dict(unet.named_parameters())
    adapter_params = {n for n in params if ".processor." in n or n.startswith("encoder_hid_proj.")}
    leftover = sorted(adapter_params - set(targets.values()))
    if leftover:
        raise IPAdapterLayoutError(f"{source}: IP-Adapter parameters not loaded from the file: {leftover[:3]}")
    for key, value in flatten(state_dict).items():
        target = params.get(targets[key])
        if target is None:
            raise IPAdapterLayoutError(f"{source}: {key} has no target parameter {targets[key]} after loading")
        if not torch.equal(target.detach().cpu(), value.detach().to(dtype=target.dtype, device="cpu")):
            raise IPAdapterLayoutError(f"{source}: {key} did not land on {targets[key]}")


def attach_ip_adapter(pipe: Any, state_dict: dict[str, dict[str, torch.Tensor]], source: str = "state dict") -> None:
    """Load an official-layout IP-Adapter state dict into ``pipe`` through diffusers' ``load_ip_adapter``."""
    if getattr(pipe, "image_encoder", None) is not None:
        image_embed_dim = int(pipe.image_encoder.config.projection_dim)
    else:
        image_embed_dim = int(state_dict["image_proj"]["proj.weight"].shape[1])
    check_ip_adapter_state_dict(state_dict, pipe.unet, image_embed_dim, source)
    # The image encoder is registered on the pipeline beforehand, so diffusers loads nothing else.
    pipe.load_ip_adapter(state_dict, subfolder="", weight_name="", image_encoder_folder=None)
    verify_loaded(pipe.unet, state_dict, source)


def make_scheduler(name: str, base_config: Any) -> Any:
    import diffusers

    from baselines.sd15 import scheduler_from_config

    if name == "ddim":
        # ip_adapter_t2i-adapter_demo.ipynb's noise_scheduler, code cell 2 (the betas are SD1.5's own).
        return diffusers.DDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
    return scheduler_from_config(name, base_config)


def load_pipeline(
    *,
    base_model: str,
    base_revision: str,
    vae: str,
    vae_revision: str,
    image_encoder: str,
    image_encoder_subfolder: str | None,
    image_encoder_revision: str,
    scheduler: str,
    dtype: torch.dtype,
    error: type[Exception],
) -> Any:
    """Stable Diffusion 1.5 with the IP-Adapter image encoder registered (no safety checker, as the official demos)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionModelWithProjection

    from baselines.sd15 import clip_image_processor, load_sd15_pipeline
    from msibench.methods.harness import diffusers_dtype_kwarg, from_pretrained

    encoder_kwargs: dict[str, Any] = {"dtype": dtype, "revision": image_encoder_revision}
    if image_encoder_subfolder:
        encoder_kwargs["subfolder"] = image_encoder_subfolder
    encoder = from_pretrained(
        CLIPVisionModelWithProjection.from_pretrained,
        image_encoder,
        "image encoder",
        error,
        "-M image_encoder=DIR (or -M adapter=DIR, a folder laid out like h94/IP-Adapter)",
        "ip-adapter",
        **encoder_kwargs,
    )
    # The official code preprocesses with CLIPImageProcessor() defaults: resize the short side, centre crop.
    feature_extractor = clip_image_processor(int(encoder.config.image_size))
    components: dict[str, Any] = {"image_encoder": encoder, "feature_extractor": feature_extractor}
    if vae:
        components["vae"] = from_pretrained(
            AutoencoderKL.from_pretrained,
            vae,
            "VAE",
            error,
            "-M vae=DIR (or -M vae= to keep the base model's own VAE)",
            "ip-adapter",
            revision=vae_revision,
            **diffusers_dtype_kwarg(dtype),
        )
    pipe = load_sd15_pipeline(base_model, base_revision, dtype, error, "ip-adapter", **components)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    return pipe


def layout_masks(boxes: Sequence[tuple[float, float, float, float]], size: int) -> torch.Tensor:
    """Binary box masks as diffusers' IP-Adapter masking wants them: [1, num_images, size, size]."""
    from diffusers.image_processor import IPAdapterMaskProcessor
    from PIL import Image

    masks = []
    for x0, y0, x1, y1 in boxes:
        left, top = math.floor(x0 * size), math.floor(y0 * size)
        right, bottom = max(math.ceil(x1 * size), left + 1), max(math.ceil(y1 * size), top + 1)
        mask = Image.new("L", (size, size), 0)
        mask.paste(255, (left, top, min(right, size), min(bottom, size)))
        masks.append(mask)
    processed = IPAdapterMaskProcessor().preprocess(masks, height=size, width=size)
    return processed.reshape(1, len(masks), size, size)


__all__ = [
    "IPAdapterLayoutError",
    "attach_ip_adapter",
    "check_ip_adapter_state_dict",
    "expected_ip_adapter_shapes",
    "layout_masks",
    "load_pipeline",
    "official_processor_order",
    "official_to_unet_parameters",
    "read_ip_adapter_file",
    "verify_loaded",
]
