"""Collect every cell's ``metrics.json`` into tidy pandas tables.

- ``runs.csv``: one row per run and metric (top1, many, medium, few) with the cell keys, seeds,
  provenance and every resolved config knob as a column.
- ``per_class.csv``: one row per run and class: training count, group, test accuracy.
- ``summary.csv``: per cell (dataset, ratio, method, backbone) and metric: mean, std, n and the
  seeds over which they were taken.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import pandas as pd

from ltbench import io
from ltbench.config import format_ratio, iter_knobs

KEYS = ["dataset", "ratio", "method", "backbone"]
METRICS = ["top1", "many", "medium", "few"]


def load_metrics(paths: Iterable[str | Path]) -> list[dict]:
    out = []
    for p in paths:
        try:
            m = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read metrics file {p}: {e}") from None
        for key in ("cell", *METRICS, "per_class_acc", "train_counts"):
            if key not in m:
                raise ValueError(f"metrics file {p} has no {key!r} entry; is it from `ltbench train`?")
        m["_path"] = str(p)
        out.append(m)
    return out


def tables(metrics: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    runs, per_class = [], []
    for m in metrics:
        c = m["cell"]
        base = {"dataset": c["dataset"], "ratio": format_ratio(c["ratio"]), "method": c["method"],
                "backbone": c["backbone"], "seed": c["seed"], "subset_seed": m["seeds"]["subset"],
                "spec_hash": m["spec_hash"], "git_commit": m["code"].get("git_commit"),
                "device": m["device"], "wall_time_s": m["wall_time_s"], "images_per_s": m["images_per_s"],
                "reported_epoch": m["reported_epoch"]}
        knobs = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                 for k, v in iter_knobs({"recipe": m["spec"]["recipe"], "train": m["spec"]["train"]})}
        for metric in METRICS:
            runs.append({**base, "metric": metric, "value": m[metric], **knobs})
        for k, (acc, n, g) in enumerate(zip(m["per_class_acc"], m["train_counts"], m["class_groups"])):
            per_class.append({**{k2: base[k2] for k2 in (*KEYS, "seed")}, "class": k, "train_count": n,
                              "group": g, "acc": acc})
    runs_df = pd.DataFrame(runs)
    per_class_df = pd.DataFrame(per_class)
    return runs_df, per_class_df, summarize(runs_df)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (ddof=1), n and seeds over the seeds of each cell and metric."""
    if runs.empty:
        return pd.DataFrame(columns=[*KEYS, "metric", "mean", "std", "n", "seeds"])
    g = runs.dropna(subset=["value"]).groupby([*KEYS, "metric"], sort=True)
    out = g["value"].agg(["mean", "std", "count"]).rename(columns={"count": "n"})
    out["seeds"] = g["seed"].apply(lambda s: " ".join(map(str, sorted(s))))
    return out.reset_index()


def write_csv(df: pd.DataFrame, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def main(paths: list[str], out_dir: Path) -> None:
    runs, per_class, summary = tables(load_metrics(paths))
    write_csv(runs, out_dir / "runs.csv")
    write_csv(per_class, out_dir / "per_class.csv")
    write_csv(summary, out_dir / "summary.csv")
