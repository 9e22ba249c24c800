"""Collect every cell's ``metrics.json`` into tidy pandas tables (CSV).

- ``runs.csv``: one row per run and metric (top1, many, medium, few) with the cell keys, seeds,
  the run directory, provenance (git commit, dirty flag, environment, device, wall time, images/s),
  the training-set size, every resolved config knob (``recipe.*``, ``train.*``,
  ``dataset_options.*``) as a column, and (with a config) the experiments the run belongs to.
- ``per_class.csv``: one row per run and class: training count, group, test accuracy.
- ``summary.csv``: per cell (dataset, ratio, method, backbone) and metric over all its seeds:
  mean, std, n, 95 % Student-t interval, seeds (:func:`ltbench.analysis.compare.summarize`).

With the workflow config (``--config-json`` / ``--config``) also:

- ``cells.csv``: every cell the config asks for (each once) with its experiments and status:
  ``finished``, ``failed`` (its training log exists but no ``metrics.json``; ``detail`` is the log's
  last error line) or ``not run``.
- ``comparison.csv``: per experiment with a ``reference`` and per paper entry in its scope: our
  mean / std / n / CI over the experiment's seeds, the paper's value, Δ and the verdict
  (:func:`ltbench.analysis.compare.compare_experiment`).
- ``gains.csv``: per claimed gain the experiment can test: our gain, Welch and paired t-tests across
  seeds, the paper's gain and a verdict (:func:`ltbench.analysis.compare.experiment_gains`).

A partial grid is fine: ``existing=True`` (``--existing``) aggregates the ``metrics.json`` files of the
config's cells that exist, and the others are listed in ``cells.csv`` as failed or not run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

from ltbench import io
from ltbench.analysis import compare
from ltbench.data.longtail import format_ratio
from ltbench.spec.config import cells as config_cells, iter_knobs

KEYS = ["dataset", "ratio", "method", "backbone"]
METRICS = ["top1", "many", "medium", "few"]
OUTPUTS = ("runs.csv", "per_class.csv", "summary.csv", "cells.csv", "comparison.csv", "gains.csv")
# The train rule's log (workflow/rules/train.smk): where a failed cell's error message is.
TRAIN_LOG = "logs/train/{path}.log"


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """``metrics.json`` files as given, and every ``metrics.json`` under each directory given
    (recursively, sorted), so that ``ltbench aggregate results/demo/runs`` needs no shell glob."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("metrics.json"))
            if not found:
                raise ValueError(f"no metrics.json file under the directory {p}")
            out.extend(found)
        else:
            out.append(p)
    return out


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


def _flat(v):
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def tables(metrics: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(runs, per_class, summary) of a list of loaded metrics (see the module docstring)."""
    runs, per_class = [], []
    for m in metrics:
        c = m["cell"]
        code = m.get("code", {})
        protocol = m.get("spec", {}).get("recipe", {}).get("protocol", "controlled")
        base = {"dataset": c["dataset"], "ratio": format_ratio(c["ratio"]), "method": c["method"], "protocol": protocol,
                "backbone": c["backbone"], "seed": c["seed"], "subset_seed": m.get("seeds", {}).get("subset"),
                "spec_hash": m.get("spec_hash"), "git_commit": code.get("git_commit"),
                "git_dirty": code.get("git_dirty"), "ltbench_version": code.get("ltbench"),
                "device": m.get("device"), "wall_time_s": m.get("wall_time_s"),
                "train_time_s": m.get("train_time_s"), "images_per_s": m.get("images_per_s"),
                "n_train": int(sum(m["train_counts"])), "reported_epoch": m.get("reported_epoch"),
                "finished_at": m.get("finished_at"), "run_dir": str(Path(m["_path"]).parent)}
        base.update({f"env.{k}": v for k, v in sorted(m.get("environment", {}).items())})
        spec = m.get("spec", {})
        knobs = {k: _flat(v) for k, v in iter_knobs({"recipe": spec.get("recipe", {}), "train": spec.get("train", {}),
                                                     "dataset_options": spec.get("dataset_options", {})})}
        for metric in METRICS:
            runs.append({**base, "metric": metric, "value": m[metric], **knobs})
        groups = m.get("class_groups") or [""] * len(m["train_counts"])
        for k, (acc, n, g) in enumerate(zip(m["per_class_acc"], m["train_counts"], groups)):
            per_class.append({**{k2: base[k2] for k2 in (*KEYS, "seed")}, "class": k, "train_count": n,
                              "group": g, "acc": acc})
    # with no finished run yet, the tables still have their key columns (a readable, empty CSV)
    runs_df = pd.DataFrame(runs) if runs else pd.DataFrame(columns=[*KEYS, "seed", "metric", "value"])
    per_class_df = (pd.DataFrame(per_class) if per_class
                    else pd.DataFrame(columns=[*KEYS, "seed", "class", "train_count", "group", "acc"]))
    if not runs_df.empty:
        dup = runs_df[runs_df.duplicated([*KEYS, "seed", "metric"], keep=False)]
        if len(dup):
            paths = sorted(set(dup["run_dir"]))
            raise ValueError(f"two metrics files for the same cell and seed: {paths[:4]}")
    return runs_df, per_class_df, summarize(runs_df)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Per cell and metric over all of its seeds: mean, std (ddof=1), n, 95 % CI, seeds ("0 1 2")."""
    cols = [*KEYS, "metric", "mean", "std", "n", "ci_low", "ci_high", "ci_level", "seeds"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    s = compare.summarize(runs[compare.RUN_COLUMNS].dropna(subset=["value"]))
    s["ratio"] = s["ratio"].map(format_ratio)
    s["seeds"] = s["seeds"].map(lambda v: " ".join(map(str, v)))
    return s[cols]


def _log_detail(path: Path) -> str:
    """The last error-looking line of a log (else its last line), for the report's missing-cell list."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if "error" in ln.lower() or "exception" in ln.lower() or "killed" in ln.lower():
            return ln[:500]
    return lines[-1][:500] if lines else "(empty log)"


def membership(cfg: Mapping) -> dict[tuple, list[str]]:
    """(dataset, ratio, method, backbone, seed) -> the experiments containing that cell (config order)."""
    out: dict[tuple, list[str]] = {}
    for name in cfg["experiments"]:
        for c in config_cells(cfg, name):
            out.setdefault((c.dataset, c.ratio, c.method, c.backbone, c.seed), []).append(name)
    return out


def cell_status(cfg: Mapping, runs: pd.DataFrame) -> pd.DataFrame:
    """Every cell of the config once, with its experiments and status (see the module docstring)."""
    done = set()
    if not runs.empty:
        done = set(zip(runs["dataset"], runs["ratio"].map(format_ratio), runs["method"], runs["backbone"],
                       runs["seed"].astype(int)))
    results = Path(cfg["results_dir"])
    rows = []
    for c in config_cells(cfg):
        key = (c.dataset, c.ratio, c.method, c.backbone, c.seed)
        log = results / TRAIN_LOG.format(path=c.path)
        if key in done:
            status, detail = "finished", ""
        elif log.exists():
            status, detail = "failed", _log_detail(log)
        else:
            status, detail = "not run", ""
        rows.append({"dataset": c.dataset, "ratio": c.ratio, "method": c.method, "backbone": c.backbone,
                     "seed": c.seed, "status": status, "detail": detail, "log": str(log) if status == "failed" else ""})
    df = pd.DataFrame(rows, columns=["dataset", "ratio", "method", "backbone", "seed", "status", "detail", "log"])
    member = membership(cfg)
    df.insert(5, "experiments", [" ".join(member[k]) for k in zip(df["dataset"], df["ratio"], df["method"],
                                                                   df["backbone"], df["seed"])])
    return df


def existing_metrics(cfg: Mapping) -> list[Path]:
    """The ``metrics.json`` files of the config's cells that exist (finished cells)."""
    runs_dir = Path(cfg["results_dir"]) / "runs"
    return [p for c in config_cells(cfg) if (p := runs_dir / c.path / "metrics.json").exists()]


def comparisons(runs: pd.DataFrame, cfg: Mapping) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(comparison, gains) over every experiment with a ``reference`` (concatenated, experiment first)."""
    comp, gain = [], []
    for name, exp in cfg["experiments"].items():
        if exp.get("reference"):
            comp.append(compare.compare_experiment(runs, name, exp))
            gain.append(compare.experiment_gains(runs, name, exp))
    nonempty = lambda frames: [f for f in frames if not f.empty]  # noqa: E731
    c = pd.concat(nonempty(comp), ignore_index=True) if nonempty(comp) else compare.compare_experiment(
        pd.DataFrame(), "", {"datasets": [], "ratios": [], "methods": [], "backbones": [], "seeds": []})
    g = pd.concat(nonempty(gain), ignore_index=True) if nonempty(gain) else compare.experiment_gains(
        pd.DataFrame(), "", {})
    if "seeds" in c.columns:
        c["seeds"] = c["seeds"].map(lambda v: " ".join(map(str, v)) if isinstance(v, list) else "")
    if "ratio" in c.columns:
        c["ratio"] = c["ratio"].map(format_ratio)
    if "ratio" in g.columns:
        g["ratio"] = g["ratio"].map(format_ratio)
    return c, g


def write_csv(df: pd.DataFrame, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def main(paths: list[str], out_dir: Path, cfg: Mapping | None = None, existing: bool = False) -> dict:
    """Write the tables of the module docstring into ``out_dir``; returns {name: DataFrame}."""
    paths = expand_paths(paths)
    if existing:
        if cfg is None:
            raise ValueError("--existing needs the workflow config (--config or --config-json)")
        paths = sorted(set(paths) | set(existing_metrics(cfg)))
    if not paths and cfg is None:
        raise ValueError("no metrics.json files given (pass them, or --existing with the config)")
    runs, per_class, summary = tables(load_metrics(paths))
    if cfg is not None and not runs.empty:
        member = membership(cfg)
        runs.insert(5, "experiments", [" ".join(member.get(k, [])) for k in zip(
            runs["dataset"], runs["ratio"], runs["method"], runs["backbone"], runs["seed"].astype(int))])
    out = {"runs.csv": runs, "per_class.csv": per_class, "summary.csv": summary}
    if cfg is not None:
        out["cells.csv"] = cell_status(cfg, runs)
        out["comparison.csv"], out["gains.csv"] = comparisons(runs, cfg)
    for name, df in out.items():
        write_csv(df, Path(out_dir) / name)
    return out
