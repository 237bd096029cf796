"""results.json: written by every scoring pass, versioned, read by the table while current, recomputed when stale."""

from __future__ import annotations

import json

import pytest
from scoring_helpers import stats_encoder

from msibench.scoring.aggregate import aggregate, summary_to_json
from msibench.scoring.results import RESULTS_FILE, ResultsError, read_results
from msibench.scoring.score import score_run
from msibench.scoring.scorer import Scorer, ScorerConfig
from msibench.scoring.store import load_scored_run
from msibench.scoring.table import load_run, render_table


def _score(run_dir, coco_root, **kw):
    scorer = Scorer(ScorerConfig(metrics=("dino_i",), identity_crop="target"), dino=stats_encoder())
    return score_run(run_dir, scorer, coco_root=coco_root, progress=False, **kw)


def test_results_file_holds_table_cells_coverage_and_identity(run_copy, coco_root):
    _score(run_copy, coco_root)
    document = read_results(run_copy)
    assert document is not None and document["schema"] == "msibench.results" and document["schema_version"] == 1
    scored = load_scored_run(run_copy)
    assert document["groups"] == summary_to_json(aggregate(scored.records))
    single = document["table"]["single"]["dino_i"]
    assert single["n"] == 4 and single["ci_low"] <= single["mean"] <= single["ci_high"]
    assert set(document["by_k"]["multi"]) == {"2"}
    assert document["coverage"]["multi"]["images_scored"] == 4 and document["coverage"]["single"]["tasks"] == 4
    assert not document["coverage"]["single"]["complete"] or document["coverage"]["single"]["images_scored"] == 4
    assert document["run"]["method"] == "paste" and document["run"]["fingerprint_hash"]
    assert document["scorer"]["hash"] == scored.header["scorer_hash"]
    assert document["scorer"]["version"]["metrics"] == ["dino_i"]
    assert document["manifest"]["sha256"] and document["packages"]["scoring"]


def test_table_reads_the_results_file_while_current_and_recomputes_when_stale(run_copy, coco_root):
    _score(run_copy, coco_root, limit=6)  # partial: the file says so, and becomes stale with the next pass
    partial = read_results(run_copy)
    assert partial["coverage"]["multi"]["images_scored"] + partial["coverage"]["single"]["images_scored"] == 6
    _score(run_copy, coco_root)
    path = run_copy / RESULTS_FILE
    document = json.loads(path.read_text())
    true_mean = document["table"]["single"]["dino_i"]["mean"]
    for group in document["groups"]:  # the table must show what the file says: mark it
        if group["track"] == "single" and group["k"] is None:
            group["metrics"]["dino_i"]["mean"] = 0.123456
    path.write_text(json.dumps(document))
    assert "0.123" in render_table([load_run(str(run_copy))], "md")
    with open(run_copy / "scores.jsonl", "a") as f:  # scores changed since: the file is stale, figures recomputed
        f.write("\n")
    assert read_results(run_copy) is None
    stat = next(g for g in load_run(str(run_copy)).summary if g.track == "single" and g.k is None).metrics["dino_i"]
    assert stat.mean == pytest.approx(true_mean)


def test_another_schema_version_is_refused_naming_the_field(run_copy, coco_root):
    _score(run_copy, coco_root)
    path = run_copy / RESULTS_FILE
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, "schema_version": 2}))
    with pytest.raises(ResultsError, match="results.json: field 'schema_version': 2"):
        read_results(run_copy)
