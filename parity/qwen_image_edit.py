"""Parity of ``qwen-image-edit`` with the official implementation, end to end, on tiny random weights.

The official implementation of Qwen-Image-Edit-2511 IS diffusers' ``QwenImageEditPlusPipeline`` (the model card and
QwenLM/Qwen-Image's README call it), so the official side here is that pipeline loaded with ``from_pretrained`` and
called exactly as the card's snippet does (README.md lines 131-163 at QwenLM/Qwen-Image@6b5e1f5c): the references
as an ``image`` list, ``true_cfg_scale=4.0``, ``negative_prompt=" "``, ``num_inference_steps``, ``guidance_scale=1.0``,
``num_images_per_prompt=1``, ``generator=torch.manual_seed(seed)``. Our side is the msibench method
(``baselines/qwen_image_edit.py``) loading the same folder through its own ``setup`` and turning a benchmark request
into the call. Both sides get the same random weights (``baselines.testing.tiny_qwen_image_edit_pipeline``, the 2511
architecture at toy width, saved in the hub layout), the same references and the same seed.

One deliberate difference is passed to both sides: the card gives no height/width (the pipeline then makes a
1024x1024-pixel-area image with the last reference's aspect ratio); msibench's canvas is square, so both calls get
``--resolution`` x ``--resolution``.

Compared, as max |ours - official| and rel = ||ours - official|| / ||official||:
- preprocessing: the Qwen2.5-VL inputs (condition images after the pipeline's resize, the processor's pixel values),
  the VAE inputs (every reference resized to the 1024x1024-pixel area), the prompt and negative-prompt embeddings;
- the sampler: the initial latents, the timesteps, the latents after every step;
- the output: the decoded image before the uint8 cast and the final image (uint8).

    python parity/qwen_image_edit.py                                 # installed diffusers; 1, 2, 3 references
    python parity/qwen_image_edit.py --diffusers ~/src/diffusers/src --steps 40 --refs 3
    python parity/qwen_image_edit.py --reference-area 4096           # quick: references at a 64x64 area

``--diffusers PATH`` imports diffusers from a source tree first (``PATH`` holds the ``diffusers`` package): the
official pipeline and our method then both run that diffusers. Real weights are not needed (and not used).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers", type=Path, default=None, help="a diffusers source tree to import (its src/)")
    p.add_argument("--refs", default="1,2,3", help="comma-separated numbers of references to compare")
    p.add_argument("--steps", type=int, default=4, help="sampling steps (the card: 40)")
    p.add_argument("--resolution", type=int, default=64, help="output side, both calls (a multiple of 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--reference-area",
        type=int,
        default=None,
        help="pixels of the VAE and Qwen2.5-VL reference areas (default: the pipeline's 1024^2, 384^2)",
    )
    return p.parse_args(argv)  # fmt: skip


def synthetic_subjects(n: int):
    """``n`` white-background cut-outs of different aspect ratios (ellipses of seeded colours) and their masks."""
    import random

    from PIL import Image, ImageDraw

    sizes = [(180, 120), (90, 210), (150, 150)]
    out = []
    for i in range(n):
        rng = random.Random(i)
        size = sizes[i % len(sizes)]
        image = Image.new("RGB", size, (255, 255, 255))
        mask = Image.new("L", size, 0)
        colour = tuple(rng.randrange(20, 230) for _ in range(3))
        for canvas, fill in ((image, colour), (mask, 255)):
            ImageDraw.Draw(canvas).ellipse((4, 4, size[0] - 5, size[1] - 5), fill=fill)
        out.append((image, mask))
    return out


def request_for(n: int, seed: int):
    """A benchmark request of the first v1 task with ``n`` subjects, with synthetic references in its boxes' order."""
    from msibench.bench.manifest import load_manifest
    from msibench.methods.base import GenerationRequest, SubjectInput

    task = next(t for t in load_manifest("v1").tasks if len(t.subjects) == n)
    subjects = tuple(
        SubjectInput(category=s.category, category_id=s.category_id, box=s.box, z=s.z, reference=image, mask=mask)
        for s, (image, mask) in zip(task.subjects, synthetic_subjects(n), strict=True)
    )
    return GenerationRequest(task=task, sample_index=0, seed=seed, subjects=subjects)


class Recorder:
    """Wraps a pipeline's stages to keep what they receive and return (the pipeline's own code runs unchanged)."""

    def __init__(self, pipe) -> None:
        self.seen: dict[str, list] = {}
        self._wrap(pipe.processor, "__call__", self._processor, replace_on=pipe, attr="processor")
        self._wrap(pipe, "encode_prompt", self._encode_prompt)
        self._wrap(pipe, "prepare_latents", self._prepare_latents)
        self._wrap(pipe.scheduler, "step", self._step)
        self._wrap(pipe.vae, "decode", self._decode)

    def keep(self, key: str, value) -> None:
        self.seen.setdefault(key, []).append(value)

    def _wrap(self, owner, name, hook, replace_on=None, attr=None) -> None:
        if replace_on is not None:  # a callable object: wrap it in a function held by the pipeline
            inner = getattr(replace_on, attr)

            class Proxy:
                def __getattr__(self, item):
                    return getattr(inner, item)

                def __call__(self, *args, **kwargs):
                    return hook(inner, *args, **kwargs)

            object.__setattr__(replace_on, attr, Proxy())  # past DiffusionPipeline's config-registering setattr
            return
        original = getattr(owner, name)
        setattr(owner, name, lambda *args, **kwargs: hook(original, *args, **kwargs))

    def _processor(self, inner, *args, **kwargs):
        import numpy as np

        out = inner(*args, **kwargs)
        images = kwargs.get("images") or []
        self.keep("condition images (after resize)", [np.asarray(im, dtype=np.float32) for im in images])
        self.keep("Qwen2.5-VL pixel values", out.get("pixel_values"))
        self.keep("prompt token ids", out["input_ids"])
        return out

    def _encode_prompt(self, original, *args, **kwargs):
        embeds, mask = original(*args, **kwargs)
        self.keep("prompt embeddings (positive, negative)", embeds)
        return embeds, mask

    def _prepare_latents(self, original, images, *args, **kwargs):
        self.keep("VAE inputs (references at the VAE area)", [im for im in images])
        latents, image_latents = original(images, *args, **kwargs)
        self.keep("initial latents", latents)
        self.keep("reference latents", image_latents)
        return latents, image_latents

    def _step(self, original, model_output, timestep, sample, *args, **kwargs):
        out = original(model_output, timestep, sample, *args, **kwargs)
        self.keep("timesteps", timestep.reshape(1))
        self.keep("latents after each step", out[0] if isinstance(out, tuple) else out.prev_sample)
        return out

    def _decode(self, original, *args, **kwargs):
        out = original(*args, **kwargs)
        self.keep("decoded image (before uint8)", out[0] if isinstance(out, tuple) else out.sample)
        return out


def flat(values):
    import numpy as np
    import torch

    if isinstance(values, (list, tuple)):
        parts = [flat(v) for v in values]
        return np.concatenate(parts) if parts else np.zeros(0)
    if isinstance(values, torch.Tensor):
        return values.detach().float().cpu().numpy().ravel().astype(np.float64)
    return np.asarray(values, dtype=np.float64).ravel()


def compare(ours, theirs) -> tuple[float, float, int]:
    import numpy as np

    a, b = flat(ours), flat(theirs)
    if a.shape != b.shape:
        raise SystemExit(f"shapes differ: ours {a.shape}, official {b.shape}")
    diff = a - b
    norm = float(np.linalg.norm(b))
    return float(np.abs(diff).max(initial=0.0)), float(np.linalg.norm(diff) / norm) if norm else 0.0, a.size


def card_call(pipe, request, args, seed: int):
    """The model card's call (README.md lines 147-157), with the square size both sides use; the uint8 image."""
    import numpy as np
    import torch

    with torch.inference_mode():
        out = pipe(
            image=[s.reference for s in request.subjects],
            prompt=request.task.prompt,
            generator=torch.manual_seed(seed),
            true_cfg_scale=4.0,
            negative_prompt=" ",
            num_inference_steps=args.steps,
            guidance_scale=1.0,
            num_images_per_prompt=1,
            height=args.resolution,
            width=args.resolution,
        )
    return np.asarray(out.images[0])


def main(argv=None) -> dict[str, dict[str, tuple[float, float, int]]]:
    args = parse_args(argv)
    if args.diffusers is not None:
        sys.path.insert(0, str(args.diffusers.expanduser().resolve()))
    sys.path.insert(0, str(REPO))
    import diffusers
    import numpy as np
    import torch
    from diffusers import QwenImageEditPlusPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    from baselines.qwen_image_edit import QwenImageEditMethod
    from baselines.testing import tiny_qwen_image_edit_pipeline

    if args.reference_area:
        plus.CONDITION_IMAGE_SIZE = plus.VAE_IMAGE_SIZE = args.reference_area
    print(f"diffusers {diffusers.__version__} from {Path(diffusers.__file__).parent}")
    print(f"reference areas: VAE {plus.VAE_IMAGE_SIZE} px, Qwen2.5-VL {plus.CONDITION_IMAGE_SIZE} px; "
          f"{args.steps} steps, {args.resolution}x{args.resolution}, seed {args.seed}")  # fmt: skip
    results: dict[str, dict[str, tuple[float, float, int]]] = {}
    with tempfile.TemporaryDirectory(prefix="parity-qwen-") as tmp:
        folder = Path(tmp) / "Qwen-Image-Edit-2511"
        tiny_qwen_image_edit_pipeline(seed=1).save_pretrained(folder)
        method = QwenImageEditMethod(model=str(folder), steps=args.steps, resolution=args.resolution, dtype="float32")
        method.setup("cpu")
        official = QwenImageEditPlusPipeline.from_pretrained(folder, torch_dtype=torch.float32)
        official.set_progress_bar_config(disable=True)
        ours_rec, theirs_rec = Recorder(method._pipe), Recorder(official)
        for n in (int(x) for x in args.refs.split(",")):
            request = request_for(n, args.seed)
            for rec in (ours_rec, theirs_rec):
                rec.seen.clear()
            start = time.perf_counter()
            ours_image = np.asarray(method.generate([request])[0])
            theirs_image = card_call(official, request, args, args.seed)
            seconds = time.perf_counter() - start
            rows = {key: compare(ours_rec.seen[key], theirs_rec.seen.get(key, [])) for key in ours_rec.seen}
            rows["final image (uint8)"] = compare(ours_image, theirs_image)
            # The harness can see a difference: the official call with the next seed is another image.
            rows["control: official at seed + 1 (must differ)"] = compare(
                ours_image, card_call(official, request, args, args.seed + 1)
            )
            results[f"{n} reference(s)"] = rows
            print(f"\n{n} reference(s), task {request.task.id} ({seconds:.0f} s for both sides)")
            print(f"  {'compared':44s} {'max-abs':>10s} {'rel':>10s} {'values':>9s}")
            for key, (max_abs, rel, size) in rows.items():
                print(f"  {key:44s} {max_abs:10.3g} {rel:10.3g} {size:9d}")
    return results


if __name__ == "__main__":
    main()
