"""The report's first screen: the findings table (``findings.csv``, decided verdicts first), each
experiment's one-line finding, and the same rows as a Markdown block (``<tables_dir>/findings.md``) that
the README and docs can include. Every number is ``findings.csv``'s (:mod:`ltbench.analysis.findings`),
only formatted here."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import pandas as pd

from ltbench.analysis.findings import DECIDED, SEQUENTIAL_TEST, UNDECIDED
from ltbench.report.tables import fmt_delta, fmt_num, fmt_paper, safe_name

SEQUENTIAL_NOTE = (
    " Rows marked seq. are a sequential experiment's: their verdict is its group-sequential decision at the "
    "seeds shown (the error rate kept over its looks; its section's Sequential verdicts), not a fixed-design "
    "test on those seeds."
)
INLINE_ROWS = 20  # rows shown in the table itself; undecided rows beyond it fold into a <details> block
LISTED = 3  # decided findings an experiment's one-line finding names with their numbers

CSS = """
h2#findings{margin-top:1rem}
table.findings{border-collapse:collapse;font-size:.85rem;margin:.4rem 0 .8rem;width:100%;
font-variant-numeric:tabular-nums}
table.findings th,table.findings td{border-bottom:1px solid #dde1e6;padding:.22rem .45rem;text-align:right;
vertical-align:top}
table.findings th{background:#eef1f5;border-bottom:2px solid #c9ced6}
table.findings td{white-space:nowrap}table.findings td.claim small{color:#666}
table.findings td.claim,table.findings th.claim{text-align:left;white-space:normal}
table.findings tr.decided td{background:#fbfbfc}
.label{display:inline-block;padding:0 .4rem;border-radius:3px;font-size:.78rem;font-weight:600;white-space:nowrap}
.label.v-contradicted,.label.v-below{background:#fde6e4;color:#b3261e;border:1px solid #e8a29c}
.label.v-supported,.label.v-reproduced,.label.v-no-gain{background:#e3f4e6;color:#1e7b34;border:1px solid #9fd3ab}
.label.v-above{background:#e4eefc;color:#1a56b3;border:1px solid #9dbbe8}
.label.v-not-significant,.label.v-inconclusive{background:#f3f3f3;color:#555;border:1px solid #ccc}
.label.v-untested,.label.v-missing,.label.v-single-run{background:#fff4d6;color:#8a6d00;border:1px solid #e6c35c}
p.finding{font-size:.95rem;background:#f7f8fa;border-left:4px solid #8a94a3;padding:.4rem .7rem;max-width:70rem}
"""


def esc(v: object) -> str:
    return html.escape("" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v))


def label(verdict: str) -> str:
    return f"<span class='label v-{esc(verdict).replace(' ', '-')}'>{esc(verdict)}</span>"


def _gain(r: Any) -> bool:
    return r.quantity == "gain"


def ours_text(r: Any, minus: str = "−") -> str:
    """'−12.29 [−19.88, −4.71]' (a gain, signed) or '67.20 [59.62, 74.78]' (an accuracy); '–' without runs."""
    if pd.isna(r.ours):
        return "–"
    f = (lambda v: fmt_delta(v, minus=minus)) if _gain(r) else fmt_num
    ci = f" [{f(r.ci_low)}, {f(r.ci_high)}]" if not (pd.isna(r.ci_low) or pd.isna(r.ci_high)) else ""
    return f(r.ours) + ci


def paper_text(r: Any, minus: str = "−") -> str:
    if pd.isna(r.paper):
        return "–"  # the paper gives no number for this cell
    return fmt_delta(r.paper, minus=minus) if _gain(r) else fmt_paper(r.paper)


def seeds_text(r: Any) -> str:
    n = "–" if pd.isna(r.n_method) else str(int(r.n_method))
    return f"{n} / {int(r.n_over)}" if _gain(r) and not pd.isna(r.n_over) else n


def _sequential(r: Any) -> bool:
    return isinstance(r.test, str) and r.test.startswith(SEQUENTIAL_TEST)


def _p(r: Any) -> str:
    if _sequential(r):
        return f"<span title='{esc(r.test)}'>seq.</span>"
    if pd.isna(r.p_value):
        return "–"
    return "< 0.001" if r.p_value < 0.001 else f"{r.p_value:.3f}"


def _row(r: Any) -> str:
    src = f" <small>({esc(r.source)})</small>" if isinstance(r.source, str) and r.source else ""
    cls = "decided" if r.verdict in DECIDED else ""
    return (
        f"<tr class='{cls}' data-verdict='{esc(r.verdict)}' data-experiment='{esc(r.experiment)}' "
        f"data-id='{esc(r.id)}'><td class='claim'>{esc(r.claim)}{src}</td><td>{esc(paper_text(r))}</td>"
        f"<td>{esc(ours_text(r))}</td><td>{label(r.verdict)}</td><td>{seeds_text(r)}</td><td>{_p(r)}</td>"
        f"<td class='claim'><a href='#exp-{esc(safe_name(r.experiment))}'>{esc(r.experiment)}</a></td></tr>"
    )


HEAD = (
    "<thead><tr><th class='claim'>claim tested</th><th title='the value the paper gives; – where none'>paper</th>"
    "<th>ours [95 % interval]</th><th>verdict</th>"
    "<th title='seeds per side: method / the method it improves on'>seeds</th><th title='Holm-adjusted t-test "
    "of a gain; TOST of a reproduction; seq.: the group-sequential decision of a sequential experiment'>p</th>"
    "<th class='claim'>section</th></tr></thead>"
)


def _counts(df: pd.DataFrame) -> str:
    counts = df["verdict"].value_counts()
    order = [v for v in (*DECIDED, *UNDECIDED) if v in counts] + [
        v for v in counts.index if v not in DECIDED + UNDECIDED
    ]
    return ", ".join(f"{counts[v]} {label(v)}" for v in order)


def table_html(findings: pd.DataFrame) -> str:
    """The findings table: a sentence with the counts, then every row (decided first); undecided rows past
    :data:`INLINE_ROWS` in a second table inside a closed <details>."""
    if findings.empty:
        return (
            "<p>No claim is tested in this report: no experiment has a paper reference, an ablation or a "
            "sensitivity figure (its tables show our numbers only).</p>"
        )
    rows = list(findings.itertuples(index=False))
    cut = max(INLINE_ROWS, sum(r.verdict in DECIDED for r in rows))
    intro = (
        f"<p>{len(rows)} claims tested: {_counts(findings)}. Gains are in points (ours − the method it improves "
        "on, 95 % Welch interval); accuracies in % (95 % Student-t interval over seeds). Decided verdicts first."
        f"{SEQUENTIAL_NOTE if any(map(_sequential, rows)) else ''}</p>"
    )
    out = [intro, f"<table class='findings'>{HEAD}<tbody>{''.join(map(_row, rows[:cut]))}</tbody></table>"]
    if rows[cut:]:
        rest = findings.iloc[cut:]
        out.append(
            f"<details><summary>{len(rest)} more tests ({_counts(rest)})</summary><table class='findings'>{HEAD}"
            f"<tbody>{''.join(map(_row, rows[cut:]))}</tbody></table></details>"
        )
    return "".join(out)


def _one(r: Any) -> str:
    return f"{esc(r.claim)}: {label(r.verdict)} ({esc(ours_text(r))}, seeds {seeds_text(r)})"


def experiment_line(findings: pd.DataFrame, name: str, exp: Mapping) -> str:
    """The experiment's finding in one line: its decided claims with their numbers (up to :data:`LISTED`),
    then how many others there are by verdict; or why it tests none."""
    mine = findings[findings["experiment"] == name] if not findings.empty else findings
    if mine.empty:
        why = (
            "the paper reports none of its cells and it has no ablation or sensitivity figure"
            if exp.get("reference")
            else "it has no paper reference: its tables and figures show our numbers only"
        )
        return f"<p class='finding'><b>Finding:</b> no claim is tested in this experiment ({why}).</p>"
    rows = list(mine.itertuples(index=False))
    picked = (
        [i for i, r in enumerate(rows) if r.verdict in DECIDED][:LISTED] if len(rows) > LISTED else range(len(rows))
    )
    shown = [rows[i] for i in picked]
    rest = mine.drop(mine.index[list(picked)])
    text = "; ".join(_one(r) for r in shown) or "nothing decided"
    if not rest.empty:
        text += f"; {'and ' if shown else ''}{len(rest)} more: {_counts(rest)}"
    return f"<p class='finding'><b>Finding:</b> {text}.</p>"


def to_markdown(findings: pd.DataFrame) -> str:
    """The findings as a GitHub-flavoured Markdown table (ASCII minus signs), for the README and docs."""
    lines = [
        "| claim tested | paper | ours [95 % interval] | verdict | seeds | experiment |",
        "|:---|---:|---:|:---|---:|:---|",
    ]
    seq = False
    for r in findings.itertuples(index=False):
        seq = seq or _sequential(r)
        verdict = f"**{r.verdict}**" + (" (seq.)" if _sequential(r) else "")
        cells = [r.claim, paper_text(r, "-"), ours_text(r, "-"), verdict, seeds_text(r), r.experiment]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += [
        "",
        "Gains in points (ours − the method it improves on; 95 % Welch interval; verdict by the Holm-adjusted "
        "t-test across seeds), accuracies in % (95 % Student-t interval); seeds per side. From `findings.csv`."
        + (SEQUENTIAL_NOTE if seq else ""),
    ]
    return "\n".join(lines) + "\n"
