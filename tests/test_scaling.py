"""The scaling figure (``figure: scaling``): gains over the first method of the same training length,
against the epochs or the backbone depth; config/fashion-scale.yaml."""

import json

import pandas as pd
import pytest
import synthetic
from scipy import stats
from test_workflow import ROOT, job_counts, snakemake

from ltbench.analysis import aggregate, gains
from ltbench.report import figures, page
from ltbench.spec import config

SCALE = ROOT / "config" / "fashion-scale.yaml"
# The designed trend: + CBN's mean gap to its baseline at 8, 32 and 128 epochs, and at depth 8, 20, 32.
GAP = {"baseline+cbn": -12.0, "cbn@x4": -4.0, "cbn@x16": 1.0}
DEPTH_GAP = {"resnet8": -4.0, "resnet20": -0.5}


def test_scaling_pairs_compare_within_a_training_length():
    exp = {
        "datasets": ["d"],
        "backbones": ["resnet8"],
        "methods": ["b8", "c8", "b32", "c32", "s32"],
    }
    epochs = {"b8": 8, "c8": 8, "b32": 32, "c32": 32, "s32": 32}
    pairs = gains.scaling_pairs(exp, lambda d, m, b: epochs[m])
    assert pairs == [("d", "resnet8", "c8", "b8"), ("d", "resnet8", "c32", "b32"), ("d", "resnet8", "s32", "b32")]


def test_fashion_scale_config_shares_the_fashion_cells():
    scale = config.load(SCALE)
    fashion = config.load(ROOT / "config" / "fashion.yaml")
    cbn = config.load(ROOT / "config" / "fashion-cbn.yaml")
    assert scale["results_dir"] == fashion["results_dir"] == cbn["results_dir"]
    for m, other in (("baseline", fashion), ("baseline+cbn", fashion), ("baseline@x4", cbn), ("cbn@x4", cbn)):
        assert config.cell_spec(scale, "fashion-mnist", m, "resnet8") == config.cell_spec(
            other, "fashion-mnist", m, "resnet8"
        ), m
    exp = scale["experiments"]["fashion_cbn_epochs"]
    epochs = [config.cell_spec(scale, "fashion-mnist", m, "resnet8")["train"]["epochs"] for m in exp["methods"]]
    assert epochs == [8, 8, 32, 32, 128, 128]
    for m in exp["methods"]:  # the budget is the only change from the recipe each extends
        spec = config.cell_spec(scale, "fashion-mnist", m, "resnet8")
        base = config.cell_spec(scale, "fashion-mnist", "baseline+cbn" if "cbn" in m else "baseline", "resnet8")
        assert spec["recipe"]["norm"] == base["recipe"]["norm"] and spec["recipe"]["loss"] == base["recipe"]["loss"]
    assert config.figure_kinds(exp) == ("scaling",)


def test_fashion_scale_config_dry_runs(tmp_path):
    cfg = config.load(SCALE)
    p = snakemake("-n", "--cores", 2, "--configfile", SCALE, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert job_counts(p.stdout)["train"] == len(config.cells(cfg))


def _designed(cfg, c, metric):
    """The offset that makes a synthetic cell's mean the designed value (synthetic.write_grid's base: 40)."""
    if c.method in GAP:
        return GAP[c.method] + (DEPTH_GAP[c.backbone] - GAP["cbn@x4"] if c.method == "cbn@x4" else 0.0)
    return 0.0


@pytest.fixture(scope="module")
def scale_aggregate(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    cfg = config.load(SCALE, {"results_dir": str(tmp)})
    for p in synthetic.write_grid(cfg, lambda c, m: _designed(cfg, c, m), base=_flat(cfg)):
        m = json.loads(p.read_text())
        if m["spec"]["recipe"]["norm"]["name"] == "cbn":
            sbn = (
                "sbn" in m["spec"]["recipe"]["norm"].get("options", {}).get("mode", "") or "sbn" in m["cell"]["method"]
            )
            seed = m["cell"]["seed"]
            m["diagnostics"] = {
                "min_prior": 0.2 * sbn + 0.01 * seed,
                "mean_spread": 0.5,
                "confident_share": 0.9,
                "top1_running": 70.0,
                "top1_batch_stats": 80.0,
                "layers": [],
            }
            p.write_text(json.dumps(m))
    out = aggregate.main([], tmp / "aggregate", cfg, existing=True)
    return cfg, out, tmp


def _flat(cfg):
    """Every cell's base value 40, so the designed offsets are the means."""
    return {
        (c.dataset, float(c.ratio), c.method, c.backbone, m): 40.0 for c in config.cells(cfg) for m in aggregate.METRICS
    }


def test_scaling_gains_and_points_follow_the_designed_trend(scale_aggregate):
    cfg, out, _ = scale_aggregate
    g = out["gains.csv"]
    epochs = g[(g["experiment"] == "fashion_cbn_epochs") & (g["kind"] == "scaling")]
    assert list(zip(epochs["method"], epochs["over"], strict=True)) == [
        ("baseline+cbn", "baseline"),
        ("cbn@x4", "baseline@x4"),
        ("cbn@x16", "baseline@x16"),
    ]
    axis, pts = figures.scaling_points(
        g, out["runs.csv"], "fashion_cbn_epochs", cfg["experiments"]["fashion_cbn_epochs"]
    )
    assert axis == "epochs"
    assert list(pts["x"]) == [8.0, 32.0, 128.0] and set(pts["series"]) == {1}
    assert list(pts["gain"]) == pytest.approx([GAP["baseline+cbn"], DEPTH_GAP["resnet8"], GAP["cbn@x16"]])
    # the interval is the Welch interval of the designed seed values (base ± scale per seed)
    sd_b, sd_c = synthetic.scale("baseline@x16"), synthetic.scale("cbn@x16")
    b = [40.0 + sd_b * synthetic.SIGN[s] for s in range(3)]
    c = [40.0 + GAP["cbn@x16"] + sd_c * synthetic.SIGN[s] for s in range(3)]
    ci = stats.ttest_ind(c, b, equal_var=False).confidence_interval(0.95)
    last = pts.iloc[-1]
    assert (last["low"], last["high"]) == pytest.approx((ci.low, ci.high))
    assert pts.iloc[0]["verdict"] == "contradicted" and last["verdict"] in gains.GAIN_VERDICTS

    axis, pts = figures.scaling_points(g, out["runs.csv"], "fashion_cbn_depth", cfg["experiments"]["fashion_cbn_depth"])
    assert axis == "depth" and list(pts["x"]) == [8.0, 20.0]
    assert list(pts["gain"]) == pytest.approx(list(DEPTH_GAP.values()))
    assert pts["label"].nunique() == 1 and list(pts["over"]) == ["baseline@x4"] * 2


def test_scaling_figure_is_drawn_and_reported(scale_aggregate):
    cfg, _, tmp = scale_aggregate
    html = page.render(page.load_aggregate(tmp / "aggregate"), cfg, tmp / "fig", tmp / "tab")
    for e in ("fashion_cbn_epochs", "fashion_cbn_depth"):
        assert (tmp / "fig" / e / "scaling.png").is_file()
    assert figures.CAPTIONS["scaling"].split(":")[0] in html


def test_scaling_figure_skips_without_gains(tmp_path):
    exp = {"datasets": ["d"], "ratios": [100], "backbones": ["resnet8"], "methods": ["a", "b"], "seeds": [0]}
    with pytest.raises(figures.Skip):
        figures.fig_scaling(
            pd.DataFrame(columns=gains.EXPERIMENT_COLUMNS), pd.DataFrame(), "s", exp, tmp_path / "x.png"
        )


def test_paper_config_draws_figure_6_and_its_scaling():
    cfg = config.load(ROOT / "config" / "config.yaml")
    assert config.figure_kinds(cfg["experiments"]["cbn_fig6"]) == ("backbones", "scaling")


def test_diagnostics_over_seeds_in_the_aggregate_and_the_report(scale_aggregate):
    cfg, out, tmp = scale_aggregate
    d = out["diagnostics.csv"]
    sbn = d[(d["experiment"] == "fashion_cbn_sbn") & (d["metric"] == "min_prior")].set_index("method")
    assert set(sbn.index) == {"cbn@x4", "cbn+sbn@x4", "full@x4"}  # the baseline has no CBN layers
    ci = stats.t.interval(0.95, 2, loc=0.21, scale=0.01 / 3**0.5)
    assert sbn.loc["cbn+sbn@x4", ["mean", "n"]].tolist() == pytest.approx([0.21, 3])
    assert (sbn.loc["cbn+sbn@x4", "ci_low"], sbn.loc["cbn+sbn@x4", "ci_high"]) == pytest.approx(ci)
    assert sbn.loc["cbn@x4", "mean"] == pytest.approx(0.01)
    html = page.render(page.load_aggregate(tmp / "aggregate"), cfg, tmp / "fig2", tmp / "tab2")
    assert "0.21 [" in html and "Over the seeds (diagnostics.csv)" in html
