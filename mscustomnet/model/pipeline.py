"""Sampling: DDIM with classifier-free guidance, and the CustomNet / MS-CustomNet input builders.

Facts from TencentARC/CustomNet@23a378f:

- ``ldm/modules/diffusionmodules/util.py:46-60`` ``make_ddim_timesteps('uniform')`` builds the grid
  range(0, 1000, 1000 // S) + 1, but ``customnet/ddim.py:134,149`` (``ddim_sampling(..., t_start=-1)``,
  ``timesteps = timesteps[:t_start]``) drops its last, noisiest point: for S = 50 the model is evaluated at the
  49 timesteps 961, 941, ..., 1, the pure starting noise standing in for x_961 (``ddim.py:138-139``); each step
  goes to the alpha of the next grid point (``util.py:65-66``), the last to alphas_cumprod[0]; eta 0.
- ``main/app.py`` ``run_generation``: 50 DDIM steps; ``cfg_type 0`` with ``"all": 3.0`` is one guidance scale over
  all conditions, e = e_uncond + 3.0 * (e_cond - e_uncond); the unconditional input is a zero concat latent, a
  zero image token and the text "" (``neg_prompt``); images are 256 x 256 (latent 4 x 32 x 32).
- ``ldm/util.py:63-86`` ``load_and_preprocess``: the reference is the object on white, cropped to its mask box,
  ``thumbnail([200, 200], LANCZOS)`` (shrunk so its long edge is at most 200 px, never enlarged) and centred on a
  256 x 256 white square (``add_margin``, ``util.py:40-44``); that square is both the CLIP input and what is
  pasted on the canvas.
- ``main/app.py:100-119`` ``prepare_data``: the whole 256 square, white margin included, is resized bilinearly
  (``F.interpolate(..., mode="bilinear")``: align_corners False, no antialias) to the user's integer box
  (x0, y0, x1, y1) on the 256 canvas, aspect not kept, and written into an all-white canvas.
- ``data/dataset.py`` (training): the pasted square has side ``max(w, h) * 256 / 200`` around the object box
  (so the object itself spans the box), bilinear resize, clipped at the canvas border; the canvas is white.
- ``main/app.py:172-173``: the decoded image is clamp((x + 1) / 2, 0, 1) * 255 cast with ``astype(np.uint8)``,
  i.e. truncated, not rounded.

MS-CustomNet: the K subject tokens and the layout map M_L (``mscustomnet.data.layout``: references resized to their
boxes and pasted through their masks on a black canvas, back to front in z order) replace the single token and
the white canvas; the same sampler and guidance are used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mscustomnet.model.network import CustomNetModel, viewpoint_vector
from mscustomnet.model.schedule import DEFAULT_SCHEDULE, SCHEDULES, ddim_timesteps

REFERENCE_SIZE = 256
REFERENCE_OBJECT_SIZE = 200
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 3.0
#: How a reference is fitted into its 200 px: the official thumbnail (only shrinks) or scaled to exactly 200.
REFERENCE_FITS = ("thumbnail", "upscale")
#: Where CustomNet's reference square goes: as the official app (into the box) or as its training data.
PLACEMENTS = ("app", "dataset")
#: MS-CustomNet's concat input: M_L on black (paper Eq. 4) or CustomNet's app canvas (reference squares in their
#: boxes on white), with which a step-0 MS-CustomNet reproduces CustomNet at K = 1.
CANVASES = ("black", "white")


@dataclass(frozen=True)
class Conditioning:
    """Model inputs besides z_t and t: layout latent [B, 4, h, w], subject tokens [B, K, D] with mask [B, K]
    (True = present) and text states [B, 77, D]."""

    layout_latents: torch.Tensor
    subject_tokens: torch.Tensor
    subject_mask: torch.Tensor
    text_embeds: torch.Tensor

    def unconditional(self, null_text: torch.Tensor) -> Conditioning:
        """Zero layout latent, no subject, the "" prompt (CustomNet's unconditional input)."""
        return Conditioning(
            layout_latents=torch.zeros_like(self.layout_latents),
            subject_tokens=torch.zeros_like(self.subject_tokens),
            subject_mask=torch.zeros_like(self.subject_mask),
            text_embeds=null_text.to(self.text_embeds).expand_as(self.text_embeds),
        )


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Starting latents [len(seeds), *shape], one CPU generator per seed: a sample never depends on its batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def ddim_sample(
    model: CustomNetModel,
    cond: Conditioning,
    noise: torch.Tensor,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    schedule: str = DEFAULT_SCHEDULE,
) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from ``noise`` to clean latents, with one guidance scale over all conditions.

    ``noise`` is taken as x at the first timestep of :func:`ddim_timesteps` (961 for 50 official steps)."""
    device = model.device
    alphas = model.alphas_cumprod(device)
    x = noise.to(device, torch.float32)
    if guidance != 1.0:
        uncond = cond.unconditional(model.encode_text([""]))
        both = Conditioning(*(torch.cat([u, c]) for u, c in zip(_fields(uncond), _fields(cond), strict=True)))
    timesteps = ddim_timesteps(steps, model.config.num_train_timesteps, schedule)
    for i, t in enumerate(timesteps):
        a_t = alphas[t]
        a_prev = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else alphas[0]
        if guidance == 1.0:
            eps = _eps(model, x, t, cond)
        else:
            eps_uncond, eps_cond = _eps(model, torch.cat([x, x]), t, both).chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def _fields(c: Conditioning) -> tuple[torch.Tensor, ...]:
    return (c.layout_latents, c.subject_tokens, c.subject_mask, c.text_embeds)


def _eps(model: CustomNetModel, x: torch.Tensor, t: int, c: Conditioning) -> torch.Tensor:
    ts = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    out = model.predict_noise(x, ts, c.layout_latents, c.subject_tokens, c.text_embeds, c.subject_mask)
    return out.float()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] images [B, 3, H, W] -> RGB PIL images, as CustomNet's app: clamp((x + 1) / 2, 0, 1) * 255 truncated
    to uint8 (``main/app.py:172-173``, ``astype(np.uint8)``)."""
    unit = torch.clamp((images.float() + 1.0) / 2.0, min=0.0, max=1.0).cpu().numpy()
    arr = (255.0 * unit).transpose(0, 2, 3, 1).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB image -> [3, H, W] float in [-1, 1]."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------- references
def prepare_reference(
    reference: Image.Image,
    mask: Image.Image | None = None,
    size: int = REFERENCE_SIZE,
    object_size: int = REFERENCE_OBJECT_SIZE,
    fit: str = "thumbnail",
) -> Image.Image:
    """CustomNet's reference square: the object on white, cropped to its mask box, fitted into ``object_size`` and
    centred on a ``size`` white square.

    ``fit="thumbnail"`` is the official ``load_and_preprocess`` (``ldm/util.py:82``, PIL ``thumbnail`` with Lanczos:
    only shrinks, so an object smaller than ``object_size`` keeps its size). ``fit="upscale"`` scales every object
    so that its long edge is exactly ``object_size`` (small COCO references then reach CLIP larger than a speck); it
    is :func:`mscustomnet.data.layout.reference_square`, the function the training Dataset cuts references with.
    """
    if fit not in REFERENCE_FITS:
        raise ValueError(f"reference fit {fit!r} is not one of {REFERENCE_FITS}")
    rgb = np.array(reference.convert("RGB"))
    inside = None if mask is None else np.asarray(mask.convert("L")) > 127
    if fit == "upscale":
        # The very function the training Dataset uses (MS-CustomNet's pipeline fits references this way).
        from mscustomnet.data.layout import reference_square

        return Image.fromarray(reference_square(rgb, inside, size, object_size)[0])
    if inside is not None:
        if inside.shape != rgb.shape[:2]:
            raise ValueError(f"mask size {inside.shape[::-1]} differs from reference size {rgb.shape[1::-1]}")
        rgb[~inside] = 255
        ys, xs = np.nonzero(inside)
        if len(ys):
            rgb = rgb[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    obj = Image.fromarray(rgb)
    obj.thumbnail((object_size, object_size), Image.Resampling.LANCZOS)
    square = Image.new("RGB", (size, size), (255, 255, 255))
    square.paste(obj, ((size - obj.size[0]) // 2, (size - obj.size[1]) // 2))
    return square


def app_box(box: Sequence[float], resolution: int) -> tuple[int, int, int, int]:
    """A normalised box as the integer pixel box (x0, y0, x1, y1) of CustomNet's app sliders on the canvas:
    each edge at the nearest pixel (halves up), at least one pixel wide and high, inside the canvas."""
    x0, y0, x1, y1 = (min(max(math.floor(float(v) * resolution + 0.5), 0), resolution) for v in box)
    x0, y0 = min(x0, resolution - 1), min(y0, resolution - 1)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def app_canvas(reference_square: Image.Image, box: Sequence[float], resolution: int) -> torch.Tensor:
    """CustomNet's concat input [3, R, R] in [-1, 1] as the official app builds it (``main/app.py:100-119``): the
    whole reference square resized bilinearly (align_corners False, no antialias) to the integer box, aspect not
    kept, on a white canvas."""
    x0, y0, x1, y1 = app_box(box, resolution)
    square = to_tensor(reference_square)[None]
    placed = F.interpolate(square, size=(y1 - y0, x1 - x0), mode="bilinear")[0]
    canvas = torch.ones(3, resolution, resolution)
    canvas[:, y0:y1, x0:x1] = placed
    return canvas


def customnet_canvas(
    reference_square: Image.Image, box: Sequence[float], resolution: int, object_size: int = REFERENCE_OBJECT_SIZE
) -> torch.Tensor:
    """CustomNet's concat input [3, R, R] in [-1, 1] as its training data builds it (``data/dataset.py``): the
    reference square resized to side max(w, h) * 256/200 around the normalised object ``box`` and pasted (clipped)
    on a white canvas, so that the object itself spans the box."""
    x0, y0, x1, y1 = (float(v) * resolution for v in box)
    w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    side = max(1, round(max(w, h) * reference_square.size[0] / object_size))
    left = round((x0 + x1) / 2 - side / 2)
    top = round((y0 + y1) / 2 - side / 2)
    square = to_tensor(reference_square)[None]
    square = F.interpolate(square, size=(side, side), mode="bilinear", align_corners=False)[0]
    canvas = torch.ones(3, resolution, resolution)
    cx0, cy0 = max(left, 0), max(top, 0)
    cx1, cy1 = min(left + side, resolution), min(top + side, resolution)
    if cx0 < cx1 and cy0 < cy1:
        canvas[:, cy0:cy1, cx0:cx1] = square[:, cy0 - top : cy1 - top, cx0 - left : cx1 - left]
    return canvas


def white_canvas(squares: Sequence[Image.Image], subjects: Sequence[Subject], resolution: int) -> torch.Tensor:
    """CustomNet's app canvas for several subjects: each reference square resized into its box as
    :func:`app_canvas` does, pasted back to front by ``z`` on white. For one subject it is :func:`app_canvas`."""
    canvas = torch.ones(3, resolution, resolution)
    for square, s in sorted(zip(squares, subjects, strict=True), key=lambda pair: pair[1].z):
        x0, y0, x1, y1 = app_box(s.box, resolution)
        canvas[:, y0:y1, x0:x1] = F.interpolate(to_tensor(square)[None], size=(y1 - y0, x1 - x0), mode="bilinear")[0]
    return canvas


def blank_canvas(batch: int, resolution: int) -> torch.Tensor:
    """The concat input of a network trained without M_L: white canvases [batch, 3, R, R] in [-1, 1]."""
    return torch.ones(batch, 3, resolution, resolution)


@dataclass(frozen=True)
class Subject:
    """One subject to generate: the white-background reference (and its mask), its normalised box (x0, y0, x1, y1)
    on the output, its depth rank ``z`` (0 = back), its category (contiguous 0..79 index; MS-CustomNet) and its
    viewpoint in degrees (CustomNet; default front)."""

    reference: Image.Image
    box: tuple[float, float, float, float]
    mask: Image.Image | None = None
    z: int = 0
    category_index: int | None = None
    polar: float = 0.0
    azimuth: float = 0.0


def layout_map(subjects: Sequence[Subject], resolution: int) -> Image.Image:
    """M_L at ``resolution``: references resized to their boxes, pasted through their masks back to front."""
    from mscustomnet.data.layout import Placement, compose_layout_map

    placements = []
    for s in sorted(subjects, key=lambda s: s.z):
        rgb = np.asarray(s.reference.convert("RGB"))
        mask = np.asarray(s.mask.convert("L")) > 127 if s.mask is not None else np.ones(rgb.shape[:2], dtype=bool)
        box = tuple(float(v) * resolution for v in s.box)
        placements.append(Placement(rgb=rgb, mask=mask, box=box))
    canvas, _ = compose_layout_map(resolution, resolution, placements)
    return Image.fromarray(canvas)


class _Pipeline:
    def __init__(self, model: CustomNetModel):
        self.model = model

    def _encode_subjects(
        self, subjects: Sequence[Sequence[Subject]], squares: Sequence[Image.Image]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Subject tokens from the reference ``squares`` (one per subject, row by row)."""
        model = self.model
        k = max(len(s) for s in subjects)
        squares = [to_tensor(square) for square in squares]
        embeds = model.encode_images(torch.stack(squares))
        dim = embeds.shape[-1]
        batch = len(subjects)
        image_embeds = torch.zeros(batch, k, dim, device=embeds.device, dtype=embeds.dtype)
        views = torch.zeros(batch, k, 4, device=embeds.device)
        views[..., 2] = 1.0  # cos(0): padding rows get the front view, they are masked anyway
        mask = torch.zeros(batch, k, dtype=torch.bool, device=embeds.device)
        categories = torch.full((batch, k), -1, dtype=torch.long, device=embeds.device)
        i = 0
        for b, row in enumerate(subjects):
            for j, s in enumerate(row):
                image_embeds[b, j] = embeds[i]
                views[b, j] = torch.tensor(viewpoint_vector(s.polar, s.azimuth))
                mask[b, j] = True
                if s.category_index is not None:
                    categories[b, j] = s.category_index
                i += 1
        cats = categories if model.config.multi_subject else None
        if cats is not None and bool((categories[mask] < 0).any()):
            raise ValueError(f"{model.config.name}: every subject needs a category_index")
        tokens = model.subject_tokens(image_embeds, views, cats) * mask.unsqueeze(-1)
        return tokens, mask, image_embeds

    def _run(
        self,
        prompts: Sequence[str],
        layouts: torch.Tensor,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        seeds: Sequence[int],
        steps: int,
        guidance: float,
        schedule: str,
    ) -> list[Image.Image]:
        model = self.model
        if not len(prompts) == len(seeds) == layouts.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts, {len(seeds)} seeds and {layouts.shape[0]} layouts")
        cond = Conditioning(
            layout_latents=model.encode_layout(layouts).float(),
            subject_tokens=tokens,
            subject_mask=mask,
            text_embeds=model.encode_text(list(prompts)),
        )
        size = layouts.shape[-1] // model.config.vae.scale_factor
        noise = initial_noise(seeds, (model.config.vae.latent_channels, size, size))
        latents = ddim_sample(model, cond, noise, steps=steps, guidance=guidance, schedule=schedule)
        return to_pil(model.decode_latents(latents))


class MSCustomNetPipeline(_Pipeline):
    """Multi-subject generation: K subject tokens + M_L, DDIM + CFG."""

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        subjects: Sequence[Sequence[Subject]],
        seeds: Sequence[int],
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        resolution: int | None = None,
        schedule: str = DEFAULT_SCHEDULE,
        reference_fit: str = "upscale",
        canvas: str = "black",
    ) -> list[Image.Image]:
        """``reference_fit="upscale"`` and ``canvas="black"`` are MS-CustomNet's own (every reference scaled to the
        200 px CLIP sees, small COCO objects included; M_L on black, Eq. 4). ``reference_fit="thumbnail"`` with
        ``canvas="white"`` conditions as CustomNet's app does, so that a step-0 MS-CustomNet (zero category columns)
        gives CustomNet's image for one subject: the sanity check the paper's initialisation implies."""
        resolution = resolution or self.model.config.resolution
        check_resolution(self.model, resolution)
        if reference_fit not in REFERENCE_FITS:
            raise ValueError(f"reference fit {reference_fit!r} is not one of {REFERENCE_FITS}")
        if canvas not in CANVASES:
            raise ValueError(f"canvas {canvas!r} is not one of {CANVASES}")
        if canvas == "white" and not self.model.config.use_layout:
            raise ValueError("canvas 'white' needs a model trained with M_L; this one samples on a blank canvas")
        if any(len(row) == 0 for row in subjects):
            raise ValueError("every request needs at least one subject")
        squares = [prepare_reference(s.reference, s.mask, fit=reference_fit) for row in subjects for s in row]
        tokens, mask, _ = self._encode_subjects(subjects, squares)
        if not self.model.config.use_layout:  # trained without M_L: the blank canvas it always saw
            layouts = blank_canvas(len(subjects), resolution)
        elif canvas == "white":
            rows, start = [], 0
            for row in subjects:
                rows.append(white_canvas(squares[start : start + len(row)], row, resolution))
                start += len(row)
            layouts = torch.stack(rows)
        else:
            layouts = torch.stack([to_tensor(layout_map(row, resolution)) for row in subjects])
        return self._run(prompts, layouts, tokens, mask, seeds, steps, guidance, schedule)


class CustomNetPipeline(_Pipeline):
    """Single-subject CustomNet: the reference square placed at its box on a white canvas, viewpoint input.

    Defaults are the official app's: ``reference_fit="thumbnail"`` (never enlarged), ``placement="app"`` (the
    square resized into the box); ``placement="dataset"`` places it as CustomNet's training data does."""

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        subjects: Sequence[Subject],
        seeds: Sequence[int],
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        resolution: int | None = None,
        schedule: str = DEFAULT_SCHEDULE,
        reference_fit: str = "thumbnail",
        placement: str = "app",
    ) -> list[Image.Image]:
        if self.model.config.multi_subject:
            raise ValueError("CustomNetPipeline needs a CustomNet (single-subject) model")
        resolution = resolution or self.model.config.resolution
        check_resolution(self.model, resolution)
        if reference_fit not in REFERENCE_FITS:
            raise ValueError(f"reference fit {reference_fit!r} is not one of {REFERENCE_FITS}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement {placement!r} is not one of {PLACEMENTS}")
        squares = [prepare_reference(s.reference, s.mask, fit=reference_fit) for s in subjects]
        tokens, mask, _ = self._encode_subjects([[s] for s in subjects], squares)
        place = app_canvas if placement == "app" else customnet_canvas
        layouts = torch.stack([place(square, s.box, resolution) for square, s in zip(squares, subjects, strict=True)])
        return self._run(prompts, layouts, tokens, mask, seeds, steps, guidance, schedule)


def check_resolution(model: CustomNetModel, resolution: int) -> None:
    """Refuse a resolution the model cannot generate (the latent must halve cleanly at every UNet level); adapters
    call it at setup, so a bad ``-M resolution`` stops the run before any sample instead of failing each one."""
    factor = model.config.vae.scale_factor * 2 ** (len(model.config.unet.block_out_channels) - 1)
    if resolution <= 0 or resolution % factor:
        raise ValueError(f"resolution {resolution} must be a positive multiple of {factor} for {model.config.name}")


__all__ = [
    "CANVASES",
    "PLACEMENTS",
    "REFERENCE_FITS",
    "Conditioning",
    "CustomNetPipeline",
    "DEFAULT_GUIDANCE",
    "DEFAULT_SCHEDULE",
    "DEFAULT_STEPS",
    "MSCustomNetPipeline",
    "SCHEDULES",
    "Subject",
    "app_box",
    "app_canvas",
    "check_resolution",
    "blank_canvas",
    "customnet_canvas",
    "ddim_sample",
    "ddim_timesteps",
    "initial_noise",
    "layout_map",
    "prepare_reference",
    "to_pil",
    "to_tensor",
    "white_canvas",
]
