"""``mscustomnet`` command line: MSI data tools (and, from their own modules, training and conversion)."""

from __future__ import annotations

import logging
from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="msibench", prog_name="mscustomnet")
def main() -> None:
    """MS-CustomNet: the MSI dataset, training and checkpoint tools."""


@main.group()
def data() -> None:
    """Build and inspect the Multi-Subject Interaction (MSI) dataset."""


@data.command("build-msi")
@click.option(
    "--coco-root",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="COCO 2017 root holding annotations/ and the split's image folder.",
)
@click.option("--split", default="train2017", show_default=True, help="COCO split, e.g. train2017 or val2017.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option(
    "--alpha", default=5, show_default=True, type=click.IntRange(min=1),
    help="Min salient subjects (5: the paper's reported dataset; its text after Eq. 2 says 2).",
)  # fmt: skip
@click.option(
    "--beta", default=0.015, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
    help="Min mask area / image area of a salient subject.",
)  # fmt: skip
@click.option(
    "--pool-size", default=30, show_default=True, type=click.IntRange(min=1), help="References per category."
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Sampling seed.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="Worker processes.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def build_msi_command(
    coco_root: Path,
    split: str,
    out: Path,
    alpha: int,
    beta: float,
    pool_size: int,
    seed: int,
    workers: int,
    quiet: bool,
) -> None:
    """Build (or resume) the MSI dataset from a COCO split: manifest.jsonl, pool/, layouts/, stats.json.

    Exit codes: 0 done, 1 error, 2 usage, 3 done but photos named by the annotations could not be read (listed; the
    dataset differs from one over an intact COCO), 4 another build is writing --out (see msibench.exitcodes)."""
    from mscustomnet.data.build import BuildConfig, build_msi
    from msibench import exitcodes
    from msibench.records import LockBusyError

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = BuildConfig(
        coco_root=coco_root,
        split=split,
        out=out,
        alpha=alpha,
        beta=beta,
        pool_size=pool_size,
        seed=seed,
        workers=workers,
    )
    try:
        summary = build_msi(config, progress=not quiet)
    except LockBusyError as e:
        click.echo(f"Error: {e}", err=True)
        raise SystemExit(exitcodes.BUSY) from e
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(
        f"MSI {split}: {summary.scenes_kept} scenes kept (alpha={alpha}, beta={beta}), "
        f"{summary.scenes_written} written, {summary.scenes_skipped} skipped; filter {summary.filter_seconds:.1f} s"
    )
    click.echo(f"output: {summary.out} (manifest.jsonl, pool/, layouts/, stats.json)")
    if summary.photo_problems:
        shown = "\n".join(f"  {p}" for p in summary.photo_problems[:20])
        more = f"\n  ... and {len(summary.photo_problems) - 20} more" if len(summary.photo_problems) > 20 else ""
        click.echo(
            f"{len(summary.photo_problems)} photos named by the annotations could not be read, so this dataset "
            f"differs from a build over an intact COCO:\n{shown}{more}\nRestore them and run the same command again: "
            "the build checks them again and rebuilds what they affect. Exit code 3.",
            err=True,
        )
        raise SystemExit(exitcodes.FAILURES)


@data.command("info")
@click.argument("msi_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--check", is_flag=True, help="Also check that every file the manifest names exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info_command(msi_dir: Path, check: bool, as_json: bool) -> None:
    """Summarize an MSI dataset folder written by build-msi: build settings, scenes, subjects, prompts, pools."""
    import json

    from mscustomnet.data.info import MSIInfoError, msi_info

    try:
        info = msi_info(msi_dir, check_files=check)
    except MSIInfoError as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        click.echo(json.dumps(info, indent=1, sort_keys=True))
    else:
        click.echo(format_info(info))
    torn = info["files"]["torn_last_line"]
    if check and torn:
        click.echo(
            f"Error: {msi_dir / 'manifest.jsonl'}: the last line is torn ({torn} bytes without a newline, left by a "
            "killed build or a damaged copy); training refuses it. Run `mscustomnet data build-msi` again with the "
            "same options: it cuts the torn line off and builds that scene again",
            err=True,
        )
    if check and (info["files"]["missing"] or torn):
        raise SystemExit(1)


def format_info(info: dict) -> str:
    c = info["config"]
    lines = [
        f"MSI dataset {info['path']}" + ("" if info["complete"] else "  (build not finished: resume with build-msi)"),
        f"  built from {c.get('coco_root')} {c.get('split')}: alpha {c.get('alpha')}, beta {c.get('beta')}, "
        f"pool size {c.get('pool_size')}, seed {c.get('seed')}",
        f"  scenes: {info['scenes']} written" + (
            f" of {info['scenes_kept']} kept, {info['scenes_skipped']} skipped" if info["complete"] else " so far"
        ),
        f"  subjects: {info['subjects']}; subjects per scene: "
        + ", ".join(f"{k}:{v}" for k, v in info["subjects_per_scene"].items()),
        f"  prompts: {info['captions'].get('coco', 0)} COCO captions, {info['captions'].get('categories', 0)} from "
        "category names",
        f"  categories: {info['categories']} with subjects; most frequent "
        + ", ".join(f"{name} {n}" for name, n in info["top_categories"]),
        f"  reference pools: {info['pools']['categories']} categories, {info['pools']['entries']} references "
        f"(median {info['pools']['median']:g} per category): {info['pools']['clean']} clean, "
        f"{info['pools']['fallback']} fallback (truncated, small or occluded); "
        f"{info['subjects_with_fallback_reference']} subjects got a fallback reference",
    ]  # fmt: skip
    files = info["files"]
    line = f"  files: {files['layouts']} layout maps, {files['pool_images']} pool images"
    if files["checked"]:
        missing = files["missing"]
        line += (
            "; every file the manifest names exists" if not missing else f"; {len(missing)} missing, e.g. {missing[0]}"
        )
    lines.append(line)
    return "\n".join(lines)


@main.command("init")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--tiny", is_flag=True, help="A tiny network of the same structure (an 11 MB folder), random weights.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Initialisation seed.")
@click.option(
    "--resolution", default=32, show_default=True, type=click.IntRange(min=8), help="Image size (multiple of 8)."
)
@click.option(
    "--multi-subject",
    is_flag=True,
    help="Write an MS-CustomNet folder (with the category encoder) instead of a CustomNet-style one (model.init).",
)
def init_command(out: Path, tiny: bool, seed: int, resolution: int, multi_subject: bool) -> None:
    """Write a randomly initialised model folder into OUT: the initial weights of the CPU smoke path
    (configs/tiny_cpu.yaml's model.init; see docs/training.md)."""
    from msibench.clierrors import UsageClickError

    if not tiny:
        raise UsageClickError(
            "only --tiny is supported: the full-size initial weights are the public CustomNet checkpoint "
            "(mscustomnet convert-customnet customnet_v1.pt OUT)"
        )
    if resolution % 8:
        raise UsageClickError(f"--resolution {resolution}: must be a multiple of 8 (the VAE's factor)")
    if out.exists() and any(out.iterdir()):
        raise UsageClickError(f"{out}: exists and is not empty; choose a new folder")
    from mscustomnet.model.io import init_tiny

    folder = init_tiny(out, seed=seed, resolution=resolution, multi_subject=multi_subject)
    kind = "MS-CustomNet" if multi_subject else "CustomNet-style"
    click.echo(f"wrote {folder}: tiny {kind} model, {resolution} px, random weights (seed {seed})")


def _register_model_commands() -> None:
    # The converter lives with the model, the trainer in its package; their modules import torch only inside the
    # command bodies.
    from mscustomnet.model.convert import convert_customnet_command
    from mscustomnet.train.command import train_command

    main.add_command(convert_customnet_command)
    main.add_command(train_command)


_register_model_commands()
