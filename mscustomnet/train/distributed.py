"""Process layout under torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or a plain single process."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> DistEnv:
        """The layout torchrun sets in the environment; a single process when it sets none."""
        env = os.environ if environ is None else environ
        values = {}
        for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", None)):
            raw = env.get(name)
            if raw is None:
                values[name] = default
                continue
            try:
                values[name] = int(raw)
            except ValueError:
                raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
        rank, world = values["RANK"], values["WORLD_SIZE"]
        local = values["LOCAL_RANK"] if values["LOCAL_RANK"] is not None else rank
        if world < 1 or not 0 <= rank < world or local < 0:
            raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
        return cls(rank=rank, world_size=world, local_rank=local)


def pick_device(env: DistEnv, requested: str | None = None) -> torch.device:
    """``requested`` if given (``cuda`` means this process's ``cuda:LOCAL_RANK``), else CUDA when present, else CPU."""
    if requested in (None, "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    return device


def init_process_group(env: DistEnv, device: torch.device) -> bool:
    """Join the process group (NCCL on CUDA, gloo on CPU); True when this call created it."""
    if not env.distributed or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    log.info("rank %d of %d joined the %s process group", env.rank, env.world_size, backend)
    return True


def all_gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (just ``[obj]`` in a single process)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(env: DistEnv, value: float, device: torch.device) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / env.world_size


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


__all__ = ["DistEnv", "all_gather_objects", "barrier", "init_process_group", "mean_over_ranks", "pick_device"]
