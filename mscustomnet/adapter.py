"""``mscustomnet``: the msibench method running MS-CustomNet (K subject tokens + the layout map M_L, DDIM + CFG).

Construction is cheap and imports no torch (``msibench ls`` lists methods without it); ``setup`` loads the model
folder written by ``mscustomnet train`` (or any folder in our format, or a hub id + revision), reporting each
loading stage (a progress bar on a terminal, INFO log lines).

Resolution: by default the method generates at the resolution the model was trained at (its ``config.json``): the
fingerprint records it for a local folder (read without torch); for a hub id it records "model", which the pinned
weights and revision determine. ``-M resolution=N`` overrides it, and setup then says that it differs and why.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

from mscustomnet.model.schedule import check_sampler_options, sampler_description
from msibench.methods.base import Capabilities, GenerationRequest, Method, coerce_options
from msibench.methods.harness import DTYPES, check_choice, env_default, require_setup, torch_dtype
from msibench.weights import WeightFiles

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

WEIGHTS_ENV = "MSCUSTOMNET_WEIGHTS"
_HINT = (
    "Pass -M weights=PATH (a model folder written by `mscustomnet train`, with config.json and model.safetensors) "
    f"or a hub id with -M revision=..., or set {WEIGHTS_ENV}."
)


class MSCustomNetMethod(Method):
    name: ClassVar[str] = "mscustomnet"
    batch_size = 4
    # No published weights: a model folder you train (msibench weights ls lists it as manual).
    weights: ClassVar[tuple[WeightFiles, ...]] = (
        WeightFiles(
            "mscustomnet train",
            ("config.json", "model.safetensors"),
            what="MS-CustomNet (trained here)",
            source="manual",
            note=f"no published weights: `mscustomnet train` writes the folder; -M weights=DIR or {WEIGHTS_ENV}",
        ),
    )
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "weights": "",
        "revision": "",
        "steps": 50,
        # CustomNet's DDIM schedule (customnet/ddim.py): 49 timesteps 961 ... 1 for 50 steps; or "all-steps".
        "schedule": "official",
        "guidance": 3.0,
        "resolution": 0,  # 0: the model's own resolution (its config.json)
        "dtype": "float32",
        # MS-CustomNet's own conditioning; "thumbnail" + "white" is CustomNet's app's (a step-0 MS-CustomNet then
        # reproduces CustomNet at K = 1).
        "reference_fit": "upscale",
        "canvas": "black",
    }
    DTYPES: ClassVar[tuple[str, ...]] = DTYPES

    def __init__(self, **options: Any) -> None:
        self.options = coerce_options(self.DEFAULTS, options, self.name)
        if not self.options["weights"]:
            self.options["weights"] = env_default(WEIGHTS_ENV, "")
        check_choice(self.options, "dtype", self.DTYPES, self.name)
        check_sampler_options(self.options, self.name)
        for key, allowed in (("reference_fit", ("thumbnail", "upscale")), ("canvas", ("black", "white"))):
            if self.options[key] not in allowed:
                raise ValueError(f"{self.name} option {key!r}: {self.options[key]!r} is not one of {allowed}")
        if int(self.options["resolution"]) != 0 and int(self.options["resolution"]) < 8:
            raise ValueError(f"{self.name} option 'resolution': must be at least 8 (or 0: the model's own)")
        self._pipeline = None

    @property
    def capabilities(self) -> Capabilities:
        # A model trained without M_L (the ablation baseline) samples on a blank canvas: it uses no layout.
        uses_layout = self._uses_layout()
        return Capabilities(max_subjects=5, uses_layout=uses_layout, uses_zorder=uses_layout)

    def _model_info(self) -> dict[str, Any] | None:
        from mscustomnet.model.io import read_model_info

        weights = self.options["weights"]
        return read_model_info(weights) if weights else None

    def _weights_sha256(self) -> str | None:
        info = self._model_info()
        return info.get("weights_sha256") if info else None

    def _uses_layout(self) -> bool:
        info = self._model_info()
        return bool(info.get("config", {}).get("use_layout", True)) if info else True

    def _training_summary(self) -> dict[str, Any] | None:
        """What the model folder's training record says about the paper's switches (M_L, DST, CLSQ), for matching
        a run to the paper's configuration; None for a folder without one (converted or foreign weights)."""
        info = self._model_info() or {}
        trained = ((info.get("metadata") or {}).get("training") or {}).get("config")
        if not isinstance(trained, dict):
            return None
        return {
            "use_layout": bool((trained.get("model") or {}).get("use_layout", True)),
            "dual_stage": len((trained.get("train") or {}).get("stages") or []) > 1,
            "curriculum": bool((trained.get("curriculum") or {}).get("enabled", False)),
        }

    def config(self) -> dict[str, Any]:
        o = self.options
        return {
            "weights": o["weights"],
            "revision": o["revision"] or None,
            # A local folder is identified by its content, a hub id by its revision.
            "weights_sha256": self._weights_sha256(),
            "training": self._training_summary(),
            "steps": int(o["steps"]),
            "guidance": float(o["guidance"]),
            "resolution": self._fingerprint_resolution(),
            "dtype": o["dtype"],
            "sampler": sampler_description(o["schedule"]),
            "cfg": "one scale over text+subjects+layout; uncond = zero layout latent, no subject, empty prompt",
            # The default strings are those of version 2, so runs made before these options keep their fingerprint.
            "reference": (
                "object cropped to mask, long edge scaled to 200 (Lanczos) on a 256 white square"
                if o["reference_fit"] == "upscale"
                else "object cropped to mask, PIL thumbnail to 200 (never enlarged) on a 256 white square"
            ),
            "output": "clamp((x+1)/2,0,1)*255 truncated to uint8",
            "layout": self._layout_description(),
            "version": 2,
        }

    def _layout_description(self) -> str:
        if not self._uses_layout():
            return "none: the model was trained without M_L and samples on a blank white canvas"
        if self.options["canvas"] == "white":
            return "CustomNet's app canvas: reference squares resized into boxes on white, back to front by z"
        return "M_L: references resized to boxes, pasted through masks on black, back to front by z"

    def _fingerprint_resolution(self) -> int | str:
        # Not the loaded model's: the fingerprint must be the same before and after setup.
        if int(self.options["resolution"]):
            return int(self.options["resolution"])
        info = self._model_info()
        if info and "resolution" in (info.get("config") or {}):
            return int(info["config"]["resolution"])
        return "model"

    def setup(self, device: str) -> None:
        from tqdm import tqdm

        from mscustomnet.model.io import LOAD_STAGES, load_model
        from mscustomnet.model.pipeline import MSCustomNetPipeline, check_resolution

        expected = self._weights_sha256()
        # A bar on a terminal (tqdm hides it elsewhere); the stages are logged at INFO either way.
        bar = tqdm(total=len(LOAD_STAGES), desc=f"{self.name}: loading", unit="stage", disable=None, leave=False)

        started: list[str] = []

        def stage(text: str) -> None:
            if started:  # the previous stage is done
                bar.update(1)
            started.append(text)
            bar.set_postfix_str(text[:80], refresh=True)

        try:
            model = load_model(
                self.options["weights"],
                revision=self.options["revision"] or None,
                device=device,
                dtype=torch_dtype(self.options["dtype"]),
                what="MS-CustomNet",
                hint=_HINT,
                progress=stage,
            )
            bar.update(bar.total - bar.n)
        finally:
            bar.close()
        if not model.config.multi_subject:
            raise ValueError(
                f"{self.options['weights']}: holds a {model.config.name} model without a category encoder; "
                "mscustomnet needs MS-CustomNet weights (the customnet method runs CustomNet ones)"
            )
        if self.options["canvas"] == "white" and not model.config.use_layout:
            raise ValueError(
                f"{self.name} option 'canvas': 'white' needs a model trained with M_L; {self.options['weights']} "
                "was trained without it and samples on a blank canvas"
            )
        if self._weights_sha256() != expected:
            raise RuntimeError(f"{self.options['weights']}: weights changed while the method was being set up")
        trained = int(model.config.resolution)
        asked = int(self.options["resolution"])
        try:
            check_resolution(model, asked or trained)
        except ValueError as err:
            raise ValueError(f"{self.name} option 'resolution': {err}") from None
        self._pipeline = MSCustomNetPipeline(model)
        if asked and asked != trained:
            log.warning(
                "%s: generating at %d px as -M resolution=%d asks, although the model was trained at %d px (its "
                "config.json); leave the option out to generate at %d",
                self.name, asked, asked, trained, trained,
            )  # fmt: skip
        else:
            log.info("%s: generating at %d px, the resolution of the model (its config.json)", self.name, trained)

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        from mscustomnet.model.pipeline import Subject
        from msibench.coco import CATEGORY_INDEX

        require_setup(self._pipeline, self.name)
        rows = []
        for request in requests:
            row = []
            for s in request.subjects:
                if s.category_id not in CATEGORY_INDEX:
                    raise ValueError(f"task {request.task.id}: category id {s.category_id} is not a COCO category")
                row.append(
                    Subject(
                        reference=s.reference,
                        mask=s.mask,
                        box=tuple(s.box),
                        z=s.z,
                        category_index=CATEGORY_INDEX[s.category_id],
                    )
                )
            rows.append(row)
        o = self.options
        return self._pipeline(
            [r.prompt for r in requests],
            rows,
            [r.seed for r in requests],
            steps=int(o["steps"]),
            guidance=float(o["guidance"]),
            resolution=int(o["resolution"]) or None,  # None: the model's own
            schedule=o["schedule"],
            reference_fit=o["reference_fit"],
            canvas=o["canvas"],
        )


__all__ = ["MSCustomNetMethod", "WEIGHTS_ENV"]
