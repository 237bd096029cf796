"""Fault injection: random SIGKILLs during `msibench run`, `msibench score` and `mscustomnet data build-msi`, then
the same command to the end, compared byte for byte with an uninterrupted run of the same command.

Stages (each against its own uninterrupted reference, made first in the same invocation):

  run     paste at 128 px, both tracks, 2 seeds (388 images on v2); every trial kills the command at a random moment,
          KILLS times, then lets it finish. Variant `run2`: two shards (0/2, 1/2) at once, each killed at random.
          Compared: every (task, sample) recorded exactly once, records equal except timings, images identical.
          Also: a second identical command started while the first runs exits 4 (busy) or finds all done.
  score   an 8-task run (--limit 4) scored by small random-weight networks (YOLO11n-seg from its yaml, DINO ViT-S/16
          and CLIP ViT-B/32 with seeded random weights, --batch-size 1 so the arithmetic never depends on which
          images share a batch), killed KILLS times, then finished. Compared: the current score records (every
          field but the timing), one per image, and the summary stored in scores.json. Variant `score2`: two
          scoring shards (--shard 0/2, 1/2) at once, each killed at random, against the one-process reference.
  build   build-msi of coco2017-mini val2017 with 2 workers, killed KILLS times, then finished. Compared: every file
          of the output folder.

After each finished command no temp file (``.*.tmp``) may remain. Each attempt restarts the command and kills it:
two attempts in three when its committed progress (record lines, score lines, pool files then scenes) passes the next
of KILLS points drawn uniformly over the work, the others at a time drawn uniformly within start-up (a resume with
nothing to do, timed), in shuffled order, all from --seed; benchmark references are in the cache first. A kill
"lands" when the command was still running (one that ends first is a resume that ran to the end).

Usage: python benchmarks/fault_injection.py [--kills 10] [--trials 1] [--seed 0] [--stages run,run2,score,score2,build]
         [--coco-root ../shared/data/coco2017-mini] [--work DIR] [--keep]
Exit status: 0 when every stage ends identical to its reference, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOLATILE = ("seconds", "peak_memory_mb")
MSIBENCH = [sys.executable, "-m", "msibench"]
MSCUSTOMNET = [sys.executable, "-c", "from mscustomnet.cli import main; main()"]


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["MSIBENCH_CACHE"] = str(cache)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def _run(cmd: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    start = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    return res.returncode, time.perf_counter() - start, res.stderr[-2000:]


def _kill_when(cmds: list[list[str]], env: dict[str, str], triggers: list) -> int:
    """Start ``cmds`` at once; SIGKILL each when its trigger (a no-argument predicate) becomes true. Returns how
    many were killed while still running."""
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in cmds]
    killed = 0
    alive = set(range(len(procs)))
    while alive:
        for i in list(alive):
            if procs[i].poll() is not None:
                alive.discard(i)
            elif triggers[i]():
                procs[i].send_signal(signal.SIGKILL)
                killed += 1
                alive.discard(i)
        time.sleep(0.002)
    for p in procs:
        p.wait(timeout=600)
    return killed


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def _attack(cmds, env, rng, kills: int, startup: float, progress) -> tuple[int, int]:
    """Kill ``cmds`` ``kills`` times (fewer when the work ends first), each time restarting them.

    Two kills in three happen when a command's progress (a fraction of the work, read from the files it commits)
    passes the next of its points drawn uniformly over (0, 1); the others at a time drawn uniformly within start-up
    (imports, locks, temp clean-up, checks), before any work is committed; the order of the two kinds is shuffled."""
    n_startup = kills // 3
    points = [sorted(rng.uniform(0.0, 1.0) for _ in range(kills - n_startup)) for _ in cmds]
    schedule = ["progress"] * (kills - n_startup) + ["startup"] * n_startup
    rng.shuffle(schedule)
    landed = attempts = 0
    for kind in schedule:
        now = progress()
        if now >= 1.0:
            break
        triggers = []
        for mine in points:
            if kind == "startup":
                deadline = time.perf_counter() + rng.uniform(0.0, startup)
                triggers.append(lambda deadline=deadline: time.perf_counter() >= deadline)
            else:
                while mine and mine[0] <= now:
                    mine.pop(0)  # passed already (the work moves in steps)
                target = mine.pop(0) if mine else 2.0
                triggers.append(lambda target=target: progress() >= target)
        landed += _kill_when(cmds, env, triggers)
        attempts += 1
    return landed, attempts


def _fraction(run_dir: Path, total: int) -> float:
    return _lines(run_dir / "scores.jsonl") / total


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp")]


def _records(run_dir: Path) -> tuple[int, list[dict]]:
    lines = [json.loads(x) for x in (run_dir / "records.jsonl").read_text().splitlines() if x.strip()]
    stable = sorted(
        ({k: v for k, v in r.items() if k not in VOLATILE} for r in lines),
        key=lambda r: (r["task_id"], r["sample_index"]),
    )
    return len(lines), stable


def _images(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "images").glob("*.png"))}


def _scores(run_dir: Path) -> tuple[list[dict], dict]:
    sys.path.insert(0, str(REPO))
    from msibench.scoring.store import load_scores

    header, records = load_scores(run_dir)
    stable = ({k: v for k, v in r.items() if k not in VOLATILE} for r in records)
    return sorted(stable, key=lambda r: (r["task_id"], r["sample_index"])), header.get("summary")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _report(name: str, trials: list[dict]) -> bool:
    ok = all(t["identical"] for t in trials)
    landed = sum(t["kills_landed"] for t in trials)
    tried = sum(t["kills"] for t in trials)
    print(
        f"{name:<6} trials {len(trials)}  kills {landed}/{tried} landed mid-command  "
        f"identical {sum(t['identical'] for t in trials)}/{len(trials)}  "
        f"temp files left {sum(t['temp_left'] for t in trials)}  "
        f"reference {trials[0]['reference_s']:.1f} s" + ("" if ok else "  MISMATCH: " + trials[0].get("why", "")),
        flush=True,
    )
    return ok


def stage_run(work: Path, env: dict, rng: random.Random, kills: int, trials: int, shards: int, coco: Path) -> bool:
    base = [*MSIBENCH, "run", "--method", "paste", "--no-progress", "-M", "resolution=128", "--seeds", "2"]
    base += ["--coco-root", str(coco)]
    ref = work / "run-ref"
    if not ref.exists():
        code, seconds, err = _run([*base, "--run-dir", str(ref)], env)
        assert code == 0, err
        (work / "run-ref.seconds").write_text(f"{seconds}")
    seconds = float((work / "run-ref.seconds").read_text())
    startup = _run([*base, "--run-dir", str(ref)], env)[1]  # a resume with nothing left to do
    ref_lines, ref_records = _records(ref)
    ref_images = _images(ref)
    out = []
    for trial in range(trials):
        run_dir = work / f"run{shards}-trial{trial}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmds = [
            [*base, "--run-dir", str(run_dir)] + (["--shard", f"{i}/{shards}"] if shards > 1 else [])
            for i in range(shards)
        ]
        log = run_dir / "records.jsonl"
        landed, attempts = _attack(cmds, env, rng, kills * shards, startup, lambda log=log: _lines(log) / ref_lines)
        codes = [_run(c, env)[0] for c in cmds]
        lines, records = _records(run_dir)
        identical = codes == [0] * shards and lines == ref_lines and records == ref_records
        identical = identical and _images(run_dir) == ref_images
        why = f"exit {codes}, {lines} lines (reference {ref_lines})"
        out.append(
            dict(
                kills=attempts * shards,
                kills_landed=landed,
                identical=identical,
                temp_left=len(_temp_files(run_dir)),
                reference_s=seconds,
                why=why,
            )
        )
    if shards == 1:  # two identical commands at once: the second is refused (4) or finds everything done (0)
        run_dir = work / "run-twice"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [*base, "--run-dir", str(run_dir)]
        procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL) for _ in "ab"]
        codes = sorted(p.wait() for p in procs)
        lines, records = _records(run_dir)
        twice_ok = codes in ([0, 4], [0, 0]) and lines == ref_lines and records == ref_records
        print(f"run    two identical commands at once: exit codes {codes}, {lines} record lines (ref {ref_lines})")
        out[0]["identical"] = out[0]["identical"] and twice_ok
    return _report("run" if shards == 1 else f"run{shards}", out)


def stage_score(
    work: Path, env: dict, rng: random.Random, kills: int, trials: int, coco: Path, shards: int = 1
) -> bool:
    run = work / "score-run"
    if not run.exists():
        cmd = [*MSIBENCH, "run", "--method", "paste", "--no-progress", "-M", "resolution=128", "--limit", "4"]
        code, _, err = _run([*cmd, "--coco-root", str(coco), "--run-dir", str(run)], env)
        assert code == 0, err
    score = [*MSIBENCH, "score", "--no-progress", "--detector", "yolo11n-seg.yaml", "--dino-weights", "random"]
    score += ["--clip-weights", "random", "--imgsz", "160", "--batch-size", "1", "--coco-root", str(coco)]
    ref = work / "score-ref"
    if not ref.exists():
        shutil.copytree(run, ref)
        code, seconds, err = _run([*score, str(ref)], env)
        assert code == 0, err
        (work / "score-ref.seconds").write_text(f"{seconds}")
    seconds = float((work / "score-ref.seconds").read_text())
    startup = _run([*score, str(ref)], env)[1]  # models loaded, nothing left to score
    ref_records, ref_summary = _scores(ref)
    out = []
    for trial in range(trials):
        target = work / f"score-trial{trial}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(run, target)
        cmds = [[*score, str(target)]]
        if shards > 1:
            cmds = [[*score, str(target), "--shard", f"{i}/{shards}"] for i in range(shards)]
        landed, attempts = _attack(cmds, env, rng, kills, startup, partial(_fraction, target, len(ref_records)))
        code = 0
        err = ""
        for cmd in cmds:  # each shard to the end (then the summary is the whole run's)
            shard_code, _, shard_err = _run(cmd, env)
            code, err = max(code, shard_code), err + shard_err
        records, summary = _scores(target)
        identical = code == 0 and records == ref_records and summary == ref_summary
        out.append(
            dict(
                kills=attempts,
                kills_landed=landed,
                identical=identical,
                temp_left=len(_temp_files(target)),
                reference_s=seconds,
                why=f"exit {code} {err[-300:]}; {len(records)} records (reference {len(ref_records)})",
            )
        )
    return _report("score" if shards == 1 else f"score{shards}", out)


def stage_build(work: Path, env: dict, rng: random.Random, kills: int, trials: int, coco: Path) -> bool:
    base = [*MSCUSTOMNET, "data", "build-msi", "--coco-root", str(coco), "--split", "val2017", "--workers", "2"]
    base += ["--quiet"]
    ref = work / "build-ref"
    if not ref.exists():
        code, seconds, err = _run([*base, "--out", str(ref)], env)
        assert code == 0, err
        (work / "build-ref.seconds").write_text(f"{seconds}")
    seconds = float((work / "build-ref.seconds").read_text())
    startup = _run([*base, "--out", str(ref)], env)[1]  # annotations read and filtered, nothing left to build
    reference = _tree(ref)
    scenes = _lines(ref / "manifest.jsonl") + _lines(ref / "skipped.jsonl")
    pool_files = len(list((ref / "pool").rglob("*.png")))
    out = []
    for trial in range(trials):
        target = work / f"build-trial{trial}"
        shutil.rmtree(target, ignore_errors=True)

        def progress(target=target):
            if (target / "stats.json").is_file():
                return 1.0
            if not (target / "pool.json").is_file():
                return 0.5 * min(len(list((target / "pool").rglob("*.png"))) / pool_files, 0.99)
            done = _lines(target / "manifest.jsonl") + _lines(target / "skipped.jsonl")
            return 0.5 + 0.5 * min(done / scenes, 0.99)

        landed, attempts = _attack([[*base, "--out", str(target)]], env, rng, kills, startup, progress)
        code, _, err = _run([*base, "--out", str(target)], env)
        tree = _tree(target)
        differ = sorted(set(tree) ^ set(reference) | {k for k in tree if k in reference and tree[k] != reference[k]})
        out.append(
            dict(
                kills=attempts,
                kills_landed=landed,
                identical=code == 0 and not differ,
                temp_left=len(_temp_files(target)),
                reference_s=seconds,
                why=f"exit {code} {err[-300:]}; differing files {differ[:5]}",
            )
        )
    return _report("build", out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs per trial before the finishing command")
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default="run,run2,score,score2,build")
    parser.add_argument("--coco-root", type=Path, default=REPO.parent / "shared" / "data" / "coco2017-mini")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="msibench-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    env = _env(work / "cache")
    rng = random.Random(args.seed)
    print(f"work folder {work}; {args.kills} kills per trial, {args.trials} trial(s), seed {args.seed}", flush=True)
    # references in the cache first, so the reference durations (the kill-time range) are those of the trials
    code, _, err = _run([*MSIBENCH, "data", "prepare", "--coco-root", str(args.coco_root)], env)
    assert code == 0, err
    ok = True
    try:
        for stage in args.stages.split(","):
            if stage == "run":
                ok &= stage_run(work, env, rng, args.kills, args.trials, 1, args.coco_root)
            elif stage == "run2":
                ok &= stage_run(work, env, rng, args.kills, args.trials, 2, args.coco_root)
            elif stage == "score":
                ok &= stage_score(work, env, rng, args.kills, args.trials, args.coco_root)
            elif stage == "score2":
                ok &= stage_score(work, env, rng, args.kills, args.trials, args.coco_root, shards=2)
            elif stage == "build":
                ok &= stage_build(work, env, rng, args.kills, args.trials, args.coco_root)
            else:
                raise SystemExit(f"unknown stage {stage!r}")
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("all identical to the uninterrupted runs" if ok else "MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
