"""Scoring: detection, matching, identity and background metrics over a run folder, then statistics and plots.

Importing this package stays light; torch, ultralytics, open_clip and timm are imported where they are used.
"""
