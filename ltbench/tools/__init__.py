"""Tools around the pipeline: ``bench`` (training speed) and ``plan`` (the grid and its GPU-hours)."""
