"""Curriculum Learning on Subject Quantity (Eq. 15-16)."""

from __future__ import annotations

import pytest

from mscustomnet.data.curriculum import choose_subjects, curriculum_k, subset_rng


def test_k_table_for_ten_epochs() -> None:
    assert [curriculum_k(e, 10) for e in range(1, 11)] == [2, 2, 2, 3, 3, 3, 4, 4, 4, 5]


@pytest.mark.parametrize("total", [1, 2, 3, 7, 10, 13, 100])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 3.0])
def test_last_epoch_reaches_k_max_and_k_never_decreases(total: int, gamma: float) -> None:
    ks = [curriculum_k(e, total, 2, 5, gamma) for e in range(1, total + 1)]
    assert ks[-1] == 5
    assert ks == sorted(ks) and min(ks) >= 2


def test_gamma_shapes_the_schedule() -> None:
    # gamma > 1 keeps few subjects longer: (e/E)^2 * 3 at E = 10 floors to 0,0,0,0,0,1,1,1,2,3.
    assert [curriculum_k(e, 10, gamma=2.0) for e in range(1, 11)] == [2, 2, 2, 2, 2, 3, 3, 3, 4, 5]
    assert [curriculum_k(e, 4, k_min=1, k_max=9) for e in range(1, 5)] == [3, 5, 7, 9]
    assert curriculum_k(3, 3, k_min=3, k_max=3) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [((0, 10), "1-based"), ((11, 10), "epoch must be in 1..10"), ((1, 0), "total_epochs"),
     ((1, 10, 4, 3), "k_min <= k_max"), ((1, 10, 2, 5, 0.0), "gamma")],
)  # fmt: skip
def test_invalid_curriculum_arguments(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        curriculum_k(*args)


def test_subset_behaviour() -> None:
    rng = subset_rng(0, 1, 42)
    assert choose_subjects(3, 5, rng) == [0, 1, 2]  # at most K(e) subjects: all of them
    assert choose_subjects(5, 5, rng) == [0, 1, 2, 3, 4]
    subset = choose_subjects(9, 3, subset_rng(0, 1, 42))
    assert len(subset) == 3 and len(set(subset)) == 3 and subset == sorted(subset) and max(subset) < 9
    # Seeded per (seed, epoch, sample): the same key gives the same subset, other keys differ somewhere.
    assert choose_subjects(9, 3, subset_rng(0, 1, 42)) == subset
    draws = {tuple(choose_subjects(9, 3, subset_rng(0, epoch, 42))) for epoch in range(1, 11)}
    assert len(draws) > 1
    draws = {tuple(choose_subjects(9, 3, subset_rng(seed, 1, 42))) for seed in range(10)}
    assert len(draws) > 1
    # Every subject gets picked over many samples (uniform subset, not a fixed prefix).
    seen = {i for key in range(50) for i in choose_subjects(9, 3, subset_rng(0, 1, key))}
    assert seen == set(range(9))
