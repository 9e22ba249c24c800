"""Experiments rendered in the layout of the paper's tables, as HTML, Markdown and LaTeX.

One :class:`Layout` per experiment: rows are methods (× backbone when the experiment has several),
columns are the experiment's (dataset, ratio) pairs in config order and, where the paper's table
reports them (CBN Table 3: Total / Many / Medium / Few), the metrics. Rows follow the paper table's
order (the reference file's entry order, with its row labels such as Table 3's I–VIII); the paper's
rows we did not run stay (e.g. Table 4's methods quoted from other publications, marked *quoted*),
then the experiment's methods the paper does not have.

Every number comes from the aggregate stage's files, nothing is recomputed here: a cell holds our
mean ± std over the experiment's seeds (and n) from ``summary.csv``, and the paper's value, Δ = ours −
paper, the verdict (:func:`ltbench.analysis.compare.judge`) and the seeds an inconclusive cell needs
from ``comparison.csv``. An experiment without a reference, or whose datasets/backbones the paper does
not report (digits-lt in the demo), gets the same layout with our numbers only ("reference-free"). The
metric set then comes from the paper's table when there is one, else top-1 per (dataset, ratio) — or
Total/Many/Medium/Few for a single column. Figure 5's rows are named by their number of CBN components
M, read from the resolved recipe column of ``runs.csv``.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ltbench import io
from ltbench.analysis import compare, power
from ltbench.analysis.aggregate import METRICS
from ltbench.data.longtail import format_ratio
from ltbench.spec.config import figure_kinds
from ltbench.spec.names import DATASET_NAMES, METHOD_NAMES, dataset_name, method_name  # noqa: F401 (re-exported)

M_KNOB = "recipe.norm.options.num_components"
NORM_KNOB = "recipe.norm.name"
VERDICT_MARK = {
    "reproduced": "✓",
    "inconclusive": "?",
    "below": "↓",
    "above": "↑",
    "single run": "(1 run)",
    "missing": "missing",
    "not reported": "n/r",
    "quoted": "quoted",
}
VERDICT_TEX = {
    "reproduced": r"$\checkmark$",
    "inconclusive": "?",
    "below": r"$\downarrow$",
    "above": r"$\uparrow$",
    "single run": r"\textit{(1 run)}",
    "missing": r"\textit{missing}",
    "not reported": r"\textit{n/r}",
    "quoted": r"\textit{quoted}",
}
RULE = (
    "✓ reproduced: the 90 % interval of Δ lies inside ± the margin (equivalence shown, TOST α = 0.05); "
    "? inconclusive: the paper's value is inside our 95 % interval but equivalence is not shown (the seeds "
    "that would decide it at 80 % power are given); ↓ below / ↑ above: our 95 % interval excludes the "
    "paper's value; (1 run): a single seed, no interval"
)


def metric_name(metric: str, several: bool) -> str:
    return {"top1": "Total" if several else "Top-1", "many": "Many", "medium": "Medium", "few": "Few"}[metric]


def fmt_num(v: float, digits: int = 2) -> str:
    return "–" if v is None or pd.isna(v) else f"{v:.{digits}f}"


def fmt_paper(v: float) -> str:
    """A paper value as the reference stores it: 88.7 stays 88.7, 84.98 stays 84.98."""
    if v is None or pd.isna(v):
        return "–"
    return f"{v:.2f}".rstrip("0").rstrip(".") if not float(v).is_integer() else f"{v:.1f}"


def fmt_delta(v: float, minus: str = "-", digits: int = 2) -> str:
    """Signed difference: +0.50, -1.20 (``minus`` sets the sign character); 0.00 has no sign."""
    if v is None or pd.isna(v):
        return "–"
    text = f"{abs(v):.{digits}f}"
    if float(text) == 0:
        return text
    return ("+" if v > 0 else minus) + text


@dataclass
class Cell:
    mean: float = math.nan
    std: float = math.nan
    n: int = 0
    ci_low: float = math.nan
    ci_high: float = math.nan
    seeds: list = field(default_factory=list)
    paper: float = math.nan
    in_reference: bool = False  # the paper's table has an entry for this cell (its value may be null)
    quoted: bool = False
    delta: float = math.nan
    verdict: str | None = None  # compare.judge's verdict for entries of the paper, None for cells it lacks
    note: str | None = None  # the reference entry's note (footnote)
    margin: float = math.nan
    tost_low: float = math.nan  # 90 % interval of Δ (the equivalence test)
    tost_high: float = math.nan
    seeds_needed: float = math.nan  # seeds that decide an inconclusive cell (NaN + seeds_test: > MAX_SEEDS)
    seeds_test: str = ""

    def seeds_text(self) -> str:
        """'needs 7 seeds (TOST)' for an inconclusive cell, '' otherwise."""
        if self.verdict != "inconclusive" or not self.seeds_test:
            return ""
        n = f"> {power.MAX_SEEDS}" if pd.isna(self.seeds_needed) else str(int(self.seeds_needed))
        return f"needs {n} seeds ({self.seeds_test})"


@dataclass
class Row:
    method: str
    backbone: str
    label: str | None  # the paper's row label (Table 3: I–VIII)
    in_experiment: bool
    quoted: bool  # every paper entry of this row is quoted from another publication
    display: str | None = None  # overrides the method's display name (e.g. "CBN (M = 4)" in Figure 5's table)

    @property
    def name(self) -> str:
        return self.display or method_name(self.method)


@dataclass
class Layout:
    experiment: str
    description: str
    paper: str | None
    table: str | None
    columns: list[tuple[str, float, str]]  # (dataset, ratio, metric)
    rows: list[Row]
    cells: dict[tuple[int, int], Cell]
    seeds: list[int]
    several_backbones: bool
    reference_free: bool
    notes: list[str]

    @property
    def title(self) -> str:
        if self.paper is None:
            return f"Experiment {self.experiment}"
        where = f"{self.paper} Table {self.table}" if self.table else self.paper
        lay = (
            " (the paper's layout, our numbers only: the paper reports none of these cells)"
            if self.reference_free
            else ""
        )
        return f"Experiment {self.experiment} — {where}{lay}"

    @property
    def metrics(self) -> list[str]:
        return list(dict.fromkeys(m for _, _, m in self.columns))

    @property
    def pairs(self) -> list[tuple[str, float]]:
        return list(dict.fromkeys((d, r) for d, r, _ in self.columns))

    def row_title(self, row: Row) -> str:
        t = row.name
        if self.several_backbones:
            t += f" · {row.backbone}"
        return f"{row.label}. {t}" if row.label else t

    def verdict_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.cells.values():
            if c.verdict:
                out[c.verdict] = out.get(c.verdict, 0) + 1
        return out


def _label(v: Any) -> bool:
    """A real row label of the reference file (not a missing value in any of its spellings)."""
    return isinstance(v, str) and v not in ("", "None", "nan", "<NA>")


def _metrics_for(exp: Mapping, ref: pd.DataFrame | None, scope: pd.DataFrame) -> list[str]:
    if not scope.empty:
        ms = set(scope["metric"])
    elif ref is not None and not ref.empty:
        ms = set(ref["metric"])
    elif len(exp["datasets"]) * len(exp["ratios"]) == 1:
        ms = set(METRICS)
    else:
        ms = {"top1"}
    return [m for m in METRICS if m in ms]


def of_experiment(df: pd.DataFrame | None, name: str) -> pd.DataFrame:
    """The rows of an aggregate table that belong to one experiment: summary, comparison and gains by
    their ``experiment`` column, ``cells.csv`` by its ``experiments`` (the space-separated experiments
    that list the cell)."""
    if df is None or df.empty:
        return pd.DataFrame()
    if "experiment" in df.columns:
        return df[df["experiment"].astype(str) == name].reset_index(drop=True)
    if "experiments" in df.columns:
        listed = df["experiments"].astype(object).fillna("").astype(str).str.split()
        return df[listed.map(lambda xs: name in xs)].reset_index(drop=True)
    return pd.DataFrame()


def _layout_rows(exp: Mapping, ref: pd.DataFrame | None, scope: pd.DataFrame) -> list[Row]:
    """The paper's rows in its order (scope: the comparison rows), then the experiment's other methods."""
    rows: list[Row] = []
    seen: set[tuple[str, str]] = set()
    if not scope.empty:
        for method, backbone in dict.fromkeys(zip(scope["method"], scope["backbone"], strict=True)):
            sub = scope[(scope["method"] == method) & (scope["backbone"] == backbone)]
            labels = [lb for lb in sub["row"] if _label(lb)]
            rows.append(
                Row(
                    method,
                    backbone,
                    labels[0] if labels else None,
                    method in exp["methods"],
                    bool(sub["quoted"].astype(str).str.lower().eq("true").all()),
                )
            )
            seen.add((method, backbone))
    elif ref is not None:  # reference-free: the experiment's methods in the paper table's order
        order = {m: i for i, m in enumerate(dict.fromkeys(ref["method"]))}
        label_of = {m: lb for m, lb in zip(ref["method"], ref["row"], strict=True) if _label(lb)}
        for m in sorted(exp["methods"], key=lambda m: (order.get(m, len(order)), exp["methods"].index(m))):
            for b in exp["backbones"]:
                rows.append(Row(m, b, label_of.get(m), True, False))
                seen.add((m, b))
    rows += [Row(m, b, None, True, False) for m in exp["methods"] for b in exp["backbones"] if (m, b) not in seen]
    return rows


def _by_cell(df: pd.DataFrame) -> dict[tuple, object]:
    """(method, backbone, dataset, ratio, metric) -> the row (a namedtuple) of an aggregate table."""
    if df.empty:
        return {}
    return {(r.method, r.backbone, r.dataset, float(r.ratio), r.metric): r for r in df.itertuples(index=False)}


def _seeds(v: Any) -> list[int]:
    return [int(s) for s in str(v).split()] if isinstance(v, str) else []


def _fill(c: Cell, s: Any, p: Any, notes: list[str]) -> Cell:
    """A cell from its summary row ``s`` and comparison row ``p`` (either may be None)."""
    if s is not None:
        c.mean, c.std, c.n, c.ci_low, c.ci_high = s.mean, s.std, int(s.n), s.ci_low, s.ci_high
        c.seeds = _seeds(s.seeds)
    if p is not None:
        c.paper, c.in_reference, c.quoted = p.paper_value, True, str(p.quoted).lower() == "true"
        c.delta, c.verdict, c.margin = p.delta, p.verdict, p.margin
        c.tost_low, c.tost_high = p.tost_low, p.tost_high
        c.seeds_needed, c.seeds_test = p.seeds_needed, (p.seeds_test if isinstance(p.seeds_test, str) else "")
        note = getattr(p, "note", None)
        if isinstance(note, str) and note not in ("", "None", "nan") and not note.startswith("shown as"):
            c.note = note
            if note not in notes:
                notes.append(note)
    return c


def _component_names(rows: list[Row], runs: pd.DataFrame | None) -> None:
    """Name Figure 5's rows by their number of CBN components M (the resolved recipe column of runs.csv)."""
    if runs is None or runs.empty or M_KNOB not in runs.columns:
        return
    cbn = runs[runs[NORM_KNOB] == "cbn"] if NORM_KNOB in runs.columns else runs
    m_of = cbn.dropna(subset=[M_KNOB]).drop_duplicates("method").set_index("method")[M_KNOB]
    for row in rows:
        if row.method in m_of.index:
            m = int(float(m_of[row.method]))
            name = method_name(row.method)
            row.display = f"CBN (M = {m})" if name == row.method else f"CBN (M = {m}: {name})"


def build(
    name: str,
    exp: Mapping,
    summary: pd.DataFrame,
    comparison: pd.DataFrame | None = None,
    runs: pd.DataFrame | None = None,
) -> Layout:
    """The layout of one experiment from the aggregate's ``summary.csv`` and ``comparison.csv`` (all
    experiments; this one's rows are selected) and, for Figure 5's row names, ``runs.csv``."""
    ref = compare.reference_table(exp)  # the paper table's structure: row order and labels
    scope = of_experiment(comparison, name)
    metrics = _metrics_for(exp, ref, scope)
    columns = [(d, float(r), m) for d in exp["datasets"] for r in exp["ratios"] for m in metrics]
    rows = _layout_rows(exp, ref, scope)
    stats, paper = _by_cell(of_experiment(summary, name)), _by_cell(scope)
    notes: list[str] = []
    cells = {
        (i, j): _fill(Cell(), stats.get(key), paper.get(key), notes)
        for i, row in enumerate(rows)
        for j, (d, ratio, metric) in enumerate(columns)
        for key in [(row.method, row.backbone, d, ratio, metric)]
    }
    # drop paper rows with nothing to show in these columns (e.g. a quoted method reported elsewhere only)
    keep = [
        i
        for i, row in enumerate(rows)
        if row.in_experiment or any(not pd.isna(cells[(i, j)].paper) or cells[(i, j)].n for j in range(len(columns)))
    ]
    cells = {(k, j): cells[(i, j)] for k, i in enumerate(keep) for j in range(len(columns))}
    rows = [rows[i] for i in keep]
    if "components" in figure_kinds(exp):
        _component_names(rows, runs)
    ref_exp = exp.get("reference") or {}
    return Layout(
        name,
        exp.get("description", ""),
        ref_exp.get("paper"),
        compare.table_label(ref_exp.get("table")),
        columns,
        rows,
        cells,
        [int(s) for s in exp["seeds"]],
        len(exp["backbones"]) > 1,
        ref is not None and scope.empty,
        notes,
    )


# ---------------------------------------------------------------- header structure


def _header_levels(lay: Layout) -> list[list[tuple[str, int]]]:
    """Header rows as [(label, colspan)], top to bottom: dataset, ratio, metric (when several)."""
    several = len(lay.metrics) > 1
    per_pair = len(lay.metrics)
    ds_level: list[tuple[str, int]] = []
    for d, _r in lay.pairs:
        if ds_level and ds_level[-1][0] == dataset_name(d):
            ds_level[-1] = (ds_level[-1][0], ds_level[-1][1] + per_pair)
        else:
            ds_level.append((dataset_name(d), per_pair))
    levels = [ds_level, [(f"ρ = {format_ratio(r)}", per_pair) for _, r in lay.pairs]]
    if several:
        levels.append([(metric_name(m, True), 1) for _ in lay.pairs for m in lay.metrics])
    return levels


def _flat_header(lay: Layout, j: int) -> str:
    d, r, m = lay.columns[j]
    s = f"{dataset_name(d)} ρ={format_ratio(r)}"
    return s + (f" {metric_name(m, True)}" if len(lay.metrics) > 1 else "")


def _has_paper(lay: Layout, i: int) -> bool:
    return any(lay.cells[(i, j)].in_reference for j in range(len(lay.columns)))


def _ours_text(c: Cell, expected_n: int, pm: str = " ± ") -> str:
    if not c.n:
        return "missing"
    s = fmt_num(c.mean)
    if c.n > 1 and not pd.isna(c.std):
        s += f"{pm}{fmt_num(c.std)}"
    if c.n != expected_n:
        s += f" (n={c.n})"
    return s


# ---------------------------------------------------------------- Markdown


def _margins(lay: Layout) -> str:
    ms = sorted({c.margin for c in lay.cells.values() if not pd.isna(c.margin)})
    return "/".join(f"{m:g}" for m in ms) or f"{compare.MARGIN:g}"


def _rule(lay: Layout) -> str:
    return RULE.replace("± the margin", f"± {_margins(lay)} point")


def _delta_md(c: Cell) -> str:
    """Δ with the verdict's mark (and the seeds an inconclusive cell needs); the verdict alone without runs."""
    if not c.in_reference:
        return ""
    if not (c.n and c.verdict and not pd.isna(c.delta)):
        return VERDICT_MARK.get(c.verdict or "", "")
    need = c.seeds_text()
    return f"{fmt_delta(c.delta)} {VERDICT_MARK[c.verdict]}" + (f" ({need})" if need else "")


def to_markdown(lay: Layout) -> str:
    """GitHub-flavoured Markdown: one line per method with our numbers, plus 'paper' and 'Δ' lines
    for rows the paper reports (Δ followed by the verdict: ✓ reproduced, ↓ below, ↑ above)."""
    n_exp = len(lay.seeds)
    head = ["Method", ""] + [_flat_header(lay, j) for j in range(len(lay.columns))]
    lines = [
        f"**{lay.title}**",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join([":---", ":---"] + ["---:"] * len(lay.columns)) + "|",
    ]
    for i, row in enumerate(lay.rows):
        cells = [lay.cells[(i, j)] for j in range(len(lay.columns))]
        title = lay.row_title(row).replace("|", "\\|")
        sub = []
        if _has_paper(lay, i):
            sub.append(
                (
                    "paper" + (" (quoted)" if row.quoted else ""),
                    [fmt_paper(c.paper) if c.in_reference else "" for c in cells],
                )
            )
        if row.in_experiment or any(c.n for c in cells):
            sub.append((f"ours ({n_exp} seeds)" if n_exp > 1 else "ours", [_ours_text(c, n_exp) for c in cells]))
            if _has_paper(lay, i):
                sub.append(("Δ", [_delta_md(c) for c in cells]))
        for k, (kind, vals) in enumerate(sub):
            lines.append("| " + " | ".join([title if k == 0 else "", kind] + vals) + " |")
    lines += [
        "",
        f"Ours: mean ± std over seeds {', '.join(map(str, lay.seeds))} (n = number of finished seeds where "
        f"fewer). Δ = ours − paper; {_rule(lay)}; n/r = not reported by the paper; quoted = the paper "
        "copies the number from another publication.",
    ]
    lines += [f"- Note: {n}" for n in lay.notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- LaTeX


def _tex(s: str) -> str:
    out = s
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("_", r"\_"),
        ("#", r"\#"),
        ("ρ", r"$\rho$"),
        ("τ", r"$\tau$"),
        ("Δ", r"$\Delta$"),
        ("–", "--"),
        ("·", r"$\cdot$"),
        ("±", r"$\pm$"),
        ("−", "-"),
    ):
        out = out.replace(a, b)
    return out


def _ours_tex(c: Cell, expected_n: int) -> str:
    if not c.n:
        return r"\textit{missing}"
    s = f"${fmt_num(c.mean)}"
    if c.n > 1 and not pd.isna(c.std):
        s += rf" \pm {fmt_num(c.std)}"
    s += "$"
    if c.n != expected_n:
        s += rf" {{\scriptsize (n={c.n})}}"
    return s


def _delta_tex(c: Cell) -> str:
    if not c.in_reference:
        return ""
    if not (c.n and c.verdict and not pd.isna(c.delta)):
        return VERDICT_TEX.get(c.verdict or "", "")
    need = c.seeds_text()
    return f"${fmt_delta(c.delta)}$ {VERDICT_TEX[c.verdict]}" + (rf" {{\scriptsize ({_tex(need)})}}" if need else "")


def to_latex(lay: Layout) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs, amssymb}) in the paper's layout."""
    n_exp = len(lay.seeds)
    ncol = len(lay.columns)
    out = [
        f"% {lay.title}",
        r"% needs \usepackage{booktabs,amssymb}",
        r"\begin{tabular}{ll" + "r" * ncol + "}",
        r"\toprule",
    ]
    levels = _header_levels(lay)
    for k, level in enumerate(levels):
        heads, rules, col = [], [], 3
        for label, span in level:
            heads.append(rf"\multicolumn{{{span}}}{{c}}{{{_tex(label)}}}" if span > 1 else _tex(label))
            rules.append(rf"\cmidrule(lr){{{col}-{col + span - 1}}}")
            col += span
        out.append(" & & " + " & ".join(heads) + r" \\")
        if k + 1 < len(levels) and any(span > 1 for _, span in level):
            out.append(" ".join(rules))
    out.append(r"\midrule")
    for i, row in enumerate(lay.rows):
        cells = [lay.cells[(i, j)] for j in range(ncol)]
        sub = []
        if _has_paper(lay, i):
            sub.append(
                (
                    "paper" + (" (quoted)" if row.quoted else ""),
                    [
                        fmt_paper(c.paper)
                        if c.in_reference and not pd.isna(c.paper)
                        else ("--" if c.in_reference else "")
                        for c in cells
                    ],
                )
            )
        if row.in_experiment or any(c.n for c in cells):
            sub.append(("ours", [_ours_tex(c, n_exp) for c in cells]))
            if _has_paper(lay, i):
                sub.append((r"$\Delta$", [_delta_tex(c) for c in cells]))
        for k, (kind, vals) in enumerate(sub):
            out.append(
                " & ".join(
                    [_tex(lay.row_title(row)) if k == 0 else "", kind if kind.startswith("$") else _tex(kind)] + vals
                )
                + r" \\"
            )
        if i + 1 < len(lay.rows) and len(sub) > 1:
            out.append(r"\addlinespace")
    out += [
        r"\bottomrule",
        r"\end{tabular}",
        f"% ours: mean $\\pm$ std over seeds {', '.join(map(str, lay.seeds))}; Delta = ours - paper",
        f"% {_rule(lay)}",
    ]
    out += [f"% note: {n}" for n in lay.notes]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- HTML


def _td(c: Cell, expected_n: int, row: Row) -> str:
    cls = ["v-" + (c.verdict or ("ours" if c.n else "missing")).replace(" ", "-")]
    tip = []
    if c.n:
        tip.append(f"n = {c.n} (seeds {' '.join(map(str, c.seeds))})")
        if not pd.isna(c.ci_low):
            tip.append(f"95% CI [{c.ci_low:.2f}, {c.ci_high:.2f}]")
    if not pd.isna(c.tost_low):
        tip.append(f"90% interval of Δ [{c.tost_low:.2f}, {c.tost_high:.2f}] vs margin ± {c.margin:g}")
    if c.verdict:
        tip.append(f"verdict: {c.verdict}")
    if c.note:
        tip.append(f"note: {c.note}")
    parts = []
    if c.n:
        std = f"<span class='sd'> ± {fmt_num(c.std)}</span>" if c.n > 1 and not pd.isna(c.std) else ""
        nflag = f"<span class='nflag'> n={c.n}/{expected_n}</span>" if c.n != expected_n else ""
        parts.append(f"<span class='ours'>{fmt_num(c.mean)}</span>{std}{nflag}")
    elif row.in_experiment:
        parts.append("<span class='ours missing'>missing</span>")
    if c.in_reference and not c.n and not row.in_experiment:  # a paper-only row (e.g. quoted): its value
        parts.append(f"<span class='paper-only'>{fmt_paper(c.paper)}</span>")
    elif c.in_reference:
        pv = fmt_paper(c.paper) if not pd.isna(c.paper) else "n/r"
        q = " quoted" if c.quoted else ""
        d = f" · Δ {fmt_delta(c.delta, minus='−')}" if c.n and not pd.isna(c.delta) else ""
        parts.append(f"<span class='paper'>paper{q} {pv}{d}</span>")
        if c.verdict:
            need = c.seeds_text()
            parts.append(
                f"<span class='verdict'>{html.escape(c.verdict)}</span>"
                + (f"<span class='need'> · {html.escape(need)}</span>" if need else "")
            )
    if not parts:
        parts.append("<span class='none'>–</span>")
    return (
        f"<td class='{' '.join(cls)}' title='{html.escape('; '.join(tip), quote=True)}'>" + "<br>".join(parts) + "</td>"
    )


def to_html(lay: Layout) -> str:
    """An HTML table (a fragment; classes styled by the report's CSS) with a verdict per cell."""
    levels = _header_levels(lay)
    n_exp = len(lay.seeds)
    out = [f"<table class='paper-table' data-experiment='{html.escape(lay.experiment, quote=True)}'><thead>"]
    for k, level in enumerate(levels):
        first = f"<th rowspan='{len(levels)}' class='method'>Method</th>" if k == 0 else ""
        out.append(
            "<tr>" + first + "".join(f"<th colspan='{span}'>{html.escape(lbl)}</th>" for lbl, span in level) + "</tr>"
        )
    out.append("</thead><tbody>")
    for i, row in enumerate(lay.rows):
        label = f"<span class='rowlabel'>{html.escape(row.label)}</span> " if row.label else ""
        bb = f" <span class='bb'>{html.escape(row.backbone)}</span>" if lay.several_backbones else ""
        q = " <span class='quoted-tag'>quoted</span>" if row.quoted and not row.in_experiment else ""
        head = (
            f"<th class='method'>{label}{html.escape(row.name)}{bb}{q}<br><code>{html.escape(row.method)}</code></th>"
        )
        out.append(
            f"<tr class='{'quoted-row' if row.quoted and not row.in_experiment else ''}'>"
            + head
            + "".join(_td(lay.cells[(i, j)], n_exp, row) for j in range(len(lay.columns)))
            + "</tr>"
        )
    out.append("</tbody></table>")
    if lay.notes:
        out.append("<ul class='notes'>" + "".join(f"<li>{html.escape(n)}</li>" for n in lay.notes) + "</ul>")
    return "".join(out)


def write(lay: Layout, out_dir: Path) -> dict[str, Path]:
    """``<out_dir>/<experiment>.{html,md,tex}`` (atomic); returns {format: path}."""
    stem = safe_name(lay.experiment)
    doc = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(lay.title)}</title>"
        f"<style>{TABLE_CSS}</style></head><body><h1>{html.escape(lay.title)}</h1>{to_html(lay)}"
        f"{legend_html(lay)}</body></html>"
    )
    paths = {
        "html": Path(out_dir) / f"{stem}.html",
        "md": Path(out_dir) / f"{stem}.md",
        "tex": Path(out_dir) / f"{stem}.tex",
    }
    io.write_text(paths["html"], doc)
    io.write_text(paths["md"], to_markdown(lay))
    io.write_text(paths["tex"], to_latex(lay))
    return paths


def safe_name(name: str) -> str:
    """A file-name-safe version of an experiment name."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", name) or "experiment"


def legend_html(lay: Layout | None = None) -> str:
    if lay is not None and not any(c.in_reference for c in lay.cells.values()):
        return (
            "<p class='legend'>Cells: our mean ± std over seeds "
            + ", ".join(map(str, lay.seeds))
            + " (n shown where fewer seeds finished; hover for the seeds and the 95 % confidence interval)"
            + ("; the paper reports none of these cells" if lay.paper else "")
            + ".</p>"
        )
    margin = _margins(lay) if lay is not None else f"{compare.MARGIN:g}"
    return (
        "<p class='legend'><span class='v-reproduced'>reproduced</span> the 90 % interval of Δ lies inside "
        f"± {margin} point (equivalence shown) · <span class='v-inconclusive'>inconclusive</span> the paper's "
        "value is inside our 95 % interval but equivalence is not shown (with the seeds that would decide it "
        "at 80 % power) · <span class='v-below'>below</span> / <span class='v-above'>above</span> our 95 % "
        "interval excludes the paper's value · <span class='v-single-run'>single run</span> one seed, no "
        "interval · <span class='v-missing'>missing</span> no finished run · <span class='v-not-reported'>n/r</span> "
        "not reported by the paper · <span class='v-quoted'>quoted</span> the paper copies it from another "
        "publication · <span class='v-ours'>ours only</span> the paper has no such cell. Cells: our mean "
        "± std over seeds (n shown where fewer seeds finished), then the paper's value and Δ = ours − paper; "
        "hover for the seeds and the confidence interval.</p>"
    )


TABLE_CSS = """
table.paper-table{border-collapse:collapse;font-size:.86rem;margin:.4rem 0 .6rem;font-variant-numeric:tabular-nums}
.paper-table th,.paper-table td{border:1px solid #d0d4da;padding:.25rem .45rem;text-align:center;vertical-align:middle}
.paper-table thead th{background:#eef1f5;font-weight:600}
.paper-table th.method{text-align:left;background:#f7f8fa;font-weight:600;min-width:11rem}
.paper-table th.method code{font-weight:400;font-size:.75rem;color:#666}
.paper-table .ours{font-weight:600;font-size:.95rem;color:#1d2125}.paper-table .sd{color:#555;font-size:.8rem}
.paper-table .paper{font-size:.75rem;color:#444}.paper-table .verdict{font-size:.7rem;text-transform:uppercase;
letter-spacing:.03em;font-weight:600}.paper-table .nflag{color:#b35c00;font-size:.75rem;font-weight:600}
.rowlabel{display:inline-block;min-width:1.8rem;color:#555}.bb{color:#345;font-size:.8rem}
.quoted-tag{font-size:.7rem;color:#777;border:1px solid #bbb;border-radius:3px;padding:0 .2rem;font-weight:400}
tr.quoted-row th.method{color:#666;font-weight:500}
.v-reproduced{background:#e3f4e6}.v-reproduced .verdict{color:#1e7b34}
.v-below{background:#fde6e4}.v-below .verdict{color:#b3261e}
.v-above{background:#e4eefc}.v-above .verdict{color:#1a56b3}
.v-inconclusive{background:#fff4d6}.v-inconclusive .verdict{color:#8a6d00}
.paper-table .need{font-size:.7rem;color:#8a6d00}
.v-single-run{background:#f3f0fa}.v-single-run .verdict{color:#5b4a8a}
.v-missing{background:repeating-linear-gradient(45deg,#f6f6f6,#f6f6f6 6px,#ececec 6px,#ececec 12px);color:#888}
.v-missing .verdict,.paper-table .missing{color:#8a6d00;font-weight:600}
.v-not-reported{background:#fafafa;color:#777}.v-quoted{background:#f4f4f4;color:#555}
.paper-only{font-style:italic;font-size:.9rem}
.v-ours{background:#fff}
.legend span{padding:0 .3rem;border-radius:3px}.legend{font-size:.8rem;color:#444}
ul.notes{font-size:.8rem;color:#555}
"""
