"""``paste``: the oracle method. It composites each reference cut-out into its layout box.

Each reference is resized to fit inside its box with its aspect ratio kept (centred), then pasted through its
mask, back to front by z-order, over a flat neutral background. No generative model is involved: it is the
CPU main job of the harness and the sanity ceiling for identity and layout scores.
"""

from __future__ import annotations

from typing import Any, ClassVar

from msibench.methods.base import Capabilities, GenerationRequest, Method, coerce_options


class PasteMethod(Method):
    name: ClassVar[str] = "paste"
    batch_size = 8
    DEFAULTS: ClassVar[dict[str, Any]] = {"resolution": 512, "background": [127, 127, 127], "resample": "lanczos"}

    def __init__(self, **options: Any) -> None:
        self.options = coerce_options(
            self.DEFAULTS, options, "paste", bounds={"resolution": (8, 4096), "background": (0, 255)}
        )
        if self.options["resample"] not in ("lanczos", "bicubic", "bilinear", "nearest"):
            raise ValueError(f"paste option 'resample': unknown filter {self.options['resample']!r}")

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(max_subjects=64, uses_layout=True, uses_zorder=True)

    def config(self) -> dict[str, Any]:
        return {
            "resolution": int(self.options["resolution"]),
            "background": [int(v) for v in self.options["background"]],
            "resample": self.options["resample"],
            "version": 1,
        }

    def setup(self, device: str) -> None:
        """Nothing to load: paste runs on the CPU whatever the device."""

    def generate(self, requests: list[GenerationRequest]) -> list[Any]:
        return [self._compose(r) for r in requests]

    def _compose(self, request: GenerationRequest):
        from PIL import Image

        cfg = self.config()
        size = cfg["resolution"]
        resample = getattr(Image.Resampling, cfg["resample"].upper())
        canvas = Image.new("RGB", (size, size), tuple(cfg["background"]))
        for subject in sorted(request.subjects, key=lambda s: s.z):
            x0, y0, x1, y1 = (v * size for v in subject.box)
            box_w, box_h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
            ref_w, ref_h = subject.reference.size
            scale = min(box_w / ref_w, box_h / ref_h)
            w, h = max(1, round(ref_w * scale)), max(1, round(ref_h * scale))
            left = round(x0 + (box_w - w) / 2.0)
            top = round(y0 + (box_h - h) / 2.0)
            cutout = subject.reference.convert("RGB").resize((w, h), resample)
            alpha = subject.mask.convert("L").resize((w, h), Image.Resampling.BILINEAR)
            canvas.paste(cutout, (left, top), alpha)
        return canvas
