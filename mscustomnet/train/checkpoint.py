"""Training checkpoints: ``<out>/checkpoints/step-00001234/trainer.pt`` plus a ``latest`` pointer.

A checkpoint holds the trainable weights (UNet, F_proj, Phi_c: the frozen towers come from ``model.init`` and are
checked by hash), the optimizer, the grad scaler, the progress (epoch, optimiser steps done in it, global step) and
the python / numpy / torch / CUDA RNG states of every rank. It is written into a temporary folder renamed into
place, then ``latest`` is replaced: a crash while saving leaves the previous checkpoint as ``latest``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msibench.cache import mkdtemp as umask_mkdtemp
from msibench.cache import mkstemp as umask_mkstemp

log = logging.getLogger(__name__)

FORMAT = "mscustomnet-train-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer.pt"


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as plain data that ``torch.load(weights_only=True)`` reads back."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            log.warning(
                "checkpoint holds CUDA RNG states of %d device(s), this machine has %d: CUDA RNG not restored",
                len(state["cuda"]),
                torch.cuda.device_count(),
            )
        else:
            torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_root(out: str | Path) -> Path:
    return Path(out) / CHECKPOINT_DIR


def save_checkpoint(out: str | Path, global_step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``global_step``, point ``latest`` at it, keep the newest ``keep``."""
    root = checkpoint_root(out)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{global_step:08d}"
    final = root / name
    tmp = Path(umask_mkdtemp(root, prefix=f".{name}.", suffix=".tmp"))
    try:
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, tmp / STATE_FILE)
        if final.exists():  # the same step saved again (e.g. end of epoch == max_steps): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fd, pointer = umask_mkstemp(root, prefix=f".{LATEST}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(name + "\n")
    os.replace(pointer, root / LATEST)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("saved checkpoint %s", final)
    return final


def find_checkpoint(out: str | Path, spec: str | Path) -> Path:
    """The ``trainer.pt`` that ``--resume spec`` names: ``latest`` (in ``out``), a checkpoint folder or the file."""
    if str(spec) == LATEST:
        root = checkpoint_root(out)
        pointer = root / LATEST
        if not pointer.is_file():
            raise FileNotFoundError(f"--resume latest: no checkpoint in {root} (no {LATEST} file)")
        spec = root / pointer.read_text().strip()
    path = Path(spec)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state (``path``: its ``trainer.pt`` or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign file: say which
        raise ValueError(f"{path}: not a readable training checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} file")
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {state.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    return state


__all__ = [
    "CHECKPOINT_DIR",
    "FORMAT",
    "LATEST",
    "STATE_FILE",
    "checkpoint_root",
    "find_checkpoint",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]
