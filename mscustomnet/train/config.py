"""Training configuration: a YAML file -> a frozen, validated dataclass tree (importing this never imports torch).

Unknown keys, missing required keys, wrong types and out-of-range values raise :class:`ConfigError` naming the file
and the dotted key (``configs/x.yaml: train.stages[1].lr: expected a number, got str 'fast'``).

Defaults are the paper's training (seed paper, MS-CustomNet, arXiv 2603.21136, Sec. III-D/IV-A as summarised in
this project's issue): AdamW; Dual Stage Training with lr 1e-4 for 7 epochs then 5e-5 for 3; CLSQ with K_min 2,
K_max 5, gamma 1.0; fp16 mixed precision; effective batch 4 over 2 V100 GPUs. From CustomNet's training code
(TencentARC/CustomNet@ff7715e ``customnet/customnet.py`` ``configure_optimizers`` and
``configs/config_customnet.yaml``): ``torch.optim.AdamW`` with its default weight decay, ``to_k_text``/``to_v_text``
at ``learning_rate_scale: 10`` times the base lr, no lr scheduler, no gradient clipping, ``use_checkpoint: True``
(gradient checkpointing) and an image log every 2500 steps.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mscustomnet.data.curriculum import curriculum_k

MIXED_PRECISION = ("fp16", "bf16", "no")
FITS = ("pad", "crop")
# Keys that may change between a checkpoint and its resume: they change neither the data nor the optimisation.
RESUMABLE_CHANGES = frozenset(
    {
        "data.msi",
        "data.image_root",
        "data.workers",
        "train.max_steps",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "samples.every",
        "samples.count",
        "samples.steps",
        "samples.guidance",
        "samples.seed",
    }
)


class ConfigError(ValueError):
    """A training configuration that cannot be used; the message names the file and the key."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class DataConfig:
    """The MSI build to train on (``mscustomnet data build-msi``) and how samples are made from it."""

    msi: str
    image_root: str | None = None  # default: the COCO split recorded in the build's config
    resolution: int = 256  # CustomNet trains at 256 x 256
    reference_resolution: int = 256
    # Long edge of the reference object on its white square, as at inference (pipeline: 200 on 256).
    reference_object_size: int | None = 200
    fit: str = "pad"
    workers: int = 4
    max_scenes: int | None = None  # the first N scenes only (smoke runs, tests)

    def __post_init__(self) -> None:
        _check(bool(self.msi), "data.msi", "must name an MSI build folder")
        _check(self.resolution >= 8, "data.resolution", f"must be >= 8, got {self.resolution}")
        _check(self.reference_resolution >= 8, "data.reference_resolution", "must be >= 8")
        if self.reference_object_size is not None:
            _check(
                1 <= self.reference_object_size <= self.reference_resolution,
                "data.reference_object_size",
                f"must be in 1..{self.reference_resolution} (data.reference_resolution), "
                f"got {self.reference_object_size}",
            )
        _check(self.fit in FITS, "data.fit", f"must be one of {FITS}, got {self.fit!r}")
        _check(self.workers >= 0, "data.workers", f"must be >= 0, got {self.workers}")
        _check(self.max_scenes is None or self.max_scenes >= 1, "data.max_scenes", "must be >= 1 or null")


@dataclass(frozen=True)
class ModelSection:
    """Where the weights start and which inputs the network uses."""

    # A model folder (local path, or hub id + revision): converted CustomNet (``mscustomnet convert-customnet``),
    # which gets Phi_c and F_proj's category columns (``CustomNetModel.from_customnet``), or MS-CustomNet.
    init: str
    revision: str | None = None
    category_dim: int = 768
    # False = the layout-free ablation: the concat input is a blank white canvas instead of M_L (ModelConfig).
    use_layout: bool = True

    def __post_init__(self) -> None:
        _check(bool(self.init), "model.init", "must name the initial weights (a model folder or hub id)")
        _check(self.category_dim >= 1, "model.category_dim", f"must be >= 1, got {self.category_dim}")


@dataclass(frozen=True)
class Stage:
    """One stage of Dual Stage Training: ``epochs`` epochs at base learning rate ``lr``."""

    epochs: int
    lr: float

    _RELATIVE_KEYS: typing.ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        _check(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be a positive number, got {self.lr}")


@dataclass(frozen=True)
class TrainSection:
    """Optimisation: ``effective_batch = per_gpu_batch x world size x grad_accum`` (``auto`` derives grad_accum)."""

    stages: tuple[Stage, ...] = (Stage(7, 1e-4), Stage(3, 5e-5))
    effective_batch: int = 4
    per_gpu_batch: int = 2
    grad_accum: int | str = "auto"
    text_attention_lr_scale: float = 10.0
    weight_decay: float = 0.01  # torch.optim.AdamW's default, which CustomNet uses
    max_grad_norm: float | None = None
    mixed_precision: str = "fp16"
    grad_checkpointing: bool = True
    seed: int = 0
    max_steps: int | None = None  # stop (with a checkpoint) after this many optimiser steps
    log_every: int = 1
    checkpoint_every: int | None = 1000  # steps; a checkpoint is also written after every epoch and at the end
    keep_checkpoints: int = 2
    # With data.fit: pad about a quarter of each target is black letterbox padding, and M_L is black where empty: a
    # loss over the padding teaches the model to paint letterboxes. True keeps the padding (at latent resolution)
    # out of the loss; false is the plain loss over the whole canvas.
    loss_mask_padding: bool = True

    def __post_init__(self) -> None:
        _check(len(self.stages) >= 1, "train.stages", "needs at least one stage")
        _check(self.effective_batch >= 1, "train.effective_batch", f"must be >= 1, got {self.effective_batch}")
        _check(self.per_gpu_batch >= 1, "train.per_gpu_batch", f"must be >= 1, got {self.per_gpu_batch}")
        if isinstance(self.grad_accum, str):
            _check(
                self.grad_accum == "auto", "train.grad_accum", f"must be an integer or 'auto', got {self.grad_accum!r}"
            )
        else:
            _check(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(
            self.effective_batch % self.per_gpu_batch == 0,
            "train.effective_batch",
            f"{self.effective_batch} is not a multiple of train.per_gpu_batch ({self.per_gpu_batch})",
        )
        _check(self.text_attention_lr_scale > 0, "train.text_attention_lr_scale", "must be > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "train.max_grad_norm", "must be > 0 or null")
        _check(
            self.mixed_precision in MIXED_PRECISION,
            "train.mixed_precision",
            f"must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}",
        )
        _check(self.seed >= 0, "train.seed", f"must be >= 0, got {self.seed}")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be >= 1 or null")
        _check(self.log_every >= 1, "train.log_every", f"must be >= 1, got {self.log_every}")
        _check(
            self.checkpoint_every is None or self.checkpoint_every >= 1,
            "train.checkpoint_every",
            "must be >= 1 or null",
        )
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")

    def grad_accum_for(self, world_size: int) -> int:
        """Micro-batches per optimiser step so that per_gpu_batch x world_size x grad_accum = effective_batch."""
        per_step = self.per_gpu_batch * world_size
        if self.grad_accum == "auto":
            _check(
                self.effective_batch % per_step == 0,
                "train.effective_batch",
                f"{self.effective_batch} cannot be split into per_gpu_batch {self.per_gpu_batch} x {world_size} "
                f"GPU(s) x an integer grad_accum; change train.per_gpu_batch or the number of GPUs",
            )
            return self.effective_batch // per_step
        _check(
            per_step * int(self.grad_accum) == self.effective_batch,
            "train.grad_accum",
            f"per_gpu_batch {self.per_gpu_batch} x {world_size} GPU(s) x grad_accum {self.grad_accum} = "
            f"{per_step * int(self.grad_accum)}, but train.effective_batch is {self.effective_batch} "
            "(set grad_accum: auto to derive it)",
        )
        return int(self.grad_accum)


@dataclass(frozen=True)
class CurriculumSection:
    """Curriculum Learning on Subject Quantity (paper Eq. 15-16); off = K_max subjects every epoch."""

    enabled: bool = True
    k_min: int = 2
    k_max: int = 5
    gamma: float = 1.0

    def __post_init__(self) -> None:
        _check(
            1 <= self.k_min <= self.k_max,
            "curriculum.k_min",
            f"need 1 <= k_min <= k_max, got {self.k_min}, {self.k_max}",
        )
        _check(self.gamma > 0, "curriculum.gamma", f"must be > 0, got {self.gamma}")


@dataclass(frozen=True)
class SamplesSection:
    """Sample grids (target | layout | sample) on the first ``count`` training scenes every ``every`` steps."""

    every: int | None = 2500  # CustomNet's image logger batch_frequency
    count: int = 4
    steps: int = 50
    guidance: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.every is None or self.every >= 1, "samples.every", "must be >= 1 or null (never)")
        _check(self.count >= 1, "samples.count", f"must be >= 1, got {self.count}")
        # CustomNet's DDIM schedule drops the last grid point: one step would evaluate no timestep.
        _check(2 <= self.steps <= 1000, "samples.steps", f"must be in 2..1000, got {self.steps}")


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig
    model: ModelSection
    train: TrainSection = field(default_factory=TrainSection)
    curriculum: CurriculumSection = field(default_factory=CurriculumSection)
    samples: SamplesSection = field(default_factory=SamplesSection)
    source: str = "<in code>"  # where the config came from, for messages; not part of the configuration

    # ------------------------------------------------------------------------------------------ schedules
    @property
    def total_epochs(self) -> int:
        return sum(stage.epochs for stage in self.train.stages)

    def stage_of_epoch(self, epoch: int) -> int:
        """0-based stage of the (1-based) ``epoch``."""
        if not 1 <= epoch <= self.total_epochs:
            raise ValueError(f"epoch must be in 1..{self.total_epochs}, got {epoch}")
        end = 0
        for index, stage in enumerate(self.train.stages):
            end += stage.epochs
            if epoch <= end:
                return index
        raise AssertionError("unreachable: epochs are covered by the stages")

    def lr_for_epoch(self, epoch: int) -> float:
        """Base learning rate of ``epoch`` (Dual Stage Training: constant within a stage)."""
        return self.train.stages[self.stage_of_epoch(epoch)].lr

    def k_for_epoch(self, epoch: int) -> int:
        """Subjects per sample at ``epoch``: K(e) (Eq. 15) under the curriculum, else K_max."""
        c = self.curriculum
        k = curriculum_k(epoch, self.total_epochs, c.k_min, c.k_max, c.gamma)
        return k if c.enabled else c.k_max

    def grad_accum_for(self, world_size: int) -> int:
        """``train.grad_accum`` for ``world_size`` processes, checked against ``train.effective_batch``."""
        try:
            return self.train.grad_accum_for(world_size)
        except ConfigError as err:
            raise ConfigError(f"{self.source}: {err}") from None

    # -------------------------------------------------------------------------------------------- records
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        out["train"]["stages"] = [dict(s) for s in out["train"]["stages"]]
        return out

    def resume_fingerprint(self) -> dict[str, Any]:
        """Every setting that a resumed run must share with its checkpoint, by dotted key."""
        flat = _flatten(self.to_dict())
        return {key: value for key, value in flat.items() if key not in RESUMABLE_CHANGES}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# ---------------------------------------------------------------------------------------------------- loading
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _convert(value: Any, hint: Any, key: str) -> Any:
    """``value`` (parsed YAML) as type ``hint``, or ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            _check(type(None) in options, key, "must not be null")
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{key}: expected {_type_name(hint)}, got {_describe(value)}"
        )
    if origin is tuple:
        (item,) = typing.get_args(hint)[:1]
        _check(isinstance(value, list), key, f"expected a list, got {_describe(value)}")
        return tuple(_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if hint is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        _check(
            isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {_describe(value)}"
        )
        return value
    if hint is float:
        # PyYAML reads 1e-4 (no dot) as a string: accept any string that is plainly a number.
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            return float(value)
        _check(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            key,
            f"expected a number, got {_describe(value)}",
        )
        return float(value)
    if hint is str:
        _check(isinstance(value, str), key, f"expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"{key}: unsupported field type {hint!r}")


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    return " or ".join(names.get(a, str(a)) for a in typing.get_args(hint))


def _build(cls: type, data: Any, key: str) -> Any:
    label = key or "top level"
    _check(isinstance(data, dict), label, f"expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.name != "source"}
    prefix = f"{key}." if key else ""
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s} (known in {label}: {', '.join(sorted(known))})")
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing key {prefix}{name}")
            continue
        kwargs[name] = _convert(data[name], hints[name], f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if getattr(cls, "_RELATIVE_KEYS", False):  # a list item names only its own field
            raise ConfigError(f"{prefix}{err}") from None
        raise


def config_from_dict(data: Any, source: str = "<in code>") -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from plain data (as parsed from YAML)."""
    try:
        config = _build(TrainConfig, data, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return dataclasses.replace(config, source=source)


def load_config(path: str | Path) -> TrainConfig:
    """Read a YAML training configuration; every problem is reported with the file and key."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the training config ({err.strerror or err})") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    return config_from_dict(data if data is not None else {}, source=str(path))


__all__ = [
    "ConfigError",
    "CurriculumSection",
    "DataConfig",
    "MIXED_PRECISION",
    "ModelSection",
    "RESUMABLE_CHANGES",
    "SamplesSection",
    "Stage",
    "TrainConfig",
    "TrainSection",
    "config_from_dict",
    "load_config",
]
