"""MSIBench: an open, reproducible benchmark for controllable multi-subject image customization.

The Python API (:mod:`msibench.api`) is reachable from here: ``msibench.evaluate(method, tracks=..., seeds=...)``,
``msibench.run_method``, ``msibench.score_run``, ``msibench.make_scorer``, ``msibench.load_method``,
``msibench.table``. They are imported on first use, so ``import msibench`` (and the CLI's ``--help``) stays light.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

_API = ("Evaluation", "evaluate", "load_method", "make_scorer", "run_method", "score_run", "table")
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from msibench import api

        return getattr(api, name)
    raise AttributeError(f"module 'msibench' has no attribute {name!r}")


def _tame_ultralytics() -> None:
    """Switch off what ultralytics does behind a user's back, for the whole package, in this one place.

    ultralytics reads its environment once, at import: ``YOLO_AUTOINSTALL`` (otherwise it pip-installs a missing
    requirement mid-scoring, "attempting AutoUpdate"), ``YOLO_OFFLINE`` (otherwise it probes the network at import
    and, online, sends usage events and crash reports), and ``YOLO_CONFIG_DIR`` (where it writes its settings.json:
    here a folder of msibench's cache, never the user's ~/.config). msibench imports ultralytics only inside
    scoring functions, long after this ran; if something imported it earlier, its module constants are set too.
    """
    os.environ["YOLO_AUTOINSTALL"] = "false"
    os.environ["YOLO_OFFLINE"] = "true"
    if "YOLO_CONFIG_DIR" not in os.environ:
        cache = os.environ.get("MSIBENCH_CACHE") or str(Path.home() / ".cache" / "msibench")
        os.environ["YOLO_CONFIG_DIR"] = str(Path(cache) / "ultralytics")
    for name in ("ultralytics.utils", "ultralytics.utils.checks"):
        module = sys.modules.get(name)
        if module is not None:
            for attr, value in (("AUTOINSTALL", False), ("ONLINE", False)):
                if hasattr(module, attr):
                    setattr(module, attr, value)


_tame_ultralytics()
