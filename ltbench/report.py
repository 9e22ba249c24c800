"""The self-contained HTML report: tables and figures from the aggregated results.

Figures are written as PNG (and SVG) files, registered with Snakemake's ``report()``, and
embedded in the HTML as base64 so the single file can be mailed or archived.
"""
from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from ltbench import io  # noqa: E402
from ltbench.aggregate import KEYS, METRICS  # noqa: E402

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .55rem;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
.meta td{text-align:left}figure{margin:1rem 0}figcaption{font-size:.85rem;color:#555}
img{max-width:100%}.missing{color:#a00}
"""


def _fmt(mean: float, std: float, n: int) -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean:.2f} ± {std:.2f} (n={n})" if n > 1 and not pd.isna(std) else f"{mean:.2f} (n={n})"


def pivot(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows method × backbone, columns dataset / ratio, cells 'mean ± std (n)'."""
    s = summary[summary["metric"] == metric].copy()
    if s.empty:
        return pd.DataFrame()
    s["cell"] = [_fmt(m, sd, n) for m, sd, n in zip(s["mean"], s["std"], s["n"])]
    s["column"] = s["dataset"] + " ρ=" + s["ratio"].astype(str)
    return s.pivot_table(index=["method", "backbone"], columns="column", values="cell", aggfunc="first")


def fig_groups(runs: pd.DataFrame, path: Path) -> Path:
    """Bars: mean over seeds; error bars: standard deviation over seeds."""
    s = runs[runs["metric"].isin(METRICS)].dropna(subset=["value"]).copy()
    s["cell"] = s["dataset"] + " ρ=" + s["ratio"].astype(str)
    g = sns.catplot(data=s, kind="bar", x="metric", y="value", hue="method", col="cell", order=METRICS,
                    errorbar="sd", capsize=0.1, height=3.2, aspect=1.2, col_wrap=min(3, s["cell"].nunique()))
    g.set_axis_labels("", "top-1 accuracy (%)")
    g.figure.suptitle("Accuracy overall and by class group (mean ± std over seeds)", y=1.02)
    return _save(g.figure, path)


def fig_per_class(per_class: pd.DataFrame, path: Path) -> Path:
    d = per_class.groupby(["dataset", "ratio", "method", "class", "train_count"], as_index=False)["acc"].mean()
    d["cell"] = d["dataset"] + " ρ=" + d["ratio"].astype(str)
    g = sns.relplot(data=d, x="train_count", y="acc", hue="method", col="cell", kind="line", marker="o",
                    height=3.2, aspect=1.2, col_wrap=min(3, d["cell"].nunique()))
    g.set(xscale="log")
    g.set_axis_labels("training images of the class (log scale)", "test accuracy (%)")
    g.figure.suptitle("Per-class accuracy vs training count (mean over seeds)", y=1.02)
    return _save(g.figure, path)


def open_details(runs: pd.DataFrame) -> pd.DataFrame:
    """Every paper detail left open (``methods.OPEN_DETAILS``) with the values the runs used, per method."""
    from ltbench.methods import OPEN_DETAILS

    rows = []
    for key, what in OPEN_DETAILS.items():
        if key not in runs.columns:
            continue
        used = runs.drop_duplicates("method").dropna(subset=[key]).groupby(key, sort=True)["method"]
        values = "; ".join(f"{v}: {', '.join(sorted(ms))}" for v, ms in used)
        if values:
            rows.append({"setting": key, "what the papers leave open": what, "value used (methods)": values})
    return pd.DataFrame(rows)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    with io.atomic_path(path.with_suffix(".svg")) as tmp:
        fig.savefig(tmp, format="svg", bbox_inches="tight")
    plt.close(fig)
    return path


def _img(path: Path, caption: str) -> str:
    b64 = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def render(runs: pd.DataFrame, per_class: pd.DataFrame, summary: pd.DataFrame, figures_dir: Path,
           config: dict | None) -> str:
    name = (config or {}).get("name", "ltbench")
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>ltbench report: {html.escape(name)}"
             f"</title><style>{CSS}</style></head><body>", f"<h1>ltbench report: {html.escape(name)}</h1>"]
    n_runs = runs[["dataset", "ratio", "method", "backbone", "seed"]].drop_duplicates().shape[0] if len(runs) else 0
    commits = sorted(set(runs["git_commit"].dropna())) if len(runs) else []
    devices = sorted(set(runs["device"])) if len(runs) else []
    hours = runs.drop_duplicates(["dataset", "ratio", "method", "backbone", "seed"])["wall_time_s"].sum() / 3600 \
        if len(runs) else 0.0
    meta = {"generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "runs": n_runs,
            "code (git commits)": ", ".join(c[:12] for c in commits) or "unknown",
            "devices": ", ".join(devices), "compute spent": f"{hours:.3f} device-hours"}
    if config is not None:
        meta["config hash"] = io.config_hash(config)
    parts.append("<table class='meta'>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                                                  for k, v in meta.items()) + "</table>")
    if runs.empty:
        parts.append("<p class='missing'>No finished runs yet.</p></body></html>")
        return "".join(parts)
    for metric in METRICS:
        t = pivot(summary, metric)
        if not t.empty:
            parts.append(f"<h2>{metric} accuracy (%), mean ± std over seeds</h2>")
            parts.append(t.to_html(escape=True, na_rep="–"))
    figures_dir = Path(figures_dir)
    parts.append("<h2>Figures</h2>")
    parts.append(_img(fig_groups(runs, figures_dir / "groups.png"),
                      "Top-1 overall and by many/medium/few class group for every method."))
    parts.append(_img(fig_per_class(per_class, figures_dir / "per_class.png"),
                      "Per-class test accuracy against the class's number of training images."))
    details = open_details(runs)
    if not details.empty:
        parts.append("<h2>Unspecified paper details and the values used</h2>")
        parts.append(details.to_html(index=False, escape=True))
    if config is not None:
        parts.append("<h2>Configuration</h2><pre>" + html.escape(json.dumps(config, indent=2)) + "</pre>")
    parts.append("</body></html>")
    return "".join(parts)


def main(aggregate_dir: Path, out: Path, cfg: dict | None = None, figures_dir: str | None = None) -> None:
    read = lambda name: pd.read_csv(Path(aggregate_dir) / name, dtype={"ratio": str})  # noqa: E731
    runs, per_class, summary = read("runs.csv"), read("per_class.csv"), read("summary.csv")
    figures = Path(figures_dir) if figures_dir else Path(out).with_suffix("") / "figures"
    io.write_text(out, render(runs, per_class, summary, figures, cfg))
