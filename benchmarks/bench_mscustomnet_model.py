"""Full-size (or tiny) MS-CustomNet on random weights: does it run, how fast, how much memory.

Prints, in one run on one device:
- the time of one training step (``training_loss`` forward + backward) at the given batch;
- the time of one guided DDIM step with the CFG pair batched (one UNet call on 2B) against two UNet calls on B,
  as a ratio (what ``ddim_sample`` does vs the naive loop);
- peak memory (CUDA: torch peak allocated; CPU: process max RSS).

    python benchmarks/bench_mscustomnet_model.py --size full --batch 1 --device cpu
    python benchmarks/bench_mscustomnet_model.py --size full --batch 8 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from mscustomnet.model.config import mscustomnet_config, tiny_config
from mscustomnet.model.network import CustomNetModel


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = tiny_config() if args.size == "tiny" else mscustomnet_config()
    start = time.perf_counter()
    model = CustomNetModel(config).to(args.device)
    print(f"build {args.size} model: {time.perf_counter() - start:.1f} s, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")  # fmt: skip
    res, b, k = config.resolution, args.batch, args.subjects
    batch = {
        "image": torch.rand(b, 3, res, res) * 2 - 1,
        "layout": torch.rand(b, 3, res, res) * 2 - 1,
        "references": torch.rand(b, k, 3, 256, 256) * 2 - 1,
        "text": ["a photo of a dog next to a bowl"] * b,
        "categories": torch.randint(0, 80, (b, k)),
    }
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device_type=torch.device(args.device).type, dtype=dtype, enabled=dtype != torch.float32)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = model.training_loss(batch, generator=torch.Generator().manual_seed(0)).loss
        loss.backward()

    model.train()
    step = _timed(train_step, args.device, args.repeats)
    print(f"training step (B={b}, K={k}, {res}px, {args.dtype}): {step:.3f} s")
    model.zero_grad(set_to_none=True)
    model.eval()

    h = model.latent_size
    z = torch.randn(b, 4, h, h, device=args.device)
    tokens = torch.randn(b, k, config.unet.cross_attention_dim, device=args.device)
    mask = torch.ones(b, k, dtype=torch.bool, device=args.device)
    text = model.encode_text(batch["text"])
    t = torch.full((b,), 500, device=args.device)

    @torch.no_grad()
    def batched() -> None:
        with autocast:
            model.predict_noise(
                torch.cat([z, z]), torch.cat([t, t]), torch.cat([z, z]), torch.cat([tokens, tokens]),
                torch.cat([text, text]), torch.cat([mask, ~mask]),
            )  # fmt: skip

    @torch.no_grad()
    def sequential() -> None:
        with autocast:
            model.predict_noise(z, t, z, tokens, text, mask)
            model.predict_noise(z, t, z, tokens, text, ~mask)

    seq, bat = _timed(sequential, args.device, args.repeats), _timed(batched, args.device, args.repeats)
    print(f"guided DDIM step: sequential {seq:.3f} s, batched {bat:.3f} s, batched/sequential = {bat / seq:.2f}")
    if args.device.startswith("cuda"):
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    else:
        print(f"peak process RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
