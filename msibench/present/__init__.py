"""Presentation: pages and figures that read stored results (results.json, score records) and derive nothing of
their own. The leaderboard lives here; the table, plots and report are to follow it out of ``msibench.scoring``."""
