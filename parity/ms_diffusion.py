"""Parity of ``ms-diffusion`` with the official MS-Diffusion code, on the same random weights.

The official code (MS-Diffusion/MS-Diffusion@74eb2d6d96669a8be9e786410de445ea41c187c0) pins diffusers 0.23.1 and
transformers 4.35.2, which cannot share a process with msibench's diffusers 0.42: this script runs it in its own
environment, as a second process, and compares what both sides write.

    # 1. the official code, from a checkout or an archive of the repository (never copied into msibench)
    git --git-dir=/path/to/MS-Diffusion.git archive HEAD msdiffusion | tar x -C /tmp/msdiff-official
    # 2. its environment: torch from the system, the official pins on top
    python -m venv --system-site-packages /work/venvs/msdiff
    /work/venvs/msdiff/bin/pip install diffusers==0.23.1 transformers==4.35.2 "huggingface_hub<0.26" \\
        accelerate==0.23.0 einops
    # 3. from the msibench repository root
    python parity/ms_diffusion.py --official /tmp/msdiff-official --official-python /work/venvs/msdiff/bin/python

Both sides load the same folders, written here with random weights (``baselines.ms_diffusion_random``, tiny size:
SDXL-shaped UNet, VAE and two text encoders, a CLIP vision tower, ``ms_adapter.bin`` under the official keys): the
official side exactly as ``inference.py`` does (``StableDiffusionXLPipeline.from_pretrained``, ``Resampler``,
``MSAdapter(ckpt_path=...)``), ours through ``MSDiffusionMethod.setup``. Compared, in float32 on the CPU:

- processor order: the official ``ModuleList(unet.attn_processors.values())`` names vs ours (the key mapping);
- preprocessing: ``CLIPImageProcessor()`` of transformers 4.35 on the 512 px resized references vs ours;
- resampler: the same image tokens, phrase embeddings and boxes through both;
- one subject cross-attention processor, and the whole UNet with all processors (boxes of 2 subjects, CFG batch);
- sampler: the Euler timesteps and sigmas for the step count;
- end to end: ``MSAdapter.generate`` (with the script's phrase / end-of-text indices) vs ``MSDiffusionMethod``,
  same prompt, references, boxes, seed (CPU generator), decoded images before quantisation.

It prints, per comparison, max |ours - official| and rel = ||ours - official|| / ||official|| (as docs/parity.md)
and exits 1 when any rel exceeds --tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = (("dog", (0.05, 0.2, 0.5, 0.9)), ("cat", (0.55, 0.3, 0.95, 0.85)))
PROMPT = "a dog and a cat on the beach"
SEED = 0
UNET_PROCESSOR = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", type=Path, help="folder holding the official msdiffusion/ package")
    p.add_argument("--official-python", default=sys.executable, help="python of the official environment")
    p.add_argument("--work", type=Path, default=None, help="folder for the weights and tensors (default: a temp dir)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--side", choices=("ours", "official"), default="ours", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def references():
    """Two coloured shapes on white, of different sizes (the resize to 512 and the CLIP crop both matter)."""
    from PIL import Image, ImageDraw

    out = []
    for i, (w, h) in enumerate(((300, 180), (140, 260))):
        image = Image.new("RGB", (w, h), (255, 255, 255))
        ImageDraw.Draw(image).ellipse((5, 10, w - 7, h - 3), fill=(200 - 90 * i, 40 + 60 * i, 30 + 150 * i))
        out.append(image)
    return out


# ------------------------------------------------------------------------------------------------ official side


def _text_model(cls, folder: Path):
    """A CLIP text model of transformers 4.35 from a folder transformers 5 saved: 5 writes ``CLIPTextModel``'s keys
    without the ``text_model.`` prefix, which 4.35 would skip silently (leaving random weights)."""
    from safetensors.torch import load_file

    model = cls(cls.config_class.from_pretrained(str(folder)))
    state = load_file(str(folder / "model.safetensors"))
    expected = set(model.state_dict())
    state = {k if k in expected else f"text_model.{k}": v for k, v in state.items()}
    model.load_state_dict(state, strict=False)
    missing = expected - set(state) - {"text_model.embeddings.position_ids"}
    if missing or set(state) - expected:
        raise RuntimeError(f"{folder}: keys do not match {cls.__name__}: {sorted(missing)[:3]}")
    return model.eval()


def official_side(work: Path, official: Path, steps: int) -> None:
    """Runs in the official environment: imports only the official code, diffusers 0.23 and transformers 4.35."""
    import torch

    sys.path.insert(0, str(official))
    from diffusers import StableDiffusionXLPipeline
    from msdiffusion.models.model import MSAdapter
    from msdiffusion.models.projection import Resampler
    from msdiffusion.utils import get_eot_idx, get_phrase_idx
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )

    inputs = torch.load(work / "inputs.pt")
    cfg = inputs["resampler"]
    # transformers 5 saves tokenizers as tokenizer.json only, which 4.35's CLIPTokenizer cannot read: the same
    # vocabulary is given from the vocab.json / merges.txt it was built from.
    tokenizer = CLIPTokenizer(str(work / "_vocab" / "vocab.json"), str(work / "_vocab" / "merges.txt"),
                              model_max_length=77)  # fmt: skip
    text_1 = _text_model(CLIPTextModel, work / "sdxl" / "text_encoder")
    text_2 = _text_model(CLIPTextModelWithProjection, work / "sdxl" / "text_encoder_2")
    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(work / "sdxl"), torch_dtype=torch.float32, add_watermarker=False, tokenizer=tokenizer,
        tokenizer_2=tokenizer, text_encoder=text_1, text_encoder_2=text_2,
    )  # fmt: skip
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(work / "clip-bigg")).eval()
    resampler = Resampler(dim=cfg["dim"], depth=cfg["depth"], dim_head=cfg["dim_head"], heads=cfg["heads"],
                          num_queries=cfg["num_queries"], embedding_dim=encoder.config.hidden_size,
                          output_dim=pipe.unet.config.cross_attention_dim, ff_mult=cfg["ff_mult"],
                          latent_init_mode="grounding",
                          phrase_embeddings_dim=pipe.text_encoder.config.projection_dim)  # fmt: skip
    # Built without the checkpoint, cast to float32, then loaded: MSAdapter creates its processors in float16
    # and the script's load-then-cast would round the weights (the script runs float16 throughout).
    ms_model = MSAdapter(pipe.unet, resampler, device="cpu", num_tokens=cfg["num_queries"])
    ms_model.to("cpu", torch.float32)
    ms_model.load_from_checkpoint(str(work / "ms-diffusion" / "ms_adapter.bin"))
    ms_model.eval()
    out: dict = {"processor_order": list(pipe.unet.attn_processors)}

    images = [x.convert("RGB").resize((512, 512)) for x in references()]  # inference.py:70
    out["pixels"] = CLIPImageProcessor()(images=images, return_tensors="pt").pixel_values

    with torch.no_grad():
        grounding = {"boxes": inputs["boxes"], "phrase_embeds": inputs["phrase_embeds"], "drop_grounding_tokens": [0]}
        out["resampler"] = resampler(inputs["image_tokens"], grounding_kwargs=grounding)
        attn = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
        processor = pipe.unet.attn_processors[UNET_PROCESSOR]
        processor.scale = 0.6
        out["processor"] = processor(attn, inputs["hidden"], inputs["encoder"], boxes=inputs["cfg_boxes"])
        for p in pipe.unet.attn_processors.values():
            if hasattr(p, "to_k_ip"):
                p.scale, p.subject_scales = 0.6, None
        out["unet"] = pipe.unet(inputs["latents"], inputs["t"], inputs["unet_encoder"],
                                added_cond_kwargs=inputs["added"],
                                cross_attention_kwargs={"boxes": inputs["cfg_boxes"]}).sample  # fmt: skip

    pipe.scheduler.set_timesteps(steps)
    out["timesteps"], out["sigmas"] = pipe.scheduler.timesteps.clone(), pipe.scheduler.sigmas.clone()

    # End to end as inference.py:84-92, float32 on the CPU, one sample.
    prompt = inputs["prompt"]
    phrases = [name for name, _ in SUBJECTS]
    counts: dict[str, int] = {}
    phrase_idxes = []
    for phrase in phrases:  # inference.py get_phrases_idx
        phrase_idxes.append(get_phrase_idx(pipe.tokenizer, phrase, prompt, num=counts.get(phrase, 0))[0])
        counts[phrase] = counts.get(phrase, 0) + 1
    eot_idxes = [[get_eot_idx(pipe.tokenizer, prompt)] * len(phrases)]
    image_processor = CLIPImageProcessor()
    out["image"] = ms_model.generate(
        pipe=pipe, pil_images=[images], num_samples=1, num_inference_steps=steps, seed=SEED, prompt=[prompt],
        scale=0.6, image_encoder=encoder, image_processor=image_processor, boxes=[[list(b) for _, b in SUBJECTS]],
        image_proj_type="resampler", image_encoder_type="clip", phrases=[phrases], drop_grounding_tokens=[0],
        phrase_idxes=[phrase_idxes], eot_idxes=eot_idxes, height=inputs["resolution"], width=inputs["resolution"],
        weight_dtype=torch.float32, output_type="np",
    )  # fmt: skip
    out["image"] = torch.from_numpy(out["image"][0])
    torch.save(out, work / "official.pt")


# ------------------------------------------------------------------------------------------------ our side


def _request(method):
    """A GenerationRequest for PROMPT with SUBJECTS' boxes and references (task fields the method reads only)."""
    from types import SimpleNamespace

    from PIL import Image

    from msibench.methods.base import GenerationRequest, SubjectInput

    subjects = tuple(
        SubjectInput(name, i, box, i, ref, Image.new("L", ref.size, 255))
        for i, ((name, box), ref) in enumerate(zip(SUBJECTS, references(), strict=True))
    )
    task = SimpleNamespace(id="parity", prompt=PROMPT, background="")
    return GenerationRequest(task, 0, SEED, subjects)  # type: ignore[arg-type]


def our_side(args) -> int:
    import torch

    from baselines.clip_pixels import pil_clip_processor
    from baselines.ms_diffusion import MSDiffusionMethod
    from baselines.ms_diffusion_modules import official_processor_order
    from baselines.ms_diffusion_random import resampler_config, write_random_weights

    work = Path(args.work or tempfile.mkdtemp(prefix="parity-msdiff-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    options = write_random_weights(work, {"a", "and", "on", "the", "beach", *(n for n, _ in SUBJECTS)})
    options["steps"] = args.steps
    method = MSDiffusionMethod(**options)
    method.setup("cpu")
    parts = method._parts
    pipe, adapter = parts["pipe"], parts["adapter"]
    cfg = resampler_config("tiny")
    n = len(SUBJECTS)
    g = torch.Generator().manual_seed(1)
    unet = pipe.unet
    cross = unet.config.cross_attention_dim
    tokens = 77 + 4 + n * cfg.num_queries
    boxes = torch.tensor([list(b) for _, b in SUBJECTS])
    inputs = {
        "resampler": {k: getattr(cfg, k) for k in ("dim", "depth", "dim_head", "heads", "num_queries", "ff_mult")},
        "image_tokens": torch.randn(n, 50, cfg.embedding_dim, generator=g),
        "phrase_embeds": torch.randn(n, cfg.phrase_dim, generator=g),
        "boxes": boxes,
        "cfg_boxes": torch.stack([torch.zeros_like(boxes), boxes]),
        "hidden": torch.randn(2, 16 * 16, 64, generator=g),
        "encoder": torch.randn(2, tokens, cross, generator=g),
        "latents": torch.randn(2, 4, 32, 32, generator=g),
        "t": torch.tensor(500),
        "unet_encoder": torch.randn(2, tokens, cross, generator=g),
        "added": {"text_embeds": torch.randn(2, 32, generator=g),
                  "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)},
        "prompt": method.config()["prompt_prefix"] + PROMPT,
        "resolution": method.config()["resolution"],
    }  # fmt: skip
    torch.save(inputs, work / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    command = [args.official_python, str(Path(__file__).resolve()), "--side", "official", "--work", str(work),
               "--official", str(args.official.resolve()), "--steps", str(args.steps)]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
        print(f"official side failed (exit {proc.returncode})", file=sys.stderr)
        return 2
    official = torch.load(work / "official.pt")

    ours: dict = {}
    order_official = official["processor_order"]
    order_ours = official_processor_order(unet.attn_processors)
    with torch.no_grad():
        ours["pixels"] = pil_clip_processor(224)(
            images=[r.convert("RGB").resize((512, 512)) for r in references()], return_tensors="pt"
        ).pixel_values
        ours["resampler"] = adapter.resampler(inputs["image_tokens"], inputs["phrase_embeds"], inputs["boxes"])
        attn = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
        ours["processor"] = unet.attn_processors[UNET_PROCESSOR](
            attn, inputs["hidden"], inputs["encoder"], boxes=inputs["cfg_boxes"]
        )
        ours["unet"] = unet(
            inputs["latents"], inputs["t"], inputs["unet_encoder"], added_cond_kwargs=inputs["added"],
            cross_attention_kwargs={"boxes": inputs["cfg_boxes"]},
        ).sample  # fmt: skip
    pipe.scheduler.set_timesteps(args.steps)
    ours["timesteps"], ours["sigmas"] = pipe.scheduler.timesteps.clone(), pipe.scheduler.sigmas.clone()
    ours["image"] = torch.from_numpy(method.run(_request(method), output_type="np"))

    rows = [("processor order (official ModuleList index -> name)", order_ours == order_official, None)]
    worst = 0.0
    for key, what in (
        ("pixels", "CLIP preprocessing of the 512 px references"),
        ("resampler", "grounding resampler"),
        ("processor", f"subject attention processor ({UNET_PROCESSOR.rsplit('.', 1)[0]})"),
        ("unet", "UNet with all processors, CFG batch, 2 boxes"),
        ("timesteps", f"Euler timesteps ({args.steps} steps)"),
        ("sigmas", "Euler sigmas"),
        ("image", f"end to end, decoded image in [0, 1] ({args.steps} steps, seed {SEED})"),
    ):
        a, b = official[key].double(), ours[key].double()
        if a.shape != b.shape:
            rows.append((what, False, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"))
            worst = float("inf")
            continue
        diff = (a - b).abs().max().item()
        rel = (a - b).norm().item() / max(a.norm().item(), 1e-12)
        worst = max(worst, rel)
        rows.append((what, True, f"max-abs {diff:.2e}  rel {rel:.2e}  (max |official| {a.abs().max().item():.3g})"))
    import diffusers
    import transformers

    print(
        f"ms-diffusion parity: ours diffusers {diffusers.__version__} / transformers {transformers.__version__} "
        f"vs official (pins diffusers 0.23.1 / transformers 4.35.2), torch {torch.__version__}, float32 CPU"
    )
    for what, ok, text in rows:
        print(f"  {what}: {text if text else ('identical' if ok else 'DIFFERENT')}")
    summary = {"worst_rel": worst, "order_identical": order_ours == order_official, "work": str(work)}
    print(json.dumps(summary))
    return 0 if worst <= args.tolerance and order_ours == order_official else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.side == "official":
        official_side(args.work, args.official, args.steps)
        return 0
    if args.official is None or not (args.official / "msdiffusion").is_dir():
        print("parity/ms_diffusion.py: --official must be a folder holding the official msdiffusion/ package",
              file=sys.stderr)  # fmt: skip
        return 2
    sys.path.insert(0, str(REPO))
    return our_side(args)


if __name__ == "__main__":
    sys.exit(main())
