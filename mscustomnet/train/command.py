"""``mscustomnet train``: the click command (torch is imported only when it runs)."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import click


@click.command("train")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Training YAML, e.g. configs/mscustomnet.yaml (or an ablation: configs/baseline.yaml ...).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run folder (checkpoints/, log.csv, samples/, model/). Default: runs/<config file name>.",
)
@click.option(
    "--resume",
    default=None,
    metavar="latest|PATH",
    help="Continue exactly from a checkpoint: 'latest' in the run folder, or a checkpoint folder or file.",
)
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Override train.max_steps.")
@click.option(
    "--device", default="auto", show_default=True, help="auto, cpu or cuda (cuda:LOCAL_RANK under torchrun)."
)
@click.option("--quiet", is_flag=True, help="No progress bar, warnings only.")
def train_command(
    config_path: Path, out: Path | None, resume: str | None, max_steps: int | None, device: str, quiet: bool
) -> None:
    """Train MS-CustomNet as configured. Several GPUs: torchrun --nproc_per_node N -m mscustomnet.train --config ...

    Exit codes: 0 done, 1 error, 2 usage, 4 another trainer writes --out (see msibench.exitcodes)."""
    import dataclasses

    from mscustomnet.model.io import WeightsNotFoundError
    from mscustomnet.train.config import ConfigError, load_config
    from mscustomnet.train.distributed import DistEnv
    from msibench import exitcodes
    from msibench.records import LockBusyError

    env = DistEnv.from_env()
    level = logging.WARNING if quiet or not env.is_main else logging.INFO
    logging.basicConfig(level=level, format=f"%(levelname)s [rank {env.rank}] %(name)s: %(message)s")
    try:
        config = load_config(config_path)
        if max_steps is not None:
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, max_steps=max_steps))
        out = out or Path("runs") / config_path.stem
        from mscustomnet.train.trainer import Trainer

        result = Trainer(config, out, device=device, env=env, progress=not quiet).run(resume)
    except LockBusyError as err:  # another trainer writes this --out: exit 4, as msibench run does
        click.echo(f"Error: {err}", err=True)
        raise SystemExit(exitcodes.BUSY) from err
    except (ConfigError, WeightsNotFoundError, FileNotFoundError, FileExistsError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    if env.is_main:
        state = (
            "finished" if result.finished else f"stopped at step {result.global_step} (resume with --resume latest)"
        )
        click.echo(f"training {state}: epoch {result.epoch}, {result.global_step} steps; run folder {result.out}")
        if result.model_dir is not None:
            weights = shlex.quote(str(result.model_dir))
            click.echo(f"model: {result.model_dir}")
            click.echo(f"generate with it: msibench run --method mscustomnet -M weights={weights}")
            click.echo(f"generate and score: msibench eval --method mscustomnet -M weights={weights}")
