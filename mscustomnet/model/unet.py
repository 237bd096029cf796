"""The CustomNet UNet: a diffusers SD1.5-class ``UNet2DConditionModel`` whose cross-attentions are dual.

CustomNet (TencentARC/CustomNet@23a378f, ``customnet/attention.py``, ``CrossAttention(new_text_att=True)``) splits
the context of every ``attn2`` into the image-embedding tokens (``context[:, :1]``) and the text tokens
(``context[:, 1:]``), attends to each with one shared query, and adds the two results before ``to_out``:

    out = softmax(q k_img^T / sqrt(d)) v_img + text_scale * softmax(q k_text^T / sqrt(d)) v_text

with k_img/v_img from the SD projections ``to_k``/``to_v`` and k_text/v_text from the new ``to_k_text``/``to_v_text``
(no bias), text_scale = 1.0. Here the context is ``[subject tokens (K); text tokens (77)]``: the last
``text_length`` tokens are the text, everything before them the subjects (K = 1 for CustomNet, K >= 1 for
MS-CustomNet). Subject slots can be masked (padding, or dropped for classifier-free guidance) through the UNet's
``encoder_attention_mask``; a row whose subjects are all masked gets no image contribution at all, which is what
CustomNet's all-zero unconditional image token produces (to_k(0) = to_v(0) = 0, so its branch output is 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from mscustomnet.model.config import TEXT_LENGTH, UNetConfig

# A masked key gets this additive bias (diffusers builds the same -10000 bias from encoder_attention_mask).
_MASKED = -10000.0


class DualCrossAttnProcessor(nn.Module):
    """Cross-attention processor owning the text-branch projections ``to_k_text`` / ``to_v_text``."""

    def __init__(self, inner_dim: int, context_dim: int, text_length: int = TEXT_LENGTH, text_scale: float = 1.0):
        super().__init__()
        self.to_k_text = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v_text = nn.Linear(context_dim, inner_dim, bias=False)
        self.text_length = text_length
        self.text_scale = text_scale

    def __call__(  # diffusers calls processors directly, with the Attention module first
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("DualCrossAttnProcessor is a cross-attention: encoder_hidden_states is required")
        batch, _, _ = hidden_states.shape
        num_subjects = encoder_hidden_states.shape[1] - self.text_length
        if num_subjects < 0:
            raise ValueError(
                f"context has {encoder_hidden_states.shape[1]} tokens, fewer than the {self.text_length} text tokens"
            )
        heads = attn.heads
        query = attn.to_q(hidden_states)
        head_dim = query.shape[-1] // heads

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, heads, head_dim).transpose(1, 2)

        query = split_heads(query)
        text = encoder_hidden_states[:, num_subjects:]
        out = F.scaled_dot_product_attention(
            query, split_heads(self.to_k_text(text)), split_heads(self.to_v_text(text))
        )
        if self.text_scale != 1.0:
            out = out * self.text_scale
        if num_subjects > 0:
            subjects = encoder_hidden_states[:, :num_subjects]
            bias = None
            keep = None
            if attention_mask is not None:
                # diffusers hands over the bias form of encoder_attention_mask: [batch, 1, K + text_length].
                bias = attention_mask[..., :num_subjects].reshape(batch, 1, 1, num_subjects).to(query.dtype)
                keep = (bias > _MASKED / 2).any(dim=-1, keepdim=True).to(query.dtype)
            image_out = F.scaled_dot_product_attention(
                query, split_heads(attn.to_k(subjects)), split_heads(attn.to_v(subjects)), attn_mask=bias
            )
            out = out + (image_out if keep is None else image_out * keep)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def build_unet(config: UNetConfig, text_length: int = TEXT_LENGTH, text_scale: float = 1.0) -> UNet2DConditionModel:
    """The UNet with a :class:`DualCrossAttnProcessor` on every ``attn2`` (randomly initialised)."""
    unet = UNet2DConditionModel(
        sample_size=config.sample_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=config.down_block_types,
        up_block_types=config.up_block_types,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_head_dim,
        cross_attention_dim=config.cross_attention_dim,
        norm_num_groups=config.norm_num_groups,
    )
    install_dual_attention(unet, config.cross_attention_dim, text_length, text_scale)
    return unet


def install_dual_attention(
    unet: UNet2DConditionModel, context_dim: int, text_length: int = TEXT_LENGTH, text_scale: float = 1.0
) -> None:
    """Put a new dual processor on every cross-attention and the SDPA processor on every self-attention."""
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        if name.endswith("attn2"):
            inner = module.to_q.out_features
            proc = DualCrossAttnProcessor(inner, context_dim, text_length, text_scale)
            proc.to(device=module.to_q.weight.device, dtype=module.to_q.weight.dtype)
            module.set_processor(proc)
        else:
            module.set_processor(AttnProcessor2_0())


def dual_processors(unet: UNet2DConditionModel) -> dict[str, DualCrossAttnProcessor]:
    """Name -> dual processor, in module order (16 for the SD1.5 layout)."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, DualCrossAttnProcessor)}


__all__ = ["DualCrossAttnProcessor", "build_unet", "dual_processors", "install_dual_attention"]
