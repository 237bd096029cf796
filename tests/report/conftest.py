"""Real ``paste`` runs for the report tests: a subset of the benchmark's tasks (two per track and K) at 128 px.

- ``scored``: paste, scored with an injected detector that finds the layout except that it misses a subject on
  tasks with K >= 3, adds a detection of a category the task does not ask for on K = 2 tasks and an extra,
  unmatched instance of a requested category on K = 4 tasks (so every detection style occurs), plus a cheap
  injected identity backbone;
- ``limited``: a paste variant that supports at most 3 subjects (K = 4, 5 are skipped) and fails on one task,
  scored the same way;
- ``unscored``: paste on a white background, never scored.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import pytest

from msibench.bench.manifest import load_manifest
from msibench.methods.base import Capabilities
from msibench.methods.paste import PasteMethod

WRONG_CATEGORY = (80, "toaster")


def subset_manifest():
    """The packaged manifest restricted to the first two tasks of every (track, K); path and sha256 stay the
    packaged manifest's, so the runs record (and the report reloads) the real benchmark."""
    m = load_manifest()
    picked = []
    for key in sorted({(t.track, t.k) for t in m.tasks}):
        picked += [t for t in m.tasks if (t.track, t.k) == key][:2]
    return dataclasses.replace(m, tasks=tuple(picked))


class LimitedPaste(PasteMethod):
    """paste that declares at most 3 subjects and fails on one task: skipped and failed samples, for real."""

    FAIL_TASK: ClassVar[list[str]] = []

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(max_subjects=3, uses_layout=True, uses_zorder=True)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "limited": 3}

    def generate(self, requests):
        for r in requests:
            if r.task.id in self.FAIL_TASK:
                raise RuntimeError(f"simulated out of memory on {r.task.id}")
        return super().generate(requests)


def layout_detector(run_dirs: list[Path]):
    """Detections derived from each image's task layout, with a miss, a wrong category and an extra instance."""
    from msibench.scoring.oracle import Drawn, oracle_detector, task_images, task_layout

    def layout(task):
        drawn = task_layout(task)
        if task.track == "multi" and task.k >= 3:
            drawn = drawn[1:]  # the first subject is not found
        drawn = [dataclasses.replace(d, score=0.9 - 0.1 * i) for i, d in enumerate(drawn)]
        if task.track == "multi" and task.k == 2 and WRONG_CATEGORY[0] not in [d.category_id for d in drawn]:
            drawn.append(Drawn([0.02, 0.02, 0.2, 0.2], WRONG_CATEGORY[0], z=-1, score=0.4))
        if task.track == "multi" and task.k == 4:  # another instance of a requested category, matched to none
            drawn.append(Drawn([0.8, 0.8, 0.98, 0.98], task.subjects[1].category_id, z=-1, score=0.3))
        return drawn

    return oracle_detector(task_images(run_dirs, load_manifest()), layout, name="report-test-layout-detector")


def stats_encoder():
    from msibench.scoring.backbones import image_encoder_from_callable

    def fn(x):
        flat = x.flatten(2)
        import torch

        return torch.cat([flat.mean(-1), flat.std(-1)], dim=1)

    return image_encoder_from_callable(fn, name="report-test-stats")


def score_with_fakes(run_dir: Path, all_runs: list[Path], coco_root: Path):
    from msibench.scoring.score import score_run
    from msibench.scoring.scorer import Scorer, ScorerConfig

    cfg = ScorerConfig(metrics=("yolo_subj", "yolo_l", "z_acc", "dino_i", "collapse"))
    scorer = Scorer(cfg, detector=layout_detector(all_runs), dino=stats_encoder())
    return score_run(run_dir, scorer, coco_root=coco_root, progress=False)


@pytest.fixture(scope="session")
def report_runs(tmp_path_factory: pytest.TempPathFactory, coco_root: Path) -> dict[str, Path]:
    """{"scored", "limited", "unscored"} -> run folder (read-only for tests: copy before changing)."""
    from msibench.runner import run_method

    manifest = subset_manifest()
    base = tmp_path_factory.mktemp("report_runs")
    runs = {"scored": base / "paste", "limited": base / "paste-limited", "unscored": base / "paste-white"}
    multi_k2 = next(t.id for t in manifest.tasks if t.track == "multi" and t.k == 2)
    LimitedPaste.FAIL_TASK = [multi_k2]
    methods = {
        "scored": PasteMethod(resolution=128),
        "limited": LimitedPaste(resolution=128),
        "unscored": PasteMethod(resolution=128, background=[255, 255, 255]),
    }
    for name, method in methods.items():
        run_method(method, run_dir=runs[name], manifest=manifest, coco_root=coco_root, progress=False)
    scored = [runs["scored"], runs["limited"]]
    for run_dir in scored:
        score_with_fakes(run_dir, scored, coco_root)
    return runs
