"""Our model folder format: ``config.json`` (format tag, :class:`ModelConfig`, weights hash, metadata) and
``model.safetensors`` (our state dict). A folder is found by local path or by Hugging Face hub id + revision.

Reading the folder's ``config.json`` (:func:`read_model_info`) never imports torch, so methods can fingerprint their
weights cheaply before loading them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mscustomnet.model.config import ModelConfig
from msibench.cache import file_mode, sha256_file
from msibench.cache import mkstemp as umask_mkstemp
from msibench.methods.base import WeightsUnavailableError

if TYPE_CHECKING:
    import torch

    from mscustomnet.model.network import CustomNetModel

log = logging.getLogger(__name__)

FORMAT = "mscustomnet-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class WeightsNotFoundError(WeightsUnavailableError, FileNotFoundError):
    """The weights named by a method option / env var are neither a local folder nor reachable on the hub."""


def save_state(
    path: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None
) -> Path:
    """Write a model folder. The weights go to a temp file renamed into place, then config.json (with the weights'
    sha256) likewise: a folder with a config.json always has the weights it describes."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    fd, tmp = umask_mkstemp(path, prefix=f".{WEIGHTS_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT})
        os.chmod(tmp, file_mode())  # safetensors recreates the file with its own (private) mode
        digest = sha256_file(tmp)
        os.replace(tmp, path / WEIGHTS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": digest,
        "metadata": metadata or {},
    }
    fd, tmp = umask_mkstemp(path, prefix=f".{CONFIG_FILE}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path / CONFIG_FILE)
    return path


def save_model(model: CustomNetModel, path: str | Path, dtype: torch.dtype | None = None, **metadata: Any) -> Path:
    """Save every tensor of ``model`` (frozen towers included, so the folder is self-contained)."""
    state = model.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return save_state(path, model.config, state, metadata=metadata)


def init_tiny(
    path: str | Path, *, seed: int = 0, resolution: int = 32, multi_subject: bool = False, **metadata: Any
) -> Path:
    """Write a tiny randomly initialised model folder (:func:`~mscustomnet.model.config.tiny_config`: the network's
    structure in an 11 MB folder), for the CPU smoke path and the tests.

    By default a CustomNet-style folder (single subject, no category encoder): what ``model.init`` of a training
    configuration names, like the output of ``convert-customnet``; ``multi_subject`` writes an MS-CustomNet one that
    ``msibench run --method mscustomnet -M weights=...`` loads directly. The same ``seed`` gives the same weights."""
    import torch

    from mscustomnet.model.config import tiny_config
    from mscustomnet.model.network import CustomNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CustomNetModel(tiny_config(multi_subject=multi_subject, resolution=resolution))
    return save_model(model, path, **{"init": {"kind": "tiny", "seed": seed}, **metadata})


def _read_info(folder: Path) -> dict[str, Any]:
    cfg = folder / CONFIG_FILE
    try:
        info = json.loads(cfg.read_text())
    except OSError as err:
        raise WeightsNotFoundError(f"{cfg}: cannot read model config: {err}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg}: not valid JSON: {err}") from err
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(
            f"{cfg}: not an {FORMAT} folder (format={info.get('format') if isinstance(info, dict) else None!r})"
        )
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg}: format_version {info.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    return info


def read_model_info(source: str | Path) -> dict[str, Any] | None:
    """config.json of a local model folder (cheap, no torch); None when ``source`` is not a local folder."""
    folder = Path(source).expanduser()
    if not (folder / CONFIG_FILE).is_file():
        return None
    return _read_info(folder)


def resolve_weights(source: str, revision: str | None = None, what: str = "model", hint: str = "") -> Path:
    """Local folder for ``source``: a path to a model folder, or a hub repo id fetched at ``revision``.

    Offline or unknown hub ids raise :class:`WeightsNotFoundError` naming ``what`` and how to provide the weights.
    """
    if not source:
        raise WeightsNotFoundError(f"no {what} weights given. {hint}".strip())
    folder = Path(source).expanduser()
    if folder.exists():
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise WeightsNotFoundError(
                f"{folder}: not a {what} folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}). {hint}".strip()
            )
        return folder
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise WeightsNotFoundError(f"{what} weights {source!r}: no such folder, and not a hub id. {hint}".strip())
    from huggingface_hub import snapshot_download

    from msibench.weights import hub_failure, hub_kwargs

    try:
        return Path(
            snapshot_download(
                repo_id=source,
                revision=revision or None,
                allow_patterns=[CONFIG_FILE, WEIGHTS_FILE],
                **hub_kwargs(),  # the hub cache only when the hub is unreachable: no retries
            )
        )
    except Exception as err:  # offline, unknown repo or revision, no network: all end the same way for the user
        raise WeightsNotFoundError(
            f"{what} weights {source!r} (revision {revision or 'default'}): {CONFIG_FILE} and {WEIGHTS_FILE} are "
            f"not available: {hub_failure(err)}. {hint}".strip()
        ) from err


LOAD_STAGES = ("locate weights", "read weights", "build network", "load weights", "move to device")


def load_model(
    source: str | Path,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    what: str = "model",
    hint: str = "",
    progress: Callable[[str], None] | None = None,
) -> CustomNetModel:
    """Build the model from its folder (local path or hub id) without random init, in eval mode.

    ``progress`` is called with a description as each of the :data:`LOAD_STAGES` starts."""
    from safetensors.torch import load_file

    from mscustomnet.model.network import CustomNetModel

    def stage(i: int, detail: str = "") -> None:
        text = LOAD_STAGES[i] + (f": {detail}" if detail else "")
        log.info("%s: %s", what, text)
        if progress is not None:
            progress(text)

    stage(0, str(source) + (f"@{revision}" if revision else ""))
    folder = resolve_weights(str(source), revision, what=what, hint=hint)
    info = _read_info(folder)
    config = ModelConfig.from_dict(info["config"])
    weights = folder / info.get("weights_file", WEIGHTS_FILE)
    stage(1, f"{weights} ({weights.stat().st_size / 2**20:,.0f} MiB)")
    state = load_file(str(weights), device=str(device))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    stage(2, f"{config.name}, {config.resolution} px")
    model = CustomNetModel.empty(config)
    stage(3, f"{len(state)} tensors")
    model.load_weights(state, where=str(weights))
    stage(4, str(device))
    model.to(device)
    model.eval()
    log.info("loaded %s (%s) from %s", what, config.name, folder)
    return model


__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "LOAD_STAGES",
    "WEIGHTS_FILE",
    "WeightsNotFoundError",
    "load_model",
    "read_model_info",
    "resolve_weights",
    "save_model",
    "save_state",
]
