"""The report's figures (matplotlib / seaborn), each saved as PNG and SVG.

Per experiment (``<figures_dir>/<experiment>/<kind>.png`` and ``.svg``):

- ``groups``: top-1 and many / medium / few accuracy per method (bars: mean; error bars: std over seeds).
- ``per_class``: per-class test accuracy against the class's number of training images.
- ``components`` (``figure: components``, CBN Figure 5): accuracy vs the number of CBN components M,
  Total / Many / Medium / Few, mean ± std over seeds (each seed a dot).
- ``backbones`` (``figure: backbones``, CBN Figure 6): top-1 per backbone depth for each method.
- ``ablation_vs_baseline`` (``figure: ablation``): heatmap of each method's gain over the
  experiment's first method, per (dataset, ratio), * = significant (paired t-test across seeds,
  Welch's when the seeds differ, Holm-adjusted p < 0.05), = = no gain (equivalent within ± margin).
- ``sensitivity`` (``figure: sensitivity``): each method's Δ top-1 over the first method with its 95 %
  Welch interval and verdict (gains.csv, ``kind`` = ``sensitivity``), one row per reading.
- ``scaling`` (``figure: scaling``): each method's Δ top-1 over the first method of its training length
  (gains.csv, ``kind`` = ``scaling``) against the training epochs or the backbone depth.
- ``ablation_vs_paper`` (``figure: ablation``, when the paper reports cells of the experiment):
  heatmap of Δ = ours − paper.
- ``bn_norms`` (experiments with an NBN method): distribution over channels of the effective
  per-channel |weight| and |bias| of the last stage's normalization layers, read from each run's
  ``model.pt``: BatchNorm's γ and β; NBN's effective affine as the layer computes it
  (:meth:`ltbench.nn.norm.NormalizedBatchNorm2d.effective_affine`); CBN's per-component γ_k, β_k (all M × C values).

The numbers come from the aggregate stage's files: bars and error bars from ``summary.csv``, the
gains of the ablation heatmap from ``gains.csv`` (``kind`` = ``ablation``), Δ vs the paper from the
table layout (``comparison.csv``); ``runs.csv`` gives the per-seed dots and the resolved recipe (M).

Every function returns the PNG path, or raises :class:`Skip` with the reason when the data for the
figure is not there (no finished run, no model file, no M...); the report lists skipped figures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # noqa: E402

from ltbench import io  # noqa: E402
from ltbench.analysis import compare  # noqa: E402
from ltbench.analysis.aggregate import METRICS  # noqa: E402
from ltbench.data.longtail import format_ratio  # noqa: E402
from ltbench.report.tables import (
    M_KNOB,
    NORM_KNOB,
    Layout,
    dataset_name,
    fmt_delta,
    method_name,  # noqa: E402
    metric_name,
    of_experiment,
    safe_name,
)
from ltbench.spec.catalog import backbone_depth  # noqa: E402
from ltbench.spec.config import figure_kinds  # noqa: E402

DPI = 110


class Skip(Exception):
    """A figure that cannot be drawn from the data at hand; the message says why."""


def save(fig: Figure, path: Path) -> Path:
    """``path`` (PNG) and the same name with ``.svg``, both written atomically."""
    path = Path(path)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    with io.atomic_path(path.with_suffix(".svg")) as tmp:
        fig.savefig(tmp, format="svg", bbox_inches="tight")
    plt.close(fig)
    return path


def select(df: pd.DataFrame, exp: Mapping, seeds: bool = True) -> pd.DataFrame:
    """Rows of a runs / per-class frame that belong to the experiment's grid (and seeds)."""
    if df.empty:
        return df
    ratio = df["ratio"].astype(float)
    m = (
        df["dataset"].isin(exp["datasets"])
        & ratio.isin({float(r) for r in exp["ratios"]})
        & df["method"].isin(exp["methods"])
        & df["backbone"].isin(exp["backbones"])
    )
    if seeds and "seed" in df.columns:
        m &= df["seed"].astype(int).isin([int(s) for s in exp["seeds"]])
    return df[m].copy()


def _cell_label(d: str, r: Any, backbone: str | None = None) -> str:
    s = f"{dataset_name(d)} ρ={format_ratio(r)}"
    return f"{s} · {backbone}" if backbone else s


def _panel_col(df: pd.DataFrame, exp: Mapping) -> pd.Series:
    several = len(exp["backbones"]) > 1
    return pd.Series(
        [
            _cell_label(d, r, b if several else None)
            for d, r, b in zip(df["dataset"], df["ratio"], df["backbone"], strict=True)
        ],
        index=df.index,
    )


def _panel_order(exp: Mapping, present: Iterable[str]) -> list[str]:
    """Panel labels in the config's order (datasets, then ratios, then backbones), those present only."""
    several = len(exp["backbones"]) > 1
    labels = [
        _cell_label(d, r, b if several else None)
        for d in exp["datasets"]
        for r in exp["ratios"]
        for b in exp["backbones"]
    ]
    present = set(present)
    return [lb for lb in dict.fromkeys(labels) if lb in present]


def _log_x(ax: Axes) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _method_order(exp: Mapping, present: Iterable[str]) -> list[str]:
    return [m for m in exp["methods"] if m in set(present)]


def _palette(methods: list[str]) -> dict[str, tuple]:
    colors = sns.color_palette("tab10" if len(methods) <= 10 else "tab20", len(methods))
    return dict(zip(methods, colors, strict=True))


# ---------------------------------------------------------------- generic figures


def _grid(n_panels: int, width: float, height: float, ncols: int = 3) -> tuple[Figure, list[Axes]]:
    ncols = min(ncols, n_panels)
    nrows = -(-n_panels // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return fig, flat[:n_panels]


def _legend_below(fig: Figure, axes: Iterable[Axes], title: str | None = None, ncol: int = 4) -> None:
    handles, labels = [], []
    for ax in axes:
        for h, lb in zip(*ax.get_legend_handles_labels(), strict=True):
            if lb not in labels:
                handles.append(h)
                labels.append(lb)
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(ncol, len(labels)),
        frameon=False,
        title=title,
        fontsize=8,
    )


def _finish_panels(fig: Figure, axes: list[Axes], n_panels: int, ylabel: str, title: str, path: Path) -> Path:
    """Y label on the first panel of each row, the title, the method legend below; saved."""
    for ax in axes[:: min(3, n_panels)]:
        ax.set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    _legend_below(fig, axes, "method")
    return save(fig, path)


def _summary(summary: pd.DataFrame, name: str, exp: Mapping, metric: str | None = None) -> pd.DataFrame:
    """The experiment's rows of summary.csv (of one metric), ratio as float, std 0 where n = 1."""
    s = of_experiment(summary, name)
    if s.empty:
        return s
    s = s[s["method"].isin(exp["methods"])].copy()
    if metric is not None:
        s = s[s["metric"] == metric]
    s["ratio"] = s["ratio"].astype(float)
    s["err"] = s["std"].where(s["n"] > 1).fillna(0.0)
    return s


def fig_groups(summary: pd.DataFrame, name: str, exp: Mapping, path: Path) -> Path:
    s = _summary(summary, name, exp)
    if s.empty:
        raise Skip("no finished run")
    s["panel"] = _panel_col(s, exp)
    order = _method_order(exp, s["method"])
    pal = _palette(order)
    panels = _panel_order(exp, s["panel"])
    stats = s.set_index(["panel", "method", "metric"])
    fig, axes = _grid(len(panels), 4.4 if len(order) < 8 else 5.6, 3.0)
    width = 0.8 / len(order)
    for ax, panel in zip(axes, panels, strict=True):
        for k, m in enumerate(order):
            pts = [
                (i - 0.4 + width * (k + 0.5), stats.loc[(panel, m, metric)])
                for i, metric in enumerate(METRICS)
                if (panel, m, metric) in stats.index
            ]
            if pts:
                ax.bar(
                    [x for x, _ in pts],
                    [st["mean"] for _, st in pts],
                    width=width * 0.95,
                    color=pal[m],
                    label=method_name(m),
                    yerr=[st["err"] for _, st in pts],
                    error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": "#333"},
                )
        ax.set_xticks(range(len(METRICS)), [metric_name(m, True) for m in METRICS])
        ax.set_title(panel, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    return _finish_panels(
        fig, axes, len(panels), "accuracy (%)", "Accuracy overall and by class group (mean ± std over seeds)", path
    )


def fig_per_class(per_class: pd.DataFrame, exp: Mapping, path: Path) -> Path:
    s = select(per_class, exp)
    if s.empty:
        raise Skip("no finished run")
    s["panel"] = _panel_col(s, exp)
    d = s.groupby(["panel", "method", "class"], as_index=False).agg(
        acc=("acc", "mean"), train_count=("train_count", "first")
    )
    order = _method_order(exp, d["method"])
    pal = _palette(order)
    panels = _panel_order(exp, s["panel"])
    fig, axes = _grid(len(panels), 4.4, 3.1)
    for ax, panel in zip(axes, panels, strict=True):
        for m in order:
            g = d[(d["panel"] == panel) & (d["method"] == m)].sort_values(["train_count", "class"])
            if len(g):
                ax.plot(
                    g["train_count"],
                    g["acc"],
                    marker="o",
                    markersize=2.5,
                    linewidth=1.0,
                    color=pal[m],
                    label=method_name(m),
                    alpha=0.9,
                )
        _log_x(ax)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("training images of the class (log scale)")
        ax.grid(alpha=0.3)
    return _finish_panels(
        fig, axes, len(panels), "test accuracy (%)", "Per-class accuracy vs training count (mean over seeds)", path
    )


# ---------------------------------------------------------------- CBN Figure 5 and Figure 6


def _errorbars(ax: Axes, stats: pd.DataFrame, dots: pd.DataFrame, color: Any, label: str, jitter: float = 0.0) -> None:
    """Mean ± std at ``stats["x"]`` (summary rows), each seed's value at ``dots["x"]`` (runs rows)."""
    stats = stats.sort_values("x")
    ax.errorbar(
        stats["x"] + jitter,
        stats["mean"],
        yerr=stats["err"],
        marker="o",
        capsize=3,
        color=color,
        label=label,
        linewidth=1.6,
        markersize=5,
    )
    ax.scatter(dots["x"] + jitter, dots["value"], s=9, color=color, alpha=0.35, linewidths=0)


def _components_of(runs: pd.DataFrame, exp: Mapping) -> pd.Series:
    """method -> number of CBN components M (the resolved recipe column of runs.csv), CBN methods only."""
    s = select(runs, exp)
    if s.empty or M_KNOB not in s.columns:
        raise Skip(f"no finished run with a {M_KNOB} column (no CBN method)")
    s = s[s.get(NORM_KNOB, "cbn") == "cbn"].dropna(subset=[M_KNOB])
    if s.empty:
        raise Skip("no finished CBN run (methods with norm.name: cbn)")
    return s.drop_duplicates("method").set_index("method")[M_KNOB].astype(float).astype(int)


def _series(df: pd.DataFrame, exp: Mapping) -> list[str]:
    several_b = len(exp["backbones"]) > 1
    return [
        _cell_label(d, r, b if several_b else None)
        for d, r, b in zip(df["dataset"], df["ratio"], df["backbone"], strict=True)
    ]


def fig_components(summary: pd.DataFrame, runs: pd.DataFrame, name: str, exp: Mapping, path: Path) -> Path:
    m_of = _components_of(runs, exp)
    s = _summary(summary, name, exp)
    s = s[s["method"].isin(m_of.index)] if not s.empty else s
    if s.empty:
        raise Skip("no finished CBN run")
    dots = select(runs, exp).dropna(subset=["value"])
    dots = dots[dots["method"].isin(m_of.index)].assign(ratio=lambda d: d["ratio"].astype(float))
    for df in (s, dots):
        df["x"], df["series"] = df["method"].map(m_of), _series(df, exp)
    series = _panel_order(exp, s["series"])
    colors = dict(zip(series, sns.color_palette("tab10", len(series)), strict=True))
    fig, axes = plt.subplots(1, 4, figsize=(13.5, 3.3), sharex=True)
    for ax, metric in zip(axes, METRICS, strict=True):
        for k, sname in enumerate(series):
            sel, dsel = (
                s[(s["metric"] == metric) & (s["series"] == sname)],
                dots[(dots["metric"] == metric) & (dots["series"] == sname)],
            )
            if len(sel):
                _errorbars(ax, sel, dsel, colors[sname], sname, jitter=0.06 * (k - (len(series) - 1) / 2))
        ax.set_title(metric_name(metric, True))
        ax.set_xlabel("components M")
        ax.set_xticks(sorted(s["x"].unique()))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=min(4, len(series)), bbox_to_anchor=(0.5, -0.12), frameon=False
    )
    methods = ", ".join(f"M={m}: {meth}" for m, meth in sorted(set(zip(s["x"], s["method"], strict=True))))
    fig.suptitle("Accuracy vs number of CBN components M (mean ± std over seeds; dots: seeds)", y=1.02)
    fig.text(0.5, -0.2, methods, ha="center", fontsize=8, color="#555", wrap=True)
    return save(fig, path)


def fig_backbones(
    summary: pd.DataFrame, runs: pd.DataFrame, name: str, exp: Mapping, path: Path, metric: str = "top1"
) -> Path:
    s = _summary(summary, name, exp, metric)
    if s.empty:
        raise Skip("no finished run")
    dots = select(runs, exp).dropna(subset=["value"])
    dots = dots[dots["metric"] == metric].assign(ratio=lambda d: d["ratio"].astype(float))
    backbones = [b for b in exp["backbones"] if b in set(s["backbone"])]
    if all(math.isfinite(backbone_depth(b)) for b in backbones):
        backbones.sort(key=backbone_depth)
    pos = {b: i for i, b in enumerate(backbones)}
    for df in (s, dots):
        df["x"] = df["backbone"].map(pos).astype(float)
        df["panel"] = [_cell_label(d, r) for d, r in zip(df["dataset"], df["ratio"], strict=True)]
    panels = _panel_order({**exp, "backbones": exp["backbones"][:1]}, s["panel"])
    order = _method_order(exp, s["method"])
    pal = _palette(order)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for k, m in enumerate(order):
            sel = s[(s["panel"] == panel) & (s["method"] == m)]
            if len(sel):
                _errorbars(
                    ax,
                    sel,
                    dots[(dots["panel"] == panel) & (dots["method"] == m)],
                    pal[m],
                    method_name(m),
                    jitter=0.05 * (k - (len(order) - 1) / 2),
                )
        ax.set_xticks(range(len(backbones)), backbones)
        ax.set_title(panel)
        ax.set_xlabel("backbone")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{metric_name(metric, False)} accuracy (%)")
    axes[0][-1].legend(frameon=False, fontsize=8, loc="best")
    fig.suptitle("Backbone depth: top-1 per method (mean ± std over seeds; dots: seeds)", y=1.03)
    return save(fig, path)


# ---------------------------------------------------------------- ablation heatmaps


def _heatmap(values: pd.DataFrame, annot: pd.DataFrame, title: str, cbar: str, path: Path) -> Path:
    lim = np.nanmax(np.abs(values.to_numpy(dtype=float))) if values.notna().any().any() else 1.0
    lim = max(lim, 0.5)
    fig, ax = plt.subplots(figsize=(1.25 * values.shape[1] + 3.2, 0.48 * values.shape[0] + 1.6))
    sns.heatmap(
        values.astype(float),
        annot=annot.to_numpy(),
        fmt="",
        cmap="RdBu",
        center=0,
        vmin=-lim,
        vmax=lim,
        linewidths=0.5,
        linecolor="white",
        cbar_kws={"label": cbar},
        ax=ax,
        annot_kws={"fontsize": 8},
    )
    ax.set_facecolor("#e6e6e6")  # NaN cells
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.set_title(title, fontsize=10)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    plt.setp(ax.get_yticklabels(), rotation=0)
    return save(fig, path)


def _gain_mark(r: Any) -> str:
    if pd.isna(r.gain):
        return "–"
    return fmt_delta(r.gain) + {"supported": "*", "contradicted": "*", "no gain": "="}.get(r.gain_verdict, "")


def fig_ablation_baseline(gains: pd.DataFrame, name: str, exp: Mapping, path: Path, metric: str = "top1") -> Path:
    """Each method's gain over the experiment's first method (gains.csv rows of kind ``ablation``)."""
    over = exp["methods"][0]
    if len(exp["methods"]) < 2:
        raise Skip("the experiment has a single method")
    g = of_experiment(gains, name)
    g = g[(g["kind"] == "ablation") & (g["metric"] == metric)] if not g.empty else g
    if g.empty or g["gain"].isna().all():
        raise Skip(f"no method has finished runs next to {over!r}")
    several_b = len(exp["backbones"]) > 1
    g = g.assign(
        row=[
            method_name(m) + (f" · {b}" if several_b else "") for m, b in zip(g["method"], g["backbone"], strict=True)
        ],
        col=[_cell_label(d, float(r)) for d, r in zip(g["dataset"], g["ratio"], strict=True)],
        a=[_gain_mark(r) for r in g.itertuples(index=False)],
    )
    rows, cols = list(dict.fromkeys(g["row"])), list(dict.fromkeys(g["col"]))
    vals = g.pivot(index="row", columns="col", values="gain").reindex(index=rows, columns=cols)
    annot = g.pivot(index="row", columns="col", values="a").reindex(index=rows, columns=cols).fillna("–")
    return _heatmap(
        vals,
        annot,
        f"Gain over {method_name(over)} ({metric_name(metric, False)}, points; "
        f"* Holm-adjusted p < {compare.ALPHA:g}, = no gain)",
        "Δ top-1 vs baseline (points)",
        path,
    )


def fig_ablation_paper(layout: Layout, path: Path) -> Path:
    rows, vals, ann = [], [], []
    cols = [
        _cell_label(d, r) + (f" {metric_name(m, True)}" if len(layout.metrics) > 1 else "")
        for d, r, m in layout.columns
    ]
    mark = {"reproduced": "✓", "inconclusive": "?", "below": "↓", "above": "↑"}
    for i, row in enumerate(layout.rows):
        cells = [layout.cells[(i, j)] for j in range(len(layout.columns))]
        if not any(c.n and not pd.isna(c.paper) for c in cells):
            continue
        rows.append(layout.row_title(row))
        vals.append([c.delta if c.n and not pd.isna(c.paper) else np.nan for c in cells])
        ann.append(
            [
                f"{fmt_delta(c.delta)}{mark.get(c.verdict or '', '')}"
                if c.n and not pd.isna(c.paper)
                else ("missing" if not c.n and not pd.isna(c.paper) else "–")
                for c in cells
            ]
        )
    if not rows:
        raise Skip(
            "the paper reports none of this experiment's cells that have finished runs (reference-free layout)"
            if layout.reference_free
            else "no finished run of a cell the paper reports"
        )
    v = pd.DataFrame(vals, index=rows, columns=cols)
    a = pd.DataFrame(ann, index=rows, columns=cols)
    return _heatmap(
        v, a, "Ours − paper (points; ✓ reproduced, ? inconclusive, ↓ below, ↑ above)", "Δ vs paper (points)", path
    )


# ---------------------------------------------------------------- sensitivity to the open details

VERDICT_STYLE = {
    "supported": ("#1a7f37", "o"),
    "contradicted": ("#c62828", "o"),
    "no gain": ("#1f5fa8", "D"),
    "not significant": ("#777777", "o"),
    "untested": ("#bbbbbb", "x"),
}


def failure_notes(cells: pd.DataFrame | None, exp: Mapping) -> dict[tuple[str, str], str]:
    """{(panel, method): 'failed in k of n seeds (diverged / collapsed)'} for the experiment's cells that
    ``cells.csv`` lists as failed, the kind read from each cell's error line."""
    mine = of_experiment(cells, exp["name"])
    if mine.empty or "status" not in mine.columns:
        return {}
    mine = mine.assign(panel=_panel_col(mine, exp))
    notes = {}
    for (panel, method), grp in mine.groupby(["panel", "method"]):
        bad = grp[grp["status"] == "failed"]
        if bad.empty:
            continue
        detail = bad["detail"].fillna("").astype(str)
        kinds = sorted(
            {"diverged" if "diverged" in d else "collapsed" if "collapsed" in d else "error" for d in detail}
        )
        notes[(panel, method)] = f"failed in {len(bad)} of {len(grp)} seeds ({', '.join(kinds)})"
    return notes


def fig_sensitivity(
    gains: pd.DataFrame, name: str, exp: Mapping, path: Path, metric: str = "top1", cells: pd.DataFrame | None = None
) -> Path:
    """Each method's (= each reading's) Δ top-1 over the experiment's first method with the 95 % Welch
    interval and the verdict, as ``gains.csv`` (``kind`` = ``sensitivity``) has them: one panel per
    (dataset, ratio, backbone), one row per method. A reading with failed cells (``cells.csv``: diverged,
    collapsed) says so on its row, in place of a point when no seed finished."""
    over = exp["methods"][0]
    g = of_experiment(gains, name)
    g = g[(g["kind"] == "sensitivity") & (g["metric"] == metric)] if not g.empty else g
    if g.empty or g["gain"].isna().all():
        raise Skip(f"no method has finished runs next to {over!r}")
    g = g.assign(panel=_panel_col(g, exp))
    panels = _panel_order(exp, g["panel"])
    order = _method_order(exp, g["method"])
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.2 * len(panels), 0.42 * len(order) + 1.6), squeeze=False, sharey=True
    )
    notes = failure_notes(cells, {**exp, "name": name})
    for ax, panel in zip(axes[0], panels, strict=True):
        sub = g[g["panel"] == panel].set_index("method").reindex(order)
        for y, (m, r) in enumerate(sub.iterrows()):
            note = notes.get((panel, m))
            if pd.isna(r["gain"]):
                if note:
                    ax.annotate(
                        note,
                        (0.02, y),
                        xycoords=("axes fraction", "data"),
                        va="center",
                        fontsize=8,
                        color=VERDICT_STYLE["contradicted"][0],
                        fontweight="bold",
                    )
                continue
            color, marker = VERDICT_STYLE.get(r["gain_verdict"], VERDICT_STYLE["untested"])
            lo, hi = r["welch_ci_low"], r["welch_ci_high"]
            err = [[r["gain"] - lo], [hi - r["gain"]]] if not (pd.isna(lo) or pd.isna(hi)) else None
            ax.errorbar(r["gain"], y, xerr=err, fmt=marker, color=color, capsize=3)
            label = f"{fmt_delta(r['gain'])} {r['gain_verdict']}" + (f"; {note}" if note else "")
            ax.annotate(
                label, (r["gain"], y), xytext=(0, 7), textcoords="offset points", ha="center", fontsize=7, color=color
            )
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_yticks(range(len(order)), [method_name(m) for m in order])
        ax.set_ylim(len(order) - 0.5, -0.7)
        ax.set_title(panel)
        ax.set_xlabel(f"Δ {metric_name(metric, False)} vs {method_name(over)} (points)")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(
        f"Sensitivity: each reading's gain over {method_name(over)} (95 % Welch interval; verdict: "
        f"Holm-adjusted test over the readings)",
        y=1.02,
        fontsize=10,
    )
    return save(fig, path)


# ---------------------------------------------------------------- scaling: the gain against budget or depth


def _epochs_of(runs: pd.DataFrame) -> dict[tuple, float]:
    """{(dataset, ratio, method, backbone): training epochs} of the finished runs (``train.epochs``)."""
    if runs.empty or "train.epochs" not in runs.columns:
        return {}
    keys = ["dataset", "ratio", "method", "backbone"]
    df = runs.assign(ratio=runs["ratio"].astype(float)).dropna(subset=["train.epochs"])
    return {k: float(v.iloc[0]) for k, v in df.groupby(keys)["train.epochs"]}


def scaling_points(
    gains: pd.DataFrame, runs: pd.DataFrame, name: str, exp: Mapping, metric: str = "top1"
) -> tuple[str, pd.DataFrame]:
    """The points of the scaling figure, from ``gains.csv`` (``kind`` = ``scaling``) and the runs' epochs.

    Returns (axis, points): axis ``"depth"`` when the experiment's gains span several backbone depths,
    else ``"epochs"``; points one row per measured gain with ``panel``, ``series`` (the method's place in
    its group, 1 = the first method after the reference), ``label``, ``x``, ``gain``, ``low``, ``high``
    (the 95 % Welch interval) and ``verdict``, sorted by series and x."""
    g = of_experiment(gains, name)
    g = g[(g["kind"] == "scaling") & (g["metric"] == metric)] if not g.empty else g
    g = g.dropna(subset=["gain"]) if not g.empty else g
    if g.empty:
        raise Skip("no method has finished runs next to the first method of its training length")
    depth = g["backbone"].map(backbone_depth)
    axis = "depth" if depth.nunique() > 1 else "epochs"
    if axis == "depth":
        x = depth
        panel = pd.Series([_cell_label(d, r) for d, r in zip(g["dataset"], g["ratio"], strict=True)], index=g.index)
    else:
        epochs = _epochs_of(runs)
        x = pd.Series(
            [epochs.get((d, float(r), m, b)) for d, r, m, b in g[["dataset", "ratio", "method", "backbone"]].values],
            index=g.index,
            dtype=float,
        )
        panel = _panel_col(g, exp)
    order = {m: i for i, m in enumerate(exp["methods"])}
    pts = g.assign(panel=panel, x=x, rank=g["method"].map(order)).dropna(subset=["x"])
    pts["series"] = pts.groupby(["panel", "x"])["rank"].rank(method="first").astype(int)
    pts = pts.sort_values(["panel", "series", "x"])
    first = pts.groupby(["panel", "series"]).head(1)
    labels = {
        (p, k): f"{method_name(m)} − {method_name(o)}"
        for p, k, m, o in first[["panel", "series", "method", "over"]].values
    }
    pts["label"] = [labels[(p, k)] for p, k in zip(pts["panel"], pts["series"], strict=True)]
    pts = pts.rename(columns={"welch_ci_low": "low", "welch_ci_high": "high", "gain_verdict": "verdict"})
    return axis, pts[["panel", "series", "label", "x", "method", "over", "gain", "low", "high", "verdict"]]


def fig_scaling(
    gains: pd.DataFrame, runs: pd.DataFrame, name: str, exp: Mapping, path: Path, metric: str = "top1"
) -> Path:
    """Each method's Δ top-1 over the first method of its training length (``gains.csv``, ``kind`` =
    ``scaling``) with its 95 % Welch interval, coloured by verdict, against the training epochs or the
    backbone depth (:func:`scaling_points`); log-scaled where the values span more than 4×."""
    axis, pts = scaling_points(gains, runs, name, exp, metric)
    panels = list(dict.fromkeys(pts["panel"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.0), squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels, strict=True):
        sub = pts[pts["panel"] == panel]
        for label, ser in sub.groupby("label", sort=False):
            ax.plot(ser["x"], ser["gain"], "-", color="#999999", lw=1, zorder=1, label=label)
            for _, r in ser.iterrows():
                color, marker = VERDICT_STYLE.get(r["verdict"], VERDICT_STYLE["untested"])
                err = (
                    None
                    if pd.isna(r["low"]) or pd.isna(r["high"])
                    else [[r["gain"] - r["low"]], [r["high"] - r["gain"]]]
                )
                ax.errorbar(r["x"], r["gain"], yerr=err, fmt=marker, color=color, capsize=3, zorder=2)
                ax.annotate(
                    f"{fmt_delta(r['gain'])} {r['verdict']}",
                    (r["x"], r["gain"]),
                    xytext=(6, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=7,
                    color=color,
                )
        values = sorted(sub["x"].unique())
        if values[0] > 0 and values[-1] / values[0] > 4:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xlabel("training epochs" if axis == "epochs" else "backbone depth (ResNet-n)")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", title="Δ of", title_fontsize=7)
    axes[0][0].set_ylabel(f"Δ {metric_name(metric, False)} (points)")
    fig.suptitle(
        f"Scaling: the gain over the first method of the same training length, against the {axis} "
        "(95 % Welch interval; colour: verdict)",
        y=1.02,
        fontsize=10,
    )
    return save(fig, path)


# ---------------------------------------------------------------- the report's headline figure: every claimed gain

FINDINGS_CAPTION = (
    "Every claimed gain the report tests, as a forest plot (findings.csv, decided verdicts first): our gain in "
    "points with its 95 % Welch interval across seeds, coloured by its verdict (Holm-adjusted t-test within "
    "each experiment); a hollow diamond marks the paper's claimed gain where the paper gives one, the vertical "
    "line is no gain. A forest plot, not the original-vs-ours scatter: the papers report no number for most "
    "of these cells, and the interval is what decides a verdict."
)


def _common_suffix(claims: list[str]) -> str:
    """', Fashion-MNIST-LT ρ=100, ResNet-8' when every claim ends with the same cell, else ''."""
    tails = {c.split(", ", 1)[1] if ", " in c else "" for c in claims}
    return ", " + tails.pop() if len(tails) == 1 and "" not in tails else ""


def _forest_row(ax: Axes, y: int, r: Any) -> None:
    color, marker = VERDICT_STYLE.get(r.verdict, VERDICT_STYLE["untested"])
    if pd.isna(r.ours):
        ax.annotate(
            f"{r.verdict}: no runs on one side", (0, y), xytext=(4, 0), textcoords="offset points", va="center",
            fontsize=7, color=color,
        )  # fmt: skip
        return
    lo, hi = r.ci_low, r.ci_high
    err = [[r.ours - lo], [hi - r.ours]] if not (pd.isna(lo) or pd.isna(hi)) else None
    ax.errorbar(r.ours, y, xerr=err, fmt=marker, color=color, capsize=3, markersize=5)
    if not pd.isna(r.paper):
        ax.plot(r.paper, y, marker="D", markerfacecolor="none", markeredgecolor="black", markersize=6)
    ax.annotate(
        f"{fmt_delta(r.ours)} {r.verdict}", (r.ours, y), xytext=(0, 6), textcoords="offset points", ha="center",
        fontsize=7, color=color,
    )  # fmt: skip


def fig_findings(findings: pd.DataFrame, path: Path) -> Path:
    """The forest plot of every gain row of ``findings.csv`` (:data:`FINDINGS_CAPTION`), in its order."""
    g = findings[findings["quantity"] == "gain"] if not findings.empty else findings
    if g.empty:
        raise Skip("no claimed gain is tested in this report")
    claims = [str(c) for c in g["claim"]]
    suffix = _common_suffix(claims)
    labels = [
        f"{c[: len(c) - len(suffix)] if suffix else c}  [{e}]" for c, e in zip(claims, g["experiment"], strict=True)
    ]
    fig, ax = plt.subplots(figsize=(9.5, 0.34 * len(g) + 1.3))
    for y, r in enumerate(g.itertuples(index=False)):
        _forest_row(ax, y, r)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(g)), labels, fontsize=8)
    ax.set_ylim(len(g) - 0.5, -0.8)
    ax.set_xlabel("gain (points): ours with its 95 % interval; ◇ the paper's claimed gain")
    ax.grid(axis="x", alpha=0.3)
    shown = [v for v in VERDICT_STYLE if v in set(g["verdict"])]
    handles = [plt.Line2D([], [], color=VERDICT_STYLE[v][0], marker=VERDICT_STYLE[v][1], ls="", label=v) for v in shown]
    if g["paper"].notna().any():
        handles.append(
            plt.Line2D([], [], marker="D", markerfacecolor="none", markeredgecolor="black", ls="", label="paper")
        )
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=8)
    ax.set_title(f"Claimed gains tested{suffix.replace(', ', ': ', 1)} (verdict by colour)", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


# ---------------------------------------------------------------- BN weight / bias norms (NBN's motivation)


def _last_stage_prefixes(keys: list[str]) -> str | None:
    stages = sorted({int(m.group(1)) for k in keys if (m := re.match(r"layer(\d+)\.", k))})
    return f"layer{stages[-1]}." if stages else None


def _nbn_affine(state: Mapping, p: str) -> Any:
    """NBN's effective (w, b) of the layer ``p``, computed by the layer itself from its saved state."""
    from ltbench.nn.norm import NormalizedBatchNorm2d  # torch: only when a model.pt is read

    own = {k[len(p) + 1 :]: v for k, v in state.items() if k.startswith(p + ".") and "." not in k[len(p) + 1 :]}
    layer = NormalizedBatchNorm2d(own["weight"].numel(), alpha="separate" if "alpha_bias" in own else "per_layer")
    layer.load_state_dict(own)
    return layer.effective_affine()


def norm_layers(state: Mapping) -> list[dict]:
    """Normalization layers of a ResNet state_dict with their kind and EFFECTIVE per-channel |w|, |b|.

    A layer is a prefix with ``running_mean`` (or ``running_prior``) and ``weight``. ``kind``: ``nbn``
    (has ``alpha``: :meth:`~ltbench.nn.norm.NormalizedBatchNorm2d.effective_affine`), ``cbn``
    (``running_prior``; weight is M × C), else ``bn``. Layers without affine (NBN's logit
    rectification) are skipped. Only the last stage (``layer<N>.``) when the model has stages.
    """
    import torch  # torch: only when a model.pt is read

    prefixes = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith((".running_mean", ".running_prior"))})
    last = _last_stage_prefixes(list(state))
    out = []
    for p in prefixes:
        if f"{p}.weight" not in state or f"{p}.bias" not in state or (last and not p.startswith(last)):
            continue
        kind = "nbn" if f"{p}.alpha" in state else "cbn" if f"{p}.running_prior" in state else "bn"
        with torch.no_grad():
            w, b = _nbn_affine(state, p) if kind == "nbn" else (state[f"{p}.weight"], state[f"{p}.bias"])
        out.append(
            {
                "layer": p,
                "kind": kind,
                "abs_w": w.float().abs().flatten().numpy(),
                "abs_b": b.float().abs().flatten().numpy(),
            }
        )
    return out


def norms_frame(runs: pd.DataFrame, exp: Mapping) -> pd.DataFrame:
    """Per run, layer and channel: effective |w| and |b| (long format), from each run's ``model.pt``."""
    import torch  # torch: only when a model.pt is read

    s = select(runs, exp)
    if s.empty or "run_dir" not in s.columns:
        return pd.DataFrame()
    rows = []
    for r in s.drop_duplicates(["dataset", "ratio", "method", "backbone", "seed"]).itertuples(index=False):
        f = Path(r.run_dir) / "model.pt"
        if not f.exists():
            continue
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt file must not take the whole report down
            raise Skip(f"cannot read {f}: {e}") from None
        for layer in norm_layers(state):
            for what in ("abs_w", "abs_b"):
                for v in layer[what]:
                    rows.append(
                        (
                            r.dataset,
                            r.ratio,
                            r.method,
                            r.backbone,
                            r.seed,
                            layer["layer"],
                            layer["kind"],
                            what,
                            float(v),
                        )
                    )
    return pd.DataFrame(
        rows, columns=["dataset", "ratio", "method", "backbone", "seed", "layer", "kind", "what", "value"]
    )


def fig_bn_norms(runs: pd.DataFrame, exp: Mapping, path: Path) -> Path:
    if "nbn" not in set(select(runs, exp).get(NORM_KNOB, pd.Series(dtype=str))):
        raise Skip("no finished run of an NBN method in this experiment")
    d = norms_frame(runs, exp)
    if d.empty:
        raise Skip("no model.pt next to the runs' metrics.json")
    several_b = len(exp["backbones"]) > 1
    d["panel"] = [
        _cell_label(a, b, c if several_b else None)
        for a, b, c in zip(d["dataset"], d["ratio"], d["backbone"], strict=True)
    ]
    kinds = d.groupby("method")["kind"].agg(lambda k: "/".join(sorted(set(k))))
    order = _method_order(exp, d["method"])
    d["method_label"] = [f"{m} ({kinds[m]})" for m in d["method"]]
    hue_order = [f"{m} ({kinds[m]})" for m in order]
    pos = d[d["value"] > 0]
    panels = _panel_order(exp, d["panel"])
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 3.1 * len(panels) + 0.4), squeeze=False)
    layers = list(dict.fromkeys(d["layer"]))
    pal = dict(zip(hue_order, _palette(order).values(), strict=True))
    for i, panel in enumerate(panels):
        for j, (what, label) in enumerate(
            (("abs_w", "|effective weight| per channel"), ("abs_b", "|effective bias| per channel"))
        ):
            ax = axes[i][j]
            sub = pos[(pos["panel"] == panel) & (pos["what"] == what)]
            sns.boxplot(
                data=sub,
                x="layer",
                y="value",
                hue="method_label",
                order=layers,
                hue_order=hue_order,
                ax=ax,
                fliersize=1.5,
                linewidth=0.8,
                palette=pal,
                legend=(i == 0 and j == 1),
            )
            ax.set_yscale("log")
            ax.set_title(f"{panel}: {label}", fontsize=9)
            ax.set_xlabel("")
            ax.set_ylabel(label if j == 0 else "")
            ax.grid(axis="y", alpha=0.3, which="both")
            plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    leg = axes[0][1].get_legend()
    if leg is not None:
        leg.set_title("method (layer kinds)")
        sns.move_legend(axes[0][1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False, fontsize=8)
    fig.suptitle(
        "Normalization layers of the last stage: effective per-channel |weight| and |bias| "
        "(log scale; all seeds pooled)",
        y=1.0 + 0.04 / len(panels),
    )
    fig.tight_layout()
    return save(fig, path)


# ---------------------------------------------------------------- per experiment

CAPTIONS = {
    "groups": "Top-1 (Total) and many / medium / few accuracy per method: bars are the mean over seeds, "
    "error bars the standard deviation over seeds.",
    "per_class": "Per-class test accuracy (mean over seeds) against the class's number of training images "
    "(log scale): the long tail is on the left.",
    "components": "CBN Figure 5: accuracy against the number of Gaussian components M, overall and per class "
    "group; mean ± std over seeds, each seed a dot. The paper claims M > 1 beats M = 1 and no gain "
    "beyond M = 4.",
    "backbones": "CBN Figure 6: top-1 per backbone depth, mean ± std over seeds (each seed a dot). The paper "
    "claims CBN beats BN at every depth.",
    "ablation_vs_baseline": "The ablation grid: each method's top-1 gain over the experiment's first method per "
    "(dataset, ratio), in points; * marks a significant gain (paired t-test across seeds, "
    "Welch's when the seeds differ; Holm-adjusted p < 0.05 over the grid), = a gain shown "
    "to be within ± the margin (no gain). Grey: no finished runs.",
    "ablation_vs_paper": "The ablation grid against the paper: Δ = ours − paper per cell, in points, with the verdict "
    "(✓ reproduced: the 90 % interval of Δ inside ± the margin; ? inconclusive; ↓ below; "
    "↑ above).",
    "sensitivity": "Sensitivity to the paper's open details: each method's (one reading of one detail, one "
    "factor at a time) top-1 gain over the experiment's first method, in points, with its 95 % "
    "Welch interval across seeds and the verdict of gains.csv (paired t-test across seeds, Welch's "
    "when the seeds differ; Holm-adjusted over the readings; 'no gain': within ± the margin). A "
    "reading whose cells failed (diverged or collapsed) is labelled so on its row.",
    "scaling": "Scaling: each method's top-1 gain over the first method of the same training length, in points, "
    "with its 95 % Welch interval across seeds, against the training epochs (or the backbone depth when the "
    "experiment spans several); colour and label: the verdict of gains.csv (paired t-test across seeds, "
    "Welch's when the seeds differ; Holm-adjusted over the experiment's comparisons; 'no gain': within ± the "
    "margin). Points are measured cells only; the grey line joins them and is not a fit.",
    "bn_norms": "NBN's motivation: the distribution over channels of the effective per-channel |weight| and |bias| "
    "of the last stage's normalization layers (log scale, all seeds pooled), read from each run's "
    "model.pt. BN: γ, β; NBN: its effective α·γ/‖γ‖₂ and α·β/‖β‖₂; CBN: every component's γ_k, β_k. The legend "
    "names the layer kinds each method has in this stage.",
}


def experiment_figures(
    name: str, exp: Mapping, data: Mapping[str, pd.DataFrame], layout: Layout, out_dir: Path
) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """Draw every figure that applies to the experiment into ``out_dir/<experiment>/`` from the aggregate
    tables ``data`` (runs, per_class, summary, gains: :func:`ltbench.report.page.load_aggregate`).

    Returns (drawn: [(kind, png path)], skipped: [(kind, reason)]). Kinds are the keys of CAPTIONS."""
    runs, summary, gains = data["runs"], data["summary"], data.get("gains", pd.DataFrame())
    d = Path(out_dir) / safe_name(name)
    jobs = [
        ("groups", lambda p: fig_groups(summary, name, exp, p)),
        ("per_class", lambda p: fig_per_class(data["per_class"], exp, p)),
    ]
    kinds = figure_kinds(exp)
    if "components" in kinds:
        jobs.insert(0, ("components", lambda p: fig_components(summary, runs, name, exp, p)))
    if "backbones" in kinds:
        jobs.insert(0, ("backbones", lambda p: fig_backbones(summary, runs, name, exp, p)))
    if "sensitivity" in kinds:
        jobs.insert(0, ("sensitivity", lambda p: fig_sensitivity(gains, name, exp, p, cells=data.get("cells"))))
    if "scaling" in kinds:
        jobs.insert(0, ("scaling", lambda p: fig_scaling(gains, runs, name, exp, p)))
    if "ablation" in kinds:
        jobs[:0] = [
            ("ablation_vs_baseline", lambda p: fig_ablation_baseline(gains, name, exp, p)),
            ("ablation_vs_paper", lambda p: fig_ablation_paper(layout, p)),
        ]
    if NORM_KNOB in runs.columns and "nbn" in set(select(runs, exp).get(NORM_KNOB, [])):
        jobs.append(("bn_norms", lambda p: fig_bn_norms(runs, exp, p)))
    drawn, skipped = [], []
    for k, fn in jobs:
        try:
            drawn.append((k, fn(d / f"{k}.png")))
        except Skip as e:
            skipped.append((k, str(e)))
            plt.close("all")
    return drawn, skipped
