from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_paste_run(tmp_path_factory: pytest.TempPathFactory, coco_root: Path) -> Path:
    """A paste run of 4 single and 4 two-subject tasks (the first of the packaged manifest) at 128 px over the real
    COCO references (read-only: copy it)."""
    from scoring_helpers import manifest_with_tasks

    from msibench.bench.manifest import load_manifest
    from msibench.methods.paste import PasteMethod
    from msibench.runner import run_method

    folder = tmp_path_factory.mktemp("paste_small")
    tasks = load_manifest().tasks
    ids = [t.id for t in tasks if t.track == "single"][:4] + [t.id for t in tasks if t.k == 2][:4]
    manifest_with_tasks(folder / "manifest.json", ids)
    run_dir = folder / "run"
    summary = run_method(
        PasteMethod(resolution=128),
        run_dir=run_dir,
        manifest=folder / "manifest.json",
        coco_root=coco_root,
        progress=False,
    )
    assert summary.ok == 8
    return run_dir


@pytest.fixture
def run_copy(small_paste_run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(small_paste_run, dest)
    return dest
