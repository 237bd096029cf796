"""Official CustomNet checkpoint (``customnet_v1.pt``, a flat LatentDiffusion state dict) -> our modules.

The mapping is written here from the two module layouts (LDM ``UNetModel``/``AutoencoderKL``/OpenAI ``clip``
as instantiated by TencentARC/CustomNet@23a378f ``configs/config_customnet.yaml``, and ours: diffusers
``UNet2DConditionModel``/``AutoencoderKL``, transformers ``CLIPVisionModelWithProjection``/``CLIPTextModel``).
Every key of the checkpoint is either the source of exactly one of our tensors (a few, the OpenAI ``in_proj``
matrices, are the source of three) or listed in :data:`IGNORED_KEYS` with the reason; every tensor of ours gets a
value. Rules are derived from our module's own key list, so the same code maps the tiny test configuration.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    import torch

    from mscustomnet.model.config import ModelConfig

log = logging.getLogger(__name__)

_SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

# Checkpoint keys with no counterpart in our modules, and why.
IGNORED_KEYS: dict[str, str] = {
    # LatentDiffusion.register_schedule buffers: all are functions of the DDPM betas, which we recompute from
    # config (beta_start, beta_end, num_train_timesteps); the converter checks the checkpoint's betas and
    # alphas_cumprod against ours instead of loading them.
    **{name: "DDPM schedule buffer, recomputed from the config" for name in _SCHEDULE_BUFFERS},
    # ldm FrozenCLIPImageEmbedder keeps the whole OpenAI CLIP model and deletes only `.transformer`, so these text
    # remnants stay in the state dict; encode_image never reads them (the text tower in use is text_encoder.*).
    "cond_stage_model.model.positional_embedding": "unused text remnant of the OpenAI CLIP image tower",
    "cond_stage_model.model.text_projection": "unused text remnant of the OpenAI CLIP image tower",
    "cond_stage_model.model.logit_scale": "unused text remnant of the OpenAI CLIP image tower",
    "cond_stage_model.model.token_embedding.weight": "unused text remnant of the OpenAI CLIP image tower",
    "cond_stage_model.model.ln_final.weight": "unused text remnant of the OpenAI CLIP image tower",
    "cond_stage_model.model.ln_final.bias": "unused text remnant of the OpenAI CLIP image tower",
    # transformers < 4.31 saved CLIP's position_ids (arange(77)) as a persistent buffer; ours is rebuilt.
    "text_encoder.transformer.text_model.embeddings.position_ids": "arange(77) position ids, rebuilt (may be absent)",
}
OPTIONAL_KEYS = frozenset({"text_encoder.transformer.text_model.embeddings.position_ids"})

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_VISUAL = "cond_stage_model.model.visual."
TEXT = "text_encoder.transformer."
PROJECTION = "cc_projection."


class ConversionError(ValueError):
    """The checkpoint does not fit the model; the message lists the offending keys."""


@dataclass(frozen=True)
class Rule:
    """Our tensor ``target`` = ``transform(checkpoint[source])``. ``transform`` is one of ``"copy"``,
    ``"squeeze_1x1"`` (LDM 1x1 conv weight -> linear weight), ``"transpose"`` or ``"chunk:i/n"`` (i-th of n equal
    row blocks)."""

    target: str
    source: str
    transform: str = "copy"


# ----------------------------------------------------------------------------------------------- UNet names
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip


def _unet_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET[head]}.{tail}"


def _unet_attention(rest: str) -> str:
    # SpatialTransformer and diffusers Transformer2DModel share their inner names (norm, proj_in, transformer_blocks.
    # N.{attn1,attn2,ff.net.0.proj,ff.net.2,norm1..3}, proj_out); CustomNet's text k/v sit on attn2 itself.
    return rest.replace("attn2.processor.to_", "attn2.to_")


_UNET_SIMPLE = {
    "conv_in.": "input_blocks.0.0.",
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}


def _unet_rule(key: str, up_has_attention: list[bool], layers: int) -> tuple[str, str]:
    stride = layers + 1
    for ours, theirs in _UNET_SIMPLE.items():
        if key.startswith(ours):
            return theirs + key[len(ours) :], "copy"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        b, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{1 + b * stride + j}.0.{_unet_resnet(rest)}", "copy"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        b, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{1 + b * stride + j}.1.{_unet_attention(rest)}", "copy"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        b, rest = int(m[1]), m[2]
        return f"input_blocks.{1 + b * stride + layers}.0.op.{rest}", "copy"
    if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_unet_resnet(m[2])}", "copy"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{_unet_attention(m[1])}", "copy"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        b, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{b * stride + j}.0.{_unet_resnet(rest)}", "copy"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        b, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{b * stride + j}.1.{_unet_attention(rest)}", "copy"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b, rest = int(m[1]), m[2]
        # The Upsample follows the ResBlock and, on attention levels, the SpatialTransformer of the last layer.
        slot = 2 if up_has_attention[b] else 1
        return f"output_blocks.{b * stride + layers}.{slot}.conv.{rest}", "copy"
    raise ConversionError(f"no LDM name for UNet key {key!r}")


# ------------------------------------------------------------------------------------------------ VAE names
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def _vae_rule(key: str, num_levels: int) -> tuple[str, str]:
    for part in ("quant_conv.", "post_quant_conv.", "encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.",
                 "decoder.conv_out."):  # fmt: skip
        if key.startswith(part):
            return key, "copy"
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}", "copy"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}", "copy"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", "copy"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        # LDM's decoder numbers its levels from the lowest resolution up; diffusers from the top down.
        return f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}", "copy"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}", "copy"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}", "copy"
    if m := re.fullmatch(
        r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", key
    ):
        # LDM's AttnBlock uses 1x1 convolutions where diffusers' Attention has linear layers.
        transform = "squeeze_1x1" if m[3] == "weight" and m[2] != "group_norm" else "copy"
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}", transform
    raise ConversionError(f"no LDM name for VAE key {key!r}")


# -------------------------------------------------------------------------------------- CLIP image tower names
_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip


def _clip_visual_rule(key: str) -> tuple[str, str]:
    fixed = {
        "vision_model.embeddings.class_embedding": ("class_embedding", "copy"),
        "vision_model.embeddings.patch_embedding.weight": ("conv1.weight", "copy"),
        "vision_model.embeddings.position_embedding.weight": ("positional_embedding", "copy"),
        # OpenAI: x @ proj with proj [width, embed]; transformers: Linear(width -> embed) weight [embed, width].
        "visual_projection.weight": ("proj", "transpose"),
    }
    if key in fixed:
        return fixed[key]
    if m := re.fullmatch(r"vision_model\.(pre_layrnorm|post_layernorm)\.(weight|bias)", key):
        return f"{'ln_pre' if m[1] == 'pre_layrnorm' else 'ln_post'}.{m[2]}", "copy"
    if m := re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
        # nn.MultiheadAttention packs q, k, v as the three row blocks of in_proj_{weight,bias}.
        return f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", f"chunk:{'qkv'.index(m[2])}/3"
    if m := re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
        if m[2] in _CLIP_LAYER:
            return f"transformer.resblocks.{m[1]}.{_CLIP_LAYER[m[2]]}.{m[3]}", "copy"
    raise ConversionError(f"no OpenAI-CLIP name for image-tower key {key!r}")


def _text_rule(key: str) -> tuple[str, str]:
    # transformers 4.x CLIPTextModel keys are text_model.{embeddings,encoder,final_layer_norm}.*; 5.x drops the
    # text_model level.
    return (key if key.startswith("text_model.") else f"text_model.{key}"), "copy"


def conversion_rules(model_keys: list[str], config: ModelConfig) -> list[Rule]:
    """One rule per key of our module (``model_keys`` = our state dict keys) for a CustomNet config."""
    if config.multi_subject:
        raise ConversionError("the CustomNet checkpoint has no category encoder: convert into a CustomNet config")
    unet = config.unet
    up_attention = [t.startswith("CrossAttn") for t in unet.up_block_types]
    levels = len(config.vae.block_out_channels)
    rules = []
    for key in model_keys:
        group, _, rest = key.partition(".")
        if group == "unet":
            source, transform = _unet_rule(rest, up_attention, unet.layers_per_block)
            source = UNET + source
        elif group == "vae":
            source, transform = _vae_rule(rest, levels)
            source = VAE + source
        elif group == "image_encoder":
            source, transform = _clip_visual_rule(rest)
            source = CLIP_VISUAL + source
        elif group == "text_encoder":
            source, transform = _text_rule(rest)
            source = TEXT + source
        elif group == "projection":
            source, transform = PROJECTION + rest, "copy"
        else:
            raise ConversionError(f"no CustomNet counterpart for our key {key!r}")
        rules.append(Rule(key, source, transform))
    return rules


def apply_transform(tensor: torch.Tensor, transform: str) -> torch.Tensor:
    if transform == "copy":
        return tensor
    if transform == "squeeze_1x1":
        return tensor.reshape(tensor.shape[0], tensor.shape[1])
    if transform == "transpose":
        return tensor.t()
    index, parts = (int(x) for x in transform.removeprefix("chunk:").split("/"))
    return tensor.chunk(parts, dim=0)[index]


def _invert(tensors: list[torch.Tensor], transform: str) -> torch.Tensor:
    import torch

    if transform == "copy":
        return tensors[0]
    if transform == "squeeze_1x1":
        return tensors[0].reshape(*tensors[0].shape, 1, 1)
    if transform == "transpose":
        return tensors[0].t()
    return torch.cat(tensors, dim=0)


def convert_customnet_state_dict(
    checkpoint: Mapping[str, torch.Tensor], model_shapes: Mapping[str, tuple[int, ...]], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Map a CustomNet LatentDiffusion state dict onto our keys.

    ``model_shapes`` is our module's key -> shape (e.g. from a meta-device model). Raises
    :class:`ConversionError` naming the keys when the checkpoint has a key that is neither mapped nor ignored,
    lacks a needed key, or a shape differs. Returned tensors may be views of the checkpoint's.
    """
    rules = conversion_rules(list(model_shapes), config)
    used = {r.source for r in rules}
    unknown = sorted(k for k in checkpoint if k not in used and k not in IGNORED_KEYS)
    missing = sorted({r.source for r in rules if r.source not in checkpoint})
    missing += sorted(k for k in IGNORED_KEYS if k not in checkpoint and k not in OPTIONAL_KEYS)
    if unknown or missing:
        raise ConversionError(
            f"checkpoint does not match CustomNet: {len(unknown)} unaccounted key(s) {unknown[:8]}, "
            f"{len(missing)} missing key(s) {missing[:8]}"
        )
    _check_schedule(checkpoint, config)
    out: dict[str, torch.Tensor] = {}
    bad = []
    for rule in rules:
        tensor = apply_transform(checkpoint[rule.source], rule.transform)
        if tuple(tensor.shape) != tuple(model_shapes[rule.target]):
            bad.append(f"{rule.source} -> {rule.target}: {tuple(tensor.shape)} != {tuple(model_shapes[rule.target])}")
        out[rule.target] = tensor
    if bad:
        raise ConversionError(f"{len(bad)} shape mismatch(es): " + "; ".join(bad[:8]))
    return out


def _check_schedule(checkpoint: Mapping[str, torch.Tensor], config: ModelConfig) -> None:
    import torch

    betas = checkpoint["betas"]
    if betas.device.type == "meta":
        return
    c = config
    ours = torch.linspace(c.beta_start**0.5, c.beta_end**0.5, c.num_train_timesteps, dtype=torch.float64) ** 2
    if betas.shape != ours.shape or not torch.allclose(betas.double(), ours, rtol=1e-4, atol=1e-7):
        raise ConversionError(
            f"checkpoint betas differ from the configured schedule ({c.beta_start}..{c.beta_end}, "
            f"{c.num_train_timesteps} steps)"
        )


def export_customnet_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Inverse mapping: our CustomNet state dict -> the official key layout (mapped keys only, no ignored ones)."""
    rules = conversion_rules(list(state_dict), config)
    grouped: dict[str, list[Rule]] = {}
    for rule in rules:
        grouped.setdefault(rule.source, []).append(rule)
    out = {}
    for source, group in grouped.items():
        group.sort(key=lambda r: r.transform)  # chunk:0/3, chunk:1/3, chunk:2/3
        out[source] = _invert([state_dict[r.target] for r in group], group[0].transform)
    return out


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load ``customnet_v1.pt`` (flat state dict; a ``{"state_dict": ...}`` wrapper is accepted) memory-mapped."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CustomNet checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) torch.save files cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def convert_customnet(
    ckpt: str | Path, out: str | Path, dtype: str = "keep", config: ModelConfig | None = None
) -> Path:
    """Convert the official checkpoint file into a model folder of ours (config.json + model.safetensors)."""
    import torch

    from mscustomnet.model.config import customnet_config
    from mscustomnet.model.io import save_state
    from mscustomnet.model.network import CustomNetModel

    config = config or customnet_config()
    checkpoint = read_checkpoint(ckpt)
    shapes = {k: tuple(v.shape) for k, v in CustomNetModel.empty(config).state_dict().items()}
    converted = convert_customnet_state_dict(checkpoint, shapes, config)
    target = None if dtype == "keep" else getattr(torch, dtype)
    tensors = {}
    for key, value in converted.items():
        value = (value.to(target) if target is not None else value).contiguous()
        # The q/k/v views share the packed in_proj storage and safetensors refuses shared storage: copy views only
        # (the rest stays memory-mapped until written).
        if value.untyped_storage().nbytes() != value.numel() * value.element_size():
            value = value.clone()
        tensors[key] = value
    source = {
        "checkpoint": Path(ckpt).name,
        "origin": "TencentARC/CustomNet customnet_v1.pt",
        "converted_by": __name__,
    }
    path = save_state(out, config, tensors, metadata={"source": source})
    log.info("converted %d checkpoint keys into %d tensors at %s", len(checkpoint), len(tensors), path)
    return path


@click.command("convert-customnet")
@click.argument("ckpt", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--dtype",
    type=click.Choice(["keep", "float32", "float16", "bfloat16"]),
    default="keep",
    show_default=True,
    help="Cast the weights (keep = the checkpoint's dtype).",
)
def convert_customnet_command(ckpt: Path, out: Path, dtype: str) -> None:
    """Convert the official CustomNet checkpoint CKPT (customnet_v1.pt) into the model folder OUT."""
    try:
        path = convert_customnet(ckpt, out, dtype=dtype)
    except (FileNotFoundError, ConversionError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote {path}")


__all__ = [
    "IGNORED_KEYS",
    "ConversionError",
    "Rule",
    "conversion_rules",
    "convert_customnet",
    "convert_customnet_command",
    "convert_customnet_state_dict",
    "export_customnet_state_dict",
    "read_checkpoint",
]
