"""Configurations of the CustomNet / MS-CustomNet network (plain dataclasses; importing this never imports torch).

Full-size values are the facts of the public CustomNet release, read from TencentARC/CustomNet at commit
23a378fc8cfcec72181cc4fd625c708f9485e490:

- ``configs/config_customnet.yaml``: UNet ``in_channels 8``, ``model_channels 320``, ``channel_mult [1,2,4,4]``,
  ``attention_resolutions [4,2,1]``, ``num_res_blocks 2``, ``num_heads 8``, ``context_dim 768``; SD VAE
  (``ch 128``, ``ch_mult [1,2,4,4]``, ``z_channels 4``); ``linear_start 0.00085``, ``linear_end 0.012``,
  ``timesteps 1000``, ``scale_factor 0.18215``, ``image_size 32`` (latent, i.e. 256 px images);
  ``ucg_training: txt: 0.15``; ``FrozenCLIPImageEmbedder`` (OpenAI CLIP ViT-L/14) and ``FrozenCLIPEmbedder``
  (``openai/clip-vit-large-patch14`` text tower).
- ``ldm/models/diffusion/ddpm.py`` (``LatentDiffusion.__init__``): ``cc_projection = nn.Linear(772, 768)`` over
  [CLIP image embedding (768); viewpoint T (4)]; ``get_input(..., uncond=0.05)`` drops the image embedding for
  ``r < 2u`` and the concat latent for ``u <= r < 3u`` (r uniform per sample).
- ``customnet/attention.py``: ``CrossAttention(new_text_att=True)`` with ``to_k_text``/``to_v_text`` and
  ``text_scale = 1.0``.

MS-CustomNet (the seed paper, Sec. III-B/III-C) keeps this network and adds the category encoder Phi_c and the
category-aware projection F_proj; ``category_dim`` (the width of e_c) is our choice, the paper's value not being
available to us.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

# Output of the text tower and input of the text cross-attention: CLIP's fixed 77-token context.
TEXT_LENGTH = 77
NUM_COCO_CATEGORIES = 80
VIEWPOINT_DIM = 4


@dataclass(frozen=True)
class UNetConfig:
    """A diffusers ``UNet2DConditionModel`` in the SD1.5 family, plus the width of the text cross-attention.

    ``attention_head_dim`` follows the diffusers SD1.5 convention: it is the number of heads (8 for SD1.5, whose
    LDM config says ``num_heads 8``), not the width of one head.
    """

    sample_size: int = 32
    in_channels: int = 8
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    attention_head_dim: int = 8
    cross_attention_dim: int = 768
    norm_num_groups: int = 32


@dataclass(frozen=True)
class VAEConfig:
    """A diffusers ``AutoencoderKL``; the full size is the SD VAE (downsampling factor 8)."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 256

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class CLIPVisionSpec:
    """OpenAI CLIP ViT-L/14 image tower (as a transformers ``CLIPVisionModelWithProjection``)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 768


@dataclass(frozen=True)
class CLIPTextSpec:
    """OpenAI CLIP ViT-L/14 text tower (as a transformers ``CLIPTextModel``); the vocabulary is CLIP's BPE."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = TEXT_LENGTH
    vocab_size: int = 49408


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the network's structure and its diffusion process.

    ``num_categories == 0`` is CustomNet (projection over [f_v; T]); ``num_categories > 0`` is MS-CustomNet
    (projection over [f_v; T; e_c] with e_c = Phi_c(one-hot category)).
    """

    name: str = "customnet"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    image_encoder: CLIPVisionSpec = field(default_factory=CLIPVisionSpec)
    text_encoder: CLIPTextSpec = field(default_factory=CLIPTextSpec)
    viewpoint_dim: int = VIEWPOINT_DIM
    num_categories: int = 0
    category_dim: int = 0
    # Weight of the text branch in the dual cross-attention (customnet/attention.py: text_scale = 1.0).
    text_scale: float = 1.0
    # DDPM schedule: LDM "linear" = squares of linearly spaced square roots (diffusers' "scaled_linear").
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    latent_scale: float = 0.18215
    resolution: int = 256
    # Condition dropout for classifier-free guidance, as CustomNet trains it (ddpm.py get_input, uncond=0.05:
    # subjects dropped for r < 2u, layout for u <= r < 3u; text replaced by "" with p 0.15, ucg_training txt).
    uncond_rate: float = 0.05
    text_drop: float = 0.15
    # False: a network trained without M_L (the layout-free ablation of Sec. IV-C): its concat input is always the
    # VAE latent of a blank white canvas (CustomNet's empty canvas), so the UNet keeps its 8 input channels.
    use_layout: bool = True

    def __post_init__(self) -> None:
        if self.num_categories < 0 or self.category_dim < 0:
            raise ValueError("num_categories and category_dim must be >= 0")
        if (self.num_categories == 0) != (self.category_dim == 0):
            raise ValueError(
                f"num_categories ({self.num_categories}) and category_dim ({self.category_dim}) must both be 0 "
                "(CustomNet) or both be positive (MS-CustomNet)"
            )
        if self.unet.in_channels != 2 * self.vae.latent_channels:
            raise ValueError(
                f"unet.in_channels ({self.unet.in_channels}) must be twice vae.latent_channels "
                f"({self.vae.latent_channels}): noisy latent + layout latent"
            )
        if self.text_encoder.hidden_size != self.unet.cross_attention_dim:
            raise ValueError(
                f"text_encoder.hidden_size ({self.text_encoder.hidden_size}) must equal unet.cross_attention_dim "
                f"({self.unet.cross_attention_dim}): the text cross-attention reads the text tower's states"
            )
        if self.resolution % self.vae.scale_factor:
            raise ValueError(
                f"resolution {self.resolution} is not a multiple of the VAE factor {self.vae.scale_factor}"
            )

    @property
    def multi_subject(self) -> bool:
        return self.num_categories > 0

    @property
    def projection_in_features(self) -> int:
        return self.image_encoder.projection_dim + self.viewpoint_dim + self.category_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise, naming them."""
        nested = {"unet": UNetConfig, "vae": VAEConfig, "image_encoder": CLIPVisionSpec, "text_encoder": CLIPTextSpec}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"model config: unknown field(s) {unknown}; known: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in nested:
                sub = nested[key]
                sub_known = {f.name for f in fields(sub)}
                bad = sorted(set(value) - sub_known)
                if bad:
                    raise ValueError(f"model config: unknown field(s) {bad} in {key!r}; known: {sorted(sub_known)}")
                value = sub(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
            kwargs[key] = value
        return cls(**kwargs)


def customnet_config() -> ModelConfig:
    """The public CustomNet network (``customnet_v1.pt``): single subject, viewpoint input, no category encoder."""
    return ModelConfig(name="customnet")


def mscustomnet_config(category_dim: int = 768, base: ModelConfig | None = None) -> ModelConfig:
    """MS-CustomNet on top of ``base`` (default: full-size CustomNet): adds Phi_c over the 80 COCO categories."""
    base = base or customnet_config()
    return replace(base, name="mscustomnet", num_categories=NUM_COCO_CATEGORIES, category_dim=category_dim)


def tiny_config(multi_subject: bool = True, resolution: int = 32) -> ModelConfig:
    """A few-hundred-kilobyte network of the same structure, for tests (built in code, no downloads)."""
    base = ModelConfig(
        name="customnet-tiny",
        unet=UNetConfig(
            sample_size=resolution // 4,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            attention_head_dim=2,
            cross_attention_dim=32,
            norm_num_groups=16,
        ),
        vae=VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=resolution),
        image_encoder=CLIPVisionSpec(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=24,
        ),
        text_encoder=CLIPTextSpec(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
        resolution=resolution,
    )
    if multi_subject:
        return replace(base, name="mscustomnet-tiny", num_categories=NUM_COCO_CATEGORIES, category_dim=16)
    return base


__all__ = [
    "CLIPTextSpec",
    "CLIPVisionSpec",
    "ModelConfig",
    "NUM_COCO_CATEGORIES",
    "TEXT_LENGTH",
    "UNetConfig",
    "VAEConfig",
    "VIEWPOINT_DIM",
    "customnet_config",
    "mscustomnet_config",
    "tiny_config",
]
