"""``msibench report``. Only click is imported here; the report builder loads inside the command."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report", context_settings={"show_default": True})
@click.argument("runs", nargs=-1, required=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Report folder: index.html and assets/ go there (open index.html in a browser, no server needed).",
)
@click.option("--thumb-size", type=click.IntRange(min=16), default=256, help="Long edge of the thumbnails (px).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Thumbnail processes (default: CPUs).")
@click.option("--paper", is_flag=True, help="Show the paper's reported numbers in Table I.")
@click.option("--title", default=None, help="Page title (default: the run labels).")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option(
    "--coco-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="COCO 2017 root to prepare reference cut-outs missing from the cache (or MSIBENCH_COCO_ROOT).",
)
@click.option("--no-progress", is_flag=True)
def report_command(runs, out, thumb_size, workers, paper, title, manifest, coco_root, no_progress) -> None:
    """A static HTML report of RUNS (each DIR or LABEL=DIR, side by side): Table I, the per-K figure, metadata,
    and every task with its references, layout, images, detections, scores and reasons. Unscored runs show their
    images and layout only."""
    import sys

    from msibench import exitcodes
    from msibench.records import LockBusyError
    from msibench.report.build import ReportError, build_report

    try:
        summary = build_report(
            list(runs),
            out,
            thumb_size=thumb_size,
            workers=workers,
            manifest=manifest,
            coco_root=coco_root,
            paper=paper,
            title=title,
            progress=not no_progress,
        )
    except LockBusyError as err:  # another report is being written into --out
        click.echo(f"Error: {err}", err=True)
        sys.exit(exitcodes.BUSY)
    except ReportError as err:
        raise click.ClickException(str(err)) from err
    except OSError as err:  # --out under a file, a full disk, a folder without permission: the error names the path
        raise click.ClickException(f"cannot build the report in --out {out}: {type(err).__name__}: {err}") from err
    click.echo(
        f"wrote {summary.out / 'index.html'}: {summary.runs} run(s), {summary.tasks} tasks, {summary.images} images "
        f"({summary.thumbnails_made} thumbnails made, {summary.thumbnails_cached} reused) in {summary.seconds:.1f} s"
    )
    if summary.unreadable:
        click.echo(f"  {summary.unreadable} images could not be read: their cards say so", err=True)
