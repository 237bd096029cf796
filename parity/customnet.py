"""CustomNet: our sampler, app preprocessing, converted networks and the whole app against the official code
(TencentARC/CustomNet@23a378f).

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

(c) the checkpoint conversion at a tiny size: the official ``customnet/openaimodel.py`` ``UNetModel`` (with its
    dual-context ``customnet/attention.py``) and ``ldm/models/autoencoder.py`` ``AutoencoderKL``, built from small
    configs (channels multiples of 32: LDM normalises with ``GroupNorm(32, ·)``) with random weights, and a random
    ``cc_projection`` (``nn.Linear``, as ``LatentDiffusion.__init__`` defines it), under the checkpoint's key
    prefixes; ``mscustomnet.model.convert.convert_customnet_state_dict`` (what ``mscustomnet convert-customnet``
    runs, here with the matching tiny config) maps them onto our modules, which must then compute the same UNet
    noise prediction, VAE posterior mode and decoding, and projection. The DDPM buffers the converter ignores
    are filled so that the converter sees the full key set (``betas`` and ``alphas_cumprod`` from the official
    ``make_beta_schedule``, which the converter checks). ``pytorch_lightning`` and ``taming`` are replaced by empty
    stand-ins (``LightningModule`` = ``nn.Module``): the training framework, not the networks;
(d) the tokenizer: the token ids ldm's ``FrozenCLIPEmbedder.forward`` hands its text model (transformers 4.46.3
    ``CLIPTokenizer``, ``padding="max_length"``, truncation at 77) vs ``mscustomnet.model.network.tokenize``
    (open_clip's BPE, padded with <eot>), on every prompt of the v1 and v2 manifests plus edge cases (case,
    whitespace, punctuation, accents, a prompt over 77 tokens). The official tokenizer files are built from
    open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (OpenAI CLIP's BPE, the merges ``openai/clip-vit-large-patch14``
    ships; no hub here), so what is compared is the two tokenization algorithms on the same BPE.
(e) the CLIP towers after the conversion of (c): the official image tower is OpenAI's ``clip`` package (under
    ``--python``: ``clip-anytorch==2.6.0``, a PyPI fork of openai/CLIP whose image tower code is OpenAI's, and
    ``setuptools<81`` for its ``pkg_resources``): its ``VisionTransformer``, what ``clip.load`` builds and
    ``FrozenCLIPImageEmbedder`` runs (``encode_image`` is ``visual(x)``), at a tiny width with random weights
    under ``cond_stage_model.model.visual.*``; the text tower is ``FrozenCLIPEmbedder``'s transformers
    ``CLIPTextModel`` (``last_hidden_state``) under ``text_encoder.transformer.*``. Ours, converted from those
    keys, must give the same image embeddings (2 random inputs) and text states (3 prompts). Without the package
    the script fails and says what to install.
(f) the app end to end on one single-track task (the first of ``--manifest``): the official ``CustomNet`` model of
    ``configs/config_customnet.yaml`` built by ``instantiate_from_config`` at a tiny width (the app fixes 256 px,
    a 32 x 32 latent and ``cc_projection`` 772 -> 768, so the VAE downsamples 8 times and the cross-attention
    width stays 768), random weights, ``clip.load`` answered by OpenAI clip's ``CLIP`` class at a tiny width (no
    download), ``load_and_preprocess`` with the COCO mask for carvekit, then ``main/app.py`` ``run_generation``
    from its own source (``prepare_data``, CLIP image tower, ``cc_projection``, VAE, text tower, ``DDIMSampler``
    with CFG 3, decoder, truncating uint8 cast; ``seed_everything`` and the sampler's CPU ``randn``) against our
    ``customnet`` method's ``generate`` on the runner's request, its model converted from the official model's
    state dict by ``model_from_checkpoint``. Tolerance: one level (the truncating cast turns a float difference of
    1e-6 at a level boundary into one level); the count of differing values is printed. Stand-ins: carvekit (the
    COCO mask), ``clip.load``'s download, ``pytorch_lightning`` (``LightningModule`` = ``nn.Module``, with the
    ``device`` it would give).

Usage (from the repository root)::

    git --git-dir=<bare TencentARC/CustomNet> archive 23a378f | tar -x -C /tmp/CustomNet
    python -m venv --system-site-packages /work/venvs/parity-old
    /work/venvs/parity-old/bin/pip install transformers==4.46.3 "huggingface_hub<0.26" einops omegaconf kornia==0.7.0 \
        clip-anytorch==2.6.0 "setuptools<81"
    python -m msibench data prepare --manifest v1 --coco-root COCO
    python parity/customnet.py --official /tmp/CustomNet --python /work/venvs/parity-old/bin/python

Exit 0: every figure within its tolerance (the sampler's final latents: ``--rel-tolerance``, default 1e-6, as the
two samplers do float32 arithmetic in another order; the converted networks: ``--network-rel-tolerance``, default
1e-5; the preprocessing: identical, ``--tolerance`` 0), 1: not, 2: a usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from _side_by_side import (  # noqa: E402
    REPO_ROOT,
    Figures,
    check_official,
    clip_bpe_tokenizer,
    official_side,
    parser,
    run_official,
)

OFFICIAL_HELP = "a checkout of TencentARC/CustomNet (at 23a378f): the folder holding customnet/ddim.py and main/app.py"
MARKERS = ["customnet/ddim.py", "main/app.py", "ldm/util.py", "ldm/modules/encoders/modules.py"]
STEPS, GUIDANCE, LATENT = 50, 3.0, (1, 4, 32, 32)
TINY_CONTEXT, TINY_IMAGE_EMBED = 32, 24  # tiny_config's text width and CLIP projection
CLIP_PROMPTS = ["a photo of a dog next to a cat", "", "two people; one's hat (red) & a 3-legged stool"]


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

    names = ("carvekit", "carvekit.api", "carvekit.api.high", "clip", "pytorch_lightning",
             "pytorch_lightning.utilities", "pytorch_lightning.utilities.distributed", "taming", "taming.modules",
             "taming.modules.vqvae", "taming.modules.vqvae.quantize")  # fmt: skip
    for name in names:
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["carvekit.api.high"].HiInterface = None
    sys.modules["pytorch_lightning"].LightningModule = torch.nn.Module
    sys.modules["pytorch_lightning.utilities.distributed"].rank_zero_only = lambda function: function
    sys.modules["taming.modules.vqvae.quantize"].VectorQuantizer2 = None

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
        **_official_networks(inputs["networks"]),
        "end_to_end": _official_end_to_end(inputs["end_to_end"], official),
        "token_ids": _official_token_ids(inputs["tokenizer"], inputs["prompts"]),
        "timesteps": timesteps,
        "latents": latents,
        "squares": torch.stack(squares),
        "canvases": torch.stack(canvases),
        "image_conds": torch.stack(conds),
        "clip_inputs": torch.stack(clip_inputs),
    }


def _official_end_to_end(inputs: dict, official: Path) -> dict:
    """(f) The app end to end: CustomNet (``configs/config_customnet.yaml``'s model at a tiny width, built by
    ``instantiate_from_config``) with random weights, ``load_and_preprocess`` (carvekit replaced by the COCO mask),
    then ``main/app.py`` ``run_generation`` (``prepare_data``, the CLIP image tower, ``cc_projection``, the VAE,
    the text tower, ``DDIMSampler``, the decoder, the uint8 cast) from its own source."""
    import copy
    import math
    import random

    import numpy as np
    import torch
    from customnet.ddim import DDIMSampler
    from einops import rearrange
    from ldm.util import img2tensor, instantiate_from_config, load_and_preprocess
    from omegaconf import OmegaConf
    from PIL import Image

    stub = sys.modules.pop("clip", None)
    try:
        import clip.model as openai_clip
    finally:
        if stub is not None:
            sys.modules["clip"] = stub
    v = inputs["vision"]

    def load(name, device="cpu", jit=False):  # clip.load without the download: the same class at a tiny width
        model = openai_clip.CLIP(inputs["embed_dim"], v["image_size"], v["num_hidden_layers"], v["hidden_size"],
                                 v["patch_size"], 77, 49408, v["hidden_size"], 1, 1)  # fmt: skip
        return model.float(), None

    saved_load, stub.load = stub.load, load
    try:
        torch.manual_seed(0)
        model = instantiate_from_config(OmegaConf.create(inputs["config"])).eval()
    finally:
        stub.load = saved_load
    model.device = torch.device("cpu")  # LightningModule's property, which the nn.Module stand-in lacks
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.05)

    class CPUSampler(DDIMSampler):  # register_buffer moves every buffer to CUDA
        def register_buffer(self, name, attr):
            setattr(self, name, attr)

    def seed_everything(seed):  # pytorch_lightning's, without its environment variable
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    namespace = {"torch": torch, "np": np, "copy": copy, "math": math, "img2tensor": img2tensor,
                 "rearrange": rearrange, "Image": Image, "seed_everything": seed_everything}  # fmt: skip
    namespace["prepare_data"] = _app_function(official, "prepare_data", namespace)
    run_generation = _app_function(official, "run_generation", namespace)
    path, mask_path, (x0, y0, x1, y1), prompt, seed = inputs["task"]
    alpha = np.asarray(Image.open(mask_path).convert("L"))

    def interface(images):  # carvekit's output: RGBA, the object opaque
        return [np.dstack([np.asarray(images[0]), alpha])]

    square = load_and_preprocess(interface, Image.open(path).convert("RGB"))
    image = run_generation(CPUSampler(model), model, "cpu", Image.fromarray(square), x0, y0, x1, y1, 0.0, 0.0,
                           prompt, seed)  # fmt: skip
    return {"checkpoint": model.state_dict(), "image": np.asarray(image)}


def _official_token_ids(folder: str, prompts: list[str]):
    """The ids FrozenCLIPEmbedder.forward gives its text model (a stand-in catches them)."""
    import torch
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    embedder = FrozenCLIPEmbedder(version=folder, device="cpu")
    caught = []

    class Catch(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            caught.append(input_ids)
            return type("Out", (), {"last_hidden_state": torch.zeros(1)})()

    embedder.transformer = Catch()
    embedder.forward(prompts)
    return caught[0]


def _official_networks(inputs: dict) -> dict:
    import numpy as np
    import torch
    from customnet.openaimodel import UNetModel
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.diffusionmodules.util import make_beta_schedule

    torch.manual_seed(0)
    unet = UNetModel(
        image_size=8, in_channels=8, out_channels=4, model_channels=32, attention_resolutions=[1], num_res_blocks=1,
        channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True, transformer_depth=1,
        context_dim=TINY_CONTEXT, use_checkpoint=False, legacy=False,
    ).eval()  # fmt: skip
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}  # fmt: skip
    vae = AutoencoderKL(ddconfig, {"target": "torch.nn.Identity"}, embed_dim=4).eval()
    projection = torch.nn.Linear(TINY_IMAGE_EMBED + 4, TINY_CONTEXT)
    with torch.no_grad():  # every parameter random (the default init leaves norms at 1 / 0, some convs at 0)
        for module in (unet, vae, projection):
            for param in module.parameters():
                param.copy_(torch.randn_like(param) * 0.05)
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    checkpoint.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    checkpoint.update({f"cc_projection.{k}": v for k, v in projection.state_dict().items()})
    betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    checkpoint["betas"] = torch.tensor(betas, dtype=torch.float32)
    checkpoint["alphas_cumprod"] = torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)
    with torch.no_grad():
        # DiffusionWrapper 'hybrid': the concat condition on the channels, context = [image token; text].
        eps = unet(torch.cat([inputs["x"], inputs["layout"]], dim=1), inputs["t"], context=inputs["context"])
        mode = vae.encode(inputs["image"]).mode()
        decoded = vae.decode(inputs["z"])
        projected = projection(inputs["clip_and_view"])
    out = {"checkpoint": checkpoint, "eps": eps, "mode": mode, "decoded": decoded, "projected": projected}
    out.update(_official_clip_towers(inputs, checkpoint))
    return out


def _official_clip_towers(inputs: dict, checkpoint: dict) -> dict:
    """(e) The image tower FrozenCLIPImageEmbedder.encode runs (OpenAI clip's VisionTransformer, what clip.load
    builds for ViT-L/14, here at a tiny width; ``encode_image`` is ``visual(x)``) and the text tower
    FrozenCLIPEmbedder.forward runs (transformers' CLIPTextModel, ``last_hidden_state``), random, under the
    checkpoint's keys."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    stub = sys.modules.pop("clip", None)  # _stub_missing_models' stand-in for sections (a)-(b)
    try:
        import clip.model as openai_clip
    except ImportError as err:
        return {"clip_error": f"OpenAI's clip package does not import under --python: {err}"}
    finally:
        if stub is not None:
            sys.modules["clip"] = stub
    v = inputs["vision"]
    torch.manual_seed(1)
    visual = openai_clip.VisionTransformer(
        input_resolution=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
        layers=v["num_hidden_layers"], heads=v["num_attention_heads"], output_dim=v["projection_dim"],
    ).eval()  # fmt: skip
    text = CLIPTextModel(CLIPTextConfig(**inputs["text"])).eval()
    with torch.no_grad():
        for module in (visual, text):
            for param in module.parameters():
                param.copy_(torch.randn_like(param) * 0.05)
        image_embeds = visual(inputs["clip_pixels"].type(visual.conv1.weight.dtype)).float()
        text_states = text(input_ids=inputs["token_ids"]).last_hidden_state
    checkpoint.update({f"cond_stage_model.model.visual.{k}": t for k, t in visual.state_dict().items()})
    checkpoint.update({f"text_encoder.transformer.{k}": t for k, t in text.state_dict().items()})
    return {"clip_package": openai_clip.__file__, "image_embeds": image_embeds, "text_states": text_states}


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
    p.add_argument(
        "--network-rel-tolerance", type=float, default=1e-5, help="largest rel figure of the converted networks (1e-5)"
    )
    p.add_argument("--manifest", default="v1", help="manifest whose single-track references are compared (v1)")
    args = p.parse_args(argv)
    check_official(args.official, MARKERS, OFFICIAL_HELP)
    if args.side == "official":
        return official_side(args, _official)
    sys.path.insert(0, str(REPO_ROOT))
    import tempfile

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
    networks = _network_inputs()
    inputs["networks"] = networks
    prompts = _prompts()
    with tempfile.TemporaryDirectory() as folder:
        clip_bpe_tokenizer(folder)
        _tiny_text_model(folder)  # FrozenCLIPEmbedder.__init__ loads a text model from the same folder
        inputs.update(tokenizer=folder, prompts=prompts)
        end_to_end, request = _end_to_end_inputs(args.manifest, Path(folder) / "end-to-end-text")
        inputs["end_to_end"] = end_to_end
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
    _compare_networks(figures, networks, official, args.network_rel_tolerance)
    from mscustomnet.model.network import tokenize

    figures.compare(f"(d) token ids, {len(prompts)} prompts", tokenize(prompts), official["token_ids"], tolerance=0.0)
    _compare_end_to_end(figures, official["end_to_end"], request)
    figures.exit()


def _end_to_end_config():
    """configs/config_customnet.yaml's model at a tiny width: the app fixes 256 px, the 32 x 32 latent (a VAE
    that downsamples 8 times) and cc_projection's 772 -> 768, so the cross-attention width stays 768."""
    from dataclasses import replace

    from mscustomnet.model.config import CLIPTextSpec, CLIPVisionSpec, VAEConfig

    base = _tiny_config()
    return replace(
        base, resolution=256,
        unet=replace(base.unet, sample_size=32, cross_attention_dim=768),
        vae=VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32, sample_size=256),
        image_encoder=CLIPVisionSpec(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=1,
                                     image_size=224, patch_size=32, projection_dim=768),
        text_encoder=CLIPTextSpec(hidden_size=768, intermediate_size=64, num_hidden_layers=1, num_attention_heads=12),
    )  # fmt: skip


def _end_to_end_inputs(manifest_name: str, text_folder: Path) -> tuple[dict, object]:
    """The official model config (the yaml's, at _end_to_end_config's sizes), a text model folder for
    FrozenCLIPEmbedder, and the first single-track v1 task as the runner requests it."""
    from dataclasses import asdict

    from transformers import CLIPTextConfig, CLIPTextModel

    from mscustomnet.model.pipeline import app_box
    from msibench.bench.manifest import load_manifest
    from msibench.bench.prepare import reference_paths
    from msibench.runner import _request

    config = _end_to_end_config()
    text_folder.mkdir(parents=True, exist_ok=True)
    clip_bpe_tokenizer(str(text_folder))
    text = asdict(config.text_encoder)
    CLIPTextModel(CLIPTextConfig(**text)).save_pretrained(text_folder)
    unet = {"image_size": 32, "in_channels": 8, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
            "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2, "use_spatial_transformer": True,
            "transformer_depth": 1, "context_dim": 768, "use_checkpoint": False, "legacy": False}  # fmt: skip
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}  # fmt: skip
    model = {"target": "customnet.customnet.CustomNet", "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "log_every_t": 200, "timesteps": 1000,
        "first_stage_key": "image_target", "cond_stage_key": "image_cond", "image_size": 32, "channels": 4,
        "cond_stage_trainable": False, "conditioning_key": "hybrid", "monitor": "val/loss_simple_ema",
        "scale_factor": 0.18215, "use_ema": False, "use_cond_concat": True, "use_bbox_mask": False,
        "use_bg_inpainting": False, "learning_rate_scale": 10, "ucg_training": {"txt": 0.15},
        "unet_config": {"target": "customnet.openaimodel.UNetModel", "params": unet},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": ddconfig,
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPImageEmbedder"},
        "text_encoder_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                "params": {"version": str(text_folder), "device": "cpu"}},
    }}  # fmt: skip
    manifest = load_manifest(manifest_name)
    task = manifest.select("single", limit=1)[0]
    request = _request(task, 0, 0, manifest)
    subject = task.subjects[0]
    paths = reference_paths(subject.reference, manifest.sources[subject.reference.image_id])
    box = app_box(subject.box, 256)
    inputs = {"config": model, "vision": asdict(config.image_encoder), "embed_dim": 768,
              "task": (str(paths.image), str(paths.mask), box, task.prompt, request.seed)}  # fmt: skip
    return inputs, request


def _compare_end_to_end(figures, official: dict, request) -> None:
    """Our customnet method's generate, its model converted from the official random checkpoint."""
    from dataclasses import replace

    import numpy as np

    from baselines.customnet import CustomNetMethod, model_from_checkpoint
    from mscustomnet.model.pipeline import CustomNetPipeline

    method = CustomNetMethod()
    model = model_from_checkpoint(official["checkpoint"], config=_end_to_end_config(), where="the official model")
    method._pipeline = CustomNetPipeline(model)
    import mscustomnet.model.pipeline as pipeline

    floats = []
    to_pil = pipeline.to_pil

    def catch(images):  # our values before the uint8 cast, to show where a differing level comes from
        floats.append(255.0 * ((images.float() + 1.0) / 2.0).clamp(0, 1)[0].permute(1, 2, 0).numpy())
        return to_pil(images)

    pipeline.to_pil = catch
    try:
        ours = np.array(method.generate([request])[0].convert("RGB"))
    finally:
        pipeline.to_pil = to_pil
    theirs = official["image"]
    print(f"(f) app end to end, {request.task.id}, seed {request.seed}, 50 steps, CFG 3, 256 px: our customnet "
          f"generate vs main/app.py run_generation; official image: mean {theirs.mean():.1f}, std "
          f"{theirs.std():.1f} levels")  # fmt: skip
    # One level: the app truncates (astype(uint8)), so a float difference of 1e-6 can cross a level boundary.
    figures.compare("(f) output image (uint8)", ours, theirs, tolerance=1.0)
    differ = ours != theirs
    print(f"(f) values that differ: {int(differ.sum())} of {ours.size}; ours before the cast there: "
          f"{', '.join(f'{v:.6f}' for v in floats[0][differ][:5])} (x 255)")  # fmt: skip
    control = np.array(method.generate([replace(request, seed=request.seed + 1)])[0].convert("RGB"))
    figures.note("(f) control: ours at seed + 1 (must differ)", control, theirs)
    if np.array_equal(control, theirs):
        figures.failed.append("(f) control (identical)")


def _prompts() -> list[str]:
    from msibench.bench.manifest import load_manifest

    prompts = sorted({t.prompt for name in ("v1", "v2") for t in load_manifest(name).tasks})
    return prompts + [
        "", "A DOG   on a\tSofa!!", "a café, naïve résumé", "two people; one's hat (red) & a 3-legged stool...",
        " ".join(["a photo of a dog next to a cat"] * 12),  # over 77 tokens: truncated, <eot> last
    ]  # fmt: skip


def _tiny_text_model(folder: str) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                            vocab_size=49408, max_position_embeddings=77)  # fmt: skip
    CLIPTextModel(config).save_pretrained(folder)


def _tiny_config():
    from dataclasses import replace

    from mscustomnet.model.config import VAEConfig, tiny_config

    base = tiny_config(multi_subject=False)
    vae = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, sample_size=32)
    # OpenAI clip's residual blocks have an MLP 4 times as wide as the tower (ViT-L/14: 1024 -> 4096).
    image_encoder = replace(base.image_encoder, intermediate_size=4 * base.image_encoder.hidden_size)
    return replace(base, unet=replace(base.unet, norm_num_groups=32), vae=vae, image_encoder=image_encoder)


def _network_inputs() -> dict:
    from dataclasses import asdict

    import torch

    from mscustomnet.model.network import tokenize

    config = _tiny_config()
    vision, text = asdict(config.image_encoder), asdict(config.text_encoder)
    size = vision["image_size"]
    g = torch.Generator().manual_seed(3)
    return {
        "vision": vision, "text": text, "clip_pixels": torch.randn(2, 3, size, size, generator=g),
        "clip_prompts": CLIP_PROMPTS, "token_ids": tokenize(CLIP_PROMPTS, text["max_position_embeddings"]),
        "x": torch.randn(1, 4, 8, 8, generator=g), "layout": torch.randn(1, 4, 8, 8, generator=g),
        "t": torch.tensor([500]), "context": torch.randn(1, 78, TINY_CONTEXT, generator=g),
        "image": torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, "z": torch.randn(1, 4, 16, 16, generator=g),
        "clip_and_view": torch.randn(1, 1, TINY_IMAGE_EMBED + 4, generator=g),
    }  # fmt: skip


def _compare_networks(figures, inputs: dict, official: dict, rel_tolerance: float) -> None:
    import torch

    from mscustomnet.model.convert import (
        IGNORED_KEYS,
        OPTIONAL_KEYS,
        convert_customnet_state_dict,
        export_customnet_state_dict,
    )
    from mscustomnet.model.network import CustomNetModel

    config = _tiny_config()
    model = CustomNetModel(config).eval()
    # The official key set: the networks compared from the official side, the CLIP towers (not compared) from our
    # own random model in the official layout, and the ignored DDPM buffers present as the converter requires.
    checkpoint = export_customnet_state_dict(model.state_dict(), config)
    compared = official["checkpoint"]
    if "clip_error" in official:
        print(f"(e) CLIP towers: {official['clip_error']} (pip install clip-anytorch==2.6.0 'setuptools<81')")
        figures.failed.append("(e) OpenAI clip not installed")
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cc_proj", "cond_stage_model.", "text_encoder.")
    prefixes = prefixes if "clip_error" not in official else prefixes[:3]
    ours_keys = {k for k in checkpoint if k.startswith(prefixes) and k not in OPTIONAL_KEYS}
    theirs = {k for k in compared if k.startswith(prefixes)}
    print(f"(c) official UNet/VAE/cc_projection/CLIP keys: {len(theirs)}, the converter's for the same config: "
          f"{len(ours_keys)}, {'the same' if theirs == ours_keys else 'DIFFERENT'}")  # fmt: skip
    if theirs != ours_keys:
        print(f"    only official: {sorted(theirs - ours_keys)[:5]}; only ours: {sorted(ours_keys - theirs)[:5]}")
        figures.failed.append("(c) key sets")
        return
    checkpoint.update(compared)
    for key in IGNORED_KEYS:
        if key not in checkpoint and key not in OPTIONAL_KEYS:
            checkpoint[key] = torch.zeros(1000) if not key.startswith("cond_stage") else torch.zeros(1)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(convert_customnet_state_dict(checkpoint, shapes, config), strict=True)
    with torch.no_grad():
        sample = torch.cat([inputs["x"], inputs["layout"]], dim=1)
        eps = model.unet(sample, inputs["t"], encoder_hidden_states=inputs["context"]).sample
        figures.compare("(c) converted UNet: noise prediction", eps, official["eps"], rel_tolerance=rel_tolerance)
        mode = model.vae.encode(inputs["image"]).latent_dist.mode()
        figures.compare("(c) converted VAE: posterior mode", mode, official["mode"], rel_tolerance=rel_tolerance)
        decoded = model.vae.decode(inputs["z"]).sample
        figures.compare("(c) converted VAE: decoding", decoded, official["decoded"], rel_tolerance=rel_tolerance)
        projection = dict(model.named_modules())[_projection_name(model)]
        figures.compare("(c) converted cc_projection", projection(inputs["clip_and_view"]), official["projected"],
                        rel_tolerance=rel_tolerance)  # fmt: skip
        if "clip_error" in official:
            return
        print(f"(e) official image tower: OpenAI clip's VisionTransformer ({official['clip_package']})")
        image_embeds = model.image_encoder(pixel_values=inputs["clip_pixels"]).image_embeds
        figures.compare("(e) converted CLIP image tower: image embeddings", image_embeds, official["image_embeds"],
                        rel_tolerance=rel_tolerance)  # fmt: skip
        text_states = model.encode_text(inputs["clip_prompts"])
        figures.compare(f"(e) converted CLIP text tower: states of {len(inputs['clip_prompts'])} prompts",
                        text_states, official["text_states"], rel_tolerance=rel_tolerance)  # fmt: skip
        torch.manual_seed(2)
        fresh = CustomNetModel(config).eval()  # control: the same architecture with its own random towers
        unconverted = fresh.image_encoder(pixel_values=inputs["clip_pixels"]).image_embeds
        figures.note(
            "(e) control: unconverted random image tower (must differ)", unconverted, official["image_embeds"]
        )
        if torch.equal(unconverted, official["image_embeds"]):
            figures.failed.append("(e) control (identical)")


def _projection_name(model) -> str:
    from mscustomnet.model.convert import conversion_rules

    rules = conversion_rules(list(model.state_dict()), model.config)
    target = next(r.target for r in rules if r.source == "cc_projection.weight")
    return target.rsplit(".", 1)[0]


if __name__ == "__main__":
    main()
