"""The Method interface every generator implements (paste, the baselines, MS-CustomNet).

A method is constructed cheaply from keyword options (strings from ``-M key=value`` are coerced by the
method itself), loads its weights in :meth:`Method.setup`, and turns a batch of :class:`GenerationRequest`
into images. The runner never special-cases a method: everything it needs is declared in
:class:`Capabilities` and :meth:`Method.fingerprint`.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from PIL import Image

    from msibench.bench.manifest import Task
    from msibench.weights import WeightFiles


@dataclass(frozen=True)
class Capabilities:
    """What a method can do; the runner skips (and records) tasks outside it."""

    max_subjects: int
    uses_layout: bool
    uses_zorder: bool
    tracks: tuple[str, ...] = ("single", "multi")


@dataclass(frozen=True)
class SubjectInput:
    """One subject of a request, with its reference already loaded.

    ``box`` is (x0, y0, x1, y1) normalized to the square output canvas; ``z`` is the depth rank
    (0 = farthest; a higher z is drawn in front). ``reference`` is the white-background RGB cut-out at
    original resolution and ``mask`` its binary mask ("L" mode, 255 inside).
    """

    category: str
    category_id: int
    box: tuple[float, float, float, float]
    z: int
    reference: Image.Image
    mask: Image.Image


@dataclass(frozen=True)
class GenerationRequest:
    """One image to generate: a task, a sample index and the seed derived from both."""

    task: Task
    sample_index: int
    seed: int
    subjects: tuple[SubjectInput, ...]

    @property
    def prompt(self) -> str:
        return self.task.prompt

    @property
    def background(self) -> str:
        return self.task.background


class WeightsUnavailableError(OSError):
    """Weights a method needs are neither on disk nor downloadable; the message says what to get and where
    to point the method (an option and an environment variable)."""


class Method(abc.ABC):
    """Base class of every generation method.

    Subclasses set ``name`` and implement ``capabilities``, ``config``, ``setup`` and ``generate``.
    ``__init__`` must stay cheap (no weights, no torch import needed by msibench ls).
    """

    name: ClassVar[str] = "method"
    #: How many requests the runner hands to ``generate`` at once.
    batch_size: int = 1
    #: The weight files the method loads with its default options (hub id + revision + files), as data:
    #: ``msibench weights fetch --method NAME`` downloads them, ``msibench weights ls`` checks them.
    weights: ClassVar[tuple[WeightFiles, ...]] = ()

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """Declared capabilities."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """Everything that changes the output: weights ids + revisions, scheduler, steps, guidance, scales,
        resolution, dtype. Must be JSON-serialisable."""

    @abc.abstractmethod
    def setup(self, device: str) -> None:
        """Load weights onto ``device``. Called once before the first ``generate``."""

    @abc.abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        """Return one RGB image per request, in order. Must be deterministic given each request's seed."""

    def fingerprint(self) -> dict[str, Any]:
        return {"method": self.name, "config": self.config()}

    def fingerprint_hash(self) -> str:
        return fingerprint_hash(self.fingerprint())

    def can_do(self, task: Task) -> str | None:
        """Return None when the task is within the capabilities, else the reason it is skipped."""
        caps = self.capabilities
        if task.track not in caps.tracks:
            return f"{self.name} does not support the {task.track}-subject track"
        if len(task.subjects) > caps.max_subjects:
            return f"{self.name} supports at most {caps.max_subjects} subject(s), task has {len(task.subjects)}"
        return None


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    """Short, stable hash of a fingerprint (canonical JSON)."""
    blob = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


# Ranges of options that several methods share, checked for every method at construction (an option outside them
# would fail every sample later, or ask for a 10^12-pixel canvas); a method narrows or adds ranges with ``bounds``.
COMMON_BOUNDS: dict[str, tuple[float, float]] = {
    "resolution": (8, 4096),
    "steps": (1, 1000),
    "guidance": (0.0, 100.0),
}


def coerce_options(
    defaults: dict[str, Any],
    options: dict[str, Any],
    where: str,
    bounds: dict[str, tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """Merge ``-M key=value`` options into ``defaults``, converting strings to each default's type.

    Every value is checked against its default: the same type (an int option takes no 2.5), a list or tuple the
    same length with numbers of the same kind (``background=[1,2]`` for an RGB default is refused), and numbers
    within ``bounds`` (inclusive; :data:`COMMON_BOUNDS` plus the method's own), each element of a list too. Unknown
    keys raise ``ValueError`` naming the key and the valid ones, so a typo never runs silently.
    """
    limits = {**COMMON_BOUNDS, **(bounds or {})}
    merged = dict(defaults)
    for key, value in options.items():
        if key not in defaults:
            raise ValueError(f"{where}: unknown option {key!r}; valid options: {', '.join(sorted(defaults))}")
        merged[key] = _coerce(value, defaults[key], f"{where} option {key!r}")
    for key, value in merged.items():
        if key in limits and key in options:
            _check_bounds(value, limits[key], f"{where} option {key!r}")
    return merged


def _coerce(value: Any, default: Any, where: str) -> Any:
    if isinstance(default, str) or default is None:
        return value
    if isinstance(value, str):
        try:
            if isinstance(default, bool):
                lowered = value.lower()
                if lowered in {"1", "true", "yes", "on"}:
                    return True
                if lowered in {"0", "false", "no", "off"}:
                    return False
                raise ValueError(value)
            if isinstance(default, int):
                value = int(value)
            elif isinstance(default, float):
                value = float(value)
            elif isinstance(default, (list, tuple)):
                value = json.loads(value)
        except ValueError as err:
            raise ValueError(f"{where}: cannot read {value!r} as {type(default).__name__}") from err
    return _check_type(value, default, where)


def _is_number(value: Any, integral: bool) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if integral else isinstance(value, (int, float))


def _check_type(value: Any, default: Any, where: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)):
        integral = isinstance(default, int)
        if not _is_number(value, integral):
            raise ValueError(f"{where}: expected {'an integer' if integral else 'a number'}, got {value!r}")
        if not integral and not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number, got {value!r}")
        return value if integral else float(value)
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list like {list(default)}, got {value!r}")
        if default and len(value) != len(default):
            raise ValueError(f"{where}: expected {len(default)} values like {list(default)}, got {list(value)!r}")
        if default:
            value = [_check_type(v, d, where) for v, d in zip(value, default, strict=True)]
        return type(default)(value)
    return value


def _check_bounds(value: Any, bounds: tuple[float, float], where: str) -> None:
    low, high = bounds
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if _is_number(v, integral=False) and not low <= v <= high:
            raise ValueError(f"{where}: {v!r} is outside the allowed range {low}..{high}")


__all__ = [
    "Capabilities",
    "GenerationRequest",
    "Method",
    "SubjectInput",
    "WeightsUnavailableError",
    "coerce_options",
    "fingerprint_hash",
]
