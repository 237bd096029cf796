"""The one module that loads scoring backbones: the YOLO11 detector/segmenter, DINO ViT-S/16 and CLIP ViT-B/32.

Every loader takes a *spec*: a hub id or tag, a weight file name, a local path, or ``random`` (the real
architecture with random weights, built offline, for tests and benchmarks). Without a spec the loader reads its
environment variable (``MSIBENCH_YOLO_WEIGHTS``, ``MSIBENCH_DINO_WEIGHTS``, ``MSIBENCH_CLIP_WEIGHTS``), then
falls back to the published default. Nothing here ever downloads: hub weights are read from the local hub cache
only (``local_files_only``; open_clip and timm are handed the cached file), YOLO weights from local folders
(ultralytics' ``YOLO("yolo11x.pt")`` would fetch a missing file, so the file is located here first). Weights that
are not available offline raise :class:`BackboneError`, whose message names the model and says how to provide
it; ``msibench weights fetch --scorers`` downloads the defaults, declared in :data:`SCORER_WEIGHTS`.

Each loaded backbone carries an ``identity`` string that names its weights exactly (file name + sha256, hub id +
revision, or random + seed + torch version). It is part of the scorer version and of every feature-cache key.

Tests inject their own encoders with :func:`image_encoder_from_callable` (a callable from a preprocessed image
batch to features), so no network or real weights are needed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from msibench.cache import cache_dir, sha256_file
from msibench.coco import CATEGORY_ID, COCO_CATEGORIES
from msibench.weights import WeightFiles, locate_hub_file, snapshot_commit

if TYPE_CHECKING:
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

DINO_ENV = "MSIBENCH_DINO_WEIGHTS"
CLIP_ENV = "MSIBENCH_CLIP_WEIGHTS"
YOLO_ENV = "MSIBENCH_YOLO_WEIGHTS"
RANDOM = "random"

# DreamBooth's DINO-I uses the DINO ViT-S/16 checkpoint published as facebook/dino-vits16 (Ruiz et al. 2023,
# Sec. 4.1); timm ships the same weights as vit_small_patch16_224.dino.
DEFAULT_DINO = "facebook/dino-vits16"
DINO_TIMM_ARCH = "vit_small_patch16_224.dino"
# OpenAI CLIP ViT-B/32 through open_clip; the OpenAI weights were trained with QuickGELU.
CLIP_ARCH = "ViT-B-32"
DEFAULT_CLIP = "openai"
# One YOLO11x-seg pass gives boxes, classes and masks (see scorer.py for why detection uses the -seg model).
DEFAULT_DETECTOR = "yolo11x-seg.pt"
YOLO_ASSETS_URL = "https://github.com/ultralytics/assets/releases"

# Where the defaults come from (``msibench weights fetch --scorers``), pinned: the hub repos by commit, the YOLO11
# asset by its release tag. The two hub commits were not read from the hub (no hub access where this was written):
# they are the snapshot commits that public projects pin for these repos, found by code search: DINO's in two
# independent pinned-revision configs; CLIP's, with the file's sha256 and size (605,143,284 bytes), in more than
# five. A wrong commit fails the fetch naming it; a file that differs from the pinned sha256 is refused.
YOLO_RELEASE = "v8.3.0"
DINO_REVISION: str | None = "abe3b354cb6a9b6f146096b14a4a9d7eecbcb4bd"
# sha256 of facebook/dino-vits16's pytorch_model.bin, from the hub's Git LFS details of the file
# (huggingface.co/facebook/dino-vits16/blob/a7a4d161f5c0bd70478c05ca5777ec7cd8848021/pytorch_model.bin, found by
# search): the file was last changed in the repo's "First commit" (fbc9830, Aug 2021), before the pinned abe3b35
# (May 2023, a README edit), so it is the same file at the pinned revision.
DINO_FILE = "pytorch_model.bin"
DINO_SHA256 = "a5bb4ddaf1b3abbdbba9962d7432bbdc633527c1c3e533e0bbc4d9d1b7e08d99"
CLIP_HUB_ID = "timm/vit_base_patch32_clip_224.openai"
CLIP_FILE = "open_clip_model.safetensors"
CLIP_REVISION: str | None = "a6f597a30f7b82c51704746581f9a4e41421e878"
CLIP_SHA256 = "e6d1bd7789aa45192b3bf90570a789b478bae1b74ebcce7eddd908e83a2b7c31"
SCORER_WEIGHTS = (
    WeightFiles(
        "ultralytics/assets", (DEFAULT_DETECTOR,), YOLO_RELEASE, "YOLO11x-seg (detector metrics, crops)", "github"
    ),
    WeightFiles(
        DEFAULT_DINO,
        ("config.json", DINO_FILE),
        DINO_REVISION,
        "DINO ViT-S/16 (DINO-I, collapse)",
        sha256=((DINO_FILE, DINO_SHA256),),
    ),
    WeightFiles(
        CLIP_HUB_ID,
        (CLIP_FILE,),
        CLIP_REVISION,
        "OpenAI CLIP ViT-B/32 (CLIP-I, CLIP-B)",
        sha256=((CLIP_FILE, CLIP_SHA256),),
    ),
)
FETCH_HINT = "`msibench weights fetch --scorers` downloads the default scoring weights"

# The optional open-vocabulary detector (``--detector owlv2`` / ``owlv2+sam``, see grounding.py); not part of the
# default scorer, so ``msibench weights fetch --grounding`` fetches it, not ``--scorers``. Commits found by code
# search (no hub access where this was written): OWLv2's pinned in more than five public projects, SAM's in two (a
# snapshot_download pin and a hub-cache path); the file patterns are those a project pins for this OWLv2 commit.
# File contents are not pinned by sha256 (OWLv2's weight sha256 appeared in one project only); the fetch records
# the sha256 it got.
OWLV2_HUB_ID = "google/owlv2-base-patch16-ensemble"
OWLV2_REVISION = "cfd3195ba4ea9592eec887ded089f4c08eff231d"
SAM_HUB_ID = "facebook/sam-vit-base"
SAM_REVISION = "70c1a07f894ebb5b307fd9eaaee97b9dfc16068f"
GROUNDING_WEIGHTS = (
    WeightFiles(
        OWLV2_HUB_ID,
        ("*.json", "*.txt", "model.safetensors"),
        OWLV2_REVISION,
        "OWLv2 B/16 ensemble (optional open-vocabulary detector)",
    ),
    WeightFiles(
        SAM_HUB_ID,
        ("config.json", "preprocessor_config.json", "model.safetensors"),
        SAM_REVISION,
        "SAM ViT-B (instance masks for the open-vocabulary detector)",
    ),
)
GROUNDING_MODELS = {"owlv2": (OWLV2_HUB_ID, OWLV2_REVISION), "sam": (SAM_HUB_ID, SAM_REVISION)}
GROUNDING_FETCH_HINT = "`msibench weights fetch --grounding` downloads OWLv2 and SAM at their pinned revisions"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class BackboneError(RuntimeError):
    """A backbone cannot be loaded; the message names the model and how to provide its weights."""


# ------------------------------------------------------------------------------------------ preprocessing


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize`` (PIL, ``interpolation``), center-crop ``crop``, normalize.

    Mirrors torchvision's ``Resize(resize) -> CenterCrop(crop) -> Normalize(mean, std)`` on PIL images.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    @property
    def version(self) -> str:
        mean = ",".join(f"{v:g}" for v in self.mean)
        std = ",".join(f"{v:g}" for v in self.std)
        return f"short{self.resize}-{self.interpolation}-center{self.crop}-mean{mean}-std{std}"

    def resize_crop(self, image: Image.Image) -> Image.Image:
        from PIL import Image

        image = image.convert("RGB")
        w, h = image.size
        if w <= h:
            nw, nh = self.resize, max(1, int(self.resize * h / w))
        else:
            nw, nh = max(1, int(self.resize * w / h)), self.resize
        resample = getattr(Image.Resampling, self.interpolation.upper())
        image = image.resize((nw, nh), resample)
        left = int(round((nw - self.crop) / 2.0))
        top = int(round((nh - self.crop) / 2.0))
        return image.crop((left, top, left + self.crop, top + self.crop))

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        import torch

        arr = np.stack([np.asarray(self.resize_crop(im), dtype=np.uint8) for im in images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


DINO_PREPROCESS = Preprocess(256, 224, IMAGENET_MEAN, IMAGENET_STD)
CLIP_PREPROCESS = Preprocess(224, 224, CLIP_MEAN, CLIP_STD)


# ------------------------------------------------------------------------------------------------ encoders


class ImageEncoder:
    """Images -> L2-normalized float32 features.

    ``forward`` maps a preprocessed batch ``(N, 3, S, S)`` on ``device`` to ``(N, D)`` features. ``name`` must
    identify the weights (it keys the feature cache); ``identity`` adds the preprocessing version.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        *,
        name: str,
        preprocess: Preprocess,
        device: str = "cpu",
        batch_size: int = 16,
        module: Any = None,
    ) -> None:
        self.forward = forward
        self.name = name
        self.preprocess = preprocess
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.module = module

    @property
    def identity(self) -> str:
        return f"{self.name}|{self.preprocess.version}"

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Features of ``images`` in batches of ``batch_size``; shape (N, D), rows of unit norm."""
        chunks = [
            self.encode_batch(self.preprocess(images[i : i + self.batch_size]))
            for i in range(0, len(images), self.batch_size)
        ]
        if not chunks:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(chunks)

    def encode_batch(self, batch: torch.Tensor) -> np.ndarray:
        import torch

        with torch.inference_mode():
            feats = self.forward(batch.to(self.device)).float()
            if feats.ndim != 2 or feats.shape[0] != batch.shape[0]:
                raise ValueError(f"{self.name}: expected ({batch.shape[0]}, D) features, got {tuple(feats.shape)}")
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats.cpu().numpy().astype(np.float32)


class TextEncoder:
    """Texts -> L2-normalized float32 features, with the same contract as :class:`ImageEncoder`."""

    def __init__(self, forward: Callable[[list[str]], torch.Tensor], *, name: str, module: Any = None) -> None:
        self.forward = forward
        self.name = name
        self.module = module

    @property
    def identity(self) -> str:
        return self.name

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        with torch.inference_mode():
            feats = torch.nn.functional.normalize(self.forward(list(texts)).float(), dim=-1)
        return feats.cpu().numpy().astype(np.float32)


@dataclass(frozen=True)
class ClipBackbone:
    """CLIP's two towers; image and text features live in one space, so their cosine is CLIP-B."""

    image: ImageEncoder
    text: TextEncoder

    @property
    def identity(self) -> str:
        return self.image.identity


def image_encoder_from_callable(
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    name: str,
    preprocess: Preprocess = DINO_PREPROCESS,
    device: str = "cpu",
    batch_size: int = 16,
) -> ImageEncoder:
    """Wrap an injected backbone: ``fn`` takes a preprocessed batch (N, 3, S, S) and returns (N, D) features."""
    return ImageEncoder(fn, name=name, preprocess=preprocess, device=device, batch_size=batch_size)


# ------------------------------------------------------------------------------------------------ helpers


def resolve_spec(spec: str | os.PathLike | None, env: str, default: str) -> tuple[str, str]:
    """(spec, where it came from): the explicit option, else the environment variable, else the default."""
    if spec is not None and str(spec) != "":
        return str(spec), "option"
    value = os.environ.get(env)
    if value:
        return value, f"${env}"
    return default, "default"


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) for the life of the process."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


# Files of a transformers model folder that change its features (weights and config); READMEs etc. do not.
_FOLDER_CONTENT = ("*.safetensors", "*.bin", "*.json")


def folder_sha256(path: str | Path) -> str:
    """One sha256 over the names and contents of a model folder's weight and config files: the folder's identity
    (its content, not its location, so the same weights give the same scorer hash and cache key anywhere)."""
    root = Path(path)
    files = sorted({f for pattern in _FOLDER_CONTENT for f in root.glob(pattern) if f.is_file()})
    if not files:
        raise FileNotFoundError(f"{root}: no weight or config files ({', '.join(_FOLDER_CONTENT)})")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return digest.hexdigest()


def _looks_like_path(spec: str) -> bool:
    """A spec meant as a file system path (as opposed to a hub id such as ``facebook/dino-vits16``)."""
    return spec.startswith(("/", "./", "../", "~")) or (os.sep in spec and Path(spec).suffix != "")


def _seeded_build(seed: int, build: Callable[[], Any]) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _prepare_module(module: Any, device: str) -> Any:
    module = module.eval().to(device)
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _random_identity(arch: str, seed: int) -> str:
    import torch

    return f"random:{arch}:seed{seed}:torch{torch.__version__.split('+')[0]}"


# --------------------------------------------------------------------------------------------------- DINO


def load_dino(
    spec: str | os.PathLike | None = None, *, device: str = "cpu", seed: int = 0, batch_size: int = 16
) -> ImageEncoder:
    """DINO ViT-S/16 as an :class:`ImageEncoder` whose feature is the final (layer-normed) CLS token.

    ``spec``: ``facebook/dino-vits16`` (transformers hub id, default), a transformers folder, ``timm:NAME``
    (timm hub), a timm weight file (``.safetensors``/``.pth``/``.bin``) for ``vit_small_patch16_224.dino``, or
    ``random``. Without ``spec``, ``$MSIBENCH_DINO_WEIGHTS`` is used when set.
    """
    spec, source = resolve_spec(spec, DINO_ENV, DEFAULT_DINO)
    path = Path(spec).expanduser()

    def fail(err: Exception | str) -> BackboneError:
        return BackboneError(
            f"DINO ViT-S/16 weights {spec!r} (from {source}) cannot be loaded: {err}. Provide them offline with "
            f"--dino-weights PATH or {DINO_ENV}=PATH: a transformers folder saved from facebook/dino-vits16, or a "
            f"timm .safetensors/.pth file of {DINO_TIMM_ARCH}; {FETCH_HINT} into the hub cache (scoring never "
            "downloads)."
        )

    if spec == RANDOM or spec.startswith(f"{RANDOM}:"):
        arch = spec.partition(":")[2] or DINO_TIMM_ARCH
        module = _seeded_build(seed, lambda: _timm_create(arch, pretrained=False))
        return _timm_encoder(module, _random_identity(arch, seed), device, batch_size)
    if spec.startswith("timm:"):
        arch = spec[len("timm:") :]
        try:
            cached = _timm_cached_file(arch)
            module = _timm_create(arch, pretrained=True, pretrained_cfg_overlay={"file": str(cached)})
        except Exception as err:  # timm raises hub, OS and value errors alike for missing weights
            raise fail(err) from err
        return _timm_encoder(module, f"timm:{arch}", device, batch_size)
    if path.is_dir():
        try:
            digest = folder_sha256(path)
        except OSError as err:
            raise fail(err) from err
        return _transformers_dino(str(path), f"hf-dir:sha256:{digest}", device, batch_size, fail)
    if path.is_file():
        try:
            module = _timm_create(DINO_TIMM_ARCH, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        except Exception as err:
            raise fail(err) from err
        return _timm_encoder(module, f"file:{path.name}:sha256:{file_sha256(path)}", device, batch_size)
    if _looks_like_path(spec):
        raise fail(f"no such file or folder {path}")
    revision = DINO_REVISION if spec == DEFAULT_DINO else None
    return _transformers_dino(spec, f"hf:{spec}", device, batch_size, fail, revision=revision)


def _timm_cached_file(arch: str) -> Path:
    """The weight file of a timm pretrained tag in the local hub cache (timm itself would download it)."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(arch)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        raise FileNotFoundError(f"timm has no hub weights for {arch!r}")
    for name in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors"):
        found = locate_hub_file(repo, name)
        if found is not None:
            return found
    raise FileNotFoundError(f"{repo} is not in the local hub cache (huggingface-cli download {repo})")


def _timm_create(arch: str, **kwargs: Any) -> Any:
    import timm

    return timm.create_model(arch, num_classes=0, **kwargs)


def _timm_encoder(module: Any, name: str, device: str, batch_size: int) -> ImageEncoder:
    module = _prepare_module(module, device)
    if getattr(module, "global_pool", "token") != "token":
        raise BackboneError(f"{name}: expected a ViT with CLS-token pooling, got global_pool={module.global_pool!r}")
    return ImageEncoder(
        module, name=name, preprocess=DINO_PREPROCESS, device=device, batch_size=batch_size, module=module
    )


def _transformers_dino(
    ref: str, name: str, device: str, batch_size: int, fail, revision: str | None = None
) -> ImageEncoder:
    # local_files_only: a hub id is read from the hub cache, never downloaded (nor retried against the network)
    hub = {} if Path(ref).is_dir() else {"local_files_only": True, "revision": revision}
    if hub and locate_hub_file(ref, "config.json", revision) is None:
        # said plainly: transformers' own message blames a connection it never tried
        from msibench.weights import hub_cache_dir

        raise fail(f"{ref}@{revision or 'main'} is not in the local hub cache ({hub_cache_dir()})")
    try:
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(ref, **hub)
        # DINO-I is defined on DINO ViT-S/16; refuse other backbones (e.g. a DINOv2 folder) rather than report them
        # under its name.
        shape = (config.model_type, getattr(config, "patch_size", None), getattr(config, "hidden_size", None))
        if shape != ("vit", 16, 384):
            raise fail(f"model_type/patch_size/hidden_size {shape}, expected ('vit', 16, 384) for DINO ViT-S/16")
        # add_pooling_layer=False: the DINO checkpoints carry no pooler weights; DINO-I uses the CLS token.
        module = AutoModel.from_pretrained(ref, add_pooling_layer=False, **hub)
    except (OSError, ValueError, TypeError) as err:
        raise fail(err) from err
    if hub:  # the commit names the weights: the pinned one, else the snapshot the cache holds for main
        config_file = locate_hub_file(ref, "config.json", revision)
        commit = (
            revision
            or getattr(module.config, "_commit_hash", None)
            or (snapshot_commit(config_file) if config_file is not None else None)
        )
        if commit:
            name = f"{name}@{commit}"
    module = _prepare_module(module, device)

    def forward(x):
        return module(pixel_values=x).last_hidden_state[:, 0]

    return ImageEncoder(
        forward, name=name, preprocess=DINO_PREPROCESS, device=device, batch_size=batch_size, module=module
    )


# --------------------------------------------------------------------------------------------------- CLIP


def load_clip(
    spec: str | os.PathLike | None = None, *, device: str = "cpu", seed: int = 0, batch_size: int = 16
) -> ClipBackbone:
    """OpenAI CLIP ViT-B/32 (open_clip ``ViT-B-32`` with QuickGELU) as image and text encoders.

    ``spec``: ``openai`` (default, open_clip's pretrained tag), a local open_clip checkpoint file of those weights,
    or ``random``. Without ``spec``, ``$MSIBENCH_CLIP_WEIGHTS`` is used when set.
    """
    spec, source = resolve_spec(spec, CLIP_ENV, DEFAULT_CLIP)
    path = Path(spec).expanduser()
    try:
        import open_clip
    except ImportError as err:
        raise BackboneError(f"CLIP {CLIP_ARCH}: open_clip_torch is not installed ({err})") from err

    def fail(err: Exception | str) -> BackboneError:
        return BackboneError(
            f"CLIP {CLIP_ARCH} weights {spec!r} (from {source}) cannot be loaded: {err}. Provide them offline with "
            f"--clip-weights PATH or {CLIP_ENV}=PATH (open_clip_pytorch_model.bin or {CLIP_FILE} of {CLIP_HUB_ID}); "
            f"{FETCH_HINT} into the hub cache (scoring never downloads)."
        )

    if spec == RANDOM:
        model = _seeded_build(seed, lambda: open_clip.create_model(CLIP_ARCH, pretrained=None, force_quick_gelu=True))
        name = _random_identity(f"open_clip:{CLIP_ARCH}-quickgelu", seed)
    elif path.is_file():
        try:
            model = open_clip.create_model(CLIP_ARCH, pretrained=str(path), force_quick_gelu=True)
        except Exception as err:  # open_clip raises RuntimeError/KeyError for unreadable checkpoints
            raise fail(err) from err
        name = f"open_clip:{CLIP_ARCH}-quickgelu:file:{path.name}:sha256:{file_sha256(path)}"
    elif _looks_like_path(spec):
        raise fail(f"no such file {path}")
    else:
        try:
            cached = _open_clip_cached_file(spec)
            model = open_clip.create_model(CLIP_ARCH, pretrained=str(cached), force_quick_gelu=spec == "openai")
        except Exception as err:
            raise fail(err) from err
        # the hub commit the file belongs to names the weights (as DINO's): another revision is another scorer
        commit = snapshot_commit(cached)
        name = f"open_clip:{CLIP_ARCH}{'-quickgelu' if spec == 'openai' else ''}:{spec}"
        name += f"@{commit}" if commit else ""
    model = _prepare_module(model, device)
    tokenizer = open_clip.get_tokenizer(CLIP_ARCH)

    def encode_text(texts: list[str]):
        return model.encode_text(tokenizer(texts).to(device))

    image = ImageEncoder(
        model.encode_image,
        name=name,
        preprocess=CLIP_PREPROCESS,
        device=device,
        batch_size=batch_size,
        module=model.visual,
    )
    return ClipBackbone(image=image, text=TextEncoder(encode_text, name=name, module=model))


def _open_clip_cached_file(tag: str) -> Path:
    """The weight file of an open_clip pretrained tag of ViT-B-32 in the local hub cache (open_clip would
    download it): the declared default for ``openai``, else the tag's hub file or its safetensors twin."""
    import open_clip.pretrained

    if tag == DEFAULT_CLIP:
        candidates = [
            (CLIP_HUB_ID, CLIP_FILE, CLIP_REVISION),
            (CLIP_HUB_ID, "open_clip_pytorch_model.bin", CLIP_REVISION),
        ]
    else:
        cfg = open_clip.pretrained.get_pretrained_cfg(CLIP_ARCH, tag)
        if not cfg or not cfg.get("hf_hub"):
            raise FileNotFoundError(f"open_clip knows no hub weights {CLIP_ARCH}/{tag!r}; pass a local file")
        repo, filename = os.path.split(cfg["hf_hub"])  # "org/name/" or "org/name/file", as open_clip reads it
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = [(repo, "open_clip_model.safetensors", None), (repo, filename, None)]
    for repo, filename, revision in candidates:
        found = locate_hub_file(repo, filename, revision)
        if found is not None:
            return found
    repo, _, revision = candidates[0]
    raise FileNotFoundError(
        f"{repo}@{revision or 'main'} ({' or '.join(c[1] for c in candidates)}) is not in the local hub cache"
    )


# --------------------------------------------------------------------------------------------------- YOLO


@dataclass(frozen=True, eq=False)
class YoloModel:
    """A loaded ultralytics YOLO detection or segmentation network, run directly as a torch module."""

    module: Any
    identity: str
    weights: str
    has_masks: bool
    class_ids: tuple[int, ...]  # COCO category id of each output class index
    end2end: bool
    device: str


def find_yolo_weights(name: str) -> Path | None:
    """Locate a weight file offline: the path itself, $MSIBENCH_YOLO_WEIGHTS (the file or its folder),
    $MSIBENCH_CACHE/weights/, then ultralytics' own weights_dir."""
    for candidate in _yolo_candidates(name):
        if candidate.is_file():
            return candidate
    return None


def _yolo_candidates(name: str) -> list[Path]:
    path = Path(name).expanduser()
    out = [path]
    if _looks_like_path(name):
        return out
    env = os.environ.get(YOLO_ENV)
    if env:
        env_path = Path(env).expanduser()
        if env_path.is_file():
            if env_path.name == path.name:  # a file in the variable serves requests for its own name only
                out.append(env_path)
        else:
            out.append(env_path / name)
    out.append(cache_dir() / "weights" / name)
    try:
        from ultralytics.utils import SETTINGS

        out.append(Path(SETTINGS["weights_dir"]) / name)
    except (ImportError, KeyError):
        pass
    return out


def load_yolo(
    spec: str | os.PathLike | None = None, *, device: str = "cpu", seed: int = 0, fuse: bool = True
) -> YoloModel:
    """A YOLO11 network for COCO-80 detection (and masks, for -seg weights).

    ``spec``: a weight file name (``yolo11x-seg.pt``, ``yolo11x.pt``; looked up offline, see
    :func:`find_yolo_weights`), a path, or an ultralytics model yaml (``yolo11n-seg.yaml``: the packaged
    architecture with random weights, built offline). Without ``spec``, ``$MSIBENCH_YOLO_WEIGHTS`` is used when it
    names a file, else ``yolo11x-seg.pt``.
    """
    if spec is None or str(spec) == "":
        env = os.environ.get(YOLO_ENV)
        spec = env if env and Path(env).is_file() else DEFAULT_DETECTOR
    spec = str(spec)
    try:
        import ultralytics  # noqa: F401
    except ImportError as err:
        raise BackboneError(f"YOLO11 {spec!r}: ultralytics is not installed ({err})") from err
    if spec.endswith((".yaml", ".yml")):
        module = _seeded_build(seed, lambda: _yolo_from_yaml(spec))
        identity = _random_identity(f"ultralytics:{Path(spec).name}", seed)
        weights = Path(spec).name
    else:
        path = find_yolo_weights(spec)
        if path is None:
            looked = ", ".join(str(p) for p in _yolo_candidates(spec))
            name = Path(spec).name
            how = f"{FETCH_HINT} ({name})" if name == DEFAULT_DETECTOR else f"Download {name} from {YOLO_ASSETS_URL}"
            raise BackboneError(
                f"YOLO11 weights {spec!r} not found offline (looked in: {looked}). "
                f"{how}"
                f" into {cache_dir() / 'weights'}/, or pass --detector /path/to/{name}, or set {YOLO_ENV} to the "
                "file or its folder. msibench never lets ultralytics download it."
            )
        from ultralytics.nn.tasks import load_checkpoint

        try:
            module, _ = load_checkpoint(str(path.resolve()), device="cpu")
        except Exception as err:  # ultralytics raises TypeError/RuntimeError/ModuleNotFoundError for bad files
            raise BackboneError(f"YOLO11 weights {path}: cannot be loaded ({type(err).__name__}: {err})") from err
        identity = f"ultralytics:{path.name}:sha256:{file_sha256(path)}"
        weights = path.name
    from ultralytics.nn.modules.head import Detect, Segment

    head = module.model[-1]
    if not isinstance(head, Detect):
        raise BackboneError(f"YOLO11 {spec!r}: not a detection or segmentation model (head {type(head).__name__})")
    class_ids = _coco_class_ids(getattr(module, "names", None), int(head.nc), spec)
    if fuse and hasattr(module, "fuse"):
        module = module.fuse(verbose=False)
    module = _prepare_module(module, device)
    return YoloModel(
        module=module,
        identity=identity,
        weights=weights,
        has_masks=isinstance(head, Segment),
        class_ids=class_ids,
        end2end=bool(getattr(head, "end2end", False)),
        device=device,
    )


def _yolo_from_yaml(spec: str) -> Any:
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel, yaml_model_load

    try:
        cfg = yaml_model_load(spec)
    except (FileNotFoundError, AssertionError, OSError) as err:
        raise BackboneError(f"YOLO11 architecture {spec!r}: no such model yaml in ultralytics ({err})") from err
    is_seg = any(layer[2] == "Segment" for layer in cfg.get("head", []))
    cls = SegmentationModel if is_seg else DetectionModel
    return cls(cfg, nc=len(COCO_CATEGORIES), verbose=False)


def _coco_class_ids(names: Any, nc: int, spec: str) -> tuple[int, ...]:
    """COCO id of each of the network's class indices; refuses anything that is not the COCO-80 label set."""
    if nc != len(COCO_CATEGORIES):
        raise BackboneError(f"YOLO11 {spec!r} predicts {nc} classes; COCO-80 detection needs 80")
    labels = [str(names[i]) for i in range(nc)] if isinstance(names, (dict, list)) and len(names) == nc else None
    if labels is None or all(label == str(i) for i, label in enumerate(labels)):
        # A network built from a yaml has no names; its class i is COCO-80 class i by construction.
        return tuple(cid for cid, _ in COCO_CATEGORIES)
    unknown = [label for label in labels if label not in CATEGORY_ID]
    if unknown:
        raise BackboneError(f"YOLO11 {spec!r}: class names are not COCO-80 (e.g. {unknown[:3]})")
    return tuple(CATEGORY_ID[label] for label in labels)


# ------------------------------------------------------------------------------------------- grounding


def is_grounding_spec(spec: str | None) -> bool:
    """A ``--detector`` spec naming the open-vocabulary detector: ``owlv2[:REF][+sam[:REF]]``."""
    return spec is not None and str(spec).split("+", 1)[0].split(":", 1)[0] == "owlv2"


def parse_grounding_spec(spec: str) -> dict[str, str]:
    """``owlv2[:REF][+sam[:REF]]`` -> {"owlv2": REF, "sam": REF} (REF default: the pinned hub id); a bad spec is
    a ValueError naming it."""
    out: dict[str, str] = {}
    for part in str(spec).split("+"):
        name, _, ref = part.partition(":")
        if name not in GROUNDING_MODELS or name in out:
            raise ValueError(
                f"detector spec {spec!r}: expected owlv2[:HUB_ID_OR_FOLDER][+sam[:HUB_ID_OR_FOLDER]], "
                f"got part {part!r}"
            )
        out[name] = ref or GROUNDING_MODELS[name][0]
    if "owlv2" not in out:
        raise ValueError(f"detector spec {spec!r}: the grounding detector starts with owlv2")
    return out


def load_grounding_model(name: str, ref: str, *, device: str = "cpu") -> tuple[Any, Any, str]:
    """(model, processor, identity) of ``name`` (``owlv2``: Owlv2ForObjectDetection + Owlv2Processor; ``sam``:
    SamModel + SamProcessor) from a transformers folder or a hub id read offline from the hub cache (the default id
    at its pinned commit). The identity names the weights: ``hf:ID@COMMIT`` or ``hf-dir:sha256:...``."""
    hub_id, pinned = GROUNDING_MODELS[name]
    label = {"owlv2": "OWLv2 detector", "sam": "SAM segmenter"}[name]

    def fail(reason) -> BackboneError:
        return BackboneError(
            f"{label} weights {ref!r} cannot be loaded: {reason}. Give a transformers folder ({name}:PATH) or "
            f"fetch them: {GROUNDING_FETCH_HINT} (scoring never downloads)"
        )

    local = Path(ref).expanduser()
    if local.is_dir():
        hub: dict[str, Any] = {}
        source, identity = str(local), f"hf-dir:sha256:{folder_sha256(local)}"
    else:
        if _looks_like_path(ref):
            raise fail("no such folder")
        revision = pinned if ref == hub_id else None
        if locate_hub_file(ref, "config.json", revision) is None:
            from msibench.weights import hub_cache_dir

            raise fail(f"{ref}@{revision or 'main'} is not in the local hub cache ({hub_cache_dir()})")
        hub = {"local_files_only": True, "revision": revision}
        commit = revision or snapshot_commit(locate_hub_file(ref, "config.json", revision))
        source, identity = ref, f"hf:{ref}@{commit or 'main'}"
    try:
        if name == "owlv2":
            from transformers import Owlv2ForObjectDetection as Model
            from transformers import Owlv2Processor as Processor
        else:
            from transformers import SamModel as Model
            from transformers import SamProcessor as Processor
        model = Model.from_pretrained(source, **hub)
        processor = Processor.from_pretrained(source, **hub)
    except (OSError, ValueError, TypeError) as err:
        raise fail(err) from err
    return _prepare_module(model, device), processor, identity
