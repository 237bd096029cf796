"""λ-ECLIPSE: our prior network against the official one (eclipse-t2i/lambda-eclipse-inference@6a7e00e), on
shared random weights.

The official ``src/priors/lambda_prior_transformer.py`` ``PriorTransformer`` (diffusers' prior with the timestep
embedding removed and an ``embedding_control`` token; run on diffusers 0.23.1) is built from a small config and
loads, strictly, the random state dict of ``baselines.lambda_eclipse_prior.LambdaEclipsePrior`` built from the same
config: the parameter names must agree 1:1. Both then predict from the same inputs (noise, pooled text
embedding, text states with a padding mask, control embedding), one forward pass each, as the subject pipeline
(``src/pipelines/pipeline_kandinsky_subject_prior.py`` ``__call__``) calls the prior.

Not compared here: the rest of the subject prior pipeline (text encoding with the subject keywords swapped for
image embeddings, the zero-image control and negative) and the keyword binding rule (``get_text_feats``) against
``-M binding=official``; docs/parity.md says so.

Usage (from the repository root)::

    git --git-dir=<bare eclipse-t2i/lambda-eclipse-inference> archive 6a7e00e src | tar -x -C /tmp/lambda-eclipse
    python parity/lambda_eclipse.py --official /tmp/lambda-eclipse --python /work/venvs/parity-old/bin/python

``--official`` is the checkout (the folder holding ``src/priors/``). Exit 0: every figure within
``--rel-tolerance`` (default 1e-6), 1: not, 2: a usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from _side_by_side import REPO_ROOT, Figures, check_official, official_side, parser, run_official  # noqa: E402

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

    prior = PriorTransformer(**CONFIG).eval()
    missing, unexpected = prior.load_state_dict(inputs["weights"], strict=True)
    with torch.no_grad():
        out = prior(inputs["noise"], proj_embedding=inputs["proj"], encoder_hidden_states=inputs["text"],
                    attention_mask=inputs["mask"], control_embedding=inputs["control"])  # fmt: skip
    return {
        "version": diffusers.__version__,
        "embeds": out.predicted_image_embedding,
        "keys": sorted(prior.state_dict()),
    }


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.split("\n\n")[0], OFFICIAL_HELP, tolerance=0.0)
    p.add_argument("--rel-tolerance", type=float, default=1e-6, help="largest rel figure (1e-6)")
    args = p.parse_args(argv)
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
    inputs = {"weights": weights, "noise": noise, "proj": proj, "text": text, "mask": mask, "control": control}
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
    figures.exit()


if __name__ == "__main__":
    main()
