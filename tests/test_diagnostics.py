"""End-of-training diagnostics (CBN layers, batch statistics, gradient norms), the collapse check as a
failed cell, the sensitivity figure and config/fashion-cbn.yaml."""

import json
import math
from html import escape as html_escape

import pandas as pd
import pytest
import synthetic
import torch
from scipy import stats
from test_workflow import ROOT, job_counts, snakemake

from ltbench import data
from ltbench.analysis import aggregate, gains
from ltbench.data.sources import make_source
from ltbench.nn import norm
from ltbench.report import figures, page
from ltbench.spec import config
from ltbench.training import diagnostics, trainer
from ltbench.training.evaluation import collapse_reason

FAST = {
    "epochs": 2,
    "batch_size": 64,
    "lr": 0.1,
    "warmup_epochs": 0,
    "weight_decay": 5e-4,
    "device": "cpu",
    "diag_images": 256,
}
CBN = {"norm": {"name": "cbn", "options": {"num_components": 2}}}  # crop+flip, cross-entropy: the cheapest CBN run


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    data.prepare("digits-lt", 10, d, d / "digits.npz")
    return d / "digits.npz"


def spec(method="ce", recipe=None, **train):
    c = config.validate(
        {
            "train": {**FAST, **train},
            "methods": {method: recipe} if recipe else {},
            "experiments": {
                "e": {"datasets": ["digits-lt"], "ratios": [10], "methods": [method], "backbones": ["resnet8"]}
            },
        }
    )
    return config.cell_spec(c, "digits-lt", method, "resnet8")


@pytest.fixture(scope="module")
def cbn_run(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("cbn")
    return trainer.run(spec("cbn2", CBN), 10, 0, prepared, out), out


def test_cbn_run_records_diagnostics_and_gradient_norms_per_epoch(cbn_run):
    m, out = cbn_run
    d = m["diagnostics"]
    assert json.loads((out / "metrics.json").read_text())["diagnostics"] == d
    model = trainer.build_model(m["spec"], 10, 1)
    assert [layer["name"] for layer in d["layers"]] == [n for n, _ in norm.compound_layers(model)]
    for layer in d["layers"]:
        assert layer["components"] == 2 and sum(layer["priors"]) == pytest.approx(1.0, abs=1e-4)
        assert layer["min_prior"] == min(layer["priors"]) and layer["spread"] > 0
        assert 0.0 <= layer["confident_share"] <= 1.0
    assert d["min_prior"] == min(layer["min_prior"] for layer in d["layers"])
    assert d["mean_spread"] == pytest.approx(sum(x["spread"] for x in d["layers"]) / len(d["layers"]))
    assert d["test_images"] == 256 and d["batch_size"] == 64
    assert 0 <= d["top1_running"] <= 100 and 0 <= d["top1_batch_stats"] <= 100
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert len(rows) == FAST["epochs"]
    for r in rows:
        assert r["nonfinite_steps"] == 0 and 0 < r["grad_norm_mean"] <= r["grad_norm_max"] < math.inf
    assert m["stability"] == diagnostics.stability(rows)
    assert m["stability"]["grad_norm_max"] == max(r["grad_norm_max"] for r in rows)
    assert m["failure"] is None


def test_bn_run_has_no_cbn_diagnostics_but_its_stability(prepared, tmp_path):
    m = trainer.run(spec(epochs=1), 10, 0, prepared, tmp_path)
    assert "diagnostics" not in m and "diagnostics" not in json.loads((tmp_path / "metrics.json").read_text())
    assert m["stability"]["nonfinite_steps"] == 0 and m["stability"]["grad_norm_max"] > 0


def test_diagnostics_change_no_reported_result(prepared, tmp_path, monkeypatch, cbn_run):
    """The same cell without the diagnostics: identical metrics, training log and model."""
    with_diag, out = cbn_run
    monkeypatch.setattr(diagnostics, "cbn_diagnostics", lambda *a, **k: None)
    plain = trainer.run(spec("cbn2", CBN), 10, 0, prepared, tmp_path)
    assert "diagnostics" not in plain
    for key in ("top1", "many", "medium", "few", "per_class_acc", "stability"):
        assert plain[key] == with_diag[key], key

    def untimed(d):
        return [
            {k: v for k, v in json.loads(x).items() if k != "epoch_time_s"}
            for x in (d / "train.jsonl").read_text().splitlines()
        ]

    assert untimed(tmp_path) == untimed(out)
    a, b = torch.load(out / "model.pt", weights_only=True), torch.load(tmp_path / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _trained_single_component(prepared, tmp_path):
    """A trained model whose CBN layers have M = 1 (r ≡ 1: batch statistics ignore the running buffers)."""
    s = spec("cbn1", {"norm": {"name": "cbn", "options": {"num_components": 1}}}, epochs=4)
    trainer.run(s, 10, 0, prepared, tmp_path)
    model = trainer.build_model(s, 10, 1)
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    return model, make_source(prepared, torch.device("cpu"), data.get("digits-lt"))


def test_batch_statistics_expose_corrupted_running_statistics(prepared, tmp_path):
    model, source = _trained_single_component(prepared, tmp_path)
    clean = diagnostics.cbn_diagnostics(model, source, 10, 64, 256)
    assert clean["top1_running"] > 25  # a trained model, chance is 10
    with torch.no_grad():
        for _, layer in norm.compound_layers(model):
            layer.running_mean.add_(50.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bad = diagnostics.cbn_diagnostics(model, source, 10, 64, 256)
    assert bad["top1_batch_stats"] == clean["top1_batch_stats"]  # each test batch's own statistics
    assert bad["top1_running"] < clean["top1_running"] - 10 and bad["top1_running"] != bad["top1_batch_stats"]
    after = model.state_dict()  # no buffer moved, the model kept its mode
    assert all(torch.equal(state[k], after[k]) for k in state) and model.training


def test_batch_stats_model_normalizes_with_batch_statistics_even_for_running_readings():
    layer = norm.CompoundBatchNorm2d(3, num_components=2, train_stats="running")
    x = torch.randn(8, 3, 4, 4)
    layer.train()(x)  # first-batch initialisation
    twin = diagnostics.batch_stats_model(torch.nn.Sequential(layer))[0]
    assert twin.training and twin.train_stats == "batch" and layer.train_stats == "running"
    buffers = layer.running_mean.clone()
    with torch.no_grad():
        twin(x)
    assert torch.equal(layer.running_mean, buffers)


def test_component_spread_definition():
    layer = norm.CompoundBatchNorm2d(2, num_components=2)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([[0.0, 1.0], [2.0, 1.0]]))
        layer.running_var.copy_(torch.tensor([[4.0, 1.0], [4.0, 1.0]]))
    # channel 0: std over components 1, sqrt(mean var) 2 → 0.5; channel 1: 0
    assert layer.component_spread() == pytest.approx(0.25, rel=1e-5)
    assert norm.CompoundBatchNorm2d(2, num_components=1).component_spread() == 0.0


# ---- collapse: a failed cell with its reason, never an accuracy


def test_mixture_collapse_counts_live_components_per_layer():
    live = aggregate.LIVE_PRIOR
    layers = [
        {"priors": [1.0 - 3 * live / 2, live / 2, live / 2, live / 2]},  # one live component: collapsed
        {"priors": [0.25, 0.25, 0.25, 0.25]},
        {"priors": [0.5, 0.5 - 2 * live, 2 * live, 0.0]},
    ]
    assert aggregate.mixture_collapse(layers) == {"live_components": 8 / 3, "collapsed_layers": 1 / 3}
    assert aggregate.mixture_collapse([]) == {"live_components": None, "collapsed_layers": None}
    m = {"diagnostics": {"min_prior": 0.0, "layers": layers}}
    cols = aggregate.diag_columns(m)
    assert cols["diag.live_components"] == 8 / 3 and cols["diag.collapsed_layers"] == 1 / 3
    assert "diag.live_components" not in aggregate.diag_columns({"diagnostics": None})


def test_collapse_reason():
    assert collapse_reason(0.95, 3, 0.9).startswith("collapsed: class 3 received 95.0 %")
    assert collapse_reason(0.5, 3, 0.9) is None and collapse_reason(0.95, 3, None) is None


def test_trainer_records_a_collapse_as_the_runs_failure(prepared, tmp_path):
    m = trainer.run(spec(epochs=1, collapse_share=0.05), 10, 0, prepared, tmp_path)  # every run "collapses"
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["failure"] == m["failure"] and "train.collapse_share = 0.05" in m["failure"]
    assert aggregate.check_metrics(on_disk) == m["failure"]


def test_collapsed_run_is_a_failed_cell_never_aggregated(tmp_path):
    cfg = config.validate(
        {
            "results_dir": str(tmp_path),
            "experiments": {
                "e": {
                    "datasets": ["cifar10"],
                    "ratios": [100],
                    "methods": ["baseline", "baseline+cbn"],
                    "backbones": ["resnet32"],
                    "seeds": [0, 1, 2],
                    "figure": "sensitivity",
                }
            },
        }
    )
    paths = synthetic.write_grid(cfg)
    collapsed = next(p for p in paths if "baseline+cbn" in str(p) and p.parent.name == "s1")
    m = json.loads(collapsed.read_text())
    reason = collapse_reason(0.97, 4, 0.9)
    collapsed.write_text(json.dumps({**m, "top1": 10.0, "failure": reason}))
    out = aggregate.main([], tmp_path / "aggregate", cfg, existing=True)
    cells = out["cells.csv"].set_index(["method", "seed"])
    assert cells.loc[("baseline+cbn", 1), "status"] == "failed" and cells.loc[("baseline+cbn", 1), "detail"] == reason
    runs = out["runs.csv"]
    assert not ((runs["method"] == "baseline+cbn") & (runs["seed"] == 1)).any() and (runs["value"] != 10.0).all()
    g = out["gains.csv"]
    assert (g["kind"] == "sensitivity").all() and g["n_method"].tolist() == [2]
    html = page.render(page.load_aggregate(tmp_path / "aggregate"), cfg, tmp_path / "fig", tmp_path / "tab")
    assert html_escape(reason) in html


# ---- aggregate, report and the sensitivity figure


def test_gains_carry_the_welch_interval():
    runs = pd.DataFrame(
        [
            {"dataset": "d", "ratio": 100.0, "method": m, "backbone": "b", "seed": s, "metric": "top1", "value": v}
            for m, vals in (("a", [52.0, 53.5, 52.7]), ("o", [50.1, 50.9, 50.2]))
            for s, v in enumerate(vals)
        ]
    )
    claim = {
        "id": "x",
        "table": None,
        "method": "a",
        "over": "o",
        "backbone": "b",
        "cells": [{"dataset": "d", "ratio": 100}],
    }
    g = gains.gains(runs, [claim]).iloc[0]
    ci = stats.ttest_ind([52.0, 53.5, 52.7], [50.1, 50.9, 50.2], equal_var=False).confidence_interval(0.95)
    assert (g["welch_ci_low"], g["welch_ci_high"]) == pytest.approx((ci.low, ci.high))
    assert g["welch_ci_low"] < g["gain"] < g["welch_ci_high"]


def _gains_table(verdicts):
    rows = [
        {
            "experiment": "s",
            "kind": "sensitivity",
            "dataset": "fashion-mnist",
            "ratio": "100",
            "backbone": "resnet8",
            "metric": "top1",
            "method": m,
            "over": "baseline",
            "gain": g,
            "welch_ci_low": g - 1.0,
            "welch_ci_high": g + 1.5,
            "gain_verdict": v,
        }
        for m, g, v in verdicts
    ]
    return pd.DataFrame(rows)


def test_sensitivity_figure_from_a_gains_table(tmp_path):
    exp = {
        "datasets": ["fashion-mnist"],
        "ratios": [100],
        "backbones": ["resnet8"],
        "methods": ["baseline", "baseline+cbn", "cbn@resp-sample", "cbn@stats-running"],
        "seeds": [0, 1, 2],
    }
    g = _gains_table(
        [
            ("baseline+cbn", -3.0, "contradicted"),
            ("cbn@resp-sample", -0.2, "no gain"),
            ("cbn@stats-running", math.nan, "untested"),
        ]
    )
    path = figures.fig_sensitivity(g, "s", exp, tmp_path / "sensitivity.png")
    assert path.is_file() and path.with_suffix(".svg").is_file()
    assert "contradicted" in path.with_suffix(".svg").read_text()
    # a reading whose cells failed is labelled on its row, with how many seeds and why
    cells = pd.DataFrame(
        [
            {
                "dataset": "fashion-mnist",
                "ratio": 100,
                "method": m,
                "backbone": "resnet8",
                "seed": s,
                "experiments": "s other",
                "status": st,
                "detail": d,
            }
            for m, st, d in (
                ("cbn@stats-running", "failed", "training diverged: the loss became nan"),
                ("cbn@resp-sample", "finished", ""),
            )
            for s in range(3)
        ]
        + [
            {
                "dataset": "fashion-mnist",
                "ratio": 100,
                "method": "baseline+cbn",
                "backbone": "resnet8",
                "seed": 0,
                "experiments": "s",
                "status": "failed",
                "detail": "collapsed: class 3 received 99 % of the test predictions",
            }
        ]
    )
    assert figures.failure_notes(cells, {**exp, "name": "s"}) == {
        ("Fashion-MNIST-LT ρ=100", "cbn@stats-running"): "failed in 3 of 3 seeds (diverged)",
        ("Fashion-MNIST-LT ρ=100", "baseline+cbn"): "failed in 1 of 1 seeds (collapsed)",
    }
    assert figures.failure_notes(cells, {**exp, "name": "other-experiment"}) == {}
    svg = figures.fig_sensitivity(g, "s", exp, tmp_path / "failed.png", cells=cells).with_suffix(".svg").read_text()
    assert "failed in 3 of 3 seeds (diverged)" in svg and "collapsed" in svg
    assert "failed in" not in path.with_suffix(".svg").read_text()  # without cells.csv: no labels
    with pytest.raises(figures.Skip, match="no method has finished runs"):
        figures.fig_sensitivity(g.assign(gain=math.nan), "s", exp, tmp_path / "none.png")
    with pytest.raises(figures.Skip):
        figures.fig_sensitivity(g.assign(kind="ablation"), "s", exp, tmp_path / "none.png")


def test_fashion_cbn_config_validates_and_shares_fashions_cells():
    cbn = config.load(ROOT / "config" / "fashion-cbn.yaml")
    fashion = config.load(ROOT / "config" / "fashion.yaml")
    assert cbn["results_dir"] == fashion["results_dir"]
    for m in ("baseline", "baseline+cbn"):
        assert config.cell_spec(cbn, "fashion-mnist", m, "resnet8") == config.cell_spec(
            fashion, "fashion-mnist", m, "resnet8"
        )
    sens = cbn["experiments"]["fashion_cbn_sensitivity"]
    assert sens["methods"][:2] == ["baseline", "baseline+cbn"] and sens["figure"] == "sensitivity"
    default = config.cell_spec(cbn, "fashion-mnist", "baseline+cbn", "resnet8")["recipe"]["norm"]
    for m in sens["methods"][2:]:  # one factor at a time from the defaults
        n = config.cell_spec(cbn, "fashion-mnist", m, "resnet8")["recipe"]["norm"]
        changed = {k for k in n["options"] if n["options"][k] != default["options"][k]}
        changed |= {"scope"} if n["scope"] != default["scope"] else set()
        assert len(changed) == 1 or changed == {"prior_momentum", "mean_momentum", "var_momentum"}, (m, changed)
    budget = [
        config.cell_spec(cbn, "fashion-mnist", m, "resnet8")["train"]["epochs"]
        for m in cbn["experiments"]["fashion_cbn_budget"]["methods"]
    ]
    assert budget == [4 * fashion["train"]["epochs"]] * 2


def test_fashion_cbn_synthetic_grid_reports_sensitivity_and_diagnostics(tmp_path):
    cfg = config.load(ROOT / "config" / "fashion-cbn.yaml", {"results_dir": str(tmp_path)})
    for p in synthetic.write_grid(cfg):
        m = json.loads(p.read_text())
        m["stability"] = {"nonfinite_steps": 0, "grad_norm_mean": 1.5, "grad_norm_max": 4.0, "grad_norm_last": 1.0}
        if m["spec"]["recipe"]["norm"]["name"] == "cbn":
            m["diagnostics"] = {
                "min_prior": 0.01,
                "mean_spread": 0.3,
                "confident_share": 0.8,
                "top1_running": 70.0,
                "top1_batch_stats": 80.0,
                "layers": [],
            }
        p.write_text(json.dumps(m))
    out = aggregate.main([], tmp_path / "aggregate", cfg, existing=True)
    runs = out["runs.csv"]
    assert (runs.loc[runs["method"] == "baseline", "diag.min_prior"].isna()).all()
    assert (runs.loc[runs["method"] == "cbn@m2", "diag.top1_batch_stats"] == 80.0).all()
    assert (runs["diag.grad_norm_max"] == 4.0).all()
    g = out["gains.csv"]
    assert sorted(g.loc[g["experiment"] == "fashion_cbn_sensitivity", "method"]) == sorted(
        cfg["experiments"]["fashion_cbn_sensitivity"]["methods"][1:]
    )
    assert (g["kind"] == "sensitivity").all() and g["welch_ci_low"].notna().all()
    html = page.render(page.load_aggregate(tmp_path / "aggregate"), cfg, tmp_path / "fig", tmp_path / "tab")
    assert "CBN diagnostics" in html and "top-1 batch statistics (sample)" in html
    for e in cfg["experiments"]:
        assert (tmp_path / "fig" / e / "sensitivity.png").is_file()


def test_fashion_cbn_config_dry_runs(tmp_path):
    cfg = config.load(ROOT / "config" / "fashion-cbn.yaml")
    p = snakemake("-n", "--cores", 2, "--configfile", ROOT / "config" / "fashion-cbn.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    counts = job_counts(p.stdout)
    assert counts["train"] == len(config.cells(cfg)) == 42 and counts["report"] == 1
