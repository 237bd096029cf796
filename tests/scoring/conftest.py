from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_paste_run(tmp_path_factory: pytest.TempPathFactory, coco_root: Path) -> Path:
    """A paste run of 4 single and 4 multi tasks at 128 px over the real COCO references (read-only: copy it)."""
    from msibench.methods.paste import PasteMethod
    from msibench.runner import run_method

    run_dir = tmp_path_factory.mktemp("paste_small") / "run"
    summary = run_method(PasteMethod(resolution=128), run_dir=run_dir, coco_root=coco_root, limit=4, progress=False)
    assert summary.ok == 8
    return run_dir


@pytest.fixture
def run_copy(small_paste_run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(small_paste_run, dest)
    return dest
