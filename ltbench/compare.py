"""Statistics over seeds and per-cell verdicts against a paper's reference numbers.

Input is a tidy *runs* table, one row per (run, metric), with columns :data:`RUN_COLUMNS`
``[dataset, ratio, method, backbone, seed, metric, value]`` (values in percent). A *cell* is one
(dataset, ratio, method, backbone, metric).

- :func:`summarize` — per cell: mean, sample std (ddof=1), n, Student-t confidence interval, seeds.
- :func:`compare` — per reference entry (from :func:`ltbench.reference.entries`): our mean vs the
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

from ltbench.reference import CELL_KEYS, entries, load

__all__ = ["RUN_COLUMNS", "CELL_KEYS", "VERDICTS", "summarize", "compare", "gains", "verdict"]

RUN_COLUMNS = ["dataset", "ratio", "method", "backbone", "seed", "metric", "value"]
VERDICTS = ("reproduced", "below", "above", "missing", "not reported", "quoted")
_EPS = 1e-9  # slack on the tolerance comparison for floating-point error


def _check_runs(runs: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in RUN_COLUMNS if c not in runs.columns]
    if missing:
        raise ValueError(f"runs table lacks column(s) {missing}; expected {RUN_COLUMNS}")
    runs = runs[RUN_COLUMNS].astype({"ratio": "int64", "value": "float64"})
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
    :func:`ltbench.reference.entries` (or any frame with the cell keys, ``value`` and ``quoted``).
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
    ref = reference_df.astype({"ratio": "int64"}).rename(columns={"value": "paper_value"})
    summ = summary[CELL_KEYS + stats_cols].astype({"ratio": "int64"})
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


def gains(runs: pd.DataFrame, claims: str | Iterable[Mapping],
          reference_df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Measured vs claimed gain of ``method`` over ``over`` for each claim and cell.

    ``claims`` is a paper id (its ``claims`` and, unless ``reference_df`` is given, its entries are
    loaded) or a list of claim mappings as in the reference files. The paper's gain is the difference of
    the two methods' reference values in the claim's table (any table when the claim's table is null; NaN
    without ``reference_df`` or when either value is null). Metric: the claim's ``metric`` (default ``top1``).

    Tests across seeds: Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``) when both methods
    have n ≥ 2 runs, and a paired t-test (``scipy.stats.ttest_rel``, pairs by seed) when both have the
    same seeds and n ≥ 2. Otherwise the p-value is NaN and ``explanation`` says why (it is "" when both
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
                    welch_t, welch_p = stats.ttest_ind(a.to_numpy(), b.to_numpy(), equal_var=False)
                    if math.isnan(welch_p):
                        why.append("Welch test undefined: both methods have zero variance")
                    if list(a.index) == list(b.index):
                        paired_t, paired_p = stats.ttest_rel(a.to_numpy(), b.loc[a.index].to_numpy())
                        if math.isnan(paired_p):
                            why.append("paired test undefined: per-seed differences have zero variance")
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
