"""The adapters' shared harness machinery (msibench.methods.harness): option checks, sources, loading errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from msibench.methods import harness
from msibench.methods.base import WeightsUnavailableError


def test_check_choice_names_method_option_and_choices() -> None:
    harness.check_choice({"dtype": "float32"}, "dtype", harness.DTYPES, "m")
    with pytest.raises(ValueError, match=r"m option 'dtype': 'half' is not one of float32, float16, bfloat16"):
        harness.check_choice({"dtype": "half"}, "dtype", harness.DTYPES, "m")


def test_numeric_checks() -> None:
    harness.check_positive({"steps": 1}, ("steps",), "m")
    with pytest.raises(ValueError, match="m option 'steps': must be a positive integer, got 0"):
        harness.check_positive({"steps": 0}, ("steps",), "m")
    harness.check_non_negative({"scale": None, "guidance": 0.0}, ("scale", "guidance"), "m")  # None: the default
    with pytest.raises(ValueError, match="m option 'guidance': must be >= 0"):
        harness.check_non_negative({"guidance": -1.0}, ("guidance",), "m")


def test_env_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MSIBENCH_TEST_HARNESS", raising=False)
    assert harness.env_default("MSIBENCH_TEST_HARNESS", "org/repo") == "org/repo"
    monkeypatch.setenv("MSIBENCH_TEST_HARNESS", "")
    assert harness.env_default("MSIBENCH_TEST_HARNESS", "org/repo") == "org/repo"
    monkeypatch.setenv("MSIBENCH_TEST_HARNESS", "/weights")
    assert harness.env_default("MSIBENCH_TEST_HARNESS", "org/repo") == "/weights"


def test_source_record_local_by_path_hub_by_revision(tmp_path) -> None:
    assert harness.source_record(str(tmp_path), "abc") == {"source": str(tmp_path.resolve())}
    assert harness.source_record("org/repo", "abc") == {"source": "org/repo", "revision": "abc"}
    assert harness.local_path("") is None and harness.local_path("org/not-here") is None


def test_from_pretrained_local_failure_names_folder_and_option(tmp_path) -> None:
    def loader(source, **kwargs):
        assert "revision" not in kwargs  # a local folder has no revision
        raise OSError("no config.json")

    with pytest.raises(WeightsUnavailableError, match=rf"m: cannot load the base model from the local folder "
                       rf"{tmp_path}: no config.json. Point -M base=DIR"):  # fmt: skip
        harness.from_pretrained(loader, str(tmp_path), "base model", WeightsUnavailableError, "-M base=DIR", "m",
                                revision="abc")  # fmt: skip


def test_from_pretrained_hub_failure_names_revision_and_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = {}

    def loader(source, **kwargs):
        seen.update(kwargs, source=source)
        raise OSError("missing")

    with pytest.raises(WeightsUnavailableError) as info:
        harness.from_pretrained(loader, "org/repo", "base model", WeightsUnavailableError, "-M base=DIR", "m",
                                revision="abc", subfolder="unet")  # fmt: skip
    assert seen["revision"] == "abc" and seen["source"] == "org/repo"
    message = str(info.value)
    assert "hub repo org/repo (subfolder unet) at revision abc" in message
    assert "msibench weights fetch --method m" in message and "-M base=DIR" in message


def test_hub_file_offline_is_one_readable_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as info:
        harness.hub_file("org/absent", "w.bin", "abc", method="m", what="weights", option="-M weights=DIR")
    message = str(info.value)
    assert "m: cannot get the weights 'w.bin' from the hub repo 'org/absent' at revision abc" in message
    assert "msibench weights fetch --method m" in message


def test_require_setup() -> None:
    harness.require_setup(object(), "m")
    with pytest.raises(RuntimeError, match=r"m: call setup\(device\) before generate\(\)"):
        harness.require_setup(None, "m")


def test_harness_imports_nothing_heavy() -> None:
    code = (
        "import sys, json, msibench.methods.harness; "
        "print(json.dumps([m for m in ('torch', 'diffusers', 'transformers', 'baselines', 'mscustomnet') "
        "if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_seeded_generator_is_the_cpu_stream_of_the_seed() -> None:
    import torch

    first = torch.randn(4, generator=harness.seeded_generator(7))
    assert harness.seeded_generator(7).device.type == "cpu"
    assert torch.equal(first, torch.randn(4, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(first, torch.randn(4, generator=harness.seeded_generator(8)))


def test_weight_file_takes_a_file_a_folder_or_the_hub(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "adapter.bin"
    weights.write_bytes(b"w")
    kw = {"method": "m", "what": "adapter weights", "option": "-M adapter=DIR", "repo_id": "owner/repo"}
    assert harness.weight_file(str(weights), "other.bin", "abc", **kw) == weights.resolve()
    assert harness.weight_file(str(tmp_path), "adapter.bin", "abc", **kw) == weights.resolve()
    missing = r"m: adapter weights not found: .*/nope.bin does not exist \(-M adapter=DIR\)\. Download nope.bin from"
    with pytest.raises(WeightsUnavailableError, match=missing + r" the hub repo owner/repo \(revision abc\)"):
        harness.weight_file(str(tmp_path), "nope.bin", "abc", **kw)
    no_source = "m: no source given for the adapter weights; use -M adapter=DIR"
    with pytest.raises(WeightsUnavailableError, match=no_source):
        harness.weight_file("", "adapter.bin", "abc", **kw)
    asked = []
    monkeypatch.setattr(harness, "hub_file", lambda *a, **k: asked.append(a) or tmp_path / "from-hub.bin")
    assert harness.weight_file("owner/repo", "adapter.bin", "abc", **kw) == tmp_path / "from-hub.bin"
    assert asked == [("owner/repo", "adapter.bin", "abc")]
