"""λ-ECLIPSE: our prior network against the official one (eclipse-t2i/lambda-eclipse-inference@6a7e00e), on
shared random weights.

The official ``src/priors/lambda_prior_transformer.py`` ``PriorTransformer`` (diffusers' prior with the timestep
embedding removed and an ``embedding_control`` token; run on diffusers 0.23.1) is built from a small config and
loads, strictly, the random state dict of ``baselines.lambda_eclipse_prior.LambdaEclipsePrior`` built from the same
config: the parameter names must agree 1:1. Both then predict from the same inputs (noise, pooled text
embedding, text states with a padding mask, control embedding), one forward pass each, as the subject pipeline
(``src/pipelines/pipeline_kandinsky_subject_prior.py`` ``__call__``) calls the prior.

The keyword binding rule: the official ``get_text_feats`` (the same file) runs on every v1 task's prompt with its
subjects' category names as keywords, around a real CLIP BPE tokenizer (vocab and merges built from open_clip's
``bpe_simple_vocab_16e6.txt.gz``, OpenAI CLIP's BPE; the hub is not needed) and stand-in encoders that tag each
subject's image embedding with its index; the positions each subject overwrites must equal those of our
``baselines.lambda_eclipse.bind_keywords_official`` (``-M binding=official``). How often our default
(``binding=span``) binds differently is printed for information.

The subject prior pipeline end to end, up to the decoder: the official ``KandinskyPriorPipeline.__call__``
(``get_text_feats``, ``get_zero_embed`` as control and negative, the noise from the generator, the prior) on
tiny random CLIP text and vision towers (the same weights on both sides) and the small prior, against our
``LambdaEclipseMethod._generate_one`` with ``-M binding=official``, whose decoder a stand-in replaces to catch its
inputs (image embedding and negative), on six v1 tasks (three single, K = 2, 3, 4) with their prepared references
and the runner's seeds.

The Kandinsky 2.2 decoder: our ``LambdaEclipseMethod``'s decoding step (its ``KandinskyV22Pipeline``, loaded by
its own ``_load_decoder`` from a tiny random decoder folder saved with our diffusers, called as the method calls
it: the image embedding from the prior, the zero-image negative, steps, guidance, size, the request's generator)
against ``test_quick.py``'s decoder call on the official pins (``DiffusionPipeline.from_pretrained`` of the same
folder, ``image_embeds``, ``negative_image_embeds``, ``num_inference_steps``, ``guidance_scale=7.5``), given the
embeddings our method passed and a generator in the state ours had (test_quick.py passes none: the global RNG).
The output image is compared as uint8 (``output_type="pil"``, what both return) and before the cast
(``output_type="np"``). ``--decoder-steps`` (default test_quick.py's 50) and ``--decoder-resolution`` (default 64;
test_quick.py's is the pipeline's 512, our default too) size it for a CPU.

Usage (from the repository root)::

    git --git-dir=<bare eclipse-t2i/lambda-eclipse-inference> archive 6a7e00e src | tar -x -C /tmp/lambda-eclipse
    python parity/lambda_eclipse.py --official /tmp/lambda-eclipse --python /work/venvs/parity-old/bin/python

``--official`` is the checkout (the folder holding ``src/priors/``); the binding needs open_clip installed on our
side (for its BPE file). Exit 0: every figure within
``--rel-tolerance`` (default 1e-6), 1: not, 2: a usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from _side_by_side import (  # noqa: E402
    REPO_ROOT,
    Figures,
    check_official,
    clip_bpe_tokenizer,
    official_side,
    parser,
    run_official,
    usage_error,
)

OFFICIAL_HELP = "a checkout of eclipse-t2i/lambda-eclipse-inference (at 6a7e00e): the folder holding src/priors/"
MARKERS = ["src/priors/lambda_prior_transformer.py", "src/pipelines/pipeline_kandinsky_subject_prior.py"]
#: A small prior: the official architecture (config.json's keys) at a width a CPU runs in a second.
CONFIG = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "embedding_dim": 24,
          "num_embeddings": 77, "additional_embeddings": 4}  # fmt: skip
BATCH = 3


def _official(inputs: dict) -> dict:
    import diffusers
    import torch
    from src.priors.lambda_prior_transformer import PriorTransformer

    prior = PriorTransformer(**CONFIG).eval()  # noqa: F841 (also the pipeline's prior)
    missing, unexpected = prior.load_state_dict(inputs["weights"], strict=True)
    with torch.no_grad():
        out = prior(inputs["noise"], proj_embedding=inputs["proj"], encoder_hidden_states=inputs["text"],
                    attention_mask=inputs["mask"], control_embedding=inputs["control"])  # fmt: skip
    return {
        "version": diffusers.__version__,
        "decoder": _official_decoder(inputs["decoder"]),
        "embeds": out.predicted_image_embedding,
        "keys": sorted(prior.state_dict()),
        "binding": _official_binding(inputs["tokenizer"], inputs["tasks"]),
        "pipeline": _official_pipeline(inputs, prior),
    }


def _official_pipeline(inputs: dict, prior) -> list:
    """The subject prior pipeline's __call__ (get_text_feats, zero-image control, noise, prior) on tiny encoders."""
    import contextlib
    import io

    import torch
    from diffusers import UnCLIPScheduler
    from PIL import Image
    from src.pipelines.pipeline_kandinsky_subject_prior import KandinskyPriorPipeline
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**inputs["text_config"])).eval()
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**inputs["vision_config"])).eval()
    for module, weights in ((text_encoder, inputs["text_weights"]), (image_encoder, inputs["vision_weights"])):
        missing, unexpected = module.load_state_dict(weights, strict=False)
        if [k for k in missing if not k.endswith("position_ids")] or unexpected:
            raise SystemExit(f"tiny encoder weights do not fit: missing {missing}, unexpected {unexpected}")
    size = inputs["vision_config"]["image_size"]
    pipe = KandinskyPriorPipeline(
        prior=prior, image_encoder=image_encoder, text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(inputs["tokenizer"]), scheduler=UnCLIPScheduler(),
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
    )  # fmt: skip
    out = []
    for prompt, keywords, images, seed in inputs["pipeline_tasks"]:
        raw = {"prompt": prompt, "subject_images": [Image.open(p).convert("RGB") for p in images],
               "subject_keywords": keywords}  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            embeds, zero = pipe(raw_data=raw, generator=torch.Generator().manual_seed(seed), return_dict=False)
        out.append((embeds, zero))
    return out


def _official_decoder(inputs: dict) -> dict:
    """test_quick.py's decoder: DiffusionPipeline.from_pretrained, then image_embeds / negative / 50 steps / 7.5."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(inputs["folder"])
    pipe.set_progress_bar_config(disable=True)
    out = {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__}
    for output_type in ("pil", "np"):
        generator = torch.Generator()
        generator.set_state(inputs["generator_state"])
        images = pipe(
            image_embeds=inputs["image_embeds"], negative_image_embeds=inputs["negative_image_embeds"],
            num_inference_steps=inputs["steps"], guidance_scale=7.5, height=inputs["resolution"],
            width=inputs["resolution"], generator=generator, output_type=output_type,
        ).images  # fmt: skip
        out[output_type] = np.asarray(images[0].convert("RGB")) if output_type == "pil" else images[0]
    return out


def _official_binding(tokenizer_dir: str, tasks: list) -> list[list[int]]:
    """Per task, which subject (1-based; 0: none) the official get_text_feats writes into each of the 77 positions."""
    import contextlib
    import io
    from types import SimpleNamespace

    import torch
    from src.pipelines.pipeline_kandinsky_subject_prior import KandinskyPriorPipeline
    from transformers import CLIPTokenizer

    width = 4
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)

    def text_encoder(input_ids, attention_mask):
        return SimpleNamespace(
            last_hidden_state=torch.zeros(1, input_ids.shape[1], width), text_embeds=torch.zeros(1, width)
        )

    class Pixels(dict):
        def to(self, device):
            return self

    def image_encoder(index):  # each subject's "image embedding" is its 1-based index
        return SimpleNamespace(image_embeds=torch.full((1, width), float(index + 1)))

    standin = SimpleNamespace(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        _execution_device="cpu",
        image_processor=lambda index, return_tensors: Pixels(index=index),
        image_encoder=image_encoder,
    )
    out = []
    for prompt, keywords in tasks:
        raw = {"prompt": prompt, "subject_images": list(range(len(keywords))), "subject_keywords": keywords}
        with contextlib.redirect_stdout(io.StringIO()):  # "Couldn't find keyword ..."
            feats = KandinskyPriorPipeline.get_text_feats(standin, raw)
        out.append(feats["text_encoder_hidden_states"][0, :, 0].round().int().tolist())
    return out


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.split("\n\n")[0], OFFICIAL_HELP, tolerance=0.0)
    p.add_argument("--rel-tolerance", type=float, default=1e-6, help="largest rel figure (1e-6)")
    p.add_argument("--decoder-steps", type=int, default=50, help="decoder steps (test_quick.py's 50)")
    p.add_argument(
        "--decoder-resolution",
        type=int,
        default=64,
        help="decoder output size in pixels, a multiple of 16 (default 64; test_quick.py's 512 is slow on a CPU)",
    )
    args = p.parse_args(argv)
    if args.decoder_steps < 1:
        usage_error(f"--decoder-steps {args.decoder_steps}: must be at least 1")
    if args.decoder_resolution < 16 or args.decoder_resolution % 16:
        usage_error(f"--decoder-resolution {args.decoder_resolution}: must be a positive multiple of 16")
    check_official(args.official, MARKERS, OFFICIAL_HELP)
    if args.side == "official":
        return official_side(args, _official)
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    from baselines.lambda_eclipse_prior import LambdaEclipsePrior, LambdaPriorConfig

    torch.manual_seed(0)
    prior = LambdaEclipsePrior(LambdaPriorConfig(**CONFIG)).eval()
    with torch.no_grad():  # the default init leaves some tensors at zero or one: every parameter random
        for param in prior.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    weights = {k: v.clone() for k, v in prior.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    dim = CONFIG["embedding_dim"]
    noise, proj, control = (torch.randn(BATCH, dim, generator=g) for _ in range(3))
    text = torch.randn(BATCH, CONFIG["num_embeddings"], dim, generator=g)
    mask = torch.zeros(BATCH, CONFIG["num_embeddings"], dtype=torch.bool)
    for row, length in enumerate((5, 12, 77)):  # padded prompts of different lengths, and a full one
        mask[row, :length] = True
    import tempfile

    from msibench.bench.manifest import load_manifest

    manifest = load_manifest("v1")
    tasks = [(t.prompt, [s.category for s in t.subjects]) for t in manifest.tasks]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_bpe_tokenizer(tmp)
        encoders = _tiny_encoders()
        pipeline_tasks, requests = _pipeline_tasks(manifest)
        decoder_folder = _tiny_decoder(Path(tmp) / "decoder")
        ours_decoded = _our_decoding(prior, tokenizer, encoders, requests[3], decoder_folder, args)
        caught = ("image_embeds", "negative_image_embeds", "generator_state")
        decoder_inputs = {"folder": str(decoder_folder), "steps": args.decoder_steps,
                          "resolution": args.decoder_resolution, **{k: ours_decoded[k] for k in caught}}  # fmt: skip
        inputs = {"decoder": decoder_inputs,
                  "weights": weights, "noise": noise, "proj": proj, "text": text, "mask": mask, "control": control,
                  "tokenizer": tmp, "tasks": tasks, "pipeline_tasks": pipeline_tasks,
                  **{k: v for k, v in encoders.items() if k.endswith(("config", "weights"))}}  # fmt: skip
        official = run_official(__file__, args, inputs)

    figures = Figures(args.tolerance)
    same_keys = official["keys"] == sorted(weights)
    print(f"official: lambda_prior_transformer.PriorTransformer on diffusers {official['version']}; parameter names "
          f"{'identical' if same_keys else 'DIFFERENT'} ({len(weights)}), loaded strictly")  # fmt: skip
    if not same_keys:
        figures.failed.append("parameter names")
    with torch.no_grad():
        ours = prior(noise, proj, text, mask, control)
    figures.compare(f"prior prediction, {BATCH} prompts (5, 12, 77 tokens)", ours, official["embeds"],
                    rel_tolerance=args.rel_tolerance)  # fmt: skip
    ours_binding, differs_from_span = _our_binding(tokenizer, tasks)
    bound = sum(1 for row in official["binding"] for v in row if v)
    print(f"get_text_feats bound {bound} token positions to a subject over the {len(tasks)} v1 tasks")
    figures.compare(f"binding=official vs get_text_feats: subject per token position, {len(tasks)} v1 tasks",
                    ours_binding, official["binding"], tolerance=0.0)  # fmt: skip
    print(f"binding=span (our default) binds differently from the official rule in {differs_from_span} of "
          f"{len(tasks)} v1 tasks (information)")  # fmt: skip
    _compare_pipeline(figures, prior, tokenizer, encoders, requests, official["pipeline"], args.rel_tolerance)
    decoded = official["decoder"]
    print(f"decoder: ours {ours_decoded['pipeline']} / {ours_decoded['scheduler']} on diffusers "
          f"{ours_decoded['version']}, official {decoded['pipeline']} / {decoded['scheduler']} on diffusers "
          f"{official['version']}; {requests[3].task.id}, {args.decoder_steps} steps, guidance "
          f"{ours_decoded['guidance']}, {args.decoder_resolution} px")  # fmt: skip
    figures.compare("decoder image before the uint8 cast (output_type='np')", ours_decoded["np"], decoded["np"],
                    rel_tolerance=args.rel_tolerance)  # fmt: skip
    figures.compare("decoder image, uint8 (what both return)", ours_decoded["pil"], decoded["pil"], tolerance=0.0)
    figures.note("control: our decoder with the generator one draw on (must differ)", ours_decoded["control"],
                 decoded["np"])  # fmt: skip
    if (abs(ours_decoded["control"] - decoded["np"])).max() == 0:  # the comparison would not see the noise
        figures.failed.append("decoder control (identical)")
    figures.exit()


def _tiny_encoders() -> dict:
    """Tiny CLIP text / vision towers whose widths fit the small prior (the prior's embedding_dim everywhere)."""
    import torch
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    dim = CONFIG["embedding_dim"]
    text_config = {"hidden_size": dim, "projection_dim": dim, "intermediate_size": 37, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "vocab_size": 49408, "max_position_embeddings": 77,
                   "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}  # fmt: skip
    vision_config = {"hidden_size": 32, "projection_dim": dim, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "image_size": 32, "patch_size": 8}  # fmt: skip
    torch.manual_seed(4)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**text_config)).eval()
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision_config)).eval()
    return {"text_config": text_config, "vision_config": vision_config, "text_encoder": text_encoder,
            "image_encoder": image_encoder,
            "text_weights": {k: v.clone() for k, v in text_encoder.state_dict().items()},
            "vision_weights": {k: v.clone() for k, v in image_encoder.state_dict().items()}}  # fmt: skip


def _tiny_decoder(folder: Path) -> Path:
    """A random KandinskyV22Pipeline save (the kandinsky-2-2-decoder layout: image-conditioned UNet, MoVQ, its
    DDPMScheduler config) whose UNet takes the small prior's embedding width."""
    import torch
    from diffusers import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    torch.manual_seed(5)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="image", encoder_hid_dim=CONFIG["embedding_dim"],
        encoder_hid_dim_type="image_proj", down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(8, 16), layers_per_block=1,
        cross_attention_dim=16, attention_head_dim=4, resnet_time_scale_shift="scale_shift", norm_num_groups=4,
    )  # fmt: skip
    movq = VQModel(
        block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), in_channels=3, out_channels=3,
        latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial", num_vq_embeddings=12,
        vq_embed_dim=4,
    )  # fmt: skip
    with torch.no_grad():  # zero-initialised output layers would hide a difference
        for module in (unet, movq):
            for param in module.parameters():
                param.add_(torch.randn_like(param) * 0.05)
    # kandinsky-2-2-decoder's scheduler/scheduler_config.json.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        steps_offset=1, prediction_type="epsilon", thresholding=False,
    )  # fmt: skip
    KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq).save_pretrained(folder)
    return folder


def _our_decoding(prior, tokenizer, encoders, request, folder: Path, args) -> dict:
    """Our method's whole _generate_one with the tiny decoder loaded by its own _load_decoder; the decoder's
    arguments (and the generator's state) are caught on the way, and its float output taken as well."""
    import diffusers
    import numpy as np
    import torch

    from baselines.clip_pixels import pil_clip_processor
    from baselines.lambda_eclipse import LambdaEclipseMethod

    method = LambdaEclipseMethod(binding="official", decoder=str(folder), steps=args.decoder_steps,
                                 resolution=args.decoder_resolution)  # fmt: skip
    pipe = method._load_decoder(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    caught: dict = {}

    def decoder(**kwargs):
        generator = kwargs["generator"]
        state = generator.get_state()
        caught.update(image_embeds=kwargs["image_embeds"].clone(), generator_state=state,
                      negative_image_embeds=kwargs["negative_image_embeds"],
                      guidance=kwargs["guidance_scale"])  # fmt: skip
        out = pipe(**kwargs)
        for name, shift in (("np", 0), ("control", 1)):
            again = torch.Generator()
            again.set_state(state)
            if shift:
                torch.randn(1, generator=again)
            caught[name] = pipe(**{**kwargs, "generator": again, "output_type": "np"}).images[0]
        return out

    image_encoder = encoders["image_encoder"]
    with torch.no_grad():
        size = image_encoder.config.image_size
        zero_embed = image_encoder(pixel_values=torch.zeros(1, 3, size, size)).image_embeds
    method._models = {"device": torch.device("cpu"), "dtype": torch.float32, "tokenizer": tokenizer,
                      "text_encoder": encoders["text_encoder"], "image_processor": pil_clip_processor(size),
                      "image_encoder": image_encoder, "prior": prior, "decoder": decoder, "zero_embed": zero_embed,
                      "max_length": 77}  # fmt: skip
    image = method._generate_one(request)
    return {**caught, "pil": np.array(image), "version": diffusers.__version__, "pipeline": type(pipe).__name__,
            "scheduler": type(pipe.scheduler).__name__}  # fmt: skip


def _pipeline_tasks(manifest) -> tuple[list, list]:
    """Six v1 tasks (single and multi-subject) with their prepared references, as (official inputs, our requests)."""
    from msibench.bench.prepare import reference_paths
    from msibench.runner import _request  # the runner's own request builder: references, masks, seeds

    chosen = manifest.select("single", limit=3) + manifest.select("multi", limit=3)
    official, ours = [], []
    for i, task in enumerate(chosen):
        request = _request(task, 0, 7 + i, manifest)
        paths = [
            str(reference_paths(s.reference, manifest.sources[s.reference.image_id]).image) for s in task.subjects
        ]
        official.append((task.prompt, [s.category for s in task.subjects], paths, request.seed))
        ours.append(request)
    return official, ours


def _compare_pipeline(figures, prior, tokenizer, encoders, requests, official, rel_tolerance) -> None:
    """Our LambdaEclipseMethod (-M binding=official) up to the decoder, whose inputs a stand-in catches."""
    from types import SimpleNamespace

    import torch
    from PIL import Image

    from baselines.clip_pixels import pil_clip_processor
    from baselines.lambda_eclipse import LambdaEclipseMethod

    method = LambdaEclipseMethod(binding="official")
    caught = []

    def decoder(image_embeds, negative_image_embeds, **kwargs):
        caught.append((image_embeds, negative_image_embeds))
        return SimpleNamespace(images=[Image.new("RGB", (8, 8))])

    image_encoder = encoders["image_encoder"]
    with torch.no_grad():
        size = image_encoder.config.image_size
        zero_embed = image_encoder(pixel_values=torch.zeros(1, 3, size, size)).image_embeds
    method._models = {"device": torch.device("cpu"), "dtype": torch.float32, "tokenizer": tokenizer,
                      "text_encoder": encoders["text_encoder"], "image_processor": pil_clip_processor(size),
                      "image_encoder": image_encoder, "prior": prior, "decoder": decoder, "zero_embed": zero_embed,
                      "max_length": 77}  # fmt: skip
    for request, (embeds, zero) in zip(requests, official, strict=True):
        method._generate_one(request)
        ours, negative = caught[-1]
        k = len(request.subjects)
        figures.compare(f"pipeline image embedding, {request.task.id} (K = {k})", ours, embeds,
                        rel_tolerance=rel_tolerance)  # fmt: skip
        figures.compare(
            f"pipeline zero-image negative, {request.task.id}", negative, zero, rel_tolerance=rel_tolerance
        )


def _our_binding(tokenizer, tasks: list) -> tuple[list[list[int]], int]:
    from baselines.lambda_eclipse import bind_keywords, bind_keywords_official

    def encode(text):
        return tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids

    def encode_words(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    maps, differs = [], 0
    for prompt, keywords in tasks:
        official_rule = bind_keywords_official(prompt, keywords, encode, encode_words)
        row = [0] * 77
        for index, positions in official_rule.assignments:  # in subject order: a later subject overwrites
            for position in positions:
                row[position] = index + 1
        maps.append(row)
        span = bind_keywords(prompt, keywords, encode, encode_words, special, where=prompt)
        span_row = [0] * 77
        for index, keyword in enumerate(keywords):
            for position in span.positions.get(keyword, ()):
                span_row[position] = index + 1
        differs += span_row != row or span.prompt != prompt
    return maps, differs


if __name__ == "__main__":
    main()
