"""``msibench leaderboard``. Only click is imported here; the page builder loads inside the command."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("leaderboard")
@click.argument("runs", nargs=-1, required=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for index.html (and reports/ with each run's report).",
)
@click.option("--no-reports", is_flag=True, help="Do not build each run's report (the page then has no links).")
@click.option("--coco-root", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--title", default=None)
def leaderboard_command(runs, out, no_reports, coco_root, title) -> None:
    """A static page ranking every scored run found in or under RUNS (run folders or folders holding them), one
    board per benchmark manifest and scorer, sortable by any metric, with pairwise significance (paired bootstrap,
    Bonferroni-corrected) and links to each run's report."""
    from msibench.present.leaderboard import LeaderboardError, build_leaderboard

    try:
        summary = build_leaderboard(list(runs), out, reports=not no_reports, coco_root=coco_root, title=title)
    except LeaderboardError as err:
        raise click.ClickException(str(err)) from err
    except OSError as err:
        where = f"cannot write the leaderboard in --out {out}"
        raise click.ClickException(f"{where}: {type(err).__name__}: {err}") from err
    click.echo(f"wrote {summary.out / 'index.html'}: {summary.runs} run(s) on {summary.boards} board(s)")
    for line in summary.skipped:
        click.echo(f"  not ranked: {line}", err=True)
