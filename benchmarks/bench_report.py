"""Benchmark: ``msibench report`` over 5 methods x 200 tasks (1,000 generated 512² images plus the references), on the
200 tasks of MSIBench v1 by default (``--manifest v2`` for its 194).

The five runs are real ``paste`` runs of the whole benchmark with five configurations (background, filter), each
scored with injected cheap backbones (a detector reading the task layout, with a miss and a wrong-category
detection here and there, and a mean/std identity encoder) so every image has a full score record; the scorer's
own cost is not what is measured here. Measured in the same run, interleaved round by round (order alternating):

  cold-serial    an empty thumbnail cache, a new report folder, thumbnails made in this process (the baseline)
  cold-parallel  an empty thumbnail cache, a new report folder, thumbnails made by --workers processes
  warm           the thumbnail cache filled (a report of the same runs made before), a new report folder
  rebuild        the same report folder again (thumbnails already there)

Wall-clock times depend on what else runs on the machine; the CPU seconds (of this process, and of the thumbnail
worker processes) do not, and bound the wall time on 2 idle cores from below by max(CPU here, (CPU here + CPU in
workers) / 2).

Usage: python benchmarks/bench_report.py [--workers 2] [--rounds 2] [--resolution 512] [--workdir DIR]
           [--coco-root ../shared/data/coco2017-mini] [--json-out F]
The issue's target: a 5-method x 200-task report "in well under a minute on 2 cores".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "grey": {},
    "white": {"background": [255, 255, 255]},
    "black": {"background": [0, 0, 0]},
    "bicubic": {"resample": "bicubic"},
    "nearest": {"resample": "nearest", "background": [90, 110, 140]},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="thumbnail processes of the parallel builds")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--resolution", type=int, default=512, help="paste image size (the method's default)")
    p.add_argument("--manifest", default="v1", help="v1 has the 200 tasks of the target (v2: 194)")
    p.add_argument("--coco-root", type=Path, default=REPO.parent / "shared" / "data" / "coco2017-mini")
    p.add_argument("--workdir", type=Path, default=None, help="runs and caches (kept: a second call reuses the runs)")
    p.add_argument("--json-out", type=Path, default=None)
    return p.parse_args()


def layout_detector(manifest, runs: list[Path]):
    """Detections from each image's task layout: subject 0 missed on K >= 4, a wrong category on K = 2."""
    from msibench.scoring.oracle import Drawn, oracle_detector, task_images, task_layout

    def layout(task):
        drawn = task_layout(task)[1:] if task.k >= 4 else task_layout(task)
        if task.track == "multi" and task.k == 2:
            drawn.append(Drawn([0.02, 0.02, 0.2, 0.2], 80))
        return drawn

    return oracle_detector(task_images(runs, manifest), layout, name="bench-layout-detector", masks="boxes")


def make_runs(workdir: Path, resolution: int, coco_root: Path, manifest_name: str) -> list[Path]:
    from msibench.bench.manifest import load_manifest
    from msibench.methods.paste import PasteMethod
    from msibench.runner import run_method
    from msibench.scoring.backbones import image_encoder_from_callable
    from msibench.scoring.score import score_run
    from msibench.scoring.scorer import Scorer, ScorerConfig

    manifest = load_manifest(manifest_name)
    runs = []
    for name, options in CONFIGS.items():
        run_dir = workdir / "runs" / f"paste-{name}"
        start = time.perf_counter()
        s = run_method(PasteMethod(resolution=resolution, **options), run_dir=run_dir, coco_root=coco_root,
                       manifest=manifest, progress=False)  # fmt: skip
        if s.ok:
            print(f"  generated {run_dir.name}: {s.ok} images in {time.perf_counter() - start:.1f} s")
        runs.append(run_dir)

    def stats(x):
        import torch

        flat = x.flatten(2)
        return torch.cat([flat.mean(-1), flat.std(-1)], dim=1)

    scorer = Scorer(
        ScorerConfig(metrics=("yolo_subj", "yolo_l", "z_acc", "dino_i"), batch_size=16),
        detector=layout_detector(manifest, runs),
        dino=image_encoder_from_callable(stats, name="bench-stats"),
    )
    for run_dir in runs:
        start = time.perf_counter()
        s = score_run(run_dir, scorer, manifest=manifest, coco_root=coco_root, progress=False)
        if s.scored:
            print(f"  scored {run_dir.name}: {s.scored} images in {time.perf_counter() - start:.1f} s")
    return runs


def cpu_seconds() -> tuple[float, float]:
    """(user + system CPU seconds of this process, of its finished children): meaningful when other processes
    share the cores and the wall clock is not."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def main() -> None:
    args = parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-report-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["MSIBENCH_CACHE"] = str(workdir / "cache")
    import torch

    torch.set_num_threads(2)
    from msibench.cache import cache_dir
    from msibench.report.build import build_report

    print(f"workdir {workdir}; {os.cpu_count()} CPUs; {args.workers} thumbnail workers")
    runs = make_runs(workdir, args.resolution, args.coco_root, args.manifest)
    specs = [f"{name}={run}" for name, run in zip(CONFIGS, runs, strict=True)]
    thumbs = cache_dir() / "thumbs"

    def build(kind: str):
        out = workdir / "reports" / kind
        if kind != "rebuild":
            shutil.rmtree(out, ignore_errors=True)
        if kind.startswith("cold"):
            shutil.rmtree(thumbs, ignore_errors=True)
        workers = 1 if kind == "cold-serial" else args.workers
        before = cpu_seconds()
        start = time.perf_counter()
        summary = build_report(specs, out, workers=workers)
        seconds = time.perf_counter() - start
        after = cpu_seconds()
        return seconds, (after[0] - before[0], after[1] - before[1]), summary

    build("warm")  # fills the cache and imports everything once, untimed
    build("rebuild")
    kinds = ["cold-serial", "cold-parallel", "warm", "rebuild"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpus: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    last = None
    for r in range(args.rounds):
        order = kinds if r % 2 == 0 else kinds[::-1]
        for kind in order:
            if kind in ("warm", "rebuild") and not thumbs.is_dir():
                build("warm")  # a cold build just emptied the cache: refill it (untimed)
            seconds, (cpu_main, cpu_workers), summary = build(kind)
            times[kind].append(seconds)
            cpus[kind].append((cpu_main, cpu_workers))
            last = summary
            print(
                f"  round {r + 1} {kind:<14} {seconds:6.2f} s wall, CPU {cpu_main:6.2f} s here + {cpu_workers:6.2f} s "
                f"in workers ({summary.thumbnails_made} thumbnails made, {summary.thumbnails_cached} reused)"
            )
    base = statistics.median(times["cold-serial"])
    result = {
        "runs": len(runs),
        "tasks": last.tasks,
        "images": last.images,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "seconds": {k: statistics.median(v) for k, v in times.items()},
        "cpu_seconds_main": {k: statistics.median(c[0] for c in v) for k, v in cpus.items()},
        "cpu_seconds_workers": {k: statistics.median(c[1] for c in v) for k, v in cpus.items()},
        "load_average_1min": os.getloadavg()[0],
        "speedup_vs_cold_serial": {k: base / statistics.median(v) for k, v in times.items()},
        "index_html_bytes": (workdir / "reports" / "rebuild" / "index.html").stat().st_size,
    }
    print(f"\n{result['runs']} runs x {result['tasks']} tasks = {result['images']} images (median of {args.rounds})")
    for kind in kinds:
        s = result["seconds"][kind]
        main_cpu, workers_cpu = result["cpu_seconds_main"][kind], result["cpu_seconds_workers"][kind]
        print(
            f"  {kind:<14} {s:6.2f} s wall ({result['speedup_vs_cold_serial'][kind]:5.2f}x the cold serial build); "
            f"CPU {main_cpu:.2f} s here + {workers_cpu:.2f} s in thumbnail workers"
        )
    print(f"  load average during the run: {result['load_average_1min']:.1f} (other processes share the cores)")
    print(f"  index.html {result['index_html_bytes'] / 1e6:.1f} MB")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
