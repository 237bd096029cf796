"""``msibench weights``: declared weight files fetched from a fake hub (no network), their status, and scoring that
never downloads and names every missing weight at once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from msibench import weights
from msibench.cli import main
from msibench.inventory import method_weights, selection
from msibench.weights import WeightFiles, WeightsError, fetch, locate_hub_file, status


class FakeHub:
    """hf_hub_download / list_repo_files / GitHub downloads over an in-memory hub, writing the real hub-cache layout
    (models--org--name/snapshots/<commit>/<file>, refs/<revision>) under ``cache``."""

    def __init__(self, cache: Path, online: bool = True) -> None:
        self.cache = cache
        self.online = online
        self.reachable = True
        self.calls: list[tuple[str, str]] = []

    @staticmethod
    def content(repo_id: str, filename: str) -> bytes:
        return f"weights of {repo_id}/{filename}".encode()

    @staticmethod
    def repo_files(repo_id: str) -> list[str]:
        return ["config.json", "diffusion_pytorch_model.safetensors", "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors", "model.safetensors.index.json", "README.md"]  # fmt: skip

    def hf_hub_download(self, repo_id, filename, revision=None, **kwargs):
        self.calls.append((repo_id, filename))
        if not self.online:
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError("offline: the file is not in the cache")
        commit = revision if revision and re.fullmatch(r"[0-9a-f]{40}", revision) else "c" * 40
        root = self.cache / f"models--{repo_id.replace('/', '--')}"
        if commit != revision:
            (root / "refs").mkdir(parents=True, exist_ok=True)
            (root / "refs" / (revision or "main")).write_text(commit)
        path = root / "snapshots" / commit / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.content(repo_id, filename))
        return str(path)

    def list_repo_files(self, repo_id, revision=None, **kwargs):
        if not self.online:
            raise OSError("offline")
        return self.repo_files(repo_id)

    def download_url(self, url, dest):
        self.calls.append(("url", url))
        if not self.online:
            raise OSError("offline")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(url.encode())


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    import dataclasses

    import huggingface_hub
    from huggingface_hub import constants

    from msibench.scoring import backbones

    # the fake hub cannot serve the real files, so the scorers' content pins (sha256) are lifted; their refusal is
    # tested on its own below
    unpinned = tuple(dataclasses.replace(w, sha256=()) for w in backbones.SCORER_WEIGHTS)
    monkeypatch.setattr(backbones, "SCORER_WEIGHTS", unpinned)
    hub = FakeHub(tmp_path / "hf-cache")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub.cache))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", hub.list_repo_files)
    monkeypatch.setattr(weights, "_download_url", hub.download_url)
    # the hosts answer while the fake hub is online (a reachable host can still fail a download: see below)
    monkeypatch.setattr(weights, "unreachable", lambda source: None if hub.reachable else "no network (fake)")
    return hub


def test_methods_declare_their_weights_through_the_registry():
    ip = method_weights("ip-adapter")
    assert {w.repo_id for w in ip} == {"stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/sd-vae-ft-mse",
                                       "h94/IP-Adapter"}  # fmt: skip
    assert all(w.pinned for w in ip) and any("models/ip-adapter_sd15.bin" in w.files for w in ip)
    assert method_weights("paste") == []
    ssr = method_weights("ssr-encoder")
    assert [w.source for w in ssr].count("manual") == 1  # the aligner lives on Google Drive
    everything = selection(False, [])
    owners = {owner for owner, _ in everything}
    assert owners == {"scorers", "ip-adapter", "lambda-eclipse", "ssr-encoder", "customnet", "mscustomnet",
                      "ms-diffusion", "uno", "qwen-image-edit"}  # fmt: skip
    with pytest.raises(ValueError, match="GitHub release asset needs its tag"):
        WeightFiles("ultralytics/assets", ("yolo11x-seg.pt",), None, source="github")


def test_fetch_records_sha256_and_ls_reports_present_missing_different(fake_hub, tmp_path):
    entries = selection(True, ["lambda-eclipse"])
    done = fetch(entries)
    assert {d.status for d in done} == {"present"}
    # patterns resolved against the repo's file list: both prior weights and the text encoder's shards
    files = {(d.spec.repo_id, d.file) for d in done}
    assert ("ECLIPSE-Community/Lambda-ECLIPSE-Prior-v1.0", "diffusion_pytorch_model.safetensors") in files
    assert ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "model.safetensors.index.json") in files
    assert ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "README.md") not in files
    # the record holds each file's sha256, and the scorer's offline lookup finds the hub files
    from msibench.scoring.backbones import DINO_REVISION

    record = weights.read_fetched()
    dino = record[f"hf:facebook/dino-vits16@{DINO_REVISION}:pytorch_model.bin"]
    assert dino["sha256"] == weights.sha256_file(dino["path"]) and dino["commit"] == DINO_REVISION
    assert locate_hub_file("facebook/dino-vits16", "pytorch_model.bin", DINO_REVISION) == Path(dino["path"])
    yolo = record["github:ultralytics/assets@v8.3.0:yolo11x-seg.pt"]
    assert Path(yolo["path"]) == weights.github_dir() / "yolo11x-seg.pt"
    assert yolo["path"].endswith("weights/yolo11x-seg.pt")
    assert {s.status for s in status(entries)} == {"present"}

    # a second fetch downloads nothing
    n_calls = len(fake_hub.calls)
    fetch(entries)
    assert len(fake_hub.calls) == n_calls

    # changed content -> different; deleted -> missing; fetch puts it back
    Path(dino["path"]).write_bytes(b"something else")
    Path(yolo["path"]).unlink()
    by_file = {(s.spec.repo_id, s.file): s for s in status(entries)}
    assert by_file[("facebook/dino-vits16", "pytorch_model.bin")].status == "different"
    assert by_file[("ultralytics/assets", "yolo11x-seg.pt")].status == "missing"
    fetch(entries)
    assert {s.status for s in status(entries, verify=True)} == {"present"}


def test_failed_downloads_are_reported_in_one_message(fake_hub):
    fake_hub.online = False  # the hosts answer, every download fails
    entries = selection(True, ["customnet"])
    with pytest.raises(WeightsError) as err:
        fetch(entries)
    text = str(err.value)
    assert text.startswith("5 weight file(s) could not be fetched")
    for name in ("yolo11x-seg.pt", "facebook/dino-vits16", "pytorch_model.bin", "open_clip_model.safetensors",
                 "customnet_v1.pt"):  # fmt: skip
        assert name in text
    assert len(fake_hub.calls) == 5  # one attempt per file, no retries


def test_offline_fetch_tries_no_file_of_an_unreachable_host(fake_hub):
    fake_hub.online = fake_hub.reachable = False
    with pytest.raises(WeightsError) as err:
        fetch(selection(True, ["lambda-eclipse"]))
    text = str(err.value)
    assert fake_hub.calls == []  # neither a download nor a file listing was attempted
    assert "diffusion_pytorch_model.*: not fetched: no network (fake)" in text  # a pattern is not even listed
    assert "yolo11x-seg.pt: not fetched: no network (fake)" in text


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_fetch_fails_at_once_with_the_real_hub_client(tmp_path, monkeypatch):
    """huggingface_hub retries a connection error five times with backoff (23 s a file); the fetch asks each host
    once and fails every file of an unreachable one at once. Sleeps are recorded, never slept."""
    import time

    from huggingface_hub import constants

    url = f"http://127.0.0.1:{closed_port()}"  # nothing listens: connection refused
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(weights, "GITHUB_URL", url, raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    with pytest.raises(WeightsError) as err:
        fetch(selection(True, []))
    text = str(err.value)
    assert text.startswith("4 weight file(s) could not be fetched") and sleeps == []
    assert text.count(f"not fetched: cannot reach 127.0.0.1:{url.rsplit(':', 1)[1]}") == 4
    # HF_HUB_OFFLINE is named as the reason, without a connection
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match="dino-vits16.*not fetched: HF_HUB_OFFLINE is set"):
        fetch(selection(True, []))


def test_weights_cli(fake_hub):
    runner = CliRunner()
    res = runner.invoke(main, ["weights", "ls", "--scorers", "--method", "customnet"])
    assert res.exit_code == 1 and "5 missing" in res.output and "[revision not pinned]" in res.output
    res = runner.invoke(main, ["weights", "ls", "--scorers"])
    assert res.exit_code == 1 and "4 missing" in res.output and "[revision not pinned]" not in res.output
    res = runner.invoke(main, ["weights", "fetch", "--scorers"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["weights", "ls", "--scorers"])
    assert res.exit_code == 0 and "4 present" in res.output
    res = runner.invoke(main, ["weights", "ls", "--method", "nope"])
    assert res.exit_code != 0 and "unknown method 'nope'" in res.output
    res = runner.invoke(main, ["weights", "ls", "--method", "ssr-encoder"])
    assert "manual" in res.output and "drive.google.com" in res.output


def test_scorer_weights_are_pinned_and_a_file_unlike_its_pinned_sha256_is_refused(tmp_path, monkeypatch):
    """Every scoring weight is pinned (hub commits, the YOLO release tag); a file whose content differs from its
    pinned sha256 is not recorded as fetched and is named in the error."""
    import huggingface_hub
    from huggingface_hub import constants

    from msibench.scoring import backbones

    scorers = backbones.SCORER_WEIGHTS
    assert all(w.pinned for w in scorers), [w.label for w in scorers if not w.pinned]
    assert all(re.fullmatch(r"[0-9a-f]{40}", w.revision) for w in scorers if w.source == "hf")
    CLIP_FILE, CLIP_SHA256 = backbones.CLIP_FILE, backbones.CLIP_SHA256  # noqa: N806
    clip = next(w for w in scorers if CLIP_FILE in w.files)
    assert dict(clip.sha256) == {CLIP_FILE: CLIP_SHA256}
    dino = next(w for w in scorers if w.repo_id == backbones.DEFAULT_DINO)  # pinned as CLIP's is (issue 17)
    assert dict(dino.sha256) == {"pytorch_model.bin": backbones.DINO_SHA256} and len(backbones.DINO_SHA256) == 64
    hub = FakeHub(tmp_path / "hf-cache")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub.cache))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr(weights, "unreachable", lambda source: None)
    refused = f"{CLIP_FILE}: sha256 [0-9a-f]{{64}} differs from the pinned {CLIP_SHA256}"
    with pytest.raises(WeightsError, match=refused):
        fetch([("scorers", clip)])
    assert not any(key.startswith(f"hf:{clip.repo_id}") for key in weights.read_fetched())
    assert [s.status for s in status([("scorers", clip)])] == ["different"]


def test_the_hub_helpers_sit_below_the_registry_and_the_scorers():
    """msibench.weights (hub helpers, fetch, status) imports no msibench module above it, so methods and scorers import
    it without a circle; the inventory of what Table I needs (msibench.inventory) is the one that reaches up."""
    import ast
    import importlib.util

    def msibench_imports(module: str) -> set[str]:
        tree = ast.parse(open(importlib.util.find_spec(module).origin).read())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:  # from msibench import registry: msibench.registry
                names |= {node.module if node.module != "msibench" else f"msibench.{a.name}" for a in node.names}
        return {n for n in names if n.startswith("msibench")}

    assert msibench_imports("msibench.weights") == {"msibench.cache"}
    assert {"msibench.registry", "msibench.scoring.backbones"} <= msibench_imports("msibench.inventory")


def test_weights_ls_honours_the_variables_score_uses(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from msibench.cli import main

    dino = tmp_path / "my_dino.pth"
    dino.write_bytes(b"weights")
    monkeypatch.setenv("MSIBENCH_DINO_WEIGHTS", str(dino))
    monkeypatch.setenv("MSIBENCH_CLIP_WEIGHTS", str(tmp_path / "absent.bin"))
    monkeypatch.delenv("MSIBENCH_YOLO_WEIGHTS", raising=False)
    res = CliRunner().invoke(main, ["weights", "ls", "--scorers"])
    lines = res.output.splitlines()
    assert any(line.strip().startswith("override") and "my_dino.pth" in line for line in lines), res.output
    assert any(line.strip().startswith("missing") and "absent.bin: no such file" in line for line in lines)
    assert res.exit_code == 1
