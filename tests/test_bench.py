"""The speed benchmark: both paths feed the model the same tensors and train the same model."""

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT

from ltbench import data
from ltbench.data import augment
from ltbench.spec import config
from ltbench.tools import bench, gpu_suite, plan


def demo_cells() -> set:
    """The distinct (dataset, ratio, method, backbone, seed) cells of config/demo.yaml's experiments."""
    cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    keys = ("datasets", "ratios", "methods", "backbones", "seeds")
    return {c for e in cfg["experiments"].values() for c in itertools.product(*(e[k] for k in keys))}


def test_both_paths_normalize_identically_and_give_the_same_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    ds = bench._PILDataset(x.permute(0, 2, 3, 1).numpy(), y.numpy(), ["none"])
    common = torch.stack([ds[i][0][0] for i in range(16)])
    cifar = data.get("cifar10")
    assert bench.CIFAR is cifar  # the dataset's own statistics, not a copy
    mean, std = torch.tensor(cifar.mean), torch.tensor(cifar.std)
    fast = augment.normalize(x, mean, std)
    assert torch.allclose(common, fast, atol=1e-6)
    losses = []
    for batch in (fast, common):
        torch.manual_seed(0)
        recipe, model, criterion, _ = bench._setup("baseline+cbn+sbn", "resnet8", 10, torch.device("cpu"), False)
        losses.append(bench._loss(recipe, model, criterion, {"strong": batch}, y, torch.zeros_like(y), amp=False))
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)


def test_bench_compare_alternates_methods_in_one_process(cli):
    p = cli(
        "bench",
        "--compare",
        "baseline, baseline+cbn",
        "--backbone",
        "resnet8",
        "--steps",
        1,
        "--rounds",
        3,
        "--warmup",
        0,
        "--batch-size",
        8,
        "--device",
        "cpu",
    )
    out = json.loads(p.stdout)
    per_round = out["images_per_s_per_round"]
    assert list(per_round) == ["baseline", "baseline+cbn"] and all(len(v) == 3 for v in per_round.values())
    assert out["images_per_s"]["baseline+cbn"] == pytest.approx(np.median(per_round["baseline+cbn"]), abs=0.1)
    ratios = np.array(per_round["baseline+cbn"]) / np.array(per_round["baseline"])
    assert out["ratio_to_baseline"] == {"baseline": 1.0, "baseline+cbn": pytest.approx(np.median(ratios), abs=1e-3)}
    assert out["cbn_kernel"]["baseline"] is None and out["cbn_kernel"]["baseline+cbn"] in ("c", "torch")


def test_bench_command_on_cpu(cli, tmp_path):
    p = cli(
        "bench",
        "--method",
        "baseline+cbn+sbn+dpl",
        "--backbone",
        "resnet8",
        "--steps",
        2,
        "--warmup",
        1,
        "--batch-size",
        16,
        "--workers",
        0,
        "--device",
        "cpu",
        "--config",
        "config/demo.yaml",
        "--out",
        tmp_path / "b.json",
    )
    out = json.loads(p.stdout)
    assert out == json.loads((tmp_path / "b.json").read_text())
    assert out["passes_per_step"] == 4 and out["device"].startswith("cpu")
    for path in ("fast", "common"):
        assert out[path]["images_per_s"] > 0 and np.isfinite(out[path]["mean_loss"])
    # speedup is rounded to 2 decimals
    assert out["speedup"] == pytest.approx(out["fast"]["images_per_s"] / out["common"]["images_per_s"], abs=0.0051)
    proj = out["projected_device_hours"]
    assert proj["unique_cells"] == len(demo_cells()) and proj["total"] > 0
    # the projection is `ltbench plan`'s, with this measurement as resnet8's speed
    assert "bench" in proj["speed_sources"]
    assert proj["total"] == round(plan.plan(config.load(ROOT / "config" / "demo.yaml"), bench=out)["hours_total"], 3)
    # projection: 400 epochs × 12406 images at the measured speed plus evaluation
    ips, eval_ips = out["fast"]["images_per_s"], out["eval_images_per_s"]
    assert out["projected_400_epoch_cifar10_lt_r100_wall_s"] == pytest.approx(
        400 * (12406 / ips + 10000 / eval_ips), rel=0.01
    )


# ---- `bench --suite gpu`: the prepared GPU check, in its quick mode ----


@pytest.mark.slow
def test_gpu_suite_quick_mode_runs_every_part(cli, tmp_path):
    p = cli("bench", "--suite", "gpu", "--device", "cpu", "--quick", "--out", tmp_path / "suite.json")
    out = json.loads((tmp_path / "suite.json").read_text())
    assert out["quick"] and out["device"].startswith("cpu") and out["settings"]["amp"] == "none"
    # the CUDA-only tests ran and were skipped here, each with its reason
    t = out["cuda_tests"]
    assert t["returncode"] == 0 and t["failed"] == 0 and t["passed"] == 0 and t["skipped"] >= 5
    assert "test_gpu_settings.py" in t["files"] and all("CUDA" in r for r in t["skip_reasons"])
    assert list(out["throughput"]) == list(gpu_suite.METHODS)
    for m, row in out["throughput"].items():
        # a number for every mode, or the reason it has none
        assert row["eager"]["images_per_s"] > 0 and row["common"]["images_per_s"] > 0, m
        compiled = row["compiled"]
        assert (compiled["images_per_s"] or 0) > 0 or compiled["error"], m
        assert row["reduce-overhead"] == {"images_per_s": None, "skipped": "CUDA graphs need a CUDA device"}
        assert row["ops_per_step"] > 0 and row["eval_images_per_s"] > 0
        proj = row["projected_400_epoch_wall_s"]
        assert proj["eager"] == pytest.approx(
            400 * (12406 / row["eager"]["images_per_s"] + 10000 / row["eval_images_per_s"]), rel=0.01
        )
    ops = {m: row["ops_per_step"] for m, row in out["throughput"].items()}
    assert ops["baseline"] < ops["baseline+cbn"] < ops["baseline+cbn+sbn+dpl"]  # CBN's layers, DPL's 4 passes
    assert set(out["cells"]) == set(gpu_suite.FAMILIES)
    for fam, c in out["cells"].items():
        assert c["returncode"] == 0 and c["top1"] > 0 and c["device"] == "cpu", (fam, c)
    assert out["cells"]["decoupled (cRT)"]["epochs"] == 3  # the fewest that give both stages an epoch
    # the Markdown block on stdout: one row per method and per family
    assert "| method | eager img/s | compiled |" in p.stdout
    assert all(f"| {m} |" in p.stdout for m in gpu_suite.METHODS)
    assert all(f"| {fam} |" in p.stdout for fam in gpu_suite.FAMILIES)


def test_gpu_suite_records_a_failed_compilation_and_goes_on(monkeypatch):
    """A figure whose compilation fails (CBN's fused Function today) gets the reason, not a crash."""

    class Broken(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner = model

        def forward(self, x):
            raise RuntimeError("Attempted to call op with non-contiguous `out=` tensor\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: Broken(model))
    sizes = gpu_suite.Sizes(**{**dataclasses.asdict(gpu_suite.QUICK), "images": 32, "eval_images": 16})
    row = gpu_suite.throughput(sizes, torch.device("cpu"), ("baseline",))["baseline"]
    assert row["eager"]["images_per_s"] > 0 and row["common"]["images_per_s"] > 0
    assert row["compiled"]["images_per_s"] is None
    assert row["compiled"]["error"] == "RuntimeError: Attempted to call op with non-contiguous `out=` tensor"
    assert row["projected_400_epoch_wall_s"]["compiled"] is None
    result = {
        "device": "cpu", "torch": torch.__version__, "date": "2026-12-06", "command": "c", "wall_s": 1.0,
        "sizes": dataclasses.asdict(sizes), "settings": {"amp": "none", "channels_last": False},
        "throughput": {"baseline": row}, "cuda_tests": {"ran": False, "reason": "no tests"}, "cells": {},
    }  # fmt: skip
    md = gpu_suite.markdown(result)
    assert "| baseline |" in md and "failed¹" in md
    assert "- ¹ baseline, compiled: RuntimeError: Attempted to call op with non-contiguous `out=` tensor" in md
