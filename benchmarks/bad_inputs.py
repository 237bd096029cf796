"""Bad inputs: try each one on the real commands (subprocesses, as a user types them) and classify what happens.

- clean: the command refuses with the expected exit code (2 usage, 1 error, 3 failures recorded, 4 busy; see
  msibench/exitcodes.py) and a message naming the file, option or thing at fault, no traceback, and nothing already
  done is lost; or, for an input the tools are meant to handle (a moved run folder, a restored photo), it works and
  its output says what it covers.
- ugly: refused, but with another exit code, a traceback, or a message that does not name what is wrong.
- wrong-or-lost: accepted as if fine (exit 0 where it must refuse, a figure or table that mixes or hides what it
  covers), or something already done was lost or changed.

Setup (in --work, default a temp folder): small paste runs at 64 px on coco2017-mini (v2 and v1, 1 task per track;
a run from a custom 2-task manifest), scored with a random-weight DINO (no hub access needed), and a small COCO subset
(60 val2017 photos, --alpha 3) for build-msi. Everything runs offline on CPU in a few minutes.

Usage: python benchmarks/bad_inputs.py [--coco-root ../shared/data/coco2017-mini] [--work DIR] [--only NAME,...]
Prints one line per case and the totals; exit status 1 when any case is wrong-or-lost.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's msibench, as the commands it starts (PYTHONPATH)
MSIBENCH = [sys.executable, "-m", "msibench"]
MSCUSTOMNET = [sys.executable, "-c", "from mscustomnet.cli import main; main()"]
SCORE = ["--metrics", "dino_i", "--identity-crop", "target", "--dino-weights", "random", "--no-progress"]


@dataclass
class Case:
    name: str
    command: Callable[[Path], list[str]]  # work folder -> argv
    codes: tuple[int, ...]  # the exit codes of a clean outcome
    names: tuple[str, ...] = ()  # what the output must name (substrings, {work} expanded)
    setup: Callable[[Path], None] | None = None
    lost: Callable[[Path], str | None] | None = None  # after the command: what was lost or is wrong, or None
    hold_lock: Callable[[Path], Path] | None = None  # a lock file this process holds while the command runs
    env: dict[str, str] = field(default_factory=dict)


def _env(work: Path, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["MSIBENCH_CACHE"] = str(work / "cache")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2", **extra)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MSIBENCH_DINO_WEIGHTS", "MSIBENCH_CLIP_WEIGHTS"):
        if name not in extra:
            env.pop(name, None)
    return env


def _run(argv: list[str], work: Path, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in argv], env=_env(work, extra or {}), capture_output=True, text=True, timeout=900, cwd=work
    )


def _must(argv: list[str], work: Path, codes: tuple[int, ...] = (0,)) -> None:
    res = _run(argv, work)
    if res.returncode not in codes:
        raise SystemExit(f"setup failed: {' '.join(map(str, argv))}\n{res.stdout[-2000:]}{res.stderr[-3000:]}")


def _digest(folder: Path, pattern: str = "*") -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob(pattern))
        if p.is_file() and not p.name.startswith(".")
    }


# ------------------------------------------------------------------------------------------------------- setup


def _subset_coco(coco: Path, dest: Path, n: int = 60) -> None:
    """A COCO root of the first ``n`` val2017 photos that have annotations (photos copied: cases damage them)."""
    instances = json.loads((coco / "annotations" / "instances_val2017.json").read_text())
    captions = json.loads((coco / "annotations" / "captions_val2017.json").read_text())
    annotated = {a["image_id"] for a in instances["annotations"]}
    images = [i for i in instances["images"] if i["id"] in annotated][:n]
    keep = {i["id"] for i in images}
    (dest / "annotations").mkdir(parents=True)
    (dest / "val2017").mkdir()
    for name, data in (("instances", instances), ("captions", captions)):
        data = {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}
        (dest / "annotations" / f"{name}_val2017.json").write_text(json.dumps(data))
    for image in images:
        shutil.copy(coco / "val2017" / image["file_name"], dest / "val2017" / image["file_name"])


def _custom_manifest(dest: Path) -> None:
    """The packaged v2 manifest cut to the tasks `--limit 1` selects (a user's own manifest of 2 tasks)."""
    from msibench.bench.manifest import default_manifest_path, dumps, load_manifest

    raw = json.loads(default_manifest_path().read_text())
    chosen = {t.id for t in load_manifest().select("all", 1)}
    tasks = [t for t in raw["tasks"] if t["id"] in chosen]
    used = {s["reference"]["image_id"] for t in tasks for s in t["subjects"]}
    raw.update(tasks=tasks, sources=[s for s in raw["sources"] if s["image_id"] in used])
    dest.write_bytes(dumps(raw))


def setup(work: Path, coco: Path) -> None:
    """What the cases start from; each part is made once per work folder."""
    if not (work / "custom" / "scores.json").is_file():
        paste = [*MSIBENCH, "run", "--method", "paste", "-M", "resolution=64", "--limit", "1", "--no-progress"]
        paste += ["--coco-root", coco]
        _must([*paste, "--run-dir", work / "v2"], work)
        _must([*paste, "--run-dir", work / "v1", "--manifest", "v1"], work)
        _custom_manifest(work / "custom.json")
        _must([*paste, "--run-dir", work / "custom", "--manifest", work / "custom.json"], work)
        for run in ("v2", "v1", "custom"):
            _must([*MSIBENCH, "score", work / run, *SCORE, "--coco-root", coco], work)
    if (work / "msi-intact" / "stats.json").is_file():
        return
    shutil.rmtree(work / "coco", ignore_errors=True)
    _subset_coco(coco, work / "coco")
    _must([*MSCUSTOMNET, "data", "build-msi", "--coco-root", work / "coco", "--split", "val2017", "--out",
           work / "msi-intact", "--alpha", "3", "--quiet"], work, (0, 3))  # fmt: skip


# ------------------------------------------------------------------------------------------------------- cases


def _copy(work: Path, src: str, dst: str) -> Path:
    shutil.rmtree(work / dst, ignore_errors=True)
    return Path(shutil.copytree(work / src, work / dst))


def _records_kept(run: str) -> Callable[[Path], str | None]:
    def check(work: Path) -> str | None:
        before = json.loads((work / f"{run}.digest.json").read_text())
        now = _digest(work / run, "images/*") | _digest(work / run, "records.jsonl")
        return None if now == before else f"{run}: images or records changed"

    return check


def _remember(run: str) -> Callable[[Path], None]:
    def remember(work: Path) -> None:
        digest = _digest(work / run, "images/*") | _digest(work / run, "records.jsonl")
        (work / f"{run}.digest.json").write_text(json.dumps(digest))

    return remember


def _damage_run_json(work: Path) -> None:
    _copy(work, "v2", "torn")
    (work / "torn" / "run.json").write_text('{"method": "paste", "fing')
    _remember("torn")(work)


def _move_custom(work: Path) -> None:
    """The custom run copied to another machine: its manifest file is not there."""
    moved = _copy(work, "custom", "moved")
    info = json.loads((moved / "run.json").read_text())
    info["manifest"]["path"] = str(work / "elsewhere" / "custom.json")
    (moved / "run.json").write_text(json.dumps(info))


def _old_style_custom(work: Path) -> None:
    """A run made before run folders kept their manifest, whose manifest then moved."""
    _move_custom(work)
    (work / "moved" / "manifest.json").unlink()


def _tamper_image(work: Path) -> None:
    run = _copy(work, "v2", "tampered")
    image = sorted((run / "images").iterdir())[0]
    image.write_bytes(image.read_bytes()[:-8] + b"damaged!")


def _damage_photo(work: Path) -> None:
    shutil.rmtree(work / "coco-damaged", ignore_errors=True)
    shutil.copytree(work / "coco", work / "coco-damaged")
    pool = json.loads((work / "msi-intact" / "pool.json").read_text())
    image_id = min(e["image_id"] for entries in pool["categories"].values() for e in entries)
    photo = work / "coco-damaged" / "val2017" / f"{image_id:012d}.jpg"
    (work / "damaged-photo.txt").write_text(photo.name)
    photo.write_bytes(photo.read_bytes()[:2000])
    shutil.rmtree(work / "msi-damaged", ignore_errors=True)


def _restore_photo(work: Path) -> None:
    name = (work / "damaged-photo.txt").read_text()
    shutil.copy(work / "coco" / "val2017" / name, work / "coco-damaged" / "val2017" / name)


def _same_as_intact(work: Path) -> str | None:
    skip = {"config.json"}
    a = {k: v for k, v in _digest(work / "msi-damaged").items() if k not in skip}
    b = {k: v for k, v in _digest(work / "msi-intact").items() if k not in skip}
    return None if a == b else f"{len(set(a.items()) ^ set(b.items()))} files differ from the intact build"


def _torn_msi(work: Path) -> None:
    msi = _copy(work, "msi-intact", "msi-torn")
    data = (msi / "manifest.jsonl").read_bytes()
    (msi / "manifest.jsonl").write_bytes(data + b'{"image_id": 1, "subjects": [{"cat')  # a torn write


def _train_config(work: Path) -> None:
    (work / "train.yaml").write_text(
        (REPO / "configs" / "mscustomnet.yaml")
        .read_text()
        .replace("msi: data/msi/train2017", f"msi: {work / 'msi-intact'}", 1)
    )


def _has(text: str) -> Callable[[Path], str | None]:
    def check(work: Path) -> str | None:
        out = (work / "last-output.txt").read_text()
        return None if text in out else f"the output does not say {text!r}"

    return check


def cases(coco: Path) -> list[Case]:
    run = [*MSIBENCH, "run", "--method", "paste", "-M", "resolution=64", "--limit", "1", "--no-progress"]
    run += ["--coco-root", str(coco)]
    build = [*MSCUSTOMNET, "data", "build-msi", "--split", "val2017", "--alpha", "3", "--quiet"]
    return [
        # ---- usage: exit 2, naming the option
        Case("run --method nosuch", lambda w: [*MSIBENCH, "run", "--method", "nosuch"], (2,), ("nosuch",)),
        Case("run -M resolution=abc", lambda w: [*run, "-M", "resolution=abc", "--run-dir", w / "x"], (2,),
             ("resolution", "abc")),
        Case("run -M nokey=1", lambda w: [*run, "-M", "nokey=1", "--run-dir", w / "x"], (2,), ("nokey",)),
        Case("score --metrics bogus", lambda w: [*MSIBENCH, "score", w / "v2", "--metrics", "bogus"], (2,),
             ("bogus",)),
        Case("run --limit 0", lambda w: [*run, "--limit", "0", "--run-dir", w / "x"], (2,), ("--limit",)),
        Case("run --shard 3/2", lambda w: [*run, "--shard", "3/2", "--run-dir", w / "x"], (2,), ("3/2",)),
        Case("run --device tpu", lambda w: [*run, "--device", "tpu", "--run-dir", w / "x"], (2,), ("tpu",)),
        Case("ls tasks --k 0", lambda w: [*MSIBENCH, "ls", "tasks", "--k", "0"], (2,), ("--k",)),
        Case("table --digits 99", lambda w: [*MSIBENCH, "table", w / "v2", "--digits", "99"], (2,), ("--digits",)),
        Case("plot by-k --width -1", lambda w: [*MSIBENCH, "plot", "by-k", "--run", f"A={w / 'v2'}", "--width",
             "-1"], (2,), ("--width",)),  # fmt: skip
        # ---- bad files: exit 1, naming the file
        Case("run --manifest missing file", lambda w: [*run, "--manifest", w / "nope.json", "--run-dir", w / "x"],
             (1,), ("nope.json",)),
        Case("run --manifest not JSON", lambda w: [*run, "--manifest", w / "bad.json", "--run-dir", w / "x"], (1,),
             ("bad.json", "not valid JSON"), setup=lambda w: (w / "bad.json").write_text("{tasks: [")),
        Case("score a folder that is not a run", lambda w: [*MSIBENCH, "score", w / "coco", *SCORE], (1,),
             ("run.json",)),
        Case("run another config into a run folder", lambda w: [*run, "-M", "resolution=48", "--run-dir",
             w / "v2"], (1,), ("refusing to mix",), lost=_records_kept("v2"), setup=_remember("v2")),  # fmt: skip
        Case("damaged run.json", lambda w: [*run, "--run-dir", w / "torn"], (1,), ("run.json", "--repair"),
             setup=_damage_run_json, lost=_records_kept("torn")),
        Case("damaged run.json, --repair", lambda w: [*run, "--run-dir", w / "torn", "--repair"], (0,),
             ("already done",), setup=_damage_run_json, lost=_records_kept("torn")),
        Case("tampered image, score", lambda w: [*MSIBENCH, "score", w / "tampered", *SCORE], (3,),
             ("changed since",), setup=_tamper_image),
        Case("report --out is a file", lambda w: [*MSIBENCH, "report", w / "v2", "--out", w / "custom.json",
             "--no-progress"], (2,), ("custom.json",)),  # fmt: skip
        Case("weights ls, variable names no file", lambda w: [*MSIBENCH, "weights", "ls", "--scorers"], (1,),
             ("nothere.pth",), env={"MSIBENCH_DINO_WEIGHTS": "/nonexistent/nothere.pth"}),
        # ---- mixed and partial: refused, naming both / the coverage
        Case("compare v1 run vs v2 run", lambda w: [*MSIBENCH, "compare", w / "v1", w / "v2", "--allow-partial"],
             (1,), ("different benchmark manifests", "{work}/v1", "{work}/v2")),
        Case("table v1 + v2", lambda w: [*MSIBENCH, "table", w / "v1", w / "v2", "--allow-partial"], (1,),
             ("different benchmark manifests",)),
        Case("plot by-k v1 + v2", lambda w: [*MSIBENCH, "plot", "by-k", "--run", f"A={w / 'v1'}", "--run",
             f"B={w / 'v2'}", "--allow-partial", "--out", w / "fig"], (1,), ("different benchmark manifests",)),
        Case("plot ablation v1 + v2", lambda w: [*MSIBENCH, "plot", "ablation", "--run", f"A={w / 'v1'}", "--run",
             f"B={w / 'v2'}", "--allow-partial", "--out", w / "fig"], (1,), ("different benchmark manifests",)),
        Case("table of a partial run", lambda w: [*MSIBENCH, "table", w / "v2"], (1,), ("--allow-partial",)),
        Case("compare partial runs", lambda w: [*MSIBENCH, "compare", w / "v2", w / "v2"], (1,),
             ("--allow-partial",)),
        Case("plot by-k of a partial run", lambda w: [*MSIBENCH, "plot", "by-k", "--run", f"A={w / 'v2'}", "--out",
             w / "fig"], (1,), ("--allow-partial",)),  # fmt: skip
        Case("table --paper, random-weight scorer", lambda w: [*MSIBENCH, "table", w / "custom", "--paper"], (0,),
             ("NOT the pinned scorers", "random")),
        Case("score --limit 1 summary", lambda w: [*MSIBENCH, "score", w / "limited", *SCORE, "--limit", "1"], (0,),
             ("pending", "PARTIAL"), setup=lambda w: _limited(w, coco)),
        # ---- relocated run folders
        Case("table of a moved custom-manifest run", lambda w: [*MSIBENCH, "table", w / "moved"], (0,),
             ("Paste",), setup=_move_custom),
        Case("report of a moved custom-manifest run", lambda w: [*MSIBENCH, "report", w / "moved", "--out",
             w / "rep", "--no-progress"], (0,), ("wrote",), setup=_move_custom),  # fmt: skip
        Case("old-style moved run, score", lambda w: [*MSIBENCH, "score", w / "moved", *SCORE], (1,),
             ("--manifest",), setup=_old_style_custom),
        Case("old-style moved run, score --manifest", lambda w: [*MSIBENCH, "score", w / "moved", *SCORE,
             "--manifest", w / "custom.json"], (0,), ("single:",), setup=_old_style_custom),  # fmt: skip
        # ---- busy: exit 4, naming the holder
        Case("run while its shard is locked", lambda w: [*run, "--run-dir", w / "v2"], (4,), ("pid",),
             hold_lock=lambda w: w / "v2" / ".shard-0-of-1.lock"),
        Case("report into a locked --out", lambda w: [*MSIBENCH, "report", w / "v2", "--out", w / "rep2",
             "--no-progress"], (4,), ("pid",), hold_lock=lambda w: w / "rep2" / ".report.lock"),  # fmt: skip
        Case("build-msi into a locked --out", lambda w: [*build, "--coco-root", w / "coco", "--out",
             w / "msi-intact"], (4,), ("pid",), hold_lock=lambda w: w / "msi-intact" / ".build.lock"),  # fmt: skip
        Case("train into a locked --out", lambda w: [*MSCUSTOMNET, "train", "--config", w / "train.yaml", "--out",
             w / "train-out", "--quiet"], (4,), ("pid",), setup=_train_config,
             hold_lock=lambda w: w / "train-out" / ".train.lock"),  # fmt: skip
        # ---- MSI data
        Case("build-msi over a damaged photo", lambda w: [*build, "--coco-root", w / "coco-damaged", "--out",
             w / "msi-damaged"], (3,), ("cannot be decoded",), setup=_damage_photo),  # fmt: skip
        Case("build-msi resumed after the photo is restored", lambda w: [*build, "--coco-root", w / "coco-damaged",
             "--out", w / "msi-damaged"], (0, 3), (), setup=_restore_photo, lost=_same_as_intact),  # fmt: skip
        Case("data info --check, torn manifest line", lambda w: [*MSCUSTOMNET, "data", "info", w / "msi-torn",
             "--check"], (1,), ("torn",), setup=_torn_msi),  # fmt: skip
    ]  # fmt: skip


def _limited(work: Path, coco: Path) -> None:
    shutil.rmtree(work / "limited", ignore_errors=True)
    _must([*MSIBENCH, "run", "--method", "paste", "-M", "resolution=64", "--limit", "2", "--no-progress",
           "--coco-root", coco, "--run-dir", work / "limited"], work)  # fmt: skip


def classify(case: Case, work: Path) -> tuple[str, str]:
    from msibench.records import exclusive_or_busy

    if case.setup is not None:
        case.setup(work)
    argv = case.command(work)
    if case.hold_lock is not None:
        with exclusive_or_busy(case.hold_lock(work), "bad_inputs", "wait"):
            res = _run(argv, work, case.env)
    else:
        res = _run(argv, work, case.env)
    output = res.stdout + res.stderr
    (work / "last-output.txt").write_text(output)
    last = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1:] or [""]
    summary = f"exit {res.returncode}: {last[0][:150]}"
    problem = case.lost(work) if case.lost is not None else None
    if problem is not None:
        return "wrong-or-lost", f"{summary} [{problem}]"
    if res.returncode not in case.codes:
        if res.returncode == 0 or (0 in case.codes and res.returncode != 0 and not case.names):
            return "wrong-or-lost", f"{summary} [expected exit {case.codes}]"
        return "ugly", f"{summary} [expected exit {case.codes}]"
    if "Traceback (most recent call last)" in output:
        return "ugly", f"{summary} [traceback]"
    missing = [n.format(work=work) for n in case.names if n.format(work=work) not in output]
    if missing:
        # a success that does not say what it covers is wrong; a refusal that does not name the thing is ugly
        return ("wrong-or-lost" if res.returncode == 0 else "ugly"), f"{summary} [does not say {missing}]"
    return "clean", summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco-root", type=Path, default=REPO.parent / "shared" / "data" / "coco2017-mini")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--only", default=None, help="Comma-separated case names (substrings).")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="msibench-bad-inputs-"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    coco = args.coco_root.resolve()
    setup(work, coco)
    selected = cases(coco)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        selected = [c for c in selected if any(w in c.name for w in wanted)]
    outcome = Counter()
    for case in selected:
        verdict, detail = classify(case, work)
        outcome[verdict] += 1
        print(f"{verdict:<14} {case.name:<48} {detail}", flush=True)
    print(
        f"{len(selected)} bad inputs: {outcome['clean']} clean, {outcome['ugly']} ugly, "
        f"{outcome['wrong-or-lost']} wrong or lost (work folder {work})"
    )
    return 1 if outcome["wrong-or-lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
