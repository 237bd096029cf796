"""How much the layout map distorts references: per subject of an MSI build, the factor by which its reference's
aspect ratio differs from its box's (``max(r, 1/r)``, ``r = (box w/h) / (reference crop w/h)``), since
``compose_layout_map`` stretches each reference to its box (docs/msi-and-model.md).

    python benchmarks/msi_aspect_mismatch.py BUILD_DIR [BUILD_DIR ...]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def mismatch(build: Path) -> list[float]:
    pool = json.loads((build / "pool.json").read_text())
    bbox = {e["ann_id"]: e["bbox"] for entries in pool["categories"].values() for e in entries}
    out = []
    for line in (build / "manifest.jsonl").read_text().splitlines():
        for subject in json.loads(line)["subjects"]:
            (_, _, bw, bh), (_, _, rw, rh) = subject["bbox"], bbox[subject["reference_id"]]
            r = (bw / bh) / (rw / rh)
            out.append(max(r, 1 / r))
    return out


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for build in map(Path, sys.argv[1:]):
        f = mismatch(build)
        over_15, over_2 = (100 * sum(x > t for x in f) / len(f) for t in (1.5, 2.0))
        print(
            f"{build}: {len(f)} subjects, median factor {statistics.median(f):.2f}, "
            f"> 1.5x: {over_15:.0f} %, > 2x: {over_2:.0f} %"
        )


if __name__ == "__main__":
    main()
