from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention

from mscustomnet.model.config import ModelConfig, customnet_config, mscustomnet_config, tiny_config
from mscustomnet.model.network import CustomNetModel, tokenize, viewpoint_vector
from mscustomnet.model.unet import DualCrossAttnProcessor, dual_processors


def _batch(b: int = 2, k: int = 3, res: int = 32, ref: int = 40, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(b, 3, res, res, generator=g) * 2 - 1,
        "layout": torch.rand(b, 3, res, res, generator=g) * 2 - 1,
        "references": torch.rand(b, k, 3, ref, ref, generator=g) * 2 - 1,
        "text": ["a dog on the grass", "a cat"][:b] + ["x"] * max(0, b - 2),
        "categories": torch.randint(0, 80, (b, k), generator=g),
        "subject_mask": torch.ones(b, k, dtype=torch.bool),
    }


def test_shapes_through_the_whole_model_and_gradients_reach_only_trained_parts(tiny_ms):
    model = tiny_ms.train()
    batch = _batch()
    batch["subject_mask"][0, 2] = False
    batch["categories"][0, 2] = -1
    out = model.training_loss(batch, generator=torch.Generator().manual_seed(0))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.loss_per_sample.shape == (2,) and out.timesteps.shape == (2,)
    out.loss.backward()
    groups = model.parameter_groups()
    assert len(groups["text_attention"]) == 2 * len(dual_processors(model.unet))
    for name, params in groups.items():
        assert params and all(p.grad is not None for p in params), name
    assert model.category_encoder.weight.grad.abs().sum() > 0
    for frozen in model.frozen_modules():
        assert not frozen.training
        assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())
    n_trained = sum(len(v) for v in groups.values())
    assert n_trained == sum(1 for p in model.parameters() if p.requires_grad)


def test_encoders_and_unet_shapes(tiny_ms):
    model = tiny_ms
    cfg = model.config
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = model.encode_latents(images, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 8, 8)
    assert model.encode_layout(images).shape == (2, 4, 8, 8)
    assert model.decode_latents(latents).shape == (2, 3, 32, 32)
    assert model.encode_images(torch.rand(5, 3, 50, 70)).shape == (5, cfg.image_encoder.projection_dim)
    text = model.encode_text(["a", "b c"])
    assert text.shape == (2, 77, cfg.text_encoder.hidden_size)
    tokens = model.subject_tokens(torch.randn(2, 4, 24), None, torch.randint(0, 80, (2, 4)))
    assert tokens.shape == (2, 4, cfg.unet.cross_attention_dim)
    eps = model.predict_noise(latents, torch.tensor([10, 900]), latents, tokens, text, torch.ones(2, 4, dtype=bool))
    assert eps.shape == (2, 4, 8, 8)


def test_category_indices_are_checked(tiny_ms, tiny_customnet):
    with pytest.raises(ValueError, match="0..79"):
        tiny_ms.subject_tokens(torch.randn(1, 1, 24), None, torch.tensor([[80]]))
    with pytest.raises(ValueError, match="needs subject categories"):
        tiny_ms.subject_tokens(torch.randn(1, 1, 24))
    with pytest.raises(ValueError, match="takes no categories"):
        tiny_customnet.subject_tokens(torch.randn(1, 1, 24), None, torch.tensor([[3]]))


def test_fproj_at_init_reproduces_customnet(tiny_customnet):
    customnet = tiny_customnet
    ms = CustomNetModel.from_customnet(customnet, category_dim=16, seed=5).eval()
    assert ms.config.multi_subject and ms.config.num_categories == 80
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(3, 2, 24, generator=g)
    views = torch.randn(3, 2, 4, generator=g)
    cats = torch.randint(0, 80, (3, 2), generator=g)
    assert ms.category_encoder.weight.abs().sum() > 0  # Phi_c is not zero, its columns in F_proj are
    assert torch.equal(ms.subject_tokens(embeds, views, cats), customnet.subject_tokens(embeds, views))
    # Hence the whole network predicts CustomNet's noise at step 0, for one subject or several.
    z = torch.randn(3, 4, 8, 8, generator=g)
    text = customnet.encode_text(["a", "b", "c"])
    t = torch.tensor([5, 500, 995])
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    ours = ms.predict_noise(z, t, z, ms.subject_tokens(embeds, views, cats), text, mask)
    theirs = customnet.predict_noise(z, t, z, customnet.subject_tokens(embeds, views), text, mask)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # ...and training then moves Phi_c and the new F_proj columns.
    batch = _batch(b=2, k=2)
    ms.train().training_loss(batch, generator=torch.Generator().manual_seed(1)).loss.backward()
    assert ms.projection.weight.grad[:, 28:].abs().sum() > 0


def test_from_customnet_refuses_a_multi_subject_source(tiny_ms):
    with pytest.raises(ValueError):
        CustomNetModel.from_customnet(tiny_ms)


def test_padding_and_dropped_subjects_contribute_nothing(tiny_ms, tiny_customnet):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    text = tiny_ms.encode_text(["a", "b"])
    tokens = torch.randn(2, 3, 32, generator=g)
    one = tiny_ms.predict_noise(z, t, z, tokens[:, :1], text, torch.ones(2, 1, dtype=torch.bool))
    padded = tiny_ms.predict_noise(
        z, t, z, torch.cat([tokens[:, :1], 50 * tokens[:, 1:]], 1), text, torch.tensor([[1, 0, 0], [1, 0, 0]]).bool()
    )
    torch.testing.assert_close(one, padded, rtol=0, atol=1e-5)
    # All subjects masked == CustomNet's unconditional zero image token (its branch output is exactly 0).
    none = tiny_customnet.predict_noise(z, t, z, tokens[:, :1], text, torch.zeros(2, 1, dtype=torch.bool))
    zero = tiny_customnet.predict_noise(z, t, z, torch.zeros_like(tokens[:, :1]), text, None)
    torch.testing.assert_close(none, zero, rtol=0, atol=1e-5)
    assert not torch.allclose(none, tiny_customnet.predict_noise(z, t, z, tokens[:, :1], text, None), atol=1e-3)


def test_dual_cross_attention_is_customnets_formula():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)
    proc = DualCrossAttnProcessor(16, 12, text_length=5, text_scale=1.0)
    with torch.no_grad():
        for p in list(attn.parameters()) + list(proc.parameters()):
            p.normal_()
    attn.set_processor(proc)
    x = torch.randn(2, 7, 16)
    subjects, text = torch.randn(2, 3, 12), torch.randn(2, 5, 12)
    out = attn(x, encoder_hidden_states=torch.cat([subjects, text], 1))

    def heads(t):
        return t.view(2, -1, 2, 8).transpose(1, 2)

    def softmax_attn(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v

    q = heads(attn.to_q(x))
    img = softmax_attn(q, heads(attn.to_k(subjects)), heads(attn.to_v(subjects)))
    txt = softmax_attn(q, heads(proc.to_k_text(text)), heads(proc.to_v_text(text)))
    expected = attn.to_out[0]((img + txt).transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_condition_dropout_follows_customnets_rates(tiny_ms):
    batch = _batch(b=4, k=2)
    other = dict(batch, references=torch.rand(4, 2, 3, 40, 40) * 2 - 1)

    def loss(model, b):
        return model.training_loss(b, generator=torch.Generator().manual_seed(7)).loss_per_sample

    # u = 0.5: r < 2u always, so every sample trains without its subjects and the references do not matter.
    dropping = CustomNetModel.empty(ModelConfig.from_dict({**tiny_ms.config.to_dict(), "uncond_rate": 0.5}))
    dropping.load_weights(tiny_ms.state_dict())
    torch.testing.assert_close(loss(dropping, batch), loss(dropping, other), rtol=0, atol=0)
    # u = 0: never dropped, the references change every sample's loss.
    keeping = CustomNetModel.empty(ModelConfig.from_dict({**tiny_ms.config.to_dict(), "uncond_rate": 0.0}))
    keeping.load_weights(tiny_ms.state_dict())
    assert (loss(keeping, batch) != loss(keeping, other)).all()


def _with(model, **fields):
    changed = CustomNetModel.empty(ModelConfig.from_dict({**model.config.to_dict(), **fields}))
    changed.load_weights(model.state_dict())
    return changed


@pytest.mark.parametrize("name", ["customnet", "mscustomnet"])
def test_a_dropped_image_gives_customnets_null_token_not_a_masked_subject(tiny_customnet, tiny_ms, name, monkeypatch):
    """TencentARC/CustomNet@23a378f ldm/models/diffusion/ddpm.py:744-757 (get_input): prompt_mask = r < 2u replaces
    the CLIP image embedding by null_prompt = FrozenCLIPImageEmbedder([""]) = zeros (encoders/modules.py:99-102)
    BEFORE cc_projection, so the dropped token is cc_projection([0; T]) (bias and viewpoint: non-zero) and stays in
    the cross-attention; text_only multiplies the projected token by (1 - text_only)."""
    import torch.nn.functional as F

    base = tiny_customnet if name == "customnet" else tiny_ms
    model = _with(base, uncond_rate=0.5, text_drop=0.0)  # r < 1 = 2u: every image dropped
    seen = {}

    def spy(noisy, timesteps, layout_latents, tokens, text_embeds, subject_mask):
        seen.update(tokens=tokens, mask=subject_mask)
        return torch.zeros_like(noisy)

    monkeypatch.setattr(model, "predict_noise", spy)
    k, dim = 2, model.config.image_encoder.projection_dim
    views = torch.tensor([[0.3, 0.5, 0.8, 0.0], [-0.2, 0.0, 1.0, 0.0]]).expand(3, k, 4)
    batch = {
        "latents": torch.randn(3, 4, 8, 8),
        "layout_latents": torch.randn(3, 4, 8, 8),
        "image_embeds": torch.randn(3, k, dim),
        "text_embeds": model.encode_text(["a", "b", "c"]),
        "viewpoints": views,
        "text_only": torch.tensor([0.0, 1.0, 0.0]),
    }
    if model.config.multi_subject:
        batch["categories"] = torch.tensor([[3, 7], [1, 2], [5, 5]])
    model.training_loss(batch, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parts = [torch.zeros(3, k, dim), views]
        if model.config.multi_subject:
            parts.append(model.embed_categories(batch["categories"]))
        expected = F.linear(torch.cat(parts, -1), model.projection.weight, model.projection.bias)
        expected[1] = 0.0  # text_only
        torch.testing.assert_close(seen["tokens"].detach(), expected)
    assert bool(seen["mask"].all())  # the null tokens are attended to, not masked away
    assert float(expected[0].abs().min()) > 0


def test_training_loss_accepts_precomputed_encodings(tiny_ms):
    batch = _batch(b=2, k=2)
    gen = torch.Generator().manual_seed(3)
    cached = {
        "latents": tiny_ms.encode_latents(batch["image"], generator=torch.Generator().manual_seed(9)),
        "layout_latents": tiny_ms.encode_layout(batch["layout"]),
        "image_embeds": tiny_ms.encode_images(batch["references"].flatten(0, 1)).view(2, 2, -1),
        "text_embeds": tiny_ms.encode_text(batch["text"]),
        "categories": batch["categories"],
    }
    a = tiny_ms.training_loss(cached, generator=gen).loss
    b = tiny_ms.training_loss(cached, generator=torch.Generator().manual_seed(3)).loss
    assert torch.isfinite(a) and a == b
    with pytest.raises(KeyError, match="'text'"):
        tiny_ms.training_loss({k: v for k, v in cached.items() if k != "text_embeds"})


def test_schedule_is_customnets():
    model = CustomNetModel.empty(customnet_config())
    a = model.alphas_cumprod("cpu")
    betas = 1 - a / torch.cat([torch.ones(1), a[:-1]])
    assert a.shape == (1000,)
    assert math.isclose(float(betas[0]), 0.00085, rel_tol=1e-4)
    assert math.isclose(float(betas[-1]), 0.012, rel_tol=1e-4)
    # "linear" in LDM is linear in sqrt(beta).
    assert math.isclose(
        float(betas[500].sqrt()), (0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * 500 / 999), rel_tol=1e-3
    )


def test_tokenize_pads_with_end_of_text():
    ids = tokenize(["a photo of a dog", "word " * 100])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == 49406 and ids[0, 1:6].tolist() == [320, 1125, 539, 320, 1929]
    assert (ids[0, 6:] == 49407).all()
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407 and (ids[1, 1:-1] != 49407).all()


def test_viewpoint_and_configs():
    assert viewpoint_vector() == [0.0, 0.0, 1.0, 0.0]
    assert viewpoint_vector(30, 90)[:3] == pytest.approx([math.pi / 6, 1.0, 0.0], abs=1e-12)
    full = mscustomnet_config()
    assert full.projection_in_features == 768 + 4 + 768
    assert ModelConfig.from_dict(full.to_dict()) == full
    assert ModelConfig.from_dict(tiny_config().to_dict()) == tiny_config()
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**full.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="category_dim"):
        ModelConfig(num_categories=80, category_dim=0)


def test_full_size_parameter_count_is_customnets():
    model = CustomNetModel.empty(customnet_config())
    count = {name: sum(p.numel() for p in getattr(model, name).parameters())
             for name in ("unet", "vae", "text_encoder", "projection")}  # fmt: skip
    # Figures of ../shared/data/checkpoint-keys/README.md (text tower without its position_ids buffer).
    assert count == {"unet": 878_701_764, "vae": 83_653_863, "text_encoder": 123_060_480, "projection": 593_664}
