"""The self-contained HTML comparison report of one workflow config.

Reads the aggregate directory (``ltbench aggregate``: runs, per_class, summary, cells, comparison,
gains CSVs) and renders those numbers, recomputing none (a truncated or inconsistent ``runs.csv`` is
an error, never an empty report); writes each experiment's paper-layout table
(:mod:`ltbench.report.tables`) as HTML, Markdown
and LaTeX under ``tables_dir`` and its figures (:mod:`ltbench.report.figures`) as PNG + SVG under
``figures_dir``, and one HTML file with every figure embedded (base64), in this order:

1. the status of the grid (complete, or partial: how many cells failed or did not run),
2. the summary of verdicts per experiment (paper numbers reproduced / inconclusive / below / above /
   single run / missing / …, claimed gains supported / no gain / not significant / contradicted /
   untested) with one line per experiment on what more seeds would decide,
3. per experiment: its table in the paper's layout, its claimed gains with t-tests, its figures,
   and for its runs with CBN layers their diagnostics (one row per run, runs.csv's ``diag.*`` columns),
4. the missing and failed cells (with the error line of each failed cell's log),
5. every detail the papers leave open with the value the runs used,
6. provenance: code version, config hash, environment, devices, GPU-hours spent; the config.

The page needs no network and no JavaScript.
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ltbench import io
from ltbench.analysis import aggregate, compare, power
from ltbench.analysis import gains as gains_mod
from ltbench.analysis.aggregate import KEYS, LIVE_PRIOR, METRICS
from ltbench.data.longtail import format_ratio
from ltbench.errors import ConfigError
from ltbench.report import figures, headline, tables
from ltbench.report import sequential as sequential_report
from ltbench.spec.config import figure_kinds
from ltbench.spec.methods import OPEN_DETAILS

VERDICT_ORDER = list(compare.VERDICTS)
GAIN_ORDER = list(gains_mod.GAIN_VERDICTS)

CSS = """
:root{--ok:#1e7b34;--bad:#b3261e;--up:#1a56b3;--warn:#8a6d00;--mut:#666}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem auto;max-width:1200px;
color:#1d2125;line-height:1.45;padding:0 1.2rem}
h1{font-size:1.7rem;margin-bottom:.2rem}h2{font-size:1.3rem;margin-top:2.4rem;border-bottom:2px solid #dde1e6;
padding-bottom:.2rem}h3{font-size:1.05rem;margin-top:1.4rem}
.sub{color:var(--mut);margin-top:0}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.88rem}
table.plain th,table.plain td{border:1px solid #d0d4da;padding:.25rem .55rem;text-align:right}
table.plain th{background:#eef1f5}table.plain td:first-child,table.plain th:first-child{text-align:left}
table.plain td.l{text-align:left}
.meta th{text-align:left;background:#f4f6f8;font-weight:600}.meta td{text-align:left}
figure{margin:1rem 0 1.6rem}figcaption{font-size:.85rem;color:#444;max-width:60rem}
img{max-width:100%;height:auto;border:1px solid #eee}
.banner{padding:.7rem 1rem;border-radius:6px;margin:1rem 0;font-weight:500}
.banner.complete{background:#e3f4e6;border:1px solid #9fd3ab}
.banner.partial{background:#fff4d6;border:1px solid #e6c35c}
.banner.empty{background:#fde6e4;border:1px solid #e8a29c}
.n-reproduced,.g-supported,.g-no-gain{color:var(--ok);font-weight:600}
.n-below,.g-contradicted{color:var(--bad);font-weight:600}.n-above{color:var(--up);font-weight:600}
.n-missing,.g-untested,.n-inconclusive{color:var(--warn);font-weight:600}
.n-not-reported,.n-quoted,.n-single-run,.g-not-significant{color:var(--mut)}
.gain-no-gain{background:#eef6ef}.gain-no-gain .verdict{color:var(--ok)}.decide{font-size:.85rem;color:#444}
td.zero{color:#bbb}
.gain-supported{background:#e3f4e6}.gain-supported .verdict{color:var(--ok)}
.gain-contradicted{background:#fde6e4}.gain-contradicted .verdict{color:var(--bad)}
.gain-untested{background:#f6f6f6;color:#777}.gain-untested .verdict{color:var(--warn)}
.gain-not-significant .verdict{color:var(--mut)}.tag{font-size:.72rem;border:1px solid #bbb;border-radius:3px;
padding:0 .25rem;font-weight:500}
nav.toc{background:#f7f8fa;border:1px solid #e3e6ea;border-radius:6px;padding:.5rem 1rem;font-size:.9rem}
nav.toc ul{margin:.2rem 0;padding-left:1.2rem}
details{margin:.4rem 0 1rem}summary{cursor:pointer;color:#1a56b3}
pre{background:#f7f8fa;border:1px solid #e3e6ea;padding:.6rem;overflow-y:auto;font-size:.78rem;max-height:28rem;
white-space:pre-wrap;overflow-wrap:anywhere}
.skip{color:var(--mut);font-size:.85rem}.status-failed{color:var(--bad);font-weight:600}
.status-not-run{color:var(--warn);font-weight:600}code{font-size:.85em}
.desc{max-width:60rem}
table.summary{font-size:.8rem}table.summary th,table.summary td{padding:.2rem .35rem}
"""


# ---------------------------------------------------------------- inputs

REQUIRED = {
    "runs": [*KEYS, "seed", "metric", "value"],
    "summary": ["experiment", *KEYS, "metric", "mean", "std", "n", "seeds"],
}


def _read(path: Path, required: list[str] | None = None) -> pd.DataFrame:
    """One aggregate CSV; a file that cannot be parsed or lacks a required column is a ConfigError."""
    try:
        df = pd.read_csv(path, dtype={"ratio": str}, keep_default_na=True)
    except pd.errors.EmptyDataError:
        df = pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); rerun `ltbench aggregate`") from None
    if required and (missing := [c for c in required if c not in df.columns]):
        raise ConfigError(
            f"{path} lacks the column(s) {missing} (empty, truncated or not written by "
            "`ltbench aggregate`); rerun `ltbench aggregate`"
        )
    return df


def check_aggregate(data: Mapping[str, pd.DataFrame], d: Path) -> None:
    """runs.csv and summary.csv agree: no run row is cut short, every run has all METRICS, and every
    seed summary.csv counts has its run (a truncated runs.csv fails here instead of showing fewer runs)."""
    runs, summary = data["runs"], data["summary"]
    cut = runs[runs[[*KEYS, "seed", "metric", "value"]].isna().any(axis=1)]
    if len(cut):
        raise ConfigError(
            f"{d / 'runs.csv'}: {len(cut)} row(s) lack a key or value (truncated?), first at line "
            f"{cut.index[0] + 2}; rerun `ltbench aggregate`"
        )
    per_run = runs.groupby([*KEYS, "seed"], dropna=False)["metric"].nunique()
    if (per_run != len(METRICS)).any():
        bad = per_run[per_run != len(METRICS)].index[0]
        raise ConfigError(
            f"{d / 'runs.csv'}: the run {bad} has {per_run[bad]} of the {len(METRICS)} metrics "
            "(truncated?); rerun `ltbench aggregate`"
        )
    have = set(
        zip(
            runs["dataset"],
            runs["ratio"].map(lambda r: format_ratio(float(r))),
            runs["method"],
            runs["backbone"],
            runs["metric"],
            runs["seed"].astype(int),
            strict=True,
        )
    )
    for r in summary.itertuples(index=False):
        for seed in str(r.seeds).split():
            if (r.dataset, format_ratio(float(r.ratio)), r.method, r.backbone, r.metric, int(seed)) not in have:
                raise ConfigError(
                    f"{d / 'summary.csv'} counts seed {seed} of {r.method} {r.dataset} ρ={r.ratio} "
                    f"{r.backbone} that {d / 'runs.csv'} lacks (truncated?); rerun `ltbench aggregate`"
                )


def load_aggregate(aggregate_dir: Path) -> dict[str, pd.DataFrame]:
    """The CSVs of ``ltbench aggregate`` (those present; comparison/gains need its --config), checked
    with :func:`check_aggregate`."""
    d = Path(aggregate_dir)
    if not (d / "runs.csv").exists():
        raise FileNotFoundError(f"{d / 'runs.csv'} does not exist: run `ltbench aggregate` first")
    out = {}
    for name in (
        "runs",
        "per_class",
        "summary",
        "cells",
        "comparison",
        "gains",
        "findings",
        "diagnostics",
        "sequential",
    ):
        p = d / f"{name}.csv"
        out[name] = _read(p, REQUIRED.get(name)) if p.exists() or name in REQUIRED else pd.DataFrame()
    check_aggregate(out, d)
    return out


def experiments_of(cfg: Mapping | None, runs: pd.DataFrame) -> dict[str, dict]:
    """The config's experiments; without a config, one experiment 'all' spanning the runs."""
    if cfg is not None:
        return dict(cfg["experiments"])
    if runs.empty:
        return {}
    return {
        "all": {
            "description": "Every run in the aggregate (no config given).",
            "datasets": sorted(set(runs["dataset"])),
            "ratios": sorted({float(r) for r in runs["ratio"]}),
            "methods": list(dict.fromkeys(runs["method"])),
            "backbones": sorted(set(runs["backbone"])),
            "seeds": sorted({int(s) for s in runs["seed"]}),
        }
    }


# ---------------------------------------------------------------- small HTML helpers


def esc(v: Any) -> str:
    return html.escape("" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v))


def _anchor(name: str) -> str:
    return "exp-" + tables.safe_name(name)


def _img(path: Path, caption: str) -> str:
    b64 = base64.b64encode(Path(path).read_bytes()).decode()
    return (
        f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{b64}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def _plain_table(df: pd.DataFrame, left: tuple[str, ...] = ()) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        body.append(
            "<tr>"
            + "".join(
                f"<td class='{'l' if c in left else ''}'>{esc(v)}</td>" for c, v in zip(df.columns, row, strict=True)
            )
            + "</tr>"
        )
    return f"<table class='plain'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _short(text: str, limit: int = 100) -> str:
    """The first sentence of ``text`` (up to ``limit`` characters, cut at a word)."""
    first = text.split(". ")[0].split(": ")[0].strip()
    if len(first) <= limit:
        return first
    return first[:limit].rsplit(" ", 1)[0] + "…"


def _fmt_p(p: Any) -> str:
    if p is None or pd.isna(p):
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


# ---------------------------------------------------------------- sections


def _status(cells: pd.DataFrame, runs: pd.DataFrame, cfg: Mapping | None) -> str:
    counts = cells["status"].value_counts().to_dict() if not cells.empty else {}
    failed, notrun = counts.get("failed", 0), counts.get("not run", 0)
    if cfg is None:
        n_runs = runs[[*KEYS, "seed"]].drop_duplicates().shape[0] if not runs.empty else 0
        bad = f", {failed} failed (<a href='#missing'>listed below</a>)" if failed else ""
        return (
            f"<div class='banner {'partial' if failed else 'complete'}'>{n_runs} finished runs{bad} (no config "
            "given: the expected grid is unknown).</div>"
        )
    total, fin = len(cells), counts.get("finished", 0)
    if fin == total:
        return f"<div class='banner complete'>Complete: all {total} cells of the grid finished.</div>"
    cls = "partial" if fin else "empty"
    return (
        f"<div class='banner {cls}'>Partial grid: {fin} of {total} cells finished — {failed} failed, "
        f"{notrun} not run. Missing cells are marked <em>missing</em> in the tables and listed in "
        f"<a href='#missing'>Missing and failed cells</a>.</div>"
    )


def _counts_tds(counts: Mapping[str, int], order: list[str], prefix: str) -> str:
    return "".join(
        f"<td class='{'zero' if not counts.get(v) else prefix + v.replace(' ', '-')}'>{counts.get(v, 0)}</td>"
        for v in order
    )


def _summary_row(
    name: str, exp: Mapping, lay: tables.Layout, g: pd.DataFrame, cells: pd.DataFrame, orders: tuple[list, list]
) -> str:
    gc = g["verdict"].value_counts().to_dict() if not g.empty else {}
    done = "–"
    if not cells.empty:
        mine = tables.of_experiment(cells, name)
        done = f"{(mine['status'] == 'finished').sum()} / {len(mine)}"
    ref = exp.get("reference")
    what = (f"{ref['paper']}" + (f" Table {ref['table']}" if ref.get("table") else "")) if ref else "–"
    if ref and lay.reference_free:
        what += " (layout only)"
    return (
        f"<tr><td class='l'><a href='#{_anchor(name)}'>{esc(name)}</a></td><td class='l'>{esc(what)}</td>"
        f"<td class='l'>{esc(', '.join(figure_kinds(exp)) or '–')}</td><td>{done}</td>"
        f"{_counts_tds(lay.verdict_counts(), orders[0], 'n-')}{_counts_tds(gc, orders[1], 'g-')}</tr>"
    )


def _summary_table(layouts: dict, findings: pd.DataFrame, exps: dict, cells: pd.DataFrame) -> str:
    """Per experiment: its paper table, figure, finished cells and the count of each verdict that occurs in
    the report (paper numbers: the layouts' verdicts; gains: findings.csv's gain rows)."""
    g = findings[findings["quantity"] == "gain"] if not findings.empty else pd.DataFrame(columns=["verdict"])
    seen = {v for lay in layouts.values() for v in lay.verdict_counts()}
    orders = ([v for v in VERDICT_ORDER if v in seen], [v for v in GAIN_ORDER if v in set(g["verdict"])])
    rows = [
        _summary_row(name, exp, layouts[name], tables.of_experiment(g, name), cells, orders)
        for name, exp in exps.items()
    ]
    groups = [(f"paper numbers ({len(orders[0])} verdicts occur)", orders[0]), ("gains tested", orders[1])]
    head = (
        "<tr><th rowspan='2'>experiment</th><th rowspan='2'>paper table</th><th rowspan='2'>figure</th>"
        "<th rowspan='2'>cells finished</th>"
        + "".join(f"<th colspan='{len(o)}'>{t.split(' (')[0]}</th>" for t, o in groups if o)
        + "</tr><tr>"
        + "".join(f"<th>{v}</th>" for v in orders[0] + orders[1])
        + "</tr>"
    )
    return f"<table class='plain summary'><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def _summary_sentence(layouts: dict) -> str:
    tot: dict[str, int] = {}
    for lay in layouts.values():
        for k, v in lay.verdict_counts().items():
            tot[k] = tot.get(k, 0) + v
    judged = sum(tot.get(k, 0) for k in compare.JUDGED)
    if not any(tot.values()):
        return (
            "<p>No experiment has a paper number in its scope: the tables show our numbers in the papers' "
            "layout without verdicts.</p>"
        )
    shown = ", ".join(f"<span class='n-{v.replace(' ', '-')}'>{tot.get(v, 0)} {v}</span>" for v in compare.JUDGED)
    return (
        f"<p>Of the paper numbers in scope, <b>{judged}</b> have finished runs: {shown}; "
        f"<span class='n-missing'>{tot.get('missing', 0)} missing</span> (not run or failed); "
        f"{tot.get('quoted', 0)} are quoted by the paper from other publications and "
        f"{tot.get('not reported', 0)} not reported. <b>Reproduced</b> means equivalence was shown: the 90 % "
        "interval of ours − paper lies inside ± the margin (two one-sided tests, α = 0.05); "
        "<b>inconclusive</b>: the paper's value is inside our 95 % interval but the seeds do not show "
        "equivalence; <b>below</b> / <b>above</b>: our 95 % interval excludes it; <b>single run</b>: one "
        "seed, no interval.</p>"
    )


def decision_lines(comparison: pd.DataFrame, gains: pd.DataFrame) -> str:
    """'12 of 18 cells inconclusive; …' and the same for claimed gains (from the aggregate's numbers)."""
    lines = []
    if not comparison.empty:
        lines.append(compare.decision_line(comparison))
    if not gains.empty:
        tested = tuple(v for v in GAIN_ORDER if v != "untested")
        lines.append(
            compare.decision_line(
                gains, "not significant", "gain_verdict", tested, ("n_method", "n_over"), "claimed gains"
            )
        )
    lines = [x for x in lines if x]
    return (
        (
            "<p class='decide'>" + "; ".join(esc(x) for x in lines) + " (more seeds per cell for 80 % power, "
            "assuming the observed difference and spread; claimed gains at Holm's strictest level).</p>"
        )
        if lines
        else ""
    )


def _gain_td(r: Any) -> str:
    v = r.gain_verdict
    ours = "–" if pd.isna(r.gain) else tables.fmt_delta(r.gain, minus="−")
    paper = (
        ""
        if pd.isna(r.paper_gain)
        else f"<span class='paper'>paper {tables.fmt_delta(r.paper_gain, minus='−')}</span><br>"
    )
    test = ""
    if isinstance(r.test, str) and r.test:
        test = (
            f"<span class='paper'>p {_fmt_p(r.p_value)}, Holm {_fmt_p(r.p_holm)} ({esc(r.test.split()[0])})</span><br>"
        )
    need = ""
    if v == "not significant" and isinstance(r.seeds_test, str) and r.seeds_test:
        n = f"> {power.MAX_SEEDS}" if pd.isna(r.seeds_needed) else int(r.seeds_needed)
        need = f"<span class='need'> · needs {n} seeds ({esc(r.seeds_test)})</span>"
    tip = f"n = {int(r.n_method)} / {int(r.n_over)}"
    if not pd.isna(r.equiv_low):
        tip += f"; 90% interval of the gain [{r.equiv_low:.2f}, {r.equiv_high:.2f}] vs margin ± {r.margin:g}"
    if isinstance(r.explanation, str) and r.explanation:
        tip += f"; {r.explanation}"
    return (
        f"<td class='gain-{v.replace(' ', '-')}' title='{esc(tip)}'><span class='ours'>{ours}</span><br>"
        f"{paper}{test}<span class='verdict'>{esc(v)}</span>{need}</td>"
    )


def _gains_html(g: pd.DataFrame, exp: Mapping) -> str:
    """Claimed gains as a grid: one row per claim, one column per cell of the experiment."""
    if g.empty:
        return ""
    several_b = len(exp["backbones"]) > 1

    def col_of(r: Any) -> str:
        return f"{tables.dataset_name(r.dataset)} ρ={format_ratio(float(r.ratio))}" + (
            f" · {r.backbone}" if several_b else ""
        )

    order = [
        f"{tables.dataset_name(d)} ρ={format_ratio(r)}" + (f" · {b}" if several_b else "")
        for d in exp["datasets"]
        for r in exp["ratios"]
        for b in exp["backbones"]
    ]
    present = {col_of(r) for r in g.itertuples(index=False)}
    cols = [c for c in dict.fromkeys(order) if c in present]
    claims: dict[str, dict] = {}
    for r in g.itertuples(index=False):
        claims.setdefault(f"{r.claim}|{r.metric}", {"row": r, "cells": {}})["cells"][col_of(r)] = r
    body = []
    for entry in claims.values():
        r0 = entry["row"]
        metric = "" if r0.metric == "top1" else f" <span class='tag'>{esc(tables.metric_name(r0.metric, True))}</span>"
        head = (
            f"<th class='method'>{esc(r0.description)}{metric}<br><code>{esc(r0.method)}</code> over "
            f"<code>{esc(r0.over)}</code></th>"
        )
        body.append(
            "<tr>"
            + head
            + "".join(
                _gain_td(entry["cells"][c]) if c in entry["cells"] else "<td class='gain-none'>–</td>" for c in cols
            )
            + "</tr>"
        )
    headrow = "<tr><th class='method'>claim</th>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>"
    a = f"{compare.ALPHA:g}"
    return (
        "<h3>Claimed gains</h3><p class='desc'>Our gain = mean(method) − mean(over) over seeds, in points, next "
        "to the paper's; p from the paired t-test by seed (Welch's when the seeds differ or the pairing is "
        "degenerate) and Holm's correction across this experiment's claims. <b>supported</b>: the paper's sign "
        f"and Holm-adjusted p &lt; {a}; <b>contradicted</b>: the opposite sign, adjusted p &lt; {a}; <b>no "
        "gain</b>: not significant and the 90 % interval of the gain lies inside ± the margin (two one-sided "
        "tests); <b>not significant</b>: neither, with the seeds per method that would decide it at 80 % "
        "power; <b>untested</b>: fewer than two seeds on a side. Hover for n, the interval and why a test is "
        "missing.</p>"
        + f"<table class='paper-table gains'><thead>{headrow}</thead><tbody>{''.join(body)}</tbody></table>"
    )


def _missing_html(cells: pd.DataFrame) -> str:
    if cells.empty:
        return ""
    miss = cells[cells["status"] != "finished"]
    out = ["<h2 id='missing'>Missing and failed cells</h2>"]
    if miss.empty:
        return "".join(out + ["<p>None: every cell of the grid finished.</p>"])
    rows = []
    for r in miss.itertuples(index=False):
        cls = "status-" + r.status.replace(" ", "-")
        detail = esc(r.detail) if isinstance(r.detail, str) else ""
        log = f"<br><code>{esc(r.log)}</code>" if isinstance(r.log, str) and r.log else ""
        rows.append(
            f"<tr><td class='l'>{esc(r.dataset)}</td><td>{esc(r.ratio)}</td><td class='l'>{esc(r.method)}"
            f"</td><td class='l'>{esc(r.backbone)}</td><td>{esc(r.seed)}</td><td class='l'>"
            f"{esc(r.experiments)}</td><td class='l {cls}'>{esc(r.status)}</td><td class='l'>{detail}{log}"
            "</td></tr>"
        )
    out.append(
        f"<p>{len(miss)} of {len(cells)} cells have no usable metrics.json. <em>failed</em>: the training "
        "job ran and its log ends with the error below, or its metrics.json is invalid or records a failed "
        "check such as a collapse onto one class (the reason and the file are given; it is not aggregated); "
        "<em>not run</em>: no job has run yet (e.g. it depends on a "
        "failed download, or the run was interrupted). Rerun with <code>snakemake --keep-going</code>; "
        "finished cells are not retrained.</p>"
    )
    out.append(
        "<table class='plain'><thead><tr><th>dataset</th><th>ratio</th><th>method</th><th>backbone</th>"
        "<th>seed</th><th>experiments</th><th>status</th><th>detail</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )
    return "".join(out)


def open_details(runs: pd.DataFrame) -> pd.DataFrame:
    """Every paper detail left open (``methods.OPEN_DETAILS``) with the values the runs used, per method."""
    rows = []
    per_method = runs.drop_duplicates("method")
    for key, what in OPEN_DETAILS.items():
        if key not in runs.columns:
            continue
        sel = per_method.dropna(subset=[key])
        for prefix, (flag, active) in _RELEVANT_WHEN.items():  # e.g. the pairing only matters with a consistency loss
            if key.startswith(prefix) and key != flag and flag in sel.columns:
                sel = sel[sel[flag].map(active)]
        groups = [(v, sorted(ms)) for v, ms in sel.groupby(key, sort=True)["method"]]
        if not groups:
            continue
        if len(groups) == 1 and len(groups[0][1]) > 3:
            values = f"{groups[0][0]}: all {len(groups[0][1])} methods"
        else:
            big = max(range(len(groups)), key=lambda i: len(groups[i][1]))
            values = "; ".join(
                f"{v}: all other methods ({len(ms)})" if i == big and len(ms) > 3 else f"{v}: {', '.join(ms)}"
                for i, (v, ms) in enumerate(groups)
            )
        rows.append({"setting": key, "what the papers leave open": what, "value used (methods)": values})
    return pd.DataFrame(rows)


def _truthy(v: Any) -> bool:
    return v is True or str(v).lower() in ("true", "1")


# A detail under a prefix only applies to methods whose `flag` column passes `active`.
_RELEVANT_WHEN = {
    "recipe.consistency.pairing": ("recipe.consistency.weight", lambda w: pd.notna(w) and float(w) > 0),
    "recipe.decoupled.": ("recipe.decoupled.enabled", _truthy),
}


def experiment_choices(exps: Mapping) -> pd.DataFrame:
    """Open details that are experiment choices (CBN open detail 8: Figure 5's M values, Figure 6's data)."""
    rows = []
    for name, exp in exps.items():
        cells = ", ".join(
            f"{tables.dataset_name(d)} ρ={format_ratio(r)}" for d in exp["datasets"] for r in exp["ratios"]
        )
        if "components" in figure_kinds(exp):
            rows.append(
                {
                    "setting": f"experiments.{name}",
                    "what the papers leave open": (
                        "CBN open detail 8: the M values and the imbalance ratio of Figure 5."
                    ),
                    "value used (methods)": f"{cells}; methods {', '.join(exp['methods'])}",
                }
            )
        elif "backbones" in figure_kinds(exp):
            rows.append(
                {
                    "setting": f"experiments.{name}",
                    "what the papers leave open": (
                        "CBN open detail 8: the dataset of Figure 6 (and what 'BN' and 'CBN' are)."
                    ),
                    "value used (methods)": f"{cells}; {' vs '.join(exp['methods'])}; {', '.join(exp['backbones'])}",
                }
            )
    return pd.DataFrame(rows)


def _provenance(runs: pd.DataFrame, cfg: Mapping | None) -> str:
    meta: dict[str, str] = {"report generated": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    rv = io.code_version()
    meta["report code"] = f"ltbench {rv['ltbench']}, git {(rv['git_commit'] or 'unknown')[:12]}" + (
        " (local changes)" if rv.get("git_dirty") else ""
    )
    if cfg is not None:
        meta["config"] = f"{cfg.get('name')} (hash {io.config_hash(cfg)}), results in {cfg.get('results_dir')}"
    if not runs.empty:
        r = runs.drop_duplicates([*KEYS, "seed"])
        commits = []
        for (c, dirty), n in r.groupby(["git_commit", "git_dirty"], dropna=False).size().items():
            label = "unknown" if pd.isna(c) else str(c)[:12]
            commits.append(f"{label}{' (local changes)' if dirty is True or str(dirty) == 'True' else ''}: {n} runs")
        meta["code of the runs"] = "; ".join(commits)
        env_cols = [c for c in r.columns if c.startswith("env.") and c not in ("env.host", "env.platform")]
        envs = (
            r[env_cols]
            .fillna("")
            .astype(str)
            .agg(lambda row: ", ".join(f"{c[4:]} {v}" for c, v in zip(env_cols, row, strict=True) if v), axis=1)
            .value_counts()
        )
        meta["environment"] = "; ".join(f"{e} ({n} runs)" for e, n in envs.items())
        if "env.platform" in r.columns:
            meta["platform / hosts"] = (
                "; ".join(sorted(set(r["env.platform"].dropna().astype(str))))
                + " / "
                + ", ".join(sorted(set(r.get("env.host", pd.Series(dtype=str)).dropna().astype(str))))
            )
        gpu = r.get("env.gpu", pd.Series(index=r.index, dtype=object))
        dev = [
            f"{d}{' (' + str(g) + ')' if isinstance(g, str) and g else ''}"
            for d, g in zip(r["device"], gpu, strict=True)
        ]
        meta["devices"] = "; ".join(f"{d}: {n} runs" for d, n in pd.Series(dev).value_counts().items())
        cuda = r["device"].astype(str).str.startswith("cuda")
        gpu_h, cpu_h = r.loc[cuda, "wall_time_s"].sum() / 3600, r.loc[~cuda, "wall_time_s"].sum() / 3600
        meta["compute spent"] = f"{gpu_h:.2f} GPU-hours, {cpu_h:.3f} CPU-hours (wall time of the finished runs)"
        meta["runs"] = str(len(r))
    return (
        "<table class='plain meta'>"
        + "".join(f"<tr><th>{esc(k)}</th><td class='l'>{esc(v)}</td></tr>" for k, v in meta.items())
        + "</table>"
    )


# ---------------------------------------------------------------- the page


def _head(name: str, exps: Mapping, cells: pd.DataFrame, runs: pd.DataFrame, cfg: Mapping | None) -> list[str]:
    papers = sorted({e["reference"]["paper"] for e in exps.values() if e.get("reference")})
    return [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>ltbench report: {esc(name)}</title><style>{CSS}{tables.TABLE_CSS}{headline.CSS}</style></head><body>",
        f"<h1>ltbench report: {esc(name)}</h1>",
        f"<p class='sub'>{len(exps)} experiments"
        + (f" reproducing {', '.join(papers)}" if papers else "")
        + f" · generated {esc(time.strftime('%Y-%m-%d %H:%M'))}</p>",
        _status(cells, runs, cfg),
    ]


def _toc(exps: Mapping, cells: pd.DataFrame) -> str:
    toc = [
        f"<li><a href='#{_anchor(n)}'>{esc(n)}</a>"
        + (f" — {esc(_short(e['description']))}" if e.get("description") else "")
        + "</li>"
        for n, e in exps.items()
    ]
    toc += [
        "<li><a href='#missing'>Missing and failed cells</a></li>" if not cells.empty else "",
        "<li><a href='#details'>Unspecified paper details and the values used</a></li>",
        "<li><a href='#provenance'>Provenance</a></li>",
    ]
    return "<nav class='toc'><b>Contents</b><ul>" + "".join(toc) + "</ul></nav>"


def _experiment_section(
    ename: str, exp: Mapping, lay: tables.Layout, data: Mapping[str, pd.DataFrame], figures_dir: Path, tables_dir: Path
) -> list[str]:
    claims = tables.of_experiment(data.get("gains"), ename)
    claims = claims[claims["kind"] == "claim"] if not claims.empty else claims
    parts = [f"<h2 id='{_anchor(ename)}'>{esc(lay.title)}</h2>"]
    parts.append(headline.experiment_line(data.get("findings", pd.DataFrame()), ename, exp))
    if exp.get("description"):
        parts.append(f"<p class='desc'>{esc(exp['description'])}</p>")
    n_cells = (
        len(exp["datasets"]) * len(exp["ratios"]) * len(exp["methods"]) * len(exp["backbones"]) * len(exp["seeds"])
    )
    parts.append(
        f"<p class='sub'>{len(exp['datasets'])} datasets × {len(exp['ratios'])} ratios × "
        f"{len(exp['methods'])} methods × {len(exp['backbones'])} backbones × {len(exp['seeds'])} seeds "
        f"= {n_cells} cells; protocol: {esc(exp.get('protocol', 'controlled'))}.</p>"
    )
    parts.append(decision_lines(tables.of_experiment(data.get("comparison"), ename), claims))
    paths = tables.write(lay, tables_dir)
    parts.append(tables.to_html(lay) + tables.legend_html(lay))
    parts.append(
        "<details><summary>Markdown and LaTeX of this table</summary>"
        f"<p class='skip'>Also written to {esc(paths['md'])}, {esc(paths['tex'])} and "
        f"{esc(paths['html'])}.</p><pre>{esc(tables.to_markdown(lay))}</pre>"
        f"<pre>{esc(tables.to_latex(lay))}</pre></details>"
    )
    parts.append(_gains_html(claims, exp))
    parts.append(sequential_report.section_html(tables.of_experiment(data.get("sequential"), ename), exp))
    drawn, skipped = figures.experiment_figures(ename, exp, data, lay, figures_dir)
    shown, skipped = _earlier_figures(drawn, skipped, Path(figures_dir) / tables.safe_name(ename), data)
    if shown:
        parts.append("<h3>Figures</h3>")
    parts += [_img(path, figures.CAPTIONS[kind] + note) for kind, path, note in shown]
    if skipped:
        parts.append(
            "<p class='skip'>Not drawn: " + "; ".join(f"{esc(k)} ({esc(why)})" for k, why in skipped) + ".</p>"
        )
    parts.append(diagnostics_html(data["runs"], exp, data.get("diagnostics"), ename))
    return parts


# Figures whose inputs a report regenerated from a committed aggregate may lack: each run's model.pt
# (bn_norms), per_class.csv (not committed beside the Fashion reports). Such a report shows the figure an
# earlier report drew from them, and says so.
def _inputs_absent(kind: str, why: str, data: Mapping[str, pd.DataFrame]) -> str | None:
    if kind == "bn_norms" and "no model.pt" in why:
        return "the runs' model.pt files"
    if kind == "per_class" and data["per_class"].empty and not data["runs"].empty:
        return "the aggregate's per_class.csv"
    return None


def _earlier_figures(
    drawn: list, skipped: list, exp_dir: Path, data: Mapping[str, pd.DataFrame]
) -> tuple[list[tuple[str, Path, str]], list]:
    """(drawn as (kind, png, caption note), skipped): a figure skipped because its inputs are absent
    (:func:`_inputs_absent`) whose PNG an earlier report wrote into ``exp_dir`` is shown, with a note."""
    out, still = [(k, p, "") for k, p in drawn], []
    for kind, why in skipped:
        png, inputs = exp_dir / f"{kind}.png", _inputs_absent(kind, why, data)
        if inputs and png.exists():
            out.append((kind, png, f" Drawn by an earlier report from {inputs}, absent where this one was generated."))
        else:
            still.append((kind, why))
    order = {k: i for i, (k, _) in enumerate(drawn + skipped)}
    return sorted(out, key=lambda d: order[d[0]]), still


DIAG_TABLE = {
    "value": "top-1 (reported)",
    "diag.top1_running": "top-1 running mixture (sample)",
    "diag.top1_batch_stats": "top-1 batch statistics (sample)",
    "diag.min_prior": "smallest prior",
    "diag.live_components": "live components per layer",
    "diag.collapsed_layers": "share of layers collapsed",
    "diag.mean_spread": "spread of means",
    "diag.confident_share": "share of pixels r > 0.9",
    "diag.grad_norm_max": "max gradient norm",
    "diag.nonfinite_steps": "non-finite steps",
}


def _fmt_diag(v: Any) -> str:
    if pd.isna(v):
        return "–"
    return f"{v:.3g}" if isinstance(v, float) and abs(v) < 10 else (f"{v:.2f}" if isinstance(v, float) else str(v))


def diagnostics_summary_html(diagnostics: pd.DataFrame | None, name: str, exp: Mapping) -> str:
    """The experiment's CBN diagnostics over its seeds (``diagnostics.csv``): mean [95 % interval] (n)."""
    d = tables.of_experiment(diagnostics, name) if diagnostics is not None else pd.DataFrame()
    if d.empty:
        return ""
    order = {m: i for i, m in enumerate(exp["methods"])}
    d = d.assign(_o=d["method"].map(order)).sort_values(["dataset", "ratio", "backbone", "_o"])
    d = d.assign(cell=[f"{a} ρ={r} {b}" for a, r, b in zip(d["dataset"], d["ratio"], d["backbone"], strict=True)])
    cells = [
        f"{_fmt_diag(float(m))} [{_fmt_diag(float(lo))}, {_fmt_diag(float(hi))}] ({int(n)})"
        for m, lo, hi, n in zip(d["mean"], d["ci_low"], d["ci_high"], d["n"], strict=True)
    ]
    t = d.assign(value=cells).pivot_table(
        index=["cell", "method", "_o"], columns="metric", values="value", aggfunc="first", sort=False
    )
    t = t.reset_index().sort_values(["cell", "_o"]).drop(columns="_o")
    cols = [k for k in DIAG_TABLE if k.startswith("diag.") and k.removeprefix("diag.") in t.columns]
    t = t[["cell", "method", *(k.removeprefix("diag.") for k in cols)]].rename(
        columns={k.removeprefix("diag."): DIAG_TABLE[k] for k in cols}
    )
    return (
        "<p class='desc'>Over the seeds (diagnostics.csv): mean [95 % Student-t interval] (seeds).</p>"
        + _plain_table(t.fillna("–"), left=("cell", "method"))
    )


def diagnostics_html(runs: pd.DataFrame, exp: Mapping, diagnostics: pd.DataFrame | None = None, name: str = "") -> str:
    """The experiment's runs with CBN layers and their diagnostics (runs.csv ``diag.*``), one row per run,
    after their summary over the seeds (:func:`diagnostics_summary_html`)."""
    if runs.empty or "diag.min_prior" not in runs.columns:
        return ""
    r = figures.select(runs, exp)
    r = r[(r["metric"] == "top1") & r["diag.min_prior"].notna()]
    if r.empty:
        return ""
    order = {m: i for i, m in enumerate(exp["methods"])}
    r = r.assign(_o=r["method"].map(order)).sort_values(["dataset", "ratio", "backbone", "_o", "seed"])
    cols = [c for c in DIAG_TABLE if c in r.columns]
    t = pd.DataFrame(
        {
            "cell": [f"{d} ρ={ra} {b}" for d, ra, b in zip(r["dataset"], r["ratio"], r["backbone"], strict=True)],
            "method": r["method"],
            "seed": r["seed"].astype(int),
            **{DIAG_TABLE[c]: [_fmt_diag(v) for v in r[c]] for c in cols},
        }
    )
    return (
        "<h3>CBN diagnostics</h3><p class='desc'>Per run with CBN layers, at the end of training "
        "(ltbench/training/diagnostics.py): top-1 on a fixed test sample with the running mixture (eval mode, "
        "what is reported) and with each test batch's own statistics (a large gap: the running statistics do "
        "not match training); the smallest running prior over the layers (≈ 0: a collapsed component); the "
        f"components per layer whose prior exceeds {LIVE_PRIOR:g} (live) and the share of layers left "
        "with one live component (collapsed: the layer normalizes as plain BN); the "
        "spread of the component means (mean over layers and channels of std_k μ_k / sqrt(mean_k σ²_k)); the "
        "share of pixels whose largest responsibility exceeds 0.9; the largest gradient norm of a step and "
        "the steps with a non-finite loss.</p>"
        + diagnostics_summary_html(diagnostics, name, exp)
        + _plain_table(t, left=("cell", "method"))
    )


def _tail(runs: pd.DataFrame, cells: pd.DataFrame, exps: Mapping, cfg: Mapping | None) -> list[str]:
    parts = [_missing_html(cells)]
    details = pd.concat(
        [open_details(runs) if not runs.empty else pd.DataFrame(), experiment_choices(exps)], ignore_index=True
    )
    parts.append("<h2 id='details'>Unspecified paper details and the values used</h2>")
    if details.empty:
        parts.append("<p>No finished run yet.</p>")
    else:
        parts.append(
            "<p class='desc'>Every detail the papers leave open is a named knob; the values below are "
            "what the finished runs used (from their metrics.json), per method.</p>"
        )
        parts.append(_plain_table(details, left=tuple(details.columns)))
    parts.append("<h2 id='provenance'>Provenance</h2>" + _provenance(runs, cfg))
    if cfg is not None:
        parts.append(
            "<details><summary>Configuration (validated, with defaults)</summary><pre>"
            + esc(json.dumps(cfg, indent=2))
            + "</pre></details>"
        )
    return parts + ["</body></html>"]


REPORT_FIGURES = ["findings"]  # the config's report.figures when it has none (the schema's default)


def _findings_section(findings: pd.DataFrame, cfg: Mapping | None, figures_dir: Path, tables_dir: Path) -> list[str]:
    """The first screen: the findings table (findings.csv), written as Markdown too, and the headline figure."""
    io.write_text(Path(tables_dir) / "findings.md", headline.to_markdown(findings))
    parts = ["<h2 id='findings'>Findings</h2>", headline.table_html(findings)]
    if "findings" in ((cfg or {}).get("report") or {}).get("figures", REPORT_FIGURES):
        try:
            parts.append(
                _img(figures.fig_findings(findings, Path(figures_dir) / "findings.png"), figures.FINDINGS_CAPTION)
            )
        except figures.Skip as e:
            parts.append(f"<p class='skip'>Not drawn: the findings figure ({esc(e)}).</p>")
    return parts


def render(data: Mapping[str, pd.DataFrame], cfg: Mapping | None, figures_dir: Path, tables_dir: Path) -> str:
    """The page from the aggregate tables (:func:`load_aggregate`); every number is read from them."""
    runs, cells = data["runs"], data.get("cells", pd.DataFrame())
    gains = data.get("gains", pd.DataFrame())
    claims = gains[gains["kind"] == "claim"] if not gains.empty else gains
    exps = experiments_of(cfg, runs)
    layouts = {n: tables.build(n, e, data["summary"], data.get("comparison"), runs) for n, e in exps.items()}
    findings = data.get("findings", pd.DataFrame())
    parts = _head((cfg or {}).get("name", "ltbench"), exps, cells, runs, cfg)
    parts += _findings_section(findings, cfg, figures_dir, tables_dir)
    parts.append("<h2 id='summary'>Summary of verdicts per experiment</h2>")
    if exps:
        parts += [
            _summary_sentence(layouts),
            decision_lines(data.get("comparison", pd.DataFrame()), claims),
            _summary_table(layouts, findings, exps, cells),
        ]
    parts.append(_toc(exps, cells))
    for ename, exp in exps.items():
        parts += _experiment_section(ename, exp, layouts[ename], data, figures_dir, tables_dir)
    return "".join(parts + _tail(runs, cells, exps, cfg))


def main(
    aggregate_dir: Path,
    out: Path,
    cfg: dict | None = None,
    figures_dir: str | None = None,
    tables_dir: str | None = None,
) -> None:
    data = load_aggregate(aggregate_dir)
    d = Path(aggregate_dir)
    if cfg is not None and (d / "gains.csv").exists() and not (d / "findings.csv").exists():
        raise ConfigError(
            f"{d / 'findings.csv'} does not exist (an aggregate written before it did): rerun `ltbench aggregate`, "
            f"or `ltbench findings --aggregate-dir {d}` with the config"
        )
    other = aggregate.written_for(d)
    if cfg is not None and other is not None and other != cfg["name"]:
        raise ConfigError(
            f"{d} holds the aggregate of the config {other!r}, not of {cfg['name']!r} (configs sharing a "
            "results_dir share it): aggregate this config first (`snakemake --configfile FILE --forcerun aggregate`)"
        )
    stem = Path(out).with_suffix("")
    figures_d = Path(figures_dir) if figures_dir else stem / "figures"
    tables_d = Path(tables_dir) if tables_dir else stem / "tables"
    figures_d.mkdir(parents=True, exist_ok=True)
    tables_d.mkdir(parents=True, exist_ok=True)
    io.write_text(out, render(data, cfg, figures_d, tables_d))
