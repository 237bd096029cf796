"""Aggregation, comparison, Table I and figures over hand-written score records."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scoring_helpers import write_scored_run

from mscustomnet.model.schedule import sampler_description
from msibench.scoring.aggregate import aggregate, compare, find_group
from msibench.scoring.table import COLUMNS, load_paper_table, load_run, paper_match, render_table


def rec(task, track, k, sample, status="ok", **metrics):
    return {"task_id": task, "track": track, "k": k, "sample_index": sample, "status": status, "metrics": metrics}


RECORDS = [
    # single track: task s0 has two seeds (0.2, 0.4 -> task mean 0.3); s1 one seed 0.9
    rec("s0", "single", 1, 0, dino_i=0.2, clip_i=0.5, clip_b=0.25),
    rec("s0", "single", 1, 1, dino_i=0.4, clip_i=0.7, clip_b=0.35),
    rec("s1", "single", 1, 0, dino_i=0.9, clip_i=0.8, clip_b=0.30),
    rec("s2", "single", 1, 0, status="failed"),
    # multi track, K=2 and K=3
    rec(
        "m0",
        "multi",
        2,
        0,
        yolo_subj=1.0,
        yolo_l=0.8,
        dino_i=0.6,
        clip_i=0.7,
        clip_b=0.2,
        z_correct=1,
        z_pairs=1,
        collapse_confused=0,
        collapse_subjects=2,
    ),
    rec(
        "m1",
        "multi",
        3,
        0,
        yolo_subj=0.5,
        yolo_l=0.4,
        dino_i=0.5,
        clip_i=0.6,
        clip_b=0.3,
        z_correct=0,
        z_pairs=3,
        collapse_confused=2,
        collapse_subjects=3,
    ),
    rec(
        "m2",
        "multi",
        3,
        0,
        yolo_subj=0.0,
        yolo_l=0.1,
        dino_i=0.4,
        clip_i=0.5,
        clip_b=0.1,
        z_correct=0,
        z_pairs=0,
        collapse_confused=0,
        collapse_subjects=0,
    ),
    rec("m3", "multi", 2, 0, status="skipped"),
]


def test_aggregate_averages_seeds_per_task_first():
    summary = aggregate(RECORDS)
    single = find_group(summary, "single", None)
    # per task first: (0.3 + 0.9) / 2 = 0.6, not the record mean (0.2 + 0.4 + 0.9) / 3 = 0.5
    assert single.metrics["dino_i"].mean == pytest.approx(0.6)
    assert single.metrics["dino_i"].n == 2
    assert single.metrics["dino_i"].std == pytest.approx(np.std([0.3, 0.9], ddof=1))
    assert (single.n_tasks, single.n_images, single.n_failed) == (2, 3, 1)
    multi = find_group(summary, "multi", None)
    assert multi.n_skipped == 1
    assert multi.metrics["yolo_subj"].mean == pytest.approx(0.5)
    # collapse pools subjects: (0 + 2) / (2 + 3) = 0.4; m2 has one category only (no evaluable subject)
    assert multi.metrics["collapse"].mean == pytest.approx(0.4) and multi.metrics["collapse"].n == 2
    assert multi.collapse_tasks_one_category == 1
    # Z-Acc pools pairs: (1 + 0) / (1 + 3) = 0.25 (the mean of per-task rates would be 0.5); m2 has no overlap
    assert multi.metrics["z_acc"].mean == pytest.approx(0.25)
    assert multi.metrics["z_acc"].n == 2
    assert multi.z_tasks_without_overlap == 1
    k3 = find_group(summary, "multi", 3)
    assert k3.metrics["yolo_l"].mean == pytest.approx(0.25)
    assert k3.metrics["z_acc"].mean == 0.0
    assert "yolo_subj" not in single.metrics  # detector metrics are multi-track only


def test_bootstrap_interval_is_deterministic_and_brackets_the_mean():
    rng = np.random.default_rng(1)
    records = [rec(f"t{i}", "multi", 2, 0, dino_i=float(v)) for i, v in enumerate(rng.uniform(0.3, 0.9, 40))]
    a = find_group(aggregate(records), "multi", None).metrics["dino_i"]
    b = find_group(aggregate(records), "multi", None).metrics["dino_i"]
    assert a == b
    assert a.ci_low < a.mean < a.ci_high
    assert a.ci_high - a.ci_low < 0.15
    one = find_group(aggregate(records[:1]), "multi", None).metrics["dino_i"]
    assert one.ci_low is None and one.std is None  # no interval from a single task


def test_compare_gives_paired_differences():
    a = [rec(f"t{i}", "multi", 2, 0, dino_i=0.1 * i, z_correct=i % 2, z_pairs=1) for i in range(10)]
    b = [rec(f"t{i}", "multi", 2, 0, dino_i=0.1 * i + 0.05, z_correct=1, z_pairs=1) for i in range(10)]
    diffs = {d.metric: d for d in compare(a, b)}
    # every task gains exactly 0.05: the paired interval collapses onto it
    assert diffs["dino_i"].diff == pytest.approx(0.05)
    assert diffs["dino_i"].ci_low == pytest.approx(0.05) and diffs["dino_i"].ci_high == pytest.approx(0.05)
    # Z-Acc: A 5/10, B 10/10
    assert diffs["z_acc"].mean_a == pytest.approx(0.5) and diffs["z_acc"].diff == pytest.approx(0.5)
    assert 0 < diffs["z_acc"].ci_low <= 0.5 <= diffs["z_acc"].ci_high


RATIOS = {
    "z_acc": ("z_correct", "z_pairs"),
    "collapse": ("collapse_confused", "collapse_subjects"),
    "collapse_same": ("collapse_same_confused", "collapse_same_subjects"),
}


def test_table_numbers_equal_the_aggregated_records(tmp_path):
    run = write_scored_run(tmp_path / "run_a", RECORDS)
    other = [{**r, "metrics": {k: v * 0.5 for k, v in r["metrics"].items()}} for r in RECORDS]
    run_b = write_scored_run(tmp_path / "run_b", other, method="mscustomnet")
    results = [load_run(run), load_run(f"MS-CustomNet={run_b}")]
    text = render_table(results, "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["label"] for r in rows] == ["Paste (oracle)", "MS-CustomNet"]
    for row, records in zip(rows, (RECORDS, other), strict=True):
        # independent computation: mean over tasks of the per-task mean over ok samples
        for track, metric in COLUMNS:
            per_task: dict[str, list[float]] = {}
            for r in records:
                if r["track"] == track and r["status"] == "ok":
                    if metric in RATIOS or metric not in r["metrics"]:  # e.g. found: not in these records
                        continue
                    per_task.setdefault(r["task_id"], []).append(r["metrics"][metric])
            if metric in RATIOS:
                num, den = RATIOS[metric]
                ok = [r for r in records if r["track"] == "multi" and r["status"] == "ok" and r["metrics"].get(den)]
                expected = sum(r["metrics"][num] for r in ok) / sum(r["metrics"][den] for r in ok) if ok else None
            else:
                expected = float(np.mean([np.mean(v) for v in per_task.values()])) if per_task else None
            cell = row[f"{track}_{metric}"]
            if expected is None:
                assert cell == ""
            else:
                assert float(cell) == pytest.approx(expected, abs=1e-12), (row["label"], track, metric)
    md = render_table(results, "md", paper=load_paper_table())
    # single DINO-I from the per-task means; these hand-written scores name no weights: marked beside the paper's
    assert "| Paste (oracle) (NOT the pinned scorers) | 0.600 |" in md
    # MS-CustomNet's reported multi-subject DINO-I / YOLO-L: on the paper's own row (this run.json has no fingerprint,
    # so it cannot be matched to the paper's configuration).
    assert "(0.61)" in md and "(0.94)" in md
    assert "Paste (oracle) (single): 1 failed images" in md and "(multi): 0 failed images" in md  # s2, m3
    tex = render_table(results, "tex")
    assert r"\multicolumn{4}{c}{Single-subject}" in tex and "0.600" in tex
    # The group heads span every column of their track: 4 single (the paper's 3, found), then 9 multi (the paper's
    # 5, Z-Acc, collapse across and within categories, found).
    assert r"\multicolumn{9}{c}{Multi-subject} \\" in tex and r"\cmidrule(lr){2-5}\cmidrule(lr){6-14}" in tex
    header = tex.splitlines()[4]
    assert header.count("&") == 13 and "Z-Acc" in header and "Collapse (same cat.)" in header and "Found" in header
    html = render_table(results, "html")
    assert '<th colspan="4">Single-subject</th><th colspan="9">Multi-subject</th>' in html


def test_paper_table_holds_every_cell_of_table_i():
    """arXiv 2603.21136v1, TABLE I (shared/papers/ms-customnet-arxiv-2603.21136.txt lines 202-209), written out:
    single DINO-I / CLIP-I / CLIP-B, multi YOLO-Subj / YOLO-L / DINO-I / CLIP-I / CLIP-B; None = "–"."""
    table_i = {
        "ip-adapter": ((0.58, 0.75, 0.29), (None, None, None, None, None)),
        "customnet": ((0.77, 0.82, 0.33), (None, None, None, None, None)),
        "lambda-eclipse": ((0.61, 0.78, 0.34), (0.62, None, 0.56, 0.77, 0.30)),
        "ssr-encoder": ((0.67, 0.79, 0.36), (0.71, 0.91, 0.57, 0.79, 0.35)),
        "mscustomnet": ((0.74, 0.82, 0.32), (0.68, 0.94, 0.61, 0.79, 0.34)),
    }
    paper = load_paper_table()
    assert paper["citation"]["url"] == "https://arxiv.org/html/2603.21136" and "Table I" in paper["citation"]["table"]
    assert set(paper["methods"]) == set(table_i)
    for method, (single, multi) in table_i.items():
        entry = paper["methods"][method]
        assert tuple(entry["single"][m] for m in ("dino_i", "clip_i", "clip_b")) == single, method
        assert tuple(entry["multi"][m] for m in ("yolo_subj", "yolo_l", "dino_i", "clip_i", "clip_b")) == multi
        assert entry["multi"]["z_acc"] is None and "multi.z_acc" in entry["dash"]  # Z-Acc is msibench's own
        for track, metrics in (("single", single), ("multi", multi)):
            names = ("dino_i", "clip_i", "clip_b") if track == "single" else ("yolo_subj", "yolo_l", "dino_i")
            names += () if track == "single" else ("clip_i", "clip_b")
            for name, value in zip(names, metrics, strict=True):
                assert (value is None) == (f"{track}.{name}" in entry["dash"]), (method, track, name)
        assert entry["configuration"]["fields"] and entry["configuration"]["why"]


def _write_run_json(path: Path, config: dict) -> None:
    info = json.loads((path / "run.json").read_text())  # the run's identity, written by write_scored_run
    info["fingerprint"] = {"method": "x", "config": config}
    (path / "run.json").write_text(json.dumps(info))


def test_paper_numbers_stand_only_beside_the_papers_configuration(tmp_path):
    full = {"training": {"use_layout": True, "dual_stage": True, "curriculum": True}, "steps": 50, "guidance": 3.0}
    full["resolution"] = 256
    full["sampler"] = sampler_description("official")
    runs = {}
    for name, config in {
        "full": full,
        "ablation": {**full, "training": {"use_layout": True, "dual_stage": True, "curriculum": False}},
        "guided": {**full, "guidance": 5.0},
        "converted": {**full, "training": None},
    }.items():
        runs[name] = write_scored_run(tmp_path / name, RECORDS, method="mscustomnet")
        _write_run_json(runs[name], config)
    ip_layout = write_scored_run(tmp_path / "ip", RECORDS, method="ip-adapter")
    _write_run_json(ip_layout, {"use_layout": True, "scheduler": "ddim", "steps": 50, "guidance": 7.5, "scale": 0.5})
    paper = load_paper_table()
    results = [load_run(f"{name}={path}") for name, path in runs.items()] + [load_run(f"IP+layout={ip_layout}")]
    assert [paper_match(paper, r)[0] for r in results] == [True, False, False, False, False]
    assert "training.curriculum = False" in paper_match(paper, results[1])[1]
    rows = list(csv.DictReader(io.StringIO(render_table(results, "csv", paper=paper))))
    by_label = {r["label"]: r for r in rows}
    assert by_label["full"]["multi_yolo_l_paper"] == "0.94" and by_label["full"]["single_dino_i_paper"] == "0.74"
    for label in ("ablation", "guided", "converted", "IP+layout"):
        assert by_label[label]["multi_yolo_l_paper"] == "" and by_label[label]["single_dino_i_paper"] == ""
    # IP-Adapter has no run of the paper's configuration: its numbers get a row of their own; MS-CustomNet's do not.
    ip_paper = by_label["IP-Adapter (paper)"]  # the paper's own row says so
    assert ip_paper["run_dir"] == "" and ip_paper["single_dino_i_paper"] == "0.58"
    assert "MS-CustomNet" not in by_label
    md = render_table(results, "md", paper=paper)
    ablation_row = next(line for line in md.splitlines() if line.startswith("| ablation "))
    assert "(" not in ablation_row.split(" | ", 1)[1]  # no paper number in its cells
    assert "ablation: not the paper's configuration of mscustomnet (training.curriculum = False" in md
    assert "converted: not the paper's configuration of mscustomnet (training.use_layout = absent" in md


def test_cli_table_plot_compare_write_files(tmp_path):
    from msibench.cli import main

    run_a = write_scored_run(tmp_path / "a", RECORDS)
    run_b = write_scored_run(tmp_path / "b", [{**r, "metrics": dict(r["metrics"])} for r in RECORDS])
    runner = CliRunner()
    out = tmp_path / "table.csv"
    res = runner.invoke(main, ["table", str(run_a), f"B={run_b}", "--format", "csv", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert float(rows[0]["single_dino_i"]) == pytest.approx(0.6) and rows[1]["label"] == "B"
    res = runner.invoke(
        main,
        ["plot", "ablation", "--run", f"baseline={run_a}", "--run", f"+ML={run_b}", "--out", str(tmp_path / "f5")],
    )
    assert res.exit_code == 0, res.output
    for name in ("f5.png", "f5.pdf"):
        assert (tmp_path / name).stat().st_size > 1000
    assert (tmp_path / "f5.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "f5.pdf").read_bytes()[:5] == b"%PDF-"
    res = runner.invoke(main, ["plot", "by-k", "--run", f"a={run_a}", "--out", str(tmp_path / "byk.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "byk.png").is_file() and (tmp_path / "byk.pdf").is_file()
    res = runner.invoke(main, ["compare", str(run_a), str(run_b)])
    assert res.exit_code == 0, res.output
    assert "DINO-I" in res.output and "+0.0000" in res.output
    write_scored_run(tmp_path / "c", RECORDS, scorer_hash="other")
    res = runner.invoke(main, ["compare", str(run_a), str(tmp_path / "c")])
    assert res.exit_code != 0 and "different scorer versions" in res.output
    res = runner.invoke(main, ["table", str(tmp_path / "missing")])
    assert res.exit_code != 0 and "score the run first" in res.output


def test_failed_generation_counts_zero_but_a_scoring_failure_is_left_out():
    ok = [
        rec("m0", "multi", 2, 0, yolo_subj=1.0, yolo_l=0.8, dino_i=0.6, clip_b=0.2, z_correct=1, z_pairs=1),
        rec("m1", "multi", 2, 0, yolo_subj=1.0, yolo_l=0.6, dino_i=0.8, clip_b=0.4, z_correct=2, z_pairs=2),
    ]
    gen_failed = {**rec("m2", "multi", 2, 0, status="failed"), "stage": "generation", "overlap_pairs": 1}
    # an old record without ``stage`` is recognized by its reason; its task's pairs come from a scored sample
    old_gen_failed = {**rec("m1", "multi", 2, 1, status="failed"), "reason": "generation failed: CUDA OOM"}
    score_failed = {**rec("m3", "multi", 2, 0, status="failed"), "stage": "scoring"}
    multi = find_group(aggregate([*ok, gen_failed, old_gen_failed, score_failed]), "multi", None)
    # m1 = mean(0.8, 0) = 0.4; m2 = 0; m3 left out: (0.6 + 0.4 + 0) / 3
    assert multi.metrics["dino_i"].mean == pytest.approx(1.0 / 3)
    assert multi.metrics["dino_i"].n == 3
    assert multi.metrics["yolo_subj"].mean == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    # pairs: m0 1/1, m1 (2+0)/2 correct over (2+2)/2 pairs, m2 0/1 -> (1 + 1 + 0) / (1 + 2 + 1)
    assert multi.metrics["z_acc"].mean == pytest.approx(0.5)
    assert (multi.n_tasks, multi.n_images, multi.n_failed) == (3, 2, 3)
    # the paired comparison sees the failure too: B failed m0 where A scored it
    b = [{**rec("m0", "multi", 2, 0, status="failed"), "stage": "generation", "overlap_pairs": 1}, ok[1]]
    diff = {d.metric: d for d in compare(ok, b)}
    assert diff["dino_i"].n == 2 and diff["dino_i"].diff == pytest.approx(-0.3)


def test_a_default_run_of_each_baseline_is_the_papers_configuration(tmp_path, monkeypatch):
    from baselines.customnet import CustomNetMethod
    from baselines.ip_adapter import IPAdapterMethod
    from baselines.lambda_eclipse import LambdaEclipseMethod
    from baselines.ssr_encoder import SSREncoderMethod
    from msibench.scoring.table import RunResult

    for env in ("MSIBENCH_IP_ADAPTER_WEIGHTS", "MSIBENCH_CUSTOMNET_WEIGHTS"):
        monkeypatch.delenv(env, raising=False)
    (tmp_path / "pytorch_model.bin").write_bytes(b"aligner")
    (tmp_path / "pytorch_model_1.bin").write_bytes(b"layers")
    paper = load_paper_table()

    def match(method):
        return paper_match(paper, RunResult("x", method.name, "", None, [], method.config()))

    ssr_weights = str(tmp_path)
    methods = [IPAdapterMethod(), LambdaEclipseMethod(), SSREncoderMethod(weights=ssr_weights), CustomNetMethod()]
    for method in methods:
        assert match(method) == (True, ""), method.name
    # Options that change the image away from the official recipe (the README: "runs with other options show no
    # paper number"), among them the former behaviours the official ones replaced.
    others = [
        IPAdapterMethod(use_layout=True),
        IPAdapterMethod(negative_prompt=""),
        LambdaEclipseMethod(dtype="float16"),  # main.py's dtype, test_quick.py's guidance
        LambdaEclipseMethod(scheduler="DDIMScheduler"),
        *(
            SSREncoderMethod(weights=ssr_weights, **options)
            for options in (
                {"recipe": "text"},  # infer_text.py's guidance on the multi track too
                {"recipe": "multi"},
                {"token_scale": 1.0},
                {"scale": 0.5},
                {"negative_prompt": "ugly"},
                {"uncond_concept": "x"},
                {"dtype": "float16"},
            )
        ),
        *(
            CustomNetMethod(**options)
            for options in (
                {"schedule": "all-steps"},  # the former full DDIM grid
                {"reference_fit": "upscale"},
                {"placement": "dataset"},
                {"dtype": "float16"},
            )
        ),
    ]
    for method in others:
        ok, why = match(method)
        assert not ok and "the paper's configuration has" in why, (method.name, method.options)
    assert "sampler = 'ddim eta=0, all-steps" in match(CustomNetMethod(schedule="all-steps"))[1]


def failed_gen(task, track, k, **extra):
    return {
        **rec(task, track, k, 0, status="failed"),
        "stage": "generation",
        "reason": "generation failed: OOM",
        **extra,
    }


def test_a_track_whose_generations_all_failed_scores_zero(tmp_path):
    keys = ["yolo_subj", "yolo_subj_exact", "z_acc", "z_correct", "z_pairs", "dino_i"]
    keys += ["collapse", "collapse_confused", "collapse_subjects"]
    records = [
        # multi: every generation failed; the records carry the task's Z-Acc pairs and evaluable subjects
        failed_gen("m0", "multi", 2, metrics_expected=keys, overlap_pairs=1, collapse_subjects=2),
        failed_gen("m1", "multi", 3, metrics_expected=keys, overlap_pairs=0, collapse_subjects=3),
        # single: failures written before metrics_expected: every metric of the track counts
        failed_gen("s0", "single", 1),
        failed_gen("s1", "single", 1),
    ]
    summary = aggregate(records)
    multi = find_group(summary, "multi", None)
    assert multi.metrics["yolo_subj"].mean == 0.0 and multi.metrics["yolo_subj"].n == 2
    assert multi.metrics["dino_i"].mean == 0.0 and "clip_i" not in multi.metrics  # clip_i was not requested
    assert multi.metrics["z_acc"].mean == 0.0 and multi.metrics["z_acc"].n == 1  # m1 has no pair
    assert multi.metrics["collapse"].mean == 1.0 and multi.metrics["collapse"].n == 2  # all collapsed
    single = find_group(summary, "single", None)
    assert {m: single.metrics[m].mean for m in ("dino_i", "clip_i", "clip_b")} == {
        "dino_i": 0.0,
        "clip_i": 0.0,
        "clip_b": 0.0,
    }
    md = render_table([load_run(write_scored_run(tmp_path / "run", records))], "md")
    row = next(line for line in md.splitlines() if line.startswith("| Paste"))
    assert row.split(" | ")[1:4] == ["0.000", "0.000", "0.000"]  # single DINO-I, CLIP-I, CLIP-B: 0, not "–"
