"""``msibench`` command line. Importing this module must stay cheap: no torch, heavy imports inside commands."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from msibench import __version__
from msibench.clierrors import METHOD_HELP, method_error


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def _parse_options(pairs: tuple[str, ...]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected key=value, got {pair!r}", param_hint="-M")
        options[key.strip()] = value.strip()
    return options


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="msibench")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """MSIBench: evaluate controllable multi-subject image customization.

    Exit codes: 0 done and ok, 1 error, 2 usage, 3 failed samples recorded in the run folder, 4 busy (another process
    writes the same shard, scoring pass or build)."""
    _setup_logging(verbose)


@main.command("ls")
@click.argument("what", type=click.Choice(["methods", "tracks", "tasks"]), default="methods")
@click.option("--track", type=click.Choice(["single", "multi"]), default=None, help="tasks: only this track.")
@click.option("--k", "k", type=click.IntRange(min=1), default=None, help="tasks: only tasks with K subjects.")
@click.option(
    "--manifest", default=None, help="tracks, tasks: a manifest file, or a packaged name: v3 (default), v2, v1."
)
@click.option(
    "--method",
    "methods",
    multiple=True,
    metavar="SPEC",
    help="methods: list this one too: path/to/file.py:Class or package.module:Class (repeatable).",
)
def ls_command(what: str, track: str | None, k: int | None, manifest: str | None, methods: tuple[str, ...]) -> None:
    """List methods with their capabilities (the built-ins, installed plugins and any --method), the benchmark's
    tracks, or its tasks (id, K, categories, prompt; filter with --track and --k)."""
    from msibench import registry
    from msibench.clierrors import UsageClickError

    if what in ("tracks", "tasks"):
        if methods:
            raise UsageClickError("--method adds methods to `msibench ls methods`")
        _ls_benchmark(what, track, k, manifest)
        return
    if track is not None or k is not None:
        raise click.UsageError("--track and --k filter `msibench ls tasks`")
    click.echo(f"{'method':<16}{'max subjects':>13}  {'layout':<7}{'z-order':<8}{'tracks':<14}source")
    unusable = False
    for name, source in registry.listing(methods):
        where = source if isinstance(source, str) else source.describe()
        try:
            if isinstance(source, str) and source.startswith("unusable: "):
                raise registry.PluginError(source.removeprefix("unusable: "))
            caps = registry.build(name).capabilities
        except (registry.UnknownMethodError, registry.MethodUnavailableError, ValueError, TypeError) as err:
            unusable = unusable or not isinstance(err, registry.MethodUnavailableError)
            target = registry.METHODS.get(name, "")
            click.echo(f"{name:<16}{'-':>13}  {'-':<7}{'-':<8}{'-':<14}{target}  (unavailable: {err})".rstrip())
            continue
        label = name if len(name) < 16 else name + " "
        click.echo(
            f"{label:<16}{caps.max_subjects:>13}  {'yes' if caps.uses_layout else 'no':<7}"
            f"{'yes' if caps.uses_zorder else 'no':<8}{','.join(caps.tracks):<14}{where}"
        )
    if unusable and methods:
        raise SystemExit(2)


def _ls_benchmark(what: str, track: str | None, k: int | None, manifest: str | None) -> None:
    from collections import Counter

    from msibench.bench.manifest import ManifestError, load_manifest

    try:
        bench = load_manifest(manifest)
    except ManifestError as err:
        raise click.ClickException(str(err)) from err
    tasks = [t for t in bench.tasks if (track is None or t.track == track) and (k is None or t.k == k)]
    if what == "tracks":
        from msibench.scoring.aggregate import METRICS
        from msibench.scoring.table import COLUMNS

        # the metrics of Table I's columns (no torch is imported for them)
        metrics = {t: ", ".join(METRICS[m].label for tt, m in COLUMNS if tt == t) for t in ("single", "multi")}
        for name in ("single", "multi"):
            per_k = Counter(t.k for t in tasks if t.track == name)
            if per_k:
                ks = ", ".join(f"{n} with K={kk}" for kk, n in sorted(per_k.items()))
                click.echo(f"{name:<7} {sum(per_k.values())} tasks ({ks}); metrics: {metrics[name]}")
        click.echo(f"(manifest {bench.name}; --manifest v2 or v1 selects an older one)")
        return
    if not tasks:
        raise click.ClickException(f"no task of {bench.path} has track={track} and K={k}")
    width = max(len(t.id) for t in tasks)
    cat_width = min(48, max(len(", ".join(s.category for s in t.subjects)) for t in tasks))
    click.echo(f"{'task':<{width}}  {'K':>2}  {'categories':<{cat_width}}  prompt")
    for t in tasks:
        cats = ", ".join(s.category for s in t.subjects)
        click.echo(f"{t.id:<{width}}  {t.k:>2}  {cats:<{cat_width}}  {t.prompt}")


@main.group("bench")
def bench_group() -> None:
    """Build or inspect the benchmark manifest."""


_MANIFEST_HELP = "Manifest file, or a packaged name: v3 (default), v2 or v1."


@bench_group.command("build")
@click.option("--coco-root", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--split", default="val2017", show_default=True)
@click.option(
    "--review",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Hand review of reference candidates (default: the packaged msibench/data/reference_review.json).",
)
def bench_build(coco_root: Path, out: Path, seed: int, split: str, review: Path | None) -> None:
    """Write the MSIBench manifest built deterministically from a COCO 2017 split."""
    from msibench.bench.build import BuildError, BuildParams, build_manifest, load_review
    from msibench.bench.manifest import dumps
    from msibench.cache import atomic_write_bytes
    from msibench.coco import CocoError

    try:
        manifest = build_manifest(coco_root, BuildParams(split=split, seed=seed), load_review(review))
    except (BuildError, CocoError) as err:
        raise click.ClickException(str(err)) from err
    atomic_write_bytes(out, dumps(manifest))
    stats = manifest["build"]["stats"]
    click.echo(
        f"wrote {out}: {len(manifest['tasks'])} tasks (multi {stats['multi']['tasks']} of "
        f"{stats['multi']['requested']}, single {stats['single']['tasks']} of {stats['single']['requested']})"
    )
    if stats["references"]["pool_unreviewed"]:
        click.echo(f"warning: {stats['references']['pool_unreviewed']} pool references are not reviewed", err=True)


@bench_group.group("review", invoke_without_command=True)
@click.option(
    "--coco-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="COCO 2017 root (annotations/ and the split's photos) whose pool candidates to review.",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="HTML page to write.")
@click.option("--split", default="val2017", show_default=True)
@click.option(
    "--review",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Review file whose undecided pool members to show (default: the packaged reference_review.json).",
)
@click.option(
    "--category",
    "categories",
    multiple=True,
    help="Only the candidates of this COCO category (repeatable), to review a full COCO in parts.",
)
@click.pass_context
def bench_review(
    ctx: click.Context,
    coco_root: Path | None,
    out: Path | None,
    split: str,
    review: Path | None,
    categories: tuple[str, ...],
) -> None:
    """Write a static page of the pool members a review file has not decided yet (`bench review --coco-root DIR
    --out review.html`), to accept or reject by eye and export as a decisions file; merge that file into the
    review with `bench review apply FILE`. The pools are those `bench build` forms with the same --split and
    --review (they do not depend on --seed)."""
    if ctx.invoked_subcommand is not None:
        if coco_root or out or categories:
            raise click.UsageError(
                "--coco-root, --out and --category make the page; `bench review apply FILE` takes none of them"
            )
        return
    if coco_root is None or out is None:
        raise click.UsageError("bench review needs --coco-root DIR and --out PAGE.html (or: bench review apply FILE)")
    from msibench.bench.build import BuildError, BuildParams, load_review
    from msibench.bench.review import ReviewError, write_review_page
    from msibench.coco import CocoError

    try:
        n = write_review_page(coco_root, out, BuildParams(split=split), load_review(review), categories)
    except ReviewError as err:
        raise click.UsageError(str(err)) from err
    except (BuildError, CocoError) as err:
        raise click.ClickException(str(err)) from err
    except OSError as err:
        raise click.ClickException(f"--out {out}: cannot write the page there: {err}") from err
    click.echo(f"wrote {out}: {n} unreviewed pool candidates of {split}" + ("" if n else " (nothing to review)"))


@bench_review.command("apply")
@click.argument("decisions", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--review",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Review file to merge into (default: the packaged msibench/data/reference_review.json).",
)
def bench_review_apply(decisions: Path, review: Path | None) -> None:
    """Merge a decisions file exported by the review page into the review file. Every entry is checked first (a bad
    one is named and nothing is written); decisions already in the review are kept; a decision that contradicts one
    is reported and not applied (exit 1)."""
    from msibench.bench.review import ReviewError, apply_decisions

    try:
        result = apply_decisions(decisions, review)
    except ReviewError as err:
        raise click.UsageError(str(err)) from err
    except OSError as err:
        raise click.ClickException(f"cannot write the review: {err}") from err
    click.echo(
        f"{len(result.accepted)} accepted, {len(result.rejected)} rejected, {len(result.unchanged)} already in the "
        f"review, {len(result.conflicts)} conflicting"
    )
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if result.conflicts:
        lines = "\n  ".join(result.conflicts)
        raise click.ClickException(
            f"{len(result.conflicts)} decisions contradict the review and were not applied (the review keeps its "
            f"own; edit it by hand to change one):\n  {lines}"
        )


@bench_group.command("info")
@click.option("--manifest", default=None, help=_MANIFEST_HELP)
def bench_info(manifest: str | None) -> None:
    """Summarize a manifest: tasks per track and K, categories, scenes, references and their pools."""
    from msibench.bench.manifest import ManifestError, load_manifest, manifest_info

    try:
        m = load_manifest(manifest)
    except ManifestError as err:
        raise click.ClickException(str(err)) from err
    click.echo(manifest_info(m))


@bench_group.command("contact-sheet")
@click.option("--manifest", default=None, help=_MANIFEST_HELP)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="PNG to write.")
@click.option(
    "--coco-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="COCO 2017 root to cut the references from (or MSIBENCH_COCO_ROOT); without it images are downloaded.",
)
@click.option("--columns", type=int, default=10, show_default=True)
def bench_contact_sheet(manifest: str | None, out: Path, coco_root: Path | None, columns: int) -> None:
    """Draw every distinct reference of a manifest, grouped by category, into one PNG."""
    from msibench.bench.contact_sheet import render_contact_sheet
    from msibench.bench.manifest import ManifestError, load_manifest
    from msibench.bench.prepare import PrepareError

    if columns < 2:
        raise click.BadParameter("needs at least 2 (the category name takes the first)", param_hint="--columns")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # before drawing: --out under a file fails here, named
    except OSError as err:
        raise click.ClickException(f"--out {out}: cannot write the contact sheet there: {err}") from err
    try:
        sheet = render_contact_sheet(load_manifest(manifest), coco_root, columns=columns)
    except (ManifestError, PrepareError) as err:
        raise click.ClickException(str(err)) from err
    import io

    from msibench.cache import atomic_write_bytes

    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    try:
        atomic_write_bytes(out, buf.getvalue())
    except OSError as err:
        raise click.ClickException(f"--out {out}: cannot write the contact sheet there: {err}") from err
    click.echo(f"wrote {out} ({sheet.width}x{sheet.height})")


@bench_group.command("pool-figure")
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="PNG to write (CSV beside)."
)
@click.option("--manifest", "manifests", multiple=True, default=("v2", "v3"), show_default=True, help=_MANIFEST_HELP)
def bench_pool_figure(out: Path, manifests: tuple[str, ...]) -> None:
    """Pool sizes per category (beside the paper's ten for each of the 80) and subjects served per reference."""
    from msibench.bench.manifest import ManifestError, load_manifest
    from msibench.bench.pool_figure import render_pool_figure

    try:
        loaded = {}
        for spec in manifests:
            m = load_manifest(spec)
            loaded[m.name] = m
    except ManifestError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote {render_pool_figure(loaded, out)}")


@main.group("data")
def data_group() -> None:
    """Benchmark data (reference cut-outs and masks) in the cache."""


@data_group.command("prepare")
@click.option(
    "--coco-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="COCO 2017 root holding val2017/ (or MSIBENCH_COCO_ROOT); without it images are downloaded.",
)
@click.option("--manifest", default=None, help=_MANIFEST_HELP)
def data_prepare(coco_root: Path | None, manifest: str | None) -> None:
    """Materialize every reference into $MSIBENCH_CACHE, checking each source file's sha256."""
    from msibench.bench.manifest import ManifestError, load_manifest
    from msibench.bench.prepare import PrepareError, damaged_references, prepare, references_dir

    try:
        m = load_manifest(manifest)
        damaged = sum(1 for *_, problem in damaged_references(m) if problem != "missing")
        written = prepare(m, coco_root)
    except (ManifestError, PrepareError, OSError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(
        f"{written} references written ({damaged} of them found damaged and rebuilt from COCO); all references "
        f"checked against their recorded sha256, all {len(m.sources)} source files verified -> {references_dir()}"
    )


@main.command("run", context_settings={"show_default": True})
@click.option("--method", "method_name", required=True, metavar="SPEC", help=METHOD_HELP)
@click.option("--track", type=click.Choice(["multi", "single", "all"]), default="all")
@click.option("--seeds", type=click.IntRange(min=1), default=1, help="Samples per task.")
@click.option(
    "--seed", "base_seed", type=click.IntRange(min=0), default=0, help="Base seed; per-sample seeds derive from it."
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="At most N tasks per track, stratified over K (the first tasks of each K, taking turns).",
)
@click.option("--shard", default=None, help="I/N: this process's share (default: torchrun RANK/WORLD_SIZE).")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("results/runs"),
    help="Parent folder; the run folder is METHOD-FINGERPRINTHASH inside it.",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Exact run folder (overrides --out).",
)
@click.option("-M", "method_options", multiple=True, metavar="KEY=VALUE", help="Method option (repeatable).")
@click.option("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available).")
@click.option(
    "--coco-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="COCO 2017 root for preparing references offline (or MSIBENCH_COCO_ROOT).",
)
@click.option("--manifest", default=None, help=_MANIFEST_HELP)
@click.option("--overwrite", is_flag=True, help="Discard results of another configuration in the run folder.")
@click.option("--retry-failed", is_flag=True, help="Generate again the samples recorded as failed.")
@click.option(
    "--repair",
    is_flag=True,
    help="Rewrite a damaged run.json for this configuration, keeping the images and records (checked: every record "
    "must be of this method fingerprint, manifest and --seed).",
)
@click.option("--no-progress", is_flag=True)
def run_command(
    method_name,
    track,
    seeds,
    base_seed,
    limit,
    shard,
    out,
    run_dir,
    method_options,
    device,
    coco_root,
    manifest,
    overwrite,
    retry_failed,
    repair,
    no_progress,
) -> None:
    """Generate images for the benchmark tasks; resumable.

    Exit codes: 0 all done, 1 error, 2 usage, 3 failed samples recorded, 4 shard busy (see msibench.exitcodes)."""
    from msibench import exitcodes, registry
    from msibench.bench.manifest import ManifestError
    from msibench.bench.prepare import PrepareError
    from msibench.cache import CacheDirError, cache_dir
    from msibench.records import LockBusyError
    from msibench.runner import (
        MethodSetupError,
        OptionError,
        RunConflictError,
        parse_shard,
        resolve_device,
        run_method,
        torchrun_env,
    )

    try:
        under_torchrun = torchrun_env() is not None and not shard
        shard_spec = parse_shard(shard)
        resolved_device = resolve_device(device)
        cache_dir()  # $MSIBENCH_CACHE (references, weights) is usable, checked before anything is written
    except (OptionError, CacheDirError) as err:
        raise click.UsageError(str(err)) from err
    from msibench.api import load_method

    try:
        method = load_method(method_name, _parse_options(method_options))
    except (ValueError, TypeError) as err:  # an invalid option value (-M resolution=abc, -M nokey=1): exit 2
        raise click.BadParameter(str(err), param_hint="-M") from err
    except (registry.UnknownMethodError, registry.MethodUnavailableError) as err:
        raise method_error(err) from err
    try:
        summary = run_method(
            method,
            run_dir=run_dir,
            out=out,
            manifest=manifest,
            track=track,
            limit=limit,
            seeds=seeds,
            base_seed=base_seed,
            shard=shard_spec,
            device=resolved_device,
            coco_root=coco_root,
            overwrite=overwrite,
            retry_failed=retry_failed,
            progress=not no_progress,
            argv=sys.argv,
            wait_for_peers=under_torchrun,
            repair=repair,
        )
    except LockBusyError as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(exitcodes.BUSY)
    except OptionError as err:
        raise click.UsageError(str(err)) from err
    except (RunConflictError, ManifestError, PrepareError, MethodSetupError) as err:
        logging.getLogger(__name__).debug("run failed", exc_info=True)
        raise click.ClickException(str(err)) from err
    except OSError as err:  # a full disk and the like: what was committed before stays, the same command resumes
        where = run_dir or out
        raise click.ClickException(
            f"{type(err).__name__}: {err} (writing into {where}); the samples recorded so far are kept: fix the cause "
            "and run the same command again"
        ) from err
    click.echo(
        f"{summary.run_dir}: {summary.ok} generated, {summary.failed} failed, {summary.skipped} skipped, "
        f"{summary.done_before} already done (of {summary.total} in shard {shard_spec[0]}/{shard_spec[1]})"
    )
    if summary.repaired:
        click.echo(f"  {summary.repaired} recorded images were missing or changed: generated again", err=True)
    if summary.by_other_writer:
        click.echo(f"  {summary.by_other_writer} samples were recorded meanwhile by another process", err=True)
    for failure in summary.failures[:20]:
        click.echo(f"  failed {failure}", err=True)
    if summary.failed_recorded:
        click.echo(
            f"  {summary.failed_recorded} samples of this selection are recorded as failed "
            "(--retry-failed generates them again); exit code 3",
            err=True,
        )
    sys.exit(summary.exit_code)


@main.command("grid")
@click.argument("grid_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for the scripts.")
@click.option(
    "--engine",
    "engines",
    multiple=True,
    type=click.Choice(["slurm", "torchrun", "plain"]),
    help="Which scripts to write (repeatable; default: all three).",
)
@click.option("--method", "methods", multiple=True, help="Method (repeatable; replaces the grid file's methods).")
@click.option("-M", "method_options", multiple=True, metavar="KEY=VALUE", help="Option of every --method given.")
@click.option("--shards", type=click.IntRange(min=1), default=None, help="Shards per method (default 1).")
@click.option("--gpus", type=click.IntRange(min=1), default=None, help="GPUs: plain scripts / torchrun ranks.")
@click.option("--seeds", type=click.IntRange(min=1), default=None, help="Samples per task (default 1).")
@click.option("--seed", "base_seed", type=click.IntRange(min=0), default=None, help="Base seed (default 0).")
@click.option("--track", type=click.Choice(["multi", "single", "all"]), default=None)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N tasks per track.")
@click.option("--device", default=None, help="Device of every job (default cuda).")
@click.option("--manifest", default=None, help=_MANIFEST_HELP)
@click.option("--coco-root", default=None, help="COCO 2017 root the jobs read references from.")
@click.option("--runs", "runs_out", default=None, help="Parent of the run folders (default results/runs).")
@click.option("--msibench", "msibench_cmd", default=None, help="Command that runs msibench on the nodes.")
@click.option("--no-score", is_flag=True, help="Generate only; do not append the scoring step.")
def grid_command(
    grid_file, out, engines, methods, method_options, shards, gpus, seeds, base_seed, track, limit, device,
    manifest, coco_root, runs_out, msibench_cmd, no_score,
) -> None:  # fmt: skip
    """Write methods x shards as ready-to-submit jobs: a SLURM array (sbatch), torchrun commands for one node, and
    plain per-GPU shell scripts; plus grid.json. Nothing is scheduled here; resubmitting is safe (finished shards
    are skipped by msibench run). GRID_FILE is a YAML grid (see msibench/grid.py); options override its fields."""
    from msibench.grid import GridError, load_grid_file, spec_from_mapping, write_grid

    overrides = {
        key: value
        for key, value in {
            "shards": shards,
            "gpus": gpus,
            "seeds": seeds,
            "seed": base_seed,
            "track": track,
            "limit": limit,
            "device": device,
            "manifest": manifest,
            "coco_root": coco_root,
            "out": runs_out,
            "msibench": msibench_cmd,
        }.items()
        if value is not None
    }
    if no_score:
        overrides["score"] = False
    if methods:
        options = _parse_options(method_options)
        overrides["methods"] = [{"name": name, "options": options} for name in methods]
    elif method_options:
        raise click.UsageError("-M applies to the --method options given with it; give --method too")
    try:
        if grid_file is not None:
            spec = load_grid_file(grid_file, overrides)
        elif not methods:
            raise click.UsageError("give a grid file or at least one --method")
        else:
            spec = spec_from_mapping(overrides, source="options")
        written = write_grid(spec, out, engines or ("slurm", "torchrun", "plain"))
    except GridError as err:
        raise click.UsageError(str(err)) from err
    jobs = len(spec.methods) * spec.shards
    click.echo(f"{out}: {len(spec.methods)} method(s) x {spec.shards} shard(s) = {jobs} job(s); grid.json lists them")
    for engine, files in written.items():
        click.echo(f"  {engine}: " + ", ".join(str(f) for f in files))
    if "slurm" in written:
        click.echo(f"  submit: bash {out / 'slurm' / 'submit.sh'}")


def _exit_code(ctx: click.Context, command: click.Command, **params) -> int:
    """Invoke ``command`` with ``params``; its exit code (the commands end with sys.exit)."""
    try:
        ctx.invoke(command, **params)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


def _make_eval_command(score_command: click.Command) -> click.Command:
    """``msibench eval``: ``run``, then ``score`` on its run folder, then Table I. Its options are those of the two
    commands (shared ones such as --device once), so it stays in step with them; resumable as they are."""
    run_names = {p.name for p in run_command.params}
    score_params = [p for p in score_command.params if p.name not in run_names and p.name not in ("run_dirs", "limit")]
    paper = click.Option(["--paper"], is_flag=True, help="Show the paper's reported numbers in Table I.")

    @click.pass_context
    def callback(ctx: click.Context, **kw) -> None:
        from msibench.api import load_method
        from msibench.runner import parse_shard, run_dir_for

        try:
            if parse_shard(kw["shard"]) != (0, 1):
                raise click.UsageError(
                    "eval runs in one process: use `msibench run --shard` and then `msibench score`"
                )
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--shard") from err
        run_code = _exit_code(ctx, run_command, **{p.name: kw[p.name] for p in run_command.params})
        from msibench import exitcodes

        if run_code == exitcodes.BUSY:  # another process is generating this run: scoring it now would be premature
            ctx.exit(exitcodes.BUSY)
        run_dir = kw["run_dir"]
        if run_dir is None:
            run_dir = run_dir_for(load_method(kw["method_name"], _parse_options(kw["method_options"])), kw["out"])
        score_kw = {p.name: kw[p.name] for p in score_command.params if p.name in kw and p.name != "limit"}
        score_code = _exit_code(ctx, score_command, **score_kw, run_dirs=(Path(run_dir),), limit=None)
        from msibench.scoring.table import TableError, load_paper_table, load_run, render_table

        try:
            table = render_table(
                [load_run(str(run_dir))],
                "md",
                paper=load_paper_table() if kw["paper"] else None,
                ci=True,
                allow_partial=kw["limit"] is not None,  # a subset asked for: shown, marked with its coverage
            )
        except TableError as err:
            raise click.ClickException(str(err)) from err
        click.echo("\nTable I\n" + table, nl=False)
        ctx.exit(run_code or score_code)

    return click.Command(
        "eval",
        callback=callback,
        params=[*run_command.params, *score_params, paper],
        help="Generate (run), score and print Table I for one method, in one command; resumable like its parts "
        "(re-running it skips the images and scores already done). Exit code: run's, else score's (3: failed "
        "samples recorded, 4: busy; see msibench.exitcodes). With --limit, Table I shows the subset marked partial.",
        short_help="Run, score and print Table I for one method.",
        context_settings={"show_default": True},
    )


def _register_optional_commands() -> None:
    # Scoring, table and plot commands live with the scorers; their module imports only click at top level.
    try:
        from msibench.scoring import commands
    except ImportError:
        return
    for command in commands.COMMANDS:
        main.add_command(command)
    main.add_command(_make_eval_command(commands.score_command))
    from msibench.report.command import report_command

    main.add_command(report_command)
    from msibench.present.command import leaderboard_command

    main.add_command(leaderboard_command)
    from msibench import weights_commands

    for command in weights_commands.COMMANDS:
        main.add_command(command)


_register_optional_commands()

if __name__ == "__main__":
    main()
