"""``msibench weights fetch | ls``: one command for every weight file Table I needs (see :mod:`msibench.weights`).
Only click is imported here."""

from __future__ import annotations

import click

_SELECT = [
    click.option("--scorers", is_flag=True, help="The scoring backbones (YOLO11x-seg, DINO ViT-S/16, CLIP ViT-B/32)."),
    click.option(
        "--method",
        "methods",
        multiple=True,
        metavar="SPEC",
        help="A method (a built-in name, an installed plugin's name, path/to/file.py:Class or package.module:Class), "
        "or all (every built-in); repeatable.",
    ),
    click.option(
        "--grounding", is_flag=True, help="The optional open-vocabulary detector (OWLv2, SAM masks): not in Table I."
    ),
]


def _select(fn):
    for option in reversed(_SELECT):
        fn = option(fn)
    return fn


def _entries(scorers: bool, methods: tuple[str, ...], grounding: bool = False):
    from msibench import registry
    from msibench.inventory import selection

    try:
        return selection(scorers, list(methods), grounding)
    except (registry.UnknownMethodError, registry.MethodUnavailableError, TypeError) as err:
        from msibench.clierrors import method_error

        raise method_error(err) from err


@click.group("weights")
def weights_group() -> None:
    """Download (fetch) or check (ls) the weights of the scorers and methods; nothing else downloads them.

    Without --scorers or --method: everything Table I needs."""


@weights_group.command("fetch")
@_select
def fetch_command(scorers: bool, methods: tuple[str, ...], grounding: bool) -> None:
    """Download every declared file that is missing or different, by hub id + revision; record its sha256."""
    from msibench.weights import WeightsError, fetch

    try:
        done = fetch(_entries(scorers, methods, grounding), progress=lambda msg: click.echo(msg, err=True))
    except WeightsError as err:
        raise click.ClickException(str(err)) from err
    _print(done)


@weights_group.command("ls")
@_select
@click.option(
    "--verify", is_flag=True, help="Re-hash every present file (default: size and mtime against the record)."
)
def ls_command(scorers: bool, methods: tuple[str, ...], grounding: bool, verify: bool) -> None:
    """Each declared file: present, missing, different (from its fetched sha256), unverified or manual.
    Exit code 1 when a file is missing or different."""
    from msibench.weights import status

    rows = [_with_override(r) for r in status(_entries(scorers, methods, grounding), verify=verify)]
    _print(rows)
    if any(r.status in ("missing", "different") for r in rows):
        raise SystemExit(1)


def _with_override(row):
    """A scorer file that ``msibench score`` does not use because ``MSIBENCH_YOLO/DINO/CLIP_WEIGHTS`` names other
    weights: shown as ``override`` (what score loads instead), ``missing`` when that variable names no file."""
    import dataclasses
    import os
    from pathlib import Path

    from msibench.scoring.backbones import CLIP_ENV, CLIP_HUB_ID, DEFAULT_DINO, DINO_ENV, RANDOM, YOLO_ENV

    if row.owner != "scorers":
        return row
    env = {"ultralytics/assets": YOLO_ENV, DEFAULT_DINO: DINO_ENV, CLIP_HUB_ID: CLIP_ENV}.get(row.spec.repo_id)
    value = os.environ.get(env or "", "")
    if not value:
        return row
    if env == YOLO_ENV and Path(value).is_dir():
        found = Path(value) / Path(row.file).name
        if not found.is_file():  # score looks in the folder first, then where the pinned file lies
            return row
        value = str(found)
    if value == RANDOM:
        detail = f"${env}={value}: score uses random weights, not the pinned file (local, not comparable)"
        return dataclasses.replace(row, status="override", path=None, detail=detail)
    looks_like_path = os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_path and not Path(value).exists():
        return dataclasses.replace(row, status="missing", path=value, detail=f"${env}={value}: no such file")
    detail = f"${env}: score uses {value}, not the pinned file (local weights)"
    return dataclasses.replace(row, status="override", path=value, detail=detail)


def _print(rows) -> None:
    last = None
    for r in rows:
        head = (r.owner, r.spec)
        if head != last:
            pin = "" if r.spec.pinned else "  [revision not pinned]"
            click.echo(f"{r.owner}: {r.spec.label}{pin}")
            if r.spec.note:
                click.echo(f"  ({r.spec.note})")
            last = head
        where = f"  {r.path}" if r.path else ""
        detail = f"  ({r.detail})" if r.detail and r.detail != r.spec.note else ""
        click.echo(f"  {r.status:<10} {r.file}{where}{detail}")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    click.echo(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "nothing declared")


COMMANDS = [weights_group]
