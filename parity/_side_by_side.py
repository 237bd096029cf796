"""What every parity script shares: the ``--official`` argument, running the official side in its own process,
and the printed figures with a stated tolerance.

The official side runs in a subprocess (``--python``, default this interpreter) with ``--official`` first on its
``sys.path``, so the official code and its old pins (diffusers 0.23.1, transformers 4.46.3) never meet ours in
one process. The two sides exchange tensors through ``torch.save`` files in a temporary folder.

Exit codes: 0 every figure within its tolerance, 1 one above it, 2 a usage error (``--official`` missing, not a
folder, or not the official code the script expects).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
USAGE = 2


def parser(description: str, official_help: str, tolerance: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True, help=official_help)
    p.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter for the official side (e.g. a venv with the official pins); default: this one",
    )
    p.add_argument(
        "--tolerance", type=float, default=tolerance, help=f"largest max-abs difference accepted (default {tolerance})"
    )
    p.add_argument("--side", choices=("both", "official"), default="both", help=argparse.SUPPRESS)
    p.add_argument("--exchange", default="", help=argparse.SUPPRESS)
    return p


def check_official(official: str, markers: Sequence[str], what: str) -> Path:
    """The ``--official`` folder, or exit 2 naming what is missing."""
    path = Path(official).expanduser()
    if not path.is_dir():
        usage_error(f"--official {official}: not a folder; pass {what}")
    missing = [m for m in markers if not (path / m).exists()]
    if missing:
        usage_error(f"--official {official}: has no {', '.join(missing)}; pass {what}")
    return path.resolve()


def usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(USAGE)


def official_side(args: argparse.Namespace, run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """In the official subprocess: put the official code first on the path, read the inputs, write the outputs."""
    import torch

    # parity/customnet.py would shadow the official customnet package: this folder leaves the path first.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(Path(args.official).resolve()))
    exchange = Path(args.exchange)
    with contextlib.redirect_stdout(io.StringIO()):  # the official code's own prints (boxes, progress)
        outputs = run(torch.load(exchange / "inputs.pt", weights_only=False))
    torch.save(outputs, exchange / "official.pt")


def run_official(script: str, args: argparse.Namespace, inputs: dict[str, Any], extra: Sequence[str] = ()) -> dict:
    """Run ``script --side official`` under ``args.python`` on ``inputs``; its outputs."""
    import torch

    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        torch.save(inputs, Path(tmp) / "inputs.pt")
        cmd = [args.python, script, "--side", "official", "--official", args.official, "--exchange", tmp, *extra]
        # The official side must not import our checkout's packages by accident, only what --official holds.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run(cmd, env=env, cwd=tmp)
        if done.returncode:
            raise SystemExit(f"the official side failed (exit {done.returncode}): {' '.join(cmd)}")
        return torch.load(Path(tmp) / "official.pt", weights_only=False)


class Figures:
    """Collects max-abs / relative figures, prints each, and says at the end whether all are within tolerance."""

    def __init__(self, tolerance: float):
        self.tolerance = tolerance
        self.failed: list[str] = []

    def compare(
        self, name: str, ours: Any, official: Any, tolerance: float | None = None, rel_tolerance: float | None = None
    ) -> float:
        """Print max-abs and rel; above ``tolerance`` (max-abs; default the script's) fails, or, where
        ``rel_tolerance`` is given (float32 arithmetic in another order), above that relative figure."""
        import torch

        ours_t = torch.as_tensor(ours).double()
        official_t = torch.as_tensor(official).double()
        if ours_t.shape != official_t.shape:
            print(f"{name}: shapes differ, ours {tuple(ours_t.shape)} vs official {tuple(official_t.shape)}")
            self.failed.append(name)
            return float("inf")
        diff = (ours_t - official_t).abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        norm = float(official_t.norm())
        rel = float((ours_t - official_t).norm()) / norm if norm else float(diff.norm())
        if rel_tolerance is not None:
            within, stated = rel <= rel_tolerance, f"rel tolerance {rel_tolerance:g}"
        else:
            limit = self.tolerance if tolerance is None else tolerance
            within, stated = max_abs <= limit, f"tolerance {limit:g}"
        print(f"{name}: max-abs {max_abs:.3g}, rel {rel:.3g} ({stated}: {'ok' if within else 'ABOVE TOLERANCE'})")
        if not within:
            self.failed.append(name)
        return max_abs

    def note(self, name: str, ours: Any, other: Any) -> None:
        """A figure printed for information, never failing (e.g. what a rejected alternative would give)."""
        import torch

        a, b = torch.as_tensor(ours).double(), torch.as_tensor(other).double()
        diff = (a - b).abs()
        rel = float((a - b).norm()) / float(b.norm()) if float(b.norm()) else 0.0
        print(f"{name}: max-abs {float(diff.max()):.3g}, mean {float(diff.mean()):.3g}, rel {rel:.3g} (information)")

    def exit(self) -> None:
        if self.failed:
            print(f"FAILED: {', '.join(self.failed)} above tolerance")
            raise SystemExit(1)
        print("all figures within tolerance")


def clip_bpe_tokenizer(folder: str):
    """OpenAI CLIP's BPE tokenizer as a transformers CLIPTokenizer, from open_clip's packaged merges file (the vocab
    is built as open_clip's SimpleTokenizer builds it)."""
    import gzip
    import json

    import open_clip.tokenizer as oc
    from transformers import CLIPTokenizer

    merges = gzip.open(oc.default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(oc.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    Path(folder, "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    Path(folder, "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(str(Path(folder, "vocab.json")), str(Path(folder, "merges.txt")), model_max_length=77)
    tokenizer.save_pretrained(folder)
    return tokenizer
