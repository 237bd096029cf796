"""The scorer over a real paste run with injected detectors and a cheap injected identity backbone."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image
from scoring_helpers import stats_encoder

from msibench.bench.manifest import load_manifest
from msibench.records import append_record, read_records
from msibench.scoring.detect import CallableDetector, Detections
from msibench.scoring.oracle import Drawn, image_key, task_images, task_layout
from msibench.scoring.oracle import oracle_detector as oracle_detector_of
from msibench.scoring.score import score_run
from msibench.scoring.scorer import ScoreConflictError, Scorer, ScorerConfig
from msibench.scoring.store import load_scores


def oracle_detector(run_dir: Path, invert=False, drop_first=False):
    """Detects exactly the layout (boxes and classes) of the task each image belongs to; with ``drop_first`` it
    misses the first subject (which still hides what is behind it)."""

    def layout(task):
        drawn = task_layout(task, invert=invert)
        return [dataclasses.replace(drawn[0], found=False), *drawn[1:]] if drop_first else drawn

    name = f"oracle-invert{invert}-drop{drop_first}"
    return oracle_detector_of(task_images([run_dir], load_manifest()), layout, name=name)


def scorer_for(run_dir, *, invert=False, drop_first=False, **config):
    cfg = ScorerConfig(metrics=("yolo_subj", "yolo_l", "z_acc", "dino_i"), **config)
    return Scorer(cfg, detector=oracle_detector(run_dir, invert, drop_first), dino=stats_encoder())


def test_oracle_detections_give_perfect_detector_metrics(run_copy, coco_root):
    summary = score_run(run_copy, scorer_for(run_copy), coco_root=coco_root, progress=False)
    assert (summary.scored, summary.failed) == (8, 0)
    header, records = load_scores(run_copy)
    assert header["scorer_hash"] == summary.scorer_hash
    assert header["scorer"]["detector"]["identity"] == "oracle-invertFalse-dropFalse"
    multi = [r for r in records if r["track"] == "multi"]
    single = [r for r in records if r["track"] == "single"]
    assert len(multi) == len(single) == 4
    for r in multi:
        m = r["metrics"]
        assert (m["yolo_subj"], m["yolo_subj_exact"], m["yolo_l"], m["yolo_l50"]) == (1.0, 1.0, 1.0, 1.0)
        assert m["z_correct"] == m["z_pairs"]
        assert all(s["crop"] == "detection" and s["iou"] == pytest.approx(1.0) for s in r["subjects"])
        assert -1.0 <= m["dino_i"] <= 1.0
        # the Z-Acc pairs are the task's, from its normalised boxes
        from msibench.scoring.metrics import z_pair_indices

        task = load_manifest().by_id[r["task_id"]]
        assert m["z_pairs"] == len(z_pair_indices([s.box for s in task.subjects]))
        # every detection is in the record, with the subject it was assigned to
        assert [d["subject"] for d in r["detections"]] == list(range(task.k))
        assert [d["category_id"] for d in r["detections"]] == [s.category_id for s in task.subjects]
        assert r["detections"][0]["box"] == [round(v, 6) for v in task.subjects[0].box]
    assert sum(r["metrics"]["z_pairs"] for r in multi) > 0
    for r in single:  # the single track reports identity only (and whether the subject was found)
        assert set(r["metrics"]) == {"dino_i", "found"} and r["metrics"]["found"] == 1.0
        assert r["subjects"][0]["crop"] == "detection" and "on the target" in r["subjects"][0]["crop_reason"]
    assert header["summary"]  # aggregate stored once the pass ends


def test_reversed_layers_fail_every_z_pair(run_copy, coco_root):
    score_run(run_copy, scorer_for(run_copy, invert=True), coco_root=coco_root, progress=False)
    _, records = load_scores(run_copy)
    multi = [r for r in records if r["track"] == "multi"]
    assert sum(r["metrics"]["z_pairs"] for r in multi) > 0
    assert all(r["metrics"]["z_correct"] == 0 for r in multi)
    assert all(not p["correct"] and "wrong order" in p["reason"] for r in multi for p in r["pairs"])


def test_missing_subject_is_counted_and_explained(run_copy, coco_root):
    score_run(run_copy, scorer_for(run_copy, drop_first=True), coco_root=coco_root, progress=False)
    _, records = load_scores(run_copy)
    manifest = load_manifest()
    for r in (r for r in records if r["track"] == "multi"):
        task = manifest.by_id[r["task_id"]]
        first = task.subjects[0]
        same = sum(1 for s in task.subjects if s.category_id == first.category_id)
        assert f"expected {same} {first.category}, found {same - 1}" in r["reason"]
        assert r["subjects"][0]["matched"] is False
        # not found by its category either: no crop, identity 0 (no credit for what is not there), and says why
        assert r["subjects"][0]["crop"] == "none" and "not found" in r["subjects"][0]["crop_reason"]
        assert r["subjects"][0]["dino_i"] == 0.0
        assert r["metrics"]["found"] == pytest.approx((task.k - 1) / task.k)
        assert r["metrics"]["yolo_l"] == pytest.approx((task.k - 1) / task.k)
        assert r["metrics"]["yolo_subj"] < 1.0 and r["metrics"]["yolo_subj_exact"] == 0.0
    for r in (r for r in records if r["track"] == "single"):
        assert r["subjects"][0]["crop"] == "none" and "not found (1 asked, 0 detected)" in r["reason"]
        assert r["metrics"]["dino_i"] == 0.0 and r["metrics"]["found"] == 0.0


def test_matched_crop_mode_keeps_the_layout_bound_rule(run_copy, coco_root):
    scorer = scorer_for(run_copy, drop_first=True, identity_crop="matched")
    score_run(run_copy, scorer, coco_root=coco_root, progress=False)
    _, records = load_scores(run_copy)
    for r in records:
        first = r["subjects"][0]
        assert first["crop"] == "none" and "not found, identity 0" in first["crop_reason"]
        assert first["dino_i"] == 0.0
        assert all(s["crop"] == "detection" for s in r["subjects"][1:])


def test_resume_rescore_and_feature_cache(run_copy, coco_root, tmp_path):
    first = score_run(run_copy, scorer_for(run_copy), coco_root=coco_root, progress=False)
    lines = (run_copy / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 8
    # the reference features are on disk, keyed by encoder identity + reference checksum
    cached = list((Path(os.environ["MSIBENCH_CACHE"]) / "features").rglob("*.npy"))
    n_refs = len({s["reference"] for line in lines for s in json.loads(line)["subjects"]})
    assert len(cached) == n_refs

    again = score_run(run_copy, scorer_for(run_copy), coco_root=coco_root, progress=False)
    assert (again.scored, again.reused) == (0, 8)

    # a regenerated image (new pixels) is scored again; a torn last line (killed pass) is scored again too
    rec = json.loads(lines[0])
    image = Image.open(run_copy / rec["image"]).convert("RGB")
    image.putpixel((0, 0), (255, 0, 0))
    image.save(run_copy / rec["image"])
    # as `msibench run` records a regenerated image: a new record with the new file's sha256
    gen = next(g for g in read_records(run_copy) if g["task_id"] == rec["task_id"])
    gen["image_sha256"] = hashlib.sha256((run_copy / rec["image"]).read_bytes()).hexdigest()
    append_record(run_copy / "records.jsonl", gen)
    torn = json.loads(lines[-1])
    with open(run_copy / "scores.jsonl", "a") as f:
        f.write('{"task_id": "torn')
    text = (run_copy / "scores.jsonl").read_text()
    (run_copy / "scores.jsonl").write_text(text.replace(lines[-1] + "\n", ""))
    scorer = scorer_for(run_copy)
    calls = []
    encode = scorer.dino.encode
    scorer.dino.encode = lambda images: calls.append(len(images)) or encode(images)
    third = score_run(run_copy, scorer, coco_root=coco_root, progress=False)
    assert (third.reused, third.scored, third.failed) == (6, 2, 0)
    redone = {rec["task_id"], torn["task_id"]}
    header, records = load_scores(run_copy)
    assert {r["task_id"] for r in records} == {json.loads(line)["task_id"] for line in lines}
    # only the two images' crops went through the backbone: every reference feature came from the disk cache
    assert sum(calls) == sum(r["k"] for r in records if r["task_id"] in redone)

    # another scorer version is refused, then archived with --rescore
    other = scorer_for(run_copy, identity_crop="target")
    with pytest.raises(ScoreConflictError, match="identity_crop"):
        score_run(run_copy, other, coco_root=coco_root, progress=False)
    score_run(run_copy, other, coco_root=coco_root, rescore=True, progress=False)
    assert (run_copy / f"scores-{first.scorer_hash}.jsonl").is_file()
    header, records = load_scores(run_copy)
    assert header["scorer_hash"] == other.version_hash() != first.scorer_hash
    assert all(s["crop"] == "target" for r in records for s in r.get("subjects", []))


def test_generation_failures_are_carried_not_scored(run_copy, coco_root):
    gen = [json.loads(line) for line in (run_copy / "records.jsonl").read_text().splitlines()]
    gen[0].update(status="failed", image=None, reason="CUDA out of memory")
    (run_copy / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    summary = score_run(run_copy, scorer_for(run_copy), coco_root=coco_root, progress=False)
    assert (summary.scored, summary.not_generated) == (7, 1)
    _, records = load_scores(run_copy)
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 1 and "generation failed: CUDA out of memory" in failed[0]["reason"]
    assert failed[0]["stage"] == "generation"
    # the failed image counts 0, it is not left out of its task's mean
    header, _ = load_scores(run_copy)
    groups = {(g["track"], g["k"]): g for g in header["summary"]}
    assert groups[(failed[0]["track"], None)]["n_failed"] == 1


def test_z_acc_without_masks_is_refused(run_copy):
    from msibench.scoring.scorer import ScoreError

    boxes_only = CallableDetector(lambda images: [], name="boxes-only", has_masks=False)
    with pytest.raises(ScoreError, match="Z-Acc needs instance masks"):
        Scorer(ScorerConfig(metrics=("z_acc",)), detector=boxes_only).setup()


def test_two_networks_boxes_from_detector_masks_from_segmenter(run_copy, coco_root):
    boxes = oracle_detector(run_copy)
    box_only = CallableDetector(
        lambda images: [Detections.build(d.boxes, d.category_ids, image_size=d.image_size) for d in boxes.fn(images)],
        name="boxes",
        has_masks=False,
    )
    seg = oracle_detector(run_copy, invert=True)
    seen = []
    segmenter = CallableDetector(lambda images: seen.append(len(images)) or seg.fn(images), name="seg", has_masks=True)
    scorer = Scorer(ScorerConfig(metrics=("yolo_subj", "yolo_l", "z_acc")), detector=box_only, segmenter=segmenter)
    assert scorer.version()["segmenter"]["identity"] == "seg"
    score_run(run_copy, scorer, coco_root=coco_root, progress=False)
    _, records = load_scores(run_copy)
    multi = [r for r in records if r["track"] == "multi"]
    assert all(r["metrics"]["yolo_l"] == pytest.approx(1.0) for r in multi)  # boxes from the box detector
    # masks from the (reversed-layer) segmenter: every evaluated pair wrong
    assert all(r["metrics"]["z_correct"] == 0 for r in multi) and sum(r["metrics"]["z_pairs"] for r in multi) > 0
    # the segmenter only ran on multi-subject images with overlapping subjects
    assert sum(seen) == sum(1 for r in multi if r["metrics"]["z_pairs"] > 0)


def test_every_generation_of_a_track_failed_scores_zero(run_copy, coco_root):
    from msibench.scoring.table import load_run, render_table

    gen = [json.loads(line) for line in (run_copy / "records.jsonl").read_text().splitlines()]
    for r in gen:
        if r["track"] == "single":
            r.update(status="failed", image=None, reason="CUDA out of memory")
    (run_copy / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    summary = score_run(run_copy, scorer_for(run_copy), coco_root=coco_root, progress=False)
    assert (summary.scored, summary.not_generated) == (4, 4)
    _, records = load_scores(run_copy)
    failed = [r for r in records if r["status"] == "failed"]
    assert all(r["metrics_expected"] == ["dino_i", "found"] for r in failed)
    text = render_table([load_run(run_copy)], "csv")
    row = next(csv.DictReader(io.StringIO(text)))
    assert float(row["single_dino_i"]) == 0.0 and row["single_dino_i_n"] == "4"  # 0, not "–"
    assert float(row["single_found"]) == 0.0 and row["single_found_n"] == "4"
    assert row["single_clip_i"] == ""  # not requested from the scorer: no value


def away_from(box, size=0.3):
    """A square box in the image corner farthest from ``box``'s centre."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x0 = 1.0 - size if cx < 0.5 else 0.0
    y0 = 1.0 - size if cy < 0.5 else 0.0
    return [x0, y0, x0 + size, y0 + size]


def test_layout_free_crop_finds_a_subject_drawn_away_from_its_box(coco_root):
    """A method that takes no layout draws its subject elsewhere: the default crop finds it there by its category
    (the record says so); the layout-bound ``matched`` mode crops the empty target box."""
    from msibench.bench.prepare import prepare, reference_paths
    from msibench.scoring.identity import cosine, crop
    from msibench.scoring.match import box_iou
    from msibench.scoring.scorer import ScoreItem

    manifest = load_manifest()
    tasks = [t for t in manifest.tasks if t.track == "single"]
    tasks = [t for t in tasks if box_iou([t.subjects[0].box], [away_from(t.subjects[0].box)])[0, 0] == 0][:4]
    assert len(tasks) == 4
    prepare(manifest, coco_root, tasks=tasks, verify_all=False)
    items, drawn = [], {}
    for n, task in enumerate(tasks):
        subject = task.subjects[0]
        ref_path = reference_paths(subject.reference, manifest.sources[subject.reference.image_id]).image
        box = away_from(subject.box)
        image = Image.new("RGB", (128, 128), (127, 127, 127))
        x0, y0, x1, y1 = (round(v * 128) for v in box)
        image.paste(Image.open(ref_path).convert("RGB").resize((x1 - x0, y1 - y0)), (x0, y0))
        drawn[image_key(image)] = (box, subject.category_id)
        sha = hashlib.sha256(ref_path.read_bytes()).hexdigest()
        items.append(ScoreItem(task, {"sample_index": 0}, image, f"img{n}", [(sha, ref_path)]))

    def layout(box_and_category):
        return [Drawn(*box_and_category, score=0.8)]

    detector = oracle_detector_of(drawn, layout, name="drawn-boxes", masks=None)
    encoder = stats_encoder()
    results = {}
    for mode in ("category", "matched"):
        scorer = Scorer(ScorerConfig(metrics=("dino_i",), identity_crop=mode), detector=detector, dino=encoder)
        results[mode] = scorer.score_batch(items)
    for item, found, matched in zip(items, results["category"], results["matched"], strict=True):
        box, _ = drawn[image_key(item.image)]
        (sha, ref_path) = item.references[0]
        subject = found["subjects"][0]
        assert subject["crop"] == "detection" and "found by category" in subject["crop_reason"]
        assert found["detections"][0]["subject"] == 0 and subject["matched"] is False
        feats = encoder.encode([crop(item.image, box), Image.open(ref_path).convert("RGB")])
        assert found["metrics"]["dino_i"] == pytest.approx(cosine(feats[0], feats[1]), abs=1e-6)
        # the layout-bound mode finds nothing on the target box: not found, identity 0, and says so
        assert matched["subjects"][0]["crop"] == "none" and "no " in matched["subjects"][0]["crop_reason"]
        assert matched["detections"][0]["subject"] is None
        assert matched["metrics"]["dino_i"] == 0.0 and matched["metrics"]["found"] == 0.0


def test_masks_are_decoded_only_for_subjects_of_a_z_pair(run_copy, coco_root):
    from msibench.scoring.metrics import z_pair_indices

    oracle = oracle_detector(run_copy)
    decoded: list[int] = []

    def detect(images):
        out = []
        for d in oracle.fn(images):
            masks = list(d.masks)
            out.append(Detections.build(d.boxes, d.category_ids, image_size=d.image_size,
                                        masks=lambda i, masks=masks: decoded.append(i) or masks[i]))  # fmt: skip
        return out

    lazy = CallableDetector(detect, name="lazy-masks", has_masks=True)
    score_run(run_copy, Scorer(ScorerConfig(metrics=("z_acc",)), detector=lazy), coco_root=coco_root, progress=False)
    manifest = load_manifest()
    in_pairs = sum(
        len({k for pair in z_pair_indices([s.box for s in t.subjects]) for k in pair})
        for t in (manifest.by_id[r["task_id"]] for r in read_records(run_copy))
        if t.track == "multi"
    )
    assert len(decoded) == in_pairs


def test_z_pairs_are_the_same_for_a_scored_and_a_failed_generation(tmp_path, coco_root):
    """Two subjects overlapping by a sliver (2.5 % of the smaller box) form no Z-Acc pair, two overlapping by half
    form one: for a scored image at any resolution and for a failed generation alike (the denominator of Z-Acc is
    the task's, whatever happened to the image)."""
    import copy

    from scoring_helpers import manifest_with_tasks

    from msibench.bench.manifest import default_manifest_path
    from msibench.methods.paste import PasteMethod
    from msibench.runner import run_method
    from msibench.scoring.aggregate import aggregate, find_group

    raw = json.loads(default_manifest_path().read_text())
    base = next(t for t in raw["tasks"] if t["track"] == "multi" and len(t["subjects"]) == 2)
    tasks = []
    for name, right in (("sliver", [0.49, 0.1, 0.9, 0.5]), ("deep", [0.3, 0.1, 0.7, 0.5])):
        task = copy.deepcopy(base)
        task["id"] = f"multi-k2-{name}"
        task["subjects"][0]["box"], task["subjects"][1]["box"] = [0.1, 0.1, 0.5, 0.5], right
        tasks.append(task)
    manifest_path = tmp_path / "manifest.json"
    manifest_with_tasks(manifest_path, tasks)
    manifest = load_manifest(manifest_path)
    expected = {"multi-k2-sliver": 0, "multi-k2-deep": 1}

    def oracle(run_dir):
        return oracle_detector_of(task_images([run_dir], manifest), name="oracle")

    for resolution in (64, 512):
        run_dir = tmp_path / f"run{resolution}"
        run_method(PasteMethod(resolution=resolution), run_dir=run_dir, manifest=manifest_path, coco_root=coco_root,
                   progress=False)  # fmt: skip
        scorer = Scorer(ScorerConfig(metrics=("z_acc",)), detector=oracle(run_dir))
        score_run(run_dir, scorer, coco_root=coco_root, progress=False)
        _, records = load_scores(run_dir)
        assert {r["task_id"]: r["metrics"]["z_pairs"] for r in records} == expected, resolution
    # the same tasks, every generation failed
    gen = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    for r in gen:
        r.update(status="failed", image=None, image_sha256=None, reason="CUDA out of memory")
    (run_dir / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    score_run(run_dir, Scorer(ScorerConfig(metrics=("z_acc",)), detector=oracle(tmp_path / "run64")),
              coco_root=coco_root, progress=False, rescore=True)  # fmt: skip
    _, records = load_scores(run_dir)
    assert {r["task_id"]: r["overlap_pairs"] for r in records} == expected
    multi = find_group(aggregate(records), "multi", None)
    assert multi.metrics["z_acc"].n == 1 and multi.metrics["z_acc"].mean == 0.0  # the deep pair, counted wrong
    assert multi.z_tasks_without_overlap == 1


def test_the_detector_runs_only_on_images_whose_requested_metrics_need_it(run_copy, coco_root):
    """What each track needs: the multi track's detector metrics always need a pass; identity needs one only when
    its crop comes from detections (category, matched); CLIP-B never does."""
    needs = {
        (crop, metrics): (ScorerConfig(identity_crop=crop, metrics=metrics).needs_detection("single"),
                          ScorerConfig(identity_crop=crop, metrics=metrics).needs_detection("multi"))
        for crop in ("category", "matched", "target", "full")
        for metrics in (("dino_i", "clip_b", "yolo_l"), ("clip_b",))
    }  # fmt: skip
    assert needs == {
        ("category", ("dino_i", "clip_b", "yolo_l")): (True, True),
        ("matched", ("dino_i", "clip_b", "yolo_l")): (True, True),
        ("target", ("dino_i", "clip_b", "yolo_l")): (False, True),
        ("full", ("dino_i", "clip_b", "yolo_l")): (False, True),
        **{(crop, ("clip_b",)): (False, False) for crop in ("category", "matched", "target", "full")},
    }
    detector = oracle_detector(run_copy)
    seen = []
    counting = CallableDetector(
        lambda images: seen.append(len(images)) or detector.fn(images), name="oracle", has_masks=True
    )
    cfg = ScorerConfig(metrics=("yolo_subj", "dino_i"), identity_crop="full")
    score_run(run_copy, Scorer(cfg, detector=counting, dino=stats_encoder()), coco_root=coco_root, progress=False)
    _, records = load_scores(run_copy)
    assert sum(seen) == sum(r["track"] == "multi" for r in records) == 4  # the single track: no pass
