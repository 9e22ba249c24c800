"""The report's section on a sequential experiment (``seeds: {initial, max, …}``): per claim and
reproduction test its decision, the looks it took, the boundary at each look and where the statistic
stood (the aggregate's ``sequential.csv``, :mod:`ltbench.analysis.sequential`; nothing is recomputed)."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import pandas as pd

TEST_KEYS = ["kind", "test", "dataset", "ratio", "backbone", "metric", "method", "over"]


def _num(v: float | None, digits: int = 2) -> str:
    if v is None or pd.isna(v):
        return "–"
    if abs(v) == float("inf"):
        return "∞" if v > 0 else "−∞"
    return f"{v:.{digits}f}"


def _look_cell(r: Any) -> str:
    """One look: n, |t| against the difference boundary, the TOST's t against its boundary."""
    if int(r.look) == 0:
        return "<td>waiting for seeds</td>"
    return (
        f"<td>n = {int(r.n)}: Δ {_num(r.estimate)}; t {_num(r.t)} vs ±{_num(r.boundary_t)}; "
        f"TOST {_num(r.equiv_t)} vs {_num(r.equiv_boundary_t)}</td>"
    )


def _test_name(first: Any) -> str:
    what = f"{first.method} over {first.over}" if isinstance(first.over, str) and first.over else first.description
    return f"{first.kind}: {what}, {first.dataset} ρ={first.ratio}, {first.backbone}, {first.metric}"


def tests_summary(looks: pd.DataFrame) -> tuple[int, int, int]:
    """(tests, decided, seeds used at most) of one experiment's looks."""
    last = looks.drop_duplicates([k for k in TEST_KEYS if k in looks.columns], keep="last")
    decided = last["decision"].isin(["gain", "below", "no gain", "reproduced", "not reproduced"]).sum()
    return len(last), int(decided), int(last["seeds_used"].max()) if len(last) else 0


def section_html(looks: pd.DataFrame, exp: Mapping) -> str:
    """The section (empty for an experiment without a sequential design)."""
    seq = exp.get("sequential")
    if not seq or looks is None or looks.empty:
        return ""
    esc = html.escape
    n_tests, decided, _ = tests_summary(looks)
    head = (
        f"<h3>Sequential verdicts</h3><p class='sub'>Seeds {seq['initial']} to {seq['max']} in steps of "
        f"{seq['step']}, {esc(seq['spending'])} alpha spending at α = {seq['alpha']:g} (Holm across each "
        f"family of claims); {decided} of {n_tests} tests decided. Each look: the estimate Δ, its t against the "
        "two-sided boundary (at the test's Holm level) and the equivalence test's smaller t against its "
        "boundary.</p>"
    )
    rows, width = [], int(looks["look"].max() or 1)
    for _, g in looks.groupby([k for k in TEST_KEYS if k in looks.columns], sort=False, dropna=False):
        first = g.iloc[0]
        cells = "".join(_look_cell(r) for r in g.itertuples())
        pad = "<td></td>" * (width - len(g))
        rows.append(
            f"<tr><td>{esc(_test_name(first))}</td><td><b>{esc(str(first.decision))}</b></td>"
            f"<td>{int(first.seeds_used)}</td><td>{first.level:.4g}</td>{cells}{pad}</tr>"
        )
    cols = "".join(f"<th>look {k + 1}</th>" for k in range(width))
    return (
        head + "<table><tr><th>test</th><th>decision</th><th>seeds</th><th>level</th>"
        f"{cols}</tr>{''.join(rows)}</table>"
    )
