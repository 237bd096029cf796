"""The real YOLO11-seg, DINO ViT-S/16 and open_clip ViT-B-32 architectures, randomly initialised and built offline,
through the real scorer code path end to end (weights are random, so only structure and plumbing are checked)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from msibench.scoring.score import score_run
from msibench.scoring.scorer import Scorer, ScorerConfig
from msibench.scoring.store import load_scores


@pytest.fixture(scope="module")
def random_scorer():
    # conf 0: random heads score ~1e-4, so every class keeps some boxes and matching and masks are exercised
    config = ScorerConfig(detector="yolo11n-seg.yaml", dino="random", clip="random", imgsz=160, conf=0.0, max_det=40)
    scorer = Scorer(config, seed=0)
    scorer.setup()
    return scorer


def test_random_real_architectures_score_a_run_end_to_end(random_scorer, run_copy, coco_root):
    scorer = random_scorer
    version = scorer.version()
    assert version["detector"]["weights"] == "yolo11n-seg.yaml" and version["detector"]["imgsz"] == 160
    assert version["segmenter"] == "detector"  # one -seg pass serves boxes and masks
    assert version["dino"].startswith("random:vit_small_patch16_224.dino:seed0")
    assert "short256-bicubic-center224" in version["dino"]
    assert version["clip"].startswith("random:open_clip:ViT-B-32-quickgelu:seed0")
    assert scorer.dino.encode([Image.new("RGB", (50, 80))]).shape == (1, 384)
    assert scorer.clip.text.encode(["in a kitchen"]).shape == (1, 512)

    summary = score_run(run_copy, scorer, coco_root=coco_root, progress=False)
    assert (summary.scored, summary.failed) == (8, 0)
    header, records = load_scores(run_copy)
    assert header["scorer"] == version
    for r in records:
        m = r["metrics"]
        expected = {"dino_i", "clip_i", "clip_b", "found"}
        if r["track"] == "multi":
            expected |= {"yolo_subj", "yolo_subj_exact", "yolo_l", "yolo_l50", "z_acc", "z_correct", "z_pairs"}
            expected |= {"collapse", "collapse_confused", "collapse_subjects"}
            expected |= {"collapse_same", "collapse_same_confused", "collapse_same_subjects"}
        assert set(m) == expected, r["task_id"]
        for key in ("dino_i", "clip_i", "clip_b"):
            assert -1.0 - 1e-6 <= m[key] <= 1.0 + 1e-6 and math.isfinite(m[key])
        # the layout-free crop: a detection of the subject's category wherever it is, else none (identity 0)
        dets = r["detections"]
        assert dets and all(set(d) == {"box", "category_id", "category", "score", "subject"} for d in dets)
        for j, s in enumerate(r["subjects"]):
            assert s["crop"] in ("detection", "none") and s["crop_reason"]
            if s["crop"] == "detection":
                d = dets[s["crop_detection"]]
                assert d["subject"] == j and d["category_id"] == s["category_id"]
            else:
                assert s["crop_detection"] is None and "not found" in s["crop_reason"]
            if s["matched"] and "paired by appearance" not in s["crop_reason"]:  # the IoU match is kept first
                assert s["crop_detection"] == s["detection"]["index"]
        assert r["reason"]
    # reference features: one cached file per reference and encoder
    refs = {s["reference"] for r in records for s in r["subjects"]}
    cached = list((Path(os.environ["MSIBENCH_CACHE"]) / "features").rglob("*.npy"))
    assert len(cached) == 2 * len(refs)


def test_random_detector_handles_non_square_images(random_scorer):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 200, 3), dtype=np.uint8))
    (det,) = random_scorer.detector([image])
    assert len(det) > 0 and det.image_size == (200, 90)
    assert det.boxes.min() >= 0.0 and det.boxes.max() <= 1.0
    assert det.mask(0).shape == (90, 200)


def test_score_cli_refuses_missing_weights_then_scores_with_random_yolo(run_copy, monkeypatch):
    from msibench.cli import main
    from msibench.scoring.backbones import YOLO_ENV

    monkeypatch.delenv(YOLO_ENV, raising=False)
    runner = CliRunner()
    res = runner.invoke(main, ["score", str(run_copy), "--no-progress"])
    assert res.exit_code != 0
    assert "yolo11x-seg.pt" in res.output and YOLO_ENV in res.output
    args = ["score", str(run_copy), "--detector", "yolo11n-seg.yaml", "--imgsz", "160", "--no-progress"]
    res = runner.invoke(main, [*args, "--metrics", "yolo_subj,yolo_l,z_acc"])
    assert res.exit_code == 0, res.output
    assert "8 scored" in res.output  # single-track images get a record without detector metrics
    res = runner.invoke(main, [*args, "--metrics", "yolo_subj,yolo_l,z_acc"])
    assert res.exit_code == 0 and "0 scored, 8 already current" in res.output
    res = runner.invoke(main, [*args, "--metrics", "yolo_subj,yolo_l,z_acc", "--conf", "0.5"])
    assert res.exit_code != 0 and "--rescore" in res.output and "conf" in res.output
