"""Loading backbones offline: clear errors for missing weights, local files and env vars, preprocessing,
letterbox geometry and mask decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from msibench.scoring import backbones
from msibench.scoring.backbones import (
    CLIP_PREPROCESS,
    DINO_PREPROCESS,
    BackboneError,
    load_clip,
    load_dino,
    load_yolo,
)
from msibench.scoring.detect import Letterbox, _LazyMasks, letterbox


@pytest.fixture
def no_downloads(monkeypatch):
    """Fail loudly if anything tries to fetch weights."""
    import ultralytics.utils.downloads as downloads

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args} {kwargs}")

    original = downloads.attempt_download_asset

    def local_only(file, *args, **kwargs):
        from pathlib import Path

        if not Path(str(file)).is_file():
            refuse(file)
        return original(file, *args, **kwargs)

    monkeypatch.setattr(downloads, "safe_download", refuse)
    monkeypatch.setattr(downloads, "get_github_assets", refuse)
    monkeypatch.setattr(downloads, "attempt_download_asset", local_only)
    for var in (backbones.YOLO_ENV, backbones.DINO_ENV, backbones.CLIP_ENV):
        monkeypatch.delenv(var, raising=False)


def test_missing_yolo_weights_name_the_model_and_how_to_provide_them(no_downloads):
    with pytest.raises(BackboneError) as err:
        load_yolo("yolo11x-seg.pt")
    text = str(err.value)
    assert "yolo11x-seg.pt" in text and "MSIBENCH_YOLO_WEIGHTS" in text and "--detector" in text
    with pytest.raises(BackboneError, match="yolo11x.pt"):
        load_yolo("yolo11x.pt")


def test_yolo_checkpoint_found_through_env_folder(no_downloads, tmp_path, monkeypatch):
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    torch.manual_seed(0)
    model = DetectionModel(yaml_model_load("yolo11n.yaml"), nc=80, verbose=False)
    model.names = {i: name for i, (_, name) in enumerate(backbones.COCO_CATEGORIES)}
    torch.save({"model": model}, tmp_path / "yolo11n.pt")
    monkeypatch.setenv(backbones.YOLO_ENV, str(tmp_path))
    loaded = load_yolo("yolo11n.pt")
    assert loaded.weights == "yolo11n.pt" and "sha256:" in loaded.identity
    assert not loaded.has_masks
    assert loaded.class_ids[:3] == (1, 2, 3) and loaded.class_ids[-1] == 90  # COCO ids in YOLO class order
    # a checkpoint whose labels are not COCO-80 is refused
    model.names = {i: f"thing{i}" for i in range(80)}
    torch.save({"model": model}, tmp_path / "other.pt")
    with pytest.raises(BackboneError, match="not COCO-80"):
        load_yolo(str(tmp_path / "other.pt"))


def test_missing_dino_and_clip_weights_offline(no_downloads):
    with pytest.raises(BackboneError) as err:
        load_dino()
    text = str(err.value)
    assert "facebook/dino-vits16" in text and "MSIBENCH_DINO_WEIGHTS" in text and "--dino-weights" in text
    # which revision is missing, and where it was looked for (not a connection error: none is attempted)
    assert f"facebook/dino-vits16@{backbones.DINO_REVISION} is not in the local hub cache" in text
    assert "connect" not in text
    with pytest.raises(BackboneError, match="no such file"):
        load_dino("./nowhere/dino.safetensors")
    with pytest.raises(BackboneError) as err:
        load_clip("./nowhere/clip.bin")
    assert "MSIBENCH_CLIP_WEIGHTS" in str(err.value) and "--clip-weights" in str(err.value)


def test_dino_from_a_local_timm_file(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = timm.create_model(backbones.DINO_TIMM_ARCH, pretrained=False, num_classes=0).eval()
    save_file(source.state_dict(), tmp_path / "dino.safetensors")
    monkeypatch.setenv(backbones.DINO_ENV, str(tmp_path / "dino.safetensors"))
    encoder = load_dino()  # from the environment variable
    assert encoder.name.startswith("file:dino.safetensors:sha256:")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8))
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(source(DINO_PREPROCESS([image])), dim=-1).numpy()
    np.testing.assert_allclose(encoder.encode([image]), expected, atol=1e-5)


def test_preprocess_resizes_short_side_then_center_crops():
    image = Image.new("RGB", (400, 200), (255, 0, 0))
    x = DINO_PREPROCESS([image, image.rotate(90, expand=True)])
    assert x.shape == (2, 3, 224, 224)
    # pure red after ImageNet normalization: (1 - 0.485) / 0.229 in the red channel
    assert float(x[0, 0, 100, 100]) == pytest.approx((1 - 0.485) / 0.229, abs=1e-4)
    assert DINO_PREPROCESS.resize_crop(image).size == (224, 224)
    assert DINO_PREPROCESS.version != CLIP_PREPROCESS.version
    assert "short256-bicubic-center224" in DINO_PREPROCESS.version


def test_letterbox_maps_boxes_back_to_the_image():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    arr, geom = letterbox(image, 64)
    # scale 0.32: content 64 x 32, padded 16 rows above and below
    assert geom == Letterbox(size=64, image_size=(200, 100), content=(64, 32), left=0, top=16)
    assert arr.shape == (64, 64, 3) and arr[0, 0, 0] == 114 and arr[30, 30, 0] == 0
    back = geom.to_image(np.array([[0.0, 16.0, 64.0, 48.0], [32.0, 0.0, 48.0, 32.0]]))
    np.testing.assert_allclose(back, [[0, 0, 200, 100], [100, 0, 150, 50]])


def test_lazy_mask_decodes_prototypes_into_image_pixels():
    # one prototype, positive on prototype rows 4..7 (of 16), for a 64-px input holding a 64 x 64 image
    protos = -torch.ones(1, 16, 16)
    protos[0, 4:8, :] = 1.0
    geom = Letterbox(size=64, image_size=(64, 64), content=(64, 64), left=0, top=0)
    boxes = np.array([[0.0, 0.0, 64.0, 64.0], [0.0, 0.0, 32.0, 64.0]])
    masks = _LazyMasks(protos, torch.ones(2, 1), boxes, geom)
    full = masks(0)
    assert full.shape == (64, 64)
    rows = np.flatnonzero(full.any(axis=1))
    assert rows.min() == 16 and rows.max() == 31  # prototype rows 4..7 x 4
    half = masks(1)  # the same mask cropped to its box (left half)
    assert half[:, 32:].sum() == 0 and half[:, :32].sum() == full[:, :32].sum()


def test_lazy_mask_undoes_the_letterbox_of_a_non_square_image():
    # a 200 x 100 image in a 64-px input: content 64 x 32, 16 grey rows above and below (4 prototype rows each);
    # the prototype is positive on prototype rows 4..7 = input rows 16..31 = the image's top half (rows 0..49)
    protos = -torch.ones(1, 16, 16)
    protos[0, 4:8, :] = 1.0
    _, geom = letterbox(Image.new("RGB", (200, 100)), 64)
    masks = _LazyMasks(protos, torch.ones(1, 1), np.array([[0.0, 0.0, 200.0, 100.0]]), geom)
    mask = masks(0)
    assert mask.shape == (100, 200)
    assert mask[:50].all() and not mask[50:].any()


def test_dino_refuses_a_backbone_that_is_not_vit_s16(dinov2_dir, no_downloads):
    # the offline DINOv2 folder must never be reported as DINO-I
    with pytest.raises(BackboneError, match=r"expected \('vit', 16, 384\)"):
        load_dino(str(dinov2_dir))


@pytest.mark.slow
def test_clip_from_a_local_file_and_offline_default(tmp_path, no_downloads):
    import open_clip

    torch.manual_seed(5)
    source = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).eval()
    torch.save(source.state_dict(), tmp_path / "clip.bin")
    clip = load_clip(str(tmp_path / "clip.bin"))
    assert "sha256:" in clip.identity
    image = Image.new("RGB", (120, 90), (10, 200, 30))
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(source.encode_image(CLIP_PREPROCESS([image])), dim=-1).numpy()
    np.testing.assert_allclose(clip.image.encode([image]), expected, atol=1e-5)
    with pytest.raises(BackboneError) as err:
        load_clip()
    assert "'openai'" in str(err.value) and "MSIBENCH_CLIP_WEIGHTS" in str(err.value)


def test_dino_folder_identity_is_its_content_not_its_location(tmp_path, no_downloads):
    # a tiny ViT with DINO ViT-S/16's shape (patch 16, width 384), saved twice at two paths, then changed
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=384, num_hidden_layers=1, num_attention_heads=6, intermediate_size=32, image_size=32, patch_size=16
    )
    torch.manual_seed(0)
    model = ViTModel(config, add_pooling_layer=False)
    for name in ("a", "b"):
        model.save_pretrained(tmp_path / name)
    a, b = load_dino(str(tmp_path / "a")), load_dino(str(tmp_path / "b"))
    assert a.identity == b.identity and str(tmp_path) not in a.identity
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(tmp_path / "b")
    assert load_dino(str(tmp_path / "b")).identity != a.identity


def test_scoring_never_downloads_and_names_every_missing_weight_at_once(monkeypatch, tmp_path):
    """Online (offline mode off), with nothing cached: one error naming the detector, DINO and CLIP, and not a
    single network connection attempted."""
    import socket

    from huggingface_hub import constants

    from msibench.scoring import backbones
    from msibench.scoring.scorer import Scorer, ScorerConfig

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for var in (backbones.YOLO_ENV, backbones.DINO_ENV, backbones.CLIP_ENV):
        monkeypatch.delenv(var, raising=False)
    attempts = []

    def no_network(self, address, *args):
        attempts.append(address)
        raise OSError(f"test: network access to {address} refused")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    with pytest.raises(backbones.BackboneError) as err:
        Scorer(ScorerConfig()).setup()
    text = str(err.value)
    assert text.startswith("3 scoring backbone(s) cannot be loaded offline")
    assert "yolo11x-seg.pt" in text and "facebook/dino-vits16" in text and "ViT-B-32" in text
    assert "msibench weights fetch --scorers" in text
    assert attempts == []


def test_default_dino_and_clip_load_from_their_pinned_snapshots_and_name_them(tmp_path, monkeypatch, no_downloads):
    """The defaults are read from the hub-cache snapshot of their pinned commit (where `msibench weights fetch`
    puts them), and the commit is part of the backbone's identity (scorer version, feature-cache keys)."""
    import open_clip
    from huggingface_hub import constants
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTModel

    from msibench.scoring import backbones

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    dino_dir = cache / "models--facebook--dino-vits16" / "snapshots" / backbones.DINO_REVISION
    config = ViTConfig(hidden_size=384, num_hidden_layers=1, num_attention_heads=6, intermediate_size=32,
                       image_size=32, patch_size=16)  # fmt: skip
    torch.manual_seed(0)
    ViTModel(config, add_pooling_layer=False).save_pretrained(dino_dir)
    clip_dir = cache / f"models--{backbones.CLIP_HUB_ID.replace('/', '--')}" / "snapshots" / backbones.CLIP_REVISION
    clip_dir.mkdir(parents=True)
    source = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, clip_dir / backbones.CLIP_FILE)
    dino, clip = load_dino(), load_clip()
    assert dino.name == f"hf:facebook/dino-vits16@{backbones.DINO_REVISION}"
    assert clip.identity.startswith(f"open_clip:ViT-B-32-quickgelu:openai@{backbones.CLIP_REVISION}|")
