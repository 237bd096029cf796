"""``msibench score | table | plot | compare``. Only click is imported here; everything heavy loads inside the
commands, so ``msibench --help`` never imports torch."""

from __future__ import annotations

import sys
from pathlib import Path

import click

_METRIC_CHOICES = ("yolo_subj", "yolo_l", "z_acc", "dino_i", "clip_i", "clip_b", "collapse")


def _fail(err: Exception) -> click.ClickException:
    return click.ClickException(str(err))


@click.command("score", context_settings={"show_default": True})
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--detector",
    default=None,
    help="YOLO11 weights: a file name looked up offline (in $MSIBENCH_YOLO_WEIGHTS when it is a folder, "
    "$MSIBENCH_CACHE/weights, ultralytics' weights_dir), a path, or a model yaml for random weights. "
    "Default: $MSIBENCH_YOLO_WEIGHTS when it is a file, else yolo11x-seg.pt. Open-vocabulary instead: "
    "owlv2 (OWLv2 boxes, text queries per category) or owlv2+sam (with SAM masks, for Z-Acc); "
    "owlv2:FOLDER+sam:FOLDER for local transformers folders (`msibench weights fetch --grounding`).",
)
@click.option(
    "--segmenter",
    default=None,
    help="YOLO11-seg weights for Z-Acc masks when --detector has no masks (e.g. yolo11x-seg.pt with yolo11x.pt).",
)
@click.option("--conf", type=click.FloatRange(0.0, 1.0), default=0.25, help="Detector confidence threshold.")
@click.option("--iou", type=click.FloatRange(0.0, 1.0), default=0.7, help="Detector NMS IoU threshold.")
@click.option(
    "--imgsz",
    type=click.IntRange(32, 4096),
    default=640,
    help="Detector input size (letterboxed square, multiple of 32).",
)
@click.option("--max-det", type=click.IntRange(min=1), default=300, help="Detections kept per image.")
@click.option(
    "--dino-weights",
    default=None,
    help="DINO ViT-S/16: facebook/dino-vits16 (default), a transformers folder, a timm weight file, timm:NAME, "
    "or random; or $MSIBENCH_DINO_WEIGHTS.",
)
@click.option(
    "--clip-weights",
    default=None,
    help="CLIP ViT-B/32: openai (default), a local open_clip checkpoint file, or random; or $MSIBENCH_CLIP_WEIGHTS.",
)
@click.option(
    "--identity-crop",
    type=click.Choice(["category", "matched", "target", "full"]),
    default="category",
    help="Where DINO-I / CLIP-I / collapse crop each subject: category = found by its category wherever it is "
    "(IoU >= 0.1 with the target first, then the most confident detections left); matched = the detection on the "
    "target box (IoU >= 0.1); in both, a subject not found has no crop and scores 0 (see the found rate); "
    "target = the box; full = the whole image.",
)
@click.option(
    "--identity-pairing",
    type=click.Choice(["appearance", "position"]),
    default="appearance",
    help="With --identity-crop category: which found crop of a category is which subject of it. appearance = the "
    "assignment that maximises total DINO similarity to the references (Hungarian), and same-category collapse "
    "is measured; position = IoU with the target box, then nearest box centre (scorer code version 2).",
)
@click.option("--clip-b-mode", type=click.Choice(["full", "masked"]), default="full")
@click.option(
    "--metrics",
    "metrics",
    default=",".join(_METRIC_CHOICES),
    help="Comma-separated subset of " + ", ".join(_METRIC_CHOICES) + ".",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=8,
    help="Images per detector batch (crops are batched per image batch).",
)
@click.option("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available).")
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's choice)."
)
@click.option(
    "--rescore", is_flag=True, help="Archive scores of another scorer version or generation run and score again."
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score at most N pending images per run.")
@click.option(
    "--shard",
    default=None,
    help="I/N: score this share of each run's images, beside the other shards (default: torchrun RANK/WORLD_SIZE).",
)
@click.option(
    "--workers", type=click.IntRange(min=0), default=0, help="Threads decoding images (0: in the scoring thread)."
)
@click.option("--manifest", default=None, help="Manifest file or packaged name (v2, v1); default: run.json's.")
@click.option("--coco-root", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--no-progress", is_flag=True)
def score_command(
    run_dirs,
    detector,
    segmenter,
    conf,
    iou,
    imgsz,
    max_det,
    dino_weights,
    clip_weights,
    identity_crop,
    identity_pairing,
    clip_b_mode,
    metrics,
    batch_size,
    device,
    threads,
    rescore,
    limit,
    shard,
    workers,
    manifest,
    coco_root,
    no_progress,
) -> None:
    """Score generated images of RUN_DIRS into scores.jsonl (resumable; re-scores only what changed). With
    --shard I/N (or under torchrun), N processes score disjoint shares of each run side by side.

    Exit codes: 0 all scored, 1 error, 2 usage, 3 failed samples recorded, 4 another pass is scoring the run."""
    from msibench import exitcodes
    from msibench.cache import CacheDirError, cache_dir
    from msibench.runner import OptionError, parse_shard, resolve_device, torchrun_env

    try:
        torchrun_env()  # ultralytics parses WORLD_SIZE/RANK at import: check them first, naming the variable
        shard_spec = parse_shard(shard)
        device = resolve_device(device)
        cache_dir()  # $MSIBENCH_CACHE (weights, references, features) is usable
    except (OptionError, CacheDirError) as err:
        raise click.UsageError(str(err)) from err
    if imgsz % 32:
        raise click.BadParameter(f"{imgsz} is not a multiple of 32 (the detector's stride)", param_hint="--imgsz")

    from msibench.api import make_scorer
    from msibench.bench.manifest import ManifestError
    from msibench.bench.prepare import PrepareError
    from msibench.records import LockBusyError
    from msibench.scoring.backbones import BackboneError
    from msibench.scoring.score import score_run
    from msibench.scoring.scorer import ScoreError, ScorerConfig

    if threads:
        import torch

        torch.set_num_threads(threads)
    wanted = [m.strip() for m in metrics.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in _METRIC_CHOICES]
    if unknown or not wanted:
        raise click.BadParameter(
            f"{', '.join(map(repr, unknown)) or 'nothing'}: choose a comma-separated subset of "
            + ", ".join(_METRIC_CHOICES),
            param_hint="--metrics",
        )
    try:
        config = ScorerConfig(
            detector=detector,
            segmenter=segmenter,
            conf=conf,
            iou=iou,
            imgsz=imgsz,
            max_det=max_det,
            dino=dino_weights,
            clip=clip_weights,
            identity_crop=identity_crop,
            identity_pairing=identity_pairing,
            clip_b_mode=clip_b_mode,
            metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()),
            batch_size=batch_size,
        )
        scorer = make_scorer(
            config, device=device, announce=None if no_progress else lambda message: click.echo(message, err=True)
        )
    except (ValueError, BackboneError, ScoreError) as err:
        raise _fail(err) from err
    code = exitcodes.OK
    for run_dir in run_dirs:
        try:
            summary = score_run(
                run_dir,
                scorer,
                manifest=manifest,
                coco_root=coco_root,
                rescore=rescore,
                limit=limit,
                progress=not no_progress,
                argv=sys.argv,
                shard=shard_spec,
                workers=workers,
            )
        except LockBusyError as err:
            click.echo(f"Error: {err}", err=True)
            sys.exit(exitcodes.BUSY)
        except (ScoreError, ManifestError, PrepareError, OSError) as err:
            raise _fail(err) from err
        rate = f", {summary.scored / summary.seconds:.2f} img/s" if summary.seconds > 0 and summary.scored else ""
        click.echo(
            f"{run_dir}: scorer {summary.scorer_hash}: {summary.scored} scored, {summary.reused} already current, "
            f"{summary.failed} failed, {summary.not_generated} not generated (of {summary.total}"
            + (f" in shard {shard_spec[0]}/{shard_spec[1]}" if shard_spec[1] > 1 else "")
            + f"){rate}"
        )
        for failure in summary.failures[:20]:
            click.echo(f"  failed {failure}", err=True)
        try:
            click.echo(run_summary(run_dir, manifest))
        except (ScoreError, ValueError, OSError) as err:  # the scores are written; only the summary is missing
            click.echo(f"  (no summary: {err})", err=True)
        if summary.damaged:
            click.echo(
                f"  {summary.damaged} images are missing or changed since they were generated: not scored; run "
                "`msibench run` again with the same options to generate them again, then score",
                err=True,
            )
        if summary.failed_recorded:
            click.echo(f"  {run_dir} holds {summary.failed_recorded} failed samples; exit code 3", err=True)
        code = max(code, summary.exit_code)
    sys.exit(code)


def run_summary(run_dir: Path, manifest=None) -> str:
    """The scored run's summary, per track: tasks, images (scored, failed, skipped, pending) and each Table I metric
    with its 95 % CI. Figures over a track that is not fully generated and scored say ``partial`` and what they cover:
    a --limit pass must not read as the run's result."""
    from msibench.scoring.aggregate import METRICS, find_group
    from msibench.scoring.table import COLUMNS, load_run

    result = load_run(str(run_dir), manifest=manifest)
    coverage = {c.track: c for c in result.coverage or ()}
    lines = []
    for track in ("single", "multi"):
        group = find_group(result.summary, track, None)
        cov = coverage.get(track)
        if group is None and (cov is None or not cov.generated):
            continue
        pending = cov.images - cov.images_scored if cov is not None else 0
        if group is None:
            lines.append(f"  {track}: no image scored yet, {pending} pending (not scored yet)")
            continue
        parts = []
        for t, metric in COLUMNS:
            stat = group.metrics.get(metric) if t == track else None
            if stat is None or stat.mean is None:
                continue
            ci = f" [{stat.ci_low:.3f}, {stat.ci_high:.3f}]" if stat.ci_low is not None else ""
            parts.append(f"{METRICS[metric].label} {stat.mean:.3f}{ci}")
        head = (
            f"  {track}: {group.n_tasks} tasks, {group.n_images} images scored, {group.n_failed} failed, "
            f"{group.n_skipped} skipped, {pending} pending (not scored yet)"
        )
        partial = cov is not None and not cov.complete
        if parts and partial:
            parts[0] = f"PARTIAL ({cov.describe()}): " + parts[0]
        lines.append(head + ("\n    " + "; ".join(parts) if parts else ""))
    return "\n".join(lines) if lines else "  no scores yet"


def _load_runs(specs):
    from msibench.scoring.scorer import ScoreError
    from msibench.scoring.table import load_run

    try:
        return [load_run(spec) for spec in specs]
    except (ScoreError, ValueError, OSError) as err:
        raise _fail(err) from err


_ALLOW_PARTIAL = click.option(
    "--allow-partial",
    is_flag=True,
    help="Show runs whose tracks are not fully generated and scored, marked with their coverage.",
)


def _warn_unpinned(results) -> None:
    from msibench.scoring.plot import provenance_text

    text, pinned = provenance_text(results)
    if not pinned:
        click.echo(f"warning: NOT the pinned scorers ({text}): the figure's CSV and metadata say so", err=True)


def _complete_runs(specs, allow_partial: bool):
    """The runs of ``specs``, refused when one is incomplete (unless ``allow_partial``) or their manifests differ."""
    from msibench.scoring.table import TableError, check_complete, check_same_manifest

    results = _load_runs(specs)
    try:
        check_complete(results, allow_partial)
        check_same_manifest(results)
    except TableError as err:
        raise _fail(err) from err
    return results


@click.command("table")
@click.argument("runs", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(["md", "tex", "csv"]), default="md", show_default=True)
@click.option("--paper", is_flag=True, help="Show the paper's reported numbers beside ours.")
@click.option("--ci", is_flag=True, help="Add 95% bootstrap intervals to md/tex cells.")
@click.option("--digits", type=click.IntRange(0, 12), default=3, show_default=True)
@click.option(
    "--allow-partial",
    is_flag=True,
    help="Show runs whose tracks are not fully generated and scored, marked with their coverage.",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write to a file.")
def table_command(runs, fmt, paper, ci, digits, allow_partial, out) -> None:
    """Table I (rows: methods) from scored RUNS, each DIR or LABEL=DIR.

    A run whose generated tracks do not cover every task of its manifest, or whose images are not all scored, is
    refused unless --allow-partial (then its row says what it covers)."""
    from msibench.cache import atomic_write_bytes
    from msibench.scoring.table import TableError, load_paper_table, render_table

    results = _load_runs(runs)
    try:
        text = render_table(
            results,
            fmt,
            paper=load_paper_table() if paper else None,
            digits=digits,
            ci=ci,
            allow_partial=allow_partial,
        )
    except TableError as err:
        raise _fail(err) from err
    if out is None:
        click.echo(text, nl=False)
        return
    try:
        atomic_write_bytes(out, text.encode("utf-8"))
    except OSError as err:
        raise click.ClickException(f"--out {out}: cannot write the table there: {err}") from err
    click.echo(f"wrote {out}")


@click.group("plot")
def plot_group() -> None:
    """Paper figures (PNG + PDF + CSV of the plotted values) from run folders."""


_WIDTH_HELP = "column (3.5 in), page (7.16 in) or a width in inches."


def _parse_width(value: str) -> str | float:
    if value in ("column", "page"):
        return value
    try:
        inches = float(value)
    except ValueError as err:
        raise click.BadParameter(
            f"{value!r}: expected column, page or a number of inches", param_hint="--width"
        ) from err
    if not 0 < inches < float("inf"):  # nan fails this too
        raise click.BadParameter(f"{value!r}: a width must be a positive number of inches", param_hint="--width")
    return inches


def _width_option(ctx: click.Context, param: click.Parameter, value: str) -> str | float:
    """--width, checked while the options are parsed (before any run is loaded or figure drawn)."""
    return _parse_width(value)


@plot_group.command("ablation")
@click.option("--run", "runs", multiple=True, required=True, help="LABEL=DIR, in the order of the x axis.")
@click.option("--track", type=click.Choice(["multi", "single"]), default="multi", show_default=True)
@click.option("--metric", "metrics", multiple=True, type=click.Choice(_METRIC_CHOICES), help="Bars (default: all).")
@click.option("--width", default="column", show_default=True, help=_WIDTH_HELP, callback=_width_option)
@_ALLOW_PARTIAL
@click.option("--out", type=click.Path(path_type=Path), default=Path("results/figures/ablation"), show_default=True)
def plot_ablation_command(runs, track, metrics, width, allow_partial, out) -> None:
    """Fig. 5: grouped bars per configuration, 95% CIs; CLIP-B on its own axis; YOLO-L n/a without layout.

    Writes OUT.png, OUT.pdf (TrueType fonts) and OUT.csv (the plotted values)."""
    from msibench.scoring.plot import plot_ablation

    try:
        results = _complete_runs(runs, allow_partial)
        _warn_unpinned(results)
        paths = plot_ablation(results, out, track=track, metrics=list(metrics) or None, width=width)
    except ValueError as err:
        raise _fail(err) from err
    except OSError as err:  # e.g. --out under a path that is a file
        raise click.ClickException(f"--out {out}: cannot write the figure there: {err}") from err
    click.echo("wrote " + ", ".join(map(str, paths)))


@plot_group.command("by-k")
@click.option("--run", "runs", multiple=True, required=True, help="LABEL=DIR (repeatable).")
@click.option("--metric", "metrics", multiple=True, type=click.Choice(_METRIC_CHOICES), help="Panels (default: all).")
@click.option("--width", default="column", show_default=True, help=_WIDTH_HELP, callback=_width_option)
@_ALLOW_PARTIAL
@click.option("--out", type=click.Path(path_type=Path), default=Path("results/figures/by_k"), show_default=True)
def plot_by_k_command(runs, metrics, width, allow_partial, out) -> None:
    """Each metric against subject count K (K = 1: single track, not joined), one series per run.

    Writes OUT.png, OUT.pdf (TrueType fonts) and OUT.csv (the plotted values)."""
    from msibench.scoring.plot import plot_by_k

    try:
        results = _complete_runs(runs, allow_partial)
        _warn_unpinned(results)
        paths = plot_by_k(results, out, metrics=list(metrics) or None, width=width)
    except ValueError as err:
        raise _fail(err) from err
    except OSError as err:  # e.g. --out under a path that is a file
        raise click.ClickException(f"--out {out}: cannot write the figure there: {err}") from err
    click.echo("wrote " + ", ".join(map(str, paths)))


@plot_group.command("qualitative")
@click.option("--run", "runs", multiple=True, required=True, help="LABEL=DIR, one column each (repeatable).")
@click.option("--tasks", default=None, help="Comma-separated task ids, one row each (msibench ls tasks).")
@click.option("--pick", type=click.IntRange(min=1), default=None, help="Pick N tasks spread over track and K.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --pick.")
@click.option("--sample", type=click.IntRange(min=0), default=0, show_default=True, help="Sample index shown.")
@click.option("--width", default="page", show_default=True, help=_WIDTH_HELP, callback=_width_option)
@click.option("--no-row-labels", is_flag=True, help="No task ids left of the rows.")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--coco-root", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--out", type=click.Path(path_type=Path), default=Path("results/figures/qualitative"), show_default=True)
def plot_qualitative_command(runs, tasks, pick, seed, sample, width, no_row_labels, manifest, coco_root, out) -> None:
    """Figs. 3/4/6: references and layout on the left, one column per run (scored or not).

    Writes OUT.png, OUT.pdf and OUT.csv (task ids, seeds and image paths of every cell)."""
    from msibench.scoring.plot import plot_qualitative
    from msibench.scoring.scorer import ScoreError
    from msibench.scoring.table import parse_run_spec

    specs = []
    for spec in runs:
        label, path = parse_run_spec(spec)
        specs.append((label or path.name, path))
    task_ids = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    try:
        paths = plot_qualitative(
            specs,
            out,
            tasks=task_ids,
            pick=pick,
            seed=seed,
            sample=sample,
            width=width,
            manifest=manifest,
            coco_root=coco_root,
            row_labels=not no_row_labels,
        )
    except (ValueError, ScoreError) as err:
        raise _fail(err) from err
    except OSError as err:  # e.g. --out under a path that is a file
        raise click.ClickException(f"--out {out}: cannot write the figure there: {err}") from err
    click.echo("wrote " + ", ".join(map(str, paths)))


@click.command("compare")
@click.argument("run_a")
@click.argument("run_b")
@click.option("--allow-mixed-scorers", is_flag=True, help="Compare runs scored by different scorer versions.")
@_ALLOW_PARTIAL
def compare_command(run_a, run_b, allow_mixed_scorers, allow_partial) -> None:
    """Paired differences B - A per metric, with paired 95% bootstrap CIs over shared tasks.

    Runs of different manifests are refused (their tasks differ even where ids agree); so are partial runs, unless
    --allow-partial (then the coverage of each is printed above the numbers)."""
    from msibench.scoring.aggregate import METRICS, compare
    from msibench.scoring.scorer import ScoreError
    from msibench.scoring.store import load_scores
    from msibench.scoring.table import parse_run_spec, scorer_identity

    result_a, result_b = _complete_runs((run_a, run_b), allow_partial)
    try:
        (ha, ra), (hb, rb) = (load_scores(parse_run_spec(spec)[1]) for spec in (run_a, run_b))
    except ScoreError as err:
        raise _fail(err) from err
    if ha.get("scorer_hash") != hb.get("scorer_hash") and not allow_mixed_scorers:
        raise click.ClickException(
            f"the runs were scored by different scorer versions ({ha.get('scorer_hash')} vs "
            f"{hb.get('scorer_hash')}); re-score one of them or pass --allow-mixed-scorers"
        )
    diffs = compare(ra, rb)
    if not diffs:
        raise click.ClickException("the runs share no scored task")
    for name, spec, result in (("A", run_a, result_a), ("B", run_b, result_b)):
        words, _ = scorer_identity(result.scorer)
        click.echo(f"{name} = {spec} (scorer {result.scorer_hash}: {words})")
        if result.incomplete:
            click.echo(f"    PARTIAL: {result.coverage_note()}")
    click.echo(f"{'track':<7}{'metric':<17}{'n':>5}{'A':>9}{'B':>9}{'B-A':>9}  95% CI")
    for d in diffs:
        ci = f"[{d.ci_low:+.4f}, {d.ci_high:+.4f}]" if d.ci_low is not None else "-"
        sig = " *" if d.ci_low is not None and (d.ci_low > 0 or d.ci_high < 0) else ""
        values = f"{d.mean_a:>9.4f}{d.mean_b:>9.4f}{d.diff:>+9.4f}"
        click.echo(f"{d.track:<7}{METRICS[d.metric].label:<17}{d.n:>5}{values}  {ci}{sig}")
    click.echo("* the interval excludes 0; n = tasks scored in both runs")


COMMANDS = [score_command, table_command, plot_group, compare_command]
