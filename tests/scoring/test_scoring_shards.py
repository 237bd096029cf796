"""score --shard I/N: disjoint shares of one run scored side by side, merged into the scores of one process."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from scoring_helpers import stats_encoder

from msibench.cli import main
from msibench.records import LockBusyError, exclusive_or_busy, read_records
from msibench.runner import shard_of
from msibench.scoring.score import score_run
from msibench.scoring.scorer import Scorer, ScorerConfig
from msibench.scoring.store import load_scores


def _scorer() -> Scorer:
    return Scorer(ScorerConfig(metrics=("dino_i",), identity_crop="target"), dino=stats_encoder())


def _comparable(run_dir: Path):
    header, records = load_scores(run_dir)
    by_key = {(r["task_id"], r["sample_index"]): {k: v for k, v in r.items() if k != "seconds"} for r in records}
    return by_key, header["summary"], header["counts"]


def test_shards_scored_concurrently_equal_one_process(run_copy, coco_root, tmp_path):
    alone = tmp_path / "alone"
    shutil.copytree(run_copy, alone)
    score_run(alone, _scorer(), coco_root=coco_root, progress=False)

    errors: list[BaseException] = []

    def shard(i: int) -> None:
        try:
            score_run(run_copy, _scorer(), coco_root=coco_root, progress=False, shard=(i, 3), workers=2)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=shard, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    sharded, summary, counts = _comparable(run_copy)
    expected, expected_summary, expected_counts = _comparable(alone)
    assert sharded == expected and len(sharded) == 8
    assert summary == expected_summary and counts == expected_counts
    lines = (run_copy / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 8  # each unit scored by exactly one shard
    # each shard scored exactly its units
    assert {(r["task_id"], r["sample_index"]) for r in read_records(run_copy / "scores.jsonl")} == set(expected)


def test_a_shard_scores_only_its_units_and_resumes(run_copy, coco_root):
    summary = score_run(run_copy, _scorer(), coco_root=coco_root, progress=False, shard=(1, 2))
    mine = {
        (r["task_id"], r["sample_index"])
        for r in read_records(run_copy / "records.jsonl")
        if shard_of(r["task_id"], r["sample_index"], 2) == 1
    }
    scored = {(r["task_id"], r["sample_index"]) for r in read_records(run_copy / "scores.jsonl")}
    assert scored == mine and summary.total == len(mine) and 0 < len(mine) < 8
    header = json.loads((run_copy / "scores.json").read_text())
    assert sum(header["counts"].values()) == len(mine)  # the summary says what is scored so far
    other = score_run(run_copy, _scorer(), coco_root=coco_root, progress=False, shard=(0, 2))
    assert other.scored == 8 - len(mine) and other.reused == 0
    again = score_run(run_copy, _scorer(), coco_root=coco_root, progress=False)  # a full pass finds all current
    assert again.scored == 0 and again.reused == 8


def test_the_same_shard_twice_is_refused_other_shards_are_not(run_copy, coco_root):
    with exclusive_or_busy(run_copy / ".score-shard-0-of-2.lock", "scoring", "-"):
        with pytest.raises(LockBusyError, match="shard 0/2"):
            score_run(run_copy, _scorer(), coco_root=coco_root, progress=False, shard=(0, 2))
        score_run(run_copy, _scorer(), coco_root=coco_root, progress=False, shard=(1, 2))


@pytest.mark.parametrize("spec", ["2/2", "a/b", "1"])
def test_bad_shard_is_a_usage_error(run_copy, spec):
    result = CliRunner().invoke(main, ["score", str(run_copy), "--shard", spec])
    assert result.exit_code == 2 and "--shard" in result.output
