"""``msibench grid``: methods x shards as ready-to-submit jobs for engines that exist (SLURM, torchrun, plain shell).

msibench does not schedule anything. A grid is written out as scripts that call ``msibench run`` (and then
``msibench score``) with explicit ``--run-dir`` and ``--shard I/N``; everything that makes resubmission safe is the
runner's own guarantee: a shard skips the units already recorded in its run folder, a second writer of the same shard
is refused (exit 4), and the shards of one run folder cover every (task, sample) unit exactly once.

Jobs are numbered method-major: job ``j`` is method ``j // shards`` and shard ``j % shards``. The SLURM array script
and the plain per-GPU scripts use that one numbering (``grid.json`` lists it), torchrun gives every rank of one node a
shard of its own (``WORLD_SIZE`` shards, one torchrun command per method).

A grid file (YAML) names the methods with their options and the run settings::

    out: results/runs          # parent of the run folders (each is METHOD-FINGERPRINT, as msibench run names it)
    track: all
    seeds: 4                   # samples per task (msibench run --seeds)
    seed: 0                    # base seed
    shards: 8                  # shards per method (SLURM array tasks / plain jobs)
    gpus: 8                    # plain: one script per GPU; torchrun: --nproc-per-node
    device: cuda
    methods:
      - ip-adapter
      - name: ip-adapter
        options: {use_layout: true}
      - {name: mscustomnet, options: {weights: /models/ms, dtype: float16}}
    slurm: {partition: gpu, time: "04:00:00", gres: "gpu:1", cpus_per_task: 8, mem: 64G}
"""

from __future__ import annotations

import json
import shlex
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msibench.bench.manifest import TRACKS

ENGINES = ("slurm", "torchrun", "plain")
GRID_FILE = "grid.json"
GRID_SCHEMA = "msibench.grid/1"
_SETTINGS = (
    "out",
    "track",
    "seeds",
    "seed",
    "shards",
    "gpus",
    "device",
    "limit",
    "manifest",
    "coco_root",
    "msibench",
    "score",
    "score_options",
    "methods",
    "slurm",
)
_SLURM_KEYS = ("partition", "account", "time", "gres", "cpus_per_task", "mem", "qos", "max_parallel", "extra")


class GridError(ValueError):
    """A grid file or option that cannot make a grid; the message names the file and field."""


@dataclass(frozen=True)
class GridMethod:
    name: str
    options: tuple[tuple[str, str], ...] = ()

    def option_args(self) -> list[str]:
        return [arg for key, value in self.options for arg in ("-M", f"{key}={value}")]


@dataclass(frozen=True)
class GridSpec:
    methods: tuple[GridMethod, ...]
    out: str = "results/runs"
    track: str = "all"
    seeds: int = 1
    seed: int = 0
    shards: int = 1
    gpus: int = 1
    device: str = "cuda"
    limit: int | None = None
    manifest: str | None = None
    coco_root: str | None = None
    msibench: str = "msibench"
    score: bool = True
    score_options: tuple[str, ...] = ()
    slurm: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Job:
    index: int
    method: GridMethod
    shard: int
    shards: int
    run_dir: str
    argv: tuple[str, ...] = field(default=())

    def command(self) -> str:
        return shlex.join(self.argv)


def _where(source: str, key: str) -> str:
    return f"{source}: field {key!r}"


def _positive_int(source: str, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise GridError(f"{_where(source, key)}: expected an integer >= {minimum}, got {value!r}")
    return value


def _method(source: str, i: int, entry: Any) -> GridMethod:
    where = f"{source}: field 'methods[{i}]'"
    if isinstance(entry, str):
        name, options = entry, {}
    elif isinstance(entry, Mapping):
        unknown = set(entry) - {"name", "options"}
        if unknown:
            raise GridError(f"{where}: unknown key(s) {sorted(unknown)}; a method has 'name' and 'options'")
        name, options = entry.get("name"), entry.get("options") or {}
    else:
        raise GridError(f"{where}: expected a method name or {{name: ..., options: {{...}}}}, got {entry!r}")
    if not isinstance(name, str) or not name.strip():
        raise GridError(f"{where}.name: expected a method name, got {name!r}")
    if not isinstance(options, Mapping):
        raise GridError(f"{where}.options: expected a mapping of method options, got {options!r}")
    name = name.strip()
    file_part, sep, class_part = name.rpartition(":")
    if sep and file_part.endswith(".py"):  # a plugin file: absolute, for jobs that start in another folder
        name = f"{Path(file_part).expanduser().resolve()}:{class_part}"
    pairs = []
    for key, value in options.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple, Mapping)):
            value = json.dumps(value, separators=(",", ":"))  # -M reads lists as JSON
        pairs.append((str(key), str(value)))
    return GridMethod(name, tuple(pairs))


def spec_from_mapping(data: Mapping[str, Any], source: str = "grid") -> GridSpec:
    """Validate a grid (a loaded YAML file or the CLI's options); a bad field is named with its source."""
    if not isinstance(data, Mapping):
        raise GridError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    unknown = set(data) - set(_SETTINGS)
    if unknown:
        raise GridError(f"{source}: unknown field(s) {sorted(unknown)}; known: {', '.join(_SETTINGS)}")
    raw_methods = data.get("methods")
    if not raw_methods or not isinstance(raw_methods, Sequence) or isinstance(raw_methods, str):
        raise GridError(f"{_where(source, 'methods')}: expected a non-empty list of methods")
    methods = tuple(_method(source, i, entry) for i, entry in enumerate(raw_methods))
    seen: dict[GridMethod, int] = {}
    for i, method in enumerate(methods):
        if method in seen:
            raise GridError(
                f"{source}: field 'methods[{i}]' repeats methods[{seen[method]}] ({method.name} with the same "
                "options): both would write the same run folder"
            )
        seen[method] = i
    track = data.get("track", "all")
    if track not in (*TRACKS, "all"):
        raise GridError(f"{_where(source, 'track')}: choose single, multi or all, got {track!r}")
    limit = data.get("limit")
    if limit is not None:
        limit = _positive_int(source, "limit", limit, 1)
    slurm = data.get("slurm") or {}
    if not isinstance(slurm, Mapping):
        raise GridError(f"{_where(source, 'slurm')}: expected a mapping ({', '.join(_SLURM_KEYS)})")
    bad = set(slurm) - set(_SLURM_KEYS)
    if bad:
        raise GridError(f"{_where(source, 'slurm')}: unknown key(s) {sorted(bad)}; known: {', '.join(_SLURM_KEYS)}")
    if "max_parallel" in slurm:
        _positive_int(source, "slurm.max_parallel", slurm["max_parallel"], 1)
    extra = slurm.get("extra", [])
    if not isinstance(extra, Sequence) or isinstance(extra, str) or not all(isinstance(x, str) for x in extra):
        raise GridError(f"{_where(source, 'slurm.extra')}: expected a list of #SBATCH lines, e.g. ['--exclusive']")
    score_options = data.get("score_options") or []
    if isinstance(score_options, str):
        score_options = shlex.split(score_options)
    if not all(isinstance(x, str) for x in score_options):
        raise GridError(f"{_where(source, 'score_options')}: expected a list of msibench score arguments")
    score = data.get("score", True)
    if not isinstance(score, bool):
        raise GridError(f"{_where(source, 'score')}: expected true or false, got {score!r}")
    device = data.get("device", "cuda")
    if not isinstance(device, str) or not device:
        raise GridError(f"{_where(source, 'device')}: expected cpu, cuda or mps, got {device!r}")
    msibench = data.get("msibench", "msibench")
    if not isinstance(msibench, str) or not msibench.strip():
        raise GridError(f"{_where(source, 'msibench')}: expected the command that runs msibench")
    # Jobs start wherever the engine starts them (SLURM: the submitting folder, a node's home): paths are made
    # absolute here, where the user wrote them relative to.
    manifest = data.get("manifest")
    if manifest is not None and Path(str(manifest)).is_file():
        manifest = str(Path(str(manifest)).resolve())
    return GridSpec(
        methods=methods,
        out=str(Path(str(data.get("out", "results/runs"))).resolve()),
        track=track,
        seeds=_positive_int(source, "seeds", data.get("seeds", 1), 1),
        seed=_positive_int(source, "seed", data.get("seed", 0), 0),
        shards=_positive_int(source, "shards", data.get("shards", 1), 1),
        gpus=_positive_int(source, "gpus", data.get("gpus", 1), 1),
        device=device,
        limit=limit,
        manifest=None if manifest is None else str(manifest),
        coco_root=None if data.get("coco_root") is None else str(Path(str(data["coco_root"])).resolve()),
        msibench=msibench,
        score=score,
        score_options=tuple(score_options),
        slurm=tuple((k, slurm[k]) for k in _SLURM_KEYS if k in slurm),
    )


def load_grid_file(path: str | Path, overrides: Mapping[str, Any] | None = None) -> GridSpec:
    """Read a grid YAML file; ``overrides`` (CLI options that were given) replace its fields."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise GridError(f"{path}: cannot read the grid file ({err.strerror or err})") from err
    except yaml.YAMLError as err:
        raise GridError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, Mapping):
        raise GridError(f"{path}: expected a mapping of settings at the top level")
    return spec_from_mapping({**data, **(overrides or {})}, source=str(path))


def run_folder(method: GridMethod, out: str) -> str:
    """The folder ``msibench run`` would pick for this method and options (constructing it loads no weights)."""
    from msibench import registry
    from msibench.runner import run_dir_for

    try:
        instance = registry.build(method.name, dict(method.options))
    except (registry.UnknownMethodError, registry.MethodUnavailableError, ValueError) as err:
        raise GridError(f"method {method.name!r}: {err}") from err
    return str(run_dir_for(instance, out))


def _run_argv(spec: GridSpec, method: GridMethod, run_dir: str, shard: str | None) -> list[str]:
    argv = [*shlex.split(spec.msibench), "run", "--method", method.name, *method.option_args()]
    argv += ["--run-dir", run_dir, "--track", spec.track, "--seeds", str(spec.seeds), "--seed", str(spec.seed)]
    if shard is not None:
        argv += ["--shard", shard]
    if spec.limit is not None:
        argv += ["--limit", str(spec.limit)]
    if spec.manifest:
        argv += ["--manifest", spec.manifest]
    if spec.coco_root:
        argv += ["--coco-root", spec.coco_root]
    return [*argv, "--device", spec.device, "--no-progress"]


def score_argv(spec: GridSpec, run_dir: str) -> list[str]:
    return [*shlex.split(spec.msibench), "score", run_dir, *spec.score_options, "--no-progress"]


def build_jobs(spec: GridSpec) -> list[Job]:
    """Every (method, shard) job, numbered method-major."""
    jobs = []
    for m, method in enumerate(spec.methods):
        run_dir = run_folder(method, spec.out)
        for shard in range(spec.shards):
            argv = _run_argv(spec, method, run_dir, f"{shard}/{spec.shards}")
            jobs.append(Job(m * spec.shards + shard, method, shard, spec.shards, run_dir, tuple(argv)))
    folders: dict[str, GridMethod] = {}
    for job in jobs:
        other = folders.setdefault(job.run_dir, job.method)
        if other != job.method:
            raise GridError(
                f"methods {other.name} {dict(other.options)} and {job.method.name} {dict(job.method.options)} have "
                f"the same fingerprint (run folder {job.run_dir}): they would generate the same images; list one"
            )
    return jobs


_HEADER = """#!/usr/bin/env bash
# Written by `msibench grid`: {what}.
# Resubmitting is safe: each shard skips the units already recorded in its run folder, and a second writer of a
# shard is refused with exit 4.
"""

# msibench run's exit codes (msibench/exitcodes.py): 4 = another process writes this shard (it will finish it): not
# an error of this job. 3 = finished with failed samples recorded: the grid goes on and ends with 3
# (`msibench run --retry-failed` regenerates them); anything else is an error.
_PLAIN_STATUS = (
    'code=$?; case "$code" in 0|4) ;; 3) echo "job {index}: failed samples recorded (exit 3)" >&2; '
    '[ "$status" -eq 0 ] && status=3 ;; *) echo "job {index} exited $code" >&2; status=1 ;; esac'
)


def _slurm_script(spec: GridSpec, jobs: list[Job], logs: str) -> str:
    settings = dict(spec.slurm)
    last = len(jobs) - 1
    array = f"0-{last}" + (f"%{settings['max_parallel']}" if "max_parallel" in settings else "")
    lines = [_HEADER.format(what="SLURM array: one task per method x shard").rstrip("\n")]
    lines += ["#SBATCH --job-name=msibench-run", f"#SBATCH --array={array}", f"#SBATCH --output={logs}/run-%A_%a.out"]
    lines += _sbatch_resources(settings)
    lines += [
        "set -uo pipefail",
        "",
        f"# Job j = method j / {spec.shards}, shard j % {spec.shards} (grid.json lists every job).",
        'JOB="${SLURM_ARRAY_TASK_ID:?run this script with sbatch (or set SLURM_ARRAY_TASK_ID)}"',
        f"SHARDS={spec.shards}",
        f'if [ "$JOB" -lt 0 ] || [ "$JOB" -gt {last} ]; then',
        f'  echo "no job $JOB in this grid (0-{last})" >&2; exit 2',
        "fi",
        "METHOD=$((JOB / SHARDS))",
        "SHARD=$((JOB % SHARDS))",
        'case "$METHOD" in',
    ]
    for m, method in enumerate(spec.methods):
        job = jobs[m * spec.shards]
        argv = [*_run_argv(spec, method, job.run_dir, None), "--shard"]
        lines.append(f'  {m}) CMD=({shlex.join(argv)} "$SHARD/$SHARDS") ;;')
    lines += [
        "esac",
        'echo "job $JOB: ${CMD[*]}"',
        '"${CMD[@]}"',
        "code=$?",
        "# 4: another process writes this shard (a resubmission while the first still runs): not this job's failure",
        'case "$code" in 4) exit 0 ;; *) exit "$code" ;; esac',
        "",
    ]
    return "\n".join(lines)


def _sbatch_resources(settings: Mapping[str, Any]) -> list[str]:
    lines = []
    for key, flag in (
        ("partition", "partition"),
        ("account", "account"),
        ("qos", "qos"),
        ("time", "time"),
        ("gres", "gres"),
        ("cpus_per_task", "cpus-per-task"),
        ("mem", "mem"),
    ):
        if key in settings:
            lines.append(f"#SBATCH --{flag}={settings[key]}")
    if "gres" not in settings:
        lines.append("#SBATCH --gres=gpu:1")
    lines += [f"#SBATCH {extra}" for extra in settings.get("extra", [])]
    return lines


def _slurm_score_script(spec: GridSpec, run_dirs: list[str], logs: str) -> str:
    settings = dict(spec.slurm)
    lines = [_HEADER.format(what="SLURM array: one scoring task per run folder").rstrip("\n")]
    lines += [
        "#SBATCH --job-name=msibench-score",
        f"#SBATCH --array=0-{len(run_dirs) - 1}",
        f"#SBATCH --output={logs}/score-%A_%a.out",
    ]
    lines += _sbatch_resources(settings)
    lines += ["set -uo pipefail", "RUNS=("]
    lines += [f"  {shlex.quote(d)}" for d in run_dirs]
    lines += [
        ")",
        'RUN="${RUNS[${SLURM_ARRAY_TASK_ID:?run this script with sbatch}]}"',
        "CMD=(" + shlex.join(score_argv(spec, "RUN_DIR")).replace("RUN_DIR", '"$RUN"') + ")",
        'echo "score: ${CMD[*]}"',
        '"${CMD[@]}"',
        "",
    ]
    return "\n".join(lines)


def _slurm_submit(spec: GridSpec) -> str:
    lines = [_HEADER.format(what="submits the generation array, then scoring once it has ended").rstrip("\n")]
    lines += [
        "set -euo pipefail",
        'here="$(cd "$(dirname "$0")" && pwd)"',
        'mkdir -p "$here/logs"',
        'run=$(sbatch --parsable "$here/run.sbatch")',
    ]
    lines.append('echo "generation: job array $run"')
    if spec.score:
        # afterany: a shard that recorded failed samples still lets the others be scored; table marks what is missing.
        lines += [
            'score=$(sbatch --parsable --dependency=afterany:"${run%%;*}" "$here/score.sbatch")',
            'echo "scoring: $score"',
        ]
    return "\n".join(lines) + "\n"


def _plain_gpu_script(spec: GridSpec, jobs: list[Job], gpu: int) -> str:
    lines = [_HEADER.format(what=f"plain shell, GPU {gpu} of {spec.gpus}").rstrip("\n"), "set -uo pipefail"]
    if spec.device.startswith("cuda"):
        lines.append(f"export CUDA_VISIBLE_DEVICES={gpu}")
    lines.append("status=0")
    for job in jobs:
        lines += [
            f"# job {job.index}: {job.method.name}, shard {job.shard}/{job.shards}",
            f"{job.command()}",
            _PLAIN_STATUS.format(index=job.index),
        ]
    lines += ['exit "$status"', ""]
    return "\n".join(lines)


def _plain_all(spec: GridSpec, run_dirs: list[str], gpus_used: int) -> str:
    lines = [_HEADER.format(what="plain shell: every GPU script at once, then scoring").rstrip("\n")]
    lines += ["set -uo pipefail", 'cd "$(dirname "$0")"', "pids=()"]
    lines += [f"bash gpu-{g}.sh & pids+=($!)" for g in range(gpus_used)]
    lines += [
        "status=0",
        'for pid in "${pids[@]}"; do',
        '  wait "$pid"; code=$?',
        '  case "$code" in 0) ;; 3) [ "$status" -eq 0 ] && status=3 ;; *) status=1 ;; esac',
        "done",
    ]
    if spec.score:
        lines.append("# scoring: one pass per run folder (msibench score --shard splits a folder across processes)")
        lines += [f"{shlex.join(score_argv(spec, d))} || status=1" for d in run_dirs]
    lines += ['exit "$status"', ""]
    return "\n".join(lines)


def _torchrun_script(spec: GridSpec, run_dirs: list[str]) -> str:
    lines = [
        _HEADER.format(what=f"torchrun on one node, {spec.gpus} GPUs: one shard per rank").rstrip("\n"),
        "set -uo pipefail",
        "status=0",
    ]
    prefix = ["torchrun", "--standalone", f"--nproc-per-node={spec.gpus}", "-m", "msibench"]
    for method, run_dir in zip(spec.methods, run_dirs, strict=True):
        # Under torchrun each rank takes shard RANK/WORLD_SIZE and the GPU cuda:LOCAL_RANK (msibench run).
        argv = _run_argv(spec, method, run_dir, None)[len(shlex.split(spec.msibench)) :]
        device_at = argv.index("--device")
        del argv[device_at : device_at + 2]
        lines += [f"# {method.name} {dict(method.options) or ''}".rstrip(), f"{shlex.join([*prefix, *argv])}"]
        lines.append(_PLAIN_STATUS.format(index=method.name))
        if spec.score:
            lines.append(f"{shlex.join(score_argv(spec, run_dir))} || status=1")
    lines += ['exit "$status"', ""]
    return "\n".join(lines)


def _write(path: Path, text: str, executable: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if executable:
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def write_grid(spec: GridSpec, out: str | Path, engines: Sequence[str] = ENGINES) -> dict[str, list[Path]]:
    """Write the scripts of each engine under ``out/ENGINE/`` and ``out/grid.json``; returns the files per engine."""
    for engine in engines:
        if engine not in ENGINES:
            raise GridError(f"--engine {engine!r}: choose from {', '.join(ENGINES)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GridError(f"--out {out}: exists and is not a folder")
    jobs = build_jobs(spec)
    run_dirs = list(dict.fromkeys(job.run_dir for job in jobs))
    written: dict[str, list[Path]] = {}
    if "slurm" in engines:
        folder = out / "slurm"
        logs = str((folder / "logs").resolve())
        files = {
            "run.sbatch": _slurm_script(spec, jobs, logs),
            "submit.sh": _slurm_submit(spec),
        }
        if spec.score:
            files["score.sbatch"] = _slurm_score_script(spec, run_dirs, logs)
        for name, text in files.items():
            _write(folder / name, text)
        written["slurm"] = [folder / name for name in files]
    if "plain" in engines:
        folder = out / "plain"
        per_gpu: list[list[Job]] = [[] for _ in range(spec.gpus)]
        for job in jobs:  # round robin: consecutive shards of one method go to different GPUs
            per_gpu[job.index % spec.gpus].append(job)
        used = [g for g in range(spec.gpus) if per_gpu[g]]
        files = {f"gpu-{g}.sh": _plain_gpu_script(spec, per_gpu[g], g) for g in used}
        files["run_all.sh"] = _plain_all(spec, run_dirs, len(used))
        for name, text in files.items():
            _write(folder / name, text)
        written["plain"] = [folder / name for name in files]
    if "torchrun" in engines:
        folder = out / "torchrun"
        _write(folder / "run_all.sh", _torchrun_script(spec, run_dirs))
        written["torchrun"] = [folder / "run_all.sh"]
    description = {
        "schema": GRID_SCHEMA,
        "settings": {
            "out": spec.out,
            "track": spec.track,
            "seeds": spec.seeds,
            "seed": spec.seed,
            "shards": spec.shards,
            "gpus": spec.gpus,
            "device": spec.device,
            "limit": spec.limit,
            "manifest": spec.manifest,
            "coco_root": spec.coco_root,
            "score": spec.score,
        },
        "jobs": [
            {
                "index": job.index,
                "method": job.method.name,
                "options": dict(job.method.options),
                "shard": f"{job.shard}/{job.shards}",
                "run_dir": job.run_dir,
                "command": job.command(),
            }
            for job in jobs
        ],
        "score": [shlex.join(score_argv(spec, d)) for d in run_dirs] if spec.score else [],
    }
    _write(out / GRID_FILE, json.dumps(description, indent=2) + "\n", executable=False)
    return written
