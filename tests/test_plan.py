"""`ltbench plan`: one projection of a grid's GPU-hours (also what `ltbench bench --config` reports),
torch-free, with the forward passes of a step from the recipe (ltbench.spec.methods.passes)."""
import math
import subprocess
import sys

import pytest

from conftest import ROOT
from ltbench.spec import config
from ltbench.spec.catalog import BACKBONES, backbone_depth
from ltbench.tools import plan

GRID = {"train": {"epochs": 10, "eval_every": 5},
        "experiments": {"e": {"datasets": ["cifar10"], "ratios": [100], "methods": ["ce", "baseline+cbn+sbn+dpl"],
                              "backbones": ["resnet110", "resnet8"], "seeds": [0]}}}


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
        ("resnet8", "ce", 1), ("resnet8", "baseline+cbn+sbn+dpl", 4),
        ("resnet110", "ce", 1), ("resnet110", "baseline+cbn+sbn+dpl", 4)]
    one = plan.DEFAULT_IMAGES_PER_S["resnet8"]
    assert p["speeds"][1]["images_per_s"] == pytest.approx(one / 4)


def test_a_bench_result_is_the_speed_of_its_backbone_ahead_of_the_config(tmp_path):
    cfg = config.validate({**GRID, "results_dir": str(tmp_path), "plan": {"images_per_s": {"resnet8": 1000.0}}})
    bench = {"backbone": "resnet8", "method": "baseline+cbn+sbn+dpl", "passes_per_step": 4, "device": "x",
             "fast": {"images_per_s": 500.0}, "eval_images_per_s": 6000.0}
    p = plan.plan(cfg, bench=bench)
    r8 = {r["method"]: r for r in p["speeds"] if r["backbone"] == "resnet8"}
    assert r8["ce"]["kind"] == "bench" and r8["ce"]["images_per_s"] == pytest.approx(2000.0)  # 500 × 4 passes
    # 10 epochs × 12406 images at 2000 img/s, plus 2 test passes of 10000 images at 6000 img/s
    assert r8["ce"]["hours"] == pytest.approx((10 * 12406 / 2000 + 2 * 10000 / 6000) / 3600)
    assert plan.plan(cfg)["speeds"][0]["kind"] == "config"  # without it the config's knob


def test_plan_imports_no_torch():
    code = "import sys, ltbench.tools.plan; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
