"""Parity of msibench's ``uno`` with the official UNO code, on random weights shared by both sides.

Usage (the official code needs ``einops``; everything else comes from the system environment)::

    mkdir -p /tmp/uno-official
    git --git-dir=<bare UNO repo> archive d305981b9e301315b5c110aef9c7eed827457858 | tar x -C /tmp/uno-official
    python -m venv --system-site-packages /work/venvs/uno && /work/venvs/uno/bin/pip install einops==0.8.0
    /work/venvs/uno/bin/python parity/uno.py --official /tmp/uno-official

Run from the repository root. One set of files in the official layouts (``flux1-dev.safetensors``,
``ae.safetensors``, ``dit_lora.safetensors``, a T5 and a CLIP folder), random and tiny (FLUX shape: 16 latent
channels, 8x autoencoder, 2 double + 2 single blocks, hidden 32), is loaded by both sides: by the official classes
(``Flux`` + ``set_lora``, ``AutoEncoder``, ``HFEmbedder``, strict key matching) and by ``UNOMethod.setup`` (our key
mapping onto diffusers). Then it compares, printing max-abs and relative (max-abs / max |official|) differences:

1. preprocessing: ``preprocess_ref`` against ours on references of several sizes and aspects (pixels);
2. packing and position ids (UnoPE, 1-4 references) and the text conditioning: ``prepare_multi_ip``;
3. the timestep schedule: ``get_schedule`` with UNO's sequence-length argument, at 512 and 704 px;
4. the autoencoder: encode (one posterior sample, same random numbers) and decode;
5. the network with its LoRA: one velocity prediction with 1, 2 and 4 references (float32);
6. the sampler in float32: ``denoise`` from the same inputs, 4 steps, then the decoded image;
7. end to end in bfloat16: the official ``UNOPipeline.forward`` (its own noise call replaced by msibench's draw
   of the same seed, and the global RNG set to where msibench's generator is after it, so that both sample the
   same references' posteriors) against ``UNOMethod.generate``: output pixels (0-255).

The official ``SingleStreamBlockLoraProcessor`` hard-codes the input width of its ``proj_lora`` for FLUX.1-dev
(15360 = 5 x 3072, uno/flux/modules/layers.py:325); at the tiny width that layer is rebuilt with the official
``LoRALinearLayer`` at 5 x hidden. Nothing else of the official code is changed.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}
RANK = 4
SIZE = 64  # pixels: an 8x8 latent, 4x4 image tokens


def report(name: str, ours, theirs) -> float:
    import torch

    ours, theirs = torch.as_tensor(ours).double(), torch.as_tensor(theirs).double()
    if ours.shape != theirs.shape:
        print(f"{name:58s} SHAPE MISMATCH ours {tuple(ours.shape)} official {tuple(theirs.shape)}")
        return float("inf")
    if not ours.numel():
        print(f"{name:58s} both empty {tuple(ours.shape)}")
        return 0.0
    diff = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item() or 1.0
    print(f"{name:58s} max-abs {diff:.3e}  rel {diff / scale:.3e}")
    return diff / scale


def official_models(folders: dict[str, Path]):
    """The official network, autoencoder and text embedders, loaded from the shared files."""
    import torch
    from safetensors.torch import load_file
    from uno.flux.model import Flux, FluxParams
    from uno.flux.modules.autoencoder import AutoEncoder, AutoEncoderParams
    from uno.flux.modules.conditioner import HFEmbedder
    from uno.flux.modules.layers import LoRALinearLayer
    from uno.flux.util import set_lora

    hidden = TINY["num_attention_heads"] * TINY["attention_head_dim"]
    params = FluxParams(
        in_channels=TINY["in_channels"],
        vec_in_dim=TINY["pooled_projection_dim"],
        context_in_dim=TINY["joint_attention_dim"],
        hidden_size=hidden,
        mlp_ratio=4.0,
        num_heads=TINY["num_attention_heads"],
        depth=TINY["num_layers"],
        depth_single_blocks=TINY["num_single_layers"],
        axes_dim=list(TINY["axes_dims_rope"]),
        theta=10_000,
        qkv_bias=True,
        guidance_embed=True,
    )
    model = set_lora(Flux(params), RANK)
    for block in model.single_blocks:
        block.processor.proj_lora = LoRALinearLayer(5 * hidden, hidden, RANK)  # layers.py:325 assumes 3072
    state = load_file(str(folders["flux"] / "flux1-dev.safetensors"))
    state.update(load_file(str(folders["uno"] / "dit_lora.safetensors")))
    model.load_state_dict(state, strict=True)  # util.py:310-311, strict: the layouts must be the same

    ae = AutoEncoder(
        AutoEncoderParams(
            resolution=SIZE,
            in_channels=3,
            ch=32,
            out_ch=3,
            ch_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            z_channels=16,
            scale_factor=0.3611,
            shift_factor=0.1159,
        )
    )
    ae.load_state_dict(load_file(str(folders["flux"] / "ae.safetensors")), strict=True)
    # HFEmbedder picks CLIP or T5 by the word "clip" in the path (conditioner.py:11).
    t5 = HFEmbedder(str(folders["t5"]), max_length=512, torch_dtype=torch.float32)
    clip = HFEmbedder(str(folders["clip"]), max_length=77, torch_dtype=torch.float32)
    return model.eval(), ae.eval(), t5, clip


def references(seed: int):
    """Synthetic cut-outs of several sizes and aspects (white background, a coloured shape)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for w, h in ((83, 61), (40, 97), (64, 64), (150, 37), (61, 83)):
        pixels = np.full((h, w, 3), 255, np.uint8)
        y0, x0 = h // 5, w // 5
        pixels[y0 : h - y0, x0 : w - x0] = rng.integers(0, 255, (h - 2 * y0, w - 2 * x0, 3), dtype=np.uint8)
        out.append(Image.fromarray(pixels))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", type=Path, required=True, help="a checkout of bytedance/UNO")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    # This file is parity/uno.py: its folder must not shadow the official package ``uno``.
    here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    sys.path.insert(0, str(args.official.resolve()))
    sys.path.insert(0, str(REPO))

    import numpy as np
    import torch
    import uno.flux.pipeline as official_pipeline
    from uno.flux.sampling import denoise, get_schedule, prepare_multi_ip

    from baselines import uno_modules as m
    from baselines.testing import tiny_uno_folders
    from baselines.uno import UNOMethod
    from msibench.methods.base import GenerationRequest, SubjectInput

    torch.set_num_threads(2)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="uno-parity-"))
    folders = tiny_uno_folders(workdir, seed=0, lora_rank=RANK, transformer=TINY)
    model, ae, t5, clip = official_models(folders)
    refs_raw = references(0)
    worst: dict[str, float] = {}

    print("== 0. real-size key layouts (meta tensors): FLUX.1-dev, the rank-512 LoRA, the autoencoder")
    from diffusers import AutoencoderKL
    from uno.flux.model import Flux
    from uno.flux.modules.autoencoder import AutoEncoder
    from uno.flux.util import configs, set_lora

    with torch.device("meta"):
        real = set_lora(Flux(configs["flux-dev"].params), 512, device="meta")  # inference.py:56 lora_rank=512
        real_ae = AutoEncoder(configs["flux-dev"].ae_params)
        ours_ae = AutoencoderKL(**m.FLUX_AE)
    theirs_shapes = {k: tuple(v.shape) for k, v in real.state_dict().items()}
    ours_shapes = {
        **m.official_flux_shapes(m.FLUX_DEV_TRANSFORMER),
        **m.official_lora_shapes(m.FLUX_DEV_TRANSFORMER, 512),
    }
    print(
        f"{'transformer + LoRA keys and shapes identical':58s} {ours_shapes == theirs_shapes} "
        f"({len(ours_shapes)} keys, {sum(math.prod(s) for s in ours_shapes.values()) / 1e9:.3f} G parameters)"
    )
    theirs_ae = {k: tuple(v.shape) for k, v in real_ae.state_dict().items()}
    ours_ae_shapes = {k: tuple(v.shape) for k, v in m.official_ae_state_dict(ours_ae).items()}
    print(f"{'autoencoder keys and shapes identical':58s} {theirs_ae == ours_ae_shapes} ({len(theirs_ae)} keys)")
    if ours_shapes != theirs_shapes or theirs_ae != ours_ae_shapes:
        return 1

    print("== 1. reference preprocessing (pixels)")
    for long_side in (512, 320, 48):
        for image in refs_raw:
            ours = np.asarray(m.preprocess_reference(image, long_side), dtype=np.float64)
            theirs = np.asarray(official_pipeline.preprocess_ref(image, long_side), dtype=np.float64)
            worst["preprocess"] = max(
                worst.get("preprocess", 0), report(f"preprocess_ref {image.size} long {long_side}", ours, theirs)
            )
    for n in (1, 2, 4):  # inference.py:94-95
        assert m.reference_long_side(n) == (512 if n == 1 else 320)

    ours_method = UNOMethod(
        flux=str(folders["flux"]),
        lora=str(folders["uno"]),
        t5=str(folders["t5"]),
        clip=str(folders["clip"]),
        resolution=SIZE,
        steps=4,
        ref_long_side_single=48,
        ref_long_side_multi=32,
        dtype="float32",
    )
    ours_method.setup("cpu")
    parts = ours_method._parts

    print("== 2. packing, UnoPE position ids, text conditioning")
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=gen)
    ref_latents = [torch.randn(1, 16, h, w, generator=gen) for h, w in ((4, 4), (2, 4), (4, 2), (2, 2))]
    prompt = "a photo of a dog on the table"
    with torch.no_grad():
        inp = prepare_multi_ip(t5=t5, clip=clip, img=noise, prompt=prompt, ref_imgs=ref_latents, pe="d")
        text, pooled = m.encode_prompt(
            prompt, parts["t5"], parts["t5_tokenizer"], parts["clip"], parts["clip_tokenizer"], "cpu"
        )
    report("packed image tokens", m.pack(noise), inp["img"])
    report("image position ids", m.grid_ids(SIZE // 16, SIZE // 16)[None], inp["img_ids"])
    grids = [(z.shape[2] // 2, z.shape[3] // 2) for z in ref_latents]
    for k, (ours_ids, z) in enumerate(zip(m.reference_ids((SIZE // 16, SIZE // 16), grids), ref_latents, strict=True)):
        report(f"reference {k} tokens", m.pack(z), inp["ref_img"][k])
        worst["ids"] = max(
            worst.get("ids", 0), report(f"reference {k} position ids (UnoPE d)", ours_ids[None], inp["ref_img_ids"][k])
        )
    report("T5 states (512 tokens, no mask)", text, inp["txt"])
    report("CLIP pooled", pooled, inp["vec"])

    print("== 3. timestep schedule")
    for steps, size in ((25, 512), (25, 704), (4, SIZE)):
        theirs = get_schedule(steps, (size // 8) * (size // 8) // (16 * 16), shift=True)
        worst["schedule"] = max(
            worst.get("schedule", 0), report(f"schedule {steps} steps {size}px", m.schedule(steps, size, size), theirs)
        )

    print("== 4. autoencoder")
    ref = m.preprocess_reference(refs_raw[0], 32)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        ours_z = m.reference_latents(parts["vae"], ref, g, torch.float32)
        torch.manual_seed(7)  # the official posterior sample draws from the global RNG (autoencoder.py:287)
        import torchvision.transforms.functional as TVF

        theirs_z = ae.encode(TVF.to_tensor(ref)[None] * 2.0 - 1.0)
        worst["ae"] = report("encode (posterior sample, scale/shift)", ours_z, theirs_z)
        tokens = m.pack(theirs_z)
        w, h = ref.size
        ours_img = np.asarray(m.decode(parts["vae"], tokens, h, w), dtype=np.float64)
        x = ae.decode(m.unpack(tokens, h, w)).clamp(-1, 1)
        theirs_img = (127.5 * (x[0].permute(1, 2, 0) + 1.0)).byte().numpy().astype(np.float64)
        report("decode (pixels 0-255)", ours_img, theirs_img)
        z = m.unpack(tokens, h, w)
        report("decode (float, before 8-bit)", parts["vae"].decode(z / 0.3611 + 0.1159).sample, ae.decode(z))

    print("== 5. network + LoRA, one velocity (float32)")
    net = parts["transformer"]
    with torch.no_grad():
        for n in (1, 2, 4):
            sub = ref_latents[:n]
            inp = prepare_multi_ip(t5=t5, clip=clip, img=noise, prompt=prompt, ref_imgs=sub, pe="d")
            t_vec = torch.full((1,), 0.7)
            theirs = model(
                img=inp["img"],
                img_ids=inp["img_ids"],
                ref_img=inp["ref_img"],
                ref_img_ids=inp["ref_img_ids"],
                txt=inp["txt"],
                txt_ids=inp["txt_ids"],
                y=inp["vec"],
                timesteps=t_vec,
                guidance=torch.full((1,), 4.0),
            )
            refs = torch.cat([m.pack(z) for z in sub], dim=1)
            ids = torch.cat(m.reference_ids((SIZE // 16, SIZE // 16), grids[:n]), dim=0)
            ours = m.predict_velocity(
                net,
                m.pack(noise),
                m.grid_ids(SIZE // 16, SIZE // 16),
                refs,
                ids,
                text,
                torch.zeros(text.shape[1], 3),
                pooled,
                0.7,
                4.0,
            )
            worst["network"] = max(worst.get("network", 0), report(f"velocity, {n} reference(s)", ours, theirs))
        # The LoRA must matter, or the comparison above would not test it.
        lora_off = {k: v for k, v in model.state_dict().items() if "processor" in k and ".up." in k}
        saved = {k: v.clone() for k, v in lora_off.items()}
        for v in lora_off.values():
            v.zero_()
        without = model(
            img=inp["img"],
            img_ids=inp["img_ids"],
            ref_img=inp["ref_img"],
            ref_img_ids=inp["ref_img_ids"],
            txt=inp["txt"],
            txt_ids=inp["txt_ids"],
            y=inp["vec"],
            timesteps=t_vec,
            guidance=torch.full((1,), 4.0),
        )
        for k, v in lora_off.items():
            v.copy_(saved[k])
        report("(control) official with its LoRA zeroed vs ours", ours, without)

    print("== 6. sampler, float32 (4 steps, 2 references)")
    with torch.no_grad():
        sub = ref_latents[:2]
        inp = prepare_multi_ip(t5=t5, clip=clip, img=noise, prompt=prompt, ref_imgs=sub, pe="d")
        timesteps = get_schedule(4, (SIZE // 8) * (SIZE // 8) // 256, shift=True)
        theirs = denoise(model, **inp, timesteps=timesteps, guidance=4.0)
        refs = torch.cat([m.pack(z) for z in sub], dim=1)
        ids = torch.cat(m.reference_ids((SIZE // 16, SIZE // 16), grids[:2]), dim=0)
        ours = m.denoise(
            net,
            m.pack(noise),
            m.grid_ids(SIZE // 16, SIZE // 16),
            refs,
            ids,
            text,
            torch.zeros(text.shape[1], 3),
            pooled,
            m.schedule(4, SIZE, SIZE),
            4.0,
        )
        worst["sampler"] = report("denoised latents", ours, theirs)
        report(
            "decoded image (pixels 0-255)",
            np.asarray(m.decode(parts["vae"], ours, SIZE, SIZE), dtype=np.float64),
            np.asarray(m.decode(parts["vae"], theirs, SIZE, SIZE), dtype=np.float64),
        )

    print("== 7. end to end, bfloat16: official UNOPipeline.forward vs UNOMethod.generate")
    seed = 11

    def same_draws(num_samples, height, width, device, dtype, seed):
        """msibench's draw (uno.py): the noise from a CPU generator, then the global RNG continues that stream."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(num_samples, 16, 2 * -(-height // 16), 2 * -(-width // 16), generator=g)
        torch.default_generator.set_state(g.get_state())
        return x.to(device=device, dtype=dtype)

    official_pipeline.get_noise = same_draws
    pipe = official_pipeline.UNOPipeline.__new__(official_pipeline.UNOPipeline)
    pipe.device, pipe.offload, pipe.model_type, pipe.use_fp8 = torch.device("cpu"), False, "flux-dev", False
    t5_bf = HFEmbedderBF16(folders["t5"], 512)
    clip_bf = HFEmbedderBF16(folders["clip"], 77)
    pipe.t5, pipe.clip, pipe.ae, pipe.model = t5_bf, clip_bf, ae, model.to(torch.bfloat16)
    ours_bf = UNOMethod(**{**ours_method.options, "dtype": "bfloat16", "steps": 4})
    ours_bf.setup("cpu")
    for picks in ([0], [0, 2, 4]):
        n, cut = len(picks), [refs_raw[i] for i in picks]
        long_side = 48 if n == 1 else 32  # the per-task rule at tiny size (512 / 320 at real size)
        theirs_img = pipe(
            prompt=prompt,
            width=SIZE,
            height=SIZE,
            guidance=4,
            num_steps=4,
            seed=seed,
            ref_imgs=[official_pipeline.preprocess_ref(img, long_side) for img in cut],
            pe="d",
        )
        task = SimpleNamespace(id=f"parity-{n}", prompt=prompt, background="")
        subjects = tuple(SubjectInput("x", 0, (0, 0, 1, 1), 0, img, img.convert("L")) for img in cut)
        ours_img = ours_bf.generate([GenerationRequest(task, 0, seed, subjects)])[0]
        a, b = np.asarray(ours_img, np.float64), np.asarray(theirs_img, np.float64)
        worst[f"e2e{n}"] = report(f"image, {n} reference(s) (pixels 0-255)", a, b)
        print(f"{'':58s} mean-abs {np.abs(a - b).mean():.3e}  pixels differing {(a != b).mean():.2%}")

    print("== 7b. one velocity in bfloat16 (where the end-to-end difference starts)")
    with torch.no_grad():
        bf = torch.bfloat16
        sub = [z.to(bf) for z in ref_latents[:2]]
        inp = prepare_multi_ip(t5=t5_bf, clip=clip_bf, img=noise.to(bf), prompt=prompt, ref_imgs=sub, pe="d")
        theirs = model(
            img=inp["img"],
            img_ids=inp["img_ids"],
            ref_img=inp["ref_img"],
            ref_img_ids=inp["ref_img_ids"],
            txt=inp["txt"],
            txt_ids=inp["txt_ids"],
            y=inp["vec"],
            timesteps=torch.full((1,), 0.7, dtype=bf),
            guidance=torch.full((1,), 4.0, dtype=bf),
        )
        refs = torch.cat([m.pack(z) for z in sub], dim=1)
        ids = torch.cat(m.reference_ids((SIZE // 16, SIZE // 16), grids[:2]), dim=0)
        ours = m.predict_velocity(
            ours_bf._parts["transformer"],
            m.pack(noise.to(bf)),
            m.grid_ids(SIZE // 16, SIZE // 16),
            refs,
            ids,
            inp["txt"],
            torch.zeros(inp["txt"].shape[1], 3),
            inp["vec"],
            0.7,
            4.0,
        )
        worst["network-bf16"] = report("velocity, 2 references, bfloat16", ours, theirs)

    print("== worst relative difference per part:", {k: f"{v:.1e}" for k, v in worst.items()})
    return 0


def HFEmbedderBF16(folder: Path, max_length: int):
    """The official text embedder in bfloat16, as load_t5 / load_clip make it (util.py:382-389)."""
    import torch
    from uno.flux.modules.conditioner import HFEmbedder

    return HFEmbedder(str(folder), max_length=max_length, torch_dtype=torch.bfloat16)


if __name__ == "__main__":
    sys.exit(main())
