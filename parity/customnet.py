"""CustomNet: our sampler and app preprocessing against the official code (TencentARC/CustomNet@23a378f).

Compared, on the same inputs:

(a) the DDIM schedule and sampler (``mscustomnet.model.pipeline.ddim_sample``) against the official
    ``customnet/ddim.py`` ``DDIMSampler.sample`` (50 steps, eta 0, ``t_start=-1``, CFG 3.0 with ``cfg_type=0`` as
    ``main/app.py`` calls it) around one stand-in denoiser, from the same noise and layout latent; the official
    sampler runs on CPU (its ``register_buffer`` moves every buffer to CUDA, so a subclass stores them as they are);
(b) the app's conditioning inputs on the single-track references: the reference square (``ldm/util.py``
    ``load_and_preprocess``: thumbnail to 200, ``add_margin`` to 256; the background-removal model is replaced by
    the reference's COCO mask), the canvas and the image condition (``main/app.py`` ``prepare_data``, run from the
    app's source: the app itself imports gradio) and the CLIP input (``FrozenCLIPImageEmbedder.preprocess``, the
    CLIP model replaced by a stand-in: only the preprocessing runs). The app's sliders are integers: both sides get
    the integer box of ``mscustomnet.model.pipeline.app_box``.

Not compared here: the checkpoint conversion (official UNet / VAE / ``cc_projection`` vs ours on one random state
dict); docs/parity.md says so.

Usage (from the repository root)::

    git --git-dir=<bare TencentARC/CustomNet> archive 23a378f | tar -x -C /tmp/CustomNet
    python -m venv --system-site-packages /work/venvs/parity-old
    /work/venvs/parity-old/bin/pip install transformers==4.46.3 "huggingface_hub<0.26" einops omegaconf kornia==0.7.0
    python -m msibench data prepare --manifest v1 --coco-root COCO
    python parity/customnet.py --official /tmp/CustomNet --python /work/venvs/parity-old/bin/python

Exit 0: every figure within its tolerance (the sampler's final latents: ``--rel-tolerance``, default 1e-6, as the
two samplers do float32 arithmetic in another order; the preprocessing: identical, ``--tolerance`` 0), 1: not,
2: a usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from _side_by_side import REPO_ROOT, Figures, check_official, official_side, parser, run_official  # noqa: E402

OFFICIAL_HELP = "a checkout of TencentARC/CustomNet (at 23a378f): the folder holding customnet/ddim.py and main/app.py"
MARKERS = ["customnet/ddim.py", "main/app.py", "ldm/util.py", "ldm/modules/encoders/modules.py"]
STEPS, GUIDANCE, LATENT = 50, 3.0, (1, 4, 32, 32)


def stand_in_eps(x, t, layout):
    """The denoiser both samplers call: smooth in x, different at every timestep, driven by the condition."""
    import torch

    scale = 0.5 + t.to(torch.float32).view(-1, 1, 1, 1) / 2000.0
    return torch.tanh(0.9 * x + layout) * scale + 0.1 * layout


# ------------------------------------------------------------------------------------------ the official side
def _stub_missing_models() -> None:
    """ldm/util.py imports carvekit (background removal) and ldm's encoders import OpenAI's clip at module level;
    neither model runs here (COCO masks replace the first, a stand-in the second), so empty modules stand in."""
    import types

    import torch

    for name in ("carvekit", "carvekit.api", "carvekit.api.high", "clip"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["carvekit.api.high"].HiInterface = None

    def load(name, device="cpu", jit=False):
        model = torch.nn.Module()
        model.transformer = torch.nn.Identity()
        return model, None

    sys.modules["clip"].load = load


def _app_function(official: Path, name: str, namespace: dict):
    """One function of main/app.py, compiled from the app's own source (importing the app starts gradio)."""
    import ast

    source = (official / "main" / "app.py").read_text()
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(official / "main" / "app.py"), "exec"), namespace)
    return namespace[name]


def _official(inputs: dict) -> dict:
    import copy
    import math
    from functools import partial

    import numpy as np
    import torch
    from PIL import Image

    official = Path(sys.path[0])
    _stub_missing_models()
    from customnet.ddim import DDIMSampler
    from ldm.modules.diffusionmodules.util import make_beta_schedule
    from ldm.modules.encoders.modules import FrozenCLIPImageEmbedder
    from ldm.util import img2tensor, load_and_preprocess

    # (a) the sampler, with the LDM schedule as ldm/models/diffusion/ddpm.py register_schedule builds it.
    class StandInModel:
        num_timesteps = 1000
        device = torch.device("cpu")

        def __init__(self):
            betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
            alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
            to_torch = partial(torch.tensor, dtype=torch.float32)
            self.betas = to_torch(betas)
            self.alphas_cumprod = to_torch(alphas_cumprod)
            self.alphas_cumprod_prev = to_torch(np.append(1.0, alphas_cumprod[:-1]))

        def apply_model(self, x, t, c):
            return stand_in_eps(x, t, c["c_concat"][0])

    class CPUSampler(DDIMSampler):
        def register_buffer(self, name, attr):
            setattr(self, name, attr)

    sampler = CPUSampler(StandInModel())
    layout = inputs["layout"]
    cond = {"c_concat": [layout], "c_crossattn": []}
    uc = {"c_concat": [torch.zeros_like(layout)], "c_crossattn": []}
    latents, _ = sampler.sample(
        S=STEPS, batch_size=1, shape=list(LATENT[1:]), verbose=False, unconditional_guidance_scale=999,
        conditioning=cond, unconditional_conditioning=uc, cfg_type=0,
        cfg_scale_dict={"img": 0.0, "text": 0.0, "all": GUIDANCE}, x_T=inputs["noise"],
    )  # fmt: skip
    timesteps = np.flip(sampler.ddim_timesteps[:-1]).tolist()  # ddim_sampling's t_start=-1

    # (b) the app's inputs.
    prepare_data = _app_function(official, "prepare_data", {"img2tensor": img2tensor, "torch": torch, "np": np,
                                                          "copy": copy, "math": math})  # fmt: skip
    clip = FrozenCLIPImageEmbedder()
    squares, canvases, conds, clip_inputs = [], [], [], []
    for path, mask_path, (x0, y0, x1, y1) in inputs["references"]:
        image = Image.open(path).convert("RGB")
        alpha = np.asarray(Image.open(mask_path).convert("L"))

        def interface(images, alpha=alpha):  # carvekit's output: RGBA, the object opaque
            return [np.dstack([np.asarray(images[0]), alpha])]

        square = load_and_preprocess(interface, image)
        batch = prepare_data("cpu", Image.fromarray(square), x0, y0, x1, y1, 0.0, 0.0, "a prompt")
        squares.append(torch.from_numpy(square))
        canvases.append(batch["image_location"][0])
        conds.append(batch["image_cond"][0])
        clip_inputs.append(clip.preprocess(batch["image_cond"])[0])
    return {
        "timesteps": timesteps,
        "latents": latents,
        "squares": torch.stack(squares),
        "canvases": torch.stack(canvases),
        "image_conds": torch.stack(conds),
        "clip_inputs": torch.stack(clip_inputs),
    }


# ---------------------------------------------------------------------------------------------- our side
class _StandInNetwork:
    """What ``ddim_sample`` asks of a CustomNetModel, around :func:`stand_in_eps`; the schedule is our model's."""

    def __init__(self):
        import torch

        from mscustomnet.model.config import ModelConfig

        self.config = ModelConfig()
        self.device = torch.device("cpu")

    def alphas_cumprod(self, device=None):
        from mscustomnet.model.network import CustomNetModel

        return CustomNetModel.alphas_cumprod(self, device)

    def encode_text(self, prompts):
        import torch

        return torch.zeros(len(prompts), 1, 1)

    def predict_noise(self, x, t, layout_latents, subject_tokens, text_embeds, subject_mask):
        return stand_in_eps(x, t, layout_latents)


def _clip_input(square):
    """The pixels our CustomNetModel.encode_images hands its CLIP tower, caught by a stand-in tower."""
    from types import SimpleNamespace

    import torch

    from mscustomnet.model.network import CustomNetModel
    from mscustomnet.model.pipeline import to_tensor

    seen = []

    class Tower(torch.nn.Module):
        visual_projection = torch.nn.Linear(1, 1)

        def forward(self, pixel_values):
            seen.append(pixel_values)
            return SimpleNamespace(image_embeds=None)

    me = SimpleNamespace(image_encoder=Tower(), device=torch.device("cpu"),
                         config=SimpleNamespace(image_encoder=SimpleNamespace(image_size=224)))  # fmt: skip
    CustomNetModel.encode_images(me, to_tensor(square)[None])
    return seen[0][0]


def _single_track_references(manifest_name: str) -> list:
    from msibench.bench.manifest import load_manifest
    from msibench.bench.prepare import reference_paths

    manifest = load_manifest(manifest_name)
    out = []
    for task in manifest.select("single"):
        subject = task.subjects[0]
        paths = reference_paths(subject.reference, manifest.sources[subject.reference.image_id])
        if not paths.image.exists():
            raise SystemExit(f"{paths.image}: missing; run `python -m msibench data prepare --manifest "
                             f"{manifest_name}` first")  # fmt: skip
        out.append((str(paths.image), str(paths.mask), tuple(subject.box)))
    return out


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.split("\n\n")[0], OFFICIAL_HELP, tolerance=0.0)
    p.add_argument("--rel-tolerance", type=float, default=1e-6, help="largest rel figure of the sampler (1e-6)")
    p.add_argument("--manifest", default="v1", help="manifest whose single-track references are compared (v1)")
    args = p.parse_args(argv)
    check_official(args.official, MARKERS, OFFICIAL_HELP)
    if args.side == "official":
        return official_side(args, _official)
    sys.path.insert(0, str(REPO_ROOT))
    import numpy as np
    import torch
    from PIL import Image

    from mscustomnet.model.pipeline import (
        Conditioning,
        app_box,
        app_canvas,
        ddim_sample,
        ddim_timesteps,
        prepare_reference,
        to_tensor,
    )

    generator = torch.Generator().manual_seed(0)
    noise, layout = torch.randn(LATENT, generator=generator), torch.randn(LATENT, generator=generator)
    references = _single_track_references(args.manifest)
    boxes = [app_box(box, 256) for *_, box in references]
    inputs = {"noise": noise, "layout": layout,
              "references": [(img, msk, b) for (img, msk, _), b in zip(references, boxes, strict=True)]}  # fmt: skip
    official = run_official(__file__, args, inputs)

    figures = Figures(args.tolerance)
    ours_t = ddim_timesteps(STEPS)
    print(f"(a) schedule: ours {len(ours_t)} timesteps {ours_t[0]} ... {ours_t[-1]}, official "
          f"{len(official['timesteps'])} timesteps {official['timesteps'][0]} ... {official['timesteps'][-1]}: "
          f"{'identical' if ours_t == official['timesteps'] else 'DIFFERENT'}")  # fmt: skip
    if ours_t != official["timesteps"]:
        figures.failed.append("schedule")
    cond = Conditioning(layout_latents=layout, subject_tokens=torch.zeros(1, 1, 1),
                        subject_mask=torch.ones(1, 1, dtype=torch.bool), text_embeds=torch.zeros(1, 1, 1))  # fmt: skip
    ours_latents = ddim_sample(_StandInNetwork(), cond, noise, steps=STEPS, guidance=GUIDANCE)
    figures.compare("(a) DDIM final latents, stand-in denoiser, CFG 3", ours_latents, official["latents"],
                    rel_tolerance=args.rel_tolerance)  # fmt: skip
    full_grid = ddim_sample(_StandInNetwork(), cond, noise, steps=STEPS, guidance=GUIDANCE, schedule="all-steps")
    figures.note("(a) -M schedule=all-steps (the former full grid) vs official", full_grid, official["latents"])
    squares, canvases, conds, clip_inputs = [], [], [], []
    for (img, msk, box), _ in zip(references, boxes, strict=True):
        square = prepare_reference(Image.open(img).convert("RGB"), Image.open(msk).convert("L"))
        squares.append(torch.from_numpy(np.asarray(square).copy()))
        canvases.append(app_canvas(square, box, 256))
        conds.append(to_tensor(square))
        clip_inputs.append(_clip_input(square))
    n = len(references)
    figures.compare(f"(b) reference square (uint8), {n} single-track references", torch.stack(squares),
                    official["squares"], tolerance=0.0)  # fmt: skip
    figures.compare("(b) canvas (image_location)", torch.stack(canvases), official["canvases"], tolerance=0.0)
    figures.compare("(b) image condition (image_cond)", torch.stack(conds), official["image_conds"], tolerance=0.0)
    figures.compare("(b) CLIP input", torch.stack(clip_inputs), official["clip_inputs"], tolerance=0.0)
    figures.exit()


if __name__ == "__main__":
    main()
