"""Statistics over seeds and per-cell verdicts against a paper's reference numbers.

Input is a tidy *runs* table, one row per (run, metric), with columns :data:`RUN_COLUMNS`
``[dataset, ratio, method, backbone, seed, metric, value]`` (values in percent). A *cell* is one
(dataset, ratio, method, backbone, metric).

- :func:`summarize` — per cell: mean, sample std (ddof=1), n, Student-t confidence interval, seeds.
- :func:`compare` — per reference entry (from :func:`ltbench.analysis.reference.entries`): our mean vs the
  paper's value, Δ = ours − paper, the equivalence test and a verdict (rule below).
- :mod:`ltbench.analysis.gains` — claimed gains (t-tests, Holm's correction, "no gain").

Verdict rule (:func:`judge`), checked in this order, with a ``margin`` (default 1.0 point, the
config key ``margin``, per experiment overridable) and α = 0.05:

1. ``"not reported"`` — the paper's value is null/NaN (nothing to compare with, whether or not we ran it).
2. ``"quoted"`` — no runs for the cell and the paper only quotes the number from another publication.
3. ``"missing"`` — no runs for the cell (and the paper's own number).
4. ``"single run"`` — one seed: no interval exists, so nothing is decided (Δ is shown).
5. ``"reproduced"`` — equivalence shown by the two one-sided tests (TOST) at α: the 90 % Student-t
   interval of Δ, Δ ± t₀.₉₅,ₙ₋₁ · std/√n, lies inside [−margin, +margin] (a 1e-9 slack absorbs
   floating-point error, so Δ = 64.01 − 63.01 (1.000000000000007) counts as 1.0).
6. ``"inconclusive"`` — equivalence is not shown, but the paper's value lies inside our 95 % interval
   [ci_low, ci_high] (bounds included): too few seeds or too much variance to tell.
7. ``"above"`` if Δ > 0, else ``"below"`` — our 95 % interval excludes the paper's value.

An inconclusive cell also gets the seeds that would decide it at 80 % power
(:func:`ltbench.analysis.power.seeds_to_decide` with the observed Δ and std: the TOST when |Δ| < margin,
else the one-sample t-test against the paper's value). Quoted entries that we did run are judged like
any other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ltbench.analysis import power
from ltbench.analysis.reference import CELL_KEYS, entries

__all__ = ["RUN_COLUMNS", "CELL_KEYS", "VERDICTS", "summarize", "compare", "judge", "decision_line"]

RUN_COLUMNS = ["dataset", "ratio", "method", "backbone", "seed", "metric", "value"]
VERDICTS = ("reproduced", "inconclusive", "below", "above", "single run", "missing", "not reported", "quoted")
JUDGED = ("reproduced", "inconclusive", "below", "above", "single run")  # cells with runs and a paper value
ALPHA = power.ALPHA
MARGIN = 1.0  # default equivalence margin in points (the config key `margin`)
_EPS = 1e-9  # slack on margin comparisons for floating-point error
SUMMARY_COLUMNS = [*CELL_KEYS, "mean", "std", "n", "ci_low", "ci_high", "ci_level", "seeds"]


def _check_runs(runs: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in RUN_COLUMNS if c not in runs.columns]
    if missing:
        raise ValueError(f"runs table lacks column(s) {missing}; expected {RUN_COLUMNS}")
    runs = runs[RUN_COLUMNS].astype({"ratio": "float64", "value": "float64"})
    bad = runs[runs["value"].isna()]
    if len(bad):
        raise ValueError(
            "runs contain NaN values (failed runs?); drop or fix them first:\n" + bad.head(10).to_string(index=False)
        )
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


def constant(x: np.ndarray, scale: float | None = None) -> bool:
    """No variance beyond floating-point rounding (relative 1e-9 of the values' magnitude): a t-test on
    such a sample divides rounding noise by rounding noise and reports any p-value."""
    scale = float(np.abs(x).max()) if scale is None else float(scale)
    return float(np.ptp(x)) <= 1e-9 * max(1.0, scale)


def equivalence(d: float, se: float, df: float, margin: float, alpha: float = ALPHA) -> tuple[float, float, float]:
    """TOST of |true d| < margin from an estimate ``d`` with standard error ``se`` and ``df`` degrees of
    freedom: (low, high, p), the (1 − 2α) interval d ± t₁₋α · se and p = max of the two one-sided p-values.
    ``se == 0`` (no spread): the interval is the point d and p is 0 inside the margin, else 1."""
    if se == 0:
        return d, d, (0.0 if abs(d) <= margin + _EPS else 1.0)
    half = stats.t.ppf(1 - alpha, df) * se
    p = max(stats.t.sf((d + margin) / se, df), stats.t.cdf((d - margin) / se, df))
    return d - half, d + half, float(p)


def _no_decision(verdict: str) -> dict:
    return {
        "verdict": verdict,
        "tost_low": math.nan,
        "tost_high": math.nan,
        "tost_p": math.nan,
        "seeds_needed": None,
        "seeds_test": "",
    }


def judge(
    paper_value: float,
    mean: float,
    std: float,
    n: int,
    ci_low: float = math.nan,
    ci_high: float = math.nan,
    quoted: bool = False,
    margin: float = MARGIN,
    alpha: float = ALPHA,
) -> dict:
    """Verdict of one cell (the rule is in this module's docstring) with its numbers: ``verdict``,
    ``tost_low`` / ``tost_high`` (the 90 % interval of Δ), ``tost_p``, and for an inconclusive cell
    ``seeds_needed`` (None when more than :data:`power.MAX_SEEDS`) and ``seeds_test``."""
    if paper_value is None or pd.isna(paper_value):
        return _no_decision("not reported")
    if not n or pd.isna(mean):
        return _no_decision("quoted" if quoted else "missing")
    if n < 2:
        return _no_decision("single run")
    delta = mean - paper_value
    flat = std <= 1e-9 * max(1.0, abs(mean))
    se = 0.0 if flat else std / math.sqrt(n)
    low, high, p = equivalence(delta, se, n - 1, margin, alpha)
    out = {**_no_decision(""), "tost_low": low, "tost_high": high, "tost_p": p}
    if low >= -margin - _EPS and high <= margin + _EPS:
        out["verdict"] = "reproduced"
    elif not flat and not (pd.isna(ci_low) or pd.isna(ci_high)) and ci_low <= paper_value <= ci_high:
        out["verdict"] = "inconclusive"
        out["seeds_needed"], out["seeds_test"] = power.seeds_to_decide(delta, std, margin, alpha=alpha)
    else:
        out["verdict"] = "above" if delta > 0 else "below"
    return out


def verdict(
    paper_value: float,
    mean: float,
    std: float,
    n: int,
    ci_low: float = math.nan,
    ci_high: float = math.nan,
    quoted: bool = False,
    margin: float = MARGIN,
) -> str:
    """The verdict alone (see :func:`judge`)."""
    return judge(paper_value, mean, std, n, ci_low, ci_high, quoted, margin)["verdict"]


def compare(
    summary: pd.DataFrame, reference_df: pd.DataFrame, margin: float = MARGIN, alpha: float = ALPHA
) -> pd.DataFrame:
    """One row per reference entry: our statistics next to the paper's value, Δ and a verdict.

    ``summary`` is the output of :func:`summarize`; ``reference_df`` the output of
    :func:`ltbench.analysis.reference.entries` (or any frame with the cell keys, ``value`` and ``quoted``).
    Columns: the reference columns with ``value`` renamed ``paper_value``, then ``mean``, ``std``, ``n``
    (0 when we have no runs), ``ci_low``, ``ci_high``, ``seeds``, ``delta`` (ours − paper), ``margin``,
    ``tost_low``, ``tost_high``, ``tost_p``, ``verdict``, ``seeds_needed`` (nullable integer: the seeds
    that decide an inconclusive cell at 80 % power; empty with a ``seeds_test`` means more than
    :data:`power.MAX_SEEDS`) and ``seeds_test`` (``TOST`` or ``t-test``). Cells we ran that the paper
    does not report are not listed.
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
    out["margin"] = float(margin)
    judged = pd.DataFrame(
        [
            judge(r.paper_value, r.mean, r.std, r.n, r.ci_low, r.ci_high, bool(r.quoted), margin, alpha)
            for r in out.itertuples(index=False)
        ],
        columns=list(_no_decision("")),
        index=out.index,
    )
    judged["seeds_needed"] = judged["seeds_needed"].astype("Int64")
    return pd.concat([out, judged], axis=1)


def decision_line(
    df: pd.DataFrame,
    undecided: str = "inconclusive",
    verdict_col: str = "verdict",
    judged: tuple = JUDGED,
    n_cols: tuple = ("n",),
    noun: str = "cells",
) -> str:
    """One sentence on how many rows are undecided and how many more seeds would decide them, e.g.
    "12 of 18 cells inconclusive; 3 more seeds would decide 6 of them, 25 more all 12".

    Rows are those whose verdict is in ``judged``; extra seeds = ``seeds_needed`` − the smallest of
    ``n_cols`` (per method for a gain). The first figure is the median extra, the second the largest.
    "" when no row is judged."""
    rows = df[df[verdict_col].isin(judged)]
    if rows.empty:
        return ""
    und = rows[rows[verdict_col] == undecided]
    text = f"{len(und)} of {len(rows)} {noun} {undecided}"
    if und.empty:
        return text
    have = und[list(n_cols)].min(axis=1)
    extra = sorted(int(s - h) for s, h in zip(und["seeds_needed"], have, strict=True) if not pd.isna(s))
    beyond = len(und) - len(extra)
    parts = []
    if extra:
        k = max(extra[(len(extra) - 1) // 2], 0)
        parts.append(f"{k} more seed{'s' * (k != 1)} would decide {sum(e <= k for e in extra)} of them")
        if extra[-1] > k:
            parts[-1] += f", {extra[-1]} more all {len(extra)}"
    if beyond:
        parts.append(f"{beyond} would need more than {power.MAX_SEEDS} seeds")
    return text + "; " + "; ".join(parts)


# ---------------------------------------------------------------- experiments of a workflow config
#
# An experiment (a named entry of the config's ``experiments``) is a grid: datasets × ratios × methods ×
# backbones × seeds, optionally naming the paper table it reproduces (``reference: {paper, table}``).
# The functions below restrict runs and reference entries to one experiment and judge them.


def margin_of(exp: Mapping, cfg: Mapping | None = None) -> float:
    """The experiment's equivalence margin: its own ``margin``, else the config's, else :data:`MARGIN`."""
    if exp.get("margin") is not None:
        return float(exp["margin"])
    return float((cfg or {}).get("margin", MARGIN))


def table_label(table: Any) -> str | None:
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
    m = (
        ref["dataset"].isin(exp["datasets"])
        & ref["ratio"].astype(float).isin(_ratios(exp))
        & ref["backbone"].isin(exp["backbones"])
    )
    return ref[m].reset_index(drop=True)


def experiment_runs(runs: pd.DataFrame, exp: Mapping) -> pd.DataFrame:
    """The runs (columns :data:`RUN_COLUMNS`) of the experiment's cells and seeds, values not NaN."""
    if runs.empty:
        return pd.DataFrame(
            {c: pd.Series(dtype="float64" if c in ("ratio", "value") else "object") for c in RUN_COLUMNS}
        )
    r = runs.astype({"ratio": "float64"})
    m = (
        r["dataset"].isin(exp["datasets"])
        & r["ratio"].isin(_ratios(exp))
        & r["method"].isin(exp["methods"])
        & r["backbone"].isin(exp["backbones"])
        & r["seed"].astype(int).isin([int(s) for s in exp["seeds"]])
    )
    return _check_runs(r[m].dropna(subset=["value"]))


def summarize_any(runs: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """:func:`summarize`, also for an empty runs table (then an empty frame with its columns)."""
    if runs.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    return summarize(runs, level)


COMPARISON_STATS = [
    "paper_value",
    "mean",
    "std",
    "n",
    "ci_low",
    "ci_high",
    "seeds",
    "delta",
    "margin",
    "tost_low",
    "tost_high",
    "tost_p",
    "verdict",
    "seeds_needed",
    "seeds_test",
]


def compare_experiment(
    runs: pd.DataFrame, name: str, exp: Mapping, margin: float = MARGIN, level: float = 0.95
) -> pd.DataFrame:
    """:func:`compare` for the reference entries in the experiment's scope (see :func:`entries_in_scope`),
    with our statistics over the experiment's seeds; column ``experiment`` first. Empty without reference."""
    scope = entries_in_scope(reference_table(exp), exp)
    if scope.empty:
        return pd.DataFrame(columns=["experiment", *scope.columns.drop("value", errors="ignore"), *COMPARISON_STATS])
    out = compare(summarize_any(experiment_runs(runs, exp), level), scope, margin)
    out.insert(0, "experiment", name)
    return out
