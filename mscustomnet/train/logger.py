"""Per-step training log: ``<out>/log.csv`` (always) and TensorBoard event files (when tensorboard is installed)."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

from msibench.cache import mkstemp as umask_mkstemp

log = logging.getLogger(__name__)

LOG_FILE = "log.csv"
# k: K(e) of the epoch; subjects: the most subjects any sample of the step had (at most k).
COLUMNS = ("step", "epoch", "stage", "lr", "loss", "k", "subjects", "samples_per_s", "grad_scale", "time_s")


class StepLogger:
    """Appends one row per logged step; on resume, rows after the checkpoint's step (from the interrupted run)
    are dropped first, so the log reads as one uninterrupted run."""

    def __init__(self, out: str | Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = Path(out) / LOG_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None or not self.path.is_file():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)
        else:
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", newline="")  # noqa: SIM115 - held open for the whole run
        self._writer = csv.writer(self._file)
        self._tb = _tensorboard_writer(Path(out) / "tensorboard") if tensorboard else None

    def _truncate_after(self, step: int) -> None:
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or tuple(rows[0]) != COLUMNS:
            raise ValueError(f"{self.path}: not a training log with columns {COLUMNS}")
        kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
        fd, tmp = umask_mkstemp(self.path.parent, prefix=f".{LOG_FILE}.", suffix=".tmp")
        with os.fdopen(fd, "w", newline="") as f:
            csv.writer(f).writerows(kept)
        os.replace(tmp, self.path)

    def log(self, row: dict[str, Any]) -> None:
        self._writer.writerow([_format(row[c]) for c in COLUMNS])
        self._file.flush()
        if self._tb is not None:
            step = int(row["step"])
            for name in ("loss", "lr", "k", "samples_per_s", "grad_scale"):
                self._tb.add_scalar(f"train/{name}", float(row[name]), step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _format(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return str(value)


def _tensorboard_writer(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        log.info("tensorboard is not installed: logging to %s only", LOG_FILE)
        return None
    return SummaryWriter(log_dir=str(path))


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``log.csv`` with numbers parsed."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    ints = {"step", "epoch", "stage", "k", "subjects"}
    return [{k: (int(v) if k in ints else float(v)) for k, v in r.items()} for r in rows]


__all__ = ["COLUMNS", "LOG_FILE", "StepLogger", "read_log"]
