"""Stand-ins for files that normally come from the hub, for the tests and ``benchmarks/bench_gpu.py`` (which run
without it): built in code, loaded by the same code paths as the real files.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


def bpe_clip_tokenizer(folder: Path, words: Iterable[str]) -> Any:
    """A real ``transformers.CLIPTokenizer`` whose BPE merges spell out ``words`` (lowercase a-z0-9), each word one
    token; ``vocab.json`` and ``merges.txt`` are written to ``folder``. Prompts are padded to 77 tokens either way,
    so its cost is the real tokenizer's."""
    import json

    from transformers import CLIPTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = ["<|startoftext|>", "<|endoftext|>"]
    vocab += list(chars) + [c + "</w>" for c in chars] + [p for c in ",.'-!" for p in (c, c + "</w>")]
    merges: list[tuple[str, str]] = []
    known = set(vocab)
    for word in sorted(set(words)):
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            if merged not in known:
                known.add(merged)
                vocab.append(merged)
            pieces = [merged, *pieces[2:]]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_uno_folders(
    root: Path, *, seed: int = 0, lora_rank: int = 4, size: str = "tiny", transformer: dict[str, Any] | None = None
) -> dict[str, Path]:
    """UNO's four hub repositories as local folders, with random weights in each file's official layout:
    ``flux/`` (``flux1-dev.safetensors``, ``ae.safetensors``), ``uno/`` (``dit_lora.safetensors``), ``t5/`` and
    ``clip/`` (``save_pretrained`` folders with their tokenizers). ``size="real"`` writes the real FLUX.1-dev
    transformer and autoencoder shapes (24 GB in bfloat16) but keeps the text encoders tiny-width; ``transformer``
    replaces the tiny transformer config."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

    from baselines import uno_modules as m

    root = Path(root)
    gen = torch.Generator().manual_seed(seed)
    real = size == "real"
    config = transformer or (m.FLUX_DEV_TRANSFORMER if real else m.tiny_transformer_config())
    dtype = torch.bfloat16 if real else torch.float32

    def random(shapes: dict[str, tuple[int, ...]], scale: float) -> dict[str, Any]:
        out = {}
        for key, shape in shapes.items():
            fan_in = shape[-1] if len(shape) > 1 else 1
            std = scale / fan_in**0.5 if len(shape) > 1 else 0.1
            value = torch.randn(shape, generator=gen) * std
            out[key] = (value + 1.0 if key.endswith(".scale") else value).to(dtype)
        return out

    folders = {name: root / name for name in ("flux", "uno", "t5", "clip")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    save_file(random(m.official_flux_shapes(config), 1.0), str(folders["flux"] / "flux1-dev.safetensors"))
    save_file(random(m.official_lora_shapes(config, lora_rank), 0.5), str(folders["uno"] / "dit_lora.safetensors"))
    torch.manual_seed(seed)
    vae = AutoencoderKL(**(m.FLUX_AE if real else m.tiny_ae_config()))
    save_file(m.official_ae_state_dict(vae), str(folders["flux"] / "ae.safetensors"))

    words = "a an the of on in with and photo dog cat bus car person cup table".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + [("\u2581", -3.0)]
    t5_tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    t5_tokenizer.save_pretrained(folders["t5"])
    t5_width = config["joint_attention_dim"]
    T5EncoderModel(
        T5Config(vocab_size=len(vocab), d_model=t5_width, d_kv=8, d_ff=2 * t5_width, num_layers=1, num_heads=2)
    ).save_pretrained(folders["t5"])
    clip_tokenizer = bpe_clip_tokenizer(folders["clip"], words)
    clip_tokenizer.save_pretrained(folders["clip"])
    clip_width = config["pooled_projection_dim"]
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=clip_width,
            intermediate_size=2 * clip_width,
            num_attention_heads=4,
            num_hidden_layers=1,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).save_pretrained(folders["clip"])
    return folders


#: The special tokens of Qwen2.5-VL's chat template that QwenImageEditPlusPipeline's prompt template uses.
QWEN_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                       "<|video_pad|>")  # fmt: skip


def byte_qwen2_processor() -> Any:
    """A real ``Qwen2VLProcessor`` (Qwen2-VL image processor at its defaults, the video processor it requires) over a
    byte-level ``Qwen2Tokenizer`` without merges: every byte one token, plus Qwen's chat and vision special tokens
    (``<|endoftext|>`` is id 256, the specials follow in :data:`QWEN_SPECIAL_TOKENS` order)."""
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(sorted(set(bytes_to_unicode().values())))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor()
    )


def tiny_qwen_image_edit_pipeline(seed: int = 0) -> Any:
    """A ``QwenImageEditPlusPipeline`` of the same architecture as Qwen-Image-Edit-2511 at toy width (diffusers'
    ``tests/pipelines/qwenimage/test_qwenimage_edit_plus.py`` ``get_dummy_components`` shapes, with 2511's
    ``zero_cond_t=True`` and a VAE with 2511's three down-sampling stages, so the latent grid is the real 8x),
    random weights from ``seed``; the tokenizer and processor are :func:`byte_qwen2_processor`'s."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    processor = byte_qwen2_processor()
    tokenizer = processor.tokenizer
    ids = dict(zip(QWEN_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS)), strict=True))
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4),
                                              zero_cond_t=True)  # fmt: skip
    z_dim = 4
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * z_dim,
                                 latents_std=[1.0] * z_dim)  # fmt: skip
    text = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": len(tokenizer), "rope_theta": 1000000.0,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "bos_token_id": None, "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=len(tokenizer),
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    return QwenImageEditPlusPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(),
                                     text_encoder=text_encoder, tokenizer=tokenizer, processor=processor,
                                     transformer=transformer.eval())  # fmt: skip
