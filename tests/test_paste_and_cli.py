from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from msibench import registry
from msibench.bench.manifest import load_manifest
from msibench.methods.base import GenerationRequest, SubjectInput
from msibench.methods.paste import PasteMethod


def _solid(color, size=(20, 10)):
    return Image.new("RGB", size, color), Image.new("L", size, 255)


def _request(subjects):
    task = load_manifest().tasks[0]
    return GenerationRequest(task=task, sample_index=0, seed=0, subjects=tuple(subjects))


def test_paste_draws_back_to_front_by_z_and_fits_aspect():
    red, red_mask = _solid((255, 0, 0))
    blue, blue_mask = _solid((0, 0, 255))
    # Blue is nearer (z=1) and listed first: order of listing must not matter, z must.
    subjects = [
        SubjectInput("dog", 18, (0.25, 0.25, 0.75, 0.75), 1, blue, blue_mask),
        SubjectInput("cat", 17, (0.0, 0.0, 0.5, 0.5), 0, red, red_mask),
    ]
    image = np.asarray(PasteMethod(resolution=100).generate([_request(subjects)])[0])
    assert image.shape == (100, 100, 3)
    # A 2:1 reference in a 50x50 box is 50x25, centred: rows 37..62 of the box at y 25..75.
    assert tuple(image[45, 40]) == (0, 0, 255)  # overlap: the nearer subject wins
    assert tuple(image[20, 10]) == (255, 0, 0)
    assert tuple(image[30, 60]) == (127, 127, 127)  # above the letterboxed blue patch: background
    assert tuple(image[90, 90]) == (127, 127, 127)


def test_paste_uses_the_mask():
    ref = Image.new("RGB", (10, 10), (0, 255, 0))
    mask = Image.new("L", (10, 10), 0)
    mask.paste(255, (0, 0, 5, 10))
    out = np.asarray(
        PasteMethod(resolution=10).generate([_request([SubjectInput("cup", 47, (0, 0, 1, 1), 0, ref, mask)])])[0]
    )
    assert tuple(out[5, 2]) == (0, 255, 0) and tuple(out[5, 8]) == (127, 127, 127)


def test_paste_options_are_validated_and_fingerprinted():
    assert PasteMethod(resolution="64").config()["resolution"] == 64
    assert PasteMethod(resolution=64).fingerprint_hash() != PasteMethod(resolution=65).fingerprint_hash()
    with pytest.raises(ValueError, match="unknown option 'size'"):
        PasteMethod(size=3)
    with pytest.raises(ValueError, match="resample"):
        PasteMethod(resample="magic")


def test_unknown_method_lists_close_matches():
    with pytest.raises(registry.UnknownMethodError, match="Did you mean: paste"):
        registry.resolve("pastee")
    with pytest.raises(registry.UnknownMethodError, match="ip-adapter"):
        registry.resolve("ipadapter")


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_help_and_ls_do_not_import_torch():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from msibench.cli import main\n"
        "r = CliRunner()\n"
        "for args in (['--help'], ['ls'], ['ls', 'tracks'], ['run', '--help']):\n"
        "    res = r.invoke(main, args)\n"
        "    assert res.exit_code == 0, (args, res.output)\n"
        "    print(res.output)\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'ultralytics', 'open_clip') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    res = _run_python(code)
    assert res.returncode == 0, res.stderr
    assert "paste" in res.stdout and "mscustomnet" in res.stdout


def test_bench_build_cli_reproduces_the_packaged_manifest(tmp_path, coco_plus_root):
    from msibench.bench.manifest import default_manifest_path

    out = tmp_path / "m.json"
    res = subprocess.run(
        [sys.executable, "-m", "msibench", "bench", "build", "--coco-root", str(coco_plus_root), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == default_manifest_path().read_bytes()


def test_data_prepare_cli(coco_plus_root):
    res = subprocess.run(
        [sys.executable, "-m", "msibench", "data", "prepare", "--coco-root", str(coco_plus_root)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "source files verified" in res.stdout
