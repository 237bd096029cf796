"""benchmarks/bench_gpu.py: the script prepared for a CUDA device, run here on the CPU at tiny size."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from msibench import registry
from msibench.bench.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]


def bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "benchmarks" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module
    spec.loader.exec_module(module)
    return module


def test_every_registered_method_has_a_builder_and_tasks_spread_over_k():
    module = bench_gpu()
    assert set(module.METHODS) == set(registry.METHODS)
    manifest = load_manifest()
    ks = [t.k for t in module.pick_tasks(manifest, "multi", 3)]
    assert ks[0] == min(t.k for t in manifest.tasks if t.track == "multi")
    assert ks[-1] == max(t.k for t in manifest.tasks if t.track == "multi")
    # a method's capabilities first: K spread over what it can do (qwen-image-edit: 2 and 3)
    assert {t.k for t in module.pick_tasks(manifest, "multi", 3, lambda t: None if t.k <= 3 else "K > 3")} == {2, 3}
    request = module.requests_for(module.pick_tasks(manifest, "single", 1))[0]
    subject = request.task.subjects[0]
    assert request.subjects[0].reference.size == tuple(subject.reference.size)
    text = module.render(
        {
            "device": "cpu",
            "size": "tiny",
            "scoring": {"single": {"img_per_s": 1}, "multi": {"img_per_s": 2}},
            "methods": {"x": {"method": "x", "error": "boom"}},
        }  # fmt: skip
    )
    assert "| x | failed: boom" in text


@pytest.mark.slow
def test_tiny_run_on_cpu_times_every_method_and_the_scorer(tmp_path):
    module = bench_gpu()
    args = ["--size", "tiny", "--device", "cpu", "--tasks", "1", "--score-images", "2", "--score-batch", "2"]
    result = module.main([*args, "--out", str(tmp_path), "--workdir", str(tmp_path / "work")])
    assert json.loads((tmp_path / "gpu.json").read_text())["methods"].keys() == set(registry.METHODS)
    assert all(result["scoring"][track]["img_per_s"] > 0 for track in ("single", "multi"))
    for name, m in result["methods"].items():
        assert "error" not in m, (name, m)
        caps = registry.build(name).capabilities
        assert set(m["tracks"]) == set(caps.tracks) & {"single", "multi"}, name
        assert all(t["s_per_image"] > 0 or name == "paste" for t in m["tracks"].values())
        assert m["peak_memory_mb"] > 0
    assert "| mscustomnet | float32 | 2 | 32 |" in (tmp_path / "gpu.md").read_text()


@pytest.mark.slow
def test_real_size_qwen_image_edit_has_the_published_parameter_counts():
    """Built on the meta device (no memory): the 20 B MMDiT and Qwen2.5-VL-7B (8.3 B), in bfloat16 from the start."""
    import torch

    parts = bench_gpu().qwen_image_edit_components("meta", torch.bfloat16)
    counts = {k: sum(p.numel() for p in parts[k].parameters()) for k in ("transformer", "text_encoder", "vae")}
    assert 20.3e9 < counts["transformer"] < 20.6e9 and 8.2e9 < counts["text_encoder"] < 8.4e9, counts
    assert {p.dtype for k in counts for p in parts[k].parameters()} == {torch.bfloat16}
    assert parts["transformer"].config.zero_cond_t and torch.get_default_dtype() == torch.float32
