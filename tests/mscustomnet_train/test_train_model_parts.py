"""What the trainer relies on in the model and the data: the layout switch, gradient checkpointing, SDPA
attention, batch preparation, per-step seeds and the reference margin."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from PIL import Image

from mscustomnet.data.dataset import square_reference
from mscustomnet.model.config import tiny_config
from mscustomnet.model.network import CustomNetModel
from mscustomnet.model.pipeline import MSCustomNetPipeline, Subject
from mscustomnet.train.trainer import category_lookup, check_sdpa_attention, prepare_batch, step_seed


def _model(use_layout: bool = True, seed: int = 0) -> CustomNetModel:
    torch.manual_seed(seed)
    model = CustomNetModel(tiny_config())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # no zero-initialised layer may hide an input
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.config = replace(model.config, use_layout=use_layout)
    return model


def _batch(layout_seed: int) -> dict:
    g = torch.Generator().manual_seed(layout_seed)
    return {
        "image": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7)) * 2 - 1,
        "layout": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        "references": torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(8)) * 2 - 1,
        "text": ["a dog and a cat", "two cups"],
        "categories": torch.tensor([[0, 15, -1], [41, 41, 3]]),
        "subject_mask": torch.tensor([[True, True, False], [True, True, True]]),
    }


def _loss(model: CustomNetModel, batch: dict) -> float:
    return float(model.training_loss(batch, generator=torch.Generator().manual_seed(3)).loss.detach())


def test_without_layout_the_network_never_sees_the_layout():
    with_layout, blank = _model(True), _model(False)
    assert _loss(with_layout, _batch(1)) != _loss(with_layout, _batch(2))
    assert _loss(blank, _batch(1)) == _loss(blank, _batch(2))
    # ... and sees the white canvas: the same loss as an explicit white layout given to a layout model.
    white = {**_batch(1), "layout": torch.ones(2, 3, 32, 32)}
    assert _loss(blank, _batch(1)) == _loss(with_layout, white)


def test_pipeline_without_layout_ignores_where_the_boxes_are():
    ref = Image.fromarray(np.full((20, 20, 3), (200, 30, 30), dtype=np.uint8))

    def run(model: CustomNetModel, box: tuple[float, float, float, float]) -> np.ndarray:
        subjects = [[Subject(reference=ref, box=box, category_index=16)]]
        image = MSCustomNetPipeline(model.eval())(["a dog"], subjects, [0], steps=2, guidance=2.0, resolution=32)[0]
        return np.asarray(image)

    left, right = (0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)
    assert not np.array_equal(run(_model(True), left), run(_model(True), right))
    assert np.array_equal(run(_model(False), left), run(_model(False), right))


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = _model().train()
        if checkpointing:
            model.unet.enable_gradient_checkpointing()
        model.training_loss(_batch(1), generator=torch.Generator().manual_seed(3)).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 100
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_attention_goes_through_sdpa():
    model = _model()
    check_sdpa_attention(model)
    name = next(n for n in model.unet.attn_processors if n.endswith("attn1.processor"))
    model.unet.set_attn_processor({**model.unet.attn_processors, name: AttnProcessor()})
    with pytest.raises(RuntimeError, match="without scaled_dot_product_attention.*AttnProcessor"):
        check_sdpa_attention(model)


def test_prepare_batch_maps_ranges_and_categories():
    raw = {
        "image": torch.ones(1, 3, 4, 4),
        "layout_map": torch.zeros(1, 3, 4, 4),
        "references": torch.full((1, 2, 3, 4, 4), 0.5),
        "subject_mask": torch.tensor([[True, False]]),
        "category_ids": torch.tensor([[90, -1]]),  # COCO's last category id; padding
        "prompt": ["a toothbrush"],
    }
    batch = prepare_batch(raw, category_lookup(), torch.device("cpu"))
    assert batch["image"].max() == 1 and batch["layout"].min() == -1 and batch["references"].abs().max() == 0
    assert batch["categories"].tolist() == [[79, -1]] and batch["text"] == ["a toothbrush"]
    with pytest.raises(ValueError, match=r"category ids \[12\] include non-COCO ids"):
        prepare_batch({**raw, "category_ids": torch.tensor([[12, -1]])}, category_lookup(), torch.device("cpu"))


def test_step_seeds_differ_per_step_and_micro_batch():
    seeds = {step_seed(0, s, m) for s in range(50) for m in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert step_seed(0, 3, 1) == step_seed(0, 3, 1) != step_seed(1, 3, 1)


def test_reference_object_size_leaves_a_white_margin():
    rgb = np.zeros((30, 10, 3), dtype=np.uint8)
    mask = np.ones((30, 10), dtype=bool)
    full, full_mask = square_reference(rgb, mask, 64)
    framed, framed_mask = square_reference(rgb, mask, 64, object_size=50)
    assert np.ptp(np.nonzero(full_mask)[0]) + 1 == 64
    ys, xs = np.nonzero(framed_mask)
    assert (ys.min(), ys.max() + 1) == (7, 57)  # long edge 50, centred on 64
    assert (framed[:7] == 255).all() and (framed[57:] == 255).all() and framed[30, 32].max() < 60
    with pytest.raises(ValueError, match="object_size must be in 1..64"):
        square_reference(rgb, mask, 64, object_size=65)


@pytest.mark.parametrize(("resolution", "fit"), [(256, "pad"), (64, "pad"), (64, "crop")])
def test_sample_grid_layout_is_the_training_layout(msi_val, resolution, fit):
    """The sample grids hand the pipeline what msibench run hands it (cut-outs at original size, normalised boxes),
    and the pipeline's M_L is then the training sample's layout map, pixel for pixel."""
    from mscustomnet.data.dataset import MSIDataset
    from mscustomnet.model.pipeline import layout_map
    from mscustomnet.train.samples import scene_subjects

    ds = MSIDataset(msi_val, resolution=resolution, total_epochs=1, fit=fit)
    for index in range(len(ds)):
        training = (ds.sample(index, 1)["layout_map"].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        grid = np.asarray(layout_map(scene_subjects(ds, index, 1), resolution))
        assert np.array_equal(grid, training), index
        assert (training != 0).any(axis=-1).mean() > 0.05  # subjects fill their boxes, as in training
