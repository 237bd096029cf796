"""What Table I needs: every weight file declared by the scorers and the methods, as (owner, declaration) pairs.

This is the layer above the registry and the scorers: it reaches the scorers' declarations
(:data:`msibench.scoring.backbones.SCORER_WEIGHTS`) and each method's (``Method.weights``, through the lazy
:mod:`msibench.registry`). The hub helpers and the fetch / status machinery those declarations feed sit below, in
:mod:`msibench.weights`, which imports neither.
"""

from __future__ import annotations

from collections.abc import Sequence

from msibench.weights import WeightFiles


def scorer_weights() -> list[WeightFiles]:
    from msibench.scoring.backbones import SCORER_WEIGHTS

    return list(SCORER_WEIGHTS)


def grounding_weights() -> list[WeightFiles]:
    """The optional open-vocabulary detector's (``msibench score --detector owlv2+sam``): not in Table I's set."""
    from msibench.scoring.backbones import GROUNDING_WEIGHTS

    return list(GROUNDING_WEIGHTS)


def method_weights(name: str) -> list[WeightFiles]:
    """The weight files the method ``name`` declares (``Method.weights``), through the lazy registry (a built-in
    name, a ``file.py:Class`` / ``module:Class`` path or an installed entry point)."""
    from msibench import registry

    declared = getattr(registry.resolve(name), "weights", ())
    out = list(declared)
    bad = [w for w in out if not isinstance(w, WeightFiles)]
    if bad:
        raise TypeError(f"method {name!r}: weights must be WeightFiles, got {bad[:1]}")
    return out


def selection(scorers: bool, methods: Sequence[str], grounding: bool = False) -> list[tuple[str, WeightFiles]]:
    """(owner, declaration) for the scorers and/or ``methods`` ("all" = every built-in method) and/or the optional
    grounding detector; none given: everything Table I needs (which does not include the grounding detector)."""
    from msibench import registry

    if not scorers and not methods and not grounding:
        scorers, methods = True, ["all"]
    names: list[str] = []
    for m in methods:
        names.extend(registry.METHODS if m == "all" else [m])
    out: list[tuple[str, WeightFiles]] = []
    if scorers:
        out += [("scorers", w) for w in scorer_weights()]
    if grounding:
        out += [("grounding", w) for w in grounding_weights()]
    for name in dict.fromkeys(names):
        out += [(name, w) for w in method_weights(name)]
    return out
