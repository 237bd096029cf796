"""IP-Adapter: our adapter path and DDIM loop against the official ``ip_adapter`` package
(tencent-ailab/IP-Adapter@62e4af9), on one tiny SD1.5-shaped UNet with the same random weights.

Both sides get the same UNet weights, the same random IP-Adapter state dict under the official key names
(``image_proj.proj/norm``, ``ip_adapter.<index>.to_k_ip/to_v_ip``), the same CLIP image embedding, text embeddings
and initial noise. The official side (diffusers 0.23.1) sets up its modules with its own code, ``IPAdapter``'s
``set_ip_adapter`` (``IPAttnProcessor`` on every cross-attention, ``AttnProcessor`` elsewhere),
``ImageProjModel`` and ``load_ip_adapter``, then, as ``IPAdapter.generate`` does, appends the image tokens
(and those of a zero embedding for the negative) to the text embeddings and runs StableDiffusionPipeline with the
notebook's DDIMScheduler (``ip_adapter_t2i-adapter_demo.ipynb`` code cell 2), 50 steps, guidance 7.5, scale 0.5.
Ours is ``baselines.ip_adapter_modules.attach_ip_adapter`` (diffusers' own IP-Adapter support) and
``make_scheduler("ddim")`` on current diffusers. Deviation: the official code casts its adapter modules to
float16 (it ran on CUDA); here they are cast back to float32 after its set-up, so both sides compute in float32
on CPU. Compared: the image tokens (``ImageProjModel`` vs diffusers' ``ImageProjection``), one UNet forward with the
adapter, and the final latents of the DDIM loop.

Usage (from the repository root)::

    git --git-dir=<bare tencent-ailab/IP-Adapter> archive 62e4af9 ip_adapter | tar -x -C /tmp/IP-Adapter
    python parity/ip_adapter.py --official /tmp/IP-Adapter --python /work/venvs/parity-old/bin/python

``--official`` is the checkout (the folder holding ``ip_adapter/``); the official side needs diffusers 0.23.1 and
transformers 4 (the venv of docs/parity.md). Exit 0: every figure within ``--rel-tolerance`` (default 1e-4: the
UNet without the adapter is identical on both sides, with it the two IP attention processors differ by about
1e-5 in float32 arithmetic; the script prints both), 1: not, 2: a usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from _side_by_side import REPO_ROOT, Figures, check_official, official_side, parser, run_official  # noqa: E402

OFFICIAL_HELP = "a checkout of tencent-ailab/IP-Adapter (at 62e4af9): the folder holding ip_adapter/ip_adapter.py"
MARKERS = ["ip_adapter/ip_adapter.py", "ip_adapter/attention_processor.py"]
STEPS, GUIDANCE, SCALE, RESOLUTION, IMAGE_DIM, TEXT_DIM = 50, 7.5, 0.5, 32, 16, 32
#: A tiny UNet with SD1.5's block pattern (cross-attention down block first, up block last, and the mid block), so
#: the official processor indices apply; diffusers' get_dummy_components style.
UNET = {
    "block_out_channels": (32, 64), "layers_per_block": 1, "sample_size": RESOLUTION // 2, "in_channels": 4,
    "out_channels": 4, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": TEXT_DIM, "attention_head_dim": 4,
    "norm_num_groups": 8,
}  # fmt: skip
VAE = {
    "block_out_channels": (16, 32), "in_channels": 3, "out_channels": 3, "latent_channels": 4, "norm_num_groups": 8,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
}  # fmt: skip


def _pipeline(unet, scheduler):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    kwargs = (
        {"image_encoder": None} if "image_encoder" in StableDiffusionPipeline.__init__.__code__.co_varnames else {}
    )
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE), text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False, **kwargs,
    )  # fmt: skip


def _official(inputs: dict) -> dict:
    import diffusers
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from ip_adapter.ip_adapter import ImageProjModel, IPAdapter, IPAttnProcessor  # the class it attaches (2_0)

    unet = UNet2DConditionModel(**UNET)
    unet.load_state_dict(inputs["unet"])
    # ip_adapter_t2i-adapter_demo.ipynb code cell 2.
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)  # fmt: skip
    pipe = _pipeline(unet, scheduler)
    with torch.inference_mode():  # the same UNet before any adapter: what two diffusers versions differ by alone
        plain = unet(inputs["noise"], torch.tensor([inputs["t"]]), encoder_hidden_states=inputs["text"]).sample
    adapter = IPAdapter.__new__(IPAdapter)  # IPAdapter.__init__ loads a real image encoder; its steps one by one:
    adapter.device, adapter.num_tokens, adapter.pipe = "cpu", 4, pipe
    adapter.ip_ckpt = inputs["ckpt"]
    adapter.set_ip_adapter()
    adapter.image_proj_model = ImageProjModel(cross_attention_dim=TEXT_DIM, clip_embeddings_dim=IMAGE_DIM,
                                              clip_extra_context_tokens=4)  # fmt: skip
    adapter.load_ip_adapter()
    unet.float()  # undo the official float16 cast of the processors: float32 on CPU on both sides
    adapter.image_proj_model.float()
    adapter.set_scale(SCALE)
    if not any(isinstance(p, IPAttnProcessor) for p in unet.attn_processors.values()):
        raise SystemExit("the official set_ip_adapter attached no IP attention processor")
    with torch.inference_mode():
        tokens = adapter.image_proj_model(inputs["image_embeds"])
        uncond_tokens = adapter.image_proj_model(torch.zeros_like(inputs["image_embeds"]))
        # IPAdapter.generate: the image tokens follow the text tokens.
        cond = torch.cat([inputs["text"], tokens], dim=1)
        uncond = torch.cat([inputs["negative"], uncond_tokens], dim=1)
        t = torch.tensor([inputs["t"]])
        eps = unet(inputs["noise"], t, encoder_hidden_states=cond).sample
        latents = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=GUIDANCE,
                       num_inference_steps=STEPS, latents=inputs["noise"], output_type="latent",
                       height=RESOLUTION, width=RESOLUTION).images  # fmt: skip
    return {"version": diffusers.__version__, "tokens": tokens, "plain": plain, "eps": eps, "latents": latents}


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.split("\n\n")[0], OFFICIAL_HELP, tolerance=0.0)
    p.add_argument("--rel-tolerance", type=float, default=1e-4, help="largest rel figure (1e-4)")
    args = p.parse_args(argv)
    check_official(args.official, MARKERS, OFFICIAL_HELP)
    if args.side == "official":
        return official_side(args, _official)
    sys.path.insert(0, str(REPO_ROOT))
    import tempfile

    import torch
    from diffusers import UNet2DConditionModel

    from baselines.ip_adapter_modules import attach_ip_adapter, expected_ip_adapter_shapes, make_scheduler, nest

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET).eval()
    unet_weights = {k: v.clone() for k, v in unet.state_dict().items()}
    adapter = nest(
        {key: torch.randn(shape) * 0.2 for key, shape in expected_ip_adapter_shapes(unet, IMAGE_DIM).items()}
    )
    g = torch.Generator().manual_seed(1)
    image_embeds = torch.randn(1, IMAGE_DIM, generator=g)
    text, negative = torch.randn(1, 77, TEXT_DIM, generator=g), torch.randn(1, 77, TEXT_DIM, generator=g)
    noise = torch.randn(1, 4, RESOLUTION // 2, RESOLUTION // 2, generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(Path(tmp) / "ip-adapter.bin")
        torch.save(adapter, ckpt)
        inputs = {"unet": unet_weights, "ckpt": ckpt, "image_embeds": image_embeds, "text": text,
                  "negative": negative, "noise": noise, "t": 500}  # fmt: skip
        official = run_official(__file__, args, inputs)

    with torch.inference_mode():
        plain = unet(noise, torch.tensor([500]), encoder_hidden_states=text).sample
    pipe = _pipeline(unet, make_scheduler("ddim", None))
    attach_ip_adapter(pipe, adapter)
    pipe.set_ip_adapter_scale(SCALE)
    figures = Figures(args.tolerance)
    print(f"official: ip_adapter on diffusers {official['version']}; ours: baselines.ip_adapter_modules")
    with torch.inference_mode():
        tokens = unet.encoder_hid_proj.image_projection_layers[0](image_embeds)
        figures.compare("image tokens (ImageProjModel vs diffusers ImageProjection)", tokens, official["tokens"],
                        rel_tolerance=args.rel_tolerance)  # fmt: skip
        figures.note("UNet forward WITHOUT the adapter, t = 500 (diffusers versions alone)", plain, official["plain"])
        eps = unet(noise, torch.tensor([500]), encoder_hidden_states=text,
                   added_cond_kwargs={"image_embeds": [image_embeds[:, None]]}).sample  # fmt: skip
        figures.compare(
            "UNet forward with the adapter, t = 500", eps, official["eps"], rel_tolerance=args.rel_tolerance
        )
        embeds = [torch.cat([torch.zeros_like(image_embeds), image_embeds])[:, None]]  # negative: a zero embedding
        latents = pipe(prompt_embeds=text, negative_prompt_embeds=negative, ip_adapter_image_embeds=embeds,
                       guidance_scale=GUIDANCE, num_inference_steps=STEPS, latents=noise, output_type="latent",
                       height=RESOLUTION, width=RESOLUTION).images  # fmt: skip
        figures.compare(f"DDIM final latents ({STEPS} steps, guidance {GUIDANCE}, scale {SCALE})", latents,
                        official["latents"], rel_tolerance=args.rel_tolerance)  # fmt: skip
    figures.exit()


if __name__ == "__main__":
    main()
