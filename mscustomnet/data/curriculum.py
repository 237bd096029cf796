"""Curriculum Learning on Subject Quantity (CLSQ, paper Eq. 15-16).

K(e) = max(K_min, K_min + floor((e / E)^gamma * (K_max - K_min))) for epochs e = 1..E, so K(E) = K_max.
A sample with more subjects than K(e) trains on a random subset of K(e) of them, seeded per (seed, epoch, sample).
"""

from __future__ import annotations

import math

import numpy as np

K_MIN = 2
K_MAX = 5
GAMMA = 1.0

# (e/E)^gamma * (K_max - K_min) is mathematically an integer at some epochs (always at e = E); a float result such as
# 2.9999999999999996 must still floor to 3.
_FLOOR_TOLERANCE = 1e-9


def curriculum_k(epoch: int, total_epochs: int, k_min: int = K_MIN, k_max: int = K_MAX, gamma: float = GAMMA) -> int:
    """Number of subjects per sample at ``epoch`` (1-based) of ``total_epochs`` (Eq. 15)."""
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
    if not 1 <= epoch <= total_epochs:
        raise ValueError(f"epoch must be in 1..{total_epochs} (epochs are 1-based), got {epoch}")
    if not 1 <= k_min <= k_max:
        raise ValueError(f"need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    growth = (epoch / total_epochs) ** gamma * (k_max - k_min)
    return max(k_min, k_min + math.floor(growth + _FLOOR_TOLERANCE))


def subset_rng(seed: int, epoch: int, sample_key: int) -> np.random.Generator:
    """Generator for one (epoch, sample) draw: independent of data order, shards, workers and resume."""
    return np.random.default_rng([seed, epoch, sample_key])


def choose_subjects(num_subjects: int, k: int, rng: np.random.Generator) -> list[int]:
    """Eq. 16: all subjects when there are at most ``k``, else a uniform random subset of size ``k`` (sorted)."""
    if num_subjects <= k:
        return list(range(num_subjects))
    return sorted(rng.choice(num_subjects, size=k, replace=False).tolist())
