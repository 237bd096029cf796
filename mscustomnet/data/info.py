"""``mscustomnet data info``: a read-only summary of an MSI dataset folder written by ``build-msi``.

It reads ``config.json`` (the build settings), ``manifest.jsonl`` (the committed scenes), ``pool.json`` and, when
the build finished, ``stats.json``; it never writes (a partial last manifest line of an interrupted build is
ignored, not cut off). With ``check_files`` every layout map and reference the manifest names must exist.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from mscustomnet.data.build import (
    CONFIG_FILE,
    LAYOUT_DIR,
    MANIFEST_FILE,
    POOL_DIR,
    POOL_FILE,
    STATS_FILE,
    parse_jsonl,
)


class MSIInfoError(ValueError):
    """The folder is not an MSI dataset (or one of its files is unreadable); the message names the file."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise MSIInfoError(f"{path}: cannot read: {err}") from err
    except json.JSONDecodeError as err:
        raise MSIInfoError(f"{path}: not valid JSON: {err}") from err


def _read_manifest(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(the committed records, the bytes of a torn last line: 0 when the file ends with a newline)."""
    if not path.is_file():
        return [], 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    torn = len(data) - end
    data = data[:end]  # a partial last line is not committed yet (info only reads)
    try:
        return parse_jsonl(path, data), torn
    except ValueError as err:
        raise MSIInfoError(str(err)) from err


def msi_info(folder: str | Path, *, check_files: bool = False) -> dict[str, Any]:
    """Summary of the MSI dataset in ``folder`` as plain data (see the module docstring)."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise MSIInfoError(
            f"{folder}: not an MSI dataset folder (no {CONFIG_FILE}); build one with `mscustomnet data build-msi`"
        )
    config = _read_json(config_path)
    records, torn = _read_manifest(folder / MANIFEST_FILE)
    stats = _read_json(folder / STATS_FILE) if (folder / STATS_FILE).is_file() else None
    pools = _read_json(folder / POOL_FILE) if (folder / POOL_FILE).is_file() else {"categories": {}}

    per_scene = Counter(len(r["subjects"]) for r in records)
    categories = Counter(s["category"] for r in records for s in r["subjects"])
    captions = Counter(r.get("caption_source", "coco") for r in records)
    pool_sizes = [len(entries) for entries in (pools.get("categories") or {}).values() if entries]
    pool_entries = [e for entries in (pools.get("categories") or {}).values() for e in entries]
    files: dict[str, Any] = {
        "layouts": len(list((folder / LAYOUT_DIR).glob("*.png"))),
        "pool_images": sum(1 for p in (folder / POOL_DIR).glob("*/*.png") if not p.name.endswith("_mask.png")),
        "checked": check_files,
        "missing": [],
        # bytes of a torn last manifest line (a killed build, a damaged copy): training refuses the file, so --check
        # fails on it too
        "torn_last_line": torn,
    }
    if check_files:
        for r in records:
            names = [r["layout_map"]] + [
                n for s in r["subjects"] for n in (s["reference_file"], s["reference_mask_file"])
            ]
            files["missing"] += [n for n in names if not (folder / n).is_file()]
        files["missing"] = sorted(set(files["missing"]))
    return {
        "path": str(folder),
        "complete": stats is not None,
        "config": config,
        "scenes": len(records),
        "scenes_kept": stats.get("scenes_kept") if stats else None,
        "scenes_skipped": stats.get("scenes_skipped") if stats else None,
        "subjects": sum(per_scene[k] * k for k in per_scene),
        "subjects_per_scene": {str(k): per_scene[k] for k in sorted(per_scene)},
        "captions": dict(captions),
        "categories": len(categories),
        "top_categories": categories.most_common(5),
        "pools": {
            "categories": len(pool_sizes),
            "entries": sum(pool_sizes),
            "median": statistics.median(pool_sizes) if pool_sizes else 0,
            # the reference rule's verdict per entry (pool.json "clean"); a fallback entry is a truncated, small or
            # occluded instance that fills a pool lacking clean ones
            "clean": sum(e.get("clean") is True for e in pool_entries),
            "fallback": sum(e.get("clean") is False for e in pool_entries),
        },
        "subjects_with_fallback_reference": sum(
            s.get("reference_clean") is False for r in records for s in r["subjects"]
        ),
        "files": files,
    }
