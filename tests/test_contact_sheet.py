"""`msibench bench contact-sheet`: every distinct reference of a manifest on one PNG, and `bench info`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from msibench.bench.contact_sheet import LABEL, TILE, references_by_category
from msibench.bench.manifest import load_manifest
from msibench.bench.prepare import reference_paths


def test_contact_sheet_shows_every_distinct_reference(tmp_path, coco_plus_root):
    manifest = load_manifest()
    grouped = references_by_category(manifest)
    distinct = {s.reference.annotation_id for t in manifest.tasks for s in t.subjects}
    assert sum(len(refs) for refs in grouped.values()) == len(distinct)
    assert sum(n for refs in grouped.values() for _, n in refs) == sum(t.k for t in manifest.tasks)
    assert list(grouped) == sorted(grouped)

    out = tmp_path / "sheet.png"
    res = subprocess.run(
        [sys.executable, "-m", "msibench", "bench", "contact-sheet", "--coco-root", str(coco_plus_root),
         "--out", str(out), "--columns", "10"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    sheet = np.asarray(Image.open(out).convert("RGB"))
    rows = -(-len(distinct) // 10)
    assert sheet.shape == (rows * (TILE + 2 * LABEL), 10 * TILE, 3)
    # The first tile is the first category's first reference, fitted into its white square.
    _, refs = next(iter(grouped.items()))
    ref = refs[0][0]
    with Image.open(reference_paths(ref, manifest.sources[ref.image_id]).image) as image:
        thumb = image.convert("RGB")
    thumb.thumbnail((TILE - 4, TILE - 4), Image.Resampling.LANCZOS)
    x, y = (TILE - thumb.width) // 2, (TILE - thumb.height) // 2
    assert np.array_equal(sheet[y : y + thumb.height, x : x + thumb.width], np.asarray(thumb))
    assert (sheet[1:y, 1 : TILE - 1] == 255).all()  # white around it


def test_bench_info_reports_v3_v2_and_v1_by_name():
    for name in ("v3", "v2", "v1"):
        res = subprocess.run(
            [sys.executable, "-m", "msibench", "bench", "info", "--manifest", name],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert f"name {name}, version {name[1:]}" in res.stdout and f"msibench_{name}.json" in res.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "msibench", "bench", "info", "--manifest", "v9"], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "packaged manifests by name: v1, v2, v3" in bad.stderr


def test_committed_v3_info_is_what_bench_info_prints():
    """results/msibench_v3_info.txt (quoted in docs/benchmark.md) is what `bench info` prints, uses included."""
    from pathlib import Path

    res = subprocess.run(
        [sys.executable, "-m", "msibench", "bench", "info"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    committed = (Path(__file__).resolve().parents[1] / "results" / "msibench_v3_info.txt").read_text()
    assert res.stdout == committed
    assert "uses per reference: max 8," in committed and "289343, 340272" in committed


def test_pool_figure_compares_pools_with_the_paper(tmp_path):
    """`bench pool-figure`: per category pool sizes (the paper: 10 for each of 80) and subjects per reference."""
    import csv

    from msibench.bench.pool_figure import pool_sizes, reference_uses

    v3 = load_manifest("v3")
    sizes = pool_sizes(v3)
    assert len(sizes) == 80 and sum(sizes) == sum(len(v) for v in v3.build["pools"].values())
    assert max(reference_uses(v3)) <= 8 < max(reference_uses(load_manifest("v2")))
    out = tmp_path / "pools.png"
    res = subprocess.run(
        [sys.executable, "-m", "msibench", "bench", "pool-figure", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert Image.open(out).size[0] > 1000
    rows = list(csv.reader(out.with_suffix(".csv").open()))
    paper = [r for r in rows if r and r[0] == "paper"]
    assert len(paper) == 80 and {r[2] for r in paper} == {"10"}
    assert sum(int(r[2]) for r in rows if r and r[0] == "v3" and len(r) == 3 and r[1] in v3.build["pools"]) == sum(
        sizes
    )
