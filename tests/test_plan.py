"""`ltbench plan`: one projection of a grid's GPU-hours (also what `ltbench bench --config` reports),
torch-free, with the forward passes of a step from the recipe (ltbench.spec.methods.passes)."""

import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT

from ltbench.spec import config
from ltbench.spec.catalog import BACKBONES, backbone_depth
from ltbench.tools import plan

GRID = {
    "train": {"epochs": 10, "eval_every": 5},
    "experiments": {
        "e": {
            "datasets": ["cifar10"],
            "ratios": [100],
            "methods": ["ce", "baseline+cbn+sbn+dpl"],
            "backbones": ["resnet110", "resnet8"],
            "seeds": [0],
        }
    },
}


def test_backbone_depth_is_one_function_for_plan_and_figures():
    assert [backbone_depth(b) for b in ("resnet8", "resnet110", "resnet50", "resnext50_32x4d")] == [8, 110, 50, 50]
    assert backbone_depth("vit_b16") == math.inf  # no depth: after every known one
    assert all(math.isfinite(backbone_depth(b)) for b in BACKBONES)
    from ltbench.report import figures

    assert figures.backbone_depth is backbone_depth and not hasattr(figures, "_depth")
    assert not hasattr(plan, "_depth")


def test_plan_speeds_are_ordered_by_depth_and_scaled_by_the_step_passes(tmp_path):
    cfg = config.validate({**GRID, "results_dir": str(tmp_path)})
    p = plan.plan(cfg)
    assert [(r["backbone"], r["method"], r["passes"]) for r in p["speeds"]] == [
        ("resnet8", "ce", 1),
        ("resnet8", "baseline+cbn+sbn+dpl", 4),
        ("resnet110", "ce", 1),
        ("resnet110", "baseline+cbn+sbn+dpl", 4),
    ]
    one = plan.DEFAULT_IMAGES_PER_S["resnet8"]
    assert p["speeds"][1]["images_per_s"] == pytest.approx(one / 4)


def test_a_bench_result_is_the_speed_of_its_backbone_ahead_of_the_config(tmp_path):
    cfg = config.validate({**GRID, "results_dir": str(tmp_path), "plan": {"images_per_s": {"resnet8": 1000.0}}})
    bench = {
        "backbone": "resnet8",
        "method": "baseline+cbn+sbn+dpl",
        "passes_per_step": 4,
        "device": "x",
        "fast": {"images_per_s": 500.0},
        "eval_images_per_s": 6000.0,
    }
    p = plan.plan(cfg, bench=bench)
    r8 = {r["method"]: r for r in p["speeds"] if r["backbone"] == "resnet8"}
    assert r8["ce"]["kind"] == "bench" and r8["ce"]["images_per_s"] == pytest.approx(2000.0)  # 500 × 4 passes
    # 10 epochs × 12406 images at 2000 img/s, plus 2 test passes of 10000 images at 6000 img/s
    assert r8["ce"]["hours"] == pytest.approx((10 * 12406 / 2000 + 2 * 10000 / 6000) / 3600)
    assert plan.plan(cfg)["speeds"][0]["kind"] == "config"  # without it the config's knob


def test_plan_imports_no_torch():
    code = "import sys, ltbench.tools.plan; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_plan_prices_the_seeds_that_would_decide_the_undecided_verdicts(tmp_path):
    import pandas as pd

    cfg = config.validate(
        {**GRID, "results_dir": str(tmp_path), "plan": {"images_per_s": {"resnet8": 1000.0, "resnet110": 100.0}}}
    )
    assert plan.plan(cfg)["extra_seeds"] is None  # no aggregate yet
    agg = tmp_path / "aggregate"
    agg.mkdir()
    base = {"dataset": "cifar10", "ratio": 100.0, "backbone": "resnet8"}
    pd.DataFrame(
        [
            {**base, "method": "ce", "n": 3, "verdict": "inconclusive", "seeds_needed": 7},
            {**base, "method": "ce", "n": 3, "verdict": "inconclusive", "seeds_needed": 5},  # the max counts
            {**base, "method": "baseline+cbn+sbn+dpl", "n": 3, "verdict": "reproduced", "seeds_needed": None},
            {**base, "backbone": "resnet110", "method": "ce", "n": 2, "verdict": "inconclusive", "seeds_needed": None},
        ]
    ).to_csv(agg / "comparison.csv", index=False)
    pd.DataFrame(
        [
            {
                **base,
                "method": "baseline+cbn+sbn+dpl",
                "over": "ce",
                "n_method": 3,
                "n_over": 3,
                "gain_verdict": "not significant",
                "seeds_needed": 6,
            },
            {
                **base,
                "method": "baseline+cbn+sbn+dpl",
                "over": "ce",
                "n_method": 3,
                "n_over": 3,
                "gain_verdict": "supported",
                "seeds_needed": 50,
            },
        ]
    ).to_csv(agg / "gains.csv", index=False)
    p = plan.plan(cfg)
    x = p["extra_seeds"]
    hours = {(r["backbone"], r["method"]): r["hours"] for r in p["speeds"]}  # one seed per cell in GRID
    # ce/resnet8: 7 − 3 = 4 more runs (max of its rows, gains' 6 included); DPL: 6 − 3 = 3; resnet110's row is beyond
    assert (x["runs"], x["cells"], x["beyond_max_seeds"], x["runs_without_estimate"]) == (7, 2, 1, 0)
    assert x["hours"] == pytest.approx(4 * hours[("resnet8", "ce")] + 3 * hours[("resnet8", "baseline+cbn+sbn+dpl")])
    text = plan.format_text(p)
    assert "7 more runs on 2 cells" in text and "1 verdict would need more than" in text
    # another config sharing the results folder aggregated last: its verdicts are not this config's
    (agg / "provenance.json").write_text(json.dumps({"config": "other"}))
    p = plan.plan(cfg)
    assert p["extra_seeds"] is None and p["aggregate_of_other_config"] == "other"
    assert "written for the config 'other'" in plan.format_text(p)
    (agg / "provenance.json").write_text(json.dumps({"config": cfg["name"]}))
    assert plan.plan(cfg)["extra_seeds"]["runs"] == 7
    pd.DataFrame([{"dataset": "cifar10"}]).to_csv(agg / "gains.csv", index=False)
    with pytest.raises(ValueError, match="gains.csv.*gain_verdict"):
        plan.plan(cfg)
