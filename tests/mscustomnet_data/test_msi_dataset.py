"""The training Dataset: curriculum subsets, recomposed layout maps, consistent geometry, collate, determinism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mscustomnet.data.dataset import MSIDataset, collate_msi


def layout_colors(sample: dict) -> set[tuple[int, int, int]]:
    pixels = (sample["layout_map"].permute(1, 2, 0) * 255).round().to(torch.uint8).reshape(-1, 3)
    return {tuple(p) for p in pixels.unique(dim=0).tolist()}


def pixel(image: torch.Tensor, x: float, y: float) -> tuple[int, ...]:
    return tuple((image[:, int(y), int(x)] * 255).round().to(torch.int64).tolist())


def test_layout_map_holds_exactly_the_kept_subjects(tiny_build: Path, tiny) -> None:
    ds = MSIDataset(tiny_build, resolution=64, total_epochs=10)
    names = {cid: name for cid, (name, _) in tiny.categories.items()}
    for epoch, k in [(1, 2), (4, 3), (7, 4), (10, 5)]:
        ds.set_epoch(epoch)
        for index in range(len(ds)):
            sample = ds[index]
            assert sample["num_subjects"] == k
            kept = {names[c] for c in sample["category_ids"].tolist()}
            dropped = set(tiny.colors) - kept - {"person"}
            assert len(kept) == k
            colors = layout_colors(sample)
            for name in kept:
                assert tiny.colors[name] in colors, (epoch, index, name)
            for name in dropped:
                assert tiny.colors[name] not in colors, (epoch, index, name)
            # The index map tells which returned subject owns each layout pixel: all of them, nothing else.
            owners = set(sample["layout_index"].unique().tolist()) - {-1}
            assert owners == set(range(k))
            for slot in range(k):
                ys, xs = torch.nonzero(sample["layout_index"] == slot, as_tuple=True)
                x0, y0, x1, y1 = sample["boxes"][slot].tolist()
                assert xs.min() >= int(x0) and xs.max() < x1 + 1 and ys.min() >= int(y0) and ys.max() < y1 + 1
            z = sample["z_ranks"].tolist()
            areas = {"dog": 2100, "bus": 1225, "kite": 600, "cat": 400, "cup": 144}
            by_rank = sorted(range(k), key=lambda i: z[i])
            assert sorted(z) == list(range(k))
            assert [areas[names[sample["category_ids"][i].item()]] for i in by_rank] == sorted(
                (areas[n] for n in kept), reverse=True
            )


def test_boxes_image_and_layout_share_one_transform(tiny_build: Path, tiny) -> None:
    ds = MSIDataset(tiny_build, resolution=64, total_epochs=1)  # K = K_max = 5: every subject
    names = {cid: name for cid, (name, _) in tiny.categories.items()}
    sample = ds[0]  # image 1: 100 x 80 -> scale 0.64, centred with a 6 px black band above and below
    assert sample["image"].shape == (3, 64, 64) and sample["layout_map"].shape == (3, 64, 64)
    assert pixel(sample["image"], 32, 2) == (0, 0, 0) and pixel(sample["image"], 32, 61) == (0, 0, 0)
    for slot, category_id in enumerate(sample["category_ids"].tolist()):
        name = names[category_id]
        x0, y0, x1, y1 = tiny.scene_boxes(1)[name]
        expected = torch.tensor([x0 * 0.64, y0 * 0.64 + 6, x1 * 0.64, y1 * 0.64 + 6])
        assert torch.allclose(sample["boxes"][slot], expected, atol=1e-4)
        if name in ("kite", "bus", "cat"):  # unoccluded in the photo: its colour sits at the box centre
            cx, cy = (expected[0] + expected[2]) / 2, (expected[1] + expected[3]) / 2
            got = np.array(pixel(sample["image"], cx, cy))
            assert np.abs(got - np.array(tiny.colors[name])).max() <= 8, name
            assert pixel(sample["layout_map"], cx, cy) == tiny.colors[name]
    refs = sample["references"]
    assert refs.shape == (5, 3, 64, 64) and sample["reference_masks"].shape == (5, 1, 64, 64)
    kite = [names[c] for c in sample["category_ids"].tolist()].index("kite")
    # The 30 x 20 kite crop is centred on a white square (aspect kept): white band above it, blue in the middle.
    assert pixel(refs[kite], 0, 0) == (255, 255, 255) and pixel(refs[kite], 32, 32) == tiny.colors["kite"]
    assert sample["reference_masks"][kite, 0, 0, 0] == 0 and sample["reference_masks"][kite, 0, 32, 32] == 1
    assert sample["prompt"] in {"A dog, a cat and a kite near a bus.", "Animals by a bus with a cup."}


def test_crop_fit_drops_subjects_outside_the_crop(tiny_build: Path, tmp_path: Path) -> None:
    out = tmp_path / "moved"
    shutil.copytree(tiny_build, out)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    cup = next(s for s in records[0]["subjects"] if s["category"] == "cup")
    cup["bbox"] = [95.0, 58.0, 4.0, 12.0]  # right of the centre crop: 95 * 0.8 - 8 = 68 > 64
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # 100 x 80 -> 80 x 64 (scale 0.8), centre 64 columns: x' = 0.8 x - 8.
    sample = MSIDataset(out, resolution=64, total_epochs=1, fit="crop")[0]
    assert sample["num_subjects"] == 4 and cup["category_id"] not in sample["category_ids"].tolist()
    for x0, _, x1, _ in sample["boxes"].tolist():
        assert x1 > 0 and x0 < 64  # every returned subject overlaps the crop
    kite = [60 * 0.8 - 8, 5 * 0.8, 90 * 0.8 - 8, 25 * 0.8]
    assert any(np.allclose(b, kite, atol=1e-4) for b in sample["boxes"].tolist())
    assert MSIDataset(out, resolution=64, total_epochs=1, fit="pad")[0]["num_subjects"] == 5


def test_determinism_and_epochs(tiny_build: Path) -> None:
    a = MSIDataset(tiny_build, resolution=32, total_epochs=10, seed=3)
    b = MSIDataset(tiny_build, resolution=32, total_epochs=10, seed=3)
    for epoch in (1, 5, 10):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for index in range(len(a)):
            sa, sb = a[index], b[index]
            for key, value in sa.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, sb[key]), key
                else:
                    assert value == sb[key], key
    subsets = {tuple(a.subject_indices(0, 1)) for _ in range(3)}
    assert len(subsets) == 1
    per_epoch = {tuple(a.subject_indices(i, e)) for i in range(len(a)) for e in (1, 2, 3)}
    assert len(per_epoch) > 1  # subsets are redrawn per (epoch, sample)
    assert a.sample(0, 10)["num_subjects"] == 5 and a.sample(0, 1)["num_subjects"] == 2


def test_collate_pads_variable_k(tiny_build: Path) -> None:
    ds = MSIDataset(tiny_build, resolution=32, total_epochs=10)
    batch = collate_msi([ds.sample(0, 1), ds.sample(1, 10), ds.sample(2, 4)])
    assert batch["references"].shape == (3, 5, 3, 32, 32)
    assert batch["subject_mask"].tolist() == [[True] * 2 + [False] * 3, [True] * 5, [True] * 3 + [False] * 2]
    assert batch["category_ids"][0, 2:].tolist() == [-1, -1, -1] and (batch["category_ids"][1] > 0).all()
    assert batch["z_ranks"][2, 3:].tolist() == [-1, -1]
    assert torch.all(batch["references"][0, 2:] == 0) and torch.all(batch["boxes"][0, 2:] == 0)
    assert batch["image"].shape == (3, 3, 32, 32) and batch["layout_index"].shape == (3, 32, 32)
    assert batch["num_subjects"].tolist() == [2, 5, 3] and len(batch["prompt"]) == 3
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_msi)
    assert [b["image"].shape[0] for b in loader] == [2, 1]


def test_real_mini_build_samples(mini_train_build: Path) -> None:
    ds = MSIDataset(mini_train_build, total_epochs=10)
    ds.set_epoch(10)
    sample = ds[0]
    assert sample["image"].shape == (3, 256, 256) and 0 <= sample["image"].min() and sample["image"].max() <= 1
    assert sample["num_subjects"] == 5
    assert set(sample["layout_index"].unique().tolist()) - {-1} <= set(range(5))
    manifest = [json.loads(line) for line in (mini_train_build / "manifest.jsonl").read_text().splitlines()]
    assert sample["image_id"] == manifest[0]["image_id"]
    assert set(sample["ann_ids"].tolist()) <= {s["ann_id"] for s in manifest[0]["subjects"]}


def test_bad_manifest_names_line_and_field(tiny_build: Path, tmp_path: Path) -> None:
    out = tmp_path / "broken"
    shutil.copytree(tiny_build, out)
    lines = (out / "manifest.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    del record["subjects"][2]["bbox"]
    lines[1] = json.dumps(record)
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"manifest.jsonl: line 2 subject 2 lacks field 'bbox'"):
        MSIDataset(out)
    with pytest.raises(ValueError, match="fit must be"):
        MSIDataset(tiny_build, fit="stretch")
    ds = MSIDataset(tiny_build, total_epochs=3)
    with pytest.raises(ValueError, match="epoch must be in 1..3"):
        ds.set_epoch(4)


def test_training_and_inference_cut_references_the_same_way(mini_train_build: Path, coco_root: Path) -> None:
    """A pool reference reaches the image encoder with the same pixels whether it comes through the training Dataset
    (pool cut-out saved by build-msi) or through ``msibench run`` (cut-out materialized from the manifest's COCO
    segmentation and crop, then ``prepare_reference``): both use one crop and one resampling."""
    from PIL import Image

    from mscustomnet.model.pipeline import prepare_reference
    from msibench.bench.prepare import cut_out
    from msibench.bench.quality import pixel_box

    ds = MSIDataset(mini_train_build, total_epochs=1, reference_resolution=256, reference_object_size=200)
    data = json.loads((coco_root / "annotations" / "instances_train2017.json").read_text())
    anns = {a["id"]: a for a in data["annotations"]}
    images = {im["id"]: im for im in data["images"]}
    checked = 0
    for index in range(4):
        sample = ds.sample(index, 1)
        for k, ref_id in enumerate(sample["reference_ids"].tolist()):
            ann = anns[ref_id]
            image = images[ann["image_id"]]
            with Image.open(coco_root / "train2017" / image["file_name"]) as photo:
                crop = pixel_box(ann["bbox"], image["width"], image["height"])
                ref, mask = cut_out(photo, ann["segmentation"], crop)
            subtracted = any(e["ann_id"] == ref_id and e["subtracted"] for e in json.loads(
                (mini_train_build / "pool.json").read_text())["categories"][str(ann["category_id"])])  # fmt: skip
            if subtracted:
                continue  # its manifest segmentation would be the cleaned mask; covered by the pool tests
            inference = np.asarray(prepare_reference(ref, mask, 256, 200, fit="upscale"))  # as MSCustomNetPipeline
            training = (sample["references"][k].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            assert np.array_equal(training, inference), (index, ref_id)
            checked += 1
    assert checked >= 10
