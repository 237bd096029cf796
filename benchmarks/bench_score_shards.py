"""Scoring throughput with N shards against one process, on the same images, interleaved; and the merge's cost.

1. Throughput. A paste run (--limit L per track, 128 px) is scored from scratch by the same random-weight scorers
   (YOLO11n-seg from its yaml, DINO ViT-S/16 and CLIP ViT-B/32 with seeded random weights: real architectures, so
   real cost) in two ways, alternately, ROUNDS times: one `msibench score` process with T torch threads, and N
   `msibench score --shard I/N` processes at once with T / N threads each (the same cores in all). Wall time of each
   way from the first process start to the last exit, model loading included (a shard loads its models too), and
   the images/s of each; the ratio is one-process time / N-shard time. Both must leave the same score records:
   every field equal but the metric values, which may differ by float rounding where a detector batch holds other
   images (the one process and a shard batch different neighbours); the largest difference is printed and must stay
   below 1e-4 (with --batch-size 1 they are identical, as tests/scoring/test_scoring_shards.py checks).
2. Merge. The summary in scores.json is rewritten from every current score record by whichever shard ends (under
   the folder's scores lock): `finish_scores` on synthetic folders of R = 1k, 4k, 16k records, timed; the cost per
   record should stay flat (O(records)).

Usage: python benchmarks/bench_score_shards.py [--shards 2] [--threads 2] [--limit 6] [--rounds 3]
         [--coco-root ../shared/data/coco2017-mini] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MSIBENCH = [sys.executable, "-m", "msibench"]
SCORE = ["score", "--no-progress", "--detector", "yolo11n-seg.yaml", "--dino-weights", "random"]
SCORE += ["--clip-weights", "random", "--imgsz", "320", "--batch-size", "4"]


def _env(cache: Path) -> dict[str, str]:
    env = {**os.environ, "MSIBENCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _differences(a: dict, b: dict) -> tuple[bool, float]:
    """(every field but the metric values equal, the largest |difference| of a metric value)."""
    if a.keys() != b.keys():
        return False, float("inf")
    worst = 0.0
    for key in a:
        ra, rb = dict(a[key]), dict(b[key])
        ma, mb = ra.pop("metrics", {}) or {}, rb.pop("metrics", {}) or {}
        if ra != rb or ma.keys() != mb.keys():
            return False, float("inf")
        for m in ma:
            if isinstance(ma[m], (int, float)) and isinstance(mb[m], (int, float)):
                worst = max(worst, abs(float(ma[m]) - float(mb[m])))
            elif ma[m] != mb[m]:
                return False, float("inf")
    return True, worst


def _scored(run: Path) -> dict:
    sys.path.insert(0, str(REPO))
    from msibench.scoring.store import load_scores

    _, records = load_scores(run)
    return {(r["task_id"], r["sample_index"]): {k: v for k, v in r.items() if k != "seconds"} for r in records}


def _timed(cmds: list[list[str]], env: dict) -> float:
    start = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in cmds]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(p.args)} exited {p.returncode}: {err[-500:]}")
    return time.perf_counter() - start


def throughput(work: Path, env: dict, coco: Path, limit: int, shards: int, threads: int, rounds: int) -> dict:
    run = work / "run"
    cmd = [*MSIBENCH, "run", "--method", "paste", "--no-progress", "-M", "resolution=128", "--limit", str(limit)]
    subprocess.run([*cmd, "--coco-root", str(coco), "--run-dir", str(run)], env=env, check=True, capture_output=True)
    images = sum(1 for _ in (run / "images").iterdir())
    base = [*MSIBENCH, *SCORE, "--coco-root", str(coco)]
    warm = work / "warm"  # reference features and model files cached before any timing
    shutil.copytree(run, warm)
    subprocess.run([*base, str(warm)], env=env, check=True, capture_output=True)
    one_s, sharded_s, same, worst = [], [], True, 0.0
    per_shard = max(1, threads // shards)
    for r in range(rounds):
        for way in ("one", "sharded") if r % 2 == 0 else ("sharded", "one"):  # interleaved, order alternating
            target = work / f"{way}-{r}"
            shutil.copytree(run, target)
            if way == "one":
                one_s.append(_timed([[*base, "--threads", str(threads), str(target)]], env))
            else:
                cmds = [
                    [*base, "--threads", str(per_shard), "--shard", f"{i}/{shards}", str(target)]
                    for i in range(shards)
                ]
                sharded_s.append(_timed(cmds, env))
        fields_equal, diff = _differences(_scored(work / f"one-{r}"), _scored(work / f"sharded-{r}"))
        same &= fields_equal and diff < 1e-4
        worst = max(worst, diff)
    one, sharded = sorted(one_s)[len(one_s) // 2], sorted(sharded_s)[len(sharded_s) // 2]
    return {
        "images": images,
        "shards": shards,
        "threads": threads,
        "one_process_s": one_s,
        "sharded_s": sharded_s,
        "one_process_images_per_s": images / one,
        "sharded_images_per_s": images / sharded,
        "speedup_median": one / sharded,
        "same_scores": same,
        "max_metric_difference": worst,
    }


def merge_cost(work: Path) -> list[dict]:
    sys.path.insert(0, str(REPO))
    from msibench.records import read_records
    from msibench.scoring.store import finish_scores

    template = work / "one-0"
    gen = read_records(template / "records.jsonl")
    scores = [r for r in read_records(template / "scores.jsonl") if r.get("status") == "ok"]
    header = json.loads((template / "scores.json").read_text())
    out = []
    finish_scores(template, header["scorer_hash"])  # imports and first-call costs belong to no size
    for n in (1000, 4000, 16000):
        folder = work / f"merge-{n}"
        folder.mkdir()
        shutil.copy(template / "run.json", folder / "run.json")
        shutil.copy(template / "scores.json", folder / "scores.json")
        with open(folder / "records.jsonl", "w") as g, open(folder / "scores.jsonl", "w") as s:
            for i in range(n):  # distinct units: the template's records under new sample indices
                rec = dict(gen[i % len(gen)], sample_index=i)
                score = dict(scores[i % len(scores)], task_id=rec["task_id"], sample_index=i)
                score["image_sha256"] = rec.get("image_sha256")
                score["fingerprint"] = rec.get("fingerprint")
                g.write(json.dumps(rec) + "\n")
                s.write(json.dumps(score) + "\n")
        start = time.perf_counter()
        counts = finish_scores(folder, header["scorer_hash"])
        seconds = time.perf_counter() - start
        out.append(
            {"records": n, "seconds": seconds, "us_per_record": 1e6 * seconds / n, "counted": sum(counts.values())}
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--coco-root", type=Path, default=REPO.parent / "shared/data/coco2017-mini")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="msibench-shards-") as tmp:
        work = Path(tmp)
        env = _env(work / "cache")
        result = {
            "load_average_start": os.getloadavg(),
            "throughput": throughput(work, env, args.coco_root, args.limit, args.shards, args.threads, args.rounds),
            "merge": merge_cost(work),
            "load_average_end": os.getloadavg(),
        }
    t = result["throughput"]
    print(
        f"{t['images']} images, {t['threads']} threads in all: one process {t['one_process_images_per_s']:.3f} img/s, "
        f"{t['shards']} shards {t['sharded_images_per_s']:.3f} img/s: x{t['speedup_median']:.2f} (median of "
        f"{len(t['one_process_s'])} interleaved rounds); same scores: {t['same_scores']} (largest metric difference "
        f"{t['max_metric_difference']:.1e})"
    )
    for m in result["merge"]:
        print(f"merge: {m['records']} records in {m['seconds']:.3f} s ({m['us_per_record']:.1f} us/record)")
    print(f"load average {result['load_average_start'][0]:.2f} -> {result['load_average_end'][0]:.2f}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if t["same_scores"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
