"""Identity that follows identity (scorer code version 3): same-category crops paired with subjects by appearance,
no credit for a subject that is not there, and collapse among look-alikes of one category."""

from __future__ import annotations

import hashlib

import pytest
from PIL import Image
from scoring_helpers import stats_encoder

from msibench.bench.manifest import load_manifest
from msibench.scoring.aggregate import aggregate, find_group
from msibench.scoring.identity import cosine, crop
from msibench.scoring.oracle import Drawn, image_key
from msibench.scoring.oracle import oracle_detector as oracle_detector_of
from msibench.scoring.scorer import ScoreItem, Scorer, ScorerConfig

SIZE = 128


@pytest.fixture(scope="module")
def two_tvs(coco_root):
    """v2's multi-k2-020 (a frozen manifest) asks for two TVs in disjoint boxes; their two references, prepared."""
    from msibench.bench.prepare import prepare, reference_paths

    manifest = load_manifest("v2")
    task = manifest.by_id["multi-k2-020"]
    assert [s.category for s in task.subjects] == ["tv", "tv"]
    prepare(manifest, coco_root, tasks=[task], verify_all=False)
    refs = []
    for s in task.subjects:
        path = reference_paths(s.reference, manifest.sources[s.reference.image_id]).image
        refs.append((hashlib.sha256(path.read_bytes()).hexdigest(), path))
    return task, refs


def draw(task, refs, order, *, where=None):
    """An image with reference ``order[j]`` drawn into subject j's box (``where`` overrides the boxes)."""
    image = Image.new("RGB", (SIZE, SIZE), (127, 127, 127))
    boxes = where or [s.box for s in task.subjects]
    for box, r in zip(boxes, order, strict=True):
        x0, y0, x1, y1 = (round(v * SIZE) for v in box)
        with Image.open(refs[r][1]) as ref:
            image.paste(ref.convert("RGB").resize((max(1, x1 - x0), max(1, y1 - y0))), (x0, y0))
    return image


def scorer(images_to_boxes, metrics=("dino_i", "collapse"), encoder=None, **config):
    def layout(drawn):
        return [Drawn(box, cid, score=0.9) for box, cid in drawn]

    detector = oracle_detector_of(images_to_boxes, layout, name="drawn-boxes", masks=None)
    return Scorer(ScorerConfig(metrics=metrics, **config), detector=detector, dino=encoder or stats_encoder())


def test_two_same_category_subjects_drawn_swapped_score_as_themselves(two_tvs):
    """Two TVs drawn perfectly, each in the other's box: by appearance each crop is paired with its own reference;
    by position each is compared with the other's reference."""
    task, refs = two_tvs
    boxes = [(s.box, s.category_id) for s in task.subjects]
    swapped = draw(task, refs, [1, 0])
    in_place = draw(task, refs, [0, 1])
    drawn = {image_key(swapped): boxes, image_key(in_place): boxes}
    encoder = stats_encoder()
    items = [ScoreItem(task, {"sample_index": 0}, im, f"img{n}", refs) for n, im in enumerate((swapped, in_place))]
    by_appearance = scorer(drawn, encoder=encoder).score_batch(items)
    by_position = scorer(drawn, encoder=encoder, identity_pairing="position").score_batch(items)

    feats = encoder.encode([crop(swapped, b) for b, _ in boxes])
    ref_feats = encoder.encode([Image.open(p).convert("RGB") for _, p in refs])
    own = [cosine(feats[1], ref_feats[0]), cosine(feats[0], ref_feats[1])]  # subject 0 is drawn in box 1
    other = [cosine(feats[0], ref_feats[0]), cosine(feats[1], ref_feats[1])]
    assert sum(own) > sum(other)  # the test means something: the references differ under this encoder

    swapped_a, in_place_a = by_appearance
    assert [s["dino_i"] for s in swapped_a["subjects"]] == pytest.approx(own, abs=1e-6)
    # drawn in place, the appearance pairing keeps the positional one
    assert [d["subject"] for d in in_place_a["detections"]] == [0, 1]
    assert in_place_a["metrics"]["dino_i"] == pytest.approx(by_position[1]["metrics"]["dino_i"], abs=1e-9)
    assert [d["subject"] for d in swapped_a["detections"]] == [1, 0]
    assert all("paired by appearance" in s["crop_reason"] for s in swapped_a["subjects"])
    assert swapped_a["metrics"]["collapse_same"] == 0.0
    swapped_p = by_position[0]
    assert [s["dino_i"] for s in swapped_p["subjects"]] == pytest.approx(other, abs=1e-6)
    assert swapped_p["metrics"]["dino_i"] < swapped_a["metrics"]["dino_i"]
    assert "collapse_same" not in swapped_p["metrics"]  # positional pairing: a swap is not a look-alike
    # the pairing rule is part of the scorer version
    v_a = scorer(drawn, encoder=encoder).version()["identity_crop"]["pairing"]
    v_p = scorer(drawn, encoder=encoder, identity_pairing="position").version()["identity_crop"]["pairing"]
    assert v_a["mode"] == "appearance" and v_a["features"] == encoder.identity and v_p["mode"] == "position"
    assert scorer(drawn).version_hash() != scorer(drawn, identity_pairing="position").version_hash()


def test_two_subjects_drawn_as_one_look_alike_are_a_same_category_collapse(two_tvs):
    """Both TVs drawn from the first reference: whichever crop goes where, the second subject's crop is closer to
    the first's reference than to its own: confused; the first is not."""
    task, refs = two_tvs
    boxes = [(s.box, s.category_id) for s in task.subjects]
    clones = draw(task, refs, [0, 0])
    (rec,) = scorer({image_key(clones): boxes}).score_batch([ScoreItem(task, {"sample_index": 0}, clones, "c", refs)])
    assert rec["collapse_same"]["confused"] == [False, True]
    assert rec["metrics"]["collapse_same"] == 0.5
    assert (rec["metrics"]["collapse_same_confused"], rec["metrics"]["collapse_same_subjects"]) == (1, 2)
    assert "subject 1" in rec["collapse_same"]["reason"] and "subject 0's reference" in rec["collapse_same"]["reason"]
    assert rec["metrics"]["collapse"] is None  # one category only: the cross-category test has nothing to say


def test_a_uniform_grey_image_cannot_score_above_a_failed_generation(two_tvs):
    """Drawing nothing used to be cropped as the whole image and scored its similarity to the references (above
    the 0 of a crashed generation). Now a subject not found scores 0 and counts as collapsed."""
    task, refs = two_tvs
    grey = Image.new("RGB", (SIZE, SIZE), (127, 127, 127))
    (rec,) = scorer({image_key(grey): []}).score_batch([ScoreItem(task, {"sample_index": 0}, grey, "g", refs)])
    m = rec["metrics"]
    assert (m["dino_i"], m["found"], m["collapse_same"]) == (0.0, 0.0, 1.0)
    assert all(sub["crop"] == "none" for sub in rec["subjects"])
    failed = {
        "task_id": task.id,
        "sample_index": 0,
        "track": "multi",
        "k": 2,
        "status": "failed",
        "stage": "generation",
        "metrics": {},
        "metrics_expected": list(m),
        "overlap_pairs": 0,
        "collapse_subjects": 0,
        "collapse_same_subjects": 2,
    }
    grey_group = find_group(aggregate([rec]), "multi").metrics
    failed_group = find_group(aggregate([failed]), "multi").metrics
    for key in ("dino_i", "found"):
        assert grey_group[key].mean <= failed_group[key].mean == 0.0
    assert grey_group["collapse_same"].mean >= failed_group["collapse_same"].mean == 1.0
