"""``customnet``: CustomNet (Yuan et al., 2023, arXiv 2310.19784) with its public checkpoint, as an msibench method.

The network is MS-CustomNet's in its single-subject configuration (``mscustomnet.model``: dual-attention UNet,
SD VAE, OpenAI CLIP ViT-L/14 towers, ``cc_projection``); this file only chooses the weights and turns a benchmark
request into CustomNet's inputs:

- the subject's white-background cut-out is CustomNet's reference, prepared as the official app does
  (``main/app.py`` + ``ldm/util.py`` ``load_and_preprocess``): cropped to its mask, ``thumbnail`` to at most
  200 px (shrunk, never enlarged: 65 of the 100 single-track references of MSIBench v1 are under 200 px) and
  centred on a 256 white square (``-M reference_fit=upscale`` scales every object to exactly 200 px);
- the concat input places that whole square into the task's layout box as the app places it into the user's box
  (``main/app.py`` ``prepare_data``: bilinear resize to the integer box, aspect not kept, white canvas;
  ``mscustomnet.model.pipeline.app_canvas``); ``-M placement=dataset`` places it as CustomNet's training data
  does instead (``data/dataset.py``: the square enlarged so that the object itself spans the box,
  ``customnet_canvas``);
- the viewpoint is the front view, polar = azimuth = 0 (``-M polar=``/``-M azimuth=`` change it);
- DDIM with eta 0 on CustomNet's own timestep schedule (49 model evaluations, 961 ... 1, for 50 steps;
  ``-M schedule=all-steps`` visits the whole grid 981 ... 1) and one guidance scale over all conditions against a
  zero concat latent, a zero subject token and the empty prompt (``mscustomnet.model.pipeline.ddim_sample``).

One subject per image: multi-subject tasks are skipped by the runner (the paper's "–" cells). The z-order is not
used (there is only one object).

Weights (``-M weights=...``, default ``$MSIBENCH_CUSTOMNET_WEIGHTS``, else the hub):

- a model folder written by ``mscustomnet convert-customnet`` (config.json + model.safetensors);
- the official checkpoint file itself (``customnet_v1.pt``), converted in memory by ``mscustomnet.model.convert``;
- a hub repo id with ``-M weights_file=`` and ``-M revision=`` (default ``TencentARC/CustomNet``, ``customnet_v1.pt``),
  downloaded with ``huggingface_hub`` on first use (``msibench weights fetch --method customnet`` beforehand;
  read from the hub cache only when the hub cannot be reached).

Defaults are the official ones, from TencentARC/CustomNet@23a378fc8cfcec72181cc4fd625c708f9485e490:
``main/app.py`` (``run_generation``: ``sampler.sample(S=50, ...)``, ``cfg_type=0`` with ``"all": 3.0``,
``neg_prompt = ""``, latent shape [4, 32, 32] i.e. 256 x 256 images, output truncated to uint8; ``main``:
``torch.load("pretrain/customnet_v1.pt")`` into a float32 model, no half precision; the polar and azimuth sliders
default to 0.0; ``prepare_data``: the reference square into the box), ``customnet/ddim.py`` (``sample(...,
eta=0.)``, ``t_start=-1``), ``ldm/util.py`` (``load_and_preprocess``).
The README links the file as ``customnet_v1.pth`` on huggingface.co/TencentARC/CustomNet while ``main/app.py``
loads ``customnet_v1.pt``; ``-M weights_file=`` takes whichever name the hub holds.

torch / diffusers / transformers are imported inside methods only, so that ``msibench ls`` stays light.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mscustomnet.model.schedule import check_sampler_options, sampler_description
from msibench.cache import sha256_file
from msibench.methods.base import (
    Capabilities,
    GenerationRequest,
    Method,
    WeightsUnavailableError,
    coerce_options,
)
from msibench.methods.harness import DTYPES, check_choice, env_default, require_setup, torch_dtype
from msibench.weights import WeightFiles, fetch_remedy, hub_download, hub_failure

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch
    from PIL import Image

    from mscustomnet.model.config import ModelConfig
    from mscustomnet.model.network import CustomNetModel
    from msibench.bench.manifest import Task

logger = logging.getLogger(__name__)

WEIGHTS_ID = "TencentARC/CustomNet"
WEIGHTS_FILE = "customnet_v1.pt"
# The hub commit of the release could not be resolved here (no hub access): "main" until someone pins it with
# -M revision=<commit>; the fingerprint records whatever revision is used.
WEIGHTS_REVISION = "main"
WEIGHTS_ENV = "MSIBENCH_CUSTOMNET_WEIGHTS"
#: Local names that are checkpoint files, never hub ids (hub repo names may contain dots, not these endings).
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
IMPLEMENTATION_VERSION = 2

_HINT = fetch_remedy(
    "customnet",
    f"-M weights=PATH (the {WEIGHTS_FILE} file, or a folder converted from it by `mscustomnet convert-customnet`; "
    f"or set {WEIGHTS_ENV}=PATH)",
)


def weights_source(source: str) -> tuple[str, Path | None]:
    """Classify ``source``: ``("folder", path)``, ``("file", path)`` or ``("hub", None)``.

    A name that is clearly a path (a checkpoint suffix, a leading ``.``/``/``/``~``, not ``owner/name``) but does
    not exist raises :class:`WeightsUnavailableError` instead of being tried on the hub.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder", path.resolve()
    if path.is_file():
        return "file", path.resolve()
    if source.endswith(CHECKPOINT_SUFFIXES) or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise WeightsUnavailableError(f"customnet: weights {source!r}: no such file or folder. {_HINT}")
    return "hub", None


def model_from_checkpoint(
    checkpoint: Mapping[str, torch.Tensor],
    config: ModelConfig | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    where: str = "CustomNet checkpoint",
) -> CustomNetModel:
    """Our CustomNet model holding the tensors of an official LatentDiffusion state dict (``customnet_v1.pt``).

    The key mapping is ``mscustomnet.model.convert``'s: every checkpoint key feeds one of our tensors or is on its
    commented ``IGNORED_KEYS`` list, and every tensor of ours is filled (strict, assigned from the checkpoint, never
    initialised). A checkpoint of anything else raises ``ConversionError`` naming ``where`` and the keys.
    """
    from mscustomnet.model.config import customnet_config
    from mscustomnet.model.convert import ConversionError, convert_customnet_state_dict
    from mscustomnet.model.network import CustomNetModel

    config = config or customnet_config()
    model = CustomNetModel.empty(config)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    try:
        converted = convert_customnet_state_dict(checkpoint, shapes, config)
    except ConversionError as err:
        raise ConversionError(f"{where}: {err}") from err
    state = {
        key: value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else None)
        for key, value in converted.items()
    }
    model.load_weights(state, where=where)
    model.to(device)
    return model.eval()


class CustomNetMethod(Method):
    name: ClassVar[str] = "customnet"
    # The file setup() loads with the default options (msibench weights fetch --method customnet).
    weights: ClassVar[tuple[WeightFiles, ...]] = (
        WeightFiles(
            WEIGHTS_ID, (WEIGHTS_FILE,), None if WEIGHTS_REVISION == "main" else WEIGHTS_REVISION, "CustomNet"
        ),
    )
    # Batched like mscustomnet (same network and pipeline); each sample's noise comes from its own seed.
    batch_size = 4
    DEFAULTS: ClassVar[dict[str, Any]] = {
        # "" = $MSIBENCH_CUSTOMNET_WEIGHTS, else the hub repo.
        "weights": "",
        "weights_file": WEIGHTS_FILE,
        "revision": WEIGHTS_REVISION,
        "steps": 50,
        # "official": customnet/ddim.py's schedule (49 timesteps 961 ... 1 for 50 steps); "all-steps": the whole grid.
        "schedule": "official",
        "guidance": 3.0,
        "resolution": 256,
        "dtype": "float32",
        "polar": 0.0,
        "azimuth": 0.0,
        # The official app's reference (PIL thumbnail: only shrinks) and placement (the square into the box).
        "reference_fit": "thumbnail",
        "placement": "app",
    }

    def __init__(self, **options: Any) -> None:
        self.options = coerce_options(self.DEFAULTS, options, self.name)
        o = self.options
        if not o["weights"]:
            o["weights"] = env_default(WEIGHTS_ENV, WEIGHTS_ID)
        check_choice(o, "dtype", DTYPES, self.name)
        check_sampler_options(o, self.name)
        check_choice(o, "reference_fit", ("thumbnail", "upscale"), self.name)
        check_choice(o, "placement", ("app", "dataset"), self.name)
        if int(o["resolution"]) < 8:
            raise ValueError(f"{self.name} option 'resolution': must be at least 8, got {o['resolution']!r}")
        self._config: dict[str, Any] | None = None
        self._file_stat: tuple[int, int] | None = None
        self._pipeline = None

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(max_subjects=1, uses_layout=True, uses_zorder=False, tracks=("single",))

    def can_do(self, task: Task) -> str | None:
        reason = super().can_do(task)
        if reason is not None:
            reason += " (CustomNet customises one object per image)"
        return reason

    # ------------------------------------------------------------------------------------------ weights

    def _weights_record(self) -> dict[str, Any]:
        from mscustomnet.model.config import ModelConfig
        from mscustomnet.model.io import read_model_info, resolve_weights

        o = self.options
        kind, path = weights_source(o["weights"])
        if kind == "hub":
            return {"repo": o["weights"], "file": o["weights_file"], "revision": o["revision"]}
        # Local copies are identified by their content, not by where they happen to live.
        if kind == "file":
            stat = path.stat()
            self._file_stat = (stat.st_size, stat.st_mtime_ns)
            return {"format": "official checkpoint", "file": path.name, "sha256": sha256_file(path)}
        info = read_model_info(resolve_weights(str(path), what="CustomNet", hint=_HINT))
        config = ModelConfig.from_dict(info["config"])
        if config.multi_subject:
            raise ValueError(
                f"{path}: holds a {config.name} model with a category encoder; customnet needs CustomNet weights "
                "(the mscustomnet method runs MS-CustomNet ones)"
            )
        return {"format": info["format"], "model": config.name, "weights_sha256": info["weights_sha256"]}

    def config(self) -> dict[str, Any]:
        if self._config is None:
            o = self.options
            self._config = {
                "weights": self._weights_record(),
                "steps": int(o["steps"]),
                "guidance": float(o["guidance"]),
                "resolution": int(o["resolution"]),
                "dtype": o["dtype"],
                "viewpoint": {"polar": float(o["polar"]), "azimuth": float(o["azimuth"])},
                "sampler": sampler_description(o["schedule"]),
                "cfg": "one scale over text+subject+location; uncond = zero concat latent, zero subject token, ''",
                "reference": (
                    "object cropped to mask, PIL thumbnail (200, 200) Lanczos (never enlarged), centred on a 256 "
                    "white square"
                    if o["reference_fit"] == "thumbnail"
                    else "object cropped to mask, long edge scaled to 200 (Lanczos), centred on a 256 white square"
                ),
                "placement": (
                    "main/app.py: the whole square resized bilinearly (no antialias) to the box rounded to pixels, "
                    "on a white canvas"
                    if o["placement"] == "app"
                    else "data/dataset.py: square resized so the object spans the layout box, on a white canvas"
                ),
                "output": "clamp((x+1)/2,0,1)*255 truncated to uint8",
                "version": IMPLEMENTATION_VERSION,
            }
        return self._config

    def setup(self, device: str) -> None:
        from mscustomnet.model.convert import read_checkpoint
        from mscustomnet.model.io import load_model
        from mscustomnet.model.pipeline import CustomNetPipeline, check_resolution

        cfg = self.config()
        o = self.options
        dtype = torch_dtype(o["dtype"])
        kind, path = weights_source(o["weights"])
        if kind == "folder":
            model = load_model(path, device=device, dtype=dtype, what="CustomNet", hint=_HINT)
            # config() has refused MS-CustomNet folders already; this catches a folder rewritten since.
            if self._weights_record() != cfg["weights"]:
                raise RuntimeError(f"{path}: weights changed after the run was fingerprinted")
        else:
            if kind == "hub":
                path = self._download()
            else:
                stat = path.stat()
                if (stat.st_size, stat.st_mtime_ns) != self._file_stat:
                    raise RuntimeError(f"{path}: file changed after the run was fingerprinted")
            model = model_from_checkpoint(read_checkpoint(path), device=device, dtype=dtype, where=str(path))
        try:
            check_resolution(model, int(o["resolution"]))
        except ValueError as err:
            raise ValueError(f"{self.name} option 'resolution': {err}") from None
        self._pipeline = CustomNetPipeline(model)
        logger.info("customnet: loaded %s (%s) on %s", path or o["weights"], o["dtype"], device)

    def _download(self) -> Path:
        o = self.options
        try:
            return hub_download(o["weights"], o["weights_file"], o["revision"])  # cache only when the hub is down
        except Exception as err:  # offline, unknown repo, revision or file: one readable message for all
            raise WeightsUnavailableError(
                f"customnet: cannot get {o['weights']} {o['weights_file']} (revision {o['revision']}) from the hub: "
                f"{hub_failure(err)}. {_HINT}"
            ) from err

    # ------------------------------------------------------------------------------------------ generation

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        from mscustomnet.model.pipeline import Subject

        require_setup(self._pipeline, self.name)
        o = self.options
        subjects = []
        for request in requests:
            if len(request.subjects) != 1:
                raise ValueError(
                    f"task {request.task.id}: {self.name} generates exactly one subject, got {len(request.subjects)}"
                )
            s = request.subjects[0]
            subjects.append(
                Subject(
                    reference=s.reference,
                    mask=s.mask,
                    box=tuple(s.box),
                    z=s.z,
                    polar=float(o["polar"]),
                    azimuth=float(o["azimuth"]),
                )
            )
        return self._pipeline(
            [r.prompt for r in requests],
            subjects,
            [r.seed for r in requests],
            steps=int(o["steps"]),
            guidance=float(o["guidance"]),
            resolution=int(o["resolution"]),
            schedule=o["schedule"],
            reference_fit=o["reference_fit"],
            placement=o["placement"],
        )


__all__ = ["CustomNetMethod", "WEIGHTS_ENV", "WEIGHTS_FILE", "WEIGHTS_ID", "model_from_checkpoint", "weights_source"]
