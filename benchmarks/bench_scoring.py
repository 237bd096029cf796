"""Benchmark: scoring the 100 multi-subject ``paste`` images with the real scorer architectures.

The networks are the real YOLO11x-seg, DINO ViT-S/16 and OpenAI CLIP ViT-B/32 architectures with random weights
(built offline; the cost is the same as with trained weights). Measured in the same run, on the same images:

  ours    msibench.scoring.score_run: one batched YOLO11x-seg pass per batch of images serves detection,
          matching and masks; every crop of a batch goes through DINO and CLIP in one call; reference features
          come from the on-disk cache; background texts are encoded once. "cold": a fresh cache, so each
          reference feature is computed (once) inside the timing; "warm": the cache filled (the usual case: the
          references are the same for every method's run).
  naive   each metric computed on its own, as separate scripts would: its own detector pass per metric
          (YOLO-Subj, YOLO-L, Z-Acc, DINO-I, CLIP-I), one model call per crop, no batching, reference and text
          features recomputed every time. Its values are checked against ours.
  bound   the FLOP bound: model FLOPs per image (torch's FlopCounterMode on the detector at the letterbox size,
          plus K crops through DINO and CLIP and the whole image through CLIP; ViT attention matmuls added by
          formula, as the counter misses fused attention) divided by this machine's measured float32 matmul rate
          with the same threads; reported as (bound time) / (our warm time), the fraction of the bound reached.

Other processes may share the cores, so the scorers run interleaved, chunk by chunk (--chunk images: ours cold,
ours warm, then --naive-per-chunk of them naive), each chunk preceded by a short matmul-rate measurement.

Usage: python benchmarks/bench_scoring.py [--threads 2] [--limit 100] [--chunk 10] [--naive-per-chunk 2]
           [--batch-size 8] [--detector yolo11x-seg.yaml] [--coco-root ../shared/data/coco2017-mini] [--json-out F]
The issue's targets: ours >= 3x naive, and >= 70 % of the FLOP bound, on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target is stated for 2)")
    p.add_argument("--limit", type=int, default=100, help="multi-subject tasks to score (the track has 100)")
    p.add_argument("--chunk", type=int, default=10, help="images per interleaved chunk (see main)")
    p.add_argument("--naive-per-chunk", type=int, default=2, help="images of each chunk the naive scorer scores")
    p.add_argument("--batch-size", type=int, default=8, help="our scorer's images per batch")
    p.add_argument("--detector", default="yolo11x-seg.yaml", help="YOLO11 architecture yaml (random weights)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--resolution", type=int, default=512, help="paste image size")
    p.add_argument("--coco-root", type=Path, default=REPO.parent / "shared" / "data" / "coco2017-mini")
    p.add_argument("--workdir", type=Path, default=None, help="where the run and cache go (default: a temp dir)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json-out", type=Path, default=None)
    return p.parse_args()


def matmul_gflops(threads: int, device: str, quick: bool = False) -> float:
    """Best float32 matmul rate over a few sizes, in GFLOP/s (``quick``: one size, about a second)."""
    import torch

    best = 0.0
    for n in (2048,) if quick else (1024, 2048, 3072):
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        torch.mm(a, b)
        reps = max(2, int(2e10 / (2 * n**3)))
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return best


def model_flops(fn, *args) -> float:
    """FLOPs counted by torch's FlopCounterMode (convolutions and matmuls; 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # nn.MultiheadAttention's inference fast path is one fused op the counter does not see: take the plain path.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), counter:
            fn(*args)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return float(counter.get_total_flops())


def attention_flops(tokens: int, width: int, layers: int) -> float:
    """The two attention matmuls (QK^T and AV) of a ViT, which run as fused scaled_dot_product_attention kernels
    that FlopCounterMode does not count on CPU: 2 x (2 N^2 D) per layer."""
    return 4.0 * tokens**2 * width * layers


class Timer:
    """Accumulates wall time of wrapped callables (to split our time into detector / encoders / rest)."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed


def naive_scores(task, image, ref_paths, det, seg, dino, clip):
    """Every metric on its own, as separate scripts would compute it (see the module docstring)."""
    from PIL import Image

    from msibench.scoring.identity import cosine, crop
    from msibench.scoring.match import match_targets
    from msibench.scoring.metrics import yolo_l, yolo_subj, z_order_pairs

    boxes = [s.box for s in task.subjects]
    cats = [s.category_id for s in task.subjects]
    out = {}
    # YOLO-Subj script
    dets = det([image])[0]
    res = yolo_subj(Counter(cats), dets.counts())
    out["yolo_subj"] = res.value
    # YOLO-L script
    dets = det([image])[0]
    out["yolo_l"] = yolo_l(match_targets(boxes, cats, dets)).value
    # Z-Acc script
    segs = seg([image])[0]
    matches = match_targets(boxes, cats, segs)
    masks = [segs.mask(m.detection) if m.matched else None for m in matches]
    pairs = z_order_pairs(boxes, [s.z for s in task.subjects], cats, masks, image.size)
    out["z_correct"] = sum(p.correct for p in pairs)
    # DINO-I and CLIP-I scripts: their own detector pass, one call per crop and per reference
    for key, encoder in (("dino_i", dino), ("clip_i", clip.image)):
        dets = det([image])[0]
        matches = match_targets(boxes, cats, dets)
        values = []
        for j, subject in enumerate(task.subjects):
            box = dets.boxes[matches[j].detection] if matches[j].matched else subject.box
            feat = encoder.encode([crop(image, box)])[0]
            with Image.open(ref_paths[j]) as ref:
                ref_feat = encoder.encode([ref.convert("RGB")])[0]
            values.append(cosine(feat, ref_feat))
        out[key] = statistics.fmean(values)
    # CLIP-B script
    out["clip_b"] = cosine(clip.image.encode([image])[0], clip.text.encode([task.background])[0])
    return out


def main() -> None:
    args = parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scoring_"))
    os.environ["MSIBENCH_CACHE"] = str(workdir / "cache")  # a fresh feature cache: reference cost included

    import torch
    from PIL import Image

    from msibench.bench.manifest import load_manifest
    from msibench.bench.prepare import reference_paths
    from msibench.methods.paste import PasteMethod
    from msibench.runner import run_method
    from msibench.scoring.backbones import load_clip, load_dino, load_yolo
    from msibench.scoring.detect import YoloDetector
    from msibench.scoring.score import score_run
    from msibench.scoring.scorer import Scorer, ScorerConfig
    from msibench.scoring.store import load_scores

    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, device {args.device}, workdir {workdir}")

    run_dir = workdir / "paste-run"
    run_method(
        PasteMethod(resolution=args.resolution),
        run_dir=run_dir,
        coco_root=args.coco_root,
        track="multi",
        limit=args.limit,
        progress=False,
    )
    manifest = load_manifest()
    records = sorted((r for r in map(json.loads, open(run_dir / "records.jsonl"))), key=lambda r: r["task_id"])
    n_images = len(records)
    mean_k = statistics.fmean(r["k"] for r in records)
    print(f"{n_images} multi-subject paste images at {args.resolution} px, mean K {mean_k:.2f}")

    config = ScorerConfig(detector=args.detector, dino="random", clip="random", imgsz=args.imgsz,
                          batch_size=args.batch_size)  # fmt: skip
    scorer = Scorer(config, device=args.device)
    t0 = time.perf_counter()
    scorer.setup()
    print(f"models built in {time.perf_counter() - t0:.1f} s")

    # FLOPs per image (K crops through DINO and CLIP, the image through CLIP, the detector pass)
    yolo_flops = model_flops(scorer.detector.model.module, torch.zeros(1, 3, args.imgsz, args.imgsz))
    vit = scorer.dino.module
    dino_flops = model_flops(scorer.dino.forward, torch.zeros(1, 3, 224, 224)) + attention_flops(
        vit.patch_embed.num_patches + vit.num_prefix_tokens, vit.embed_dim, len(vit.blocks)
    )
    visual = scorer.clip.image.module
    clip_flops = model_flops(scorer.clip.image.forward, torch.zeros(1, 3, 224, 224)) + attention_flops(
        visual.grid_size[0] * visual.grid_size[1] + 1, visual.transformer.width, visual.transformer.layers
    )

    def image_flops(rec) -> float:
        return yolo_flops + rec["k"] * (dino_flops + clip_flops) + clip_flops

    flops_per_image = statistics.fmean(image_flops(r) for r in records)
    print(
        f"GFLOPs per forward: detector {yolo_flops / 1e9:.1f}, DINO {dino_flops / 1e9:.2f}, CLIP image "
        f"{clip_flops / 1e9:.2f}; per image {flops_per_image / 1e9:.1f} (mean over the images)"
    )

    # Other processes may share the cores and their load varies, so the three scorers run interleaved, chunk by
    # chunk, each chunk preceded by a matmul-rate measurement: all of them see the same conditions.
    #   cold: our scorer on a fresh feature cache (each chunk's reference features computed, then cached on disk)
    #   warm: our scorer (a new Scorer, same models) on a copy of the run, reading those features from disk
    #   naive: the first --naive-per-chunk images of the chunk
    warm_dir = workdir / "paste-run-warm"
    shutil.copytree(run_dir, warm_dir)
    warm = Scorer(config, detector=scorer.detector, dino=scorer.dino, clip=scorer.clip, device=args.device)
    timer = Timer()
    scorer.detector._run = timer.wrap("detector", scorer.detector._run)  # every batch goes through _run
    scorer.dino.encode = timer.wrap("dino", scorer.dino.encode)
    scorer.clip.image.encode = timer.wrap("clip", scorer.clip.image.encode)
    det_model = load_yolo(args.detector, device=args.device)
    naive_det = YoloDetector(det_model, imgsz=args.imgsz, batch_size=1, channels_last=False)
    dino = load_dino("random", device=args.device, batch_size=1)
    clip = load_clip("random", device=args.device, batch_size=1)

    seconds = Counter()
    warm_parts: Counter[str] = Counter()
    rates, bound_at_moment = [], Counter()
    n_naive, max_diff = 0, 0.0
    for first in range(0, n_images, args.chunk):
        chunk = records[first : first + args.chunk]
        rate = matmul_gflops(args.threads, args.device, quick=True)
        rates.append(rate)
        chunk_flops = sum(image_flops(r) for r in chunk)
        for name, folder, who in (("cold", run_dir, scorer), ("warm", warm_dir, warm)):
            before = Counter(timer.seconds)
            summary = score_run(folder, who, limit=len(chunk), progress=False)
            assert summary.scored == len(chunk) and summary.failed == 0, summary
            seconds[name] += summary.seconds
            bound_at_moment[name] += chunk_flops / (rate * 1e9)
            if name == "warm":
                warm_parts.update(Counter(timer.seconds) - before)
        _, ours = load_scores(warm_dir)
        ours_by_task = {r["task_id"]: r["metrics"] for r in ours}
        start = time.perf_counter()
        for rec in chunk[: args.naive_per_chunk]:
            task = manifest.by_id[rec["task_id"]]
            refs = [reference_paths(s.reference, manifest.sources[s.reference.image_id]).image for s in task.subjects]
            with Image.open(run_dir / rec["image"]) as im:
                image = im.convert("RGB")
            values = naive_scores(task, image, refs, naive_det, naive_det, dino, clip)
            max_diff = max([max_diff] + [abs(v - ours_by_task[task.id][k]) for k, v in values.items()])
            n_naive += 1
        seconds["naive"] += time.perf_counter() - start
        print(
            f"  images {first + len(chunk):>3}/{n_images}: matmul {rate:.0f} GFLOP/s, cold {seconds['cold']:.0f} s, "
            f"warm {seconds['warm']:.0f} s, naive {seconds['naive']:.0f} s ({n_naive} images)",
            flush=True,
        )

    peak = max(rates)
    rate = {
        "cold": n_images / seconds["cold"],
        "warm": n_images / seconds["warm"],
        "naive": n_naive / seconds["naive"],
    }
    bound_s = flops_per_image / (peak * 1e9)
    result = {
        "threads": args.threads,
        "device": args.device,
        "detector": args.detector,
        "batch_size": args.batch_size,
        "images": n_images,
        "naive_images": n_naive,
        "img_per_s": rate,
        "speedup_warm": rate["warm"] / rate["naive"],
        "speedup_cold": rate["cold"] / rate["naive"],
        "gflops_per_image": flops_per_image / 1e9,
        "gflops_detector": yolo_flops / 1e9,
        "gflops_dino": dino_flops / 1e9,
        "gflops_clip_image": clip_flops / 1e9,
        "matmul_gflops_per_chunk": rates,
        "bound_s_per_image_at_peak": bound_s,
        "warm_s_per_image": seconds["warm"] / n_images,
        "fraction_of_bound_at_peak": bound_s * n_images / seconds["warm"],
        "fraction_of_bound_at_the_moment": bound_at_moment["warm"] / seconds["warm"],
        "warm_breakdown_s": dict(warm_parts),
        "max_abs_diff_naive_vs_ours": max_diff,
    }
    print(f"(a) ours, warm cache: {rate['warm']:.3f} img/s   cold cache: {rate['cold']:.3f} img/s", end="")
    print(f"   (warm time: {', '.join(f'{k} {v:.0f} s' for k, v in warm_parts.items())})")
    print(f"(b) naive:            {rate['naive']:.3f} img/s   (max |naive - ours| over its metrics {max_diff:.1e})")
    print(
        f"speedup ours / naive = {result['speedup_warm']:.2f}x warm, {result['speedup_cold']:.2f}x cold "
        f"(target >= 3x)\n(c) FLOP bound {bound_s:.2f} s/img ({flops_per_image / 1e9:.0f} GFLOP at the peak "
        f"{peak:.0f} GFLOP/s) vs ours {result['warm_s_per_image']:.2f} s/img = "
        f"{100 * result['fraction_of_bound_at_peak']:.0f} % of the bound (target >= 70 %); against each chunk's "
        f"own matmul rate: {100 * result['fraction_of_bound_at_the_moment']:.0f} %"
    )
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
