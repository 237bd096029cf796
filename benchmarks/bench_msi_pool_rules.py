"""Cost of the MSI pool's own rules (spans the frame, sharpness: msibench/bench/quality.py) on top of the shared
reference rule, per instance, on a COCO split (default: the val2017 slice). The two variants run interleaved, photo by
photo, in one process, so the ratio compares like with like.

    python benchmarks/bench_msi_pool_rules.py [--coco-root ../shared/data/coco2017-mini] [--split val2017] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mscustomnet.data.build import msi_verdicts
from mscustomnet.data.coco import decode_mask
from msibench.bench import quality
from msibench.coco import load_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco-root", type=Path, default=Path(__file__).parents[2] / "shared/data/coco2017-mini")
    parser.add_argument("--split", default="val2017")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    coco = load_split(args.coco_root, args.split)
    by_image: dict[int, list[dict]] = {}
    for ann in sorted(coco.annotations, key=lambda a: a["id"]):
        by_image.setdefault(ann["image_id"], []).append(ann)
    shared = with_msi = 0.0
    instances = 0
    for _ in range(args.rounds):
        for image_id, anns in sorted(by_image.items()):
            image = coco.images[image_id]
            w, h = image["width"], image["height"]
            photo = [
                quality.PhotoInstance(a["id"], a["category_id"], tuple(a["bbox"]), bool(a["iscrowd"])) for a in anns
            ]
            masks = [decode_mask(a["segmentation"], h, w) for a in anns]
            start = time.perf_counter()
            quality.assess_photo(photo, masks, w, h)
            shared += time.perf_counter() - start
            start = time.perf_counter()
            verdicts = quality.assess_photo(photo, masks, w, h)
            msi_verdicts(verdicts, photo, masks, coco.image_path(image_id), w, h)
            with_msi += time.perf_counter() - start
            instances += sum(not a["iscrowd"] for a in anns)
    print(f"{args.split}: {instances // args.rounds} instances in {len(by_image)} photos, {args.rounds} rounds")
    print(f"shared rule          {1000 * shared / instances:.2f} ms per instance")
    print(f"shared + MSI rules   {1000 * with_msi / instances:.2f} ms per instance  ({with_msi / shared:.2f}x)")


if __name__ == "__main__":
    main()
