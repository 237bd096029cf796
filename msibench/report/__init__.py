"""``msibench report``: a static, self-contained HTML report of runs (see :mod:`msibench.report.build`)."""
