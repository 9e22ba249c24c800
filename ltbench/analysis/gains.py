"""Claimed gains: our gain of one method over another across seeds, its tests and verdict.

For each claim (``claims`` of a reference file, e.g. "+CBN over Baseline") and cell:

- our gain = mean(method) − mean(over), next to the paper's gain;
- Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``, with its 95 % interval of the gain,
  ``welch_ci_low`` / ``welch_ci_high``) and the paired t-test by seed
  (``scipy.stats.ttest_rel``); the paired one decides when it exists, else Welch's (``test``, ``p_value``);
- Holm's correction across the claims of one experiment (``p_holm``; the ablation grid of an
  experiment is its own family) — a claim is judged on the adjusted p-value;
- the equivalence counterpart, "no gain": the two one-sided tests (TOST, α each) on the same test's
  estimate and standard error show |gain| < margin (``equiv_low`` / ``equiv_high``: the 90 % interval
  of the gain; ``equiv_p``);
- for a gain that is not significant, the seeds per method that would decide it at 80 % power
  (:func:`ltbench.analysis.power.seeds_to_decide` with the observed gain and spread: the same t-test at
  α/m, the strictest level of Holm's correction over the m tested claims, when |gain| ≥ margin; the
  "no gain" TOST at α when |gain| < margin).

Verdicts (``gain_verdict``): ``supported`` (the paper's sign, Holm-adjusted p < α), ``contradicted``
(the opposite sign, adjusted p < α), ``no gain`` (not significant and equivalent within ± margin),
``not significant`` (neither), ``untested`` (no test: fewer than two seeds on a side, or no variance).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ltbench.analysis import compare, power
from ltbench.analysis.reference import entries, load

ALPHA = power.ALPHA
CI_LEVEL = 0.95  # the Welch interval of a gain (welch_ci_low / welch_ci_high)
GAIN_VERDICTS = ("supported", "no gain", "not significant", "contradicted", "untested")
GAIN_COLUMNS = [
    "claim",
    "table",
    "description",
    "dataset",
    "ratio",
    "backbone",
    "metric",
    "method",
    "over",
    "n_method",
    "n_over",
    "mean_method",
    "mean_over",
    "sd_method",
    "sd_over",
    "sd_diff",
    "gain",
    "paper_gain",
    "welch_t",
    "welch_p",
    "welch_ci_low",
    "welch_ci_high",
    "paired_t",
    "paired_p",
    "explanation",
]
JUDGED_COLUMNS = [
    "expected_sign",
    "test",
    "p_value",
    "p_holm",
    "margin",
    "equiv_low",
    "equiv_high",
    "equiv_p",
    "gain_verdict",
    "seeds_needed",
    "seeds_test",
]
EXPERIMENT_COLUMNS = ["experiment", "kind", *GAIN_COLUMNS, *JUDGED_COLUMNS]


def _cell_values(runs: pd.DataFrame, cell: Mapping, method: str) -> pd.Series:
    sel = runs[
        (runs["dataset"] == cell["dataset"])
        & (runs["ratio"] == cell["ratio"])
        & (runs["method"] == method)
        & (runs["backbone"] == cell["backbone"])
        & (runs["metric"] == cell["metric"])
    ]
    return sel.set_index("seed")["value"].sort_index()


def _paper_value(reference_df: pd.DataFrame | None, table: Any, cell: Mapping, method: str) -> float:
    if reference_df is None:
        return math.nan
    r = reference_df
    sel = (
        (r["dataset"] == cell["dataset"])
        & (r["ratio"] == cell["ratio"])
        & (r["method"] == method)
        & (r["backbone"] == cell["backbone"])
        & (r["metric"] == cell["metric"])
    )
    if table is not None and "table" in r.columns:
        sel &= (r["table"] == table).fillna(False)
    vals = r.loc[sel, "value"]
    if len(vals) > 1:
        raise ValueError(
            f"reference has {len(vals)} entries for {method!r} at {dict(cell)} in table {table!r};"
            " give the claim a table number"
        )
    return float(vals.iloc[0]) if len(vals) else math.nan


def _tests(a: pd.Series, b: pd.Series, names: tuple[str, str]) -> dict:
    """Welch and paired t-tests of two methods' per-seed values, and why one is missing."""
    why = [
        f"no runs of {n!r}" if len(v) == 0 else f"only {len(v)} run of {n!r}: t-tests need n >= 2"
        for n, v in zip(names, (a, b), strict=True)
        if len(v) < 2
    ]
    out = dict(
        welch_t=math.nan,
        welch_p=math.nan,
        welch_ci_low=math.nan,
        welch_ci_high=math.nan,
        paired_t=math.nan,
        paired_p=math.nan,
        sd_diff=math.nan,
    )
    if len(a) < 2 or len(b) < 2:
        return {**out, "explanation": "; ".join(why)}
    x, y = a.to_numpy(), b.to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero-variance samples -> NaN, explained below
        if compare.constant(x) and compare.constant(y):
            why.append("Welch test undefined: both methods have zero variance")
        else:
            welch = stats.ttest_ind(x, y, equal_var=False)
            out["welch_t"], out["welch_p"] = float(welch.statistic), float(welch.pvalue)
            out["welch_ci_low"], out["welch_ci_high"] = map(float, welch.confidence_interval(CI_LEVEL))
        if list(a.index) == list(b.index):
            diff = x - b.loc[a.index].to_numpy()
            out["sd_diff"] = float(np.std(diff, ddof=1))
            if compare.constant(diff, scale=np.abs(x).max()):
                why.append("paired test undefined: per-seed differences have zero variance")
            else:
                out["paired_t"], out["paired_p"] = map(float, stats.ttest_rel(x, b.loc[a.index].to_numpy()))
        else:
            why.append("seeds differ between the methods: no paired test")
    return {**out, "explanation": "; ".join(why)}


def _claim_row(runs: pd.DataFrame, c: Mapping, cell: Mapping, reference_df: pd.DataFrame | None) -> dict:
    a, b = _cell_values(runs, cell, c["method"]), _cell_values(runs, cell, c["over"])
    sd = lambda v: float(v.std(ddof=1)) if len(v) > 1 else math.nan  # noqa: E731
    pa = _paper_value(reference_df, c["table"], cell, c["method"])
    pb = _paper_value(reference_df, c["table"], cell, c["over"])
    return {
        "claim": c["id"],
        "table": c["table"],
        "description": c.get("description", ""),
        "dataset": cell["dataset"],
        "ratio": cell["ratio"],
        "backbone": cell["backbone"],
        "metric": cell["metric"],
        "method": c["method"],
        "over": c["over"],
        "n_method": len(a),
        "n_over": len(b),
        "mean_method": a.mean() if len(a) else math.nan,
        "mean_over": b.mean() if len(b) else math.nan,
        "sd_method": sd(a),
        "sd_over": sd(b),
        "gain": (a.mean() - b.mean()) if len(a) and len(b) else math.nan,
        "paper_gain": pa - pb,
        **_tests(a, b, (c["method"], c["over"])),
    }


def gains(
    runs: pd.DataFrame, claims: str | Iterable[Mapping], reference_df: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Measured vs claimed gain of ``method`` over ``over`` for each claim and cell (columns :data:`GAIN_COLUMNS`).

    ``claims`` is a paper id (its ``claims`` and, unless ``reference_df`` is given, its entries are
    loaded) or a list of claim mappings as in the reference files. The paper's gain is the difference of
    the two methods' reference values in the claim's table (any table when the claim's table is null; NaN
    without ``reference_df`` or when either value is null). Metric: the claim's ``metric`` (default ``top1``).

    Welch's test runs when both methods have n ≥ 2 runs, the paired test when both have the same seeds
    and n ≥ 2. A sample whose spread is floating-point rounding only (:func:`compare.constant`) counts
    as zero variance: the test is undefined. A missing p-value is NaN and ``explanation`` says why
    ("" when both tests ran). ``sd_diff`` is the std of the per-seed differences (same seeds only).
    """
    if isinstance(claims, str):
        claim_list: Iterable[Mapping] = load(claims).get("claims", [])
        if reference_df is None:
            reference_df = entries(claims)
    else:
        claim_list = claims
    runs = compare._check_runs(runs)
    rows = [
        _claim_row(runs, c, {**cell, "backbone": c["backbone"], "metric": c.get("metric", "top1")}, reference_df)
        for c in claim_list
        for cell in c["cells"]
    ]
    return pd.DataFrame(rows, columns=GAIN_COLUMNS)


def gain_verdict(gain: float, p: float, equivalent: bool = False, expected_sign: int = 1, alpha: float = ALPHA) -> str:
    """The verdict of one claimed gain from its (Holm-adjusted) p-value and its equivalence test
    (rule in the module docstring); ``untested`` without a p-value."""
    if p is None or pd.isna(p) or pd.isna(gain):
        return "untested"
    if p < alpha and gain != 0:
        return "supported" if (gain > 0) == (expected_sign > 0) else "contradicted"
    return "no gain" if equivalent else "not significant"


def _se_df(r: Any) -> tuple[float, float, float, float]:
    """(standard error, df, power scale, df_per) of the row's deciding test (paired, else Welch)."""
    if not pd.isna(r.paired_p):
        n = r.n_method
        return r.sd_diff / math.sqrt(n), n - 1, r.sd_diff, 1.0
    v1, v2 = r.sd_method**2 / r.n_method, r.sd_over**2 / r.n_over
    df = (v1 + v2) ** 2 / (v1**2 / (r.n_method - 1) + v2**2 / (r.n_over - 1))
    scale, df_per = power.welch_scale(r.sd_method, r.sd_over)
    return math.sqrt(v1 + v2), df, scale, df_per


def _judge_row(r: Any, sign: int, p_holm: float, margin: float, alpha: float, family: int) -> dict:
    out = dict(
        expected_sign=sign,
        test="",
        p_value=math.nan,
        p_holm=p_holm,
        margin=margin,
        equiv_low=math.nan,
        equiv_high=math.nan,
        equiv_p=math.nan,
        gain_verdict="untested",
        seeds_needed=None,
        seeds_test="",
    )
    if pd.isna(r.paired_p) and pd.isna(r.welch_p):
        return out
    out["test"], out["p_value"] = ("paired t", r.paired_p) if not pd.isna(r.paired_p) else ("Welch t", r.welch_p)
    se, df, scale, df_per = _se_df(r)
    out["equiv_low"], out["equiv_high"], out["equiv_p"] = low, high, p_equiv = compare.equivalence(
        r.gain, se, df, margin, alpha
    )
    out["gain_verdict"] = gain_verdict(r.gain, p_holm, p_equiv < alpha, sign, alpha)
    if out["gain_verdict"] == "not significant":
        out["seeds_needed"], out["seeds_test"] = power.seeds_to_decide(
            r.gain, scale, margin, df_per, alpha, alpha / max(family, 1)
        )
    return out


def judge_gains(
    g: pd.DataFrame, signs: list[int], margin: float = compare.MARGIN, alpha: float = ALPHA
) -> pd.DataFrame:
    """:func:`gains` rows with :data:`JUDGED_COLUMNS`; the rows are one Holm family."""
    p = [r.paired_p if not pd.isna(r.paired_p) else r.welch_p for r in g.itertuples(index=False)]
    adjusted = power.holm(p)
    family = sum(not pd.isna(x) for x in p)
    judged = pd.DataFrame(
        [
            _judge_row(r, s, ph, margin, alpha, family)
            for r, s, ph in zip(g.itertuples(index=False), signs, adjusted, strict=True)
        ],
        columns=JUDGED_COLUMNS,
        index=g.index,
    )
    judged["seeds_needed"] = judged["seeds_needed"].astype("Int64")
    return pd.concat([g, judged], axis=1)


# ---------------------------------------------------------------- the claims of an experiment


def _expected_sign(claim: Mapping, ref: pd.DataFrame) -> int:
    """+1 or -1: the sign of the paper's mean gain over the claim's own cells (+1 without numbers)."""
    metric = claim.get("metric", "top1")
    diffs = []
    for cell in claim["cells"]:
        cell = {**cell, "backbone": claim["backbone"], "metric": metric}
        diffs.append(
            _paper_value(ref, claim["table"], cell, claim["method"])
            - _paper_value(ref, claim["table"], cell, claim["over"])
        )
    diffs = [d for d in diffs if not math.isnan(d)]
    return -1 if diffs and sum(diffs) < 0 else 1


def _claim_targets(c: Mapping, exp: Mapping, reference_free: bool) -> list[tuple]:
    if reference_free:
        return [(d, r, b) for d in exp["datasets"] for r in exp["ratios"] for b in exp["backbones"]]
    ratios = {float(r) for r in exp["ratios"]}
    return [
        (cell["dataset"], cell["ratio"], c["backbone"])
        for cell in c["cells"]
        if cell["dataset"] in exp["datasets"] and float(cell["ratio"]) in ratios and c["backbone"] in exp["backbones"]
    ]


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
    full = entries(ref_exp["paper"])
    label = compare.table_label(ref_exp.get("table"))
    reference_free = compare.entries_in_scope(compare.reference_table(exp), exp).empty
    out, seen = [], set()
    for c in load(ref_exp["paper"]).get("claims", []):
        if label is not None and compare.table_label(c["table"]) != label:
            continue
        if c["method"] not in exp["methods"] or c["over"] not in exp["methods"]:
            continue
        by_backbone: dict[str, list] = {}
        for d, r, b in _claim_targets(c, exp, reference_free):
            key = (c["method"], c["over"], c.get("metric", "top1"), d, float(r), b)
            if key not in seen:
                seen.add(key)
                by_backbone.setdefault(b, []).append({"dataset": d, "ratio": r})
        sign = _expected_sign(c, full)
        out += [{**c, "backbone": b, "cells": cells, "expected_sign": sign} for b, cells in by_backbone.items()]
    return out


def experiment_gains(
    runs: pd.DataFrame, name: str, exp: Mapping, margin: float = compare.MARGIN, alpha: float = ALPHA
) -> pd.DataFrame:
    """:func:`gains` for :func:`experiment_claims` on the experiment's runs, judged by :func:`judge_gains`
    (one Holm family). Columns :data:`EXPERIMENT_COLUMNS` (``kind`` = ``claim``)."""
    claims = experiment_claims(exp)
    if not claims:
        return pd.DataFrame(columns=EXPERIMENT_COLUMNS)
    g = gains(compare.experiment_runs(runs, exp), claims, entries(exp["reference"]["paper"]))
    g = judge_gains(g, [c["expected_sign"] for c in claims for _ in c["cells"]], margin, alpha)
    g.insert(0, "kind", "claim")
    g.insert(0, "experiment", name)
    return g


def gains_over(
    runs: pd.DataFrame,
    name: str,
    exp: Mapping,
    margin: float = compare.MARGIN,
    alpha: float = ALPHA,
    kind: str = "ablation",
    pairs: Iterable[tuple[str | None, str, str, str]] | None = None,
) -> pd.DataFrame:
    """The ablation grid: every other method of the experiment against its first method on every cell
    and metric (expected sign +), one Holm family; columns :data:`EXPERIMENT_COLUMNS` (``kind`` =
    ``ablation``, or ``sensitivity`` for an experiment with ``figure: sensitivity``: one method per
    reading of an open detail against the baseline). ``pairs``: see :func:`over_claims`."""
    claims = over_claims(exp, pairs)
    if not claims:
        return pd.DataFrame(columns=EXPERIMENT_COLUMNS)
    g = judge_gains(
        gains(compare.experiment_runs(runs, exp), claims, None),
        [1] * sum(len(c["cells"]) for c in claims),
        margin,
        alpha,
    )
    g.insert(0, "kind", kind)
    g.insert(0, "experiment", name)
    return g


def over_claims(exp: Mapping, pairs: Iterable[tuple[str | None, str, str, str]] | None = None) -> list[dict]:
    """The ablation grid's claims: every other method of the experiment over its first method, on all
    of its cells (metric top-1, expected sign +).

    ``pairs`` ((dataset, backbone, method, over) tuples, e.g. :func:`scaling_pairs`; dataset None: all
    of the experiment's) replaces "every method over the first" with the given comparisons; they form
    one Holm family all the same."""
    if pairs is None:
        first = exp["methods"][0]
        pairs = [(None, b, m, first) for b in exp["backbones"] for m in exp["methods"] if m != first]
    return [
        {
            "id": f"{m}-over-{over}",
            "table": None,
            "description": f"{m} over {over}",
            "method": m,
            "over": over,
            "backbone": b,
            "metric": "top1",
            "cells": [
                {"dataset": d, "ratio": r} for d in ([dataset] if dataset else exp["datasets"]) for r in exp["ratios"]
            ],
        }
        for dataset, b, m, over in pairs
    ]


def scaling_pairs(exp: Mapping, epochs: Callable[[str, str, str], int]) -> list[tuple[str | None, str, str, str]]:
    """The comparisons of a ``figure: scaling`` experiment: on each (dataset, backbone), its methods
    grouped by their number of training epochs (``epochs(dataset, method, backbone)``, from the cell's
    spec); within a group, each method over the group's first method in the experiment's order.

    So ``[baseline, baseline+cbn, baseline@x4, cbn@x4]`` compares ``baseline+cbn`` with ``baseline`` at 8
    epochs and ``cbn@x4`` with ``baseline@x4`` at 32, and ``[baseline, baseline+cbn]`` over several
    backbones compares the two at every depth."""
    pairs: list[tuple[str | None, str, str, str]] = []
    for d in exp["datasets"]:
        for b in exp["backbones"]:
            groups: dict[int, list[str]] = {}
            for m in exp["methods"]:
                groups.setdefault(int(epochs(d, m, b)), []).append(m)
            pairs += [(d, b, m, group[0]) for _, group in sorted(groups.items()) for m in group[1:]]
    return pairs
