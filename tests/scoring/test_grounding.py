"""The optional open-vocabulary detector (OWLv2 boxes, SAM masks) on tiny random-weight models built in code,
saved as transformers folders so the scorer loads them through the real loading path (offline, no hub)."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
from PIL import Image
from scoring_helpers import stats_encoder

from msibench.coco import CATEGORY_ID
from msibench.scoring.backbones import BackboneError, is_grounding_spec, parse_grounding_spec

pytest.importorskip("transformers")
pytest.importorskip("torchvision")

DOG, CAT = CATEGORY_ID["dog"], CATEGORY_ID["cat"]


def tiny_owlv2(folder):
    """A tiny OWLv2 (1 layer, 16 wide, 64 px, patch 16) with a character-level CLIP tokenizer, saved to ``folder``."""
    import torch
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    folder.mkdir(parents=True, exist_ok=True)
    # OWLv2 treats a query whose first token id is 0 as padding: the start token must not be 0
    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!")
    text = dict(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                  patch_size=16)  # fmt: skip
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=16))
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def tiny_sam(folder):
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    config = SamConfig(
        vision_config=dict(hidden_size=16, output_channels=8, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16, mlp_dim=32, global_attn_indexes=[0], window_size=2,
                           num_pos_feats=4),
        prompt_encoder_config=dict(hidden_size=8, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=8, mlp_dim=16, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=8, num_multimask_outputs=3, attention_downsample_rate=2),
    )  # fmt: skip
    torch.manual_seed(0)
    model = SamModel(config)
    processor = SamProcessor(
        SamImageProcessor(
            size={"longest_edge": 64},
            pad_size={"height": 64, "width": 64},
            mask_size={"longest_edge": 16},
            mask_pad_size={"height": 16, "width": 16},
        )
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("grounding")
    return tiny_owlv2(root / "owlv2"), tiny_sam(root / "sam")


def test_grounding_specs_are_parsed_and_a_bad_one_is_named():
    assert is_grounding_spec("owlv2") and is_grounding_spec("owlv2+sam") and not is_grounding_spec("yolo11x-seg.pt")
    assert parse_grounding_spec("owlv2") == {"owlv2": "google/owlv2-base-patch16-ensemble"}
    assert parse_grounding_spec("owlv2:/x+sam") == {"owlv2": "/x", "sam": "facebook/sam-vit-base"}
    with pytest.raises(ValueError, match="owlv2\\+mask"):
        parse_grounding_spec("owlv2+mask")
    from msibench.scoring.scorer import ScorerConfig

    with pytest.raises(ValueError, match="got part 'sam2'"):
        ScorerConfig(detector="owlv2+sam2")


def test_grounding_detector_gives_detections_in_the_detector_interface(tiny_folders):
    """Boxes normalised and clipped to the image, categories from the vocabulary, NMS and max_det applied, SAM masks
    of the image's size, one Detections per image in order."""
    from msibench.scoring.backbones import load_grounding_model
    from msibench.scoring.grounding import GroundingDetector

    owl_dir, sam_dir = tiny_folders
    model, processor, identity = load_grounding_model("owlv2", str(owl_dir))
    sam, sam_processor, sam_identity = load_grounding_model("sam", str(sam_dir))
    assert identity.startswith("hf-dir:sha256:") and sam_identity.startswith("hf-dir:sha256:")
    detector = GroundingDetector(
        model, processor, identity=identity, vocabulary={DOG: "dog", CAT: "cat"}, conf=0.0, iou=0.5, max_det=5,
        sam=sam, sam_processor=sam_processor, sam_identity=sam_identity,
    )  # fmt: skip
    images = [Image.new("RGB", (80, 60), (200, 40, 40)), Image.new("RGB", (48, 96), (20, 200, 90))]
    dets = detector(images)
    assert len(dets) == 2 and detector.has_masks
    assert detector.config()["queries"] == ["a photo of a dog", "a photo of a cat"]
    for image, det in zip(images, dets, strict=True):
        assert det.image_size == image.size
        assert 0 < len(det) <= 5  # conf 0 keeps every box before NMS; max_det caps what is left
        assert np.all((det.boxes >= 0) & (det.boxes <= 1))
        assert set(det.category_ids.tolist()) <= {DOG, CAT}
        assert np.all(np.diff(det.scores) <= 0)  # most confident first, as NMS returns them
        mask = det.mask(0)
        assert mask.shape == (image.size[1], image.size[0]) and mask.dtype == bool
    # a stricter threshold keeps a subset: the threshold is applied
    strict = GroundingDetector(model, processor, identity=identity, vocabulary={DOG: "dog"}, conf=1.0)(images[:1])
    assert len(strict[0]) == 0 and not strict[0].has_masks


def test_scorer_uses_the_grounding_detector_and_names_it_in_its_version(tiny_folders, monkeypatch):
    from msibench.bench.manifest import load_manifest
    from msibench.scoring.scorer import ScoreItem, Scorer, ScorerConfig

    owl_dir, sam_dir = tiny_folders
    spec = f"owlv2:{owl_dir}+sam:{sam_dir}"
    scorer = Scorer(ScorerConfig(detector=spec, metrics=("yolo_subj", "yolo_l", "z_acc")), dino=stats_encoder())
    version = scorer.version()
    assert version["detector"]["detector"].startswith("hf-dir:sha256:")
    assert version["detector"]["masks"].startswith("hf-dir:sha256:")
    assert version["segmenter"] == "detector"  # SAM masks: Z-Acc needs no second network
    boxes_only = Scorer(ScorerConfig(detector=f"owlv2:{owl_dir}", metrics=("yolo_subj", "yolo_l")))
    assert boxes_only.version_hash() != scorer.version_hash()
    task = next(t for t in load_manifest().tasks if t.track == "multi")
    image = Image.new("RGB", (64, 64), (90, 90, 90))
    (rec,) = scorer.score_batch([ScoreItem(task, {"sample_index": 0}, image, "img", [])])
    assert rec["status"] == "ok" and 0.0 <= rec["metrics"]["yolo_subj"] <= 1.0
    assert all(d["category_id"] in {s.category_id for s in task.subjects} or d["subject"] is None
               for d in rec["detections"])  # fmt: skip
    # a grounding detector without masks cannot judge Z-Acc: refused, naming what to do
    from msibench.scoring.scorer import ScoreError

    with pytest.raises(ScoreError, match="instance masks"):
        Scorer(ScorerConfig(detector=f"owlv2:{owl_dir}", metrics=("z_acc",))).setup()


def test_missing_grounding_weights_fail_offline_naming_the_fetch(tmp_path, monkeypatch):
    from msibench.scoring.scorer import Scorer, ScorerConfig

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(BackboneError, match="weights fetch --grounding") as err:
        Scorer(ScorerConfig(detector="owlv2+sam", metrics=("yolo_subj",))).setup()
    assert "google/owlv2-base-patch16-ensemble@cfd3195" in str(err.value)
    assert "facebook/sam-vit-base@70c1a07" in str(err.value)  # both missing models named in one message


def test_grounding_weights_are_declared_for_the_weights_command():
    from msibench.inventory import selection

    entries = selection(False, [], grounding=True)
    assert [(owner, w.repo_id, w.pinned) for owner, w in entries] == [
        ("grounding", "google/owlv2-base-patch16-ensemble", True),
        ("grounding", "facebook/sam-vit-base", True),
    ]
    assert all(owner != "grounding" for owner, _ in selection(False, []))  # not part of Table I's set
