"""``ip-adapter``: IP-Adapter (Ye et al., 2023, arXiv 2308.06721) on Stable Diffusion 1.5 as an msibench method.

The official SD1.5 adapter (``h94/IP-Adapter`` ``models/ip-adapter_sd15.bin`` with its OpenCLIP ViT-H/14 image
encoder ``models/image_encoder``) is loaded through diffusers' own IP-Adapter support
(``StableDiffusionPipeline.load_ip_adapter``); ``baselines.ip_adapter_modules`` checks the file against the
official key layout first and verifies afterwards that every tensor landed where the official code puts it.

- Single subject (default, as in the paper): the subject's reference cut-out is the image prompt, the task
  prompt the text prompt.
- ``-M use_layout=true``: every subject's reference is one image of the adapter, and diffusers' IP-Adapter
  attention masks (``IPAdapterMaskProcessor``) restrict each one to its layout box. Overlapping boxes both add
  their image attention in the overlap: IP-Adapter knows no z-order.

Defaults are the official ones, from tencent-ailab/IP-Adapter@62e4af9d0c1ac7d5f8dd386a0ccf2211346af1a2:
README.md ("For multimodal prompts ... setting scale=0.5 can get good results"; base model
runwayml/stable-diffusion-v1-5 and VAE stabilityai/sd-vae-ft-mse), ip_adapter/ip_adapter.py
(``IPAdapter.generate``: guidance_scale=7.5, negative prompt "monochrome, lowres, bad anatomy, worst quality,
low quality"; image encoder and adapter in float16), ip_adapter_t2i-adapter_demo.ipynb, the SD1.5 + ViT-H
notebook readable at that commit (code cell 1: runwayml/stable-diffusion-v1-5, models/image_encoder/,
models/ip-adapter_sd15.bin; cell 2: DDIMScheduler with beta_start=0.00085, beta_end=0.012, scaled_linear,
clip_sample=False, set_alpha_to_one=False, steps_offset=1; cell 6: num_inference_steps=50; no size given, so
the pipeline's 512x512). Not ip_adapter_t2i_demo.ipynb, cited here before: that notebook runs the ViT-G adapter
(ip-adapter_sd15_vit-G.bin with sdxl_models/image_encoder). README.md:69 names ip_adapter_demo.ipynb as the SD1.5
demo, but its blob is not in the stored snapshot, so it is not cited for these values.

torch / diffusers / transformers are imported inside methods and in ``baselines.ip_adapter_modules`` only, so
that ``msibench ls`` stays light.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from baselines.sd15 import (
    BASE_MODEL_ID,
    BASE_MODEL_REVISION,
    BASE_WEIGHTS,
    CLIP_PREPROCESSING,
    check_options,
    resolved_dtype,
)
from msibench.cache import sha256_file
from msibench.methods.base import (
    Capabilities,
    GenerationRequest,
    Method,
    WeightsUnavailableError,
    coerce_options,
)
from msibench.methods.harness import (
    check_non_negative,
    env_default,
    local_path,
    require_setup,
    seeded_generator,
    source_record,
    torch_dtype,
    warn_if_half_on_cpu,
    weight_file,
)
from msibench.weights import WeightFiles

if TYPE_CHECKING:
    from PIL import Image

    from msibench.bench.manifest import Task

logger = logging.getLogger(__name__)

VAE_ID = "stabilityai/sd-vae-ft-mse"
VAE_REVISION = "31f26fdeee1355a5c34592e401dd41e45d25a493"
ADAPTER_ID = "h94/IP-Adapter"
ADAPTER_REVISION = "018e402774aeeddd60609b4ecdb7e298259dc729"
ADAPTER_WEIGHTS = "models/ip-adapter_sd15.bin"
ADAPTER_IMAGE_ENCODER = "models/image_encoder"
#: Overrides the default of ``adapter``: a local folder laid out like the hub repo (models/...).
ADAPTER_ENV = "MSIBENCH_IP_ADAPTER_WEIGHTS"

SCHEDULERS = ("ddim", "pndm", "unipc", "dpmsolver++", "euler")
#: With layout masks every subject adds one masked image attention per cross-attention layer; there is no
#: architectural limit, this bound only keeps the declared capability finite.
MAX_LAYOUT_SUBJECTS = 64
IMPLEMENTATION_VERSION = 2


def _default_options() -> dict[str, Any]:
    return {
        "base_model": BASE_MODEL_ID,
        "base_revision": BASE_MODEL_REVISION,
        # "" keeps the base model's own VAE; the official demos swap in sd-vae-ft-mse.
        "vae": VAE_ID,
        "vae_revision": VAE_REVISION,
        "adapter": env_default(ADAPTER_ENV, ADAPTER_ID),
        "adapter_revision": ADAPTER_REVISION,
        "adapter_weights": ADAPTER_WEIGHTS,
        "image_encoder": ADAPTER_IMAGE_ENCODER,
        "scheduler": "ddim",
        "steps": 50,
        "guidance": 7.5,
        "scale": 0.5,
        "resolution": 512,
        "dtype": "auto",
        "negative_prompt": "monochrome, lowres, bad anatomy, worst quality, low quality",
        "use_layout": False,
    }


def resolve_file(source: str, filename: str, revision: str, what: str) -> Path:
    """``filename`` inside ``source`` (a local folder, a local file, or a hub repo id at ``revision``)."""
    option = f"-M adapter=DIR (or set {ADAPTER_ENV})"
    return weight_file(source, filename, revision, method="ip-adapter", what=what, option=option, repo_id=ADAPTER_ID)


class IPAdapterMethod(Method):
    name: ClassVar[str] = "ip-adapter"
    # The files setup() loads with the default options (msibench weights fetch --method ip-adapter).
    weights: ClassVar[tuple[WeightFiles, ...]] = (
        BASE_WEIGHTS,
        WeightFiles(VAE_ID, ("config.json", "diffusion_pytorch_model.safetensors"), VAE_REVISION, "sd-vae-ft-mse"),
        WeightFiles(
            ADAPTER_ID,
            (ADAPTER_WEIGHTS, f"{ADAPTER_IMAGE_ENCODER}/config.json", f"{ADAPTER_IMAGE_ENCODER}/model.safetensors"),
            ADAPTER_REVISION,
            "IP-Adapter SD1.5 + its OpenCLIP ViT-H/14 image encoder",
        ),
    )
    # One request per call: each request has its own number of images and its own masks.
    batch_size = 1

    def __init__(self, **options: Any) -> None:
        self.options = coerce_options(_default_options(), options, self.name)
        o = self.options
        check_options(o, self.name, SCHEDULERS)
        check_non_negative(o, ("scale",), self.name)
        self._config: dict[str, Any] | None = None
        self._pipe = None
        self._device: str | None = None

    # ------------------------------------------------------------------------------------------ declared

    @property
    def capabilities(self) -> Capabilities:
        if self.options["use_layout"]:
            return Capabilities(max_subjects=MAX_LAYOUT_SUBJECTS, uses_layout=True, uses_zorder=False)
        return Capabilities(max_subjects=1, uses_layout=False, uses_zorder=False, tracks=("single",))

    def can_do(self, task: Task) -> str | None:
        reason = super().can_do(task)
        if reason is not None and not self.options["use_layout"] and len(task.subjects) > 1:
            reason += " (the paper's single-subject use; -M use_layout=true restricts one image per box)"
        return reason

    def config(self) -> dict[str, Any]:
        if self._config is None:
            o = self.options
            adapter: dict[str, Any] = {
                "source": o["adapter"],
                "weights": o["adapter_weights"],
                "image_encoder": self._image_encoder_record(),
            }
            if local_path(o["adapter"]) is not None:
                # A local copy is identified by its content, not by where it happens to live.
                weights = resolve_file(o["adapter"], o["adapter_weights"], o["adapter_revision"], "adapter weights")
                adapter["source"] = str(Path(o["adapter"]).expanduser().resolve())
                adapter["weights_sha256"] = sha256_file(weights)
            else:
                adapter["revision"] = o["adapter_revision"]
            self._config = {
                "base_model": source_record(o["base_model"], o["base_revision"]),
                "vae": source_record(o["vae"], o["vae_revision"]) if o["vae"] else None,
                "adapter": adapter,
                "scheduler": o["scheduler"],
                "steps": int(o["steps"]),
                "guidance": float(o["guidance"]),
                "scale": float(o["scale"]),
                "resolution": int(o["resolution"]),
                "dtype": resolved_dtype(o["dtype"]),
                "negative_prompt": o["negative_prompt"],
                "use_layout": bool(o["use_layout"]),
                "image_preprocessing": CLIP_PREPROCESSING,
                "version": IMPLEMENTATION_VERSION,
            }
        return self._config

    # ------------------------------------------------------------------------------------------ loading

    def setup(self, device: str) -> None:
        from baselines import ip_adapter_modules as modules

        cfg = self.config()
        o = self.options
        dtype = torch_dtype(cfg["dtype"])
        warn_if_half_on_cpu(self.name, cfg["dtype"], device)
        weights_path = resolve_file(o["adapter"], o["adapter_weights"], o["adapter_revision"], "adapter weights")
        state_dict = modules.read_ip_adapter_file(weights_path)
        encoder_source, encoder_subfolder = self._image_encoder_location()
        pipe = modules.load_pipeline(
            base_model=o["base_model"],
            base_revision=o["base_revision"],
            vae=o["vae"],
            vae_revision=o["vae_revision"],
            image_encoder=encoder_source,
            image_encoder_subfolder=encoder_subfolder,
            image_encoder_revision=o["adapter_revision"],
            scheduler=o["scheduler"],
            dtype=dtype,
            error=WeightsUnavailableError,
        )
        modules.attach_ip_adapter(pipe, state_dict, source=str(weights_path))
        pipe.set_ip_adapter_scale(float(o["scale"]))
        pipe.set_progress_bar_config(disable=True)
        self._pipe = pipe.to(device)
        self._device = str(device)
        logger.info("ip-adapter: loaded %s (%s) on %s", weights_path, cfg["dtype"], device)

    def _image_encoder_location(self) -> tuple[str, str | None]:
        """(model folder or hub id, subfolder) of the image encoder.

        A relative ``image_encoder`` is looked up inside a local adapter folder first (the hub layout,
        models/image_encoder), then, unless it is the default name, relative to the working directory, else as the
        adapter's own (local subfolder or hub subfolder): a models/image_encoder folder that happens to sit in the
        working directory never replaces the adapter's.
        """
        o = self.options
        encoder = Path(o["image_encoder"]).expanduser()
        adapter = Path(o["adapter"]).expanduser()
        if encoder.is_absolute():
            return str(encoder), None
        if adapter.is_dir() and (adapter / encoder).is_dir():
            return str((adapter / encoder).resolve()), None
        if encoder.is_dir() and o["image_encoder"] != ADAPTER_IMAGE_ENCODER:
            return str(encoder.resolve()), None
        if adapter.is_file():
            raise WeightsUnavailableError(
                f"ip-adapter: -M adapter={o['adapter']} is a single file; give its image encoder folder too, "
                f"-M image_encoder=DIR ({ADAPTER_ID} {ADAPTER_IMAGE_ENCODER}, revision {ADAPTER_REVISION})"
            )
        if adapter.is_dir():
            return str(adapter / o["image_encoder"]), None
        return o["adapter"], o["image_encoder"]

    def _image_encoder_record(self) -> str:
        """The image encoder for the fingerprint: a resolved local folder, or the hub subfolder (the adapter's
        revision applies)."""
        try:
            source, subfolder = self._image_encoder_location()
        except WeightsUnavailableError:
            return self.options["image_encoder"]  # a bare weights file without its encoder: setup says so
        return subfolder if subfolder is not None else source

    # ------------------------------------------------------------------------------------------ generation

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        require_setup(self._pipe, self.name)
        return [self._generate_one(r) for r in requests]

    def _generate_one(self, request: GenerationRequest) -> Image.Image:
        import torch

        from baselines import ip_adapter_modules as modules

        cfg = self.config()
        size = cfg["resolution"]
        references = [s.reference.convert("RGB") for s in request.subjects]
        if not references:
            raise ValueError(f"ip-adapter: task {request.task.id} has no subject")
        kwargs: dict[str, Any] = {}
        if cfg["use_layout"]:
            # One adapter, N images: embeddings [1, N, D]; masks [1, N, H, W] (diffusers' masking layout).
            ip_image: list[Any] = [references]
            masks = modules.layout_masks([s.box for s in request.subjects], size)
            kwargs["cross_attention_kwargs"] = {"ip_adapter_masks": [masks]}
        else:
            if len(references) != 1:
                raise ValueError(
                    f"ip-adapter: task {request.task.id} has {len(references)} subjects; without -M use_layout=true "
                    "the method takes exactly one"
                )
            ip_image = [references[0]]
        generator = seeded_generator(request.seed)
        with torch.inference_mode():
            out = self._pipe(
                prompt=request.prompt,
                negative_prompt=cfg["negative_prompt"] or None,
                ip_adapter_image=ip_image,
                height=size,
                width=size,
                num_inference_steps=cfg["steps"],
                guidance_scale=cfg["guidance"],
                generator=generator,
                output_type="pil",
                **kwargs,
            )
        return out.images[0]


__all__ = ["IPAdapterMethod", "WeightsUnavailableError", "resolve_file"]
