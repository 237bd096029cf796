"""MS-CustomNet training throughput (samples/s) and peak memory, variants against a baseline in the same run.

Two harnesses, both on real MSI samples (a small build of ../shared/data/coco2017-mini val2017, made here):

- ``--harness loop`` (default for the tiny size): the whole ``mscustomnet.train.train`` loop (data loading, steps,
  logging, the final checkpoint), one subprocess per variant so that each gets its own peak RSS;
- ``--harness step`` (always for ``--full``): the loop's :class:`TrainStep` on micro-batches loaded beforehand
  (model and optimiser only, no data loading), the variants in one process; peak memory is CUDA's peak allocated
  (reset per variant) or, on CPU, the process peak RSS (monotonic, so only the first variant's is its own).

Variants: fp32 without gradient checkpointing (the baseline), fp32 + checkpointing, bf16 autocast, fp16 autocast +
GradScaler (with checkpointing, the paper's setting). ``--full``: the full-size network (SD1.5-size UNet, SD VAE,
CLIP ViT-L/14 towers; random weights) at 256 x 256, per-GPU batch 2, 5 subjects per sample (K_max), as trained on
2 x V100; it needs a GPU (about 16 GiB before activations).

    python benchmarks/bench_mscustomnet_train.py                       # tiny, CPU, loop harness
    python benchmarks/bench_mscustomnet_train.py --harness step        # tiny, CPU, step harness
    python benchmarks/bench_mscustomnet_train.py --full --device cuda  # full size, fp16 at 256^2, batch 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco2017-mini"
VARIANTS = {  # name: (mixed_precision, gradient checkpointing)
    "fp32": ("no", False),
    "fp32+ckpt": ("no", True),
    "bf16+ckpt": ("bf16", True),
    "fp16+ckpt": ("fp16", True),
}
BASELINE = "fp32"


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _build_msi(out: Path) -> Path:
    from mscustomnet.data.build import BuildConfig, build_msi

    if not (out / "manifest.jsonl").is_file():
        # Default pools: a scene never gets the same reference twice, and pools of 2 would leave few scenes.
        build_msi(BuildConfig(coco_root=COCO, split="val2017", out=out, alpha=8), progress=False)
    return out


def _config(msi: Path, init: Path, resolution: int, batch: int, variant: str, steps: int, k: int):
    from mscustomnet.train.config import config_from_dict

    precision, checkpointing = VARIANTS[variant]
    return config_from_dict(
        {
            "data": {"msi": str(msi), "resolution": resolution, "reference_resolution": min(resolution, 256),
                     "reference_object_size": min(resolution, 256) * 200 // 256, "workers": 0},
            "model": {"init": str(init), "category_dim": 16 if resolution < 256 else 768},
            "train": {"stages": [{"epochs": 1000, "lr": 1e-4}], "effective_batch": batch, "per_gpu_batch": batch,
                      "mixed_precision": precision, "grad_checkpointing": checkpointing, "max_steps": steps,
                      "checkpoint_every": None},
            "curriculum": {"enabled": False, "k_min": 1, "k_max": k},
            "samples": {"every": None},
        },
        source=f"benchmark {variant}",
    )  # fmt: skip


def _tiny_init(folder: Path) -> Path:
    import torch

    from mscustomnet.model.config import tiny_config
    from mscustomnet.model.io import save_model
    from mscustomnet.model.network import CustomNetModel

    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        save_model(CustomNetModel(tiny_config(multi_subject=False)), folder)
    return folder


def run_loop_variant(work: Path, variant: str, steps: int, batch: int, threads: int) -> dict:
    """One variant of the whole training loop in this process (called in a subprocess by :func:`main`)."""
    import torch

    from mscustomnet.train.logger import read_log
    from mscustomnet.train.trainer import train

    torch.set_num_threads(threads)
    msi, init = _build_msi(work / "msi"), _tiny_init(work / "tiny_customnet")
    config = _config(msi, init, 32, batch, variant, steps, k=5)
    out = Path(tempfile.mkdtemp(dir=work, prefix=f"run-{variant}-"))
    start = time.perf_counter()
    result = train(config, out)
    wall = time.perf_counter() - start
    rows = read_log(out / "log.csv")[1:]  # the first step warms up
    step_time = sum(r["time_s"] for r in rows)
    return {"variant": variant, "steps": result.global_step, "samples_per_s": batch * len(rows) / step_time,
            "wall_s": wall, "peak_gib": _rss_gib(), "memory": "process peak RSS"}  # fmt: skip


def run_step_harness(work: Path, full: bool, device: str, steps: int, batch: int, threads: int) -> list[dict]:
    import torch

    from mscustomnet.data.dataset import MSIDataset, collate_msi
    from mscustomnet.model.config import customnet_config, tiny_config
    from mscustomnet.model.network import CustomNetModel
    from mscustomnet.train.distributed import DistEnv
    from mscustomnet.train.trainer import TrainStep, check_sdpa_attention

    torch.set_num_threads(threads)
    dev = torch.device(device)
    resolution = 256 if full else 32
    msi = _build_msi(work / "msi")
    torch.manual_seed(0)
    start = time.perf_counter()
    customnet = CustomNetModel(customnet_config() if full else tiny_config(multi_subject=False))
    model = CustomNetModel.from_customnet(customnet, category_dim=768 if full else 16).to(dev)
    del customnet
    check_sdpa_attention(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"model: {n_all / 1e6:.1f} M parameters, {n_train / 1e6:.1f} M trained; built in "
          f"{time.perf_counter() - start:.1f} s on {dev}")  # fmt: skip
    ref = min(resolution, 256)
    dataset = MSIDataset(
        msi, resolution=resolution, reference_resolution=ref, reference_object_size=ref * 200 // 256,
        curriculum=False, k_min=1, k_max=5,
    )  # fmt: skip
    micro = [collate_msi([dataset[(i * batch + b) % len(dataset)] for b in range(batch)]) for i in range(steps + 1)]
    results = []
    for variant, (precision, checkpointing) in VARIANTS.items():
        if dev.type == "cpu" and precision == "fp16" and full:
            continue  # fp16 on CPU at full size says nothing about the GPU setting
        config = _config(msi, work, resolution, batch, variant, steps, k=5)
        model.unet.disable_gradient_checkpointing()
        if checkpointing:
            model.unet.enable_gradient_checkpointing()
        model.train()
        step = TrainStep(model, config, dev, DistEnv(), grad_accum=1)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        step([micro[0]], 0)  # warm-up (also allocates the AdamW state)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(steps):
            step([micro[i + 1]], i + 1)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if dev.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(dev) / 2**30, "CUDA peak allocated"
        else:
            peak, kind = _rss_gib(), "process peak RSS (cumulative)"
        results.append({"variant": variant, "steps": steps, "samples_per_s": steps * batch / elapsed,
                        "wall_s": elapsed, "peak_gib": peak, "memory": kind})  # fmt: skip
        print(f"  {variant:10s} {results[-1]['samples_per_s']:8.2f} samples/s  peak {peak:7.2f} GiB", flush=True)
        del step
        model.zero_grad(set_to_none=True)
    return results


def _report(results: list[dict], title: str) -> None:
    base = next((r for r in results if r["variant"] == BASELINE), results[0])
    print(f"\n{title}")
    print(f"{'variant':12s} {'samples/s':>10s} {'x base':>7s} {'peak GiB':>9s} {'x base':>7s}  memory")
    for r in results:
        print(f"{r['variant']:12s} {r['samples_per_s']:10.2f} {r['samples_per_s'] / base['samples_per_s']:7.2f} "
              f"{r['peak_gib']:9.2f} {r['peak_gib'] / base['peak_gib']:7.2f}  {r['memory']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full-size network, 256 px, batch 2 (GPU)")
    parser.add_argument("--harness", choices=["loop", "step"], default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # loop subprocess
    args = parser.parse_args()
    harness = "step" if args.full else (args.harness or "loop")
    steps = args.steps or (5 if args.full else 10)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_mscustomnet_train_"))
    work.mkdir(parents=True, exist_ok=True)
    if not COCO.is_dir():
        sys.exit(f"coco2017-mini not found at {COCO}")
    if args.variant:  # child of the loop harness: one JSON line
        print(json.dumps(run_loop_variant(work, args.variant, steps, args.batch, args.threads)))
        return
    if harness == "step":
        title = (f"{'full-size' if args.full else 'tiny'} MS-CustomNet, step harness, {256 if args.full else 32} px, "
                 f"batch {args.batch}, K=5, {args.device}, {args.threads} CPU thread(s)")  # fmt: skip
        _report(run_step_harness(work, args.full, args.device, steps, args.batch, args.threads), title)
        return
    if args.device != "cpu":
        sys.exit("the loop harness runs the tiny model on the CPU; use --harness step for a GPU")
    _build_msi(work / "msi")
    _tiny_init(work / "tiny_customnet")
    results = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--work", str(work), "--steps", str(steps),
               "--batch", str(args.batch), "--threads", str(args.threads)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  {variant:10s} {results[-1]['samples_per_s']:8.2f} samples/s  peak {results[-1]['peak_gib']:.2f} GiB",
              flush=True)  # fmt: skip
    _report(results, f"tiny MS-CustomNet, whole training loop, 32 px, batch {args.batch}, K=5, CPU, "
                     f"{args.threads} thread(s), {steps} steps after 1 warm-up")  # fmt: skip


if __name__ == "__main__":
    main()
