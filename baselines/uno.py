"""``uno``: UNO (Wu et al., ICCV 2025, arXiv 2504.02160) on FLUX.1-dev as an msibench method.

UNO is FLUX.1-dev plus a rank-512 LoRA, reading 1-4 reference images as extra image tokens with shifted positions
(UnoPE); it has no layout or depth input. Here the network is diffusers' ``FluxTransformer2DModel`` with UNO's
changes (``baselines.uno_modules``), loaded from the same files the official code loads, mapped key by key:

- ``black-forest-labs/FLUX.1-dev``: ``flux1-dev.safetensors`` (the original layout) and ``ae.safetensors``
  (uno/flux/util.py:115-121, 233-254, 392-411);
- ``bytedance-research/UNO``: ``dit_lora.safetensors`` (util.py:274-276);
- ``xlabs-ai/xflux_text_encoders`` (T5-XXL, 512 tokens) and ``openai/clip-vit-large-patch14`` (pooled, 77 tokens)
  (util.py:382-389; pipeline.py:113-114).

Code is Apache-2.0; the UNO weights are CC BY-NC 4.0 and FLUX.1-dev is under its non-commercial licence (gated on
the hub: accept it there before ``msibench weights fetch --method uno``).

Defaults are the official inference script's, bytedance/UNO@d305981b9e301315b5c110aef9c7eed827457858
inference.py:43-61: 512x512, 25 steps, guidance 4 (FLUX.1-dev's distilled guidance, one network call per step),
LoRA rank 512, UnoPE mode "d", bfloat16 (pipeline.py:255-258, util.py:246). Seeds come from msibench (per task and
sample) instead of the script's 3407 + j. Per task, each reference is resized so that its long side is 512 px for
one reference and 320 px for more (inference.py:94-95 decides this once, from the first task, and keeps it for
all later ones; we decide it for each task by the same rule, as the official demo does, pipeline.py:225), then
centre-cropped to multiples of 16 (pipeline.py:70-98). The timestep schedule keeps UNO's sequence-length argument
(pipeline.py:259-263; see ``uno_modules.schedule``).

Where this differs from the official pipeline by construction: the initial noise and the reference VAE posterior
samples are drawn from a CPU generator seeded by the request (the official code draws the noise from the device's
generator, pipeline.py:255-258, and the posterior samples from the global RNG), so images do not depend on the
device or on earlier tasks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from msibench.cache import sha256_file
from msibench.methods import harness
from msibench.methods.base import (
    Capabilities,
    GenerationRequest,
    Method,
    WeightsUnavailableError,
    coerce_options,
)
from msibench.weights import WeightFiles

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

FLUX_ID = "black-forest-labs/FLUX.1-dev"
FLUX_FILE = "flux1-dev.safetensors"
AE_FILE = "ae.safetensors"
LORA_ID = "bytedance-research/UNO"
LORA_FILE = "dit_lora.safetensors"
T5_ID = "xlabs-ai/xflux_text_encoders"
CLIP_ID = "openai/clip-vit-large-patch14"
CLIP_REVISION = "32bd64288804d66eefd0ccbe215aa642df71cc41"  # the revision baselines.ssr_encoder pins
# No commit of FLUX.1-dev, UNO or xflux_text_encoders could be looked up where this was written: "main" until one is.
FLUX_REVISION = LORA_REVISION = T5_REVISION = "main"
#: Override the defaults of ``flux`` / ``lora``: a local folder holding the hub files (or the file itself).
FLUX_ENV = "MSIBENCH_UNO_FLUX"
LORA_ENV = "MSIBENCH_UNO_LORA"
MAX_SUBJECTS = 4  # README / app.py: up to four reference images
IMPLEMENTATION_VERSION = 1


def _default_options() -> dict[str, Any]:
    return {
        "flux": harness.env_default(FLUX_ENV, FLUX_ID),
        "flux_revision": FLUX_REVISION,
        "lora": harness.env_default(LORA_ENV, LORA_ID),
        "lora_revision": LORA_REVISION,
        "t5": T5_ID,
        "t5_revision": T5_REVISION,
        "clip": CLIP_ID,
        "clip_revision": CLIP_REVISION,
        "steps": 25,
        "guidance": 4.0,
        "resolution": 512,
        "ref_long_side_single": 512,
        "ref_long_side_multi": 320,
        "dtype": "bfloat16",
    }


def resolve_file(source: str, filename: str, revision: str, what: str, option: str, env: str | None) -> Path:
    """``filename`` of ``source``: a local file, a local folder holding it, or a hub repo id at ``revision``."""
    hint = f"-M {option}=DIR" + (f" (or set {env})" if env else "")
    return harness.weight_file(source, filename, revision, method="uno", what=what, option=hint)


class UNOMethod(Method):
    name: ClassVar[str] = "uno"
    weights: ClassVar[tuple[WeightFiles, ...]] = (
        WeightFiles(
            FLUX_ID,
            (FLUX_FILE, AE_FILE),
            None,
            "FLUX.1-dev, original layout (gated: accept its licence on the hub first)",
        ),
        WeightFiles(LORA_ID, (LORA_FILE,), None, "UNO LoRA (CC BY-NC 4.0)"),
        WeightFiles(T5_ID, ("*.json", "*.model", "*.safetensors"), None, "T5-XXL v1.1 encoder (xflux copy)"),
        WeightFiles(
            CLIP_ID,
            ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"),
            CLIP_REVISION,
            "CLIP ViT-L/14 text",
        ),
    )
    # One request per call: each task has its own number of references (sequence length).
    batch_size = 1

    def __init__(self, **options: Any) -> None:
        self.options = coerce_options(
            _default_options(),
            options,
            self.name,
            bounds={"ref_long_side_single": (16, 4096), "ref_long_side_multi": (16, 4096)},
        )
        o = self.options
        harness.check_choice(o, "dtype", harness.DTYPES, self.name)
        harness.check_positive(o, ("steps", "resolution"), self.name)
        if int(o["resolution"]) % 16:
            raise ValueError(f"uno option 'resolution': must be a multiple of 16, got {o['resolution']}")
        self._config: dict[str, Any] | None = None
        self._parts: dict[str, Any] | None = None

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(max_subjects=MAX_SUBJECTS, uses_layout=False, uses_zorder=False)

    def config(self) -> dict[str, Any]:
        if self._config is None:
            o = self.options
            self._config = {
                "flux": self._source_record("flux", FLUX_FILE),
                "lora": self._source_record("lora", LORA_FILE),
                "t5": self._source_record("t5", None),
                "clip": self._source_record("clip", None),
                "steps": int(o["steps"]),
                "guidance": float(o["guidance"]),
                "resolution": int(o["resolution"]),
                "reference_long_side": {"one": int(o["ref_long_side_single"]), "more": int(o["ref_long_side_multi"])},
                "dtype": o["dtype"],
                "pe": "d",
                "reference": "preprocess_ref: long side scaled (Lanczos), centre crop to /16 (pipeline.py:70-98)",
                "schedule": "get_schedule(steps, (W//8)*(H//8)//256, shift=True) (pipeline.py:259-263)",
                "noise": "cpu generator(seed): initial noise, then one posterior sample per reference",
                "version": IMPLEMENTATION_VERSION,
            }
        return self._config

    def _source_record(self, key: str, filename: str | None) -> dict[str, str]:
        """A hub source by id + revision; a local one by its resolved path (and the LoRA by its content)."""
        o = self.options
        record = harness.source_record(o[key], o[f"{key}_revision"])
        local = harness.local_path(o[key])
        if local is None:
            return record
        if key == "lora":
            path = local if local.is_file() else local / (filename or "")
            if path.is_file():
                record["sha256"] = sha256_file(path)
        return record

    # ------------------------------------------------------------------------------------------ loading

    def _files(self) -> dict[str, Path]:
        o = self.options
        flux = resolve_file(o["flux"], FLUX_FILE, o["flux_revision"], "FLUX.1-dev transformer", "flux", FLUX_ENV)
        local = harness.local_path(o["flux"])
        if local is not None and local.is_file():
            ae_source = str(local.parent)  # a bare flux1-dev.safetensors: ae.safetensors beside it
        else:
            ae_source = o["flux"]
        ae = resolve_file(ae_source, AE_FILE, o["flux_revision"], "FLUX.1-dev autoencoder", "flux", FLUX_ENV)
        lora = resolve_file(o["lora"], LORA_FILE, o["lora_revision"], "UNO LoRA", "lora", LORA_ENV)
        return {"flux": flux, "ae": ae, "lora": lora}

    def _pretrained(self, cls, key: str, what: str, **kwargs):
        o = self.options
        return harness.from_pretrained(
            cls.from_pretrained, o[key], what, WeightsUnavailableError, f"-M {key}=DIR", self.name,
            revision=o[f"{key}_revision"], **kwargs,
        )  # fmt: skip

    def setup(self, device: str) -> None:
        from safetensors.torch import load_file
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

        dtype = harness.torch_dtype(self.config()["dtype"])
        harness.warn_if_half_on_cpu(self.name, self.config()["dtype"], device)
        files = self._files()
        dkw = harness.transformers_dtype_kwarg(dtype)
        with harness.quiet_loading():
            t5 = self._pretrained(T5EncoderModel, "t5", "T5 encoder", **dkw)
            clip = self._pretrained(CLIPTextModel, "clip", "CLIP text encoder", **dkw)
        self.load_components(
            flux=load_file(str(files["flux"]), device=str(device)),
            lora=load_file(str(files["lora"]), device=str(device)),
            ae=load_file(str(files["ae"]), device=str(device)),
            t5=t5,
            t5_tokenizer=self._pretrained(T5Tokenizer, "t5", "T5 tokenizer"),
            clip=clip,
            clip_tokenizer=self._pretrained(CLIPTokenizer, "clip", "CLIP tokenizer"),
            device=device,
        )
        logger.info("uno: loaded %s + %s (%s) on %s", files["flux"], files["lora"], dtype, device)

    def load_components(
        self, *, flux: dict, lora: dict, ae: dict, t5, t5_tokenizer, clip, clip_tokenizer, device: str
    ) -> None:
        """The second half of :meth:`setup`: assemble the method from the state dicts of ``flux1-dev.safetensors``,
        ``dit_lora.safetensors`` and ``ae.safetensors`` (official layouts; consumed) and the loaded text encoders.
        ``benchmarks/bench_gpu.py`` calls it with random tensors made on the device, where writing and reading 24 GB
        of files would cost more than the benchmark."""
        import torch
        from diffusers import AutoencoderKL

        from baselines import uno_modules as modules

        dtype = harness.torch_dtype(self.config()["dtype"])
        transformer_config = flux_config_of(flux)
        transformer = modules.build_transformer(transformer_config, modules.lora_rank_of(lora))
        state = modules.transformer_state_dict(
            flux, lora, transformer_config["num_layers"], transformer_config["num_single_layers"]
        )
        flux.clear()
        lora.clear()
        modules.load_weights(transformer, state, dtype, device)
        del state

        ae_config = ae_config_of(ae)
        # The autoencoder stays in float32, as the official one (ae.safetensors is float32; pipeline.py:268-269).
        with torch.device("meta"):
            vae = AutoencoderKL(**ae_config)
        ae_state = {
            k: v.to(device=device, dtype=torch.float32) for k, v in modules.ae_state_dict(ae, ae_config).items()
        }
        vae.load_state_dict(ae_state, strict=True, assign=True)
        self._parts = {
            "transformer": transformer,
            "vae": vae.eval(),
            "t5": t5.to(device=device, dtype=dtype).eval(),
            "t5_tokenizer": t5_tokenizer,
            "clip": clip.to(device=device, dtype=dtype).eval(),
            "clip_tokenizer": clip_tokenizer,
            "device": str(device),
            "dtype": dtype,
        }

    # ------------------------------------------------------------------------------------------ generation

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        harness.require_setup(self._parts, self.name)
        return [self._generate_one(r) for r in requests]

    def _generate_one(self, request: GenerationRequest) -> Image.Image:
        import torch

        from baselines import uno_modules as m

        if not request.subjects:
            raise ValueError(f"uno: task {request.task.id} has no subject")
        if len(request.subjects) > MAX_SUBJECTS:
            raise ValueError(f"uno: task {request.task.id} has {len(request.subjects)} subjects, at most 4")
        p, cfg, o = self._parts, self.config(), self.options
        device, dtype = p["device"], p["dtype"]
        size = cfg["resolution"]
        long_side = m.reference_long_side(
            len(request.subjects), int(o["ref_long_side_single"]), int(o["ref_long_side_multi"])
        )
        references = [m.preprocess_reference(s.reference.convert("RGB"), long_side) for s in request.subjects]
        for k, (subject, ref) in enumerate(zip(request.subjects, references, strict=True)):
            if min(ref.size) < 16:
                raise ValueError(
                    f"uno: task {request.task.id}, subject {k} ({subject.category}): its {subject.reference.size} "
                    f"reference becomes {ref.size} px at long side {long_side}, under the 16 px the network needs"
                )
        generator = harness.seeded_generator(request.seed)
        with torch.inference_mode():
            noise = torch.randn(1, 16, 2 * (size // 16), 2 * (size // 16), generator=generator)
            latents = m.pack(noise.to(device=device, dtype=dtype))
            latent_ids = m.grid_ids(size // 16, size // 16).to(device)
            ref_latents = [m.reference_latents(p["vae"], ref, generator, dtype) for ref in references]
            grids = [(z.shape[2] // 2, z.shape[3] // 2) for z in ref_latents]
            refs = torch.cat([m.pack(z) for z in ref_latents], dim=1)
            ref_ids = torch.cat(m.reference_ids((size // 16, size // 16), grids), dim=0).to(device)
            text, pooled = m.encode_prompt(
                request.prompt, p["t5"], p["t5_tokenizer"], p["clip"], p["clip_tokenizer"], device
            )
            text_ids = torch.zeros(text.shape[1], 3, device=device)
            timesteps = m.schedule(cfg["steps"], size, size)
            net = p["transformer"]
            x = m.denoise(net, latents, latent_ids, refs, ref_ids, text, text_ids, pooled, timesteps, cfg["guidance"])
            return m.decode(p["vae"], x, size, size)


def flux_config_of(flux: dict[str, Any]) -> dict[str, Any]:
    """The diffusers transformer config of an original-layout FLUX state dict, read from its shapes (so a tiny
    checkpoint loads through the same code as flux1-dev.safetensors)."""
    from baselines.uno_modules import FLUX_DEV_TRANSFORMER

    def count(prefix: str) -> int:
        return len({k.split(".")[1] for k in flux if k.startswith(prefix)})

    hidden, in_channels = flux["img_in.weight"].shape
    head_dim = int(flux["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0])
    config = dict(FLUX_DEV_TRANSFORMER)
    config.update(
        in_channels=int(in_channels),
        num_layers=count("double_blocks."),
        num_single_layers=count("single_blocks."),
        attention_head_dim=head_dim,
        num_attention_heads=int(hidden) // head_dim,
        joint_attention_dim=int(flux["txt_in.weight"].shape[1]),
        pooled_projection_dim=int(flux["vector_in.in_layer.weight"].shape[1]),
        guidance_embeds="guidance_in.in_layer.weight" in flux,
    )
    if head_dim != sum(FLUX_DEV_TRANSFORMER["axes_dims_rope"]):
        # FLUX's rope splits the head into (1/8, 7/16, 7/16); a smaller head keeps that shape (tests).
        config["axes_dims_rope"] = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    return config


def ae_config_of(ae: dict[str, Any]) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` config of an original-layout FLUX autoencoder, read from its shapes."""
    from baselines.uno_modules import FLUX_AE

    levels = len({k.split(".")[2] for k in ae if k.startswith("encoder.down.")})
    channels = tuple(int(ae[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels))
    res = len({k.split(".")[4] for k in ae if k.startswith("encoder.down.0.block.")})
    config = dict(FLUX_AE)
    config.update(
        block_out_channels=channels,
        layers_per_block=res,
        latent_channels=int(ae["decoder.conv_in.weight"].shape[1]),
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
    )
    return config


__all__ = ["UNOMethod", "WeightsUnavailableError", "resolve_file"]
