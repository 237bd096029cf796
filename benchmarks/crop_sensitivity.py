"""How much the identity crop decides DINO-I and identity collapse: the same runs scored under every crop mode.

Three real runs over the MSIBench tasks: ``paste`` (each reference pasted into its target box, as a method that
follows the layout), ``paste, layout ignored`` (the same cut-outs, same sizes, each placed at a seeded random
position, as a method that takes no layout draws its subjects somewhere else) and ``grey`` (a uniform grey image:
a method that draws nothing). Each run is scored with ``--identity-crop category`` (with ``--identity-pairing
appearance``, the default, and ``position``), ``matched``, ``target`` and ``full``.

What stands in for the real scorer, and why (no YOLO, DINO or CLIP weights on this machine; random weights would
make the numbers meaningless):
- detections: the boxes paste actually drew (a perfect detector that knows where it pasted each cut-out), class =
  the subject's category; so "not found" never happens for the two paste runs and the table isolates the crop
  rule; on the grey images it detects nothing, so every subject is "not found" there;
- identity backbone: the shared DINOv2 ViT-S/14 (../shared/models/dinov2-s14-imgfocus, CLS token, DINO-I's
  preprocessing), injected. It is NOT DINO ViT-S/16: the columns are "DINOv2-I", never DINO-I. CLIP-I is not
  computed (no CLIP weights).

Usage: python benchmarks/crop_sensitivity.py [--limit 50] [--out results/crop_sensitivity]
       [--coco-root ../shared/data/coco2017-mini] [--dinov2 ../shared/models/dinov2-s14-imgfocus]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

REPO = Path(__file__).resolve().parents[1]
# (label, --identity-crop, --identity-pairing)
MODES = (
    ("category", "category", "appearance"),
    ("category, positional pairing", "category", "position"),
    ("matched", "matched", "appearance"),
    ("target", "target", "appearance"),
    ("full", "full", "appearance"),
)
GREY = (127, 127, 127)


METRIC_LABELS = (
    ("single", "dino_i", "single DINOv2-I"),
    ("single", "found", "single found"),
    ("multi", "dino_i", "multi DINOv2-I"),
    ("multi", "found", "multi found"),
    ("multi", "collapse", "multi collapse"),
    ("multi", "collapse_same", "multi collapse, same category"),
)
METRIC_COLUMNS = tuple((track, metric) for track, metric, _ in METRIC_LABELS)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=50, help="tasks per track")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--coco-root", type=Path, default=REPO.parent / "shared" / "data" / "coco2017-mini")
    p.add_argument("--dinov2", type=Path, default=REPO.parent / "shared" / "models" / "dinov2-s14-imgfocus")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="folder for table.md and summary.json")
    return p.parse_args(argv)


def fitted_box(box, ref_size, size: int) -> list[float]:
    """Where paste draws a reference of ``ref_size`` into ``box`` (aspect kept, centred; as PasteMethod._compose),
    normalised."""
    x0, y0, x1, y1 = (v * size for v in box)
    box_w, box_h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    scale = min(box_w / ref_size[0], box_h / ref_size[1])
    w, h = max(1, round(ref_size[0] * scale)), max(1, round(ref_size[1] * scale))
    left, top = round(x0 + (box_w - w) / 2.0), round(y0 + (box_h - h) / 2.0)
    return [left / size, top / size, min(left + w, size) / size, min(top + h, size) / size]


def moved_box(box, seed: int, index: int) -> tuple[float, float, float, float]:
    """The same box at a random position (seeded by the sample's seed and the subject index)."""
    rng = random.Random(f"{seed}:{index}")
    w, h = box[2] - box[0], box[3] - box[1]
    x0, y0 = rng.uniform(0.0, 1.0 - w), rng.uniform(0.0, 1.0 - h)
    return (x0, y0, x0 + w, y0 + h)


def paste_ignoring_layout():
    from msibench.methods.paste import PasteMethod

    class PasteIgnoringLayout(PasteMethod):
        """paste, but every subject at a random position: a stand-in for a method that takes no layout."""

        name: ClassVar[str] = "paste-layout-ignored"

        def config(self) -> dict[str, Any]:
            return {**super().config(), "layout": "ignored: random position per subject"}

        def _compose(self, request):
            subjects = tuple(
                dataclasses.replace(s, box=moved_box(s.box, request.seed, j)) for j, s in enumerate(request.subjects)
            )
            return super()._compose(dataclasses.replace(request, subjects=subjects))

    return PasteIgnoringLayout


def grey_method():
    from msibench.methods.paste import PasteMethod

    class Grey(PasteMethod):
        """Draws nothing: a uniform grey image of paste's resolution."""

        name: ClassVar[str] = "grey"

        def config(self) -> dict[str, Any]:
            return {**super().config(), "draws": "nothing: uniform grey"}

        def _compose(self, request):
            from PIL import Image

            size = self.config()["resolution"]
            return Image.new("RGB", (size, size), GREY)

    return Grey


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="crop_sensitivity_"))
    os.environ["MSIBENCH_CACHE"] = str(workdir / "cache")

    import torch
    from PIL import Image
    from transformers import Dinov2Model

    from msibench.bench.manifest import load_manifest
    from msibench.bench.prepare import reference_paths
    from msibench.methods.paste import PasteMethod
    from msibench.runner import run_method
    from msibench.scoring.aggregate import aggregate, find_group
    from msibench.scoring.backbones import image_encoder_from_callable
    from msibench.scoring.oracle import Drawn, oracle_detector, run_images
    from msibench.scoring.score import score_run
    from msibench.scoring.scorer import Scorer, ScorerConfig
    from msibench.scoring.store import load_scores

    torch.set_num_threads(args.threads)
    model = Dinov2Model.from_pretrained(args.dinov2).eval()
    dinov2 = image_encoder_from_callable(
        lambda x: model(pixel_values=x).last_hidden_state[:, 0], name="dinov2-s14-imgfocus (not DINO-I)"
    )
    manifest = load_manifest()
    runs = {
        "paste": (PasteMethod(resolution=args.resolution), False),
        "paste, layout ignored": (paste_ignoring_layout()(resolution=args.resolution), True),
        "grey (draws nothing)": (grey_method()(resolution=args.resolution), None),
    }
    drawn: dict[str, list[Drawn]] = {}  # image pixels sha -> the boxes paste drew, with their categories
    folders = {}
    for label, (method, moved) in runs.items():
        folder = workdir / method.name
        run_method(method, run_dir=folder, coco_root=args.coco_root, limit=args.limit, progress=False)

        def layout(rec, moved=moved):
            if moved is None:  # grey: nothing drawn, nothing detected
                return []
            task = manifest.by_id[rec["task_id"]]
            boxes = []
            for j, s in enumerate(task.subjects):
                ref = reference_paths(s.reference, manifest.sources[s.reference.image_id]).image
                with Image.open(ref) as im:
                    size = im.size
                box = moved_box(s.box, rec["seed"], j) if moved else s.box
                boxes.append(Drawn(fitted_box(box, size, args.resolution), s.category_id, score=0.9))
            return boxes

        drawn.update(run_images([folder], layout))
        folders[label] = folder

    detector = oracle_detector(drawn, lambda boxes: boxes, name="oracle: the boxes paste drew", masks=None)
    rows = []
    for label, folder in folders.items():
        for mode, crop_mode, pairing in MODES:
            cfg = ScorerConfig(metrics=("dino_i", "collapse"), identity_crop=crop_mode, identity_pairing=pairing)
            start = time.perf_counter()
            score_run(folder, Scorer(cfg, detector=detector, dino=dinov2), rescore=True, progress=False)
            _, records = load_scores(folder)
            summary = aggregate(records)
            row = {"run": label, "crop": mode, "seconds": round(time.perf_counter() - start, 1)}
            for track, metric in METRIC_COLUMNS:
                stat = find_group(summary, track, None).metrics.get(metric)
                row[f"{track}_{metric}"] = dataclasses.asdict(stat) if stat is not None else None
            crops = [s.get("crop") for r in records for s in r.get("subjects", [])]
            row["crops"] = {c: crops.count(c) for c in sorted(set(crops))}
            rows.append(row)
            print(json.dumps(row), flush=True)

    def cell(stat):
        if stat is None:
            return "–"
        if stat["ci_low"] is None:  # a single task: no interval
            return f"{stat['mean']:.3f}"
        return f"{stat['mean']:.3f} [{stat['ci_low']:.3f}, {stat['ci_high']:.3f}]"

    lines = [
        "| run | identity crop | " + " | ".join(label for _, _, label in METRIC_LABELS) + " | crops taken from |",
        "|---|---|" + "---:|" * len(METRIC_LABELS) + "---|",
    ]
    for r in rows:
        crops = ", ".join(f"{n} {c}" for c, n in r["crops"].items())
        cells = " | ".join(cell(r[f"{track}_{metric}"]) for track, metric, _ in METRIC_LABELS)
        lines.append(f"| {r['run']} | {r['crop']} | {cells} | {crops} |")
    table = "\n".join(lines) + "\n"
    print(table)
    result = {"command": " ".join(["python", "benchmarks/crop_sensitivity.py", *(argv or sys.argv[1:])]),
              "limit": args.limit, "rows": rows}  # fmt: skip
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(table)
        (args.out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
