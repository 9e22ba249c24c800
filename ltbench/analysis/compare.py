"""Statistics over seeds and per-cell verdicts against a paper's reference numbers.

Input is a tidy *runs* table, one row per (run, metric), with columns :data:`RUN_COLUMNS`
``[dataset, ratio, method, backbone, seed, metric, value]`` (values in percent). A *cell* is one
(dataset, ratio, method, backbone, metric).

- :func:`summarize` — per cell: mean, sample std (ddof=1), n, Student-t confidence interval, seeds.
- :func:`compare` — per reference entry (from :func:`ltbench.analysis.reference.entries`): our mean vs the
  paper's value, Δ = ours − paper, and a verdict (rule below).
- :func:`gains` — per claimed gain (``claims`` of a reference file) and cell: our gain with Welch and
  paired t-tests across seeds, next to the paper's gain.

Verdict rule (:func:`compare`), checked in this order:

1. ``"not reported"`` — the paper's value is null/NaN (nothing to compare with, whether or not we ran it).
2. ``"quoted"`` — no runs for the cell and the paper only quotes the number from another publication.
3. ``"missing"`` — no runs for the cell (and the paper's own number).
4. ``"reproduced"`` — |Δ| ≤ ``tolerance`` (default 1.0 point; a 1e-9 slack absorbs floating-point error,
   so Δ = 64.01 − 63.01 (1.000000000000007 in floating point) counts as 1.0), **or** the paper's value lies inside our confidence
   interval [ci_low, ci_high] (bounds included; the interval exists only for n ≥ 2 seeds).
5. ``"above"`` if Δ > 0, else ``"below"``.

Quoted entries that we did run get verdicts 4–5 like any other.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
from scipy import stats

from ltbench.analysis.reference import CELL_KEYS, entries, load

__all__ = ["RUN_COLUMNS", "CELL_KEYS", "VERDICTS", "summarize", "compare", "gains", "verdict"]

RUN_COLUMNS = ["dataset", "ratio", "method", "backbone", "seed", "metric", "value"]
VERDICTS = ("reproduced", "below", "above", "missing", "not reported", "quoted")
_EPS = 1e-9  # slack on the tolerance comparison for floating-point error


def _check_runs(runs: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in RUN_COLUMNS if c not in runs.columns]
    if missing:
        raise ValueError(f"runs table lacks column(s) {missing}; expected {RUN_COLUMNS}")
    runs = runs[RUN_COLUMNS].astype({"ratio": "float64", "value": "float64"})
    bad = runs[runs["value"].isna()]
    if len(bad):
        raise ValueError("runs contain NaN values (failed runs?); drop or fix them first:\n"
                         + bad.head(10).to_string(index=False))
    dup = runs[runs.duplicated(CELL_KEYS + ["seed"], keep=False)]
    if len(dup):
        raise ValueError("runs contain more than one value per cell and seed:\n" + dup.head(10).to_string(index=False))
    return runs


def summarize(runs: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Per cell (dataset, ratio, method, backbone, metric) statistics across seeds.

    Columns: the cell keys, ``mean``, ``std`` (sample std, ddof=1; NaN for n=1), ``n``, ``ci_low``,
    ``ci_high`` (two-sided Student-t interval at ``level``: mean ± t_{(1+level)/2, n−1} · std/√n; NaN for
    n=1), ``ci_level`` and ``seeds`` (sorted list). Raises ``ValueError`` on missing columns, NaN values
    or two values for the same cell and seed.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    runs = _check_runs(runs)
    g = runs.groupby(CELL_KEYS, sort=True)
    out = g["value"].agg(mean="mean", std=lambda v: v.std(ddof=1), n="count")
    out["n"] = out["n"].astype("int64")
    with np.errstate(invalid="ignore"):
        df = (out["n"] - 1).where(out["n"] > 1)  # t.ppf with df NaN -> NaN
        half = stats.t.ppf((1 + level) / 2, df) * out["std"] / np.sqrt(out["n"])
    out["ci_low"] = out["mean"] - half
    out["ci_high"] = out["mean"] + half
    out["ci_level"] = level
    out["seeds"] = g["seed"].agg(lambda s: sorted(s.tolist()))
    return out.reset_index()


def verdict(paper_value: float, mean: float, n: int, ci_low: float = math.nan, ci_high: float = math.nan,
            quoted: bool = False, tolerance: float = 1.0) -> str:
    """Verdict for one cell; the rule is in this module's docstring."""
    if paper_value is None or pd.isna(paper_value):
        return "not reported"
    if not n or pd.isna(mean):
        return "quoted" if quoted else "missing"
    delta = mean - paper_value
    if abs(delta) <= tolerance + _EPS:
        return "reproduced"
    if not (pd.isna(ci_low) or pd.isna(ci_high)) and ci_low <= paper_value <= ci_high:
        return "reproduced"
    return "above" if delta > 0 else "below"


def compare(summary: pd.DataFrame, reference_df: pd.DataFrame, tolerance: float = 1.0) -> pd.DataFrame:
    """One row per reference entry: our statistics next to the paper's value, Δ and a verdict.

    ``summary`` is the output of :func:`summarize`; ``reference_df`` the output of
    :func:`ltbench.analysis.reference.entries` (or any frame with the cell keys, ``value`` and ``quoted``).
    Columns: the reference columns with ``value`` renamed ``paper_value``, then ``mean``, ``std``, ``n``
    (0 when we have no runs), ``ci_low``, ``ci_high``, ``seeds``, ``delta`` (ours − paper) and ``verdict``.
    Cells we ran that the paper does not report are not listed.
    """
    if "seed" in summary.columns and "mean" not in summary.columns:
        raise ValueError("compare() takes summarize(runs), not the runs table itself")
    need = set(CELL_KEYS) | {"value", "quoted"}
    if missing := sorted(need - set(reference_df.columns)):
        raise ValueError(f"reference table lacks column(s) {missing}")
    stats_cols = ["mean", "std", "n", "ci_low", "ci_high", "seeds"]
    ref = reference_df.astype({"ratio": "float64"}).rename(columns={"value": "paper_value"})
    summ = summary[CELL_KEYS + stats_cols].astype({"ratio": "float64"})
    out = ref.merge(summ, on=CELL_KEYS, how="left", validate="many_to_one")
    out["n"] = out["n"].fillna(0).astype("int64")
    out["delta"] = out["mean"] - out["paper_value"]
    out["verdict"] = [verdict(r.paper_value, r.mean, r.n, r.ci_low, r.ci_high, bool(r.quoted), tolerance)
                      for r in out.itertuples(index=False)]
    return out


def _cell_values(runs: pd.DataFrame, cell: Mapping, method: str) -> pd.Series:
    sel = runs[(runs["dataset"] == cell["dataset"]) & (runs["ratio"] == cell["ratio"])
               & (runs["method"] == method) & (runs["backbone"] == cell["backbone"])
               & (runs["metric"] == cell["metric"])]
    return sel.set_index("seed")["value"].sort_index()


def _paper_value(reference_df: pd.DataFrame | None, table, cell: Mapping, method: str) -> float:
    if reference_df is None:
        return math.nan
    r = reference_df
    sel = ((r["dataset"] == cell["dataset"]) & (r["ratio"] == cell["ratio"]) & (r["method"] == method)
           & (r["backbone"] == cell["backbone"]) & (r["metric"] == cell["metric"]))
    if table is not None and "table" in r.columns:
        sel &= (r["table"] == table).fillna(False)
    vals = r.loc[sel, "value"]
    if len(vals) > 1:
        raise ValueError(f"reference has {len(vals)} entries for {method!r} at {dict(cell)} in table {table!r};"
                         " give the claim a table number")
    return float(vals.iloc[0]) if len(vals) else math.nan


def _constant(x: np.ndarray, scale: float | None = None) -> bool:
    """No variance beyond floating-point rounding (relative 1e-9 of the values' magnitude): a t-test on
    such a sample divides rounding noise by rounding noise and reports any p-value."""
    scale = float(np.abs(x).max()) if scale is None else float(scale)
    return float(np.ptp(x)) <= 1e-9 * max(1.0, scale)


def gains(runs: pd.DataFrame, claims: str | Iterable[Mapping],
          reference_df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Measured vs claimed gain of ``method`` over ``over`` for each claim and cell.

    ``claims`` is a paper id (its ``claims`` and, unless ``reference_df`` is given, its entries are
    loaded) or a list of claim mappings as in the reference files. The paper's gain is the difference of
    the two methods' reference values in the claim's table (any table when the claim's table is null; NaN
    without ``reference_df`` or when either value is null). Metric: the claim's ``metric`` (default ``top1``).

    Tests across seeds: Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``) when both methods
    have n ≥ 2 runs, and a paired t-test (``scipy.stats.ttest_rel``, pairs by seed) when both have the
    same seeds and n ≥ 2. A sample whose spread is floating-point rounding only (see :func:`_constant`)
    counts as zero variance: the test is undefined. Otherwise the p-value is NaN and ``explanation`` says why (it is "" when both
    tests ran). Columns: claim, table, description, dataset, ratio, backbone, metric, method, over,
    n_method, n_over, mean_method, mean_over, gain (ours), paper_gain, welch_t, welch_p, paired_t,
    paired_p, explanation.
    """
    if isinstance(claims, str):
        paper = claims
        claims = load(paper).get("claims", [])
        if reference_df is None:
            reference_df = entries(paper)
    runs = _check_runs(runs)
    rows = []
    for c in claims:
        metric = c.get("metric", "top1")
        for cell in c["cells"]:
            cell = {**cell, "backbone": c["backbone"], "metric": metric}
            a, b = _cell_values(runs, cell, c["method"]), _cell_values(runs, cell, c["over"])
            why = []
            for name, v in ((c["method"], a), (c["over"], b)):
                if len(v) == 0:
                    why.append(f"no runs of {name!r}")
                elif len(v) < 2:
                    why.append(f"only {len(v)} run of {name!r}: t-tests need n >= 2")
            welch_t = welch_p = paired_t = paired_p = math.nan
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # zero-variance samples -> NaN, explained below
                if len(a) >= 2 and len(b) >= 2:
                    if _constant(a.to_numpy()) and _constant(b.to_numpy()):
                        why.append("Welch test undefined: both methods have zero variance")
                    else:
                        welch_t, welch_p = stats.ttest_ind(a.to_numpy(), b.to_numpy(), equal_var=False)
                    if list(a.index) == list(b.index):
                        diff = a.to_numpy() - b.loc[a.index].to_numpy()
                        if _constant(diff, scale=np.abs(a.to_numpy()).max()):
                            why.append("paired test undefined: per-seed differences have zero variance")
                        else:
                            paired_t, paired_p = stats.ttest_rel(a.to_numpy(), b.loc[a.index].to_numpy())
                    else:
                        why.append("seeds differ between the methods: no paired test")
            pa = _paper_value(reference_df, c["table"], cell, c["method"])
            pb = _paper_value(reference_df, c["table"], cell, c["over"])
            rows.append({
                "claim": c["id"], "table": c["table"], "description": c.get("description", ""),
                "dataset": cell["dataset"], "ratio": cell["ratio"], "backbone": cell["backbone"],
                "metric": metric, "method": c["method"], "over": c["over"],
                "n_method": len(a), "n_over": len(b),
                "mean_method": a.mean() if len(a) else math.nan, "mean_over": b.mean() if len(b) else math.nan,
                "gain": (a.mean() - b.mean()) if len(a) and len(b) else math.nan,
                "paper_gain": pa - pb,
                "welch_t": float(welch_t), "welch_p": float(welch_p),
                "paired_t": float(paired_t), "paired_p": float(paired_p),
                "explanation": "; ".join(why),
            })
    cols = ["claim", "table", "description", "dataset", "ratio", "backbone", "metric", "method", "over",
            "n_method", "n_over", "mean_method", "mean_over", "gain", "paper_gain", "welch_t", "welch_p",
            "paired_t", "paired_p", "explanation"]
    return pd.DataFrame(rows, columns=cols)


# ---------------------------------------------------------------- experiments of a workflow config
#
# An experiment (a named entry of the config's ``experiments``) is a grid: datasets × ratios × methods ×
# backbones × seeds, optionally naming the paper table it reproduces (``reference: {paper, table}``).
# The functions below restrict runs and reference entries to one experiment and judge them.

ALPHA = 0.05
GAIN_VERDICTS = ("supported", "not significant", "contradicted", "untested")


def table_label(table) -> str | None:
    """A table given as 2, "2" or None -> "2" / None (reference tables are compared as strings)."""
    if table is None or (not isinstance(table, str) and pd.isna(table)):
        return None
    return str(int(table)) if isinstance(table, (int, float, np.integer)) else str(table).strip()


def reference_table(exp: Mapping) -> pd.DataFrame | None:
    """Entries of the paper table ``exp["reference"]`` names (every entry of the paper when it names no
    table), in the reference file's order; None when the experiment has no reference.

    Raises ``KeyError`` for an unknown paper and ``ValueError`` for a table the paper file lacks."""
    ref = exp.get("reference")
    if not ref:
        return None
    df = entries(ref["paper"])
    label = table_label(ref.get("table"))
    if label is not None:
        tables = df["table"].astype("string")
        sel = df[(tables == label).fillna(False)]
        if sel.empty:
            known = sorted(set(tables.dropna()))
            raise ValueError(f"reference {ref['paper']!r} has no table {ref.get('table')!r}; its tables: {known}")
        df = sel
    return df.reset_index(drop=True)


def _ratios(exp: Mapping) -> set[float]:
    return {float(r) for r in exp["ratios"]}


def entries_in_scope(ref: pd.DataFrame | None, exp: Mapping) -> pd.DataFrame:
    """Reference entries whose dataset, ratio and backbone are among the experiment's (any method)."""
    if ref is None or ref.empty:
        return pd.DataFrame(columns=list(ref.columns) if ref is not None else ["table", *CELL_KEYS, "value"])
    m = (ref["dataset"].isin(exp["datasets"]) & ref["ratio"].astype(float).isin(_ratios(exp))
         & ref["backbone"].isin(exp["backbones"]))
    return ref[m].reset_index(drop=True)


def experiment_runs(runs: pd.DataFrame, exp: Mapping) -> pd.DataFrame:
    """The runs (columns :data:`RUN_COLUMNS`) of the experiment's cells and seeds, values not NaN."""
    if runs.empty:
        return pd.DataFrame({c: pd.Series(dtype="float64" if c in ("ratio", "value") else "object")
                             for c in RUN_COLUMNS})
    r = runs.astype({"ratio": "float64"})
    m = (r["dataset"].isin(exp["datasets"]) & r["ratio"].isin(_ratios(exp)) & r["method"].isin(exp["methods"])
         & r["backbone"].isin(exp["backbones"]) & r["seed"].astype(int).isin([int(s) for s in exp["seeds"]]))
    return _check_runs(r[m].dropna(subset=["value"]))


def summarize_any(runs: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """:func:`summarize`, also for an empty runs table (then an empty frame with its columns)."""
    if runs.empty:
        return pd.DataFrame(columns=[*CELL_KEYS, "mean", "std", "n", "ci_low", "ci_high", "ci_level", "seeds"])
    return summarize(runs, level)


def compare_experiment(runs: pd.DataFrame, name: str, exp: Mapping, tolerance: float = 1.0,
                       level: float = 0.95) -> pd.DataFrame:
    """:func:`compare` for the reference entries in the experiment's scope (see :func:`entries_in_scope`),
    with our statistics over the experiment's seeds; column ``experiment`` first. Empty without reference."""
    scope = entries_in_scope(reference_table(exp), exp)
    cols = ["experiment", *scope.columns.drop("value", errors="ignore"), "paper_value", "mean", "std", "n",
            "ci_low", "ci_high", "seeds", "delta", "verdict"]
    if scope.empty:
        return pd.DataFrame(columns=cols)
    out = compare(summarize_any(experiment_runs(runs, exp), level), scope, tolerance)
    out.insert(0, "experiment", name)
    return out


def _expected_sign(claim: Mapping, ref: pd.DataFrame) -> int:
    """+1 or -1: the sign of the paper's mean gain over the claim's own cells (+1 without numbers)."""
    metric = claim.get("metric", "top1")
    diffs = []
    for cell in claim["cells"]:
        cell = {**cell, "backbone": claim["backbone"], "metric": metric}
        diffs.append(_paper_value(ref, claim["table"], cell, claim["method"])
                     - _paper_value(ref, claim["table"], cell, claim["over"]))
    diffs = [d for d in diffs if not math.isnan(d)]
    return -1 if diffs and sum(diffs) < 0 else 1


def experiment_claims(exp: Mapping) -> list[dict]:
    """The paper's claimed gains that this experiment can test, with their cells in the experiment.

    A claim applies when its table is the experiment's (any claim when the experiment names no table)
    and both of its methods are among the experiment's. Its cells are the claim's own cells inside the
    experiment; when the experiment has no reference entry in scope at all (e.g. digits-lt instead of
    CIFAR: our numbers in the paper's layout) every claim is tested on all of the experiment's cells,
    without a paper gain. Each returned claim carries ``expected_sign`` (the sign of the paper's gain on
    its own cells; +1 when the paper gives no numbers)."""
    ref_exp = exp.get("reference")
    if not ref_exp:
        return []
    paper = ref_exp["paper"]
    data = load(paper)
    full = entries(paper)
    label = table_label(ref_exp.get("table"))
    reference_free = entries_in_scope(reference_table(exp), exp).empty
    out, seen = [], set()
    for c in data.get("claims", []):
        if label is not None and table_label(c["table"]) != label:
            continue
        if c["method"] not in exp["methods"] or c["over"] not in exp["methods"]:
            continue
        sign = _expected_sign(c, full)
        if reference_free:
            targets = [(d, r, b) for d in exp["datasets"] for r in exp["ratios"] for b in exp["backbones"]]
        else:
            targets = [(cell["dataset"], cell["ratio"], c["backbone"]) for cell in c["cells"]
                       if cell["dataset"] in exp["datasets"] and float(cell["ratio"]) in _ratios(exp)
                       and c["backbone"] in exp["backbones"]]
        by_backbone: dict[str, list] = {}
        for d, r, b in targets:
            key = (c["method"], c["over"], c.get("metric", "top1"), d, float(r), b)
            if key not in seen:
                seen.add(key)
                by_backbone.setdefault(b, []).append({"dataset": d, "ratio": r})
        for b, cells in by_backbone.items():
            out.append({**c, "backbone": b, "cells": cells, "expected_sign": sign})
    return out


def gain_verdict(gain: float, p: float, expected_sign: int = 1, alpha: float = ALPHA) -> str:
    """``untested`` (no p-value), ``supported`` (our gain has the claimed sign and p < alpha),
    ``contradicted`` (the opposite sign and p < alpha), else ``not significant``."""
    if p is None or pd.isna(p) or pd.isna(gain):
        return "untested"
    if p >= alpha or gain == 0:
        return "not significant"
    return "supported" if (gain > 0) == (expected_sign > 0) else "contradicted"


def _judge_gains(g: pd.DataFrame, signs: list[int], alpha: float) -> pd.DataFrame:
    g = g.copy()
    g["expected_sign"] = signs
    paired = g["paired_p"].notna()
    g["test"] = np.where(paired, "paired t", np.where(g["welch_p"].notna(), "Welch t", ""))
    g["p_value"] = g["paired_p"].where(paired, g["welch_p"])
    g["gain_verdict"] = [gain_verdict(a, p, s, alpha) for a, p, s in zip(g["gain"], g["p_value"], signs)]
    return g


def experiment_gains(runs: pd.DataFrame, name: str, exp: Mapping, alpha: float = ALPHA) -> pd.DataFrame:
    """:func:`gains` for :func:`experiment_claims` on the experiment's runs, judged with
    :func:`gain_verdict` on the paired t-test's p-value (Welch's when no pairing by seed is possible).
    Extra columns: ``experiment`` (first), ``expected_sign``, ``test``, ``p_value``, ``gain_verdict``."""
    claims = experiment_claims(exp)
    if not claims:
        return pd.DataFrame(columns=["experiment", "claim", "table", "description", "dataset", "ratio", "backbone",
                                     "metric", "method", "over", "n_method", "n_over", "mean_method", "mean_over",
                                     "gain", "paper_gain", "welch_t", "welch_p", "paired_t", "paired_p",
                                     "explanation", "expected_sign", "test", "p_value", "gain_verdict"])
    full = entries(exp["reference"]["paper"])
    g = gains(experiment_runs(runs, exp), claims, full)
    signs = [c["expected_sign"] for c in claims for _ in c["cells"]]
    g = _judge_gains(g, signs, alpha)
    g.insert(0, "experiment", name)
    return g


def gains_over(runs: pd.DataFrame, exp: Mapping, over: str, alpha: float = ALPHA) -> pd.DataFrame:
    """Every other method of the experiment against ``over`` on every cell of the experiment (the
    ablation heatmap): :func:`gains` columns plus ``test``, ``p_value``, ``gain_verdict`` (expected sign +)."""
    claims = [{"id": f"{m}-over-{over}", "table": None, "description": f"{m} over {over}", "method": m,
               "over": over, "backbone": b,
               "cells": [{"dataset": d, "ratio": r} for d in exp["datasets"] for r in exp["ratios"]]}
              for b in exp["backbones"] for m in exp["methods"] if m != over]
    if not claims:
        return pd.DataFrame()
    g = gains(experiment_runs(runs, exp), claims, None)
    return _judge_gains(g, [1] * len(g), alpha)
