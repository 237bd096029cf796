"""UNO's network on diffusers' ``FluxTransformer2DModel``: the official checkpoints mapped onto it, the LoRA, the
reference tokens with their shifted positions, the sampler and the preprocessing.

Written here against diffusers 0.42 from a reading of bytedance/UNO@d305981b9e301315b5c110aef9c7eed827457858
(Apache-2.0; no code copied); ``parity/uno.py`` checks every piece against the official code. What UNO changes in
FLUX.1-dev, and how it maps here:

- Reference images are VAE latents packed into 2x2 patches exactly like the noisy image, embedded by the same
  ``img_in`` (diffusers ``x_embedder``) and appended after the image tokens (uno/flux/model.py:177-187); the network
  output keeps only the image tokens (model.py:219). Every FLUX layer acts per token except attention, so running
  diffusers' transformer on ``cat(image, refs)`` and slicing its output is the same network
  (:func:`predict_velocity`).
- UnoPE: reference ``k`` has row/column ids shifted past the image grid and past every earlier reference, on both
  axes ("d" mode, the script default; uno/flux/sampling.py:135-155): :func:`reference_ids`.
- The LoRA (rank 512 in inference.py:56) sits on every block, unmerged: the fused q/k/v projection and the output
  projection of both streams of a double block, the fused q/k/v and the output ``linear2`` of a single block
  (uno/flux/modules/layers.py:188-230, 321-345; util.py:324-349). Here it wraps diffusers' fused ``to_qkv`` /
  ``to_added_qkv`` (``fuse_projections``), ``to_out.0``, ``to_add_out`` and the single block's ``proj_out``
  (:class:`LoRALinear`), computed in the LoRA file's own dtype as the official ``LoRALinearLayer`` does.
- The FLUX.1-dev weights are the original ``flux1-dev.safetensors`` and ``ae.safetensors`` that the official loader
  reads (util.py:115-148, 256-321), mapped key by key (:func:`transformer_state_dict`, :func:`ae_state_dict`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from PIL import Image

# FLUX.1-dev (uno/flux/util.py:122-135, diffusers' names): hidden 3072 = 24 heads x 128, 19 double + 38 single blocks.
FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
# The FLUX autoencoder (util.py:137-147): ch 128, ch_mult (1, 2, 4, 4), 2 res blocks, 16 latent channels.
FLUX_AE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
T5_MAX_LENGTH = 512  # uno/flux/pipeline.py:114 load_t5(max_length=512)
CLIP_MAX_LENGTH = 77  # util.py:389


def tiny_transformer_config() -> dict[str, Any]:
    """A FLUX-shaped transformer small enough for CPU tests: 16 latent channels (the pipeline's), 2 heads of 16."""
    return {
        **FLUX_DEV_TRANSFORMER,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "axes_dims_rope": (4, 6, 6),
    }


def tiny_ae_config() -> dict[str, Any]:
    """Four levels (the pipeline assumes 8x downsampling and 16 latent channels), 32 channels each."""
    return {
        **FLUX_AE,
        "block_out_channels": (32, 32, 32, 32),
        "layers_per_block": 1,
        "sample_size": 32,
    }


# ------------------------------------------------------------------------------------------------ the network


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus an unmerged low-rank branch ``up(down(x))``, computed in the branch's own dtype and added
    in the input's (the official ``LoRALinearLayer`` with ``network_alpha=None`` and weight 1,
    uno/flux/modules/layers.py:101-125)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.lora_down = nn.Linear(in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype)))
        return super().forward(x) + lora.to(x.dtype)


def lora_sites(transformer) -> dict[str, tuple[Any, str]]:
    """Our module path of each LoRA site -> (parent module, attribute), for a fused transformer."""
    sites: dict[str, tuple[Any, str]] = {}
    for i, block in enumerate(transformer.transformer_blocks):
        p = f"transformer_blocks.{i}."
        sites[p + "attn.to_qkv"] = (block.attn, "to_qkv")
        sites[p + "attn.to_out.0"] = (block.attn.to_out, "0")
        sites[p + "attn.to_added_qkv"] = (block.attn, "to_added_qkv")
        sites[p + "attn.to_add_out"] = (block.attn, "to_add_out")
    for i, block in enumerate(transformer.single_transformer_blocks):
        p = f"single_transformer_blocks.{i}."
        sites[p + "attn.to_qkv"] = (block.attn, "to_qkv")
        sites[p + "proj_out"] = (block, "proj_out")
    return sites


def build_transformer(config: dict[str, Any], lora_rank: int, device: str = "meta"):
    """diffusers' FLUX transformer with fused q/k/v projections (the official layout: one ``qkv`` linear per
    stream) and a rank-``lora_rank`` LoRA on every site of :func:`lora_sites`. On ``meta`` by default: the weights
    come with :func:`load_weights`."""
    from diffusers import FluxTransformer2DModel

    with torch.device(device):
        transformer = FluxTransformer2DModel(**config)
        for module in transformer.modules():
            if module.__class__.__name__ == "FluxAttention":
                module.fuse_projections()
                # The unfused copies would double the q/k/v memory (6 GB at real size) and never run.
                for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                    if hasattr(module, name):
                        delattr(module, name)
        for parent, attr in lora_sites(transformer).values():
            linear = getattr(parent, attr) if attr != "0" else parent[0]
            replacement = LoRALinear(linear.in_features, linear.out_features, lora_rank, bias=linear.bias is not None)
            if attr == "0":
                parent[0] = replacement
            else:
                setattr(parent, attr, replacement)
    return transformer.eval().requires_grad_(False)


def transformer_state_dict(flux: dict[str, Any], lora: dict[str, Any], num_layers: int, num_single_layers: int):
    """Map the original FLUX keys (``flux1-dev.safetensors``) and UNO's LoRA keys (``dit_lora.safetensors``,
    ``{double,single}_blocks.N.processor.*_lora*.{down,up}.weight``) onto :func:`build_transformer`'s keys.

    Every source key must be used and every target key filled: ``KeyError`` lists what is left over or missing.
    """
    src = dict(flux)
    out: dict[str, Any] = {}

    def take(key: str) -> Any:
        if key not in src:
            raise KeyError(f"FLUX checkpoint has no key {key!r}")
        return src.pop(key)

    def linear(ours: str, theirs: str) -> None:
        out[ours + ".weight"] = take(theirs + ".weight")
        out[ours + ".bias"] = take(theirs + ".bias")

    linear("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    linear("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    linear("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    linear("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    linear("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
    linear("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    linear("context_embedder", "txt_in")
    linear("x_embedder", "img_in")
    for i in range(num_layers):
        o, t = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        linear(o + "norm1.linear", t + "img_mod.lin")
        linear(o + "norm1_context.linear", t + "txt_mod.lin")
        linear(o + "attn.to_qkv", t + "img_attn.qkv")
        linear(o + "attn.to_out.0", t + "img_attn.proj")
        linear(o + "attn.to_added_qkv", t + "txt_attn.qkv")
        linear(o + "attn.to_add_out", t + "txt_attn.proj")
        out[o + "attn.norm_q.weight"] = take(t + "img_attn.norm.query_norm.scale")
        out[o + "attn.norm_k.weight"] = take(t + "img_attn.norm.key_norm.scale")
        out[o + "attn.norm_added_q.weight"] = take(t + "txt_attn.norm.query_norm.scale")
        out[o + "attn.norm_added_k.weight"] = take(t + "txt_attn.norm.key_norm.scale")
        linear(o + "ff.net.0.proj", t + "img_mlp.0")
        linear(o + "ff.net.2", t + "img_mlp.2")
        linear(o + "ff_context.net.0.proj", t + "txt_mlp.0")
        linear(o + "ff_context.net.2", t + "txt_mlp.2")
    for i in range(num_single_layers):
        o, t = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        linear(o + "norm.linear", t + "modulation.lin")
        # linear1 = [q; k; v; mlp-in] (layers.py:387): the first 3 x hidden rows are diffusers' fused to_qkv.
        w, b = take(t + "linear1.weight"), take(t + "linear1.bias")
        hidden = w.shape[1]
        out[o + "attn.to_qkv.weight"], out[o + "proj_mlp.weight"] = w[: 3 * hidden], w[3 * hidden :]
        out[o + "attn.to_qkv.bias"], out[o + "proj_mlp.bias"] = b[: 3 * hidden], b[3 * hidden :]
        linear(o + "proj_out", t + "linear2")
        out[o + "attn.norm_q.weight"] = take(t + "norm.query_norm.scale")
        out[o + "attn.norm_k.weight"] = take(t + "norm.key_norm.scale")
    # LastLayer's modulation is (shift, scale) (layers.py:432); diffusers' AdaLayerNormContinuous reads (scale, shift).
    for part in ("weight", "bias"):
        shift, scale = take(f"final_layer.adaLN_modulation.1.{part}").chunk(2, dim=0)
        out[f"norm_out.linear.{part}"] = torch.cat([scale, shift], dim=0)
    linear("proj_out", "final_layer.linear")
    if src:
        raise KeyError(f"FLUX checkpoint keys not used: {sorted(src)[:8]} ({len(src)} in all)")

    lora_src = dict(lora)
    double = {"qkv_lora1": "attn.to_qkv", "proj_lora1": "attn.to_out.0", "qkv_lora2": "attn.to_added_qkv"}
    double["proj_lora2"] = "attn.to_add_out"
    single = {"qkv_lora": "attn.to_qkv", "proj_lora": "proj_out"}
    for blocks, theirs, ours, names in (
        (num_layers, "double_blocks", "transformer_blocks", double),
        (num_single_layers, "single_blocks", "single_transformer_blocks", single),
    ):
        for i in range(blocks):
            for name, site in names.items():
                for part, ours_part in (("down", "lora_down"), ("up", "lora_up")):
                    key = f"{theirs}.{i}.processor.{name}.{part}.weight"
                    if key not in lora_src:
                        raise KeyError(f"LoRA checkpoint has no key {key!r}")
                    out[f"{ours}.{i}.{site}.{ours_part}.weight"] = lora_src.pop(key)
    if lora_src:
        raise KeyError(f"LoRA checkpoint keys not used: {sorted(lora_src)[:8]} ({len(lora_src)} in all)")
    return out


def lora_rank_of(lora: dict[str, Any]) -> int:
    """The rank of a UNO LoRA state dict (the rows of any ``down`` weight; util.py:50-53)."""
    for key, value in lora.items():
        if key.endswith(".down.weight"):
            return int(value.shape[0])
    raise KeyError("LoRA checkpoint has no '*.down.weight' key")


def load_weights(transformer, state_dict: dict[str, Any], dtype, device) -> None:
    """Assign the mapped weights: FLUX weights in ``dtype``, the LoRA in the file's own dtype (the official loader
    assigns the file's tensors, util.py:310-311)."""
    cast = {
        k: v.to(device=device) if ".lora_" in k else v.to(device=device, dtype=dtype) for k, v in state_dict.items()
    }
    missing, unexpected = transformer.load_state_dict(cast, strict=False, assign=True)
    if missing or unexpected:
        raise KeyError(f"UNO transformer: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")


def ae_key_map(config: dict[str, Any]) -> dict[str, str]:
    """Original FLUX autoencoder key (``ae.safetensors``: the LDM layout, autoencoder.py:38-275) -> diffusers
    ``AutoencoderKL`` key, for every parameter of ``config``. The decoder's levels run the other way in diffusers
    (the original ``up.0`` is diffusers' last up block)."""
    levels = len(config["block_out_channels"])
    res = config["layers_per_block"]
    channels = (config["block_out_channels"][0], *config["block_out_channels"])
    names: dict[str, str] = {}

    def conv(theirs: str, ours: str) -> None:
        names[theirs + ".weight"], names[theirs + ".bias"] = ours + ".weight", ours + ".bias"

    def resnet(theirs: str, ours: str, shortcut: bool) -> None:
        for part in ("norm1", "conv1", "norm2", "conv2"):
            conv(f"{theirs}.{part}", f"{ours}.{part}")
        if shortcut:
            conv(f"{theirs}.nin_shortcut", f"{ours}.conv_shortcut")

    def middle(side: str) -> None:
        resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", False)
        resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", False)
        attn = f"{side}.mid_block.attentions.0"
        for theirs, ours in (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v")):
            conv(f"{side}.mid.attn_1.{theirs}", f"{attn}.{ours}")
        conv(f"{side}.mid.attn_1.proj_out", f"{attn}.to_out.0")

    conv("encoder.conv_in", "encoder.conv_in")
    for i in range(levels):
        for j in range(res):
            c_in = channels[i] if j == 0 else channels[i + 1]
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", c_in != channels[i + 1])
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    middle("encoder")
    conv("encoder.norm_out", "encoder.conv_norm_out")
    conv("encoder.conv_out", "encoder.conv_out")
    conv("decoder.conv_in", "decoder.conv_in")
    middle("decoder")
    block_in = channels[-1]
    for k, i in enumerate(reversed(range(levels))):
        for j in range(res + 1):
            resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}", block_in != channels[i + 1])
            block_in = channels[i + 1]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv")
    conv("decoder.norm_out", "decoder.conv_norm_out")
    conv("decoder.conv_out", "decoder.conv_out")
    return names


def ae_state_dict(ae: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """``ae.safetensors`` in diffusers' ``AutoencoderKL`` layout (:func:`ae_key_map`); the attention's 1x1
    convolutions become linear weights. ``KeyError`` names what is missing or left over."""
    names = ae_key_map(config)
    missing = sorted(set(names) - set(ae))
    extra = sorted(set(ae) - set(names))
    if missing or extra:
        raise KeyError(f"FLUX autoencoder: missing keys {missing[:8]}, keys not used {extra[:8]}")
    out = {}
    for theirs, ours in names.items():
        value = ae[theirs]
        if ".attentions." in ours and ours.endswith(".weight") and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[ours] = value
    return out


# ------------------------------------------------------------------------------------- inputs and the sampler


def reference_long_side(n_refs: int, single: int = 512, multi: int = 320) -> int:
    """inference.py:94-95: 512 px for one reference, 320 for more (the script fixes it from the first task only;
    here each task gets its own, as app.py's ``gradio_generate`` does, pipeline.py:225)."""
    return single if n_refs <= 1 else multi


def preprocess_reference(image: Image.Image, long_side: int) -> Image.Image:
    """pipeline.py:70-98 ``preprocess_ref``: scale the long side to ``long_side`` (Lanczos, the short side
    truncated), then centre-crop both sides down to a multiple of 16, then RGB."""
    from PIL import Image

    w, h = image.size
    if w >= h:
        new_w, new_h = long_side, int((long_side / w) * h)
    else:
        new_w, new_h = int((long_side / h) * w), long_side
    image = image.resize((new_w, new_h), resample=Image.LANCZOS)
    target_w, target_h = new_w // 16 * 16, new_h // 16 * 16
    left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    return image.crop((left, top, left + target_w, top + target_h)).convert("RGB")


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): 2x2 patches, channels major (sampling.py:126)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack` for a ``height`` x ``width`` pixel image (sampling.py:244-252)."""
    b, _, d = tokens.shape
    h, w = math.ceil(height / 16), math.ceil(width / 16)
    x = tokens.reshape(b, h, w, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h * 2, w * 2)


def grid_ids(rows: int, cols: int, row_offset: int = 0, col_offset: int = 0) -> torch.Tensor:
    """(rows*cols, 3) position ids: axis 0 is 0, axes 1 and 2 the row and column plus their offsets."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(rows)[:, None] + row_offset
    ids[..., 2] = ids[..., 2] + torch.arange(cols)[None, :] + col_offset
    return ids.reshape(rows * cols, 3)


def reference_ids(image_grid: tuple[int, int], reference_grids: list[tuple[int, int]]) -> list[torch.Tensor]:
    """UnoPE ("d"): reference k starts where the image and references 0..k-1 end, on both axes
    (sampling.py:137-155)."""
    row_shift, col_shift = image_grid
    ids = []
    for rows, cols in reference_grids:
        ids.append(grid_ids(rows, cols, row_shift, col_shift))
        row_shift += rows
        col_shift += cols
    return ids


def schedule(steps: int, width: int, height: int, base_shift: float = 0.5, max_shift: float = 1.15) -> list[float]:
    """The official timesteps, 1 -> 0 in ``steps`` intervals, time-shifted with mu linear in the sequence length
    (sampling.py:179-207). UNO passes ``(width // 8) * (height // 8) // (16 * 16)`` as that length
    (pipeline.py:259-263): 16 at 512x512, where FLUX's own code passes the token count (1024), so UNO's mu is
    0.459 instead of 0.756. Reproduced as the official pipeline runs it."""
    seq_len = (width // 8) * (height // 8) // (16 * 16)
    slope = (max_shift - base_shift) / (4096 - 256)
    mu = base_shift + slope * (seq_len - 256)
    t = torch.linspace(1, 0, steps + 1)
    t = math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    return t.tolist()


def predict_velocity(
    transformer,
    latents: torch.Tensor,
    latent_ids: torch.Tensor,
    refs: torch.Tensor | None,
    ref_ids: torch.Tensor | None,
    text: torch.Tensor,
    text_ids: torch.Tensor,
    pooled: torch.Tensor,
    t: float,
    guidance: float,
) -> torch.Tensor:
    """One call of UNO's network (model.py:150-222): image tokens then reference tokens through the FLUX
    transformer, the image tokens' prediction returned. ``t`` and ``guidance`` are made in the latents' dtype as
    the official ``denoise`` makes them (sampling.py:225-227)."""
    n = latents.shape[1]
    tokens = latents if refs is None else torch.cat([latents, refs], dim=1)
    ids = latent_ids if ref_ids is None else torch.cat([latent_ids, ref_ids], dim=0)
    batch = latents.shape[0]
    t_vec = torch.full((batch,), t, dtype=latents.dtype, device=latents.device)
    g_vec = torch.full((batch,), guidance, dtype=latents.dtype, device=latents.device)
    out = transformer(
        hidden_states=tokens,
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=t_vec,
        img_ids=ids,
        txt_ids=text_ids,
        guidance=g_vec,
        return_dict=False,
    )[0]
    return out[:, :n]


def denoise(transformer, latents, latent_ids, refs, ref_ids, text, text_ids, pooled, timesteps, guidance):
    """The official Euler loop (sampling.py:210-241): x <- x + (t_next - t) * v, in the latents' dtype."""
    x = latents
    for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:], strict=True):
        v = predict_velocity(transformer, x, latent_ids, refs, ref_ids, text, text_ids, pooled, t_curr, guidance)
        x = x + (t_prev - t_curr) * v
    return x


def encode_prompt(prompt: str, t5, t5_tokenizer, clip, clip_tokenizer, device) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 ``last_hidden_state`` over 512 max-length-padded tokens and CLIP's ``pooler_output`` over 77, neither
    with an attention mask (uno/flux/modules/conditioner.py:20-38)."""
    outputs = []
    for model, tokenizer, length, key in (
        (t5, t5_tokenizer, T5_MAX_LENGTH, "last_hidden_state"),
        (clip, clip_tokenizer, CLIP_MAX_LENGTH, "pooler_output"),
    ):
        ids = tokenizer(
            [prompt], truncation=True, max_length=length, padding="max_length", return_tensors="pt"
        ).input_ids
        outputs.append(getattr(model(input_ids=ids.to(device), attention_mask=None), key))
    return outputs[0], outputs[1]


def reference_latents(vae, image: Image.Image, generator, dtype) -> torch.Tensor:
    """pipeline.py:266-272: pixels to [-1, 1] in float32, one sample of the VAE posterior (``DiagonalGaussian``
    samples by default, autoencoder.py:277-289), scaled and shifted (autoencoder.py:317-320), cast to ``dtype``."""
    import numpy as np

    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    pixels = (pixels * 2.0 - 1.0)[None].to(device=vae.device, dtype=vae.dtype)
    dist = vae.encode(pixels).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator, dtype=dist.mean.dtype).to(dist.mean.device)
    z = dist.mean + dist.std * noise
    z = vae.config.scaling_factor * (z - vae.config.shift_factor)
    return z.to(dtype)


def decode(vae, tokens: torch.Tensor, height: int, width: int) -> Image.Image:
    """pipeline.py:297-303: unpack in float32, undo scale and shift, decode, clamp, to 8-bit by truncation."""
    from PIL import Image

    z = unpack(tokens.float(), height, width)
    z = z / vae.config.scaling_factor + vae.config.shift_factor
    x = vae.decode(z.to(vae.dtype)).sample.float().clamp(-1, 1)
    pixels = (127.5 * (x[-1].permute(1, 2, 0) + 1.0)).cpu().to(torch.uint8).numpy()
    return Image.fromarray(pixels)


# ------------------------------------------------------------------------------------ the official layouts


def official_flux_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every key of an original-layout FLUX checkpoint for a diffusers transformer ``config``, with its shape (what
    ``flux1-dev.safetensors`` holds at real size; for random stand-ins in the tests and the GPU benchmark)."""
    h = config["num_attention_heads"] * config["attention_head_dim"]
    mlp, head = 4 * h, config["attention_head_dim"]
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_f: int, in_f: int) -> None:
        shapes[name + ".weight"], shapes[name + ".bias"] = (out_f, in_f), (out_f,)

    linear("img_in", h, config["in_channels"])
    linear("txt_in", h, config["joint_attention_dim"])
    for name, in_f in (("time_in", 256), ("vector_in", config["pooled_projection_dim"]), ("guidance_in", 256)):
        linear(f"{name}.in_layer", h, in_f)
        linear(f"{name}.out_layer", h, h)
    for i in range(config["num_layers"]):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}_"
            linear(p + "mod.lin", 6 * h, h)
            linear(p + "attn.qkv", 3 * h, h)
            linear(p + "attn.proj", h, h)
            shapes[p + "attn.norm.query_norm.scale"] = shapes[p + "attn.norm.key_norm.scale"] = (head,)
            linear(p + "mlp.0", mlp, h)
            linear(p + "mlp.2", h, mlp)
    for i in range(config["num_single_layers"]):
        p = f"single_blocks.{i}."
        linear(p + "modulation.lin", 3 * h, h)
        linear(p + "linear1", 3 * h + mlp, h)
        linear(p + "linear2", h, h + mlp)
        shapes[p + "norm.query_norm.scale"] = shapes[p + "norm.key_norm.scale"] = (head,)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    linear("final_layer.linear", config["in_channels"], h)
    return shapes


def official_lora_shapes(config: dict[str, Any], rank: int) -> dict[str, tuple[int, ...]]:
    """Every key of a UNO LoRA (``dit_lora.safetensors``) for ``config`` at ``rank``, with its shape."""
    h = config["num_attention_heads"] * config["attention_head_dim"]
    shapes: dict[str, tuple[int, ...]] = {}

    def lora(name: str, in_f: int, out_f: int) -> None:
        shapes[name + ".down.weight"], shapes[name + ".up.weight"] = (rank, in_f), (out_f, rank)

    for i in range(config["num_layers"]):
        for k in ("1", "2"):
            lora(f"double_blocks.{i}.processor.qkv_lora{k}", h, 3 * h)
            lora(f"double_blocks.{i}.processor.proj_lora{k}", h, h)
    for i in range(config["num_single_layers"]):
        lora(f"single_blocks.{i}.processor.qkv_lora", h, 3 * h)
        lora(f"single_blocks.{i}.processor.proj_lora", 5 * h, h)
    return shapes


def official_ae_state_dict(vae) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL``'s weights in the original FLUX layout (the inverse of :func:`ae_state_dict`)."""
    ours = vae.state_dict()
    out = {}
    for theirs, name in ae_key_map(dict(vae.config)).items():
        value = ours[name]
        if ".attentions." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[theirs] = value.contiguous()
    return out
