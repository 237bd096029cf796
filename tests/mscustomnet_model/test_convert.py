from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from open_clip.model import QuickGELU
from open_clip.transformer import VisionTransformer

from mscustomnet.model.config import customnet_config, mscustomnet_config, tiny_config
from mscustomnet.model.convert import (
    IGNORED_KEYS,
    ConversionError,
    conversion_rules,
    convert_customnet,
    convert_customnet_command,
    convert_customnet_state_dict,
    export_customnet_state_dict,
)
from mscustomnet.model.io import load_model
from mscustomnet.model.network import CustomNetModel


def _meta_checkpoint(keys):
    return {k: torch.empty(shape, device="meta") for k, shape in keys.items()}


def test_every_official_key_is_mapped_or_ignored(customnet_keys):
    assert len(customnet_keys) == 1479
    config = customnet_config()
    model = CustomNetModel.empty(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = convert_customnet_state_dict(_meta_checkpoint(customnet_keys), ours, config)

    # Every tensor of ours receives a value of the right shape...
    assert set(converted) == set(ours)
    assert all(tuple(converted[k].shape) == ours[k] for k in ours)
    # ...every official key is the source of some tensor or on the ignore list, and the list holds no stale names.
    sources = {r.source for r in conversion_rules(list(ours), config)}
    assert set(IGNORED_KEYS) <= set(customnet_keys)
    assert sources.isdisjoint(IGNORED_KEYS)
    assert sources | set(IGNORED_KEYS) == set(customnet_keys)
    assert len(IGNORED_KEYS) == 12 + 6 + 1
    # The 32 CustomNet text k/v land on our processors; in_proj feeds q, k and v of all 24 image-tower layers.
    text_kv = [k for k in ours if "processor.to_k_text" in k or "processor.to_v_text" in k]
    assert len(text_kv) == 32
    chunked = [r for r in conversion_rules(list(ours), config) if r.transform.startswith("chunk")]
    assert len(chunked) == 24 * 6
    # Strict load: nothing of ours is left uninitialised.
    model.load_weights(converted)


def test_unaccounted_missing_and_misshapen_keys_are_named(customnet_keys):
    config = customnet_config()
    shapes = {k: tuple(v.shape) for k, v in CustomNetModel.empty(config).state_dict().items()}
    ckpt = _meta_checkpoint(customnet_keys)
    with pytest.raises(ConversionError, match="model.diffusion_model.extra_thing"):
        convert_customnet_state_dict({**ckpt, "model.diffusion_model.extra_thing": torch.empty(1)}, shapes, config)
    without = dict(ckpt)
    del without["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k_text.weight"]
    with pytest.raises(ConversionError, match=r"attn2\.to_k_text"):
        convert_customnet_state_dict(without, shapes, config)
    wrong = dict(ckpt)
    wrong["cc_projection.weight"] = torch.empty(768, 771, device="meta")
    with pytest.raises(ConversionError, match="cc_projection.weight"):
        convert_customnet_state_dict(wrong, shapes, config)
    # position_ids is optional (absent from checkpoints saved with transformers >= 4.31).
    optional = dict(ckpt)
    del optional["text_encoder.transformer.text_model.embeddings.position_ids"]
    assert len(convert_customnet_state_dict(optional, shapes, config)) == len(shapes)
    with pytest.raises(ConversionError, match="category encoder"):
        convert_customnet_state_dict(ckpt, shapes, mscustomnet_config())


def _schedule_buffers(config) -> dict[str, torch.Tensor]:
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, 1000, dtype=torch.float64) ** 2
    buffers = {name: torch.zeros(1000) for name in IGNORED_KEYS if "." not in name}
    buffers["betas"] = betas.float()
    return buffers


def _official_tiny_checkpoint(source: CustomNetModel, visual: VisionTransformer) -> dict[str, torch.Tensor]:
    """A tiny checkpoint in the official layout: UNet/VAE/projection/text from ``source`` (exported), and the image
    tower from an independent OpenAI-layout implementation (open_clip's VisionTransformer)."""
    config = source.config
    ours = {k: v for k, v in source.state_dict().items() if not k.startswith("image_encoder.")}
    partial = {}
    rules = [
        r for r in conversion_rules(list(source.state_dict()), config) if not r.target.startswith("image_encoder")
    ]
    grouped = {r.source: r for r in rules}
    assert len(grouped) == len(rules)
    for rule in rules:
        tensor = ours[rule.target]
        partial[rule.source] = tensor.reshape(*tensor.shape, 1, 1) if rule.transform == "squeeze_1x1" else tensor
    ckpt = dict(partial)
    ckpt.update({f"cond_stage_model.model.visual.{k}": v for k, v in visual.state_dict().items()})
    ckpt.update(_schedule_buffers(config))
    for name in IGNORED_KEYS:
        if name.startswith("cond_stage_model."):
            ckpt[name] = torch.zeros(3)
    return ckpt


def test_tiny_official_checkpoint_converts_and_reproduces_its_sources(tiny_customnet, tmp_path, randomize):
    config = tiny_customnet.config
    img = config.image_encoder
    torch.manual_seed(3)
    visual = VisionTransformer(
        image_size=img.image_size,
        patch_size=img.patch_size,
        width=img.hidden_size,
        layers=img.num_hidden_layers,
        heads=img.num_attention_heads,
        mlp_ratio=img.intermediate_size / img.hidden_size,
        output_dim=img.projection_dim,
        act_layer=QuickGELU,
    )
    randomize(visual, seed=4, scale=0.1).eval()
    ckpt = _official_tiny_checkpoint(tiny_customnet, visual)
    ckpt_path = tmp_path / "customnet_tiny.pt"
    torch.save(ckpt, ckpt_path)

    out = convert_customnet(ckpt_path, tmp_path / "converted", config=config)
    loaded = load_model(out)
    # The image tower (q/k/v split of in_proj, transposed proj, ln names) computes what the OpenAI layout computes.
    pixels = torch.rand(2, 3, img.image_size, img.image_size)
    expected = visual(pixels)
    got = loaded.image_encoder(pixel_values=pixels).image_embeds
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # Everything else comes back bit-identical.
    for key, value in tiny_customnet.state_dict().items():
        if not key.startswith("image_encoder."):
            assert torch.equal(loaded.state_dict()[key], value), key


def test_unet_and_vae_names_agree_with_diffusers_own_ldm_conversion(tiny_customnet):
    """diffusers' single-file loader, an independent LDM -> diffusers mapping, reads our exported names back into
    the same tensors; it carries CustomNet's attn2.to_{k,v}_text along, which we keep on the processor."""
    config = tiny_customnet.config
    exported = export_customnet_state_dict(tiny_customnet.state_dict(), config)
    unet_cfg = dict(tiny_customnet.unet.config)
    theirs = convert_ldm_unet_checkpoint(exported, unet_cfg)
    theirs = {
        k.replace("attn2.to_k_text", "attn2.processor.to_k_text").replace(
            "attn2.to_v_text", "attn2.processor.to_v_text"
        ): v
        for k, v in theirs.items()
    }
    ours = tiny_customnet.unet.state_dict()
    assert set(theirs) == set(ours)
    for key in ours:
        assert torch.equal(theirs[key], ours[key]), key
    vae_ldm = {
        k.removeprefix("first_stage_model."): v for k, v in exported.items() if k.startswith("first_stage_model.")
    }
    theirs = convert_ldm_vae_checkpoint(vae_ldm, dict(tiny_customnet.vae.config))
    ours = tiny_customnet.vae.state_dict()
    assert set(theirs) == set(ours)
    for key in ours:
        assert torch.equal(theirs[key].reshape(ours[key].shape), ours[key]), key


def test_full_size_unet_names_agree_with_diffusers(customnet_keys):
    config = customnet_config()
    model = CustomNetModel.empty(config)
    rules = {r.target: r.source for r in conversion_rules(list(model.state_dict()), config)}
    # Feed diffusers the official UNet keys (meta tensors) and compare, for each of our tensors, which official key
    # it was taken from.
    unet_ckpt = {
        k: torch.empty(s, device="meta") for k, s in customnet_keys.items() if k.startswith("model.diffusion")
    }
    theirs = convert_ldm_unet_checkpoint(unet_ckpt, dict(model.unet.config))
    reverse = {id(v): k for k, v in unet_ckpt.items()}
    assert len(theirs) == 686 + 32
    for key, tensor in theirs.items():
        ours = "unet." + key.replace("attn2.to_k_text", "attn2.processor.to_k_text").replace(
            "attn2.to_v_text", "attn2.processor.to_v_text"
        )
        assert rules[ours] == reverse[id(tensor)], key


def test_convert_command_reports_a_missing_file(tmp_path):
    result = CliRunner().invoke(convert_customnet_command, [str(tmp_path / "nope.pt"), str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "nope.pt" in result.output


def test_convert_command_refuses_a_checkpoint_of_another_model(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model.diffusion_model.foo": torch.zeros(1)}, path)
    result = CliRunner().invoke(convert_customnet_command, [str(path), str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "model.diffusion_model.foo" in result.output
    assert not (tmp_path / "out" / "config.json").exists()


def test_tiny_config_is_not_accepted_as_multi_subject_source():
    with pytest.raises(ConversionError):
        conversion_rules(["unet.conv_in.weight"], tiny_config(multi_subject=True))
