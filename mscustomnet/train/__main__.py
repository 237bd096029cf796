"""``python -m mscustomnet.train --config ...``: the train command, e.g. under ``torchrun -m mscustomnet.train``."""

from __future__ import annotations

from mscustomnet.train.command import train_command

if __name__ == "__main__":
    train_command(prog_name="mscustomnet train")
