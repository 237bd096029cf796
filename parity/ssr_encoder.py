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

(c) the aligner and the SSR attention on shared random weights, for one subject and for three: the official
    ``Aligner`` with ``AlignerAttnProcessor`` (full size: 768-d queries, 1024-d CLIP levels) and, on a tiny
    SD1.5-shaped UNet (768-d context), the ``SSRAttnProcessor`` set on every cross-attention as
    ``SSR_encoder.__init__`` sets them (scale 0.65), from the vendored diffusers 0.23.1; ours from the official
    state dicts through ``baselines.ssr_encoder_modules.build_ssr_modules`` on current diffusers. Compared: the
    aligned subject tokens, and one UNet forward on the prompt followed by the subjects' tokens (concatenated, as
    ``generate_multi`` does).

Usage (from the repository root)::

    git --git-dir=<bare Xiaojiu-z/SSR_Encoder> archive 7bb5f68 | tar -x -C /tmp/SSR_Encoder
    python parity/ssr_encoder.py --official /tmp/SSR_Encoder --python /work/venvs/parity-old/bin/python

``--official`` is the checkout; its vendored ``diffusers`` (0.23.1) comes first on the official side's path.
Exit 0: every figure within its tolerance (sampler and modules: ``--rel-tolerance``, default 1e-5; the mask:
identical, ``--tolerance`` 0), 1: not, 2: a usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from _side_by_side import REPO_ROOT, Figures, check_official, official_side, parser, run_official  # noqa: E402

OFFICIAL_HELP = "a checkout of Xiaojiu-z/SSR_Encoder (at 7bb5f68): the folder holding ssr_encoder/ and diffusers/"
MARKERS = ["ssr_encoder/attention_processor.py", "ssr_encoder/ssr_encoder.py",
           "diffusers/schedulers/scheduling_unipc_multistep.py"]  # fmt: skip
#: A tiny UNet with SD1.5's block pattern and SD1.5's 768-d text context (the official aligner's query width).
UNET = {
    "block_out_channels": (32, 64), "layers_per_block": 1, "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 4, "norm_num_groups": 8,
}  # fmt: skip
SCALE, LEVELS, PATCHES = 0.65, 6, 257
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
    modules = _official_modules(inputs)
    return {"version": diffusers.__version__, "timesteps": timesteps, "latents": latents, "grid": grid,
            "grid_antialiased": antialiased, **modules}  # fmt: skip


def _official_modules(inputs: dict) -> dict:
    import torch
    from diffusers import UNet2DConditionModel
    from ssr_encoder.ssr_encoder import Aligner, AlignerAttnProcessor, AttnProcessor, SSRAttnProcessor

    torch.manual_seed(0)
    aligner = Aligner()
    aligner.aligner.set_processor(AlignerAttnProcessor(query_dim=768, inner_dim=512, cross_attention_dim=1024))
    unet = UNet2DConditionModel(**UNET)
    unet.load_state_dict(inputs["unet"])
    procs = {}
    for name in unet.attn_processors:  # SSR_encoder.__init__'s loop, for an SD1.5 UNet (no motion modules)
        if name.endswith("attn1.processor"):
            procs[name] = AttnProcessor()
            continue
        if name.startswith("mid_block"):
            hidden = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = unet.config.block_out_channels[int(name[len("down_blocks.")])]
        procs[name] = SSRAttnProcessor(hidden_size=hidden, cross_attention_dim=768, scale=SCALE)
    unet.set_attn_processor(procs)
    layers = torch.nn.ModuleList(unet.attn_processors.values())
    with torch.no_grad():  # every parameter random (the default init leaves LayerNorm at 1 / 0)
        for param in [*aligner.parameters(), *layers.parameters()]:
            param.copy_(torch.randn_like(param) * 0.05)
    out = {"aligner_sd": aligner.state_dict(), "layers_sd": layers.state_dict()}
    with torch.no_grad():
        for n, (text, levels) in inputs["subjects"].items():
            tokens = aligner(text, torch.cat(list(levels), dim=1))  # get_image_embeds: levels on the token axis
            context = torch.cat([inputs["prompt"], tokens.view(1, -1, 768)], dim=1)  # generate_multi
            out[f"tokens_{n}"] = tokens
            out[f"eps_{n}"] = unet(inputs["latent"], torch.tensor([500]), encoder_hidden_states=context).sample
    return out


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.split("\n\n")[0], OFFICIAL_HELP, tolerance=0.0)
    p.add_argument("--rel-tolerance", type=float, default=1e-5, help="largest rel figure, sampler and modules (1e-5)")
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
    from baselines.ssr_encoder_modules import box_masks, build_ssr_modules, mask_on_patch_grid
    from msibench.bench.manifest import load_manifest

    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    boxes = [s.box for task in load_manifest(args.manifest).tasks for s in task.subjects]
    masks = box_masks(boxes, args.resolution)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET).eval()
    g = torch.Generator().manual_seed(2)
    subjects = {}
    for n in (1, 3):
        text = torch.randn(n, 77, 768, generator=g)
        levels = [torch.randn(n, PATCHES, 1024, generator=g) for _ in range(LEVELS)]
        subjects[n] = (text, levels)
    prompt, latent = torch.randn(1, 77, 768, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    inputs = {"noise": noise, "masks": masks, "unet": {k: v.clone() for k, v in unet.state_dict().items()},
              "subjects": subjects, "prompt": prompt, "latent": latent}  # fmt: skip
    official = run_official(__file__, args, inputs)

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
    aligner, processors = build_ssr_modules(unet, official["aligner_sd"], official["layers_sd"])
    for processor in processors.values():
        processor.scale = SCALE
    unet.set_attn_processor({**unet.attn_processors, **processors})
    with torch.no_grad():
        for n, (text, levels) in subjects.items():
            tokens = aligner(text, levels)
            figures.compare(f"(c) aligned subject tokens, {n} subject(s)", tokens, official[f"tokens_{n}"],
                            rel_tolerance=args.rel_tolerance)  # fmt: skip
            context = torch.cat([prompt, tokens.reshape(1, -1, 768)], dim=1)
            eps = unet(latent, torch.tensor([500]), encoder_hidden_states=context).sample
            figures.compare(f"(c) UNet forward with SSR attention, {n} subject(s)", eps, official[f"eps_{n}"],
                            rel_tolerance=args.rel_tolerance)  # fmt: skip
        for processor in processors.values():  # the same forward with the subject attention switched off
            processor.scale = 0.0
        eps_off = unet(latent, torch.tensor([500]), encoder_hidden_states=context).sample
        figures.note(
            f"(c) ours with SSR attention off (scale 0) vs official, {n} subjects", eps_off, official[f"eps_{n}"]
        )
    figures.exit()


if __name__ == "__main__":
    main()
