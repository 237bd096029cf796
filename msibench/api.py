"""The Python API: what the ``msibench`` commands do, as functions (lm-eval's ``simple_evaluate``).

.. code-block:: python

    import msibench

    result = msibench.evaluate("my_method.py:MyMethod", tracks="multi", seeds=1, limit=4)
    print(result.table())                  # Table I's row, as ``msibench table`` prints it
    result.metrics["multi"]["yolo_l"]      # the table's numbers: {track: {metric: mean}}

- :func:`evaluate` = ``msibench eval``: generate (:func:`run_method`), score (:func:`score_run`) and aggregate into
  Table I's row, resumably (a second call skips what is done). ``method`` is anything ``--method`` accepts (a
  built-in name, ``path/to/file.py:Class``, ``package.module:Class``, an installed plugin's name), a Method class or
  an instance.
- :func:`run_method` = ``msibench run`` (:func:`msibench.runner.run_method`): one method instance into a run folder.
- :func:`score_run` = ``msibench score`` (:func:`msibench.scoring.score.score_run`): one run folder with a
  :class:`~msibench.scoring.scorer.Scorer`; :func:`make_scorer` builds one from the ``score`` command's settings.
- :func:`load_method` = the ``--method`` and ``-M`` options: a method instance from a spec and its options.
- :func:`table` = ``msibench table``: Table I of scored run folders.

Errors are the library's exceptions (each names the file, option or field); the CLI turns them into messages and
exit codes. Nothing here imports torch before it is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from msibench.runner import RunSummary, run_method
from msibench.scoring.score import ScoreSummary, score_run

if TYPE_CHECKING:
    from msibench.methods.base import Method
    from msibench.scoring.scorer import Scorer, ScorerConfig
    from msibench.scoring.table import Row, RunResult

__all__ = ["Evaluation", "evaluate", "load_method", "make_scorer", "run_method", "score_run", "table"]


def load_method(method: str | type[Method] | Method, options: Mapping[str, Any] | None = None) -> Method:
    """A method instance: ``method`` as ``--method`` takes it (see :mod:`msibench.registry`), a Method class, or an
    instance (returned as is; then ``options`` must be empty). ``options`` are ``-M`` options (strings or values)."""
    from msibench import registry
    from msibench.methods.base import Method

    if isinstance(method, Method):
        if options:
            raise ValueError(f"options {sorted(options)} given with a method instance: pass the class or its name")
        return method
    if isinstance(method, type):
        if not issubclass(method, Method):
            raise TypeError(f"{method.__module__}.{method.__qualname__} is not a Method subclass")
        return method(**dict(options or {}))
    return registry.build(str(method), dict(options or {}))


def make_scorer(
    config: ScorerConfig | None = None,
    *,
    device: str | None = None,
    announce: Callable[[str], None] | None = None,
    **settings: Any,
) -> Scorer:
    """A :class:`~msibench.scoring.scorer.Scorer` with its backbones loaded (``msibench score``'s options:
    ``ScorerConfig(detector=..., dino=..., clip=..., metrics=...)``, or the same keywords as ``settings``).

    Backbones are read offline from the caches ``msibench weights fetch --scorers`` fills; every missing one is named
    in one :class:`~msibench.scoring.backbones.BackboneError`. ``announce`` (e.g. a print to stderr) hears each
    backbone load as it starts and ends."""
    from msibench.runner import resolve_device
    from msibench.scoring.scorer import Scorer, ScorerConfig

    if config is not None and settings:
        raise ValueError("pass a ScorerConfig or its settings as keywords, not both")
    scorer = Scorer(config or ScorerConfig(**settings), device=resolve_device(device))
    scorer.setup(announce=announce)
    return scorer


def _track(tracks: str | Sequence[str]) -> str:
    chosen = {tracks} if isinstance(tracks, str) else set(tracks)
    if chosen in ({"all"}, {"single", "multi"}):
        return "all"
    if len(chosen) == 1 and chosen <= {"single", "multi"}:
        return next(iter(chosen))
    raise ValueError(f"tracks={tracks!r}: choose 'single', 'multi', 'all' or a list of them")


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` did, and Table I's row for it.

    ``generation`` and ``scoring`` are the summaries ``msibench run`` and ``msibench score`` print; ``result`` the
    aggregated run (per track and K: means, std, 95 % bootstrap CIs, counts), ``row`` its row of Table I."""

    run_dir: Path
    generation: RunSummary
    scoring: ScoreSummary
    result: RunResult
    row: Row
    partial: bool  # a subset was asked for (limit): the row covers part of the benchmark

    @property
    def metrics(self) -> dict[str, dict[str, float | None]]:
        """Table I's numbers: {track: {metric: mean}} for the columns of Table I (None: no value, "–")."""
        from msibench.scoring.table import COLUMNS

        out: dict[str, dict[str, float | None]] = {}
        for (track, metric), cell in zip(COLUMNS, self.row.cells, strict=True):
            out.setdefault(track, {})[metric] = cell.stat.mean if cell.stat is not None else None
        return out

    @property
    def exit_code(self) -> int:
        """What ``msibench eval`` exits with: run's code, else score's (3: failed samples recorded)."""
        return self.generation.exit_code or self.scoring.exit_code

    def table(self, fmt: str = "md", *, ci: bool = True, paper: bool = False) -> str:
        """Table I of this run (md, tex, csv or html), as ``msibench table`` renders it."""
        from msibench.scoring.table import load_paper_table, render_table

        paper_table = load_paper_table() if paper else None
        return render_table([self.result], fmt, paper=paper_table, ci=ci, allow_partial=self.partial)


def evaluate(
    method: str | type[Method] | Method,
    *,
    options: Mapping[str, Any] | None = None,
    tracks: str | Sequence[str] = "all",
    seeds: int = 1,
    base_seed: int = 0,
    limit: int | None = None,
    manifest: str | Path | None = None,
    out: str | Path = "results/runs",
    run_dir: str | Path | None = None,
    device: str | None = None,
    coco_root: str | Path | None = None,
    scorer: Scorer | ScorerConfig | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    rescore: bool = False,
    progress: bool = True,
) -> Evaluation:
    """Generate, score and tabulate one method: ``msibench eval`` as a function (see the module docstring).

    ``tracks``: "single", "multi", "all" or a list of them; ``seeds``: samples per task; ``limit``: at most N tasks
    per track (the row is then marked partial). ``scorer``: a loaded Scorer, a ScorerConfig, or None (the default
    scorers, from the weight caches); it is set up before anything is generated, so missing scorer weights fail at
    once. The run folder is ``out/NAME-FINGERPRINT`` (or ``run_dir``); a second call resumes it."""
    from msibench.scoring.scorer import Scorer
    from msibench.scoring.table import build_rows, load_run

    instance = load_method(method, options)
    track = _track(tracks)
    if not isinstance(scorer, Scorer):
        scorer = make_scorer(scorer, device=device)
    else:
        scorer.setup()
    generation = run_method(
        instance,
        run_dir=run_dir,
        out=out,
        manifest=manifest,
        track=track,
        limit=limit,
        seeds=seeds,
        base_seed=base_seed,
        device=device,
        coco_root=coco_root,
        overwrite=overwrite,
        retry_failed=retry_failed,
        progress=progress,
        argv=["msibench.evaluate", repr(method)],
    )
    scoring = score_run(
        generation.run_dir,
        scorer,
        manifest=manifest,
        coco_root=coco_root,
        rescore=rescore,
        progress=progress,
        argv=["msibench.evaluate", repr(method)],
    )
    result = load_run(generation.run_dir)
    row = build_rows([result])[0]
    return Evaluation(Path(generation.run_dir), generation, scoring, result, row, partial=limit is not None)


def table(
    run_dirs: Sequence[str | Path],
    fmt: str = "md",
    *,
    paper: bool = False,
    ci: bool = False,
    allow_partial: bool = False,
) -> str:
    """Table I of scored run folders (``LABEL=DIR`` or ``DIR``), as ``msibench table`` prints it."""
    from msibench.scoring.table import load_paper_table, load_run, render_table

    runs = [load_run(str(d)) for d in run_dirs]
    return render_table(runs, fmt, paper=load_paper_table() if paper else None, ci=ci, allow_partial=allow_partial)
