"""``ms-diffusion``: MS-Diffusion (Wang et al., ICLR 2025, arXiv 2406.07209) on SDXL as an msibench method.

Every subject's reference goes through CLIP ViT-bigG/14 (penultimate hidden states) and a grounding resampler whose
queries come from the subject's phrase (its category name) and box; each UNet cross-attention adds a box-masked
attention over those tokens (``baselines.ms_diffusion_modules``). It takes boxes, not depth order: overlapping boxes
both attend in the overlap.

Defaults follow the official script, MS-Diffusion/MS-Diffusion@74eb2d6d96669a8be9e786410de445ea41c187c0
``inference.py`` (not ``MSAdapter.generate``'s own defaults where the script sets them):

- SDXL base in float16 with its own scheduler (Euler, from the model's scheduler config) and no watermark
  (inference.py:38-42); CLIP image encoder in float16 (:46); resampler dim 1280, depth 4, 20 heads of 64, 16 queries
  per subject, grounding latents from the first text encoder's pooled phrase embedding (:51-62).
- References: ``convert("RGB").resize((512, 512))`` (:70; PIL's default bicubic) then ``CLIPImageProcessor()``
  defaults (:35; 224 px short side bicubic, centre crop, OpenAI mean/std), on transformers 4's PIL path.
- Prompt: "best quality, high quality, " + the task prompt, as every prompt of the script (:74-75); phrases = the
  subjects' category names, boxes = their normalised x0 y0 x1 y1, in the order of the references (:77-81).
- 30 steps, scale 0.6, seed 0, 1024 x 1024 (:89-92). Not set by the script, so ``MSAdapter.generate``'s defaults
  apply (msdiffusion/models/model.py:163-189): guidance 7.5 and negative prompt "monochrome, lowres, bad anatomy,
  worst quality, low quality". The seed is the runner's per-sample seed (0 is the script's single seed), drawn on a
  CPU generator so images do not depend on the device (the script draws on the CUDA generator).
- At most 4 subjects: the references were padded to ``max_rn=4`` in training (msdiffusion/dataset/
  datagenerator.py:92,240-254; MSAdapter(max_rn=4), model.py:14); the code itself takes any number.

Weights: SDXL base (stabilityai/stable-diffusion-xl-base-1.0, pinned), CLIP ViT-bigG/14
(laion/CLIP-ViT-bigG-14-laion2B-39B-b160k, README "Download the pretrained base models", not pinned: no commit
found) and ``ms_adapter.bin`` (doge1516/MS-Diffusion, not pinned: no commit found).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from baselines.sd15 import resolved_dtype
from msibench.cache import sha256_file
from msibench.methods.base import (
    Capabilities,
    GenerationRequest,
    Method,
    WeightsUnavailableError,
    coerce_options,
)
from msibench.methods.harness import (
    DTYPES,
    check_choice,
    check_non_negative,
    check_positive,
    diffusers_dtype_kwarg,
    env_default,
    from_pretrained,
    quiet_loading,
    require_setup,
    seeded_generator,
    source_record,
    torch_dtype,
    transformers_dtype_kwarg,
    warn_if_half_on_cpu,
    weight_file,
)
from msibench.weights import WeightFiles

if TYPE_CHECKING:
    from PIL import Image


logger = logging.getLogger(__name__)

BASE_MODEL_ID = "stabilityai/stable-diffusion-xl-base-1.0"
BASE_MODEL_REVISION = "462165984030d82259a11f4367a4eed129e94a7b"
IMAGE_ENCODER_ID = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
ADAPTER_ID = "doge1516/MS-Diffusion"
ADAPTER_WEIGHTS = "ms_adapter.bin"
#: Overrides the default of ``adapter``: a local folder holding ms_adapter.bin (or the file itself).
ADAPTER_ENV = "MSIBENCH_MS_DIFFUSION_WEIGHTS"
NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"
PROMPT_PREFIX = "best quality, high quality, "
MAX_SUBJECTS = 4
CLIP_PREPROCESSING = (
    "PIL resize to reference_size (bicubic), then the PIL path of transformers 4 CLIPImageProcessor: 224 short side "
    "bicubic, centre crop, OpenAI mean/std"
)
IMPLEMENTATION_VERSION = 1


def _default_options() -> dict[str, Any]:
    return {
        "base_model": BASE_MODEL_ID,
        "base_revision": BASE_MODEL_REVISION,
        "image_encoder": IMAGE_ENCODER_ID,
        "image_encoder_revision": "",
        "adapter": env_default(ADAPTER_ENV, ADAPTER_ID),
        "adapter_revision": "",
        "adapter_weights": ADAPTER_WEIGHTS,
        "steps": 30,
        "guidance": 7.5,
        "scale": 0.6,
        "resolution": 1024,
        "reference_size": 512,
        "dtype": "auto",
        "prompt_prefix": PROMPT_PREFIX,
        "negative_prompt": NEGATIVE_PROMPT,
    }


def check_options(o: dict[str, Any], method: str) -> None:
    """Ranges the options must lie in (an option outside them would fail every sample later)."""
    check_choice(o, "dtype", ("auto", *DTYPES), method)
    check_positive(o, ("steps", "resolution", "reference_size"), method)
    check_non_negative(o, ("scale", "guidance"), method)
    if int(o["resolution"]) % 8:
        raise ValueError(f"{method} option 'resolution': must be a multiple of 8, got {o['resolution']}")


def resolve_adapter_file(source: str, filename: str, revision: str) -> Path:
    """``filename`` inside ``source`` (a local folder, a local file, or a hub repo id at ``revision``)."""
    option = f"-M adapter={ADAPTER_ID} or DIR (or set {ADAPTER_ENV})"
    return weight_file(
        source, filename, revision or "main", method="ms-diffusion", what="adapter weights", option=option,
        repo_id=ADAPTER_ID,
    )  # fmt: skip


class MSDiffusionMethod(Method):
    name: ClassVar[str] = "ms-diffusion"
    # The files setup() loads with the default options (msibench weights fetch --method ms-diffusion).
    weights: ClassVar[tuple[WeightFiles, ...]] = (
        WeightFiles(
            BASE_MODEL_ID,
            (
                "model_index.json",
                "scheduler/scheduler_config.json",
                "text_encoder/config.json",
                "text_encoder/model.fp16.safetensors",
                "text_encoder_2/config.json",
                "text_encoder_2/model.fp16.safetensors",
                "tokenizer/merges.txt",
                "tokenizer/special_tokens_map.json",
                "tokenizer/tokenizer_config.json",
                "tokenizer/vocab.json",
                "tokenizer_2/merges.txt",
                "tokenizer_2/special_tokens_map.json",
                "tokenizer_2/tokenizer_config.json",
                "tokenizer_2/vocab.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.fp16.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.fp16.safetensors",
            ),
            BASE_MODEL_REVISION,
            "Stable Diffusion XL 1.0 base (fp16 variant)",
        ),
        WeightFiles(IMAGE_ENCODER_ID, ("config.json", "model*.safetensors*"), None, "CLIP ViT-bigG/14 (image tower)"),
        WeightFiles(ADAPTER_ID, (ADAPTER_WEIGHTS,), None, "MS-Diffusion resampler + attention (ms_adapter.bin)"),
    )
    # One request per call: each request has its own number of subjects.
    batch_size = 1

    def __init__(self, **options: Any) -> None:
        self.options = coerce_options(_default_options(), options, self.name)
        check_options(self.options, self.name)
        self._config: dict[str, Any] | None = None
        self._parts: dict[str, Any] | None = None
        self._device: str | None = None

    # ------------------------------------------------------------------------------------------ declared

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(max_subjects=MAX_SUBJECTS, uses_layout=True, uses_zorder=False)

    def config(self) -> dict[str, Any]:
        if self._config is None:
            o = self.options
            adapter: dict[str, Any] = {"source": o["adapter"], "weights": o["adapter_weights"]}
            if Path(o["adapter"]).expanduser().exists():
                # A local copy is identified by its content, not by where it happens to live.
                weights = resolve_adapter_file(o["adapter"], o["adapter_weights"], o["adapter_revision"])
                adapter = {"source": str(Path(o["adapter"]).expanduser().resolve()), "weights": o["adapter_weights"],
                           "weights_sha256": sha256_file(weights)}  # fmt: skip
            else:
                adapter["revision"] = o["adapter_revision"] or "main"
            self._config = {
                "base_model": source_record(o["base_model"], o["base_revision"]),
                "image_encoder": source_record(o["image_encoder"], o["image_encoder_revision"] or "main"),
                "adapter": adapter,
                "scheduler": "base model's (EulerDiscreteScheduler for SDXL base)",
                "steps": int(o["steps"]),
                "guidance": float(o["guidance"]),
                "scale": float(o["scale"]),
                "resolution": int(o["resolution"]),
                "reference_size": int(o["reference_size"]),
                "dtype": resolved_dtype(o["dtype"]),
                "prompt_prefix": o["prompt_prefix"],
                "negative_prompt": o["negative_prompt"],
                "image_preprocessing": CLIP_PREPROCESSING,
                "version": IMPLEMENTATION_VERSION,
            }
        return self._config

    # ------------------------------------------------------------------------------------------ loading

    def setup(self, device: str) -> None:
        from baselines import ms_diffusion_modules as modules

        cfg = self.config()
        o = self.options
        dtype = torch_dtype(cfg["dtype"])
        warn_if_half_on_cpu(self.name, cfg["dtype"], device)
        weights_path = resolve_adapter_file(o["adapter"], o["adapter_weights"], o["adapter_revision"])
        state = modules.read_checkpoint(weights_path)
        with quiet_loading():
            pipe = load_sdxl_pipeline(o["base_model"], o["base_revision"], dtype)
            encoder = load_image_encoder(o["image_encoder"], o["image_encoder_revision"], dtype)
        flat = modules.flatten(state)
        resampler_cfg = modules.ResamplerConfig.from_state_dict(
            {k.partition(".")[2]: v for k, v in flat.items() if k.startswith("image_proj.")}
        )
        check_dimensions(resampler_cfg, pipe, encoder)
        adapter = modules.MSDiffusionAdapter(resampler_cfg, pipe.unet, float(o["scale"]))
        adapter.load_official(state, source=str(weights_path))
        pipe.set_progress_bar_config(disable=True)
        self._parts = {
            "pipe": pipe.to(device),
            "encoder": encoder.to(device).eval(),
            "adapter": adapter.to(device, dtype).eval(),
            "processor": clip_processor(),
            "dtype": dtype,
        }
        self._device = str(device)
        logger.info("ms-diffusion: loaded %s (%s) on %s", weights_path, cfg["dtype"], device)

    # ------------------------------------------------------------------------------------------ generation

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        require_setup(self._parts, self.name)
        return [self.run(r, output_type="pil") for r in requests]

    def run(self, request: GenerationRequest, output_type: str = "pil") -> Any:
        """One request through the pipeline; ``output_type`` as diffusers' (``np`` for the parity script)."""
        import torch

        require_setup(self._parts, self.name)
        if not request.subjects:
            raise ValueError(f"ms-diffusion: task {request.task.id} has no subject")
        cfg = self.config()
        parts = self._parts
        pipe, dtype, device = parts["pipe"], parts["dtype"], self._device
        prompt = cfg["prompt_prefix"] + request.prompt
        with torch.inference_mode():
            tokens = subject_tokens(
                parts,
                [s.reference for s in request.subjects],
                [s.category for s in request.subjects],
                [tuple(s.box) for s in request.subjects],
                cfg["reference_size"],
                device,
            )
            text, negative, pooled, negative_pooled = pipe.encode_prompt(
                prompt,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=cfg["negative_prompt"] or None,
            )
        boxes = torch.tensor([[list(s.box) for s in request.subjects]], device=device, dtype=dtype)
        generator = seeded_generator(request.seed)
        with torch.inference_mode():
            out = pipe(
                prompt_embeds=torch.cat([text, tokens], dim=1),
                negative_prompt_embeds=torch.cat([negative, torch.zeros_like(tokens)], dim=1),
                pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled,
                guidance_scale=cfg["guidance"],
                num_inference_steps=cfg["steps"],
                generator=generator,
                # Unconditional half first (the pipeline's order): zero boxes, so no image attention at all there.
                cross_attention_kwargs={"boxes": torch.cat([torch.zeros_like(boxes), boxes])},
                height=cfg["resolution"],
                width=cfg["resolution"],
                output_type=output_type,
            )
        return out.images[0]


def subject_tokens(parts: dict[str, Any], references, phrases, boxes, reference_size: int, device) -> Any:
    """[1, 4 + 16 N, cross_attention_dim]: the background tokens, then each subject's 16 resampled tokens."""
    import torch

    pipe, dtype, adapter = parts["pipe"], parts["dtype"], parts["adapter"]
    resized = [r.convert("RGB").resize((reference_size, reference_size)) for r in references]
    pixels = parts["processor"](images=resized, return_tensors="pt").pixel_values.to(device, dtype)
    image_tokens = parts["encoder"](pixels, output_hidden_states=True).hidden_states[-2]
    ids = pipe.tokenizer(
        list(phrases), max_length=pipe.tokenizer.model_max_length, padding="max_length", truncation=True,
        return_tensors="pt",
    ).input_ids  # fmt: skip
    phrase_embeds = pipe.text_encoder(ids.to(device)).pooler_output
    box_tensor = torch.tensor([list(b) for b in boxes], device=device, dtype=dtype)
    tokens = adapter.resampler(image_tokens, phrase_embeds.to(dtype), box_tensor)
    tokens = tokens.reshape(1, -1, tokens.shape[-1])
    return torch.cat([adapter.background_tokens, tokens], dim=1)


def clip_processor() -> Any:
    """``CLIPImageProcessor()`` defaults (224 px) on transformers 4's PIL path, as the official code ran it."""
    from baselines.clip_pixels import pil_clip_processor

    return pil_clip_processor(224)


def load_sdxl_pipeline(base_model: str, base_revision: str, dtype: Any) -> Any:
    """Stable Diffusion XL without watermark, as inference.py:38-42 (the fp16 variant files at the hub)."""
    from diffusers import StableDiffusionXLPipeline

    kwargs: dict[str, Any] = {"revision": base_revision, "add_watermarker": False, **diffusers_dtype_kwarg(dtype)}
    if not Path(base_model).expanduser().exists():
        # The hub's fp16 files (the ones weights fetch declares), whatever the dtype: the script loads the fp32 files
        # and casts them to float16 (inference.py:38-41); half the download for the same float16 model.
        kwargs["variant"] = "fp16"
    return from_pretrained(
        StableDiffusionXLPipeline.from_pretrained,
        base_model,
        "Stable Diffusion XL base model",
        WeightsUnavailableError,
        "-M base_model=DIR",
        "ms-diffusion",
        **kwargs,
    )


def load_image_encoder(source: str, revision: str, dtype: Any) -> Any:
    """CLIP ViT-bigG/14's vision tower with projection (inference.py:46)."""
    from transformers import CLIPVisionModelWithProjection

    return from_pretrained(
        CLIPVisionModelWithProjection.from_pretrained,
        source,
        "CLIP image encoder",
        WeightsUnavailableError,
        "-M image_encoder=DIR",
        "ms-diffusion",
        revision=revision or None,
        **transformers_dtype_kwarg(dtype),
    )


def check_dimensions(resampler_cfg: Any, pipe: Any, encoder: Any) -> None:
    """The checkpoint's resampler fits these encoders and this UNet (else a readable error, not a matmul one)."""
    from baselines.ms_diffusion_modules import CheckpointLayoutError

    expected = {
        "image encoder hidden size": (resampler_cfg.embedding_dim, encoder.config.hidden_size),
        "text encoder pooled size": (resampler_cfg.phrase_dim, pipe.text_encoder.config.hidden_size),
        "UNet cross-attention size": (resampler_cfg.output_dim, pipe.unet.config.cross_attention_dim),
    }
    wrong = [f"{what}: checkpoint {a}, model {b}" for what, (a, b) in expected.items() if a != b]
    if wrong:
        raise CheckpointLayoutError(f"ms-diffusion: the checkpoint does not fit the base models ({'; '.join(wrong)})")


__all__ = ["MSDiffusionMethod", "resolve_adapter_file"]
