"""``ssr-encoder``: SSR-Encoder (Zhang et al., CVPR 2024, arXiv 2312.16272) on Stable Diffusion 1.5.

Each subject's reference cut-out is encoded by CLIP ViT-L/14; the aligner selects what its text query names,
the subject's COCO category ("dog", "dining table"), and the UNet attends to the selected tokens of every
subject through the SSR cross-attention layers (``baselines.ssr_encoder_modules``, written for current diffusers
and loading the official checkpoint by key mapping).

- Default: one selective text query per subject, any number of subjects; the layout is not used (the model has
  no notion of position in the output).
- ``-M use_layout=true``: the layout box becomes the subject's mask query. The subject's cut-out is placed in its
  box on a white square canvas (aspect kept, centred: msibench's ``paste`` composition), that canvas is the
  image the encoder sees, and the box is the mask query as the official code makes it from a mask image
  (``ssr_encoder.py`` ``get_image_embeds_mask``: ``ToTensor``, ``> 0.5``; ``attention_processor.py``
  ``get_attention_scores_mask``: ``transforms.Resize([16, 16])`` of the tensor, i.e. bilinear, then the score
  bias). The box is rasterised at the canvas resolution and resized bilinearly WITHOUT antialiasing, as
  torchvision <= 0.16 did for tensors (its ``antialias="warn"`` default; the official environment of late 2023,
  pytorch-lightning 2.1 / accelerate 0.23, ran torch 2.1 with torchvision 0.16); torchvision >= 0.17 would
  antialias. The subject's position thus enters the encoded features; it is still no spatial control of the
  generated image. The torchvision version is an assumption that cannot be verified: ``requirements.txt`` pins
  neither torch nor torchvision. Its measured effect, on the mask of 450 MSIBench boxes at the 16 x 16 patch
  grid: antialiased differs from this by up to 0.72, mean 0.025 (docs/parity.md).

The weights (``pytorch_model.bin``: aligner, ``pytorch_model_1.bin``: attention layers) are released on Google
Drive, not on the hub: download them and pass the folder with ``-M weights=DIR`` or ``MSIBENCH_SSR_WEIGHTS``.

Defaults are the official ones, from Xiaojiu-z/SSR_Encoder@7bb5f684536841d995ebef58b1946e39b82f9300, per
number of subjects (``-M recipe=official``), as the official scripts call ``generate`` for one image and
``generate_multi`` for several:

- one subject (the single track): ``infer_text.py`` (UniPCMultistepScheduler from the SD1.5 scheduler config,
  num_inference_steps=30, guidance_scale=5, ``set_scale(0.65)`` "recommended 0.5-0.8, default 0.65", negative
  prompt "bad quality", uncond concept "", 512x512, float32, no safety checker);
- two or more (the multi track): ``infer_multi.py`` + ``generate_multi`` (same sampler, steps, guidance and size;
  negative prompt ""; ``set_scale`` is never called, so the SSR layers keep scale 1, and the conditional subject
  tokens are multiplied by ``scale[0]`` = 0.8, its slicing giving every subject the first entry).

``-M recipe=text`` uses ``infer_text.py``'s settings for any number of subjects, ``-M recipe=multi``
``infer_multi.py``'s; ``-M scale=``, ``-M token_scale=``, ``-M negative_prompt=`` override them on both. Also
``infer_mask.py`` (mask_weight=1), README (SD v1-5 in diffusers format, image encoder openai/clip-vit-large-patch14).
The UniPC scheduler ends at sigma_min (``final_sigmas_type="sigma_min"``), as diffusers 0.23.1, the copy vendored in
the official repository, did; current diffusers end at sigma 0 by default.

torch / diffusers / transformers are imported inside methods and in ``baselines.ssr_encoder_modules`` only.
"""

from __future__ import annotations

import dataclasses
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
    check_choice,
    check_non_negative,
    env_default,
    local_path,
    require_setup,
    seeded_generator,
    source_record,
    torch_dtype,
)
from msibench.weights import WeightFiles, hub_download, hub_failure

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_ENCODER_ID = "openai/clip-vit-large-patch14"
IMAGE_ENCODER_REVISION = "32bd64288804d66eefd0ccbe215aa642df71cc41"
WEIGHTS_URL = "https://drive.google.com/drive/folders/1pMwzGRA8QzHjEH5Hc4zDwdsSDwjwQKMW"
ALIGNER_FILE = "pytorch_model.bin"
LAYERS_FILE = "pytorch_model_1.bin"
#: Default of ``weights``: the local folder holding the two released files.
WEIGHTS_ENV = "MSIBENCH_SSR_WEIGHTS"

SCHEDULERS = ("unipc", "ddim", "pndm", "dpmsolver++", "euler")
#: Every subject adds 6 x 77 context tokens; there is no architectural limit, this keeps the capability finite.
MAX_SUBJECTS = 64
IMPLEMENTATION_VERSION = 2
#: Per number of subjects, the official scripts' guidance: (attention scale, subject-token scale, negative prompt).
RECIPES = {
    "text": {"scale": 0.65, "token_scale": 1.0, "negative_prompt": "bad quality"},  # infer_text.py
    "multi": {"scale": 1.0, "token_scale": 0.8, "negative_prompt": ""},  # infer_multi.py + generate_multi
}
RECIPE_CHOICES = ("official", "text", "multi")
#: diffusers 0.23.1's UniPC (vendored in the official repository) ends at sigma_min; current releases at 0.
UNIPC_OFFICIAL = {"final_sigmas_type": "sigma_min"}


def _default_options() -> dict[str, Any]:
    return {
        "base_model": BASE_MODEL_ID,
        "base_revision": BASE_MODEL_REVISION,
        "image_encoder": IMAGE_ENCODER_ID,
        "image_encoder_revision": IMAGE_ENCODER_REVISION,
        # A local folder (the release's models/ssr_model), or a hub mirror's id with weights_revision.
        "weights": env_default(WEIGHTS_ENV, ""),
        "weights_revision": "main",
        "aligner_file": ALIGNER_FILE,
        "layers_file": LAYERS_FILE,
        "scheduler": "unipc",
        "steps": 30,
        "guidance": 5.0,
        # "official": infer_text.py's guidance for one subject, infer_multi.py's for two or more (RECIPES).
        "recipe": "official",
        # None = from the recipe. scale: the SSR attention layers' scale; token_scale multiplies the conditional
        # subject tokens (generate_multi's scale[0]).
        "scale": None,
        "token_scale": None,
        "resolution": 512,
        "dtype": "float32",
        "negative_prompt": None,
        "uncond_concept": "",
        "use_layout": False,
        "mask_weight": 1.0,
    }


def _missing_weights_message(detail: str) -> str:
    return (
        f"ssr-encoder: {detail}. The official weights are not on the hub: download {ALIGNER_FILE} and "
        f"{LAYERS_FILE} from the SSR-Encoder Google Drive folder ({WEIGHTS_URL}, README 'Pretrained Models') into "
        f"one folder and pass it with -M weights=DIR or set {WEIGHTS_ENV}=DIR."
    )


class SSREncoderMethod(Method):
    name: ClassVar[str] = "ssr-encoder"
    # The files setup() loads with the default options (msibench weights fetch --method ssr-encoder).
    weights: ClassVar[tuple[WeightFiles, ...]] = (
        BASE_WEIGHTS,
        WeightFiles(IMAGE_ENCODER_ID, ("config.json", "model.safetensors"), IMAGE_ENCODER_REVISION, "CLIP ViT-L/14"),
        WeightFiles(
            WEIGHTS_URL,
            (ALIGNER_FILE, LAYERS_FILE),
            what="SSR-Encoder aligner + attention layers",
            source="manual",
            note=f"not on the hub: download them from {WEIGHTS_URL} into a folder, -M weights=DIR or {WEIGHTS_ENV}",
        ),
    )
    # One request per call: each request has its own number of subjects (context length).
    batch_size = 1

    def __init__(self, **options: Any) -> None:
        self.options = coerce_options(_default_options(), options, self.name)
        o = self.options
        check_options(o, self.name, SCHEDULERS)
        check_choice(o, "recipe", RECIPE_CHOICES, self.name)
        for key in ("scale", "token_scale"):
            if o[key] is not None:
                try:
                    o[key] = float(o[key])
                except ValueError as err:
                    raise ValueError(f"{self.name} option {key!r}: cannot read {o[key]!r} as a number") from err
        check_non_negative(o, ("scale", "token_scale", "mask_weight"), self.name)
        self._config: dict[str, Any] | None = None
        self._parts: dict[str, Any] | None = None

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(max_subjects=MAX_SUBJECTS, uses_layout=bool(self.options["use_layout"]), uses_zorder=False)

    # ------------------------------------------------------------------------------------------ weights

    def weight_files(self) -> tuple[Path, Path]:
        """The aligner and attention-layer files (downloaded first when ``weights`` is a hub id)."""
        o = self.options
        source = o["weights"]
        if not source:
            raise WeightsUnavailableError(_missing_weights_message("no weights given"))
        local = local_path(source)
        if local is not None:
            if not local.is_dir():
                raise WeightsUnavailableError(_missing_weights_message(f"{local} is not a folder"))
            files = (local / o["aligner_file"], local / o["layers_file"])
            absent = [str(f) for f in files if not f.is_file()]
            if absent:
                raise WeightsUnavailableError(_missing_weights_message(f"{', '.join(absent)} not found"))
            return files
        try:
            return tuple(  # type: ignore[return-value]
                hub_download(source, name, o["weights_revision"]) for name in (o["aligner_file"], o["layers_file"])
            )
        except Exception as err:  # offline, unknown repo, missing file
            # The official weights are not on the hub (manual in msibench weights ls): no fetch command to name.
            raise WeightsUnavailableError(
                _missing_weights_message(
                    f"{source!r} (revision {o['weights_revision']}) is neither a local folder nor a hub repo "
                    f"with {o['aligner_file']} and {o['layers_file']}: {hub_failure(err)}"
                )
            ) from err

    def config(self) -> dict[str, Any]:
        if self._config is None:
            o = self.options
            weights: dict[str, Any] = {"aligner": o["aligner_file"], "layers": o["layers_file"]}
            if local_path(o["weights"]) is not None or not o["weights"]:
                # Local copies are identified by content, not by where they happen to live.
                aligner, layers = self.weight_files()
                weights.update(aligner_sha256=sha256_file(aligner), layers_sha256=sha256_file(layers))
            else:
                weights.update(source=o["weights"], revision=o["weights_revision"])
            self._config = {
                "base_model": source_record(o["base_model"], o["base_revision"]),
                "image_encoder": source_record(o["image_encoder"], o["image_encoder_revision"]),
                "weights": weights,
                "scheduler": o["scheduler"],
                "scheduler_config": UNIPC_OFFICIAL if o["scheduler"] == "unipc" else {},
                "steps": int(o["steps"]),
                "guidance": float(o["guidance"]),
                "recipe": o["recipe"],
                "one_subject": self.guidance_for(1),
                "several_subjects": self.guidance_for(2),
                "resolution": int(o["resolution"]),
                "dtype": resolved_dtype(o["dtype"]),
                "uncond_concept": o["uncond_concept"],
                "use_layout": bool(o["use_layout"]),
                "mask_weight": float(o["mask_weight"]) if o["use_layout"] else None,
                "mask_query": (
                    "box rasterised at the canvas resolution, > 0.5, bilinear without antialias to the patch grid"
                    if o["use_layout"]
                    else None
                ),
                "image_preprocessing": CLIP_PREPROCESSING,
                "version": IMPLEMENTATION_VERSION,
            }
        return self._config

    def guidance_for(self, subjects: int) -> dict[str, Any]:
        """Attention scale, subject-token scale and negative prompt used for a request with ``subjects`` subjects."""
        o = self.options
        recipe = o["recipe"] if o["recipe"] != "official" else ("text" if subjects == 1 else "multi")
        chosen = dict(RECIPES[recipe])
        for key in chosen:
            if o[key] is not None:
                chosen[key] = float(o[key]) if key != "negative_prompt" else str(o[key])
        return chosen

    # ------------------------------------------------------------------------------------------ loading

    def setup(self, device: str) -> None:
        from baselines import ssr_encoder_modules as modules
        from baselines.sd15 import clip_image_processor

        cfg = self.config()
        o = self.options
        dtype = torch_dtype(cfg["dtype"])
        aligner_path, layers_path = self.weight_files()
        aligner_sd = modules.read_state_dict(aligner_path)
        layers_sd = modules.read_state_dict(layers_path)
        pipe, image_encoder = self._load_models(dtype)
        text_tokens = int(pipe.tokenizer.model_max_length)
        aligner, processors = modules.build_ssr_modules(
            pipe.unet, aligner_sd, layers_sd, text_tokens=text_tokens, sources=(str(aligner_path), str(layers_path))
        )
        image_dim = int(image_encoder.config.hidden_size)
        levels = len(modules.select_levels(range(int(image_encoder.config.num_hidden_layers) + 1)))
        if aligner.to_k.in_features != image_dim or len(aligner.to_v) != levels:
            raise modules.SSRLayoutError(
                f"{aligner_path}: the aligner expects {len(aligner.to_v)} levels of {aligner.to_k.in_features}-d "
                f"image features; the image encoder {o['image_encoder']} gives {levels} of {image_dim}-d"
            )
        pipe.unet.set_attn_processor({**pipe.unet.attn_processors, **processors})
        pipe.set_progress_bar_config(disable=True)
        self._parts = {
            "pipe": pipe.to(device, dtype),
            "image_encoder": image_encoder.to(device, dtype).eval(),
            "aligner": aligner.to(device, dtype).eval(),
            "processors": list(processors.values()),
            "image_processor": clip_image_processor(int(image_encoder.config.image_size)),
            "grid": int(image_encoder.config.image_size) // int(image_encoder.config.patch_size),
        }
        logger.info("ssr-encoder: loaded %s + %s (%s) on %s", aligner_path, layers_path, cfg["dtype"], device)

    def _load_models(self, dtype: Any) -> tuple[Any, Any]:
        from transformers import CLIPVisionModel

        from baselines.sd15 import load_sd15_pipeline, scheduler_from_config
        from msibench.methods.harness import from_pretrained

        o = self.options
        pipe = load_sd15_pipeline(o["base_model"], o["base_revision"], dtype, WeightsUnavailableError, self.name)
        overrides = UNIPC_OFFICIAL if o["scheduler"] == "unipc" else {}
        pipe.scheduler = scheduler_from_config(o["scheduler"], pipe.scheduler.config, **overrides)
        image_encoder = from_pretrained(
            CLIPVisionModel.from_pretrained,
            o["image_encoder"],
            "CLIP image encoder",
            WeightsUnavailableError,
            "-M image_encoder=DIR",
            self.name,
            revision=o["image_encoder_revision"],
            dtype=dtype,
        )
        return pipe, image_encoder

    # ------------------------------------------------------------------------------------------ generation

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        require_setup(self._parts, self.name)
        return [self._generate_one(r) for r in requests]

    def _subject_images(self, request: GenerationRequest) -> tuple[list[Image.Image], Any]:
        """The encoder's input per subject and, with the layout, the mask-query score bias."""
        from baselines import ssr_encoder_modules as modules
        from msibench.methods.paste import PasteMethod

        cfg = self.config()
        if not cfg["use_layout"]:
            return [s.reference.convert("RGB") for s in request.subjects], None
        paste = PasteMethod(resolution=cfg["resolution"], background=[255, 255, 255])
        canvases = [paste.generate([dataclasses.replace(request, subjects=(s,))])[0] for s in request.subjects]
        masks = modules.box_masks([s.box for s in request.subjects], cfg["resolution"])
        grid_mask = modules.mask_on_patch_grid(masks, self._parts["grid"])
        return canvases, modules.mask_query_bias(grid_mask, cfg["mask_weight"])

    def _generate_one(self, request: GenerationRequest) -> Image.Image:
        import torch

        from baselines import ssr_encoder_modules as modules

        cfg = self.config()
        parts = self._parts
        pipe = parts["pipe"]
        if not request.subjects:
            raise ValueError(f"ssr-encoder: task {request.task.id} has no subject")
        guidance = self.guidance_for(len(request.subjects))
        for processor in parts["processors"]:
            processor.scale = guidance["scale"]
        with torch.inference_mode():
            images, bias = self._subject_images(request)
            subject_cond, subject_uncond = modules.encode_subjects(
                pipe,
                parts["image_encoder"],
                parts["image_processor"],
                parts["aligner"],
                images,
                [s.category for s in request.subjects],
                cfg["uncond_concept"],
                bias,
            )
            prompt_embeds, negative_embeds = pipe.encode_prompt(
                request.prompt, pipe._execution_device, 1, True, negative_prompt=guidance["negative_prompt"]
            )
            generator = seeded_generator(request.seed)
            out = pipe(
                prompt_embeds=torch.cat(
                    [prompt_embeds, (guidance["token_scale"] * subject_cond).to(prompt_embeds.dtype)], dim=1
                ),
                negative_prompt_embeds=torch.cat([negative_embeds, subject_uncond.to(negative_embeds.dtype)], dim=1),
                height=cfg["resolution"],
                width=cfg["resolution"],
                num_inference_steps=cfg["steps"],
                guidance_scale=cfg["guidance"],
                generator=generator,
                output_type="pil",
            )
        return out.images[0]


__all__ = ["SSREncoderMethod", "WeightsUnavailableError"]
