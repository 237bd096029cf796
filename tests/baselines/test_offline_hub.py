"""``msibench run`` offline: every method adapter reads hub ids from the hub cache only when the hub cannot be
reached, so a cached file loads and a missing one fails at once, naming ``msibench weights fetch --method X``.

The hub is a closed local port (nothing listens: connection refused) and the real huggingface_hub client runs
against it; its retry back-off sleeps are recorded, never slept. Files are put in a temporary hub cache in the
hub's layout (models--org--name/snapshots/<commit>/..., refs/main).
"""

from __future__ import annotations

import re
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from msibench import weights
from msibench.methods.base import WeightsUnavailableError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def down_hub(tmp_path, monkeypatch):
    """The hub at a closed port (HF_HUB_OFFLINE unset, no proxy), an empty hub cache, time.sleep recorded."""
    import time

    from huggingface_hub import constants

    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    # hf_hub_url builds its URLs from this template (made from the endpoint at import)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(weights, "_HUB_PROBES", {}, raising=False)
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    return SimpleNamespace(cache=tmp_path / "hub", sleeps=sleeps, url=url)


def _cache_snapshot(cache: Path, repo_id: str, commit: str = COMMIT) -> Path:
    """The snapshot folder of ``repo_id`` at ``commit`` in the hub-cache layout, with refs/main pointing at it."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def _fetch(method: str) -> str:
    return re.escape(f"`msibench weights fetch --method {method}`")


def test_the_hub_is_probed_once_per_process_and_setting(down_hub, monkeypatch):
    calls = []
    real = weights.unreachable
    monkeypatch.setattr(weights, "unreachable", lambda source: calls.append(source) or real(source))
    assert weights.hub_kwargs() == {"local_files_only": True}
    assert weights.hub_offline().startswith("cannot reach 127.0.0.1:")
    assert calls == ["hf"]  # asked once, answered from memory the second time
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # behind a proxy: left to the downloads
    assert weights.hub_kwargs() == {} and calls == ["hf", "hf"]


@pytest.mark.parametrize("method", ["ip-adapter", "customnet", "lambda-eclipse"])
def test_offline_a_missing_hub_file_fails_at_once_naming_the_fetch_command(down_hub, method):
    import torch

    if method == "ip-adapter":
        from baselines.ip_adapter import ADAPTER_ID, IPAdapterMethod

        wanted = rf"models/ip-adapter_sd15\.bin.*{ADAPTER_ID}.*revision 018e402"
        load = IPAdapterMethod(dtype="float32").setup
    elif method == "customnet":
        from baselines.customnet import CustomNetMethod

        wanted = r"TencentARC/CustomNet customnet_v1\.pt \(revision main\)"
        load = CustomNetMethod().setup
    else:
        from baselines.lambda_eclipse import PRIOR_ID, LambdaEclipseMethod

        wanted = rf"prior from '{PRIOR_ID}' \(revision main\).*config\.json"
        prior_loader = LambdaEclipseMethod()._load_prior

        def load(device):
            return prior_loader(torch.float32)

    with pytest.raises(WeightsUnavailableError, match=f"(?s){wanted}") as err:
        load("cpu")
    message = str(err.value)
    assert re.search(
        f"(?s)not in the hub cache .*the hub is unreachable: cannot reach 127.0.0.1.*{_fetch(method)}", message
    )
    assert down_hub.sleeps == []  # no retry back-off


def test_offline_ssr_and_mscustomnet_hub_ids_fail_at_once(down_hub):
    from baselines.ssr_encoder import SSREncoderMethod
    from mscustomnet.model.io import WeightsNotFoundError, resolve_weights

    # their official weights are not on the hub (a Google Drive folder; weights you train): no fetch command
    with pytest.raises(WeightsUnavailableError, match=r"'someone/ssr' \(revision main\).*not in the hub cache"):
        SSREncoderMethod(weights="someone/ssr").weight_files()
    with pytest.raises(WeightsNotFoundError, match=r"'someone/ms' \(revision v1\).*not in the hub cache.*set X"):
        resolve_weights("someone/ms", "v1", what="MS-CustomNet", hint="set X")
    assert down_hub.sleeps == []


def test_offline_the_lambda_prior_loads_from_the_hub_cache_at_once(down_hub):
    """The prior's weights are looked up as .safetensors, then .bin: a cached .bin loads without retrying the
    absent .safetensors against the hub."""
    from baselines.lambda_eclipse import PRIOR_ID, _download_prior
    from baselines.lambda_eclipse_prior import CONFIG_FILE, WEIGHT_FILES

    snapshot = _cache_snapshot(down_hub.cache, PRIOR_ID)
    (snapshot / CONFIG_FILE).write_text("{}")
    (snapshot / "diffusion_pytorch_model.bin").write_bytes(b"weights")
    assert WEIGHT_FILES[0] == "diffusion_pytorch_model.safetensors"  # the absent one is tried first
    folder = _download_prior(PRIOR_ID, "main", CONFIG_FILE, WEIGHT_FILES)
    assert folder == snapshot and down_hub.sleeps == []


def test_offline_the_sd15_base_model_loads_from_the_hub_cache_and_a_missing_one_names_fetch(down_hub, tiny_sd15):
    import torch

    from baselines.sd15 import load_sd15_pipeline

    shutil.copytree(tiny_sd15.path, _cache_snapshot(down_hub.cache, "org/tiny-sd15"), dirs_exist_ok=True)
    pipe = load_sd15_pipeline("org/tiny-sd15", COMMIT, torch.float32, WeightsUnavailableError, "ssr-encoder")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.unet.config.cross_attention_dim == 32
    wanted = rf"hub repo org/absent at revision {COMMIT}: not in the hub cache.*{_fetch('ssr-encoder')}.*base_model="
    with pytest.raises(WeightsUnavailableError, match=wanted):
        load_sd15_pipeline("org/absent", COMMIT, torch.float32, WeightsUnavailableError, "ssr-encoder")
    assert down_hub.sleeps == []
