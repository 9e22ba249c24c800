"""Baselines as their authors ran them: NBN's head, CBN's statistics updates, the held-out validation
split and τ selection, strong-view variants, and the published protocol."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from ltbench import data
from ltbench.analysis import aggregate
from ltbench.data import augment
from ltbench.errors import ConfigError
from ltbench.nn import classifier
from ltbench.spec import config, methods


def test_nbn_has_no_logit_rectification_and_nbn_rect_has_it():
    assert methods.recipe("nbn")["logit_rectification"] is False
    r = methods.recipe("nbn+rect")
    assert r["logit_rectification"] is True and r["norm"] == methods.recipe("nbn")["norm"]


def test_cbn_running_statistics_move_once_per_forward_pass():
    """Documented detail: the full method (2 paths × 2 views) moves CBN's buffers 4 times per step."""
    from ltbench.nn import norm
    from ltbench.training.step import forward_paths

    assert "4 times per optimizer step" in methods.OPEN_DETAILS["recipe.norm.options.mean_momentum"]
    layer = norm.CompoundBatchNorm2d(3, num_components=2)
    model = nn.Sequential(layer)
    views = {"weak": torch.randn(8, 3, 4, 4), "strong": torch.randn(8, 3, 4, 4)}
    wanted = {f"{p}/{v}" for p in ("compound", "split") for v in views}
    forward_paths(model, views, ["compound", "split"], wanted, torch.arange(8) % 2, amp=False)
    assert int(layer.num_batches_tracked) == 4


def test_heldout_validation_is_balanced_and_disjoint():
    y = np.repeat(np.arange(3), [10, 10, 10])
    kept = np.concatenate([np.arange(10), [10, 11, 12], [20]])  # class 0 fully kept (the head class)
    val = data.heldout_val_indices(y, kept, per_class=4, seed=0)
    assert not set(val) & set(kept)
    assert np.bincount(y[val], minlength=3).tolist() == [0, 4, 4]
    assert np.array_equal(val, data.heldout_val_indices(y, kept, per_class=4, seed=0))


def test_prepare_writes_a_validation_split_outside_the_subset(tmp_path):
    info = data.prepare("digits-lt", 10, tmp_path, tmp_path / "d.npz", {"val_per_class": 5})
    with np.load(tmp_path / "d.npz") as z:
        assert not set(z["val_indices"]) & set(z["subset_indices"])
        counts = np.bincount(z["val_y"], minlength=10)
        assert info["val_total"] == len(z["val_y"]) == counts.sum() and counts.max() == 5
        assert (counts[1:] == 5).all()  # every class but the head has spare images


def _toy_model():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            with torch.no_grad():
                self.fc.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
                self.fc.bias.fill_(5.0)  # τ-normalization drops the bias

        def features(self, x):
            return x

        def forward(self, x):
            return self.fc(x)

    return Toy()


def test_select_tau_by_hand():
    """Head weight norm 3, tail 1: a class-1 point (0.5, 1) is classified right once 3^(1−τ)·0.5 < 1,
    i.e. τ > 1 − log 2 / log 3 ≈ 0.37: the first grid value is 0.4; τ = 0 gets half the classes."""
    grid = classifier.tau_grid({"tau_grid": [0.0, 2.0, 0.1]})
    assert len(grid) == 21 and grid[0] == 0.0 and grid[-1] == 2.0 and grid[4] == 0.4
    val = [(torch.tensor([[1.0, 0.5], [0.5, 1.0]]), torch.tensor([0, 1]))]
    tau, scores = classifier.select_tau(_toy_model(), val, grid)
    assert tau == 0.4 and scores[0.0] == 50.0 and scores[0.4] == 100.0


def test_tau_norm_selects_tau_on_validation_not_test(tmp_path, monkeypatch):
    from ltbench.data import sources
    from ltbench.training import trainer

    data.prepare("digits-lt", 10, tmp_path, tmp_path / "d.npz")
    calls = []
    real_val = sources.TensorSource.val
    monkeypatch.setattr(sources.TensorSource, "val", lambda self, *a: calls.append(1) or real_val(self, *a))
    cfg = config.validate(
        {
            "train": {"epochs": 2, "warmup_epochs": 1, "batch_size": 64, "device": "cpu", "checkpoint_every": 0},
            "experiments": {
                "e": {"datasets": ["digits-lt"], "ratios": [10], "methods": ["tau-norm"], "backbones": ["resnet8"]}
            },
        }
    )
    m = trainer.run(
        config.cell_spec(cfg, "digits-lt", "tau-norm", "resnet8"), 10, 0, tmp_path / "d.npz", tmp_path / "run"
    )
    assert calls and len(m["tau_val_accuracy"]) == 21
    assert m["tau_val_accuracy"][str(m["tau"])] == max(m["tau_val_accuracy"].values())


def test_cutout_zeros_one_16px_square():
    """Every sample gets one black square of side 16 (clipped at the border), on all channels."""
    x = torch.full((200, 3, 64, 64), 200, dtype=torch.uint8)
    out = augment.cutout(x, torch.Generator().manual_seed(0))
    hole = out == 0
    assert torch.equal(hole, hole[:, :1].expand_as(hole)) and ((out == 0) | (out == 200)).all()
    rows, cols = hole[:, 0].any(2).sum(1), hole[:, 0].any(1).sum(1)
    assert torch.equal(hole[:, 0].sum((1, 2)), rows * cols)  # a rectangle
    assert (rows <= 16).all() and (cols <= 16).all() and (rows * cols > 0).all()
    assert int((rows * cols == 256).sum()) > 100  # unclipped holes are exactly 16 × 16
    assert torch.equal(out, augment.cutout(x, torch.Generator().manual_seed(0)))


def test_strong_view_variants_fill_and_cutout():
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    for policy, fill in (("torchvision", 0), ("cifar10_policy", 128)):
        got = augment.strong_view(x, torch.Generator().manual_seed(1), policy)
        want = augment.autoaugment(x, torch.Generator().manual_seed(1), fill=fill)
        assert torch.equal(got, want)
    g = torch.Generator().manual_seed(1)
    with_cut = augment.strong_view(x, g, "cifar10_policy", use_cutout=True)
    g2 = torch.Generator().manual_seed(1)
    aa = augment.autoaugment(x, g2, fill=128)
    assert torch.equal(with_cut, augment.cutout(aa, g2))
    with pytest.raises(ValueError, match="strong_view.policy"):
        augment.strong_view(x, None, "deepvoltaire")
    assert methods.recipe("baseline")["strong_view"] == {"policy": "torchvision", "cutout": False}


def _cfg(protocol, ms):
    return config.validate(
        {
            "experiments": {
                "e": {
                    "datasets": ["cifar10"],
                    "ratios": [100],
                    "methods": ms,
                    "backbones": ["resnet32"],
                    "protocol": protocol,
                }
            }
        }
    )


def test_published_protocol_resolves_each_method_to_its_published_recipe():
    cfg = _cfg("published", ["ce", "ldam-drw"])
    assert cfg["experiments"]["e"]["methods"] == ["ce@published", "ldam-drw@published"]
    assert {c.method for c in config.cells(cfg)} == {"ce@published", "ldam-drw@published"}
    assert config.validate(cfg)["experiments"]["e"]["methods"] == ["ce@published", "ldam-drw@published"]
    spec = config.cell_spec(cfg, "cifar10", "ldam-drw@published", "resnet32")
    t = spec["train"]  # kaidic/LDAM-DRW cifar_train.py
    assert (t["epochs"], t["lr"], t["batch_size"], t["weight_decay"], t["warmup_epochs"], t["warmup_per"]) == (
        200,
        0.1,
        128,
        2e-4,
        5,
        "epoch",
    )
    assert (t["schedule"], t["step_milestones"], t["step_factors"]) == ("step", [0.8, 0.9], [0.01, 0.0001])
    r = spec["recipe"]
    assert r["protocol"] == "published" and "kaidic/LDAM-DRW" in r["source"]
    assert r["loss"]["options"]["beta"] == 0.9999 and r["loss"]["options"]["drw_epoch_fraction"] == 0.8
    assert _cfg("controlled", ["ce"])["experiments"]["e"]["methods"] == ["ce"]
    assert methods.recipe("ce")["protocol"] == "controlled"


def _published(dataset, method):
    cfg = config.validate(
        {
            "experiments": {
                "e": {
                    "datasets": [dataset],
                    "ratios": [100 if "cifar" in dataset else 256],
                    "methods": [method],
                    "backbones": ["resnet32"],
                    "protocol": "published",
                }
            }
        }
    )
    spec = config.cell_spec(cfg, dataset, method + "@published", "resnet32")
    return spec["train"], spec["recipe"]


@pytest.mark.parametrize("dataset, epochs, warmup", [("cifar10", 591, 36), ("cifar100", 685, 42)])
def test_balanced_softmax_published_recipe(dataset, epochs, warmup):
    """BalancedMetaSoftmax-Classification config/CIFAR*_LT/balanced_softmax_imba200.yaml: 13,000 iterations
    at batch 512 on the ρ = 200 set (ceil(13000 / 22) = 591, ceil(13000 / 19) = 685 epochs), warmup
    ceil(800 / B) epochs from lr 0.05 to 0.1, cosine to 0, wd 5e-4; AutoAugment CIFAR10Policy + Cutout."""
    t, r = _published(dataset, "balanced-softmax")
    assert (t["epochs"], t["batch_size"], t["lr"], t["momentum"], t["nesterov"], t["weight_decay"]) == (
        epochs,
        512,
        0.1,
        0.9,
        False,
        5e-4,
    )
    assert (t["schedule"], t["warmup_epochs"], t["warmup_per"], t["warmup_start"]) == ("cosine", warmup, "epoch", 0.5)
    assert r["loss"]["name"] == "balanced_softmax" and r["augment"] == "autoaugment" and r["views"] == ["strong"]
    assert r["strong_view"] == {"policy": "cifar10_policy", "cutout": True}
    assert r["protocol"] == "published" and "jiawei-ren/BalancedMetaSoftmax-Classification" in r["source"]


@pytest.mark.parametrize("method, loss, posthoc", [("la", "logit_adjust", None), ("la-posthoc", "ce", 1.0)])
@pytest.mark.parametrize(
    "dataset, epochs, warmup, decays",
    [("cifar10", 1241, 20, (604, 926, 1128)), ("cifar100", 1419, 22, (691, 1059, 1290))],
)
def test_logit_adjustment_published_recipes(method, loss, posthoc, dataset, epochs, warmup, decays):
    """google-research logit_adjustment/utils.py dataset_mappings + main.py: batch 128, lr 0.1, Nesterov
    momentum 0.9, Keras L2 1e-4 (= wd 2e-4), linear warmup, ×0.1 / 0.01 / 0.001 at the listed epochs, τ = 1."""
    t, r = _published(dataset, method)
    assert (t["epochs"], t["batch_size"], t["lr"], t["momentum"], t["nesterov"], t["weight_decay"]) == (
        epochs,
        128,
        0.1,
        0.9,
        True,
        2e-4,
    )
    assert (t["schedule"], t["warmup_epochs"], t["warmup_per"], t["warmup_start"]) == ("step", warmup, "step", None)
    assert [round(f * epochs) for f in t["step_milestones"]] == list(decays)
    assert t["step_factors"] == [0.1, 0.01, 0.001]
    assert r["loss"]["name"] == loss and r["posthoc_tau"] == posthoc and r["augment"] == "crop_flip"
    assert loss == "ce" or r["loss"]["options"]["tau"] == 1.0
    assert "google-research/google-research logit_adjustment" in r["source"]


def test_nbn_published_recipe_is_imagenet_lt_only():
    """yuxiangbao/NBN config/ImageNet_LT/resnet50_nbn.yaml: CE, SGD lr 0.2, momentum 0.9, wd 5e-4, batch
    512, cosine over 90 epochs, no warmup; last-stage NBN with one α; plain Linear head (no rectification)."""
    t, r = _published("imagenet-lt", "nbn")
    assert (
        t["epochs"],
        t["batch_size"],
        t["lr"],
        t["momentum"],
        t["weight_decay"],
        t["schedule"],
        t["warmup_epochs"],
    ) == (90, 512, 0.2, 0.9, 5e-4, "cosine", 0)
    assert r["loss"]["name"] == "ce" and r["logit_rectification"] is False
    assert r["norm"] == methods.recipe("nbn")["norm"] and r["norm"]["scope"] == "last_stage"
    assert "yuxiangbao/NBN" in r["source"] and r["datasets"] == ["imagenet-lt"]
    with pytest.raises(ConfigError, match=r"'nbn@published' applies only to imagenet-lt .*not to 'cifar10'"):
        _published("cifar10", "nbn")
    with pytest.raises(ConfigError, match=r"'la@published' applies only to cifar10, cifar100"):
        _published("imagenet-lt", "la")


def test_recipe_dataset_train_overrides_the_recipe_train_for_its_dataset():
    cfg = config.validate(
        {
            "train": {"epochs": 7},
            "methods": {"m": {"train": {"lr": 0.3}, "dataset_train": {"cifar100": {"epochs": 9}}}},
            "experiments": {
                "e": {"datasets": ["cifar10", "cifar100"], "ratios": [100], "methods": ["m"], "backbones": ["resnet32"]}
            },
        }
    )
    assert config.cell_spec(cfg, "cifar100", "m", "resnet32")["train"]["epochs"] == 9
    assert config.cell_spec(cfg, "cifar10", "m", "resnet32")["train"]["epochs"] == 7
    assert config.cell_spec(cfg, "cifar100", "m", "resnet32")["train"]["lr"] == 0.3
    with pytest.raises(ConfigError, match="dataset_train"):
        config.validate(
            {
                "methods": {"m": {"dataset_train": {"cifar10": {"epochs": 0}}}},
                "experiments": {
                    "e": {"datasets": ["cifar10"], "ratios": [100], "methods": ["m"], "backbones": ["resnet32"]}
                },
            }
        )


def test_published_protocol_without_a_published_recipe_is_a_config_error():
    with pytest.raises(ConfigError, match=r"experiments\.e\.methods.*'baseline' has no published recipe"):
        _cfg("published", ["ce", "baseline"])


def test_runs_table_has_a_protocol_column(tmp_path):
    def metrics(method, protocol):
        return {
            "cell": {"dataset": "cifar10", "ratio": 100, "method": method, "backbone": "resnet32", "seed": 0},
            "top1": 50.0,
            "many": 60.0,
            "medium": 50.0,
            "few": 40.0,
            "per_class_acc": [50.0] * 2,
            "train_counts": [100, 1],
            "spec": {"recipe": {"protocol": protocol}},
            "_path": str(tmp_path / method),
        }

    runs, _ = aggregate.tables([metrics("ce", "controlled"), metrics("ce@published", "published")])
    assert dict(zip(runs.method, runs.protocol, strict=True)) == {"ce": "controlled", "ce@published": "published"}


def test_ldamdrw_reference_is_table2_as_accuracy():
    from ltbench.analysis.reference import entries

    e = entries("ldamdrw2019").set_index(["method", "dataset", "ratio"])["value"]
    errors = {
        ("ce@published", "cifar10", 100): 29.64,
        ("ce@published", "cifar10", 10): 13.61,
        ("ce@published", "cifar100", 100): 61.68,
        ("ce@published", "cifar100", 10): 44.30,
        ("ldam-drw@published", "cifar10", 100): 22.97,
        ("ldam-drw@published", "cifar10", 10): 11.84,
        ("ldam-drw@published", "cifar100", 100): 57.96,
        ("ldam-drw@published", "cifar100", 10): 41.29,
    }
    assert len(e) == len(errors)
    for key, err in errors.items():
        assert abs(e[key] - (100 - err)) < 1e-9, key
