"""Reading generated images that may be damaged: one decoder and one readable reason, for ``score`` and ``report``.

Anything can come out of a damaged file: OSError, ValueError, SyntaxError, DecompressionBombError, and with
ultralytics imported (it wraps ``PIL.Image.open`` to add HEIF on the first unidentified file) even a
ModuleNotFoundError for pi_heif. Callers catch ``Exception`` around these and report :func:`why_undecodable`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_rgb(path: str | Path) -> Any:
    """The fully decoded RGB ``PIL.Image`` of ``path``."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def why_undecodable(err: BaseException) -> str:
    """A readable reason: the decoder's own error, not what a wrapper raised while handling it."""
    from PIL import UnidentifiedImageError

    cause = err.__context__ if isinstance(err, ImportError) and err.__context__ is not None else err
    if isinstance(cause, UnidentifiedImageError):
        return f"not a readable image ({cause})"
    return f"{type(cause).__name__}: {cause}"
