"""CustomNet's DDIM timestep schedule, torch-free so that methods can check their options when constructed.

TencentARC/CustomNet@23a378f: ``ldm/modules/diffusionmodules/util.py:46-60`` (``make_ddim_timesteps('uniform')``)
builds the grid range(0, 1000, 1000 // S) + 1; ``customnet/ddim.py:134,149`` (``ddim_sampling(..., t_start=-1)``,
``timesteps = timesteps[:t_start]``) drops its last, noisiest point, so 50 requested steps evaluate the model at
the 49 timesteps 961, 941, ..., 1, and the pure starting noise (``ddim.py:138-139``) stands in for x_961.
"""

from __future__ import annotations

from typing import Any

#: ``official``: CustomNet's schedule; ``all-steps``: the whole grid (how this repository sampled before).
SCHEDULES = ("official", "all-steps")
DEFAULT_SCHEDULE = "official"


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000, schedule: str = DEFAULT_SCHEDULE) -> list[int]:
    """Model timesteps visited by the DDIM sampler for ``steps`` requested, first (noisiest) to last.

    ``official`` (CustomNet's ``customnet/ddim.py``): the grid range(0, T, T // steps) + 1 without its last point
    (``t_start=-1``), e.g. 49 timesteps 961 ... 1 for 50 steps. ``all-steps``: the whole grid (981 ... 1 for 50),
    clipped to T - 1, as this repository sampled before it followed the official code.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"DDIM schedule {schedule!r} is not one of {SCHEDULES}")
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    grid = [t + 1 for t in range(0, num_train_timesteps, num_train_timesteps // steps)]
    if schedule == "all-steps":
        return [min(t, num_train_timesteps - 1) for t in grid][::-1]
    visited = grid[:-1]
    if not visited:
        raise ValueError(
            f"the official CustomNet DDIM schedule visits no timestep for steps={steps} (it drops the last of "
            f"{len(grid)} grid point(s)); use steps >= 2 or the 'all-steps' schedule"
        )
    return visited[::-1]


def sampler_description(schedule: str) -> str:
    """The sampler as the fingerprint states it."""
    if schedule == "official":
        return "ddim eta=0, customnet/ddim.py t_start=-1: t = (range(0,1000,1000//steps)+1)[:-1] reversed, x_T = noise"
    return "ddim eta=0, all-steps: t = min(range(0,1000,1000//steps)+1, 999) reversed, x_T = noise"


def check_sampler_options(options: dict[str, Any], method: str) -> None:
    """``schedule`` and ``steps`` of a method's options, with an error naming the option."""
    if options["schedule"] not in SCHEDULES:
        raise ValueError(f"{method} option 'schedule': {options['schedule']!r} is not one of {SCHEDULES}")
    try:
        ddim_timesteps(int(options["steps"]), schedule=options["schedule"])
    except ValueError as err:
        raise ValueError(f"{method} option 'steps': {err}") from err


__all__ = ["DEFAULT_SCHEDULE", "SCHEDULES", "check_sampler_options", "ddim_timesteps", "sampler_description"]
