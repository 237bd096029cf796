"""Methods for tests/test_worker.py's workers (imported in the worker process by ``module:Class``)."""

from __future__ import annotations

import os
import sys

from msibench.methods.paste import PasteMethod


class PasteDyingOnSeed13(PasteMethod):
    """paste, except that the process dies (exit code 3, a last word on stderr) when asked for seed 13."""

    def generate(self, requests):
        if any(r.seed == 13 for r in requests):
            print("dying on purpose: seed 13", file=sys.stderr, flush=True)
            os._exit(3)
        return super().generate(requests)
