"""The plan of a config's grid: cells per experiment, the unique total, projected GPU-hours.

``python -m ltbench plan --configfile config/config.yaml [--throughput FILE ...] [--json]``

Cells: an experiment has datasets × ratios × methods × backbones × seeds cells; the DAG trains the
union once, so the unique total is what it costs.

Projected hours of a cell = training (epochs × training images / images/s of its backbone and method)
+ evaluation (one pass over the test set every ``train.eval_every`` epochs and at the end). The speed
of each (backbone, method) comes from the first of:

1. ``plan.images_per_s.<backbone>`` in the config: images/s for one view and one path, divided by the
   method's forward passes per step (views × paths it computes: 1 for ``baseline``, 4 for CBN's DPL).
2. Measured runs of the same backbone and method in a ``runs.csv`` (``ltbench aggregate``; the config's
   own ``<results_dir>/aggregate/runs.csv`` is read when it exists, others with ``--throughput``): the
   median end-to-end seconds per (epoch × training image) of their ``metrics.json`` wall time, which
   includes evaluation. GPU runs are preferred; CPU runs are used (and say so) when there are none.
3. A ``ltbench bench --out FILE`` JSON (``--throughput FILE``) of the same backbone: its images/s × its
   method's passes per step gives the one-pass speed, scaled by the method's passes; its evaluation
   images/s for the test passes.
4. Measured runs of the same backbone with other methods (2.), scaled by passes per step.
5. :data:`DEFAULT_IMAGES_PER_S`: rough, unmeasured estimates for one current data-centre GPU.

Extra seeds: when the config's aggregate (``<results_dir>/aggregate/comparison.csv`` and ``gains.csv``)
has undecided verdicts (a cell "inconclusive" against the paper, a gain "not significant") with the
seeds that would decide them at 80 % power (``seeds_needed``, :mod:`ltbench.analysis.power`), the plan
prices those extra runs: per (dataset, ratio, method, backbone), the largest ``seeds_needed`` of its
rows minus the seeds it has, times that cell's projected hours.

Sequential experiments (``seeds: {initial, max, step}``): the runs and hours of the grid so far, at
the least, at the most and expected (:func:`sequential_hours`).

Configs that share a ``results_dir`` share its aggregate folder; when the last aggregate there was
written for another config (its ``provenance.json``), its verdicts and looks are not this config's:
the plan prices neither and says so (:func:`own_aggregate`); its measured speeds are still used.

Each speed row says which source it used. Not modelled: data loading, the cheaper classifier stage of
decoupled methods, CBN's EM overhead beyond its passes (put a measured file in for those).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from statistics import median
from typing import Any

import pandas as pd

from ltbench import data
from ltbench.analysis import aggregate, sequential
from ltbench.analysis.power import MAX_SEEDS
from ltbench.spec import config as ltconfig
from ltbench.spec import seeds
from ltbench.spec.catalog import backbone_depth
from ltbench.spec.methods import passes

#: Rough training throughput (images/s, one view and one path, batch 128, plain BN, bf16 autocast)
#: on one current data-centre GPU (A100 / H100 class) for 32×32 inputs. NOT measured: an order of
#: magnitude for planning, scaled from ResNet-32 by the number of layers; measure with `ltbench bench`.
DEFAULT_IMAGES_PER_S = {
    "resnet8": 30000.0,
    "resnet20": 15000.0,
    "resnet32": 10000.0,
    "resnet44": 7500.0,
    "resnet56": 6000.0,
    "resnet110": 3000.0,
}
#: An evaluation image (forward only, one view) costs about a third of a one-pass training image.
EVAL_SPEEDUP = 3.0
#: Test-set sizes of the built-in datasets (evaluation cost); others: dataset option ``expected.test``.
TEST_SIZES = {"cifar10": 10000, "cifar100": 10000, "digits-lt": 500}


def _h(hours: float | None) -> str:
    if hours is None:
        return "?"
    return f"{hours:.1f}" if hours >= 10 else f"{hours:.3g}"


def _n_train(dataset: str, ratio: str, spec: Mapping) -> int | None:
    try:
        return int(sum(data.counts_for(dataset, float(ratio), spec["dataset_options"].get("profile", "exp"))))
    except Exception:
        exp = spec["dataset_options"].get("expected") or {}
        return int(exp["train"]) if exp.get("train") else None


def _n_test(dataset: str, spec: Mapping) -> int | None:
    exp = spec["dataset_options"].get("expected") or {}
    return int(exp["test"]) if exp.get("test") else TEST_SIZES.get(dataset)


class _Measured:
    """Speeds read from --throughput files and the config's own runs.csv."""

    def __init__(self, files: Iterable[Path]):
        self.runs: list[dict] = []  # {backbone, method, s_per_image, gpu, file, passes}
        self.bench: dict[str, dict] = {}  # backbone -> {one_pass_ips, eval_ips, label}
        for f in files:
            self._read(Path(f))

    def _read(self, f: Path) -> None:
        if not f.exists():
            raise FileNotFoundError(f"throughput file {f} does not exist")
        if f.suffix == ".json":
            try:
                self.add_bench(json.loads(f.read_text()), f.name)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"throughput file {f}: not an `ltbench bench --out` JSON ({e!r} missing or bad)"
                ) from None
            return
        df = pd.read_csv(f)
        need = {"backbone", "method", "device", "wall_time_s", "n_train", "train.epochs", "seed", "dataset", "ratio"}
        if missing := sorted(need - set(df.columns)):
            raise ValueError(f"throughput file {f}: not a runs.csv of `ltbench aggregate` (lacks {missing})")
        df = df.drop_duplicates(["dataset", "ratio", "method", "backbone", "seed"])
        for r in df.to_dict("records"):
            work = float(r["train.epochs"]) * float(r["n_train"])
            if work > 0 and r["wall_time_s"] > 0:
                self.runs.append(
                    {
                        "backbone": r["backbone"],
                        "method": r["method"],
                        "s_per_image": r["wall_time_s"] / work,
                        "gpu": str(r["device"]).startswith("cuda"),
                        "file": f.name,
                        "device": str(r["device"]),
                    }
                )

    def add_bench(self, b: Mapping, where: str) -> str:
        """Add an ``ltbench bench`` result (read from ``where``); returns its backbone."""
        ips, bb, npass = float(b["fast"]["images_per_s"]), b["backbone"], int(b.get("passes_per_step", 1))
        self.bench[bb] = {
            "one_pass_ips": ips * npass,
            "eval_ips": b.get("eval_images_per_s"),
            "label": f"measured: ltbench bench {where} ({b.get('method')}, {b.get('device')})",
        }
        return bb

    def _pick(self, rows: list[dict]) -> tuple[list[dict], bool]:
        gpu = [r for r in rows if r["gpu"]]
        return (gpu, True) if gpu else (rows, False)

    def same(self, backbone: str, method: str) -> Any:
        rows, gpu = self._pick([r for r in self.runs if r["backbone"] == backbone and r["method"] == method])
        if not rows:
            return None
        where = ", ".join(sorted({r["file"] for r in rows}))
        dev = "" if gpu else f" on {rows[0]['device']}, not a GPU"
        return median(r["s_per_image"] for r in rows), f"measured: {len(rows)} runs in {where}{dev}"

    def other(self, backbone: str, passes_of: Mapping[str, int]) -> Any:
        rows, gpu = self._pick([r for r in self.runs if r["backbone"] == backbone and r["method"] in passes_of])
        if not rows:
            return None
        per_pass = median(r["s_per_image"] / passes_of[r["method"]] for r in rows)
        dev = "" if gpu else f" on {rows[0]['device']}, not a GPU"
        return per_pass, (
            f"measured: {len(rows)} runs of other methods in "
            f"{', '.join(sorted({r['file'] for r in rows}))}, scaled by passes{dev}"
        )


def _speed(
    backbone: str,
    method: str,
    p: int,
    knob: Mapping,
    measured: _Measured,
    passes_of: Mapping[str, int],
    pinned: str | None = None,
) -> dict:
    """The speed of (backbone, method) from the first source that has one (module docstring); a
    ``pinned`` backbone (``ltbench bench --config``) takes its bench measurement first."""
    s = {
        "backbone": backbone,
        "method": method,
        "passes": p,
        "images_per_s": None,
        "eval_images_per_s": None,
        "s_per_image": None,
        "includes_eval": False,
        "kind": "unknown",
        "source": f"no speed for {backbone}: set plan.images_per_s.{backbone} in the config or pass --throughput",
    }
    if backbone in knob and backbone != pinned:
        one = float(knob[backbone])
        s.update(
            images_per_s=one / p,
            eval_images_per_s=EVAL_SPEEDUP * one,
            kind="config",
            source=f"config plan.images_per_s.{backbone}: {one:g} img/s for one pass",
        )
    elif backbone != pinned and (m := measured.same(backbone, method)) is not None:
        s.update(s_per_image=m[0], images_per_s=1.0 / m[0], includes_eval=True, source=m[1], kind="measured")
    elif backbone in measured.bench:
        b = measured.bench[backbone]
        s.update(
            images_per_s=b["one_pass_ips"] / p,
            kind="bench",
            eval_images_per_s=b["eval_ips"] or EVAL_SPEEDUP * b["one_pass_ips"],
            source=f"{b['label']}: {b['one_pass_ips']:.0f} img/s for one pass",
        )
    elif (m := measured.other(backbone, passes_of)) is not None:
        s.update(
            s_per_image=m[0] * p,
            images_per_s=1.0 / (m[0] * p),
            includes_eval=True,
            source=m[1],
            kind="measured, scaled",
        )
    elif backbone in DEFAULT_IMAGES_PER_S:
        one = DEFAULT_IMAGES_PER_S[backbone]
        s.update(
            images_per_s=one / p,
            eval_images_per_s=EVAL_SPEEDUP * one,
            kind="default",
            source=f"default estimate (unmeasured) for {backbone}: {one:g} img/s for one pass",
        )
    return s


def _hours(c: ltconfig.Cell, spec: Mapping, s: Mapping) -> float | None:
    """Projected hours of one cell at speed ``s``: training, plus evaluation unless ``s`` includes it."""
    n_train = _n_train(c.dataset, c.ratio, spec)
    if s["images_per_s"] is None or n_train is None:
        return None
    t = spec["train"]
    sec = t["epochs"] * n_train / s["images_per_s"]
    n_test = _n_test(c.dataset, spec)
    if not s["includes_eval"] and n_test and s["eval_images_per_s"]:
        every = t.get("eval_every", 1)
        evals = math.ceil(t["epochs"] / every) + (t["epochs"] % every != 0)
        sec += evals * n_test / s["eval_images_per_s"]
    return sec / 3600


def plan(cfg: Mapping, throughput_files: Iterable[str | Path] = (), bench: Mapping | None = None) -> dict:
    """The plan as a JSON-able dict (see the module docstring); ``cfg`` is a validated config.

    ``bench``: an ``ltbench bench`` result, the speed of its backbone ahead of every other source
    (what ``ltbench bench --config`` projects)."""
    files = [Path(f) for f in throughput_files]
    own = Path(cfg["results_dir"]) / "aggregate" / "runs.csv"
    if own.exists() and own not in files:
        files.append(own)
    measured = _Measured(files)
    pinned = measured.add_bench(bench, "(this run)") if bench is not None else None
    knob = (cfg.get("plan") or {}).get("images_per_s", {})
    specs, passes_of = {}, {}
    for c in ltconfig.cells(cfg):
        if (c.dataset, c.method, c.backbone) not in specs:
            spec = ltconfig.cell_spec(cfg, c.dataset, c.method, c.backbone)
            specs[(c.dataset, c.method, c.backbone)] = spec
            passes_of[c.method] = passes(spec["recipe"])
    speeds = {
        (b, m): _speed(b, m, passes_of[m], knob, measured, passes_of, pinned)
        for b, m in dict.fromkeys((c.backbone, c.method) for c in ltconfig.cells(cfg))
    }
    per_cell = {
        c: _hours(c, specs[(c.dataset, c.method, c.backbone)], speeds[(c.backbone, c.method)])
        for c in ltconfig.cells(cfg)
    }
    out = _summary(cfg, per_cell, speeds, files)
    agg, out["aggregate_of_other_config"] = own_aggregate(cfg)
    out["aggregate_dir"] = str(Path(cfg["results_dir"]) / "aggregate")
    out["extra_seeds"] = extra_seeds(agg, per_cell) if agg is not None else None
    out["sequential"] = sequential_hours(cfg, per_cell, agg)
    return out


def own_aggregate(cfg: Mapping) -> tuple[Path | None, str | None]:
    """(the config's aggregate folder, None), or (None, the other config's name) when the last aggregate
    in ``<results_dir>/aggregate`` was written for another config sharing the results folder (its
    verdicts and looks are not this config's; its measured speeds still are)."""
    agg = Path(cfg["results_dir"]) / "aggregate"
    other = aggregate.written_for(agg)
    return (None, other) if other is not None and other != cfg["name"] else (agg, None)


def _sequential_looks(agg: Path) -> pd.DataFrame | None:
    f = agg / "sequential.csv"
    if not f.exists():
        return None
    df = pd.read_csv(f)
    if missing := sorted(set(sequential.LOOK_COLUMNS) - set(df.columns)):
        raise ValueError(f"{f}: not an `ltbench aggregate` table (lacks {missing})")
    return df


def sequential_hours(
    cfg: Mapping, per_cell: Mapping[ltconfig.Cell, float | None], agg: Path | None = None
) -> list[dict]:
    """Per sequential experiment: runs and hours now (the grid so far), at the least (``initial`` seeds
    everywhere), at the most (``max`` everywhere) and expected (:func:`sequential.expected_cell_seeds`
    from the aggregate's ``sequential.csv``: decided tests keep their seeds, undecided ones are simulated
    at their observed gain and spread; ``max`` for a cell without looks yet). ``agg``: the config's
    aggregate folder (None: no looks yet)."""
    looks = _sequential_looks(agg) if agg is not None else None
    hours_of = {seeds.cell_key(c.dataset, c.ratio, c.method, c.backbone): h for c, h in per_cell.items()}
    out = []
    for name, exp in cfg["experiments"].items():
        seq = exp.get("sequential")
        if not seq:
            continue
        keys = sorted({seeds.cell_key(c.dataset, c.ratio, c.method, c.backbone) for c in ltconfig.cells(cfg, name)})
        expected = sequential.expected_cell_seeds(looks, exp, name) if looks is not None else {}
        n = {
            "now": {k: len(seeds.cell_seeds(exp, k)) for k in keys},
            "least": dict.fromkeys(keys, seq["initial"]),
            "most": dict.fromkeys(keys, seq["max"]),
            "expected": {k: expected.get(k, seq["max"]) for k in keys},
        }
        row = {"name": name, "cells": len(keys), "initial": seq["initial"], "max": seq["max"], "step": seq["step"]}
        for what, per in n.items():
            row[f"{what}_runs"] = sum(per.values())
            row[f"{what}_hours"] = sum((hours_of.get(k) or 0.0) * v for k, v in per.items())
        row["expected_basis"] = f"{len(expected)} of {len(keys)} cells from sequential.csv" if expected else "max"
        out.append(row)
    return out


def _undecided(agg: Path) -> tuple[dict[tuple, tuple[int, int]], int]:
    """{(dataset, ratio, method, backbone): (seeds needed, seeds it has)} over the undecided rows of the
    aggregate's comparison.csv (inconclusive) and gains.csv (not significant: both methods), and the
    number of undecided rows that would need more than the power analysis's maximum."""
    need: dict[tuple, tuple[int, int]] = {}
    beyond = 0

    def add(row: Any, method: str, have: Any) -> None:
        key = (row["dataset"], f"{float(row['ratio']):g}", method, row["backbone"])
        n, h = int(row["seeds_needed"]), int(have)
        old = need.get(key, (0, h))
        need[key] = (max(old[0], n), min(old[1], h))

    for name, verdict_col, undecided, sides in (
        ("comparison.csv", "verdict", "inconclusive", (("method", "n"),)),
        ("gains.csv", "gain_verdict", "not significant", (("method", "n_method"), ("over", "n_over"))),
    ):
        f = agg / name
        if not f.exists():
            continue
        df = pd.read_csv(f)
        if verdict_col not in df.columns or "seeds_needed" not in df.columns:
            raise ValueError(f"{f}: not an `ltbench aggregate` table (lacks {verdict_col} or seeds_needed)")
        rows = df[df[verdict_col] == undecided]
        beyond += int(rows["seeds_needed"].isna().sum())
        for row in rows.dropna(subset=["seeds_needed"]).to_dict("records"):
            for method_col, n_col in sides:
                add(row, row[method_col], row[n_col])
    return need, beyond


def extra_seeds(agg: Path, per_cell: Mapping[ltconfig.Cell, float | None]) -> dict | None:
    """The runs and hours that would decide the aggregate's undecided verdicts (module docstring);
    None without an aggregate. Cells the config does not list are counted but not priced."""
    if not (agg / "comparison.csv").exists() and not (agg / "gains.csv").exists():
        return None
    need, beyond = _undecided(agg)
    hours_of = {(c.dataset, f"{float(c.ratio):g}", c.method, c.backbone): h for c, h in per_cell.items()}
    runs = unpriced = 0
    hours = 0.0
    for key, (n, have) in need.items():
        extra = max(n - have, 0)
        runs += extra
        h = hours_of.get(key)
        if h is None:
            unpriced += extra
        else:
            hours += extra * h
    return {
        "aggregate": str(agg),
        "cells": sum(n > h for n, h in need.values()),
        "runs": runs,
        "hours": hours,
        "runs_without_estimate": unpriced,
        "beyond_max_seeds": beyond,
    }


def _summary(cfg: Mapping, per_cell: Mapping, speeds: Mapping, files: list[Path]) -> dict:
    exps, listed = [], 0
    for name, exp in cfg["experiments"].items():
        cells = ltconfig.cells(cfg, name)
        listed += len(cells)
        hs = [per_cell[c] for c in cells]
        exps.append(
            {
                "name": name,
                "datasets": len(exp["datasets"]),
                "ratios": len(exp["ratios"]),
                "methods": len(exp["methods"]),
                "backbones": len(exp["backbones"]),
                "seeds": len(exp["seeds"]),
                "cells": len(cells),
                "hours": sum(h for h in hs if h is not None),
                "cells_without_estimate": sum(h is None for h in hs),
            }
        )
    rows = []
    for (b, m), s in speeds.items():
        hs = [h for c, h in per_cell.items() if c.backbone == b and c.method == m]
        rows.append(
            {
                **{k: v for k, v in s.items() if k != "s_per_image"},
                "cells": len(hs),
                "hours": sum(h for h in hs if h is not None) if any(h is not None for h in hs) else None,
            }
        )
    known = [h for h in per_cell.values() if h is not None]
    methods_order = list(dict.fromkeys(m for e in cfg["experiments"].values() for m in e["methods"]))
    order = lambda r: (backbone_depth(r["backbone"]), r["backbone"], methods_order.index(r["method"]))  # noqa: E731
    return {
        "name": cfg.get("name"),
        "experiments": exps,
        "listed_cells": listed,
        "unique_cells": len(per_cell),
        "hours_total": sum(known),
        "cells_without_estimate": len(per_cell) - len(known),
        "gpus": max(1, int((cfg.get("resources", {}).get("train") or {}).get("gpu", 1) or 1)),
        "speed_sources": sorted({r["kind"] for r in rows}),
        "speeds": sorted(rows, key=order),
        "throughput_files": [str(f) for f in files],
    }


def format_text(p: Mapping, config_path: str | None = None) -> str:
    """The plan as aligned text tables."""
    out = [f"Plan of {config_path or 'the config'} (name: {p['name']})", ""]
    w = max([len("unique total")] + [len(e["name"]) for e in p["experiments"]]) + 2
    out.append(
        f"{'experiment':<{w}}{'cells':>7}   {'datasets × ratios × methods × backbones × seeds':<48}{'GPU-hours':>10}"
    )
    for e in p["experiments"]:
        grid = f"{e['datasets']} × {e['ratios']} × {e['methods']} × {e['backbones']} × {e['seeds']}"
        h = _h(e["hours"]) + ("+?" if e["cells_without_estimate"] else "")
        out.append(f"{e['name']:<{w}}{e['cells']:>7}   {grid:<48}{h:>10}")
    total = _h(p["hours_total"]) + ("+?" if p["cells_without_estimate"] else "")
    note = f"({p['listed_cells']} listed; shared cells are trained once)"
    out.append(f"{'unique total':<{w}}{p['unique_cells']:>7}   {note:<48}{total:>10}")
    out += ["", "Speed per backbone and method (training images/s on one GPU; passes = forward passes per step):"]
    wb = max([len("backbone")] + [len(r["backbone"]) for r in p["speeds"]]) + 2
    wm = max([len("method")] + [len(r["method"]) for r in p["speeds"]]) + 2
    out.append(f"{'backbone':<{wb}}{'method':<{wm}}{'passes':>6}{'img/s':>9}{'cells':>7}{'GPU-h':>9}  source")
    for r in p["speeds"]:
        ips = f"{r['images_per_s']:.0f}" if r["images_per_s"] else "?"
        out.append(
            f"{r['backbone']:<{wb}}{r['method']:<{wm}}{r['passes']:>6}{ips:>9}{r['cells']:>7}"
            f"{_h(r['hours']):>9}  {r['kind']}"
        )
    out += ["", "Sources:"] + [f"  {s}" for s in dict.fromkeys(r["source"] for r in p["speeds"])]
    line = (
        f"Projected: {_h(p['hours_total'])} GPU-hours for {p['unique_cells']} cells "
        f"(speeds: {', '.join(p['speed_sources'])})"
    )
    if p["gpus"] > 1:
        line += f"; {_h(p['hours_total'] / p['gpus'])} h wall time on {p['gpus']} GPUs"
    out += ["", line + "."]
    if p["cells_without_estimate"]:
        out.append(
            f"{p['cells_without_estimate']} cells have no estimate (unknown backbone speed or dataset size): "
            "'+?' above."
        )
    if other := p.get("aggregate_of_other_config"):
        out.append(
            f"The aggregate in {p['aggregate_dir']} was written for the config {other!r}, which shares "
            "this results folder: its verdicts and looks are not priced here (run this config's workflow to "
            "aggregate it); its measured speeds are used."
        )
    if (x := p.get("extra_seeds")) and (x["runs"] or x["beyond_max_seeds"]):
        line = (
            f"Undecided verdicts in {x['aggregate']}: {x['runs']} more runs on {x['cells']} cells would decide "
            f"those the power analysis can (80 % power), about {_h(x['hours'])} GPU-hours"
        )
        line += f" ({x['runs_without_estimate']} runs not priced)" if x["runs_without_estimate"] else ""
        k = x["beyond_max_seeds"]
        line += f"; {k} verdict{'s' * (k != 1)} would need more than {MAX_SEEDS} seeds" if x["beyond_max_seeds"] else ""
        out.append(line + ".")
    for q in p.get("sequential") or []:
        out.append(
            f"Sequential {q['name']} (seeds {q['initial']} to {q['max']}, step {q['step']}, {q['cells']} cells): "
            f"now {q['now_runs']} runs ({_h(q['now_hours'])} GPU-h); expected {q['expected_runs']:.0f} runs "
            f"({_h(q['expected_hours'])} GPU-h; {q['expected_basis']}); at most {q['most_runs']} runs "
            f"({_h(q['most_hours'])} GPU-h); at least {q['least_runs']} ({_h(q['least_hours'])} GPU-h)."
        )
    if "default" in p["speed_sources"]:
        out.append(
            "Default estimates are unmeasured: measure with `python -m ltbench bench --backbone B --out b.json` "
            "on the target GPU and pass --throughput b.json, or set plan.images_per_s in the config."
        )
    return "\n".join(out) + "\n"
