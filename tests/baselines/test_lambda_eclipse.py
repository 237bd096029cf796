"""λ-ECLIPSE: keyword binding, the prior's checkpoint layout, and tiny end-to-end runs through msibench's runner.

Every model here is tiny and random, built from configs in code and written to folders with ``save_pretrained``
so that ``LambdaEclipseMethod.setup`` loads them through its real code path (options point at the folders).
The text encoder folder is a full tiny ``CLIPModel`` + tokenizer, like ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k``;
the image encoder folder has ``image_encoder/`` and ``image_processor/``, like ``kandinsky-2-2-prior``; the
decoder folder is a ``KandinskyV22Pipeline`` save, like ``kandinsky-2-2-decoder``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from baselines.lambda_eclipse import (
    ENV_VARS,
    PRIOR_ID,
    LambdaEclipseMethod,
    WeightsUnavailableError,
    bind_keywords,
    bind_keywords_official,
    keyword_forms,
)
from msibench.bench.manifest import load_manifest
from msibench.methods.base import GenerationRequest, SubjectInput

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_DIM = 32  # prior embedding_dim = CLIP projection dims = text hidden size = decoder encoder_hid_dim
TINY_RESOLUTION = 32
TINY_PRIOR = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "embedding_dim": TINY_DIM}
OFFICIAL_PRIOR_KEYS = 176
OFFICIAL_PRIOR_PARAMS = 34_849_536


# ------------------------------------------------------------------------------------------ tiny components


def _tokenizer_words() -> set[str]:
    """Every word of the packaged prompts and of the category names' singular and plural forms."""
    tasks = [t for name in ("v2", "v1") for t in load_manifest(name).tasks]
    text = " ".join(t.prompt for t in tasks)
    text += " " + " ".join(form for t in tasks for s in t.subjects for form in keyword_forms(s.category))
    return set(re.findall(r"[a-z]+", text.lower())) | {"hot", "dog", "in", "bear", "bears", "teddy"}


def build_tiny_tokenizer(folder: Path):
    """A real CLIPTokenizer whose BPE merges spell out the benchmark's words, so each word is one token."""
    from baselines.testing import bpe_clip_tokenizer

    return bpe_clip_tokenizer(folder, _tokenizer_words())


def build_tiny_text_encoder(folder: Path) -> Path:
    """A full tiny CLIPModel + tokenizer in one folder (the laion CLIP repo layout)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    tokenizer = build_tiny_tokenizer(folder / "_vocab")
    torch.manual_seed(1)
    config = CLIPConfig(
        text_config={
            "hidden_size": TINY_DIM,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={"hidden_size": 24, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 1},
        projection_dim=TINY_DIM,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_image_encoder(folder: Path) -> Path:
    """image_encoder/ + image_processor/ subfolders (the kandinsky-2-2-prior layout)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(2)
    vision = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=24,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
            projection_dim=TINY_DIM,
        )
    )
    vision.save_pretrained(folder / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "image_processor"
    )
    return folder


def build_tiny_prior(folder: Path) -> Path:
    """A tiny λ-ECLIPSE prior with every tensor random (incl. the zero-initialised positional/prd/clip ones)."""
    import torch

    from baselines.lambda_eclipse_prior import LambdaEclipsePrior, LambdaPriorConfig, save_prior

    torch.manual_seed(3)
    prior = LambdaEclipsePrior(LambdaPriorConfig(**TINY_PRIOR))
    with torch.no_grad():
        for param in prior.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return save_prior(prior, folder)


def build_tiny_decoder(folder: Path) -> Path:
    """A KandinskyV22Pipeline save: image-conditioned UNet (image_proj + image added embedding) and a MoVQ."""
    import torch
    from diffusers import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    torch.manual_seed(4)
    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=8,  # Kandinsky 2.2 predicts noise and variance
        addition_embed_type="image",
        encoder_hid_dim=TINY_DIM,
        encoder_hid_dim_type="image_proj",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        norm_num_groups=4,
    )
    movq = VQModel(
        block_out_channels=(32, 32),  # SpatialNorm uses 32 groups
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        vq_embed_dim=4,
    )
    # kandinsky-2-2-decoder scheduler/scheduler_config.json values.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
        thresholding=False,
    )
    KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lambda-eclipse-tiny")
    return {
        "text_encoder": str(build_tiny_text_encoder(root / "text_encoder")),
        "image_encoder": str(build_tiny_image_encoder(root / "kandinsky_prior")),
        "prior": str(build_tiny_prior(root / "prior")),
        "decoder": str(build_tiny_decoder(root / "decoder")),
    }


def tiny_options(dirs: dict[str, str], **extra) -> dict:
    return {**dirs, "dtype": "float32", "resolution": TINY_RESOLUTION, "steps": 2, "guidance": 4.0, **extra}


@pytest.fixture(scope="module")
def ready_method(tiny_dirs: dict[str, str]) -> LambdaEclipseMethod:
    method = LambdaEclipseMethod(**tiny_options(tiny_dirs))
    method.setup("cpu")
    return method


# ------------------------------------------------------------------------------------------ keyword binding


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _bind(tokenizer, prompt: str, categories: list[str]):
    binding = bind_keywords(
        prompt,
        categories,
        lambda t: tokenizer(t, padding="max_length", max_length=77, truncation=True).input_ids,
        lambda t: tokenizer(t, add_special_tokens=False).input_ids,
        {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id},
        where="task 'x'",
    )
    ids = tokenizer(binding.prompt, padding="max_length", max_length=77, truncation=True).input_ids
    words = {c: tokenizer.decode([ids[i] for i in p]).strip() for c, p in binding.positions.items()}
    return binding, words


def test_keyword_forms_cover_plurals():
    assert keyword_forms("dog") == ["dogs", "dog"]
    assert set(keyword_forms("person")) == {"person", "people", "persons"}
    assert "buses" in keyword_forms("bus") and "wine glasses" in keyword_forms("wine glass")
    assert keyword_forms("sheep") == ["sheep"]
    assert "knives" in keyword_forms("knife") and "mice" in keyword_forms("mouse")


def test_plural_keyword_in_prompt_is_bound(tokenizer):
    binding, words = _bind(tokenizer, "a photo of two dogs and a cat in a park", ["dog", "cat", "dog"])
    assert binding.appended == ()
    assert words == {"dog": "dogs", "cat": "cat"}


def test_longer_category_claims_its_tokens_first(tokenizer):
    binding, words = _bind(tokenizer, "a photo of a bear and a teddy bear", ["bear", "teddy bear"])
    assert words == {"bear": "bear", "teddy bear": "teddy bear"}
    # "bear" must bind the first "bear" only, not the one inside "teddy bear".
    assert max(binding.positions["bear"]) < min(binding.positions["teddy bear"])


def test_irregular_plural_is_found(tokenizer):
    _, words = _bind(tokenizer, "a photo of two people and a dog in a park", ["person", "person", "dog"])
    assert words["person"] == "people"


def test_missing_keyword_is_appended(tokenizer):
    binding, words = _bind(tokenizer, "a photo of a cat in a park.", ["cat", "hot dog"])
    assert binding.appended == ("hot dog",)
    assert binding.prompt == "a photo of a cat in a park, a hot dog"
    assert words == {"cat": "cat", "hot dog": "hot dog"}


def _bind_official(tokenizer, prompt: str, keywords: list[str]):
    return bind_keywords_official(
        prompt,
        keywords,
        lambda t: tokenizer(t, padding="max_length", max_length=77, truncation=True).input_ids,
        lambda t: tokenizer(t, add_special_tokens=False).input_ids,
    )


def test_official_binding_overwrites_every_token_occurrence_in_subject_order(tokenizer):
    """eclipse-t2i/lambda-eclipse-inference@6a7e00e pipeline_kandinsky_subject_prior.py:478-493: for each subject in
    order, for each token id of tokenizer(keyword)["input_ids"][1:-1], every position where the prompt ids equal it
    (np.where) gets the subject's embedding; a keyword with a token not found is printed and left unbound."""
    prompt = "a dog and a hot dog"
    # ids: 0 <bos>, 1 a, 2 dog, 3 and, 4 a, 5 hot, 6 dog, 7 <eos>, padding
    binding = _bind_official(tokenizer, prompt, ["dog", "hot dog"])
    assert binding.prompt == prompt and binding.missing == ()
    # "dog" takes both dogs; "hot dog", written after it, takes "hot" and both dogs again (the last writer wins).
    assert binding.assignments == ((0, (2, 6)), (1, (2, 5, 6)))
    # A plural has its own token: the singular keyword is not found, only reported; the prompt is not changed.
    # ids: 0 <bos>, 1 two, 2 dogs, 3 and, 4 a, 5 pers, 6 on, 7 <eos> (the tiny vocabulary splits "person")
    plural = _bind_official(tokenizer, "two dogs and a person", ["dog", "person"])
    assert plural.missing == ("dog",) and plural.assignments == ((0, ()), (1, (5, 6)))
    assert plural.prompt == "two dogs and a person"


def test_keyword_that_cannot_fit_names_the_task(tokenizer):
    with pytest.raises(ValueError, match=r"task 'x'.*\['dog'\]"):
        _bind(tokenizer, "a photo of " + "a cat " * 40, ["dog"])


# ------------------------------------------------------------------------------------------ prior checkpoint


def _official_key_shapes(checkpoint_keys_dir: Path) -> dict[str, list[int]]:
    path = checkpoint_keys_dir / "lambda_eclipse_prior.json"
    if not path.is_file():
        pytest.skip(f"official key list not found at {path}")
    return json.loads(path.read_text())


def test_full_size_prior_takes_exactly_the_official_keys(checkpoint_keys_dir: Path):
    import torch

    from baselines.lambda_eclipse_prior import LambdaEclipsePrior, LambdaPriorConfig, load_state_dict_into

    official = _official_key_shapes(checkpoint_keys_dir)
    keys = official["keys"]
    assert len(keys) == OFFICIAL_PRIOR_KEYS
    # The official config.json (recorded with the key list) builds our module as it is.
    config = LambdaPriorConfig.from_dict(official["config"], "lambda_eclipse_prior.json config")
    with torch.device("meta"):
        prior = LambdaEclipsePrior(config)
        state_dict = {name: torch.empty(shape) for name, shape in keys.items()}
    ours = prior.state_dict()
    assert sum(p.numel() for p in prior.parameters()) == OFFICIAL_PRIOR_PARAMS
    # Identity mapping, nothing ignored: every official key is one of our tensors with its shape, and back.
    assert {k: list(v.shape) for k, v in ours.items()} == keys

    load_state_dict_into(prior, state_dict, "official keys")
    loaded = dict(prior.named_parameters())
    assert set(loaded) == set(keys)
    assert all(loaded[k].shape == state_dict[k].shape for k in keys)


def test_prior_loader_names_what_does_not_fit(checkpoint_keys_dir: Path):
    import torch

    from baselines.lambda_eclipse_prior import (
        LambdaEclipsePrior,
        LambdaPriorConfig,
        PriorWeightsError,
        load_state_dict_into,
    )

    official = _official_key_shapes(checkpoint_keys_dir)
    with torch.device("meta"):
        prior = LambdaEclipsePrior(LambdaPriorConfig.from_dict(official["config"]))
        good = {name: torch.empty(shape) for name, shape in official["keys"].items()}

    missing = {k: v for k, v in good.items() if k != "embedding_control.weight"}
    with pytest.raises(PriorWeightsError, match=r"1 missing: embedding_control\.weight"):
        load_state_dict_into(prior, missing)

    # A diffusion PriorTransformer checkpoint (kandinsky-2-2-prior/prior style) is recognised as such.
    with torch.device("meta"):
        diffusion = {**missing, "time_embedding.linear_1.weight": torch.empty(512, 512)}
    with pytest.raises(PriorWeightsError, match=r"unexpected: time_embedding.*diffusion PriorTransformer"):
        load_state_dict_into(prior, diffusion)

    with torch.device("meta"):
        reshaped = {**good, "positional_embedding": torch.empty(1, 80, 512)}
    with pytest.raises(PriorWeightsError, match=r"positional_embedding: checkpoint \[1, 80, 512\] vs prior"):
        load_state_dict_into(prior, reshaped)

    with pytest.raises(PriorWeightsError, match="time_embed_dim"):
        LambdaPriorConfig.from_dict({**official["config"], "time_embed_dim": 512})


def test_saved_prior_round_trips_every_tensor(tiny_dirs: dict[str, str]):
    import torch

    from baselines.lambda_eclipse import PRIOR_WEIGHT_FILES
    from baselines.lambda_eclipse_prior import WEIGHT_FILES, load_prior, read_prior_folder

    assert PRIOR_WEIGHT_FILES == WEIGHT_FILES  # the fingerprint hashes the file the loader reads

    _, state_dict, _ = read_prior_folder(tiny_dirs["prior"])
    prior = load_prior(tiny_dirs["prior"])
    assert not any(p.is_meta for p in prior.parameters())
    for name, value in prior.state_dict().items():
        assert torch.equal(value, state_dict[name]), name
    # Loaded values are the file's: none is left at its initial zeros.
    assert prior.positional_embedding.abs().sum() > 0 and prior.clip_std.abs().sum() > 0


def test_prior_forward_is_the_official_token_sequence(tiny_dirs: dict[str, str]):
    """The prior written out from eclipse-t2i/lambda-eclipse-inference@6a7e00e (lambda_prior_transformer.py,
    forward): tokens [text states (77) | control | projected text embedding | noise | prd] + positional embedding;
    additive mask = causal (-10000 above the diagonal) + text padding (-10000 on padded text columns); pre-norm
    self-attention + gelu MLP blocks; norm_out of the last (prd) token, projected to the CLIP dimension."""
    import math

    import torch
    import torch.nn.functional as F

    from baselines.lambda_eclipse_prior import load_prior

    prior = load_prior(tiny_dirs["prior"])
    g = torch.Generator().manual_seed(0)
    batch, dim, n = 2, TINY_DIM, 77 + 4
    noise, proj = torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)
    text = torch.randn(batch, 77, dim, generator=g)
    control = torch.randn(1, dim, generator=g)
    mask = torch.zeros(batch, 77, dtype=torch.long)
    mask[0, :5], mask[1, :9] = 1, 1

    def reference(text):
        tokens = torch.cat(
            [
                prior.encoder_hidden_states_proj(text),
                prior.embedding_control(control).expand(batch, 1, -1),
                prior.embedding_proj(proj)[:, None],
                prior.proj_in(noise)[:, None],
                prior.prd_embedding.expand(batch, 1, -1),
            ],
            dim=1,
        )
        x = tokens + prior.positional_embedding
        bias = torch.full((n, n), -10000.0).triu(1).repeat(batch, 1, 1)
        bias[:, :, :77] += (1.0 - mask[:, None, :].float()) * -10000.0
        heads = TINY_PRIOR["num_attention_heads"]
        for block in prior.transformer_blocks:
            h = block.norm1(x)
            attn = block.attn1
            q, k, v = (f(h).view(batch, n, heads, -1).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias[:, None]
            out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, -1)
            x = x + attn.to_out[0](out)
            x = x + block.ff(block.norm3(x))
        return prior.proj_to_clip_embeddings(
            F.layer_norm(x, x.shape[-1:], prior.norm_out.weight, prior.norm_out.bias)[:, -1]
        )

    def forward(text):
        return prior(
            noise, proj_embedding=proj, encoder_hidden_states=text, attention_mask=mask, control_embedding=control
        )

    with torch.no_grad():
        got = forward(text)
        assert got.shape == (batch, dim)
        torch.testing.assert_close(got, reference(text), rtol=1e-4, atol=1e-5)
        # Padded text positions are invisible to the prediction; real ones are not.
        padded, real = text.clone(), text.clone()
        padded[:, 20:] += 5.0
        real[:, 2] += 5.0
        torch.testing.assert_close(forward(padded), got, rtol=0, atol=1e-6)
        assert not torch.allclose(forward(real), got, atol=1e-3)


# ------------------------------------------------------------------------------------------ method


def test_import_does_not_load_torch():
    code = "import sys, baselines.lambda_eclipse as m; m.LambdaEclipseMethod(); assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_options_capabilities_and_fingerprint(monkeypatch: pytest.MonkeyPatch):
    method = LambdaEclipseMethod(steps="30", guidance="5", dtype="float32")
    cfg = method.config()
    assert cfg["steps"] == 30 and cfg["guidance"] == 5.0 and cfg["dtype"] == "float32"
    assert cfg["prior"] == PRIOR_ID and cfg["scheduler"] == "DDPMScheduler" and cfg["resolution"] == 512
    assert cfg["prior_revision"] == "main"
    for key in ("prior_revision", "decoder", "decoder_revision", "image_encoder", "text_encoder", "dtype"):
        assert key in cfg
    defaults = LambdaEclipseMethod().config()
    # One official script, test_quick.py: decoder num_inference_steps=50, guidance_scale=7.5 (lines 92-97), every
    # component float32 (line 43: torch_dtype=torch.float32; the pipelines loaded without a dtype).
    assert (defaults["steps"], defaults["guidance"], defaults["dtype"]) == (50, 7.5, "float32")
    assert defaults["binding"] == "span"
    # Every option that changes the image changes the fingerprint.
    variants = [
        {},
        {"steps": 30},
        {"guidance": 4.0},
        {"resolution": 768},
        {"dtype": "float16"},
        {"scheduler": "DDIMScheduler"},
        {"binding": "official"},
        {"shared_keyword": "mean"},
        *({f"{key}_revision": "0123abc"} for key in ("prior", "decoder", "image_encoder", "text_encoder")),
        *({key: f"someone/{key}"} for key in ("prior", "decoder", "image_encoder", "text_encoder")),
    ]
    hashes = {LambdaEclipseMethod(**v).fingerprint_hash() for v in variants}
    assert len(hashes) == len(variants)
    caps = method.capabilities
    assert caps.max_subjects >= 5 and not caps.uses_layout and not caps.uses_zorder
    with pytest.raises(ValueError, match="unknown option 'step'"):
        LambdaEclipseMethod(step=3)
    with pytest.raises(ValueError, match="'dtype'"):
        LambdaEclipseMethod(dtype="float8")
    with pytest.raises(ValueError, match="'shared_keyword'"):
        LambdaEclipseMethod(shared_keyword="first")
    with pytest.raises(ValueError, match="'binding'"):
        LambdaEclipseMethod(binding="regex")
    with pytest.raises(ValueError, match="'shared_keyword'.*binding=span only"):
        LambdaEclipseMethod(binding="official", shared_keyword="mean")
    monkeypatch.setenv(ENV_VARS["prior"], "/weights/lambda-prior")
    assert LambdaEclipseMethod().config()["prior"] == "/weights/lambda-prior"


def test_missing_weights_say_what_to_download(tiny_dirs: dict[str, str], tmp_path: Path):
    method = LambdaEclipseMethod(**tiny_options(tiny_dirs, prior="nobody/no-such-prior"))
    with pytest.raises(WeightsUnavailableError) as err:
        method.setup("cpu")
    message = str(err.value)
    assert "nobody/no-such-prior" in message and PRIOR_ID in message
    assert "-M prior=DIR" in message and ENV_VARS["prior"] in message

    empty = tmp_path / "empty"
    empty.mkdir()
    method = LambdaEclipseMethod(**tiny_options(tiny_dirs, text_encoder=str(empty)))
    with pytest.raises(WeightsUnavailableError, match=r"text encoder from local folder .*empty"):
        method.setup("cpu")


def _request(task_id: str, colours: list[tuple[int, int, int]], seed: int = 7) -> GenerationRequest:
    from PIL import Image

    task = load_manifest("v1").by_id[task_id]  # the tests name v1 tasks ("multi-k2-000": a person and a teddy bear)
    subjects = tuple(
        SubjectInput(
            category=s.category,
            category_id=s.category_id,
            box=s.box,
            z=s.z,
            reference=Image.new("RGB", (40, 48), colour),
            mask=Image.new("L", (40, 48), 255),
        )
        for s, colour in zip(task.subjects, colours, strict=True)
    )
    return GenerationRequest(task=task, sample_index=0, seed=seed, subjects=subjects)


def test_subject_images_and_seed_drive_the_image(ready_method: LambdaEclipseMethod):
    import numpy as np

    def pixels(request):
        return np.asarray(ready_method.generate([request])[0], dtype=np.int16)

    base = pixels(_request("multi-k2-000", [(200, 30, 30), (30, 30, 200)]))
    assert base.shape == (TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert np.array_equal(base, pixels(_request("multi-k2-000", [(200, 30, 30), (30, 30, 200)])))
    assert not np.array_equal(base, pixels(_request("multi-k2-000", [(200, 30, 30), (30, 200, 30)])))
    assert not np.array_equal(base, pixels(_request("multi-k2-000", [(200, 30, 30), (30, 30, 200)], seed=8)))


def test_subject_pixels_are_the_pil_path_of_the_prior_repos_processor(ready_method: LambdaEclipseMethod):
    """get_text_feats runs the kandinsky-2-2-prior folder's CLIPImageProcessor under transformers 4, which resizes
    with PIL (the tiny folder: shortest_edge 32, crop 32). Written out: a 40 x 24 textured cut-out is resized bicubic
    on its uint8 pixels to 53 x 32, centre-cropped at x = 10, scaled by 1/255 and normalised with the OpenAI mean/std.
    transformers 5's own processor resizes with torchvision and would give other pixels."""
    import dataclasses

    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(5)
    plain = _request("multi-k2-000", [(0, 0, 0), (0, 0, 0)])
    refs = [Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)) for _ in plain.subjects]
    request = dataclasses.replace(
        plain,
        subjects=tuple(
            dataclasses.replace(s, reference=r, mask=Image.new("L", r.size, 255))
            for s, r in zip(plain.subjects, refs, strict=True)
        ),
    )
    seen = []
    hook = ready_method._models["image_encoder"].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]),
        with_kwargs=True,
    )
    try:
        ready_method.generate([request])
    finally:
        hook.remove()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    expected = []
    for ref in refs:
        resized = ref.resize((53, 32), Image.Resampling.BICUBIC).crop((10, 0, 42, 32))
        expected.append((torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255).permute(2, 0, 1) - mean) / std)
    subject_pixels = next(p for p in seen if p.shape[0] == len(refs) and p.abs().sum() > 0)
    torch.testing.assert_close(subject_pixels, torch.stack(expected), atol=2e-6, rtol=0)


def test_subject_embedding_replaces_the_keyword_states(ready_method: LambdaEclipseMethod):
    """The prior sees the subject's image embedding at its keyword's token positions, and only there."""
    import torch

    request = _request("multi-k2-000", [(200, 30, 30), (30, 30, 200)])  # "a person and a teddy bear ..."
    seen = _prior_inputs(ready_method, request)
    binding = ready_method._binding(request)
    m = ready_method._models
    pixels = m["image_processor"](images=[s.reference for s in request.subjects], return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = m["image_encoder"](pixel_values=pixels).image_embeds
        tokens = m["tokenizer"](binding.prompt, padding="max_length", max_length=77, return_tensors="pt")
        plain = m["text_encoder"](**tokens).last_hidden_state[0]
    hidden = seen["encoder_hidden_states"][0]
    bound = set()
    for index, subject in enumerate(request.subjects):
        for pos in binding.positions[subject.category]:
            assert torch.allclose(hidden[pos], embeds[index], atol=1e-6)
            bound.add(pos)
    ids = m["tokenizer"](binding.prompt, padding="max_length", max_length=77).input_ids
    spans = {c: m["tokenizer"].decode([ids[i] for i in p]).strip() for c, p in binding.positions.items()}
    assert spans == {"person": "person", "teddy bear": "teddy bear"}
    others = [i for i in range(77) if i not in bound]
    assert torch.allclose(hidden[others], plain[others], atol=1e-6)


def test_official_binding_writes_the_last_subject_over_shared_tokens(ready_method, tiny_dirs):
    """With -M binding=official the prior's text states are the unedited prompt's, each position holding a token of
    a subject's keyword overwritten by the last such subject's embedding (get_text_feats, lines 478-490)."""
    import torch

    method = LambdaEclipseMethod(**tiny_options(tiny_dirs, binding="official"))
    method._models = ready_method._models  # same loaded components, other option
    m = method._models
    for task_id in ("multi-k2-009", "multi-k2-000"):  # "two people ..." (the keyword "person" is missing), "a person"
        request = _request(task_id, [(200, 30, 30), (30, 30, 200)])
        binding = method._binding(request)
        assert binding.prompt == request.prompt
        pixels = m["image_processor"](images=[s.reference for s in request.subjects], return_tensors="pt")
        with torch.no_grad():
            embeds = m["image_encoder"](pixel_values=pixels.pixel_values).image_embeds
            tokens = m["tokenizer"](request.prompt, padding="max_length", max_length=77, return_tensors="pt")
            expected = m["text_encoder"](**tokens).last_hidden_state[0].clone()
        for index, positions in binding.assignments:
            expected[list(positions)] = embeds[index]
        hidden = _prior_inputs(method, request)["encoder_hidden_states"][0]
        torch.testing.assert_close(hidden, expected, atol=1e-6, rtol=0)
    assert method._binding(_request("multi-k2-009", [(0, 0, 0)] * 2)).missing == ("person",)


def test_prior_and_decoder_get_the_official_inputs(ready_method: LambdaEclipseMethod, tiny_dirs: dict[str, str]):
    """pipeline_kandinsky_subject_prior.py (__call__, get_zero_embed) + test_quick.py: the prior gets Gaussian noise
    of the embedding size, the pooled projected text embedding, the tokenizer's mask and the zero-image embedding as
    control; the decoder gets the prior's output as image_embeds and the zero-image embedding as the negative."""
    import torch

    m = ready_method._models
    calls: list[dict] = []

    def decoder(**kwargs):
        calls.append(kwargs)
        return m["decoder"](**kwargs)

    method = LambdaEclipseMethod(**tiny_options(tiny_dirs))
    method._models = {**m, "decoder": decoder}
    seen: dict = {}

    def keep(module, args, kwargs, out):
        seen.update(kwargs, noise=args[0], out=out)

    hook = m["prior"].register_forward_hook(keep, with_kwargs=True)
    request = _request("single-000", [(200, 30, 30)], seed=11)
    try:
        method.generate([request])
    finally:
        hook.remove()

    prompt = method._binding(request).prompt
    tokens = m["tokenizer"](prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        zero = m["image_encoder"](pixel_values=torch.zeros(1, 3, 32, 32)).image_embeds
        text_embeds = m["text_encoder"](**tokens).text_embeds
    noise = torch.randn((1, TINY_DIM), generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(seen["noise"], noise)
    torch.testing.assert_close(seen["proj_embedding"], text_embeds)
    assert torch.equal(seen["attention_mask"], tokens.attention_mask)
    torch.testing.assert_close(seen["control_embedding"], zero)
    (call,) = calls
    torch.testing.assert_close(call["image_embeds"], seen["out"])
    torch.testing.assert_close(call["negative_image_embeds"], zero)
    assert (call["num_inference_steps"], call["guidance_scale"]) == (2, 4.0)


def _prior_inputs(method: LambdaEclipseMethod, request: GenerationRequest) -> dict:
    seen: dict = {}
    hook = method._models["prior"].register_forward_hook(
        lambda mod, args, kwargs, out: seen.update(kwargs), with_kwargs=True
    )
    try:
        method.generate([request])
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("mode", ["mean", "last"])
def test_subjects_sharing_a_keyword(ready_method: LambdaEclipseMethod, tiny_dirs: dict[str, str], mode: str):
    """ "two people": both person references bind the one "people" token, averaged or (official loop) last."""
    import torch

    method = LambdaEclipseMethod(**tiny_options(tiny_dirs, shared_keyword=mode))
    method._models = ready_method._models  # same loaded components, other option
    request = _request("multi-k2-009", [(200, 30, 30), (30, 30, 200)])
    assert request.prompt.startswith("a photo of two people")
    positions = list(method._binding(request).positions["person"])  # the tokens of "people"
    m = method._models
    pixels = m["image_processor"](images=[s.reference for s in request.subjects], return_tensors="pt").pixel_values
    with torch.no_grad():
        first, second = m["image_encoder"](pixel_values=pixels).image_embeds
    expected = (first + second) / 2 if mode == "mean" else second
    bound = _prior_inputs(method, request)["encoder_hidden_states"][0, positions]
    assert torch.allclose(bound, expected.expand_as(bound), atol=1e-6)


def test_runner_generates_two_real_tasks_deterministically(tiny_dirs: dict[str, str], coco_root: Path, tmp_path):
    from msibench.cache import sha256_file
    from msibench.runner import run_method

    runs = []
    for name in ("a", "b"):
        method = LambdaEclipseMethod(**tiny_options(tiny_dirs))
        summary = run_method(
            method, run_dir=tmp_path / name, track="all", limit=1, coco_root=coco_root, progress=False
        )
        assert (summary.ok, summary.failed, summary.skipped) == (2, 0, 0), summary.failures
        records = [json.loads(line) for line in (tmp_path / name / "records.jsonl").read_text().splitlines()]
        runs.append({r["task_id"]: r for r in records})
    first, second = runs
    assert sorted(first) == ["multi-k2-000", "single-000"]
    for task_id, record in first.items():
        assert record["status"] == "ok" and record["seconds"] > 0
        assert (record["width"], record["height"]) == (TINY_RESOLUTION, TINY_RESOLUTION)
        image_a = (tmp_path / "a" / record["image"]).read_bytes()
        assert image_a == (tmp_path / "b" / second[task_id]["image"]).read_bytes(), task_id
    images = {t: (tmp_path / "a" / r["image"]).read_bytes() for t, r in first.items()}
    assert images["multi-k2-000"] != images["single-000"]
    run_info = json.loads((tmp_path / "a" / "run.json").read_text())
    config = run_info["fingerprint"]["config"]
    assert config["prior"] == tiny_dirs["prior"] and config["steps"] == 2 and config["dtype"] == "float32"
    assert config["prior_revision"] is None  # a local folder has no revision
    assert config["prior_sha256"] == sha256_file(Path(tiny_dirs["prior"]) / "diffusion_pytorch_model.safetensors")
    assert run_info["capabilities"]["uses_layout"] is False
