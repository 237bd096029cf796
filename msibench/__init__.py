"""MSIBench: an open, reproducible benchmark for controllable multi-subject image customization."""

__version__ = "0.1.0"
