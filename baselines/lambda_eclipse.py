"""``lambda-eclipse``: λ-ECLIPSE (Patel et al., TMLR 2024, arXiv 2402.05195) as an msibench method.

Pipeline, as in eclipse-t2i/lambda-eclipse-inference@6a7e00e41f44b8f02e9b4f2632248122236b8774
(``test_quick.py``, ``src/pipelines/pipeline_kandinsky_subject_prior.py``):

1. The prompt is tokenized by the CLIP ViT-bigG/14 tokenizer and encoded by ``CLIPTextModelWithProjection``
   (``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k``): pooled ``text_embeds`` and the 77 ``last_hidden_state`` rows.
2. Each subject's white-background cut-out goes through the Kandinsky 2.2 prior's ``CLIPImageProcessor`` (its
   configuration, run on transformers 4's PIL path whatever transformers is installed: ``baselines.clip_pixels``) and
   ``CLIPVisionModelWithProjection`` (``kandinsky-community/kandinsky-2-2-prior``, subfolders ``image_processor``
   and ``image_encoder``); its ``image_embeds`` replace the hidden-state rows of the subject keyword's tokens.
3. The λ-ECLIPSE prior (``baselines.lambda_eclipse_prior``) maps (noise, text embedding, edited hidden states,
   text mask, control) to one CLIP image embedding in a single forward pass. The control is the image encoder's
   embedding of an all-zero pixel tensor (``get_zero_embed``) since no edge map is given.
4. Kandinsky 2.2's decoder (``KandinskyV22Pipeline``: UNet + MoVQ, ``kandinsky-community/kandinsky-2-2-decoder``)
   renders it, the zero-image embedding serving as ``negative_image_embeds`` (no negative prompt exists).

Subject keywords are the COCO category names. The official code (``pipeline_kandinsky_subject_prior.py``
``get_text_feats``, lines 478-493) takes the subjects in order and, for every token id of the keyword, overwrites
EVERY prompt position holding that id with the subject's embedding (a later subject overwrites an earlier one);
a keyword with a token absent from the prompt is only reported ("Couldn't find keyword ..."), and a plural
("dogs") does not contain the singular's token. ``-M binding=official`` does exactly that. The default
(``binding=span``, msibench's documented rule) matches each subject's keyword as a whole token span (singular or
plural form, longest names first so that "bear" never binds inside "teddy bear"), and appends a missing keyword to
the prompt (", a dog") so every subject is bound. Subjects of one category share the span of their (plural) word:
as in the official loop the last one wins (``shared_keyword=last``, the default), or their embeddings are averaged
(``shared_keyword=mean``). Layout and z-order are not used.

Settings are ``test_quick.py``'s, the script the README runs (its decoder call: ``num_inference_steps=50,
guidance_scale=7.5``; every component in float32: ``CLIPTextModelWithProjection(torch_dtype=torch.float32)``, the
prior and decoder pipelines loaded without a dtype). The gradio demo ``main.py`` differs in both (float16,
guidance 4.0): ``-M dtype=float16 -M guidance=4`` gives its settings.

torch / diffusers / transformers are imported inside methods only, so that ``msibench ls`` stays light.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from msibench.cache import sha256_file
from msibench.methods.base import (
    Capabilities,
    GenerationRequest,
    Method,
    WeightsUnavailableError,
    coerce_options,
)
from msibench.methods.harness import (
    DTYPES,
    check_choice,
    check_non_negative,
    check_positive,
    diffusers_dtype_kwarg,
    env_default,
    quiet_loading,
    require_setup,
    seeded_generator,
    torch_dtype,
    transformers_dtype_kwarg,
    warn_if_half_on_cpu,
)
from msibench.weights import WeightFiles, fetch_remedy, hub_download, hub_failure, hub_kwargs

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

PRIOR_ID = "ECLIPSE-Community/Lambda-ECLIPSE-Prior-v1.0"
DECODER_ID = "kandinsky-community/kandinsky-2-2-decoder"
IMAGE_ENCODER_ID = "kandinsky-community/kandinsky-2-2-prior"
TEXT_ENCODER_ID = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"

#: option -> environment variable that overrides its default (a local folder or another hub id).
ENV_VARS = {
    "prior": "MSIBENCH_LAMBDA_ECLIPSE_PRIOR",
    "decoder": "MSIBENCH_LAMBDA_ECLIPSE_DECODER",
    "image_encoder": "MSIBENCH_LAMBDA_ECLIPSE_IMAGE_ENCODER",
    "text_encoder": "MSIBENCH_LAMBDA_ECLIPSE_TEXT_ENCODER",
}
_HUB_IDS = {
    "prior": PRIOR_ID,
    "decoder": DECODER_ID,
    "image_encoder": IMAGE_ENCODER_ID,
    "text_encoder": TEXT_ENCODER_ID,
}

# What each weight source must hold, for the error message when it cannot be loaded.
_CONTENTS = {
    "prior": "config.json + diffusion_pytorch_model.safetensors (or .bin) of the λ-ECLIPSE prior",
    "decoder": "a KandinskyV22Pipeline folder (model_index.json, unet/, movq/, scheduler/)",
    "image_encoder": "image_encoder/ (CLIPVisionModelWithProjection) and image_processor/ (CLIPImageProcessor)",
    "text_encoder": "a CLIPTextModelWithProjection checkpoint with its CLIPTokenizer files",
}

#: The prior folder's weight files, in the order ``lambda_eclipse_prior.read_prior_folder`` looks for them (kept here
#: too so that fingerprinting a local prior needs no torch).
PRIOR_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

SHARED_KEYWORD_MODES = ("mean", "last")
BINDINGS = ("span", "official")

# Irregular or invariant English plurals among the COCO category names (the MSIBench prompt uses them).
_IRREGULAR_PLURALS = {
    "person": ("people", "persons"),
    "mouse": ("mice",),
    "knife": ("knives",),
    "sheep": ("sheep",),
    "skis": ("skis",),
    "scissors": ("scissors",),
}


def _default_options() -> dict[str, Any]:
    return {
        # Weight sources: a hub id (with its revision) or a local folder. Defaults: test_quick.py / main.py.
        "prior": env_default(ENV_VARS["prior"], PRIOR_ID),
        "prior_revision": "main",
        "decoder": env_default(ENV_VARS["decoder"], DECODER_ID),
        "decoder_revision": "main",
        "image_encoder": env_default(ENV_VARS["image_encoder"], IMAGE_ENCODER_ID),
        "image_encoder_revision": "main",
        "text_encoder": env_default(ENV_VARS["text_encoder"], TEXT_ENCODER_ID),
        "text_encoder_revision": "main",
        # All from test_quick.py (the README's inference script): the decoder with num_inference_steps=50,
        # guidance_scale=7.5 and the pipeline's default 512x512, every component in float32 (the gradio demo
        # main.py uses float16 and guidance 4.0). The scheduler is the one the decoder repo ships
        # (scheduler/scheduler_config.json: DDPMScheduler).
        "steps": 50,
        "guidance": 7.5,
        "resolution": 512,
        "scheduler": "DDPMScheduler",
        "dtype": "float32",
        # "span": whole keyword spans, missing keywords appended; "official": get_text_feats' rule exactly.
        "binding": "span",
        # The official keyword loop overwrites a shared span, so the last subject of a category wins.
        "shared_keyword": "last",
    }


@dataclass(frozen=True)
class KeywordBinding:
    """Where each subject category sits in the tokenized prompt."""

    prompt: str
    #: category -> token positions (in the padded id sequence, BOS at 0) whose states get the subject embedding.
    positions: dict[str, tuple[int, ...]]
    #: categories whose keyword was absent and appended to the prompt.
    appended: tuple[str, ...]


def keyword_forms(category: str) -> list[str]:
    """Surface forms under which ``category`` may appear in a prompt: plural(s) and singular, longest first."""
    name = " ".join(category.lower().split())
    head, _, last = name.rpartition(" ")
    if name in _IRREGULAR_PLURALS:
        plurals = list(_IRREGULAR_PLURALS[name])
    elif last in _IRREGULAR_PLURALS:
        plurals = [f"{head} {p}".strip() for p in _IRREGULAR_PLURALS[last]]
    elif last.endswith(("s", "sh", "ch", "x", "z")):
        plurals = [f"{name}es"]
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        plurals = [f"{head} {last[:-1]}ies".strip()]
    else:
        plurals = [f"{name}s"]
    return sorted(dict.fromkeys([*plurals, name]), key=len, reverse=True)


def _article(category: str) -> str:
    return f"{'an' if category[:1].lower() in 'aeiou' else 'a'} {category}"


def bind_keywords(
    prompt: str,
    categories: Sequence[str],
    encode: Callable[[str], list[int]],
    encode_words: Callable[[str], list[int]],
    special_ids: set[int],
    where: str = "prompt",
) -> KeywordBinding:
    """Find each category's keyword span in the tokenized prompt, appending the keyword when it is absent.

    ``encode(text)`` returns the padded/truncated ids the text encoder sees (BOS first); ``encode_words(text)``
    the ids of a bare phrase (no special tokens). Matching is on whole token spans, longest spans first, and a
    position belongs to one category only. Raises ``ValueError`` naming ``where`` when a keyword cannot fit in
    the tokenizer's window.
    """
    unique = list(dict.fromkeys(categories))
    text = prompt
    appended: list[str] = []
    candidates = [(category, encode_words(form)) for category in unique for form in keyword_forms(category)]
    candidates = [(c, ids) for c, ids in candidates if ids]
    # Longest spans first: "teddy bear" claims its tokens before "bear" looks for its own.
    candidates.sort(key=lambda item: len(item[1]), reverse=True)
    for _ in range(2):
        ids = encode(text)
        claimed: dict[int, str] = {}
        found: dict[str, list[int]] = {c: [] for c in unique}
        for category, span in candidates:
            n = len(span)
            for start in range(len(ids) - n + 1):
                window = range(start, start + n)
                if ids[start : start + n] == span and not any(i in claimed or ids[i] in special_ids for i in window):
                    claimed.update(dict.fromkeys(window, category))
                    found[category].extend(window)
        missing = [c for c in unique if not found[c]]
        if not missing:
            positions = {c: tuple(sorted(found[c])) for c in unique}
            return KeywordBinding(prompt=text, positions=positions, appended=tuple(appended))
        if appended:
            break
        # The official demo asks users to name each subject in the prompt; a missing name is added here.
        appended = missing
        text = text.rstrip(" .") + ", " + ", ".join(_article(c) for c in missing)
    raise ValueError(
        f"{where}: the subject keyword(s) {missing} do not fit in the text encoder's token window even after "
        f"appending them to the prompt {text!r}"
    )


@dataclass(frozen=True)
class OfficialBinding:
    """The official keyword rule's result: in subject order, the positions each subject's embedding overwrites."""

    prompt: str
    #: (subject index, positions) in subject order; a later subject overwrites an earlier one's shared positions.
    assignments: tuple[tuple[int, tuple[int, ...]], ...]
    #: keywords with a token absent from the prompt (the official code prints them and goes on).
    missing: tuple[str, ...]


def bind_keywords_official(
    prompt: str, keywords: Sequence[str], encode: Callable[[str], list[int]], encode_words: Callable[[str], list[int]]
) -> OfficialBinding:
    """eclipse-t2i/lambda-eclipse-inference@6a7e00e ``get_text_feats`` (pipeline_kandinsky_subject_prior.py:478-493):
    for each subject in order, every position of the padded prompt ids equal to any token id of its keyword
    (``tokenizer(keyword)["input_ids"][1:-1]``); a keyword with a token not in the prompt is reported, not fixed."""
    ids = encode(prompt)
    assignments = []
    missing: list[str] = []
    for index, keyword in enumerate(keywords):
        positions: list[int] = []
        found = True
        for token in encode_words(keyword):
            hits = [i for i, t in enumerate(ids) if t == token]
            found = found and bool(hits)
            positions.extend(hits)
        if not found:
            missing.append(keyword)
        assignments.append((index, tuple(sorted(set(positions)))))
    return OfficialBinding(prompt=prompt, assignments=tuple(assignments), missing=tuple(dict.fromkeys(missing)))


class LambdaEclipseMethod(Method):
    name: ClassVar[str] = "lambda-eclipse"
    # The files setup() loads with the default options (msibench weights fetch --method lambda-eclipse); the
    # revisions are the repos' main branch (not pinned here).
    weights: ClassVar[tuple[WeightFiles, ...]] = (
        WeightFiles(PRIOR_ID, ("config.json", "diffusion_pytorch_model.*"), None, "λ-ECLIPSE prior"),
        WeightFiles(
            DECODER_ID,
            (
                "model_index.json",
                "scheduler/scheduler_config.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors",
                "movq/config.json",
                "movq/diffusion_pytorch_model.safetensors",
            ),
            None,
            "Kandinsky 2.2 decoder",
        ),
        WeightFiles(
            IMAGE_ENCODER_ID,
            (
                "image_encoder/config.json",
                "image_encoder/model.safetensors",
                "image_processor/preprocessor_config.json",
            ),
            None,
            "Kandinsky 2.2 image encoder (CLIP ViT-bigG/14)",
        ),
        WeightFiles(
            TEXT_ENCODER_ID,
            (
                "config.json",
                "model*.safetensors*",
                "merges.txt",
                "vocab.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
            ),
            None,
            "CLIP ViT-bigG/14 text encoder + tokenizer",
        ),
    )
    batch_size = 1

    def __init__(self, **options: Any) -> None:
        self.options = coerce_options(_default_options(), options, self.name)
        o = self.options
        check_positive(o, ("steps", "resolution"), self.name)
        check_non_negative(o, ("guidance",), self.name)
        check_choice(o, "dtype", DTYPES, self.name)
        check_choice(o, "shared_keyword", SHARED_KEYWORD_MODES, self.name)
        check_choice(o, "binding", BINDINGS, self.name)
        if o["binding"] == "official" and o["shared_keyword"] != "last":
            raise ValueError(
                f"{self.name} option 'shared_keyword': the official binding overwrites in subject order (last wins); "
                f"'{o['shared_keyword']}' applies to binding=span only"
            )
        if not re.fullmatch(r"[A-Za-z0-9]+Scheduler", str(o["scheduler"])):
            raise ValueError(f"{self.name} option 'scheduler': expected a diffusers scheduler class name")
        self._config: dict[str, Any] | None = None
        self._models: dict[str, Any] | None = None

    @property
    def capabilities(self) -> Capabilities:
        # The official pipeline takes any number of (image, keyword) pairs (get_text_feats loops over them); the
        # bound is the text window: each subject category needs one of the 75 non-special tokens of the prompt.
        return Capabilities(max_subjects=75, uses_layout=False, uses_zorder=False)

    def config(self) -> dict[str, Any]:
        # Computed once: the runner fingerprints every record, and a local prior is hashed.
        if self._config is None:
            self._config = self._build_config()
        return self._config

    def _build_config(self) -> dict[str, Any]:
        o = self.options
        sources: dict[str, Any] = {}
        for key in ("prior", "decoder", "image_encoder", "text_encoder"):
            source, revision, local = self._source(key)
            sources[key] = str(Path(source).expanduser().resolve()) if local else source
            # A local folder has no revision: recording one would suggest a pin that does not exist.
            sources[f"{key}_revision"] = None if local else revision
        prior_folder = Path(str(o["prior"])).expanduser()
        weights = next((prior_folder / n for n in PRIOR_WEIGHT_FILES if (prior_folder / n).is_file()), None)
        if prior_folder.is_dir() and weights is not None:
            # The method's own weights, identified by content (a folder path says nothing about what is in it).
            sources["prior_sha256"] = sha256_file(weights)
        return {
            **sources,
            "scheduler": str(o["scheduler"]),
            "steps": int(o["steps"]),
            "guidance": float(o["guidance"]),
            "resolution": int(o["resolution"]),
            "dtype": str(o["dtype"]),
            "binding": str(o["binding"]),
            "shared_keyword": str(o["shared_keyword"]),
            "negative_image_embeds": "zero-image",
            "control_embedding": "zero-image",
            "image_preprocessing": "PIL path of transformers 4 CLIPImageProcessor (folder's image_processor config)",
            "version": 2,
        }

    # ------------------------------------------------------------------------------------------- loading

    def setup(self, device: str) -> None:
        import torch

        cfg = self.config()
        dtype = torch_dtype(cfg["dtype"])
        warn_if_half_on_cpu(self.name, cfg["dtype"], device)
        # Smallest first, so that missing weights are reported before gigabytes are read.
        with quiet_loading():
            prior = self._load_prior(dtype)
            decoder = self._load_decoder(dtype)
            image_processor, image_encoder = self._load_image_encoder(dtype)
            tokenizer, text_encoder = self._load_text_encoder(dtype, prior.config.embedding_dim)

        dim = prior.config.embedding_dim
        if text_encoder.config.max_position_embeddings != prior.config.num_embeddings:
            raise ValueError(
                f"lambda-eclipse: the text encoder ({self.options['text_encoder']}) has "
                f"{text_encoder.config.max_position_embeddings} positions, the prior expects "
                f"{prior.config.num_embeddings} text tokens"
            )
        checks = {
            f"text encoder hidden size ({self.options['text_encoder']})": text_encoder.config.hidden_size,
            f"text encoder projection_dim ({self.options['text_encoder']})": text_encoder.config.projection_dim,
            f"image encoder projection_dim ({self.options['image_encoder']})": image_encoder.config.projection_dim,
            f"decoder UNet encoder_hid_dim ({self.options['decoder']})": decoder.unet.config.encoder_hid_dim,
        }
        wrong = [f"{what} = {value}" for what, value in checks.items() if value != dim]
        if wrong:
            raise ValueError(
                f"lambda-eclipse: components do not fit the prior's embedding_dim {dim}: {'; '.join(wrong)}"
            )

        text_encoder.to(device)
        image_encoder.to(device)
        prior.to(device)
        decoder.to(device)
        decoder.set_progress_bar_config(disable=True)
        with torch.no_grad():
            # get_zero_embed: the image embedding of an all-zero (already normalised) pixel tensor.
            size = image_encoder.config.image_size
            zeros = torch.zeros(1, 3, size, size, device=device, dtype=dtype)
            zero_embed = image_encoder(pixel_values=zeros).image_embeds
        self._models = {
            "device": device,
            "dtype": dtype,
            "tokenizer": tokenizer,
            "text_encoder": text_encoder,
            "image_processor": image_processor,
            "image_encoder": image_encoder,
            "prior": prior,
            "decoder": decoder,
            "zero_embed": zero_embed,
            # The prompt window is the text model's position count (77), whatever model_max_length the
            # tokenizer files declare.
            "max_length": text_encoder.config.max_position_embeddings,
        }

    def _source(self, key: str) -> tuple[str, str, bool]:
        source = str(self.options[key])
        revision = str(self.options[f"{key}_revision"])
        return source, revision, Path(source).expanduser().is_dir()

    def _unavailable(self, key: str, err: Exception) -> WeightsUnavailableError:
        source, revision, local = self._source(key)
        hub_id = _HUB_IDS[key]
        where = f"local folder {source}" if local else f"{source!r} (revision {revision})"
        reason = f"{type(err).__name__}: {err}" if local else hub_failure(err)
        return WeightsUnavailableError(
            f"lambda-eclipse: cannot load the {key.replace('_', ' ')} from {where}: {reason}\n"
            f"  It needs {_CONTENTS[key]} (official: {hub_id}). "
            + fetch_remedy(self.name, f"-M {key}=DIR or {ENV_VARS[key]}=DIR")
        )

    def _pretrained_kwargs(self, key: str) -> dict[str, Any]:
        source, revision, local = self._source(key)
        kwargs: dict[str, Any] = {"pretrained_model_name_or_path": str(Path(source).expanduser()) if local else source}
        if not local:
            kwargs.update(revision=revision, **hub_kwargs())  # the hub cache only when the hub is unreachable
        return kwargs

    def _load_text_encoder(self, dtype, projection_dim: int):
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        kwargs = self._pretrained_kwargs("text_encoder")
        try:
            # test_quick.py loads the text tower out of the full CLIP checkpoint with projection_dim=1280 (the
            # prior's embedding_dim): a CLIPConfig's text_config does not carry the top-level projection_dim,
            # so without it transformers would build a 512-wide projection and re-initialise it at random.
            model, info = CLIPTextModelWithProjection.from_pretrained(
                **kwargs, projection_dim=projection_dim, **transformers_dtype_kwarg(dtype), output_loading_info=True
            )
            tokenizer = CLIPTokenizer.from_pretrained(**kwargs)
        except (OSError, ValueError) as err:
            raise self._unavailable("text_encoder", err) from err
        self._check_loading_info("text_encoder", info)
        # transformers may build a tokenizer holding only its special tokens when the vocabulary files are
        # absent; such a tokenizer would silently map every word to <unk>.
        size = len(tokenizer)
        if size <= len(set(tokenizer.all_special_ids)) or size > model.config.vocab_size:
            raise self._unavailable(
                "text_encoder",
                FileNotFoundError(
                    f"the CLIP tokenizer has {size} tokens for a text model of vocab_size {model.config.vocab_size} "
                    "(vocab.json / merges.txt missing?)"
                ),
            )
        return tokenizer, model.eval().requires_grad_(False)

    def _load_image_encoder(self, dtype):
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        from baselines.clip_pixels import PILCLIPImageProcessor

        kwargs = self._pretrained_kwargs("image_encoder")
        try:
            # The folder's own configuration, preprocessed on transformers 4's PIL path as the official run did.
            processor = PILCLIPImageProcessor.like(
                CLIPImageProcessor.from_pretrained(**kwargs, subfolder="image_processor")
            )
            model, info = CLIPVisionModelWithProjection.from_pretrained(
                **kwargs, subfolder="image_encoder", **transformers_dtype_kwarg(dtype), output_loading_info=True
            )
        except (OSError, ValueError) as err:
            raise self._unavailable("image_encoder", err) from err
        self._check_loading_info("image_encoder", info)
        return processor, model.eval().requires_grad_(False)

    def _check_loading_info(self, key: str, info: dict[str, Any]) -> None:
        """Refuse a checkpoint that left weights of the model at their random init."""
        missing = sorted(info.get("missing_keys") or [])
        mismatched = sorted(str(k) for k in info.get("mismatched_keys") or [])
        if missing or mismatched:
            raise ValueError(
                f"lambda-eclipse: the {key.replace('_', ' ')} checkpoint {self.options[key]} does not fit its model: "
                f"missing {missing[:6]}, shape mismatch {mismatched[:6]}"
            )

    def _load_prior(self, dtype):
        from baselines.lambda_eclipse_prior import CONFIG_FILE, WEIGHT_FILES, load_prior

        source, revision, local = self._source("prior")
        if local:
            folder = Path(source).expanduser()
            present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
            if not (folder / CONFIG_FILE).is_file() or not present:
                raise self._unavailable(
                    "prior",
                    FileNotFoundError(f"{folder} lacks {CONFIG_FILE} or a weights file ({', '.join(WEIGHT_FILES)})"),
                )
        else:
            try:
                folder = _download_prior(source, revision, CONFIG_FILE, WEIGHT_FILES)
            except Exception as err:  # huggingface_hub raises several error types for "not there"
                raise self._unavailable("prior", err) from err
        return load_prior(folder, dtype)

    def _load_decoder(self, dtype):
        import diffusers
        from diffusers import KandinskyV22Pipeline

        kwargs = self._pretrained_kwargs("decoder")
        try:
            pipe = KandinskyV22Pipeline.from_pretrained(**kwargs, **diffusers_dtype_kwarg(dtype))
        except (OSError, ValueError) as err:
            raise self._unavailable("decoder", err) from err
        wanted = str(self.options["scheduler"])
        if type(pipe.scheduler).__name__ != wanted:
            cls = getattr(diffusers, wanted, None)
            if cls is None or not hasattr(cls, "from_config"):
                raise ValueError(f"lambda-eclipse option 'scheduler': diffusers has no scheduler {wanted!r}")
            pipe.scheduler = cls.from_config(pipe.scheduler.config)
        return pipe

    # ---------------------------------------------------------------------------------------- generation

    def generate(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        require_setup(self._models, self.name)
        return [self._generate_one(request) for request in requests]

    def _binding(self, request: GenerationRequest) -> KeywordBinding | OfficialBinding:
        tokenizer = self._models["tokenizer"]
        max_length = self._models["max_length"]

        def encode(text: str) -> list[int]:
            return tokenizer(text, padding="max_length", max_length=max_length, truncation=True).input_ids

        def encode_words(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False).input_ids

        if self.options["binding"] == "official":
            return bind_keywords_official(request.prompt, [s.category for s in request.subjects], encode, encode_words)
        special = {
            i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None
        }
        return bind_keywords(
            request.prompt,
            [s.category for s in request.subjects],
            encode,
            encode_words,
            special,
            where=f"task {request.task.id!r}",
        )

    def _generate_one(self, request: GenerationRequest) -> Image.Image:
        import torch

        m = self._models
        device, dtype = m["device"], m["dtype"]
        cfg = self.config()
        binding = self._binding(request)
        if isinstance(binding, OfficialBinding) and binding.missing:
            # The official code prints "Couldn't find keyword ..." and generates without that subject's binding.
            logger.warning("%s: couldn't find keyword(s) %s in the prompt", request.task.id, list(binding.missing))
        elif isinstance(binding, KeywordBinding) and binding.appended:
            logger.info("%s: appended missing subject keyword(s) %s to the prompt", request.task.id, binding.appended)
        tokenizer = m["tokenizer"]
        tokens = tokenizer(
            binding.prompt,
            padding="max_length",
            max_length=m["max_length"],
            truncation=True,
            return_tensors="pt",
        )
        # Seeded on the CPU so the same seed gives the same noise on every device.
        generator = seeded_generator(request.seed)
        with torch.no_grad():
            # get_text_feats passes the tokenizer's attention mask to the text encoder as well.
            text = m["text_encoder"](
                input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)
            )
            hidden = text.last_hidden_state.clone()
            pixels = m["image_processor"](
                images=[s.reference.convert("RGB") for s in request.subjects], return_tensors="pt"
            ).pixel_values.to(device=device, dtype=dtype)
            subject_embeds = m["image_encoder"](pixel_values=pixels).image_embeds
            for rows, positions in self._assignments(binding, request, cfg["shared_keyword"]):
                if positions:
                    hidden[0, list(positions)] = subject_embeds[rows].mean(dim=0).to(hidden.dtype)

            prior = m["prior"]
            noise = torch.randn((1, prior.config.embedding_dim), generator=generator, dtype=torch.float32)
            image_embeds = prior(
                noise.to(device=device, dtype=dtype),
                proj_embedding=text.text_embeds,
                encoder_hidden_states=hidden,
                attention_mask=tokens.attention_mask.to(device),
                control_embedding=m["zero_embed"],
            )
            out = m["decoder"](
                image_embeds=image_embeds,
                negative_image_embeds=m["zero_embed"],
                height=cfg["resolution"],
                width=cfg["resolution"],
                num_inference_steps=cfg["steps"],
                guidance_scale=cfg["guidance"],
                generator=generator,
                output_type="pil",
            )
        return out.images[0].convert("RGB")

    @staticmethod
    def _assignments(
        binding: KeywordBinding | OfficialBinding, request: GenerationRequest, shared_keyword: str
    ) -> list[tuple[list[int], tuple[int, ...]]]:
        """(subject rows whose mean embedding is written, positions), in the order they are written."""
        if isinstance(binding, OfficialBinding):
            return [([index], positions) for index, positions in binding.assignments]
        out = []
        for category, positions in binding.positions.items():
            rows = [i for i, s in enumerate(request.subjects) if s.category == category]
            out.append((rows if shared_keyword == "mean" else rows[-1:], positions))
        return out


def _download_prior(repo_id: str, revision: str, config_file: str, weight_files: Sequence[str]) -> Path:
    """Fetch the prior's config and its first available weights file into the hub cache; return the folder."""
    from huggingface_hub.utils import EntryNotFoundError

    config_path = hub_download(repo_id, config_file, revision)
    errors = []
    for name in weight_files:
        try:
            hub_download(repo_id, name, revision)
            return config_path.parent
        except EntryNotFoundError as err:
            errors.append(str(err))
        except Exception as err:  # offline: LocalEntryNotFoundError; try the next file name before giving up
            errors.append(f"{name}: {type(err).__name__}: {err}")
    raise FileNotFoundError(f"none of {', '.join(weight_files)} in {repo_id}@{revision}: {'; '.join(errors)}")


__all__ = [
    "DECODER_ID",
    "ENV_VARS",
    "IMAGE_ENCODER_ID",
    "PRIOR_ID",
    "TEXT_ENCODER_ID",
    "KeywordBinding",
    "LambdaEclipseMethod",
    "WeightsUnavailableError",
    "bind_keywords",
    "keyword_forms",
]
