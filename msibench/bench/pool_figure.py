"""MSIBench beside the paper's benchmark in one figure (``msibench bench pool-figure``): how many exemplars each COCO
category's reference pool holds (the paper: ten for each of the 80 categories, Sec. IV-A) and how many subjects each
reference serves, for packaged manifests. Written as a PNG with a CSV of the plotted values beside it."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from msibench.bench.manifest import Manifest
from msibench.coco import CATEGORY_NAME

PAPER_CATEGORIES = 80
PAPER_POOL_SIZE = 10  # "a pool of ten representative subject exemplars" per category (paper Sec. IV-A)
COLORS = ("#999999", "#E69F00", "#0072B2")  # paper, then the manifests (Okabe-Ito)


def pool_sizes(manifest: Manifest) -> list[int]:
    """Exemplars in each of the 80 COCO categories' pools (0 where the manifest has none)."""
    pools = manifest.build.get("pools") or {}
    return [len(pools.get(name, [])) for name in CATEGORY_NAME.values()]


def reference_uses(manifest: Manifest) -> list[int]:
    """How many subjects each distinct reference serves."""
    uses = Counter(s.reference.annotation_id for t in manifest.tasks for s in t.subjects)
    return sorted(uses.values())


def render_pool_figure(manifests: dict[str, Manifest], out: str | Path) -> Path:
    """Two panels: categories by pool size (paper, then each manifest) and references by subjects served."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    sizes = {"paper": [PAPER_POOL_SIZE] * PAPER_CATEGORIES} | {n: pool_sizes(m) for n, m in manifests.items()}
    uses = {n: reference_uses(m) for n, m in manifests.items()}
    fig = Figure(figsize=(7.16, 2.8), dpi=200)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    width = 0.8 / len(sizes)
    for i, (name, values) in enumerate(sizes.items()):
        counts = Counter(values)
        xs = list(range(PAPER_POOL_SIZE + 1))
        covered = sum(v > 0 for v in values)
        label = f"{name}: {covered} of 80 categories, {sum(values)} exemplars"
        left.bar([x + (i - (len(sizes) - 1) / 2) * width for x in xs], [counts[x] for x in xs], width,
                 color=COLORS[i % len(COLORS)], label=label)  # fmt: skip
    left.set_xticks(range(PAPER_POOL_SIZE + 1))
    left.set_xlabel("exemplars in the category's pool")
    left.set_ylabel("COCO categories")
    left.legend(fontsize=7, frameon=False)
    top = max(max(v) for v in uses.values())
    width = 0.8 / max(1, len(uses))
    for i, (name, values) in enumerate(uses.items()):
        counts = Counter(values)
        xs = list(range(1, top + 1))
        label = f"{name}: max {max(values)}, mean {sum(values) / len(values):.2f}"
        right.bar([x + (i - (len(uses) - 1) / 2) * width for x in xs], [counts[x] for x in xs], width,
                  color=COLORS[(i + 1) % len(COLORS)], label=label)  # fmt: skip
    right.axvline(8.5, color="#333333", linewidth=0.8, linestyle="--")
    right.text(8.7, right.get_ylim()[1] * 0.9, "v3 cap: 8", fontsize=7)
    right.set_xlabel("subjects a reference serves")
    right.set_ylabel("references")
    right.legend(fontsize=7, frameon=False, loc="upper right")
    for ax in (left, right):
        ax.tick_params(labelsize=7)
        ax.xaxis.label.set_size(8)
        ax.yaxis.label.set_size(8)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    with out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["benchmark", "category", "pool_size"])
        for name, values in sizes.items():
            writer.writerows([name, cat, n] for cat, n in zip(CATEGORY_NAME.values(), values, strict=True))
        writer.writerow([])
        writer.writerow(["benchmark", "subjects_served", "references"])
        for name, values in uses.items():
            writer.writerows([name, n, c] for n, c in sorted(Counter(values).items()))
    return out


__all__ = ["pool_sizes", "reference_uses", "render_pool_figure"]
