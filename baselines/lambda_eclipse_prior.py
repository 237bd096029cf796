"""The λ-ECLIPSE prior network and its checkpoint loader (torch; imported lazily by ``baselines.lambda_eclipse``).

λ-ECLIPSE (Patel et al., arXiv 2402.05195) replaces Kandinsky 2.2's diffusion prior by a 34M-parameter
transformer that maps a CLIP text encoding, in which the subject keywords' token states were swapped for the
subjects' CLIP image embeddings, to one CLIP image embedding in a single forward pass (no timesteps).

Facts used here, from eclipse-t2i/lambda-eclipse-inference@6a7e00e41f44b8f02e9b4f2632248122236b8774,
``src/priors/lambda_prior_transformer.py``:

- The checkpoint ``ECLIPSE-Community/Lambda-ECLIPSE-Prior-v1.0`` is a diffusers ``ModelMixin`` save (flat keys,
  ``config.json`` + ``diffusion_pytorch_model.*``) whose config says ``_class_name: PriorTransformer``, but the
  network is a fork of diffusers' ``PriorTransformer`` with the timestep embedding removed and one extra
  ``embedding_control`` linear layer (a control image embedding token, e.g. a Canny-edge image). Loading it into
  ``diffusers.PriorTransformer`` would leave ``time_embedding.*`` random and drop ``embedding_control.*``.
- Token sequence (num_embeddings + additional_embeddings = 77 + 4 = 81 positions): the 77 projected text
  hidden states, then the control, the projected pooled text embedding, the projected input ``hidden_states``
  (Gaussian noise at inference) and the learned ``prd`` token; a learned positional embedding is added.
- Attention mask: the text padding mask padded with zeros over the 4 extra tokens, plus a causal mask (-10000
  above the diagonal); the output is the final-layer-normed ``prd`` token projected to the CLIP dimension.
- ``clip_mean`` / ``clip_std`` are parameters of the checkpoint, but the subject pipeline
  (``src/pipelines/pipeline_kandinsky_subject_prior.py``, ``__call__``) never un-normalises the prediction with
  them: the prior output is handed to the decoder as it is. They are loaded (so that the state dict maps 1:1)
  and kept unused, like there.

The module below is written against current diffusers; its parameter names equal the official keys, so the
official state dict loads without renaming. The transformer blocks reuse diffusers' ``BasicTransformerBlock``
(self-attention only, gelu MLP, attention bias), whose parameter names match the checkpoint's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Weight file names a diffusers ``ModelMixin.save_pretrained`` writes, in the order we look for them.
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
CONFIG_FILE = "config.json"

#: Tokens the prior appends after the text states: control, projected text embedding, input embedding, prd.
EXTRA_TOKENS = 4

# Config keys a diffusers save adds that do not describe the network.
_META_KEYS = {"_class_name", "_diffusers_version", "_name_or_path"}


class PriorWeightsError(ValueError):
    """A state dict or config that does not fit the λ-ECLIPSE prior; the message lists what is wrong."""


@dataclass(frozen=True)
class LambdaPriorConfig:
    """Architecture of the prior; field names and defaults follow the official ``config.json``."""

    num_attention_heads: int = 16
    attention_head_dim: int = 32
    num_layers: int = 10
    embedding_dim: int = 1280
    num_embeddings: int = 77
    additional_embeddings: int = EXTRA_TOKENS
    dropout: float = 0.0
    norm_in_type: str | None = None
    embedding_proj_norm_type: str | None = None
    encoder_hid_proj_type: str | None = "linear"
    added_emb_type: str | None = "prd"
    embedding_proj_dim: int | None = None
    clip_embed_dim: int | None = None

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def proj_dim(self) -> int:
        return self.embedding_proj_dim or self.embedding_dim

    @property
    def out_dim(self) -> int:
        return self.clip_embed_dim or self.embedding_dim

    @property
    def num_tokens(self) -> int:
        return self.num_embeddings + self.additional_embeddings

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "config") -> LambdaPriorConfig:
        fields = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - fields - _META_KEYS)
        if unknown:
            # e.g. time_embed_dim: a diffusion prior's config, not the λ-ECLIPSE fork's.
            raise PriorWeightsError(
                f"{where}: keys {unknown} are not part of the λ-ECLIPSE prior config (known: {sorted(fields)})"
            )
        config = cls(**{k: v for k, v in raw.items() if k in fields})
        config.validate(where)
        return config

    def validate(self, where: str = "config") -> None:
        # The forward pass below is the official one for this combination only (prd token read out, linear
        # text projection); the official code itself assumes 77 text + 4 extra tokens when it builds the mask.
        problems = []
        if self.added_emb_type != "prd":
            problems.append(f"added_emb_type must be 'prd', got {self.added_emb_type!r}")
        if self.encoder_hid_proj_type != "linear":
            problems.append(f"encoder_hid_proj_type must be 'linear', got {self.encoder_hid_proj_type!r}")
        if self.additional_embeddings != EXTRA_TOKENS:
            problems.append(f"additional_embeddings must be {EXTRA_TOKENS}, got {self.additional_embeddings}")
        for name in ("norm_in_type", "embedding_proj_norm_type"):
            if getattr(self, name) not in (None, "layer"):
                problems.append(f"{name} must be null or 'layer', got {getattr(self, name)!r}")
        if problems:
            raise PriorWeightsError(f"{where}: unsupported λ-ECLIPSE prior config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LambdaEclipsePrior(nn.Module):
    """Non-diffusion prior: (text states with subject embeddings, text embedding, control, noise) -> CLIP image."""

    def __init__(self, config: LambdaPriorConfig) -> None:
        from diffusers.models.attention import BasicTransformerBlock

        super().__init__()
        config.validate()
        self.config = config
        inner = config.inner_dim
        self.proj_in = nn.Linear(config.embedding_dim, inner)
        self.embedding_proj_norm = nn.LayerNorm(config.proj_dim) if config.embedding_proj_norm_type else None
        self.embedding_proj = nn.Linear(config.proj_dim, inner)
        self.embedding_control = nn.Linear(config.proj_dim, inner)
        self.encoder_hidden_states_proj = nn.Linear(config.embedding_dim, inner)
        self.positional_embedding = nn.Parameter(torch.zeros(1, config.num_tokens, inner))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, inner))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner,
                config.num_attention_heads,
                config.attention_head_dim,
                dropout=config.dropout,
                activation_fn="gelu",
                attention_bias=True,
            )
            for _ in range(config.num_layers)
        )
        self.norm_in = nn.LayerNorm(inner) if config.norm_in_type else None
        self.norm_out = nn.LayerNorm(inner)
        self.proj_to_clip_embeddings = nn.Linear(inner, config.out_dim)
        # Unused at inference by the official subject pipeline; kept so the checkpoint maps 1:1.
        self.clip_mean = nn.Parameter(torch.zeros(1, config.out_dim))
        self.clip_std = nn.Parameter(torch.zeros(1, config.out_dim))
        causal = torch.full((config.num_tokens, config.num_tokens), -10000.0).triu_(1)
        self.register_buffer("causal_attention_mask", causal[None], persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_in.weight.dtype

    def forward(
        self,
        hidden_states: torch.Tensor,
        proj_embedding: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        control_embedding: torch.Tensor,
    ) -> torch.Tensor:
        """Predict CLIP image embeddings, shape (batch, clip_embed_dim).

        ``hidden_states`` (batch, embedding_dim): the Gaussian input; ``proj_embedding`` (batch, proj_dim): the
        pooled, projected text embedding; ``encoder_hidden_states`` (batch, num_embeddings, embedding_dim): the
        text encoder's last hidden states with subject tokens replaced; ``attention_mask`` (batch,
        num_embeddings): 1 for real tokens; ``control_embedding`` (batch or 1, proj_dim).
        """
        cfg = self.config
        batch = hidden_states.shape[0]
        if encoder_hidden_states.shape[1] != cfg.num_embeddings:
            raise ValueError(
                f"encoder_hidden_states has {encoder_hidden_states.shape[1]} tokens, the prior expects "
                f"{cfg.num_embeddings}"
            )
        if self.embedding_proj_norm is not None:
            proj_embedding = self.embedding_proj_norm(proj_embedding)
        control = self.embedding_control(control_embedding).expand(batch, -1)
        tokens = torch.cat(
            [
                self.encoder_hidden_states_proj(encoder_hidden_states),
                control[:, None],
                self.embedding_proj(proj_embedding)[:, None],
                self.proj_in(hidden_states)[:, None],
                self.prd_embedding.to(hidden_states.dtype).expand(batch, -1, -1),
            ],
            dim=1,
        )
        tokens = tokens + self.positional_embedding.to(tokens.dtype)

        padding = (1.0 - attention_mask.to(tokens.dtype)) * -10000.0
        padding = torch.nn.functional.pad(padding, (0, cfg.additional_embeddings), value=0.0)
        mask = (padding[:, None, :] + self.causal_attention_mask).to(tokens.dtype)
        mask = mask.repeat_interleave(cfg.num_attention_heads, dim=0)

        if self.norm_in is not None:
            tokens = self.norm_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, attention_mask=mask)
        prd = self.norm_out(tokens)[:, -1]
        return self.proj_to_clip_embeddings(prd)


def check_state_dict(prior: nn.Module, state_dict: Mapping[str, torch.Tensor], where: str = "state dict") -> None:
    """Raise :class:`PriorWeightsError` unless ``state_dict`` has exactly the prior's keys and shapes.

    The official checkpoint's keys are the module's own names, so the mapping is the identity and nothing is
    ignored: every key must land on a parameter of the same shape, and every parameter must be covered.
    """
    expected = {name: tuple(t.shape) for name, t in prior.state_dict().items()}
    given = {name: tuple(t.shape) for name, t in state_dict.items()}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {list(given[k])} vs prior {list(expected[k])}"
        for k in set(expected) & set(given)
        if given[k] != expected[k]
    )
    if not (missing or unexpected or mismatched):
        return
    hint = ""
    if any(k.startswith("time_embedding.") for k in unexpected) or "embedding_control.weight" in missing:
        hint = (
            " This looks like a diffusion PriorTransformer checkpoint (e.g. kandinsky-2-2-prior/prior or the "
            "plain ECLIPSE prior), not the λ-ECLIPSE prior ECLIPSE-Community/Lambda-ECLIPSE-Prior-v1.0."
        )
    parts = [
        f"{len(missing)} missing: {_head(missing)}" if missing else "",
        f"{len(unexpected)} unexpected: {_head(unexpected)}" if unexpected else "",
        f"{len(mismatched)} with another shape: {_head(mismatched)}" if mismatched else "",
    ]
    raise PriorWeightsError(f"{where}: does not fit the λ-ECLIPSE prior: " + "; ".join(p for p in parts if p) + hint)


def _head(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


def load_state_dict_into(prior: nn.Module, state_dict: Mapping[str, torch.Tensor], where: str = "state dict") -> None:
    """Check and load a checkpoint state dict; ``assign`` keeps meta-device priors cheap (no copy)."""
    check_state_dict(prior, state_dict, where)
    on_meta = any(p.is_meta for p in prior.parameters())
    prior.load_state_dict(dict(state_dict), strict=True, assign=on_meta)


def read_prior_folder(folder: str | Path) -> tuple[LambdaPriorConfig, dict[str, torch.Tensor], Path]:
    """Read ``config.json`` and the weights file of a prior folder (a diffusers ``save_pretrained`` layout)."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    try:
        raw = json.loads(config_path.read_text())
    except OSError as err:
        raise PriorWeightsError(f"{config_path}: cannot read the prior config: {err}") from err
    except json.JSONDecodeError as err:
        raise PriorWeightsError(f"{config_path}: not valid JSON: {err}") from err
    config = LambdaPriorConfig.from_dict(raw, str(config_path))
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise PriorWeightsError(f"{folder}: no prior weights file (looked for {', '.join(WEIGHT_FILES)})")
    return config, read_weights(weights), weights


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise several types for a corrupt file
        raise PriorWeightsError(f"{path}: cannot read the prior weights: {err}") from err
    if not isinstance(state, Mapping):
        raise PriorWeightsError(f"{path}: expected a flat state dict, got {type(state).__name__}")
    return dict(state)


def load_prior(folder: str | Path, dtype: torch.dtype = torch.float32) -> LambdaEclipsePrior:
    """Build the prior from a checkpoint folder; the weights are checked key by key before loading."""
    config, state_dict, weights = read_prior_folder(folder)
    with torch.device("meta"):
        prior = LambdaEclipsePrior(config)
    load_state_dict_into(prior, state_dict, str(weights))
    # The causal mask is a non-persistent buffer: rebuild it off the meta device.
    causal = torch.full((config.num_tokens, config.num_tokens), -10000.0).triu_(1)[None]
    prior.register_buffer("causal_attention_mask", causal, persistent=False)
    logger.info("λ-ECLIPSE prior loaded from %s (%d tensors)", weights, len(state_dict))
    return prior.to(dtype).eval().requires_grad_(False)


def save_prior(prior: LambdaEclipsePrior, folder: str | Path) -> Path:
    """Write ``config.json`` + safetensors weights in the official layout (used to build test checkpoints)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = {"_class_name": "PriorTransformer", **prior.config.to_dict()}
    (folder / CONFIG_FILE).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in prior.state_dict().items()}
    save_file(state, str(folder / WEIGHT_FILES[0]))
    return folder


__all__ = [
    "CONFIG_FILE",
    "WEIGHT_FILES",
    "LambdaEclipsePrior",
    "LambdaPriorConfig",
    "PriorWeightsError",
    "check_state_dict",
    "load_prior",
    "load_state_dict_into",
    "read_prior_folder",
    "save_prior",
]
