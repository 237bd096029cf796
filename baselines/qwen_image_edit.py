"""``qwen-image-edit``: Qwen-Image-Edit-2511 (Qwen team, Apache-2.0) through diffusers' ``QwenImageEditPlusPipeline``.

The official implementation IS the diffusers pipeline (the model card and the Qwen-Image README run it), so this
adapter only turns a benchmark request into the card's call:

- the references: each subject's white-background cut-out (RGB, its original size), in subject order, as the
  pipeline's ``image`` list; the pipeline itself prepares them (``pipeline_qwenimage_edit_plus.py``: every image is
  resized to a 384x384-pixel area for Qwen2.5-VL and to a 1024x1024-pixel area for the VAE, aspect kept, sides
  rounded to 32; ``CONDITION_IMAGE_SIZE``, ``VAE_IMAGE_SIZE``, ``calculate_dimensions``);
- the prompt: the task prompt as it is. The model has no layout input, and neither the model card nor the
  Qwen-Image README (QwenLM/Qwen-Image@6b5e1f5cec987d404be5ac6657db3b9aacb56a89) nor its edit notes
  (``Qwen-Image-Edit-2509.md``, ``Qwen-Image-Edit.md``) describe writing boxes or positions into the prompt (the
  only boxes mentioned are drawn onto an input image to mark a region to repair), so no layout is passed: the method
  declares ``uses_layout=False`` and the runner records that;
- the sampler: the pipeline's own (the repo's ``FlowMatchEulerDiscreteScheduler``, sigmas ``linspace(1, 1/steps)``
  with the resolution-dependent shift), true classifier-free guidance with the card's scale and negative prompt;
- the seed: a CPU generator seeded with the sample's seed (the card's ``torch.manual_seed(0)`` is the CPU
  generator too: seed 0 reproduces the card's noise).

Defaults are the README's / model card's "Qwen-Image-Edit-2511" snippet (README.md lines 131-163 at the commit
above): ``QwenImageEditPlusPipeline.from_pretrained("Qwen/Qwen-Image-Edit-2511", torch_dtype=torch.bfloat16)``;
``true_cfg_scale=4.0``, ``negative_prompt=" "``, ``num_inference_steps=40``, ``guidance_scale=1.0``,
``num_images_per_prompt=1``, ``generator=torch.manual_seed(0)``. The card's ``guidance_scale=1.0`` is passed only
to a transformer with guidance embeddings: 2511's has none (``guidance_embeds: false``), and the pipeline then ignores
the value (with a warning), so the output is the same. Multi-image input: "Optimal performance is currently achieved
with 1 to 3 input images" (``Qwen-Image-Edit-2509.md`` line 7), hence ``max_subjects=3``.

Size: the card passes no height/width, so the pipeline makes a 1024x1024-pixel-area image with the aspect ratio of
the LAST input image. MSIBench's layout boxes live on a square canvas, so the method asks for ``resolution`` x
``resolution`` with ``resolution=1024`` (the same pixel area; ``-M resolution=`` changes it, a multiple of 16).

Weights: ``-M model=`` (default ``$MSIBENCH_QWEN_IMAGE_EDIT_WEIGHTS``, else the hub id) is a hub id with
``-M revision=`` or a local folder in the hub layout (model_index.json, transformer/, text_encoder/, vae/,
tokenizer/, processor/, scheduler/). The pinned revision 6f3ccc0b56e431dc6a0c2b2039706d7d26f22cb9 is the snapshot
commit of Qwen/Qwen-Image-Edit-2511 found in many public hub-cache paths (models--Qwen--Qwen-Image-Edit-2511/
snapshots/6f3ccc0b...), not read from the hub here (no hub access): ``msibench weights fetch`` records the commit it
resolves.

torch / diffusers / transformers are imported inside methods only, so that ``msibench ls`` stays light.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

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
    diffusers_dtype_kwarg,
    env_default,
    from_pretrained,
    quiet_loading,
    require_setup,
    seeded_generator,
    source_record,
    torch_dtype,
    warn_if_half_on_cpu,
)
from msibench.weights import WeightFiles

if TYPE_CHECKING:
    from PIL import Image

    from msibench.bench.manifest import Task

logger = logging.getLogger(__name__)

MODEL_ID = "Qwen/Qwen-Image-Edit-2511"
MODEL_REVISION = "6f3ccc0b56e431dc6a0c2b2039706d7d26f22cb9"
#: Overrides the default of ``model``: a local folder in the hub layout.
WEIGHTS_ENV = "MSIBENCH_QWEN_IMAGE_EDIT_WEIGHTS"
#: The model card's negative prompt for true CFG (" ": "Recommended if you don't use a negative prompt").
NEGATIVE_PROMPT = " "
#: "Optimal performance is currently achieved with 1 to 3 input images" (Qwen-Image-Edit-2509.md line 7).
MAX_SUBJECTS = 3
#: The pipeline's latent is packed in 2x2 patches of the VAE's 8x latent grid: sides are multiples of 16.
SIZE_MULTIPLE = 16
IMPLEMENTATION_VERSION = 1

#: What the pipeline does to the references (diffusers' pipeline_qwenimage_edit_plus.py), for the fingerprint.
REFERENCE_PREPROCESSING = (
    "white-background cut-out, RGB, original size, subject order; QwenImageEditPlusPipeline resizes each to a "
    "384x384-pixel area for Qwen2.5-VL and a 1024x1024-pixel area for the VAE (aspect kept, sides rounded to 32)"
)


def _default_options() -> dict[str, Any]:
    return {
        "model": env_default(WEIGHTS_ENV, MODEL_ID),
        "revision": MODEL_REVISION,
        "steps": 40,
        # true_cfg_scale: classifier-free guidance against the negative prompt (two transformer passes per step).
        "guidance": 4.0,
        "negative_prompt": NEGATIVE_PROMPT,
        # Passed only to a guidance-distilled transformer (2511's is not: the pipeline would ignore it).
        "distilled_guidance": 1.0,
        "resolution": 1024,
        "dtype": "bfloat16",
    }


class QwenImageEditMethod(Method):
    name: ClassVar[str] = "qwen-image-edit"
    # The files setup() loads with the default options (msibench weights fetch --method qwen-image-edit): the
    # diffusers folders of the repo, matched against its file list at fetch time (the shards' names are the hub's).
    weights: ClassVar[tuple[WeightFiles, ...]] = (
        WeightFiles(
            MODEL_ID,
            (
                "model_index.json",
                "scheduler/*",
                "transformer/*",
                "vae/*",
                "text_encoder/*",
                "tokenizer/*",
                "processor/*",
            ),
            MODEL_REVISION,
            "Qwen-Image-Edit-2511 (20B MMDiT, Qwen2.5-VL-7B text encoder, VAE; diffusers layout)",
        ),
    )
    # The pipeline takes one prompt per call ("currently only supports batch_size=1").
    batch_size = 1

    def __init__(self, **options: Any) -> None:
        self.options = coerce_options(_default_options(), options, self.name)
        o = self.options
        check_choice(o, "dtype", DTYPES, self.name)
        check_non_negative(o, ("guidance", "distilled_guidance"), self.name)
        if int(o["resolution"]) % SIZE_MULTIPLE:
            raise ValueError(
                f"{self.name} option 'resolution': must be a multiple of {SIZE_MULTIPLE}, got {o['resolution']}"
            )
        if not o["model"]:
            raise ValueError(f"{self.name} option 'model': give a hub id or a local folder (default {MODEL_ID})")
        self._config: dict[str, Any] | None = None
        self._pipe = None
        self._given = None

    @classmethod
    def from_pipeline(cls, pipe: Any, **options: Any) -> QwenImageEditMethod:
        """The method around a ``QwenImageEditPlusPipeline`` built in memory (``benchmarks/bench_gpu.py`` at real
        size, where writing 57 GB of random weights would cost more than the run): ``setup`` moves it to the device
        instead of loading ``model``; the fingerprint says so."""
        method = cls(**options)
        method._given = pipe
        return method

    # ------------------------------------------------------------------------------------------ declared

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(max_subjects=MAX_SUBJECTS, uses_layout=False, uses_zorder=False)

    def can_do(self, task: Task) -> str | None:
        reason = super().can_do(task)
        if reason is not None:
            reason += " (the model card: optimal with 1 to 3 input images)"
        return reason

    def config(self) -> dict[str, Any]:
        if self._config is None:
            o = self.options
            self._config = {
                "model": (
                    source_record(o["model"], o["revision"])
                    if self._given is None
                    else {"source": f"in-memory {type(self._given).__name__}"}
                ),
                "pipeline": "diffusers QwenImageEditPlusPipeline",
                "steps": int(o["steps"]),
                "true_cfg_scale": float(o["guidance"]),
                "negative_prompt": o["negative_prompt"],
                "distilled_guidance": float(o["distilled_guidance"]),
                "resolution": int(o["resolution"]),
                "dtype": o["dtype"],
                "references": REFERENCE_PREPROCESSING,
                "prompt": "task prompt only (no layout input; none in the model's docs)",
                "seed": "CPU torch.Generator per sample",
                "version": IMPLEMENTATION_VERSION,
            }
        return self._config

    # ------------------------------------------------------------------------------------------ loading

    def setup(self, device: str) -> None:
        from diffusers import QwenImageEditPlusPipeline

        cfg = self.config()
        o = self.options
        warn_if_half_on_cpu(self.name, cfg["dtype"], device)
        if self._given is not None:
            self._pipe = self._given.to(device)
            self._pipe.set_progress_bar_config(disable=True)
            return
        with quiet_loading():
            pipe = from_pretrained(
                QwenImageEditPlusPipeline.from_pretrained,
                o["model"],
                "Qwen-Image-Edit pipeline",
                WeightsUnavailableError,
                f"-M model=DIR (a folder in the hub layout; or set {WEIGHTS_ENV}=DIR)",
                self.name,
                revision=o["revision"],
                **diffusers_dtype_kwarg(torch_dtype(cfg["dtype"])),
            )
        if not isinstance(pipe, QwenImageEditPlusPipeline):
            raise WeightsUnavailableError(
                f"{self.name}: {o['model']} holds a {type(pipe).__name__}, not a QwenImageEditPlusPipeline "
                f"(model_index.json); use {MODEL_ID} or a folder in its layout"
            )
        pipe.set_progress_bar_config(disable=True)
        self._pipe = pipe.to(device)
        logger.info("%s: loaded %s (%s) on %s", self.name, o["model"], cfg["dtype"], device)

    # ------------------------------------------------------------------------------------------ generation

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        require_setup(self._pipe, self.name)
        return [self._generate_one(r) for r in requests]

    def pipeline_call(self, request: GenerationRequest) -> dict[str, Any]:
        """The keyword arguments of the pipeline call for ``request`` (what the card passes, plus the square size)."""
        cfg = self.config()
        references = [s.reference.convert("RGB") for s in request.subjects]
        if not references:
            raise ValueError(f"{self.name}: task {request.task.id} has no subject")
        if len(references) > MAX_SUBJECTS:
            raise ValueError(
                f"{self.name}: task {request.task.id} has {len(references)} subjects; the method takes at most "
                f"{MAX_SUBJECTS}"
            )
        kwargs: dict[str, Any] = {
            "image": references,
            "prompt": request.prompt,
            "negative_prompt": cfg["negative_prompt"],
            "true_cfg_scale": cfg["true_cfg_scale"],
            "num_inference_steps": cfg["steps"],
            "height": cfg["resolution"],
            "width": cfg["resolution"],
            "num_images_per_prompt": 1,
            "generator": seeded_generator(request.seed),
            "output_type": "pil",
        }
        if self._pipe is not None and self._pipe.transformer.config.guidance_embeds:
            kwargs["guidance_scale"] = cfg["distilled_guidance"]
        return kwargs

    def _generate_one(self, request: GenerationRequest) -> Image.Image:
        import torch

        kwargs = self.pipeline_call(request)
        with torch.inference_mode():
            out = self._pipe(**kwargs)
        return out.images[0].convert("RGB")


__all__ = ["MODEL_ID", "MODEL_REVISION", "QwenImageEditMethod", "WEIGHTS_ENV", "WeightsUnavailableError"]
