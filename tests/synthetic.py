"""Synthetic ``metrics.json`` files for a config's grid (what `ltbench train` writes, minus training).

A cell's value for a metric is ``base + offset + scale * SIGN[seed]`` where ``base`` is the paper's
value (the first entry of the CBN reference for that method/cell/metric, else 40 + the method's
index), ``offset`` a designed deviation and SIGN = (−1, 0, +1) for seeds 0, 1, 2, so the mean over the
three seeds is exactly ``base + offset`` and the standard deviation exactly ``scale`` (:func:`scale`:
0.5 for ``baseline``, 0.3 otherwise, so paired differences against the baseline vary across seeds).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from ltbench import data
from ltbench.analysis.aggregate import METRICS, SCHEMA_VERSION
from ltbench.analysis.reference import entries
from ltbench.spec import config

SIGN = {0: -1.0, 1: 0.0, 2: 1.0}


def scale(method: str) -> float:
    """The std over seeds 0-2 of every synthetic cell of ``method``."""
    return 0.5 if method == "baseline" else 0.3


def paper_base() -> dict:
    """(dataset, ratio, method, backbone, metric) -> the first CBN reference value (Table 2 before 3, 4)."""
    out = {}
    for r in entries("cbn2022").dropna(subset=["value"]).itertuples(index=False):
        out.setdefault((r.dataset, float(r.ratio), r.method, r.backbone, r.metric), float(r.value))
    return out


def metrics_for(
    cfg: dict, cell: config.Cell, values: dict[str, float], wall_time_s: float = 3600.0, device: str = "cuda:0"
) -> dict:
    spec = config.cell_spec(cfg, cell.dataset, cell.method, cell.backbone)
    counts = data.counts_for(cell.dataset, float(cell.ratio), spec["dataset_options"]["profile"])
    groups = data.class_groups(
        counts, spec["dataset_options"]["many_threshold"], spec["dataset_options"]["few_threshold"]
    )
    k = len(counts)
    slope = [(k - 1) / 2 - i for i in range(k)]  # centred: the per-class mean is top1
    per_class = [values["top1"] + 0.1 * s for s in slope]
    return {
        "schema_version": SCHEMA_VERSION,
        "cell": {
            "dataset": cell.dataset,
            "ratio": float(cell.ratio),
            "method": cell.method,
            "backbone": cell.backbone,
            "seed": cell.seed,
        },
        **{m: values[m] for m in METRICS},
        "reported_epoch": spec["train"]["epochs"],
        "per_class_acc": per_class,
        "train_counts": counts,
        "class_groups": groups,
        "seeds": {"train": cell.seed, "subset": spec["dataset_options"]["subset_seed"]},
        "spec": spec,
        "spec_hash": "synthetic000",
        "code": {"ltbench": "0.1.0", "git_commit": "0123456789abcdef0123", "git_dirty": False},
        "environment": {
            "python": "3.11.7",
            "torch": "2.14.1",
            "host": "synthetic",
            "gpu": "NVIDIA H100",
            "cuda": "13.0",
            "platform": "Linux",
        },
        "device": device,
        "wall_time_s": wall_time_s,
        "train_time_s": wall_time_s * 0.9,
        "images_per_s": 5000.0,
        "finished_at": "2026-01-01T00:00:00+0000",
    }


def write_grid(
    cfg: dict,
    offset: Callable[[config.Cell, str], float] = lambda c, m: 0.0,
    skip: Iterable[tuple] = (),
    base: dict | None = None,
) -> list[Path]:
    """Write metrics.json for every cell of ``cfg`` except those whose (dataset, ratio, method, backbone,
    seed) key — or (dataset, ratio, method, backbone) for all seeds — is in ``skip``. Returns the paths."""
    base = paper_base() if base is None else base
    skip = set(skip)
    methods = list(dict.fromkeys(m for e in cfg["experiments"].values() for m in e["methods"]))
    paths = []
    for c in config.cells(cfg):
        key = (c.dataset, c.ratio, c.method, c.backbone)
        if key in skip or (*key, c.seed) in skip:
            continue
        values = {}
        for m in METRICS:
            b = base.get((c.dataset, float(c.ratio), c.method, c.backbone, m), 40.0 + methods.index(c.method))
            values[m] = b + offset(c, m) + scale(c.method) * SIGN.get(c.seed, 0.0)
        p = Path(cfg["results_dir"]) / "runs" / c.path / "metrics.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(metrics_for(cfg, c, values)))
        paths.append(p)
    return paths
