"""torch / diffusers side of the ``ms-diffusion`` baseline: the grounding resampler, the multi-subject attention
processors, the official checkpoint layout and its key mapping.

Written against current torch / diffusers from the published design (MS-Diffusion, Wang et al., ICLR 2025,
arXiv 2406.07209) and the official code's facts, MS-Diffusion/MS-Diffusion@74eb2d6d96669a8be9e786410de445ea41c187c0:

- ``msdiffusion/models/projection.py`` (``Resampler`` with ``latent_init_mode="grounding"``): every subject's
  queries are not learned constants but come from its grounding token, an MLP over [phrase embedding ; Fourier
  features of its box] (``FourierEmbedder``: 8 frequencies ``100 ** (i / 8)``, sin/cos of x0 y0 x1 y1); then
  ``depth`` Perceiver blocks (attention over [image tokens ; queries], feed-forward) refine them.
- ``msdiffusion/models/attention_processor.py`` (``MaskedIPAttnProcessor2_0``): each cross-attention adds an image
  attention over [4 background ("dummy") tokens ; 16 tokens per subject] whose logits are biased by -10000 outside
  the subject's box (box edges floor / ceil on the square latent grid), the background tokens allowed only where no
  box lies, and the image attention then zeroed at those background positions; output = text + scale x image.
- ``msdiffusion/models/model.py`` (``MSAdapter``): the checkpoint ``ms_adapter.bin`` is ``torch.save({"image_proj":
  Resampler.state_dict(), "ms_adapter": ModuleList(unet.attn_processors.values()).state_dict(),
  "dummy_image_tokens": Parameter[1, 4, cross_attention_dim]})`` (``save_to_checkpoint``, lines 64-74); the
  cross-attention processors (odd indices) hold ``to_k_ip`` / ``to_v_ip`` [hidden_size, cross_attention_dim].

Only the inference path of the official script (``inference.py``) is implemented: no pseudo attention masks from
text attention maps (``mask_threshold=None``), no per-subject scales, grounding tokens never dropped
(``drop_grounding_tokens=[0]``). The phrase / end-of-text token indices the script computes feed only the text
attention maps of those unused paths, so they change nothing and are not computed here (``parity/ms_diffusion.py``
runs the official code with them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from baselines.ip_adapter_modules import official_processor_order

#: Fixed by the official code, not stored in the checkpoint's shapes.
TEXT_TOKENS = 77  # MSAdapter(text_tokens=77): the processors split encoder states after 77 text tokens
NUM_BACKGROUND_TOKENS = 4  # MSAdapter(num_dummy_tokens=4)
FOURIER_FREQS = 8  # Resampler(fourier_freqs=8), FourierEmbedder(temperature=100)
FOURIER_TEMPERATURE = 100
DIM_HEAD = 64  # inference.py: Resampler(dim_head=64)
MASK_BIAS = -10000.0  # attention_processor.py: (1 - mask) * -10000.0


class CheckpointLayoutError(ValueError):
    """A state dict does not match the official MS-Diffusion layout for this UNet / encoders."""


# ------------------------------------------------------------------------------------------------ resampler


@dataclass(frozen=True)
class ResamplerConfig:
    """The grounding resampler's shape; the official checkpoint's is ``inference.py:51-62`` with CLIP ViT-bigG/14
    (hidden 1664), SDXL (cross-attention 2048) and its first text encoder (pooled 768)."""

    dim: int = 1280
    depth: int = 4
    heads: int = 20
    dim_head: int = DIM_HEAD
    num_queries: int = 16
    embedding_dim: int = 1664
    output_dim: int = 2048
    ff_mult: int = 4
    phrase_dim: int = 768
    fourier_freqs: int = FOURIER_FREQS

    @property
    def grounding_dim(self) -> int:
        return self.phrase_dim + self.fourier_freqs * 2 * 4  # sin/cos of x0, y0, x1, y1

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], dim_head: int = DIM_HEAD) -> ResamplerConfig:
        """The config an official ``image_proj`` state dict was saved from (its shapes; dim_head is fixed)."""
        try:
            queries = state["grounding_latents"].shape
            depth = len({k.split(".")[1] for k in state if k.startswith("layers.")})
            inner = state["layers.0.0.to_q.weight"].shape[0]
            return cls(
                dim=int(queries[2]),
                depth=depth,
                heads=inner // dim_head,
                dim_head=dim_head,
                num_queries=int(queries[1]),
                embedding_dim=int(state["proj_in.weight"].shape[1]),
                output_dim=int(state["proj_out.weight"].shape[0]),
                ff_mult=int(state["layers.0.1.1.weight"].shape[0]) // int(queries[2]),
                phrase_dim=int(state["latent_proj.0.weight"].shape[1]) - FOURIER_FREQS * 8,
            )
        except (KeyError, IndexError) as err:
            raise CheckpointLayoutError(f"image_proj is not an official grounding Resampler: {err}") from err


class BoxFourierEmbedding(nn.Module):
    """sin / cos of each box coordinate at ``temperature ** (i / freqs)``, ordered (freq, sin/cos, coordinate)."""

    def __init__(self, freqs: int = FOURIER_FREQS, temperature: float = FOURIER_TEMPERATURE) -> None:
        super().__init__()
        # Computed in float32 and cast with the module (a non-persistent buffer, as the official one).
        self.register_buffer("bands", temperature ** (torch.arange(freqs) / freqs), persistent=False)

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        angles = boxes[:, :, None] * self.bands  # [N, 4, F]
        waves = torch.stack((angles.sin(), angles.cos()), dim=-1)  # [N, 4, F, 2]
        return waves.permute(0, 2, 3, 1).reshape(boxes.shape[0], -1)


class LatentCrossAttention(nn.Module):
    """Queries (the subject's latents) attend to [image tokens ; latents] (Perceiver / Flamingo style)."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self._heads(self.to_q(latents))
        k, v = (self._heads(t) for t in self.to_kv(torch.cat((media, latents), dim=1)).chunk(2, dim=-1))
        # Both sides scaled by dim_head ** -0.25 before the product, softmax in float32: as the official
        # PerceiverAttention, which keeps float16 logits in range this way.
        scale = self.dim_head**-0.25
        weights = ((q * scale) @ (k * scale).transpose(-2, -1)).float().softmax(dim=-1).to(q.dtype)
        out = (weights @ v).transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1)
        return self.to_out(out)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    # Indices 0, 1, 3 are the checkpoint's (LayerNorm, Linear, GELU, Linear).
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


class ResamplerBlock(nn.Module):
    def __init__(self, cfg: ResamplerConfig) -> None:
        super().__init__()
        self.attn = LatentCrossAttention(cfg.dim, cfg.heads, cfg.dim_head)
        self.ff = _feed_forward(cfg.dim, cfg.ff_mult)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = self.attn(media, latents) + latents
        return self.ff(latents) + latents


class GroundingResampler(nn.Module):
    """Image tokens of one subject -> ``num_queries`` tokens, its queries grown from its phrase and box."""

    def __init__(self, cfg: ResamplerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Learned queries used only when the official code drops a subject's grounding token
        # (drop_grounding_tokens=1, not the script's setting); kept so the checkpoint loads whole.
        self.ungrounded_queries = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.dim) / cfg.dim**0.5)
        self.box_embedding = BoxFourierEmbedding(cfg.fourier_freqs)
        self.grounding_mlp = nn.Sequential(
            nn.Linear(cfg.grounding_dim, cfg.grounding_dim * 2),
            nn.GELU(),
            nn.Linear(cfg.grounding_dim * 2, cfg.dim * cfg.num_queries),
        )
        self.grounding_norm = nn.LayerNorm(cfg.dim)
        self.proj_in = nn.Linear(cfg.embedding_dim, cfg.dim)
        self.blocks = nn.ModuleList(ResamplerBlock(cfg) for _ in range(cfg.depth))
        self.norm_latents_out = nn.LayerNorm(cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cfg.output_dim)
        self.norm_out = nn.LayerNorm(cfg.output_dim)

    def forward(self, image_tokens: torch.Tensor, phrase_embeds: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``image_tokens`` [N, L, embedding_dim], ``phrase_embeds`` [N, phrase_dim], ``boxes`` [N, 4] (x0 y0 x1 y1
        in 0..1) -> [N, num_queries, output_dim]."""
        grounding = torch.cat((phrase_embeds, self.box_embedding(boxes)), dim=-1)
        latents = self.grounding_norm(self.grounding_mlp(grounding).view(-1, self.cfg.num_queries, self.cfg.dim))
        media = self.proj_in(image_tokens)
        for block in self.blocks:
            latents = block(media, latents)
        return self.norm_out(self.proj_out(self.norm_latents_out(latents)))


_RESAMPLER_KEYS = (  # official Resampler key (regex) -> ours
    (r"^grounding_latents$", "ungrounded_queries"),
    (r"^latent_proj\.(\d+)\.", r"grounding_mlp.\1."),
    (r"^latent_norm\.", "grounding_norm."),
    (r"^attention_norm\.", "norm_latents_out."),
    (r"^layers\.(\d+)\.0\.norm1\.", r"blocks.\1.attn.norm_media."),
    (r"^layers\.(\d+)\.0\.norm2\.", r"blocks.\1.attn.norm_latents."),
    (r"^layers\.(\d+)\.0\.(to_q|to_kv|to_out)\.", r"blocks.\1.attn.\2."),
    (r"^layers\.(\d+)\.1\.(\d+)\.", r"blocks.\1.ff.\2."),
    (r"^(proj_in|proj_out|norm_out)\.", r"\1."),
)


def resampler_key(official: str) -> str:
    """Our parameter name for an official ``image_proj`` key."""
    for pattern, replacement in _RESAMPLER_KEYS:
        ours, n = re.subn(pattern, replacement, official)
        if n:
            return ours
    raise CheckpointLayoutError(f"image_proj key {official!r} is not part of the official grounding Resampler")


# ------------------------------------------------------------------------------------------------ attention


def subject_attention_bias(
    boxes: torch.Tensor, query_len: int, tokens_per_subject: int, background_tokens: int = NUM_BACKGROUND_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit bias over [background tokens ; subject tokens] and the background positions, for a square latent grid.

    ``boxes`` [B, N, 4] (x0 y0 x1 y1 in 0..1, all zero = no subject). A grid cell is inside a box when its index
    lies in [floor(x0 * side), ceil(x1 * side)), computed in ``boxes``' dtype as the official code does. Returns
    bias [B, query_len, background_tokens + N * tokens_per_subject] (0 allowed, -10000 masked) and background
    [B, query_len] (True where no box lies).
    """
    side = math.isqrt(query_len)
    if side * side != query_len:
        raise ValueError(f"ms-diffusion: the layout masks need a square latent grid, got {query_len} positions")
    batch, device, dtype = boxes.shape[0], boxes.device, boxes.dtype
    start = torch.floor(boxes[..., :2] * side)
    end = torch.ceil(boxes[..., 2:] * side)
    cells = torch.arange(side, device=device)
    inside_x = (cells >= start[..., 0:1]) & (cells < end[..., 0:1])  # [B, N, side]
    inside_y = (cells >= start[..., 1:2]) & (cells < end[..., 1:2])
    inside = (inside_y[..., :, None] & inside_x[..., None, :]).reshape(batch, boxes.shape[1], -1)  # [B, N, Q]
    background = ~inside.any(dim=1)
    allowed = torch.cat(
        (
            background[..., None].expand(-1, -1, background_tokens),
            inside.transpose(1, 2).repeat_interleave(tokens_per_subject, dim=-1),
        ),
        dim=-1,
    ).to(dtype)
    return (1 - allowed) * MASK_BIAS, background


class SelfAttnProcessor(nn.Module):
    """diffusers' scaled-dot-product attention, accepting (and ignoring) the ``boxes`` the UNet hands every
    processor, so that diffusers does not warn about an unexpected keyword at each call."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.attention_processor import AttnProcessor2_0

        self._sdpa = AttnProcessor2_0()

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, boxes=None) -> torch.Tensor:  # fmt: skip
        return self._sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class SubjectAttnProcessor(nn.Module):
    """Text cross-attention plus ``scale`` x a layout-masked attention over the subjects' image tokens.

    ``encoder_hidden_states`` = [77 text tokens ; 4 background tokens ; N x tokens_per_subject subject tokens].
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, tokens_per_subject: int, scale: float = 1.0):
        super().__init__()
        self.tokens_per_subject = tokens_per_subject
        self.scale = scale
        self.to_k_image = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_image = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, boxes=None) -> torch.Tensor:  # fmt: skip
        if encoder_hidden_states is None or boxes is None:
            raise ValueError("ms-diffusion: a cross-attention call needs the image tokens and cross_attention_kwargs "
                             "{'boxes': [B, N, 4]}")  # fmt: skip
        if attention_mask is not None:
            raise ValueError("ms-diffusion: text attention masks are not part of MS-Diffusion inference")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, query_len, _ = hidden_states.shape
        bias, background = subject_attention_bias(boxes.to(hidden_states.dtype), query_len, self.tokens_per_subject)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        text, image = encoder_hidden_states[:, :TEXT_TOKENS], encoder_hidden_states[:, TEXT_TOKENS:]
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)

        heads = attn.heads
        head_dim = attn.to_k.out_features // heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, heads, head_dim).transpose(1, 2)

        text_out = F.scaled_dot_product_attention(split(query), split(attn.to_k(text)), split(attn.to_v(text)))
        text_out = text_out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)

        # The image branch uses diffusers' explicit scores (baddbmm with the bias, softmax) as the official code does,
        # then silences the background positions entirely.
        q = attn.head_to_batch_dim(query)
        k = attn.head_to_batch_dim(self.to_k_image(image))
        v = attn.head_to_batch_dim(self.to_v_image(image))
        probs = attn.get_attention_scores(q, k, bias.repeat_interleave(heads, dim=0))
        probs = probs.masked_fill(background.repeat_interleave(heads, dim=0)[..., None], 0)
        image_out = attn.batch_to_head_dim(torch.bmm(probs, v))

        hidden_states = attn.to_out[1](attn.to_out[0](text_out + self.scale * image_out))
        if spatial:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _hidden_size(name: str, block_out_channels: Sequence[int]) -> int:
    # As MSAdapter.set_ms_adapter (model.py:107-114): a processor's width is its block's channel count.
    if name.startswith("mid_block"):
        return block_out_channels[-1]
    block_id = int(name.split(".")[1])
    if name.startswith("up_blocks"):
        return list(reversed(block_out_channels))[block_id]
    return block_out_channels[block_id]


def install_processors(unet: Any, tokens_per_subject: int, scale: float) -> dict[str, SubjectAttnProcessor]:
    """Put the MS-Diffusion processors on ``unet`` (attn1: plain attention; attn2: subject attention);
    returns the subject processors by name."""
    channels = list(unet.config.block_out_channels)
    cross = unet.config.cross_attention_dim
    processors: dict[str, nn.Module] = {}
    subject: dict[str, SubjectAttnProcessor] = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            processors[name] = SelfAttnProcessor()
        else:
            subject[name] = SubjectAttnProcessor(_hidden_size(name, channels), cross, tokens_per_subject, scale)
            processors[name] = subject[name]
    unet.set_attn_processor(processors)
    return subject


# ------------------------------------------------------------------------------------------------ checkpoint


class MSDiffusionAdapter(nn.Module):
    """What ``ms_adapter.bin`` holds, in our modules: the resampler, the background tokens and (by reference)
    the UNet's subject attention processors."""

    def __init__(self, cfg: ResamplerConfig, unet: Any, scale: float) -> None:
        super().__init__()
        self.resampler = GroundingResampler(cfg)
        self.background_tokens = nn.Parameter(torch.zeros(1, NUM_BACKGROUND_TOKENS, cfg.output_dim))
        self.processors = install_processors(unet, cfg.num_queries, scale)
        # Registered here too, so that moving / casting the adapter moves the processors' weights.
        self.subject_layers = nn.ModuleList(self.processors.values())
        self.processor_order = official_processor_order(unet.attn_processors)

    def official_targets(self) -> dict[str, torch.Tensor]:
        """Official checkpoint key (flattened ``group.key``) -> the tensor of ours it loads into."""
        ours = dict(self.resampler.named_parameters())
        targets: dict[str, torch.Tensor] = {}
        for official in _official_resampler_keys(self.resampler):
            targets[f"image_proj.{official}"] = ours[resampler_key(official)]
        for index, name in enumerate(self.processor_order):
            if name in self.processors:
                proc = self.processors[name]
                targets[f"ms_adapter.{index}.to_k_ip.weight"] = proc.to_k_image.weight
                targets[f"ms_adapter.{index}.to_v_ip.weight"] = proc.to_v_image.weight
        targets["dummy_image_tokens"] = self.background_tokens
        return targets

    def load_official(self, state: dict[str, Any], source: str = "state dict") -> None:
        """Copy an official checkpoint (nested as saved, or flattened) in; every key used, every shape checked."""
        flat = flatten(state)
        targets = self.official_targets()
        missing = sorted(set(targets) - set(flat))
        extra = sorted(set(flat) - set(targets))
        if missing or extra:
            raise CheckpointLayoutError(
                f"ms-diffusion: {source} does not match the official layout for this UNet: "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})"
            )
        with torch.no_grad():
            for key, target in targets.items():
                tensor = flat[key]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise CheckpointLayoutError(
                        f"ms-diffusion: {source}: {key} has shape {tuple(tensor.shape)}, this model expects "
                        f"{tuple(target.shape)}"
                    )
                target.copy_(tensor.to(target.dtype))


def _official_resampler_keys(resampler: GroundingResampler) -> list[str]:
    """The official ``image_proj`` keys of a resampler of this config (the inverse of :func:`resampler_key`)."""
    cfg = resampler.cfg
    keys = ["grounding_latents", "latent_proj.0.weight", "latent_proj.0.bias", "latent_proj.2.weight",
            "latent_proj.2.bias", "latent_norm.weight", "latent_norm.bias", "proj_in.weight", "proj_in.bias",
            "attention_norm.weight", "attention_norm.bias", "proj_out.weight", "proj_out.bias", "norm_out.weight",
            "norm_out.bias"]  # fmt: skip
    for i in range(cfg.depth):
        for part in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "to_q.weight", "to_kv.weight",
                     "to_out.weight"):  # fmt: skip
            keys.append(f"layers.{i}.0.{part}")
        keys += [f"layers.{i}.1.0.weight", f"layers.{i}.1.0.bias", f"layers.{i}.1.1.weight", f"layers.{i}.1.3.weight"]
    return keys


def official_shapes(cfg: ResamplerConfig, unet: Any) -> dict[str, tuple[int, ...]]:
    """Flattened official key -> shape for ``cfg`` and ``unet`` (to build random stand-ins for the checkpoint).

    Read from names and config only: ``unet`` is left as it is (its processors are not replaced)."""
    with torch.device("meta"):
        resampler = GroundingResampler(cfg)
    ours = dict(resampler.named_parameters())
    shapes = {f"image_proj.{k}": tuple(ours[resampler_key(k)].shape) for k in _official_resampler_keys(resampler)}
    channels = list(unet.config.block_out_channels)
    for index, name in enumerate(official_processor_order(unet.attn_processors)):
        if not name.endswith("attn1.processor"):
            shape = (_hidden_size(name, channels), unet.config.cross_attention_dim)
            shapes[f"ms_adapter.{index}.to_k_ip.weight"] = shape
            shapes[f"ms_adapter.{index}.to_v_ip.weight"] = shape
    shapes["dummy_image_tokens"] = (1, NUM_BACKGROUND_TOKENS, cfg.output_dim)
    return shapes


def flatten(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``{"image_proj": {...}, "ms_adapter": {...}, "dummy_image_tokens": T}`` -> ``{"image_proj.k": ...}``."""
    flat: dict[str, torch.Tensor] = {}
    for group, value in state.items():
        if isinstance(value, dict):
            flat.update({f"{group}.{k}": v for k, v in value.items()})
        else:
            flat[group] = value
    return flat


def nest(flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The inverse of :func:`flatten`: the layout ``MSAdapter.save_to_checkpoint`` writes."""
    nested: dict[str, Any] = {"image_proj": {}, "ms_adapter": {}}
    for key, value in flat.items():
        group, _, rest = key.partition(".")
        if group in nested and rest:
            nested[group][rest] = value
        else:
            nested[key] = value
    return nested


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``ms_adapter.bin`` (``torch.save`` of tensors only: loaded with ``weights_only``) or a ``.safetensors``
    with flattened keys."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "image_proj" not in state:
        raise CheckpointLayoutError(f"ms-diffusion: {path} is not an MS-Diffusion checkpoint (no 'image_proj' entry)")
    return state


__all__ = [
    "BoxFourierEmbedding",
    "CheckpointLayoutError",
    "GroundingResampler",
    "MSDiffusionAdapter",
    "ResamplerConfig",
    "SubjectAttnProcessor",
    "flatten",
    "install_processors",
    "nest",
    "official_shapes",
    "read_checkpoint",
    "resampler_key",
    "subject_attention_bias",
]
