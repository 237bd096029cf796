"""CLIP pixels: ``baselines.clip_pixels`` against transformers 4's ``CLIPImageProcessor`` (the PIL path).

IP-Adapter, SSR-Encoder and λ-ECLIPSE ran transformers 4, whose ``CLIPImageProcessor`` resizes with PIL;
``baselines.clip_pixels`` writes that algorithm out so the pixels stay the same under transformers 5. This script
feeds the same MSIBench references to both and compares the float32 pixel values (expected: 0.0).

Usage (from the repository root)::

    python -m venv --system-site-packages /work/venvs/parity-old
    /work/venvs/parity-old/bin/pip install transformers==4.46.3 "huggingface_hub<0.26"
    python -m msibench data prepare --manifest v1 --coco-root COCO   # cuts the 268 v1 references
    python parity/clip_pixels.py --official /work/venvs/parity-old/lib/python3.11/site-packages

``--official`` is a folder holding transformers 4.x (a venv's site-packages); the official side runs in its own
process with that folder first on its path. The images are the prepared references of ``--manifest`` (v1: 268);
``--references DIR`` takes the PNGs of a folder instead. Exit 0: every figure within ``--tolerance`` (default
0.0), 1: not, 2: a usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from _side_by_side import REPO_ROOT, Figures, check_official, official_side, parser, run_official, usage_error  # noqa: E402

OFFICIAL_HELP = "a folder holding transformers 4.x, e.g. a venv's site-packages with transformers==4.46.3"


def _official(inputs: dict) -> dict:
    import transformers
    from PIL import Image
    from transformers import CLIPImageProcessor

    if not transformers.__version__.startswith("4."):
        raise SystemExit(
            f"--official holds transformers {transformers.__version__}, not 4.x ({transformers.__file__})"
        )
    images = [Image.open(p) for p in inputs["paths"]]
    pixels = CLIPImageProcessor()(images=images, return_tensors="pt").pixel_values
    return {"pixels": pixels, "version": transformers.__version__}


def _reference_paths(folder: str, manifest_name: str) -> list[str]:
    if folder:
        root = Path(folder)
        paths = sorted(str(p) for p in root.glob("*.png") if not p.name.endswith(".mask.png"))
        if not paths:
            usage_error(f"--references {root}: no reference images")
        return paths
    sys.path.insert(0, str(REPO_ROOT))
    from msibench.bench.manifest import load_manifest
    from msibench.bench.prepare import reference_paths

    manifest = load_manifest(manifest_name)
    refs = {(s.reference.image_id, s.reference.annotation_id): s.reference for t in manifest.tasks for s in t.subjects}
    paths = sorted(str(reference_paths(r, manifest.sources[r.image_id]).image) for r in refs.values())
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        usage_error(f"{missing[0]}: missing; run `python -m msibench data prepare --manifest {manifest_name}` first")
    return paths


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.split("\n\n")[0], OFFICIAL_HELP, tolerance=0.0)
    p.add_argument("--manifest", default="v1", help="manifest whose prepared references are compared (default v1)")
    p.add_argument("--references", default="", help="a folder of PNGs to compare instead of a manifest's references")
    args = p.parse_args(argv)
    check_official(args.official, ["transformers/models/clip/image_processing_clip.py"], OFFICIAL_HELP)
    if args.side == "official":
        return official_side(args, _official)
    paths = _reference_paths(args.references, args.manifest)
    official = run_official(__file__, args, {"paths": paths})
    sys.path.insert(0, str(REPO_ROOT))
    import transformers
    from PIL import Image

    from baselines.clip_pixels import PILCLIPImageProcessor, clip_pixels

    images = [Image.open(p) for p in paths]
    print(f"{len(paths)} references; official: transformers {official['version']}, ours: baselines.clip_pixels")
    figures = Figures(args.tolerance)
    figures.compare("clip_pixels()", clip_pixels(images), official["pixels"])
    figures.compare("PILCLIPImageProcessor", PILCLIPImageProcessor()(images, return_tensors="pt").pixel_values,
                    official["pixels"])  # fmt: skip
    own = transformers.CLIPImageProcessor()(images=images, return_tensors="pt").pixel_values
    figures.note(f"transformers {transformers.__version__} CLIPImageProcessor (not used)", own, official["pixels"])
    figures.exit()


if __name__ == "__main__":
    main()
