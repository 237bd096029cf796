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


def test_masked_mse_averages_over_the_mask_only():
    from mscustomnet.model.network import masked_mse

    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6] = 1
    loss = masked_mse(pred, target, mask)
    torch.testing.assert_close(loss, (pred - target)[:, :, 2:6].square().mean(dim=(1, 2, 3)))
    shifted = pred.clone()
    shifted[:, :, :2] += 100.0  # masked cells
    torch.testing.assert_close(masked_mse(shifted, target, mask), loss)
    assert torch.equal(masked_mse(pred, target), (pred - target).square().mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match=r"loss_mask must be \[B, 1, h, w\] = \[2, 1, 8, 8\]"):
        masked_mse(pred, target, torch.ones(2, 1, 4, 4))


def _padded_sample(msi_val, fit: str = "pad"):
    from mscustomnet.data.dataset import MSIDataset, collate_msi

    ds = MSIDataset(msi_val, resolution=64, reference_resolution=32, total_epochs=1, fit=fit)
    index = next(i for i in range(len(ds)) if ds.scenes[i]["width"] != ds.scenes[i]["height"])
    return collate_msi([ds.sample(index, 1)])


def test_the_loss_mask_is_the_photo_at_latent_resolution(msi_val):
    raw = _padded_sample(msi_val)
    content = raw["content_mask"][0, 0]
    image = raw["image"][0]
    # content_mask marks exactly the letterbox: black padding outside, the photo inside.
    assert (image[:, content == 0] == 0).all() and 0.1 < (content == 0).float().mean() < 0.5
    batch = prepare_batch(raw, category_lookup(), torch.device("cpu"), loss_mask_factor=8)
    mask = batch["loss_mask"][0, 0]
    assert mask.shape == (8, 8)
    rows = content.reshape(8, 8, 64).amax(dim=(1, 2))  # does a latent row of cells hold any photo pixel?
    cols = content.reshape(64, 8, 8).amax(dim=(0, 2))
    assert torch.equal(mask, torch.outer(rows, cols)) and 0 < mask.sum() < 64
    assert "loss_mask" not in prepare_batch(raw, category_lookup(), torch.device("cpu"))
    crop = _padded_sample(msi_val, fit="crop")
    assert (crop["content_mask"] == 1).all()  # fit: crop has no padding to mask


def test_padding_does_not_change_the_loss(msi_val, monkeypatch):
    """With the mask, what the latent cells of the letterbox hold (and so what the model predicts there) does not
    enter the loss; without it, it does. A pointwise noise predictor isolates the loss from the UNet's receptive
    field."""
    raw = _padded_sample(msi_val)
    batch = prepare_batch(raw, category_lookup(), torch.device("cpu"), loss_mask_factor=8)
    padding = batch["loss_mask"] == 0
    model = _model()
    monkeypatch.setattr(model, "predict_noise", lambda noisy, *args, **kwargs: 0.5 * noisy)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    garbage = torch.where(padding, torch.full_like(latents, 7.0), latents)

    def loss(lat: torch.Tensor, masked: bool) -> torch.Tensor:
        b = {**batch, "latents": lat}
        if not masked:
            b.pop("loss_mask")
        return model.training_loss(b, generator=torch.Generator().manual_seed(3)).loss.detach()

    assert torch.equal(loss(latents, True), loss(garbage, True))
    assert not torch.equal(loss(latents, False), loss(garbage, False))


def test_loss_mask_padding_is_a_config_option(msi_val, tiny_customnet_dir):
    from train_helpers import tiny_train_config

    from mscustomnet.train.distributed import DistEnv
    from mscustomnet.train.trainer import TrainStep

    model = _model()
    masked = TrainStep(model, tiny_train_config(msi_val, tiny_customnet_dir), torch.device("cpu"), DistEnv(), 2)
    assert masked.loss_mask_factor == model.config.vae.scale_factor  # the default
    plain_config = tiny_train_config(msi_val, tiny_customnet_dir, train={"loss_mask_padding": False})
    assert TrainStep(model, plain_config, torch.device("cpu"), DistEnv(), 2).loss_mask_factor is None
