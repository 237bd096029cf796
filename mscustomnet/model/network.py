"""The CustomNet / MS-CustomNet network: dual-attention UNet, SD VAE, frozen CLIP towers, projection, Phi_c.

Conditioning, as in CustomNet (TencentARC/CustomNet@23a378f, ``ldm/models/diffusion/ddpm.py`` ``get_input`` and
``DiffusionWrapper`` ``hybrid``, ``main/app.py`` ``run_generation``), extended to K subjects (MS-CustomNet, seed
paper Eq. 6-11):

- subject token k: ``F_proj([f_v,k; T_k; e_c,k])`` where f_v is the CLIP ViT-L/14 image embedding (projected,
  unnormalised: ``clip.encode_image``) of the reference, T the 4-d viewpoint ``[polar (rad), sin(azimuth),
  cos(azimuth), distance]`` and e_c = Phi_c(one-hot category). For CustomNet (no categories) F_proj is
  ``cc_projection`` = Linear(772 -> 768);
- the context of every cross-attention is ``[subject tokens (K); text tokens (77)]`` (see ``unet.py``);
- the layout map (CustomNet: the object pasted on a white canvas; MS-CustomNet: M_L) is encoded by the frozen VAE
  and concatenated channel-wise to z_t. It is the posterior MODE without the 0.18215 scale
  (``encode_first_stage(x).mode()``), while the diffusion target is ``0.18215 * posterior.sample()``
  (``get_first_stage_encoding``);
- epsilon prediction, DDPM betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2, plain MSE loss
  (``l_simple_weight 1``, ``logvar 0``, ``original_elbo_weight 0``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from mscustomnet.model.config import TEXT_LENGTH, ModelConfig, mscustomnet_config
from mscustomnet.model.unet import build_unet

# OpenAI CLIP input normalisation (ldm FrozenCLIPImageEmbedder mean/std buffers).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def viewpoint_vector(polar_deg: float = 0.0, azimuth_deg: float = 0.0, distance: float = 0.0) -> list[float]:
    """CustomNet's viewpoint input T (main/app.py ``prepare_data``); (0, 0, 0) is the front view."""
    return [
        math.radians(polar_deg),
        math.sin(math.radians(azimuth_deg)),
        math.cos(math.radians(azimuth_deg)),
        distance,
    ]


FRONT_VIEW = tuple(viewpoint_vector())


@lru_cache(maxsize=1)
def _clip_bpe():
    # OpenAI CLIP's BPE (49408 tokens), shipped inside open_clip: the same vocabulary and merges as the
    # openai/clip-vit-large-patch14 tokenizer, so no tokenizer files have to be downloaded.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def tokenize(texts: Sequence[str], length: int = TEXT_LENGTH) -> torch.Tensor:
    """CLIP token ids [len(texts), length]: <sot> text <eot>, truncated, then padded with <eot>.

    Padding with <eot> reproduces ``CLIPTokenizer.from_pretrained('openai/clip-vit-large-patch14')`` (its pad token
    is <|endoftext|>) used with ``padding='max_length'`` by ldm's FrozenCLIPEmbedder; the padded positions matter
    because every one of the 77 output states conditions the UNet.
    """
    bpe = _clip_bpe()
    tokens = bpe(list(texts), context_length=length)
    eot = bpe.eot_token_id
    after_eot = (tokens == eot).long().cumsum(dim=1) > 0
    return torch.where(after_eot, torch.full_like(tokens, eot), tokens)


@dataclass(frozen=True)
class LossOutput:
    """``loss`` (scalar, differentiable), the per-sample MSE and the timesteps drawn."""

    loss: torch.Tensor
    loss_per_sample: torch.Tensor
    timesteps: torch.Tensor


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean squared error [B] over channels and the latent cells where ``mask`` [B, 1, h, w] is 1 (all
    cells without a mask); a sample whose mask is empty contributes 0."""
    error = (pred - target).square()
    if mask is None:
        return error.mean(dim=(1, 2, 3))
    if mask.shape[0] != error.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != error.shape[2:]:
        raise ValueError(f"loss_mask must be [B, 1, h, w] = {[error.shape[0], 1, *error.shape[2:]]}, got "
                         f"{list(mask.shape)}")  # fmt: skip
    mask = mask.to(error)
    cells = mask.sum(dim=(1, 2, 3)) * error.shape[1]
    return (error * mask).sum(dim=(1, 2, 3)) / cells.clamp_min(1.0)


class CustomNetModel(nn.Module):
    """CustomNet (``config.num_categories == 0``) or MS-CustomNet (``> 0``).

    Trained: ``unet`` (with its ``to_k_text``/``to_v_text``), ``projection`` (F_proj / cc_projection) and
    ``category_encoder`` (Phi_c). Frozen: ``vae``, ``image_encoder``, ``text_encoder`` (always in eval mode, no grad).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.unet = build_unet(config.unet, TEXT_LENGTH, config.text_scale)
        vae = config.vae
        self.vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(vae.block_out_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae.block_out_channels),
            block_out_channels=vae.block_out_channels,
            layers_per_block=vae.layers_per_block,
            latent_channels=vae.latent_channels,
            norm_num_groups=vae.norm_num_groups,
            sample_size=vae.sample_size,
            scaling_factor=config.latent_scale,
        )
        img = config.image_encoder
        self.image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=img.hidden_size,
                intermediate_size=img.intermediate_size,
                num_hidden_layers=img.num_hidden_layers,
                num_attention_heads=img.num_attention_heads,
                image_size=img.image_size,
                patch_size=img.patch_size,
                projection_dim=img.projection_dim,
                hidden_act="quick_gelu",
                layer_norm_eps=1e-5,
            )
        )
        txt = config.text_encoder
        self.text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=txt.hidden_size,
                intermediate_size=txt.intermediate_size,
                num_hidden_layers=txt.num_hidden_layers,
                num_attention_heads=txt.num_attention_heads,
                max_position_embeddings=txt.max_position_embeddings,
                vocab_size=txt.vocab_size,
                hidden_act="quick_gelu",
                layer_norm_eps=1e-5,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )
        self.projection = nn.Linear(config.projection_in_features, config.unet.cross_attention_dim)
        self.category_encoder = (
            nn.Linear(config.num_categories, config.category_dim) if config.num_categories > 0 else None
        )
        self._init_projection()
        for frozen in self.frozen_modules():
            frozen.requires_grad_(False)
            frozen.eval()

    # ----------------------------------------------------------------------------------------- construction
    def _init_projection(self) -> None:
        # CustomNet's cc_projection init (ddpm.py): identity on the image-embedding block, zero bias; the
        # viewpoint (and category) columns keep the default init only when training from scratch.
        with torch.no_grad():
            weight = self.projection.weight
            if weight.device.type == "meta":
                return
            n = min(weight.shape[0], self.config.image_encoder.projection_dim)
            weight[:, : self.config.image_encoder.projection_dim].zero_()
            weight[:n, :n] += torch.eye(n, dtype=weight.dtype)
            self.projection.bias.zero_()

    def alphas_cumprod(self, device: torch.device | str | None = None) -> torch.Tensor:
        """float32 [T] cumulative alphas of the DDPM schedule (computed in float64; never cast with the model)."""
        c = self.config
        betas = torch.linspace(c.beta_start**0.5, c.beta_end**0.5, c.num_train_timesteps, dtype=torch.float64) ** 2
        return torch.cumprod(1.0 - betas, dim=0).float().to(device or self.device)

    @classmethod
    def empty(cls, config: ModelConfig) -> CustomNetModel:
        """The module with every parameter on the meta device (no memory, no init): fill it with
        :meth:`load_weights`."""
        with torch.device("meta"):
            return cls(config)

    def load_weights(self, state_dict: dict[str, torch.Tensor], where: str = "state dict") -> None:
        """Load a complete state dict of ours (strict), materialising a module built by :meth:`empty`."""
        expected = self.state_dict(keep_vars=True)
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise KeyError(
                f"{where}: {len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) "
                f"{unexpected[:5]} for a {self.config.name} model"
            )
        for key, tensor in state_dict.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"{where}: {key} has shape {tuple(tensor.shape)}, the {self.config.name} model expects "
                    f"{tuple(expected[key].shape)}"
                )
        meta = any(p.device.type == "meta" for p in self.parameters())
        self.load_state_dict(state_dict, strict=True, assign=meta)
        self._materialize_buffers()

    def _materialize_buffers(self) -> None:
        # Non-persistent buffers are not in any state dict: rebuild those still on the meta device.
        device = self.unet.conv_in.weight.device
        for module in self.modules():
            for name, buf in list(module._buffers.items()):
                if buf is None or buf.device.type != "meta":
                    continue
                if name == "position_ids":  # transformers' CLIP embeddings: arange(num_positions)[None]
                    module._buffers[name] = torch.arange(buf.shape[-1], device=device).expand(buf.shape)
                else:
                    raise RuntimeError(f"buffer {name} of {type(module).__name__} cannot be rebuilt after loading")

    @classmethod
    def from_customnet(cls, customnet: CustomNetModel, category_dim: int = 768, seed: int = 0) -> CustomNetModel:
        """MS-CustomNet initialised from a CustomNet model (Sec. III-B): every shared weight copied; F_proj's first
        ``image + viewpoint`` input columns are cc_projection's, its category columns zero, so at step 0 it gives
        exactly CustomNet's subject token whatever Phi_c outputs. Phi_c gets a seeded random init (it must not be
        zero too, or neither it nor F_proj's new columns would ever receive a gradient)."""
        if customnet.config.multi_subject:
            raise ValueError("from_customnet expects a CustomNet (single-subject) model")
        config = mscustomnet_config(category_dim, base=replace(customnet.config, name="customnet"))
        model = cls.empty(config)
        state = {k: v for k, v in customnet.state_dict().items() if not k.startswith("projection.")}
        old_w, old_b = customnet.projection.weight.detach(), customnet.projection.bias.detach()
        new_w = torch.zeros(old_w.shape[0], config.projection_in_features, dtype=old_w.dtype, device=old_w.device)
        new_w[:, : old_w.shape[1]] = old_w
        state["projection.weight"] = new_w
        state["projection.bias"] = old_b.clone()
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(config.num_categories)  # nn.Linear's default init range
        enc_w = (torch.rand(config.category_dim, config.num_categories, generator=gen) * 2 - 1) * bound
        enc_b = (torch.rand(config.category_dim, generator=gen) * 2 - 1) * bound
        state["category_encoder.weight"] = enc_w.to(old_w)
        state["category_encoder.bias"] = enc_b.to(old_w)
        model.load_weights(state, where="CustomNet weights")
        return model

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vae, self.image_encoder, self.text_encoder]

    def train(self, mode: bool = True) -> CustomNetModel:
        super().train(mode)
        for frozen in self.frozen_modules():
            frozen.eval()
        return self

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role. CustomNet (customnet/customnet.py ``configure_optimizers``) trains
        ``to_k_text``/``to_v_text`` at 10x the base learning rate and the rest of the UNet and cc_projection at the
        base rate."""
        text_attn, unet = [], []
        for name, param in self.unet.named_parameters():
            (text_attn if ("to_k_text" in name or "to_v_text" in name) else unet).append(param)
        projection = list(self.projection.parameters())
        if self.category_encoder is not None:
            projection += list(self.category_encoder.parameters())
        return {"text_attention": text_attn, "unet": unet, "projection": projection}

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def latent_size(self) -> int:
        return self.config.resolution // self.config.vae.scale_factor

    # ------------------------------------------------------------------------------------- frozen encoders
    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP text states [B, 77, D] (last_hidden_state, as ldm's FrozenCLIPEmbedder)."""
        ids = tokenize(texts, self.config.text_encoder.max_position_embeddings).to(self.device)
        return self.text_encoder(input_ids=ids).last_hidden_state

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings [N, P] of images [N, 3, H, W] in [-1, 1].

        Preprocessing of ldm's FrozenCLIPImageEmbedder: bicubic resize (align_corners=True, no antialias) to the
        tower's input size, to [0, 1], CLIP mean/std.
        """
        tower = self.image_encoder
        dtype = tower.visual_projection.weight.dtype
        size = self.config.image_encoder.image_size
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=True)
        x = (x + 1.0) / 2.0
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return tower(pixel_values=((x - mean) / std).to(dtype)).image_embeds

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Diffusion target: ``latent_scale * posterior.sample()`` of images in [-1, 1]."""
        dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        return dist.sample(generator=generator) * self.config.latent_scale

    @torch.no_grad()
    def encode_layout(self, images: torch.Tensor) -> torch.Tensor:
        """Concat condition: the unscaled posterior mode of the layout map (in [-1, 1])."""
        return self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist.mode()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (not clamped) from scaled latents."""
        return self.vae.decode(latents.to(self.vae.dtype) / self.config.latent_scale).sample

    # ---------------------------------------------------------------------------------- trained conditioning
    def embed_categories(self, categories: torch.Tensor) -> torch.Tensor:
        """Phi_c over one-hot categories [B, K] (contiguous indices 0..num_categories-1; -1 = padding -> zeros)."""
        if self.category_encoder is None:
            raise ValueError(f"{self.config.name} has no category encoder")
        n = self.config.num_categories
        if categories.numel() and (int(categories.max()) >= n or int(categories.min()) < -1):
            raise ValueError(f"category indices must be in 0..{n - 1} (or -1 for padding), got {categories.tolist()}")
        one_hot = F.one_hot(categories.clamp(min=0).long(), n) * (categories >= 0).unsqueeze(-1)
        return self.category_encoder(one_hot.to(self.category_encoder.weight.dtype))

    def subject_tokens(
        self,
        image_embeds: torch.Tensor,
        viewpoints: torch.Tensor | None = None,
        categories: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """F_proj([f_v; T; e_c]) -> [B, K, D] from image embeddings [B, K, P]; viewpoints [B, K, 4] default to the
        front view; categories [B, K] are required by MS-CustomNet and refused by CustomNet."""
        batch, k, _ = image_embeds.shape
        dtype = self.projection.weight.dtype
        if viewpoints is None:
            viewpoints = torch.tensor(FRONT_VIEW, device=image_embeds.device).expand(batch, k, -1)
        parts = [image_embeds.to(dtype), viewpoints.to(image_embeds.device, dtype)]
        if self.config.multi_subject:
            if categories is None:
                raise ValueError(f"{self.config.name} needs subject categories")
            parts.append(self.embed_categories(categories.to(image_embeds.device)))
        elif categories is not None:
            raise ValueError(f"{self.config.name} takes no categories")
        return self.projection(torch.cat(parts, dim=-1))

    def predict_noise(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        layout_latents: torch.Tensor,
        subject_tokens: torch.Tensor,
        text_embeds: torch.Tensor,
        subject_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """epsilon from z_t [B, 4, h, w] ++ layout latent [B, 4, h, w], subject tokens [B, K, D] (mask [B, K],
        True = present) and text states [B, 77, D]."""
        dtype = self.dtype
        sample = torch.cat([noisy_latents, layout_latents.to(noisy_latents)], dim=1).to(dtype)
        context = torch.cat([subject_tokens.to(dtype), text_embeds.to(dtype)], dim=1)
        encoder_mask = None
        if subject_mask is not None:
            text_keep = torch.ones(text_embeds.shape[:2], dtype=torch.bool, device=text_embeds.device)
            encoder_mask = torch.cat([subject_mask.to(text_keep), text_keep], dim=1)
        return self.unet(sample, timesteps, encoder_hidden_states=context, encoder_attention_mask=encoder_mask).sample

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(z_t | z_0) = sqrt(a_t) z_0 + sqrt(1 - a_t) eps."""
        a = self.alphas_cumprod(latents.device)[timesteps].view(-1, 1, 1, 1)
        return (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)

    # ----------------------------------------------------------------------------------------------- training
    def training_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> LossOutput:
        """Epsilon-prediction MSE for one batch, with CustomNet's condition dropout.

        ``batch`` keys (tensors on any device; moved here):

        - ``image`` [B, 3, H, W] in [-1, 1], or ``latents`` [B, 4, h, w] (already ``latent_scale * sample``);
        - ``layout`` [B, 3, H, W] in [-1, 1] (M_L), or ``layout_latents`` [B, 4, h, w] (unscaled mode); ignored
          when ``config.use_layout`` is False (the blank white canvas is used instead);
        - ``references`` [B, K, 3, h', w'] in [-1, 1], or ``image_embeds`` [B, K, P];
        - ``text``: list of B prompts, or ``text_embeds`` [B, 77, D];
        - ``subject_mask`` [B, K] bool (optional, default all present);
        - ``categories`` [B, K] int64, contiguous 0..79, -1 for padding (MS-CustomNet only);
        - ``viewpoints`` [B, K, 4] (optional, default front view);
        - ``text_only`` [B] (optional): samples whose subject tokens are zeroed, CustomNet's ``text_only``;
        - ``loss_mask`` [B, 1, h, w] at latent resolution (optional): the loss averages over the cells where it is 1
          only (the trainer leaves the letterbox padding out this way).

        Dropout per sample as CustomNet's ``get_input`` (``ldm/models/diffusion/ddpm.py:743-763``; r ~ U[0, 1),
        u = ``config.uncond_rate``): for r < 2u the reference images are dropped, their CLIP embeddings replaced by
        the null embedding 0 (``FrozenCLIPImageEmbedder([""])``), so each token is ``F_proj([0; T; e_c])``, for
        CustomNet ``cc_projection([0; T])``, non-zero and attended to; for u <= r < 3u the layout latent is zeroed;
        the prompt is replaced by "" with probability ``config.text_drop`` (``ucg_training txt``). ``text_only``
        rows get all-zero tokens (``ddpm.py:756-757``), which the dual attention turns into no image contribution.
        """
        batch_size = _batch_size(batch)
        device = self.device

        def rand(*shape: int) -> torch.Tensor:
            gen_device = generator.device if generator is not None else device
            return torch.rand(*shape, generator=generator, device=gen_device).to(device)

        latents = batch.get("latents")
        if latents is None:
            latents = self.encode_latents(_need(batch, "image"), generator=generator)
        latents = latents.to(device, torch.float32)
        layout_latents = batch.get("layout_latents")
        if not self.config.use_layout:
            # Trained without M_L: whatever layout the batch carries, the network sees the blank canvas.
            size = latents.shape[-1] * self.config.vae.scale_factor
            layout_latents = self.encode_layout(torch.ones(batch_size, 3, size, size, device=device))
        elif layout_latents is None:
            layout_latents = self.encode_layout(_need(batch, "layout"))
        layout_latents = layout_latents.to(device, torch.float32)
        image_embeds = batch.get("image_embeds")
        if image_embeds is None:
            refs = _need(batch, "references")
            if refs.ndim != 5:
                raise ValueError(f"batch['references'] must be [B, K, 3, H, W], got shape {tuple(refs.shape)}")
            image_embeds = self.encode_images(refs.flatten(0, 1)).view(refs.shape[0], refs.shape[1], -1)
        image_embeds = image_embeds.to(device)
        k = image_embeds.shape[1]
        subject_mask = batch.get("subject_mask")
        subject_mask = (
            torch.ones(batch_size, k, dtype=torch.bool, device=device)
            if subject_mask is None
            else subject_mask.to(device, torch.bool)
        )
        text_embeds = batch.get("text_embeds")
        if text_embeds is None:
            text_embeds = self.encode_text(list(_need(batch, "text")))
        text_embeds = text_embeds.to(device)

        u = self.config.uncond_rate
        r = rand(batch_size)
        drop_images = r < 2 * u
        drop_layout = (r >= u) & (r < 3 * u)
        drop_text = rand(batch_size) < self.config.text_drop
        image_embeds = torch.where(drop_images.view(-1, 1, 1), torch.zeros_like(image_embeds), image_embeds)
        layout_latents = layout_latents * (~drop_layout).view(-1, 1, 1, 1).to(layout_latents)
        if bool(drop_text.any()):
            null_text = self.encode_text([""]).to(text_embeds)
            text_embeds = torch.where(drop_text.view(-1, 1, 1), null_text, text_embeds)

        categories = batch.get("categories") if self.config.multi_subject else None
        tokens = self.subject_tokens(image_embeds, batch.get("viewpoints"), categories)
        text_only = batch.get("text_only")
        if text_only is not None:
            tokens = tokens * (1.0 - text_only.to(device, tokens.dtype).view(-1, 1, 1))
        # Padded subjects are masked out of the attention; zeroing them too keeps their (unused) values finite.
        tokens = tokens * subject_mask.unsqueeze(-1).to(tokens)

        gen_device = generator.device if generator is not None else device
        timesteps = torch.randint(
            0, self.config.num_train_timesteps, (batch_size,), generator=generator, device=gen_device
        ).to(device)
        noise = torch.randn(latents.shape, generator=generator, device=gen_device).to(device)
        noisy = self.add_noise(latents, noise, timesteps)
        pred = self.predict_noise(noisy, timesteps, layout_latents, tokens, text_embeds, subject_mask)
        per_sample = masked_mse(pred.float(), noise, batch.get("loss_mask"))
        return LossOutput(loss=per_sample.mean(), loss_per_sample=per_sample.detach(), timesteps=timesteps)


def _need(batch: dict[str, Any], key: str) -> Any:
    if key not in batch:
        raise KeyError(f"training batch has no {key!r} (keys: {sorted(batch)})")
    return batch[key]


def _batch_size(batch: dict[str, Any]) -> int:
    for key in ("latents", "image", "layout_latents", "layout", "text_embeds"):
        if key in batch:
            return int(batch[key].shape[0])
    raise KeyError(f"training batch has neither 'image' nor 'latents' (keys: {sorted(batch)})")


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FRONT_VIEW",
    "CustomNetModel",
    "LossOutput",
    "masked_mse",
    "tokenize",
    "viewpoint_vector",
]
