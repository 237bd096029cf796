"""``msibench`` command line. Importing this module must stay cheap: no torch, heavy imports inside commands."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from msibench import __version__


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
@click.option("--manifest", default=None, help="tracks, tasks: a manifest file, or a packaged name: v2 (default), v1.")
def ls_command(what: str, track: str | None, k: int | None, manifest: str | None) -> None:
    """List registered methods (with their capabilities), the benchmark's tracks, or its tasks (id, K,
    categories, prompt; filter with --track and --k)."""
    from msibench import registry

    if what in ("tracks", "tasks"):
        _ls_benchmark(what, track, k, manifest)
        return
    if track is not None or k is not None:
        raise click.UsageError("--track and --k filter `msibench ls tasks`")
    click.echo(f"{'method':<16}{'max subjects':>13}  {'layout':<7}{'z-order':<8}{'tracks':<14}module")
    for name, target in registry.METHODS.items():
        try:
            caps = registry.build(name).capabilities
        except registry.MethodUnavailableError as err:
            click.echo(f"{name:<16}{'-':>13}  {'-':<7}{'-':<8}{'-':<14}{target}  (unavailable: {err})")
            continue
        click.echo(
            f"{name:<16}{caps.max_subjects:>13}  {'yes' if caps.uses_layout else 'no':<7}"
            f"{'yes' if caps.uses_zorder else 'no':<8}{','.join(caps.tracks):<14}{target}"
        )


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
        click.echo(f"(manifest {bench.name}; --manifest v1 selects the older one)")
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


_MANIFEST_HELP = "Manifest file, or a packaged name: v2 (default) or v1."


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
@click.option("--method", "method_name", required=True, help="Registered method name (msibench ls).")
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
    try:
        method = registry.build(method_name, _parse_options(method_options))
    except registry.UnknownMethodError as err:  # an invalid option value: a usage error (exit 2)
        raise click.BadParameter(str(err), param_hint="--method") from err
    except (ValueError, TypeError) as err:  # -M resolution=abc, -M nokey=1
        raise click.BadParameter(str(err), param_hint="-M") from err
    except registry.MethodUnavailableError as err:  # installed without the method's module: not a usage error
        raise click.ClickException(str(err)) from err
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
        from msibench import registry
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
            run_dir = run_dir_for(registry.build(kw["method_name"], _parse_options(kw["method_options"])), kw["out"])
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
    from msibench import weights_commands

    for command in weights_commands.COMMANDS:
        main.add_command(command)


_register_optional_commands()

if __name__ == "__main__":
    main()
