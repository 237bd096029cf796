"""torch side of the ``ssr-encoder`` baseline: the token-to-patch aligner, the subject cross-attention processor,
the mapping of the official checkpoint onto them, and the text / mask queries.

Facts from Xiaojiu-z/SSR_Encoder@7bb5f684536841d995ebef58b1946e39b82f9300 (``ssr_encoder/ssr_encoder.py``,
``ssr_encoder/attention_processor.py``); the code here is written for current torch / diffusers:

- Image features: ``CLIPVisionModel`` (openai/clip-vit-large-patch14) ``hidden_states[4::4]``, i.e. the outputs of
  layers 4, 8, ..., 24: six levels of 257 tokens x 1024 (``SSR_encoder.get_image_embeds``).
- Aligner (``Aligner`` + ``AlignerAttnProcessor``): the query is the SD text-encoder embedding of the subject
  text (77 x 768), projected by ``to_q`` (768 -> 8 heads x 64); the keys are ``to_k`` of the LAST level only; the
  resulting attention weights are shared by all six levels, each with its own ``to_v[i]`` (1024 -> 512) and
  ``to_out[i]`` (512 -> 768), no biases, no residual. The six 77-token outputs are concatenated on the sequence
  axis (462 tokens) and layer-normed (``Aligner.norm``).
- Mask query (``get_attention_scores_mask``): a mask over the reference image, thresholded at 0.5 and resized
  bilinearly to the patch grid (m in [0, 1] per patch), becomes M = [1 (class token), w * m] and the additive score
  bias M - (1 - M) * w, w = ``mask_weight``; it acts on every level through the shared attention weights.
- Subject cross-attention (``SSRAttnProcessor2_0``): in every UNet cross-attention the first 77 context tokens are
  the prompt, the rest the aligned subject tokens; the output adds ``scale`` times an attention of the same
  queries over ``to_k_SSR`` / ``to_v_SSR`` (768 -> block width, no bias) of the subject tokens, before ``to_out``.
- Weights: ``pytorch_model.bin`` is the ``Aligner`` state dict (``aligner.to_q``, ``aligner.to_k``,
  ``aligner.processor.to_v.{i}``, ``aligner.processor.to_out.{i}``, ``norm``); ``pytorch_model_1.bin`` the state
  dict of ``torch.nn.ModuleList(unet.attn_processors.values())``: only the cross-attention slots (odd indices)
  have weights. Multi-subject (``generate_multi``): the subjects' aligned tokens are concatenated.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from PIL import Image

#: hidden_states[FIRST_LEVEL::LEVEL_STEP] of the CLIP vision tower feed the aligner.
FIRST_LEVEL = 4
LEVEL_STEP = 4
#: Aligner attention heads (diffusers Attention(query_dim=768, cross_attention_dim=1024, heads=8, dim_head=64)).
ALIGNER_HEADS = 8
_BLOCK_GROUP_ORDER = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}


class SSRLayoutError(ValueError):
    """A checkpoint does not match the official SSR-Encoder layout for these models."""


class SSRAligner(nn.Module):
    """Token-to-patch aligner: query tokens attend to the patches of the last level; weights shared by all levels."""

    def __init__(self, query_dim: int, image_dim: int, inner_dim: int, levels: int, heads: int = ALIGNER_HEADS):
        super().__init__()
        if inner_dim % heads:
            raise SSRLayoutError(f"aligner width {inner_dim} is not divisible by its {heads} heads")
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(image_dim, inner_dim, bias=False)
        self.to_v = nn.ModuleList(nn.Linear(image_dim, inner_dim, bias=False) for _ in range(levels))
        self.to_out = nn.ModuleList(nn.Linear(inner_dim, query_dim, bias=False) for _ in range(levels))
        self.norm = nn.LayerNorm(query_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(
        self, text_embeds: torch.Tensor, levels: Sequence[torch.Tensor], patch_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """text_embeds [B, T, query_dim], levels: L x [B, P, image_dim], patch_bias [B, P] -> [B, L*T, query_dim]."""
        if len(levels) != len(self.to_v):
            raise SSRLayoutError(f"the aligner has {len(self.to_v)} levels, got {len(levels)} feature maps")
        query = self._heads(self.to_q(text_embeds))
        key = self._heads(self.to_k(levels[-1]))
        mask = None if patch_bias is None else patch_bias.to(query.dtype)[:, None, None, :]
        outputs = []
        for level, to_v, to_out in zip(levels, self.to_v, self.to_out, strict=True):
            attended = F.scaled_dot_product_attention(query, key, self._heads(to_v(level)), attn_mask=mask)
            batch, heads, length, head_dim = attended.shape
            outputs.append(to_out(attended.transpose(1, 2).reshape(batch, length, heads * head_dim)))
        return self.norm(torch.cat(outputs, dim=1))


class SSRAttnProcessor(nn.Module):
    """UNet cross-attention over the prompt plus a decoupled, scaled attention over the aligned subject tokens."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, text_tokens: int = 77, scale: float = 1.0):
        super().__init__()
        self.text_tokens = text_tokens
        self.scale = scale
        self.to_k_subject = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_subject = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("SSRAttnProcessor serves cross-attention layers only")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        text = encoder_hidden_states[:, : self.text_tokens]
        subject = encoder_hidden_states[:, self.text_tokens :]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, text.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)
        head_dim = query.shape[-1] // attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query = split(query)
        out = F.scaled_dot_product_attention(
            query, split(attn.to_k(text)), split(attn.to_v(text)), attn_mask=attention_mask
        )
        if subject.shape[1] and self.scale != 0:
            subject_out = F.scaled_dot_product_attention(
                query, split(self.to_k_subject(subject)), split(self.to_v_subject(subject))
            )
            out = out + self.scale * subject_out
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# ---------------------------------------------------------------------------------------------- key mapping


def official_processor_order(processor_names: Iterable[str]) -> list[str]:
    """Attention-processor names in the order of the official ``ModuleList(unet.attn_processors.values())``:
    down_blocks, up_blocks, mid_block (diffusers 0.23's registration order), depth-first inside each group."""
    names = list(processor_names)
    unknown = [n for n in names if n.split(".", 1)[0] not in _BLOCK_GROUP_ORDER]
    if unknown:
        raise SSRLayoutError(f"unexpected attention processors outside the UNet blocks: {unknown[:3]}")
    return sorted(names, key=lambda n: _BLOCK_GROUP_ORDER[n.split(".", 1)[0]])


def processor_width(name: str, block_out_channels: Sequence[int]) -> int:
    # SSR_encoder.__init__: hidden_size from the block's channel count.
    if name.startswith("mid_block"):
        return block_out_channels[-1]
    block_id = int(name.split(".")[1])
    if name.startswith("up_blocks"):
        return list(reversed(block_out_channels))[block_id]
    return block_out_channels[block_id]


def aligner_key_map(levels: int) -> dict[str, str]:
    """Official ``pytorch_model.bin`` key -> :class:`SSRAligner` parameter. Every key is mapped; none ignored."""
    mapping = {
        "aligner.to_q.weight": "to_q.weight",
        "aligner.to_k.weight": "to_k.weight",
        "norm.weight": "norm.weight",
        "norm.bias": "norm.bias",
    }
    for level in range(levels):
        mapping[f"aligner.processor.to_v.{level}.weight"] = f"to_v.{level}.weight"
        mapping[f"aligner.processor.to_out.{level}.weight"] = f"to_out.{level}.weight"
    return mapping


def layers_key_map(processor_names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Official ``pytorch_model_1.bin`` key -> (UNet attention-processor name, :class:`SSRAttnProcessor` parameter)."""
    mapping: dict[str, tuple[str, str]] = {}
    for index, name in enumerate(official_processor_order(processor_names)):
        if name.endswith("attn1.processor"):
            continue  # parameter-free self-attention slots in the official ModuleList
        mapping[f"{index}.to_k_SSR.weight"] = (name, "to_k_subject.weight")
        mapping[f"{index}.to_v_SSR.weight"] = (name, "to_v_subject.weight")
    return mapping


def _describe(problems: dict[str, list[str]]) -> str:
    return "; ".join(f"{len(keys)} {kind} (e.g. {keys[:3]})" for kind, keys in problems.items() if keys)


def _convert(
    state_dict: dict[str, torch.Tensor], mapping: dict[str, str], targets: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Rename ``state_dict`` by ``mapping`` after checking keys and shapes against ``targets`` (our parameters)."""
    missing = sorted(set(mapping) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(mapping))
    wrong = [
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(targets[mapping[k]].shape)}"
        for k in sorted(set(mapping) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(targets[mapping[k]].shape)
    ]
    if missing or unexpected or wrong:
        raise SSRLayoutError(
            f"{source}: not the official SSR-Encoder layout for these models: "
            + _describe({"missing": missing, "unexpected": unexpected, "with another shape": wrong})
        )
    return {mapping[k]: v for k, v in state_dict.items()}


def aligner_dims(aligner_sd: dict[str, torch.Tensor], source: str) -> dict[str, int]:
    for key in ("aligner.to_q.weight", "aligner.to_k.weight"):
        if key not in aligner_sd:
            raise SSRLayoutError(f"{source}: {key} is missing; is this the aligner file (pytorch_model.bin)?")
    inner, query_dim = aligner_sd["aligner.to_q.weight"].shape
    image_dim = aligner_sd["aligner.to_k.weight"].shape[1]
    levels = sum(1 for k in aligner_sd if k.startswith("aligner.processor.to_v."))
    return {"query_dim": int(query_dim), "image_dim": int(image_dim), "inner_dim": int(inner), "levels": levels}


def build_ssr_modules(
    unet: Any,
    aligner_sd: dict[str, torch.Tensor],
    layers_sd: dict[str, torch.Tensor],
    *,
    text_tokens: int = 77,
    sources: tuple[str, str] = ("pytorch_model.bin", "pytorch_model_1.bin"),
) -> tuple[SSRAligner, dict[str, SSRAttnProcessor]]:
    """The aligner and one processor per UNet cross-attention, holding exactly the official tensors.

    Modules are created on the meta device and take the checkpoint's tensors (``assign=True``) under strict
    loading, so every parameter comes from the file: none keeps an initial value. Works for meta tensors too.
    """
    dims = aligner_dims(aligner_sd, sources[0])
    cross = int(unet.config.cross_attention_dim)
    if dims["query_dim"] != cross:
        raise SSRLayoutError(
            f"{sources[0]}: aligner queries are {dims['query_dim']}-d, the UNet's text context is {cross}-d"
        )
    names = list(unet.attn_processors)
    channels = list(unet.config.block_out_channels)
    with torch.device("meta"):
        aligner = SSRAligner(**dims)
        processors = {
            name: SSRAttnProcessor(processor_width(name, channels), cross, text_tokens=text_tokens)
            for name in names
            if name.endswith("attn2.processor")
        }
    converted = _convert(aligner_sd, aligner_key_map(dims["levels"]), dict(aligner.named_parameters()), sources[0])
    aligner.load_state_dict(converted, strict=True, assign=True)

    mapping = layers_key_map(names)
    flat_targets = {f"{n}/{p}": t for n, proc in processors.items() for p, t in proc.named_parameters()}
    flat = _convert(layers_sd, {k: f"{n}/{p}" for k, (n, p) in mapping.items()}, flat_targets, sources[1])
    for name, processor in processors.items():
        own = {key.split("/", 1)[1]: value for key, value in flat.items() if key.split("/", 1)[0] == name}
        processor.load_state_dict(own, strict=True, assign=True)
    return aligner, processors


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SSRLayoutError(f"{path}: cannot read a state dict ({type(err).__name__}: {err})") from err
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise SSRLayoutError(f"{path}: expected a flat state dict of tensors")
    return dict(loaded)


# ---------------------------------------------------------------------------------------------- queries


def select_levels(hidden_states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(hidden_states[FIRST_LEVEL::LEVEL_STEP])


def box_masks(boxes: Sequence[tuple[float, float, float, float]], size: int) -> torch.Tensor:
    """Binary masks [N, 1, size, size] of normalised boxes on the ``size`` square canvas the encoder sees (edges at
    the nearest pixel, at least one pixel)."""
    masks = torch.zeros(len(boxes), 1, size, size)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        left, top = round(x0 * size), round(y0 * size)
        right, bottom = max(round(x1 * size), left + 1), max(round(y1 * size), top + 1)
        masks[i, 0, top:bottom, left:right] = 1.0
    return masks


def mask_on_patch_grid(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """Mask values per patch [N, grid**2] from mask images [N, C, H, W] in [0, 1], the official way:
    ``get_image_embeds_mask`` thresholds at 0.5 (``ssr_encoder.py``), ``get_attention_scores_mask`` resizes with
    ``transforms.Resize([h, w])`` and keeps the first channel (``attention_processor.py``): bilinear, align_corners
    False, no antialias (torchvision <= 0.16 on tensors)."""
    binary = torch.where(masks[:, :1] > 0.5, 1.0, 0.0)
    return F.interpolate(binary, size=(grid, grid), mode="bilinear", align_corners=False, antialias=False).flatten(1)


def mask_query_bias(coverage: torch.Tensor, weight: float) -> torch.Tensor:
    """Additive aligner score bias of the mask query for [N, patches] coverages -> [N, 1 + patches]."""
    scaled = torch.cat([torch.ones_like(coverage[:, :1]), coverage * weight], dim=1)
    return scaled - (1.0 - scaled) * weight


def encode_subjects(
    pipe: Any,
    image_encoder: Any,
    image_processor: Any,
    aligner: SSRAligner,
    images: Sequence[Image.Image],
    concepts: Sequence[str],
    uncond_concept: str,
    patch_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned subject tokens for the conditional and unconditional branches, concatenated: 2 x [1, N*L*T, D]."""
    device = pipe._execution_device
    dtype = next(aligner.parameters()).dtype
    pixels = image_processor(images=list(images), return_tensors="pt").pixel_values.to(device=device, dtype=dtype)
    concept_embeds, uncond_embeds = pipe.encode_prompt(
        list(concepts), device, 1, True, negative_prompt=[uncond_concept] * len(concepts)
    )
    bias = None if patch_bias is None else patch_bias.to(device=device, dtype=dtype)
    levels = select_levels(image_encoder(pixels, output_hidden_states=True).hidden_states)
    cond = aligner(concept_embeds.to(dtype), levels, bias)
    # The unconditional branch: the uncond concept over an all-zero (normalised) image, same mask.
    uncond_levels = select_levels(image_encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states)
    uncond = aligner(uncond_embeds.to(dtype), uncond_levels, bias)
    width = cond.shape[-1]
    return cond.reshape(1, -1, width), uncond.reshape(1, -1, width)


__all__ = [
    "SSRAligner",
    "SSRAttnProcessor",
    "SSRLayoutError",
    "aligner_key_map",
    "box_masks",
    "build_ssr_modules",
    "encode_subjects",
    "layers_key_map",
    "mask_on_patch_grid",
    "mask_query_bias",
    "official_processor_order",
    "read_state_dict",
    "select_levels",
]
