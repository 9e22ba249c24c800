"""``findings.csv``: one row per claim the report tests, decided verdicts first (the report's first table).

The rows are those of ``gains.csv`` and ``comparison.csv``, reshaped, nothing recomputed:

- every claimed gain (``gains.csv``, ``kind`` = ``claim``), every reading of a sensitivity experiment
  (``kind`` = ``sensitivity``), every point of a scaling curve (``kind`` = ``scaling``) and every cell
  of an ablation grid (``kind`` = ``ablation``) that is not already one of the experiment's claims:
  ``ours`` is our gain in points with its 95 % Welch interval, ``paper`` the paper's claimed gain (empty
  where the paper gives no number), the verdict is ``gain_verdict`` judged on the Holm-adjusted p-value
  (``p_value``);
- every reproduction test of a paper number (``comparison.csv``, ``kind`` = ``reproduction``), except
  entries the paper quotes from elsewhere or does not report: ``ours`` is our mean with its 95 %
  Student-t interval, ``paper`` the paper's value, ``p_value`` the equivalence test's (TOST).

A sequential experiment's rows (``seeds: {initial, max}``) carry its group-sequential decision instead
(``sequential.csv``, the test's last look; :mod:`ltbench.analysis.sequential`): the fixed-design test on
all the seeds ignores that seeds were added after looking. The decision is put in the findings' words
(gain → supported, below → contradicted, no gain, undecided or undecided at max → not significant for a
gain, inconclusive for a reproduction, not reproduced → below or above), ``test`` says which decision
at how many seeds, ``p_value`` is empty (the rule compares t with each look's boundary) and the seeds
are those of the last look.

``decided`` marks a verdict the seeds decide (supported, contradicted, no gain, reproduced, below,
above). Rows are ordered decided first, then undecided (not significant, inconclusive), then the untested
(untested, single run, missing); within each, experiments in config order and each table's own order.
``claim`` says the claim in words ("Baseline + CBN over Baseline, Fashion-MNIST-LT ρ=100, ResNet-8").
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ltbench import io
from ltbench.data.longtail import format_ratio
from ltbench.spec.names import backbone_name, dataset_name, method_name

COLUMNS = [
    "experiment",
    "kind",
    "id",
    "claim",
    "source",
    "dataset",
    "ratio",
    "backbone",
    "metric",
    "method",
    "over",
    "quantity",
    "paper",
    "ours",
    "ci_low",
    "ci_high",
    "n_method",
    "n_over",
    "test",
    "p_value",
    "verdict",
    "decided",
    "seeds_needed",
]
DECIDED = ("contradicted", "supported", "no gain", "below", "above", "reproduced")
UNDECIDED = ("not significant", "inconclusive")
NOT_TESTS = ("not reported", "quoted")  # comparison.csv rows that test nothing of ours
KIND_ORDER = ("claim", "reproduction", "sensitivity", "scaling", "ablation")
METRIC_WORDS = {"top1": "top-1", "many": "Many", "medium": "Medium", "few": "Few"}
_CELL = ["dataset", "ratio", "backbone", "metric", "method", "over"]


SEQUENTIAL_TEST = "group-sequential t"  # how ``test`` starts on a sequential experiment's row
_SEQ_GAIN = {
    "gain": "supported",
    "below": "contradicted",
    "no gain": "no gain",
    "undecided": "not significant",
    "undecided at max": "not significant",
    "untested": "untested",
}
_SEQ_REPRODUCTION = {
    "reproduced": "reproduced",
    "undecided": "inconclusive",
    "undecided at max": "inconclusive",
    "untested": "untested",
}


def _where(r: Any) -> str:
    return f"{dataset_name(r.dataset)} ρ={format_ratio(float(r.ratio))}, {backbone_name(r.backbone)}"


def _metric(r: Any) -> str:
    return "" if r.metric == "top1" else f", {METRIC_WORDS.get(r.metric, r.metric)}"


def _source(paper: str | None, table: object) -> str:
    if not paper:
        return ""
    return f"{paper} Table {table}" if isinstance(table, str) and table else paper


def _table(v: str | float | None) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)) or str(v) in ("", "nan", "None"):
        return ""
    return str(int(float(v))) if str(v).replace(".", "", 1).isdigit() else str(v)


def _gain_rows(gains: pd.DataFrame, papers: Mapping[str, str | None]) -> list[dict]:
    if gains is None or gains.empty:
        return []
    claims = gains[gains["kind"] == "claim"]
    claimed = {(e, *k) for e, *k in zip(claims["experiment"], *(claims[c] for c in _CELL), strict=True)}
    rows = []
    for r in gains.itertuples(index=False):
        key = (r.experiment, *(getattr(r, c) for c in _CELL))
        if r.kind == "ablation" and key in claimed:
            continue  # the same test as the experiment's claim
        rows.append(
            {
                "experiment": r.experiment,
                "kind": r.kind,
                "id": r.claim,
                "claim": f"{method_name(r.method)} over {method_name(r.over)}, {_where(r)}{_metric(r)}",
                "source": _source(papers.get(r.experiment), _table(r.table)) if r.kind == "claim" else "",
                **{c: getattr(r, c) for c in _CELL},
                "quantity": "gain",
                "paper": r.paper_gain,
                "ours": r.gain,
                "ci_low": r.welch_ci_low,
                "ci_high": r.welch_ci_high,
                "n_method": r.n_method,
                "n_over": r.n_over,
                "test": f"{r.test} (Holm)" if isinstance(r.test, str) and r.test else "",
                "p_value": r.p_holm,
                "verdict": r.gain_verdict,
                "seeds_needed": r.seeds_needed,
            }
        )
    return rows


def _reproduction_rows(comparison: pd.DataFrame, papers: Mapping[str, str | None]) -> list[dict]:
    if comparison is None or comparison.empty:
        return []
    rows = []
    for r in comparison.itertuples(index=False):
        if r.verdict in NOT_TESTS:
            continue
        table = _table(r.table)
        label = f" row {r.row}" if isinstance(r.row, str) and r.row not in ("", "nan", "None") else ""
        rows.append(
            {
                "experiment": r.experiment,
                "kind": "reproduction",
                "id": f"Table {table}{label}" if table else "",
                "claim": f"{method_name(r.method)}{_metric(r)} as reported, {_where(r)}",
                "source": _source(papers.get(r.experiment), table),
                **{c: getattr(r, c, "") for c in _CELL if c != "over"},
                "over": "",
                "quantity": "accuracy",
                "paper": r.paper_value,
                "ours": r.mean,
                "ci_low": r.ci_low,
                "ci_high": r.ci_high,
                "n_method": r.n,
                "n_over": None,
                "test": "TOST" if not pd.isna(r.tost_p) else "",
                "p_value": r.tost_p,
                "verdict": r.verdict,
                "seeds_needed": r.seeds_needed,
            }
        )
    return rows


def _sequential_key(experiment: str, quantity: str, r: Mapping) -> tuple:
    over = r.get("over") if quantity == "gain" else ""
    ratio = format_ratio(float(r["ratio"]))
    return (experiment, quantity, r["dataset"], ratio, r["backbone"], r["metric"], r["method"], over)


def _apply_sequential(df: pd.DataFrame, looks: pd.DataFrame | None) -> pd.DataFrame:
    """The rows a sequential experiment tests take its group-sequential decision (module docstring)."""
    if looks is None or looks.empty or df.empty:
        return df
    last = looks.drop_duplicates(["experiment", "kind", "test"], keep="last")
    decided = {
        _sequential_key(r["experiment"], "accuracy" if r["kind"] == "reproduction" else "gain", r): r
        for r in last.to_dict("records")
    }
    df = df.copy()
    for i, r in df.iterrows():
        s = decided.get(_sequential_key(r["experiment"], r["quantity"], r))
        if s is None:
            continue
        d = s["decision"]
        if r["quantity"] == "gain":
            verdict = _SEQ_GAIN.get(d, "not significant")
        elif d == "not reproduced":
            verdict = "above" if s["estimate"] > 0 else "below"
        else:
            verdict = _SEQ_REPRODUCTION.get(d, "inconclusive")
        n = int(s["n"]) if not pd.isna(s["n"]) else 0
        df.loc[i, ["verdict", "test", "p_value", "seeds_needed"]] = [
            verdict,
            f"{SEQUENTIAL_TEST}: {d}" + (f" at {n} seeds" if n else ""),
            float("nan"),
            pd.NA,
        ]
        if n:
            df.loc[i, "n_method"] = n
            if r["quantity"] == "gain":
                df.loc[i, "n_over"] = n
    return df


def rank(verdict: str) -> int:
    """0: decided, 1: undecided (more seeds would decide it), 2: not tested (no runs, one seed, no spread)."""
    return 0 if verdict in DECIDED else 1 if verdict in UNDECIDED else 2


def findings(
    comparison: pd.DataFrame | None,
    gains: pd.DataFrame | None,
    cfg: Mapping | None,
    looks: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The rows of ``findings.csv`` (module docstring) from the aggregate's comparison and gains tables,
    and its sequential looks (``sequential.csv``); empty (with its columns) without a config."""
    if cfg is None:
        return pd.DataFrame(columns=COLUMNS)
    exps = list(cfg["experiments"])
    papers = {n: (e.get("reference") or {}).get("paper") for n, e in cfg["experiments"].items()}
    df = pd.DataFrame(_gain_rows(gains, papers) + _reproduction_rows(comparison, papers), columns=COLUMNS)
    if df.empty:
        return df
    df["ratio"] = df["ratio"].map(lambda v: format_ratio(float(v)))
    df = _apply_sequential(df, looks)
    df["decided"] = df["verdict"].isin(DECIDED)
    df["seeds_needed"] = pd.array(df["seeds_needed"], dtype="Int64")
    order = pd.DataFrame(
        {
            "rank": df["verdict"].map(rank),
            "exp": df["experiment"].map(lambda e: exps.index(e) if e in exps else len(exps)),
            "kind": df["kind"].map(KIND_ORDER.index),
        }
    )
    return df.loc[order.sort_values(["rank", "exp", "kind"], kind="stable").index].reset_index(drop=True)


def write(aggregate_dir: str | Path, cfg: Mapping) -> pd.DataFrame:
    """``findings.csv`` of an aggregate directory written by an ltbench without it, from the directory's
    own ``comparison.csv`` and ``gains.csv`` (no run is read again)."""
    d = Path(aggregate_dir)
    read: dict[str, pd.DataFrame | None] = {}
    for name in ("comparison", "gains"):
        p = d / f"{name}.csv"
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist: run `ltbench aggregate` with the config first")
        try:
            read[name] = pd.read_csv(p, dtype={"ratio": str, "table": str, "row": str})
        except pd.errors.EmptyDataError:
            read[name] = pd.DataFrame()
    seq = d / "sequential.csv"
    looks = pd.read_csv(seq, dtype={"ratio": str}) if seq.exists() and seq.stat().st_size else None
    out = findings(read["comparison"], read["gains"], cfg, looks)
    with io.atomic_path(d / "findings.csv") as tmp:
        out.to_csv(tmp, index=False)
    return out
