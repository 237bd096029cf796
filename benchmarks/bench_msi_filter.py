"""Benchmark: the MSI filter stage (Eq. 1-2) on a synthetic annotation file of COCO train2017 size.

The file is replicated from the real coco2017-mini train slice (same polygons, RLE crowds and image sizes, new ids)
to 118,287 images and 860,001 instances, like instances_train2017.json. Timed in the same run:

  baseline   pycocotools.COCO(file) then annToRLE + area per annotation (the textbook COCO-API way), 1 process
  msi w=1    mscustomnet.data.coco.load_instances + filter_scenes, 1 process
  msi w=N    the same with --workers N (forked area workers)
  area-field the filter on COCO's own `area` field instead of the rasterised mask (not the issue's definition):
             its time and how many salient decisions and kept scenes it would change

Usage: python benchmarks/bench_msi_filter.py [--coco-root DIR] [--workers 2] [--file PATH] [--skip-baseline]
The issue's target: the filter under 60 s for a train2017-sized file on 2 cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from mscustomnet.data.coco import ALPHA, BETA, filter_scenes, load_instances, load_json

REPO = Path(__file__).resolve().parents[1]
TRAIN2017_IMAGES = 118_287
TRAIN2017_INSTANCES = 860_001


def make_synthetic(source: Path, target: Path, n_images: int, n_instances: int) -> None:
    real = json.loads(source.read_text())
    by_image: dict[int, list[dict]] = {}
    for ann in real["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    sources = real["images"]
    images, annotations = [], []
    for k in range(n_images):
        src = sources[k % len(sources)]
        image_id = k + 1
        images.append({**src, "id": image_id, "file_name": f"{image_id:012d}.jpg"})
        for ann in by_image.get(src["id"], []):
            annotations.append({**ann, "image_id": image_id})
    # Evenly thin the replicas down to the train2017 instance count (the slice has more instances per image).
    keep = np.linspace(0, len(annotations) - 1, min(n_instances, len(annotations))).round().astype(int)
    annotations = [{**annotations[i], "id": j + 1} for j, i in enumerate(keep.tolist())]
    data = {"info": real.get("info", {}), "licenses": real.get("licenses", []), "images": images,
            "annotations": annotations, "categories": real["categories"]}  # fmt: skip
    tmp = target.with_suffix(".tmp")
    with tmp.open("w") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(tmp, target)


def time_baseline(path: Path, alpha: int, beta: float) -> tuple[float, int, int]:
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    start = time.perf_counter()
    coco = COCO(str(path))
    salient_per_image: dict[int, int] = {}
    n_salient = 0
    for ann in coco.dataset["annotations"]:
        if ann["iscrowd"]:
            continue
        image = coco.imgs[ann["image_id"]]
        area = float(mask_utils.area(coco.annToRLE(ann)))
        if area / (image["height"] * image["width"]) > beta:
            n_salient += 1
            salient_per_image[ann["image_id"]] = salient_per_image.get(ann["image_id"], 0) + 1
    kept = sum(c >= alpha for c in salient_per_image.values())
    return time.perf_counter() - start, kept, n_salient


def time_msi(path: Path, alpha: int, beta: float, workers: int) -> tuple[float, int, int, np.ndarray]:
    start = time.perf_counter()
    coco = load_instances(path, workers=workers)
    scenes = filter_scenes(coco, alpha, beta)
    seconds = time.perf_counter() - start
    return seconds, len(scenes.scenes), int(scenes.salient.sum()), scenes.salient


def time_area_field(path: Path, alpha: int, beta: float) -> tuple[float, np.ndarray, int]:
    start = time.perf_counter()
    data = load_json(path)
    sizes = {im["id"]: im["height"] * im["width"] for im in data["images"]}
    anns = data["annotations"]
    area = np.fromiter((a["area"] for a in anns), dtype=np.float64, count=len(anns))
    image_area = np.fromiter((sizes[a["image_id"]] for a in anns), dtype=np.float64, count=len(anns))
    crowd = np.fromiter((bool(a["iscrowd"]) for a in anns), dtype=bool, count=len(anns))
    image_ids = np.fromiter((a["image_id"] for a in anns), dtype=np.int64, count=len(anns))
    salient = ~crowd & (area / image_area > beta)
    kept = int((np.bincount(image_ids[salient]) >= alpha).sum())
    return time.perf_counter() - start, salient, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco-root", type=Path, default=REPO.parent / "shared" / "data" / "coco2017-mini")
    parser.add_argument("--images", type=int, default=TRAIN2017_IMAGES)
    parser.add_argument("--instances", type=int, default=TRAIN2017_INSTANCES)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--file", type=Path, help="synthetic file to reuse or create (default: a temporary file)")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.file or Path(tmp) / "instances_synthetic.json"
        if not path.is_file():
            start = time.perf_counter()
            make_synthetic(args.coco_root / "annotations" / "instances_train2017.json", path, args.images,
                           args.instances)  # fmt: skip
            print(f"synthetic file written in {time.perf_counter() - start:.1f} s")
        size_mb = path.stat().st_size / 2**20
        try:
            import orjson  # noqa: F401

            parser_name = "orjson"
        except ImportError:
            parser_name = "json (stdlib)"
        print(f"file: {path} ({size_mb:.0f} MB), JSON parser: {parser_name}, cpu count: {os.cpu_count()}, "
              f"load average before: {os.getloadavg()[0]:.1f}")  # fmt: skip

        start = time.perf_counter()
        data = load_json(path)
        n_images, n_instances = len(data["images"]), len(data["annotations"])
        del data
        gc.collect()
        parse_s = time.perf_counter() - start
        print(f"{n_images} images, {n_instances} instances; JSON parse alone {parse_s:.1f} s")

        rows = []
        if not args.skip_baseline:
            seconds, kept, n_salient = time_baseline(path, ALPHA, BETA)
            rows.append(("baseline: COCO() + annToRLE + area", seconds, kept, n_salient))
            gc.collect()
        msi_salient = None
        for workers in sorted({1, args.workers}):
            seconds, kept, n_salient, msi_salient = time_msi(path, ALPHA, BETA, workers)
            rows.append((f"msi filter, workers={workers}", seconds, kept, n_salient))
            gc.collect()
        area_s, area_salient, area_kept = time_area_field(path, ALPHA, BETA)
        rows.append(("COCO `area` field (not used)", area_s, area_kept, int(area_salient.sum())))

        base = rows[0][1]
        print(f"\n{'stage':40s} {'seconds':>8s} {'x base':>7s} {'scenes':>7s} {'salient':>8s}")
        for name, seconds, kept, n_salient in rows:
            print(f"{name:40s} {seconds:8.1f} {seconds / base:7.2f} {kept:7d} {n_salient:8d}")
        if msi_salient is not None:
            flips = int((msi_salient != area_salient).sum())
            print(f"\nsalient decisions that the `area` field would change: {flips} of {n_instances}")
        best = min(s for name, s, _, _ in rows if name.startswith("msi"))
        verdict = "meets" if best < 60 else "misses"
        print(f"fastest msi filter: {best:.1f} s for {n_instances} instances ({verdict} the 60 s target)")
        print(
            f"load average after: {os.getloadavg()[0]:.1f} (timings are wall-clock; other processes share the cores)"
        )


if __name__ == "__main__":
    main()
