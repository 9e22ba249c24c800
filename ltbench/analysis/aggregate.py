"""Collect every cell's ``metrics.json`` into tidy pandas tables (CSV): the one source of every number
the report shows (:mod:`ltbench.report` renders these files and recomputes nothing).

- ``runs.csv``: one row per run and metric (top1, many, medium, few) with the cell keys, seeds,
  the run directory, provenance (git commit, dirty flag, environment, device, wall time, images/s),
  the training-set size, every resolved config knob (``recipe.*``, ``train.*``,
  ``dataset_options.*``) as a column, the run's diagnostics (``diag.*``: :func:`diag_columns`) and
  (with a config) the experiments the run belongs to.
- ``per_class.csv``: one row per run and class: training count, group, test accuracy.
- ``summary.csv``: per experiment, cell (dataset, ratio, method, backbone) and metric over the
  experiment's seeds: mean, std, n, 95 % Student-t interval, seeds
  (:func:`ltbench.analysis.compare.summarize`). Without a config one experiment ``all`` spans every run.
- ``diagnostics.csv``: the CBN diagnostics (smallest prior, spread of the component means, share of
  confident pixels, top-1 with the running mixture and with batch statistics, live components per layer
  and share of collapsed layers (:func:`mixture_collapse`); ``metric`` = the name) per
  experiment and cell with CBN layers over the experiment's seeds, in ``summary.csv``'s columns.
- ``cells.csv``: every cell once with its experiments and status: ``finished``, ``failed`` (its
  training log exists but no ``metrics.json``, ``detail`` is the log's last error line; or its
  ``metrics.json`` records a ``failure`` such as a collapse, ``detail`` is its reason; or the file is
  invalid, ``detail`` says why: see :func:`check_metrics`) or ``not run``.
  Without a config: the finished runs and the invalid metrics files.

With the workflow config (``--config-json`` / ``--config``) also:

- ``comparison.csv``: per experiment with a ``reference`` and per paper entry in its scope: our
  mean / std / n / CI over the experiment's seeds, the paper's value, Δ, the equivalence test, the
  verdict and the seeds an inconclusive cell needs (:func:`ltbench.analysis.compare.compare_experiment`).
- ``gains.csv``: per claimed gain the experiment can test (``kind`` = ``claim``) and, for an
  experiment with ``figure: ablation`` or ``figure: sensitivity``, per method over the first one
  (``kind`` = ``ablation`` / ``sensitivity``), for ``figure: scaling`` per method over the first one of
  the same training length (:func:`ltbench.analysis.gains.scaling_pairs`, ``kind`` = ``scaling``): our
  gain, Welch (with its 95 % interval) and paired t-tests, Holm-adjusted p, the "no gain" equivalence
  test, the paper's gain, a verdict and the seeds a non-significant gain needs (:mod:`ltbench.analysis.gains`).
- ``findings.csv``: one row per claim the report tests (every claimed gain, sensitivity reading and
  reproduction test of every experiment), decided verdicts first: the rows of comparison.csv and
  gains.csv reshaped (:mod:`ltbench.analysis.findings`). Without a config: its header only.

- ``sequential.csv``: for an experiment with a sequential design (``seeds: {initial, max, …}``), one
  row per test (claimed gain, reproduction) and look: the look's seeds, estimate, t and boundaries,
  and the test's group-sequential decision (:func:`ltbench.analysis.sequential.experiment_table`).

- ``provenance.json`` (with a config): which config wrote the tables (its ``name`` and the hash of
  the whole config), the code (:func:`ltbench.io.code_version`), when, and how many metrics files
  went in. Configs that share a ``results_dir`` share this folder, so the last one aggregated owns it:
  :func:`written_for` tells a reader such as ``ltbench plan`` whose tables it is looking at.

A partial grid is fine: ``existing=True`` (``--existing``) aggregates the ``metrics.json`` files of the
config's cells that exist, and the others are listed in ``cells.csv`` as failed or not run.

A ``metrics.json`` carries ``schema_version`` (:data:`SCHEMA_VERSION`, written by
:mod:`ltbench.training.trainer`); one that is unreadable, of another version, lacks a key, has a
null / NaN / out-of-range accuracy or per-class lists of the wrong length is never aggregated: its
cell is listed as failed with the reason.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ltbench import io
from ltbench.analysis import compare, findings, gains, sequential
from ltbench.data.longtail import format_ratio
from ltbench.spec.config import cell_spec, figure_kinds, iter_knobs
from ltbench.spec.config import cells as config_cells

KEYS = ["dataset", "ratio", "method", "backbone"]
METRICS = ["top1", "many", "medium", "few"]
SCHEMA_VERSION = 1  # of metrics.json; ltbench.training.trainer writes it
OUTPUTS = (
    "runs.csv",
    "per_class.csv",
    "summary.csv",
    "cells.csv",
    "diagnostics.csv",
    "comparison.csv",
    "gains.csv",
    "sequential.csv",
    "findings.csv",
)
PROVENANCE = "provenance.json"
# metrics.json's `stability` and `diagnostics` entries that become runs.csv columns diag.<key>
STABILITY_KEYS = ("nonfinite_steps", "grad_norm_mean", "grad_norm_max", "grad_norm_last")
# ... and the two read from its per-layer priors (:func:`mixture_collapse`)
COLLAPSE_KEYS = ("live_components", "collapsed_layers")
DIAG_KEYS = ("min_prior", "mean_spread", "confident_share", "top1_running", "top1_batch_stats", *COLLAPSE_KEYS)
# A mixture component is live while its running prior exceeds this; a CBN layer left with one live
# component normalizes as plain BN does (its mixture has collapsed onto that component).
LIVE_PRIOR = 0.01
CELL_COLUMNS = [*KEYS, "seed", "experiments", "status", "detail", "log"]
# The train rule's log (workflow/rules/train.smk): where a failed cell's error message is.
TRAIN_LOG = "logs/train/{path}.log"


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """``metrics.json`` files as given, and every ``metrics.json`` under each directory given
    (recursively, sorted), so that ``ltbench aggregate results/demo/runs`` needs no shell glob.
    A path that does not exist is an error."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("metrics.json"))
            if not found:
                raise ValueError(f"no metrics.json file under the directory {p}")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:  # a mistyped path is a mistake to report, not a cell that failed
            raise ValueError(f"{p} does not exist (give metrics.json files or folders of them)")
    return out


def _number_problem(key: str, v: Any) -> str | None:
    if v is None:
        return f"{key} is null"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f"{key} is not a number: {v!r}"
    if math.isnan(v):
        return f"{key} is NaN"
    if not 0 <= v <= 100:
        return f"{key} = {v} is outside [0, 100]"
    return None


def _lists_problem(m: Mapping) -> str | None:
    acc, counts, groups = m["per_class_acc"], m["train_counts"], m.get("class_groups")
    if not isinstance(acc, list) or not isinstance(counts, list):
        return "per_class_acc and train_counts must be lists"
    if len(acc) != len(counts) or not counts:
        return f"per_class_acc has {len(acc)} classes but train_counts {len(counts)}"
    if groups is not None and (not isinstance(groups, list) or len(groups) != len(counts)):
        return f"class_groups does not have one entry per class ({len(counts)})"
    bad = next((k for k, a in enumerate(acc) if _number_problem("a", a)), None)
    if bad is not None:
        return f"per_class_acc[{bad}] is {acc[bad]!r}"
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts):
        return "train_counts must be non-negative integers"
    return None


def check_metrics(m: Any) -> str | None:
    """Why a loaded ``metrics.json`` cannot be aggregated, or None when it can: another
    ``schema_version`` than :data:`SCHEMA_VERSION` (or none), a ``failure`` the trainer recorded (the
    run's test predictions collapsed onto one class: its reason, verbatim), a missing key, a cell without its keys,
    an accuracy that is null / NaN / not a number / outside [0, 100], per-class lists of different lengths."""
    if not isinstance(m, dict):
        return "not a JSON object"
    version = m.get("schema_version")
    if version != SCHEMA_VERSION:
        return f"schema_version is {version!r}; this ltbench reads version {SCHEMA_VERSION}" + (
            " (written by an older ltbench or another program?)" if version is None else ""
        )
    if m.get("failure"):  # a finished run that failed a check (a collapse: train.collapse_share)
        return str(m["failure"])
    for key in ("cell", *METRICS, "per_class_acc", "train_counts"):
        if key not in m:
            return f"no {key!r} entry"
    cell = m["cell"]
    if not isinstance(cell, dict) or (miss := [k for k in (*KEYS, "seed") if k not in cell]):
        return f"'cell' lacks {miss if isinstance(cell, dict) else 'every key'}"
    for key in METRICS:
        if why := _number_problem(key, m[key]):
            return why
    return _lists_problem(m)


def load_metrics(paths: Iterable[str | Path]) -> tuple[list[dict], list[dict]]:
    """(valid, invalid): the metrics files that pass :func:`check_metrics` (with ``_path``), and one
    ``{path, cell, reason}`` per file that does not (``cell``: the file's own cell mapping, if it has one)."""
    good: list[dict] = []
    bad: list[dict[str, Any]] = []
    for p in map(str, paths):
        try:
            m = json.loads(Path(p).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            bad.append({"path": p, "cell": None, "reason": f"unreadable: {e}"})
            continue
        if why := check_metrics(m):
            cell = m.get("cell") if isinstance(m, dict) else None
            ok = isinstance(cell, dict) and all(k in cell for k in (*KEYS, "seed"))
            failed = isinstance(m, dict) and bool(m.get("failure")) and m.get("schema_version") == SCHEMA_VERSION
            bad.append({"path": p, "cell": cell if ok else None, "reason": why, "run_failure": failed})
            continue
        good.append({**m, "_path": p})
    return good, bad


def _flat(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def _run_base(m: Mapping) -> dict:
    c, code = m["cell"], m.get("code", {})
    base = {
        "dataset": c["dataset"],
        "ratio": format_ratio(c["ratio"]),
        "method": c["method"],
        "protocol": m.get("spec", {}).get("recipe", {}).get("protocol", "controlled"),
        "backbone": c["backbone"],
        "seed": c["seed"],
        "subset_seed": m.get("seeds", {}).get("subset"),
        "spec_hash": m.get("spec_hash"),
        "git_commit": code.get("git_commit"),
        "git_dirty": code.get("git_dirty"),
        "ltbench_version": code.get("ltbench"),
        "device": m.get("device"),
        "wall_time_s": m.get("wall_time_s"),
        "train_time_s": m.get("train_time_s"),
        "images_per_s": m.get("images_per_s"),
        "n_train": int(sum(m["train_counts"])),
        "reported_epoch": m.get("reported_epoch"),
        "finished_at": m.get("finished_at"),
        "run_dir": str(Path(m["_path"]).parent),
    }
    base.update({f"env.{k}": v for k, v in sorted(m.get("environment", {}).items())})
    return base


def diag_columns(m: Mapping) -> dict:
    """The run's diagnostics as ``diag.*`` columns (:mod:`ltbench.training.diagnostics`): the loss
    curve's stability for every run that records it, the CBN diagnostics for a run with CBN layers."""
    out = {f"diag.{k}": v for k, v in (m.get("stability") or {}).items() if k in STABILITY_KEYS}
    diag = m.get("diagnostics") or {}
    if diag:
        diag = {**diag, **mixture_collapse(diag.get("layers") or [])}
    out.update({f"diag.{k}": diag.get(k) for k in DIAG_KEYS if diag})
    return out


def mixture_collapse(layers: Sequence[Mapping], live: float = LIVE_PRIOR) -> dict:
    """From the per-layer running priors of a run's CBN diagnostics: ``live_components``, the mean
    over the layers of the components whose prior exceeds ``live`` (:data:`LIVE_PRIOR`), and
    ``collapsed_layers``, the share of the layers left with a single live component. Both are None
    when no layer records its priors."""
    counts = [sum(p > live for p in layer["priors"]) for layer in layers if layer.get("priors")]
    if not counts:
        return {"live_components": None, "collapsed_layers": None}
    return {
        "live_components": sum(counts) / len(counts),
        "collapsed_layers": sum(c <= 1 for c in counts) / len(counts),
    }


def tables(metrics: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, per_class) of a list of valid loaded metrics (see the module docstring)."""
    runs, per_class = [], []
    for m in metrics:
        base = {**_run_base(m), **diag_columns(m)}
        spec = m.get("spec", {})
        knobs = {
            k: _flat(v)
            for k, v in iter_knobs(
                {
                    "recipe": spec.get("recipe", {}),
                    "train": spec.get("train", {}),
                    "dataset_options": spec.get("dataset_options", {}),
                }
            )
        }
        runs += [{**base, "metric": metric, "value": m[metric], **knobs} for metric in METRICS]
        groups = m.get("class_groups") or [""] * len(m["train_counts"])
        for k, (acc, n, g) in enumerate(zip(m["per_class_acc"], m["train_counts"], groups, strict=True)):
            per_class.append(
                {**{k2: base[k2] for k2 in (*KEYS, "seed")}, "class": k, "train_count": n, "group": g, "acc": acc}
            )
    # with no finished run yet, the tables still have their key columns (a readable, empty CSV)
    runs_df = pd.DataFrame(runs) if runs else pd.DataFrame(columns=[*KEYS, "seed", "metric", "value"])
    per_class_df = (
        pd.DataFrame(per_class)
        if per_class
        else pd.DataFrame(columns=[*KEYS, "seed", "class", "train_count", "group", "acc"])
    )
    if not runs_df.empty:
        dup = runs_df[runs_df.duplicated([*KEYS, "seed", "metric"], keep=False)]
        if len(dup):
            paths = sorted(set(dup["run_dir"]))
            raise ValueError(f"two metrics files for the same cell and seed: {paths[:4]}")
    return runs_df, per_class_df


def summary_table(runs: pd.DataFrame, cfg: Mapping | None = None) -> pd.DataFrame:
    """Per experiment, cell and metric over the experiment's seeds (one experiment ``all`` over every
    run without a config): ``experiment``, the cell keys, mean, std (ddof=1), n, 95 % CI, seeds ("0 1 2")."""
    exps = dict(cfg["experiments"]) if cfg is not None else {"all": None}
    frames = []
    for name, exp in exps.items():
        r = runs if exp is None else compare.experiment_runs(runs, exp)
        s = compare.summarize_any(r[compare.RUN_COLUMNS] if not r.empty else r)
        s.insert(0, "experiment", name)
        frames.append(s)
    out = (
        pd.concat([f for f in frames if not f.empty], ignore_index=True)
        if any(not f.empty for f in frames)
        else pd.DataFrame(columns=["experiment", *compare.SUMMARY_COLUMNS])
    )
    out["ratio"] = out["ratio"].map(format_ratio)
    out["seeds"] = out["seeds"].map(lambda v: " ".join(map(str, v)))
    return out[["experiment", *KEYS, "metric", "mean", "std", "n", "ci_low", "ci_high", "ci_level", "seeds"]]


def diagnostics_table(runs: pd.DataFrame, cfg: Mapping | None = None) -> pd.DataFrame:
    """The CBN diagnostics (:data:`DIAG_KEYS`; ``metric`` = the key) per experiment and cell with CBN
    layers over the experiment's seeds, as :func:`summary_table` has the accuracies: mean, std, n, 95 % CI."""
    cols = [f"diag.{k}" for k in DIAG_KEYS if f"diag.{k}" in runs.columns]
    if not cols:
        return summary_table(pd.DataFrame(columns=compare.RUN_COLUMNS), cfg)
    top = runs.loc[runs["metric"] == "top1", [*KEYS, "seed", *cols]]
    long = top.melt(id_vars=[*KEYS, "seed"], value_vars=cols, var_name="metric", value_name="value")
    long = long.dropna(subset=["value"]).assign(metric=lambda d: d["metric"].str.removeprefix("diag."))
    return summary_table(long.astype({"value": "float64"}), cfg)


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


def _key(dataset: str, ratio: Any, method: str, backbone: str, seed: Any) -> tuple:
    return (str(dataset), format_ratio(float(ratio)), str(method), str(backbone), int(seed))


def _invalid_row(bad: Mapping, key: tuple | None, experiments: str = "") -> dict:
    key = key or ("", "", "", "", "")
    detail = bad["reason"] if bad.get("run_failure") else f"invalid metrics.json: {bad['reason']}"
    return dict(
        zip([*KEYS, "seed"], key, strict=True), experiments=experiments, status="failed", detail=detail, log=bad["path"]
    )


def _finished_keys(runs: pd.DataFrame) -> list[tuple]:
    if runs.empty:
        return []
    return list(
        dict.fromkeys(
            _key(*k)
            for k in zip(runs["dataset"], runs["ratio"], runs["method"], runs["backbone"], runs["seed"], strict=True)
        )
    )


def cell_status(cfg: Mapping | None, runs: pd.DataFrame, invalid: Sequence[dict] = ()) -> pd.DataFrame:
    """Every cell of the config once (without a config: every finished run) with its experiments and
    status, then any invalid metrics file that is no cell of the config (see the module docstring)."""
    done = set(_finished_keys(runs))
    bad_by_path = {str(Path(b["path"])): b for b in invalid}
    bad_by_key = {_key(*(b["cell"][k] for k in (*KEYS, "seed"))): b for b in invalid if b["cell"]}
    rows, used = [], set()
    cells = config_cells(cfg) if cfg is not None else []
    member = membership(cfg) if cfg is not None else {}
    results_dir = Path(cfg["results_dir"]) if cfg is not None else Path()
    for c in cells:
        key = _key(c.dataset, c.ratio, c.method, c.backbone, c.seed)
        exps = " ".join(member[(c.dataset, c.ratio, c.method, c.backbone, c.seed)])
        log = results_dir / TRAIN_LOG.format(path=c.path)
        bad = bad_by_path.get(str(results_dir / "runs" / c.path / "metrics.json")) or bad_by_key.get(key)
        if key in done:
            rows.append(
                dict(zip([*KEYS, "seed"], key, strict=True), experiments=exps, status="finished", detail="", log="")
            )
        elif bad is not None:
            used.add(bad["path"])
            rows.append(_invalid_row(bad, key, exps))
        else:
            failed = log.exists()
            rows.append(
                dict(
                    zip([*KEYS, "seed"], key, strict=True),
                    experiments=exps,
                    status="failed" if failed else "not run",
                    detail=_log_detail(log) if failed else "",
                    log=str(log) if failed else "",
                )
            )
    if cfg is None:
        rows += [
            dict(zip([*KEYS, "seed"], k, strict=True), experiments="", status="finished", detail="", log="")
            for k in sorted(done)
        ]
    rows += [
        _invalid_row(b, _key(*(b["cell"][k] for k in (*KEYS, "seed"))) if b["cell"] else None)
        for b in invalid
        if b["path"] not in used
    ]
    return pd.DataFrame(rows, columns=CELL_COLUMNS)


def existing_metrics(cfg: Mapping) -> list[Path]:
    """The ``metrics.json`` files of the config's cells that exist (finished cells)."""
    runs_dir = Path(cfg["results_dir"]) / "runs"
    return [p for c in config_cells(cfg) if (p := runs_dir / c.path / "metrics.json").exists()]


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _scaling_pairs(cfg: Mapping, exp: Mapping) -> list[tuple[str | None, str, str, str]]:
    def epochs(dataset: str, method: str, backbone: str) -> int:
        return cell_spec(cfg, dataset, method, backbone)["train"]["epochs"]

    return gains.scaling_pairs(exp, epochs)


def comparisons(runs: pd.DataFrame, cfg: Mapping) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(comparison, gains) over every experiment (experiment first; see the module docstring)."""
    comp, gain = [], []
    for name, exp in cfg["experiments"].items():
        margin = compare.margin_of(exp, cfg)
        if exp.get("reference"):
            comp.append(compare.compare_experiment(runs, name, exp, margin))
            gain.append(gains.experiment_gains(runs, name, exp, margin))
        kinds = figure_kinds(exp)
        for kind in {"ablation", "sensitivity"} & set(kinds):
            if len(exp["methods"]) > 1:
                gain.append(gains.gains_over(runs, name, exp, margin, kind=kind))
        if "scaling" in kinds:
            gain.append(gains.gains_over(runs, name, exp, margin, kind="scaling", pairs=_scaling_pairs(cfg, exp)))
    c = _concat(comp, ["experiment", "table", "row", *compare.CELL_KEYS, "quoted", "note", *compare.COMPARISON_STATS])
    g = _concat(gain, gains.EXPERIMENT_COLUMNS)
    c["seeds"] = c["seeds"].map(lambda v: " ".join(map(str, v)) if isinstance(v, list) else "")
    for df in (c, g):
        df["ratio"] = df["ratio"].map(lambda r: format_ratio(float(r)))
    return c, g


def write_csv(df: pd.DataFrame, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def main(paths: Iterable[str | Path], out_dir: Path, cfg: Mapping | None = None, existing: bool = False) -> dict:
    """Write the tables of the module docstring into ``out_dir``; returns {name: DataFrame}."""
    files = expand_paths(paths)
    if existing:
        if cfg is None:
            raise ValueError("--existing needs the workflow config (--config or --config-json)")
        files = sorted(set(files) | set(existing_metrics(cfg)))
    if not files and cfg is None:
        raise ValueError("no metrics.json files given (pass them, or --existing with the config)")
    good, invalid = load_metrics(files)
    for b in invalid:
        print(
            f"ltbench aggregate: {b['path']}: not aggregated, listed as a failed cell: {b['reason']}", file=sys.stderr
        )
    runs, per_class = tables(good)
    if cfg is not None and not runs.empty:
        member = membership(cfg)
        runs.insert(
            5,
            "experiments",
            [
                " ".join(member.get(k, []))
                for k in zip(
                    runs["dataset"],
                    runs["ratio"],
                    runs["method"],
                    runs["backbone"],
                    runs["seed"].astype(int),
                    strict=True,
                )
            ],
        )
    out = {
        "runs.csv": runs,
        "per_class.csv": per_class,
        "summary.csv": summary_table(runs, cfg),
        "cells.csv": cell_status(cfg, runs, invalid),
        "diagnostics.csv": diagnostics_table(runs, cfg),
    }
    if cfg is not None:
        out["comparison.csv"], out["gains.csv"] = comparisons(runs, cfg)
        out["sequential.csv"] = sequential.table(runs, cfg)
    out["findings.csv"] = findings.findings(
        out.get("comparison.csv"), out.get("gains.csv"), cfg, out.get("sequential.csv")
    )
    for name, df in out.items():
        write_csv(df, Path(out_dir) / name)
    if cfg is not None:
        io.write_json(Path(out_dir) / PROVENANCE, provenance(cfg, len(good) + len(invalid)))
    return out


def provenance(cfg: Mapping, n_files: int) -> dict:
    """The ``provenance.json`` of an aggregate written for ``cfg`` (see the module docstring)."""
    return {
        "config": cfg["name"],
        "config_hash": io.config_hash(cfg),
        "code": io.code_version(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "metrics_files": n_files,
    }


def written_for(out_dir: str | Path) -> str | None:
    """The name of the config whose aggregate ``out_dir`` holds (its ``provenance.json``); None when the
    folder has no readable record (no aggregate yet, or one written without a config or by an ltbench
    that did not record it)."""
    try:
        rec = json.loads((Path(out_dir) / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None
    name = rec.get("config") if isinstance(rec, dict) else None
    return name if isinstance(name, str) else None
