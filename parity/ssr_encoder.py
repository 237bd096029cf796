"""SSR-Encoder: our sampler and mask query against the official code (Xiaojiu-z/SSR_Encoder@7bb5f68).

Compared, on the same inputs:

(a) UniPC: ours (current diffusers' ``UniPCMultistepScheduler`` from the SD1.5 scheduler config with
    ``final_sigmas_type="sigma_min"``, ``baselines.ssr_encoder.UNIPC_OFFICIAL``) against the diffusers 0.23.1 copy
    vendored in the official repository (``diffusers/schedulers/scheduling_unipc_multistep.py``), 30 steps as
    ``infer_text.py``, around one stand-in denoiser from the same noise; current diffusers' default (ending at
    σ = 0) is printed for information;
(b) the box mask on the 16 x 16 patch grid: ``baselines.ssr_encoder_modules.mask_on_patch_grid`` against what the
    official code does with a mask image (``ssr_encoder.py`` ``get_image_embeds_mask``: ``> 0.5``;
    ``attention_processor.py`` ``get_attention_scores_mask``: ``transforms.Resize([16, 16])``, first channel) with
    torchvision's ``Resize`` called as torchvision <= 0.16 did on tensors (no antialias), on the boxes of every
    subject of the manifest. ``get_attention_scores_mask`` itself hard-codes CUDA, so the script calls the
    torchvision transform it applies; the antialiased variant (torchvision >= 0.17) is printed for information.

Not compared here: the aligner and SSR attention modules on shared random weights (one and many subjects);
docs/parity.md says so.

Usage (from the repository root)::

    git --git-dir=<bare Xiaojiu-z/SSR_Encoder> archive 7bb5f68 | tar -x -C /tmp/SSR_Encoder
    python parity/ssr_encoder.py --official /tmp/SSR_Encoder --python /work/venvs/parity-old/bin/python

``--official`` is the checkout; its vendored ``diffusers`` (0.23.1) comes first on the official side's path.
Exit 0: every figure within its tolerance (the sampler: ``--rel-tolerance``, default 1e-6; the mask: identical,
``--tolerance`` 0), 1: not, 2: a usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from _side_by_side import REPO_ROOT, Figures, check_official, official_side, parser, run_official  # noqa: E402

OFFICIAL_HELP = "a checkout of Xiaojiu-z/SSR_Encoder (at 7bb5f68): the folder holding ssr_encoder/ and diffusers/"
MARKERS = ["ssr_encoder/attention_processor.py", "diffusers/schedulers/scheduling_unipc_multistep.py"]
STEPS, LATENT, GRID = 30, (1, 4, 64, 64), 16
#: stable-diffusion-v1-5 scheduler/scheduler_config.json (what infer_text.py builds UniPC from).
SD15_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
}  # fmt: skip


def stand_in_eps(x, t):
    import torch

    return torch.tanh(0.9 * x) * (0.5 + float(t) / 2000.0) + 0.05 * x


def sample(scheduler, noise):
    """The pipeline's denoising loop (scale_model_input, predict, step) around :func:`stand_in_eps`."""
    scheduler.set_timesteps(STEPS)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(stand_in_eps(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return [int(t) for t in scheduler.timesteps], x


def _official(inputs: dict) -> dict:
    import diffusers
    import torch
    from torchvision import transforms

    if not diffusers.__file__.startswith(sys.path[0]):
        raise SystemExit(f"diffusers came from {diffusers.__file__}, not the official checkout's vendored copy")
    from diffusers import UniPCMultistepScheduler

    timesteps, latents = sample(UniPCMultistepScheduler.from_config(SD15_SCHEDULER), inputs["noise"])
    masks = inputs["masks"]
    binary = torch.where(masks > 0.5, torch.ones_like(masks), torch.zeros_like(masks))
    grid = transforms.Resize([GRID, GRID], antialias=False)(binary)[:, 0:1].reshape(len(masks), -1)
    antialiased = transforms.Resize([GRID, GRID], antialias=True)(binary)[:, 0:1].reshape(len(masks), -1)
    return {"version": diffusers.__version__, "timesteps": timesteps, "latents": latents, "grid": grid,
            "grid_antialiased": antialiased}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.split("\n\n")[0], OFFICIAL_HELP, tolerance=0.0)
    p.add_argument("--rel-tolerance", type=float, default=1e-6, help="largest rel figure of the sampler (1e-6)")
    p.add_argument("--manifest", default="v1", help="manifest whose boxes make the masks (default v1)")
    p.add_argument("--resolution", type=int, default=512, help="canvas the boxes are rasterised at (512)")
    args = p.parse_args(argv)
    check_official(args.official, MARKERS, OFFICIAL_HELP)
    if args.side == "official":
        return official_side(args, _official)
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    from baselines.sd15 import scheduler_from_config
    from baselines.ssr_encoder import UNIPC_OFFICIAL
    from baselines.ssr_encoder_modules import box_masks, mask_on_patch_grid
    from msibench.bench.manifest import load_manifest

    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    boxes = [s.box for task in load_manifest(args.manifest).tasks for s in task.subjects]
    masks = box_masks(boxes, args.resolution)
    official = run_official(__file__, args, {"noise": noise, "masks": masks})

    figures = Figures(args.tolerance)
    timesteps, latents = sample(scheduler_from_config("unipc", SD15_SCHEDULER, **UNIPC_OFFICIAL), noise)
    same = timesteps == official["timesteps"]
    print(f"(a) UniPC timesteps: ours {len(timesteps)} ({timesteps[0]} ... {timesteps[-1]}) vs vendored diffusers "
          f"{official['version']}: {'identical' if same else 'DIFFERENT'}")  # fmt: skip
    if not same:
        figures.failed.append("UniPC timesteps")
    figures.compare("(a) UniPC final latents (sigma_min ending), stand-in denoiser", latents, official["latents"],
                    rel_tolerance=args.rel_tolerance)  # fmt: skip
    _, default = sample(scheduler_from_config("unipc", SD15_SCHEDULER), noise)
    figures.note("(a) current diffusers' default UniPC (ends at sigma 0) vs official", default, official["latents"])
    ours_grid = mask_on_patch_grid(masks, GRID)
    figures.compare(f"(b) mask on the {GRID}x{GRID} patch grid, {len(boxes)} boxes at {args.resolution} px",
                    ours_grid, official["grid"])  # fmt: skip
    figures.note("(b) torchvision Resize with antialias (torchvision >= 0.17) vs ours", official["grid_antialiased"],
                 ours_grid)  # fmt: skip
    figures.exit()


if __name__ == "__main__":
    main()
