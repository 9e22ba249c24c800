"""ltbench: a reproducibility benchmark harness for long-tailed image recognition."""

__version__ = "0.1.0"
