import json
import signal

import pytest
import torch

from ltbench import data, malloc
from ltbench.errors import Preempted
from ltbench.nn import cbn_cpu, norm
from ltbench.spec import config, methods
from ltbench.training import trainer as train

FAST = {"epochs": 12, "batch_size": 64, "lr": 0.1, "warmup_epochs": 1, "weight_decay": 5e-4, "device": "cpu"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    data.prepare("digits-lt", 10, d, d / "digits.npz")
    return d / "digits.npz"


def spec(method="ce", recipe=None, **train_overrides):
    c = config.validate(
        {
            "train": {**FAST, **train_overrides},
            "methods": {method: recipe} if recipe else {},
            "experiments": {
                "e": {"datasets": ["digits-lt"], "ratios": [10], "methods": [method], "backbones": ["resnet8"]}
            },
        }
    )
    return config.cell_spec(c, "digits-lt", method, "resnet8")


def test_digits_lt_beats_chance_and_writes_metrics(prepared, tmp_path):
    m = train.run(spec(), 10, 0, prepared, tmp_path)
    assert m["top1"] > 50.0  # chance is 10%
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["top1"] == m["top1"]
    for key in (
        "many",
        "medium",
        "few",
        "per_class_acc",
        "train_counts",
        "seeds",
        "spec",
        "code",
        "environment",
        "device",
        "wall_time_s",
        "images_per_s",
    ):
        assert key in on_disk, key
    assert on_disk["seeds"] == {"train": 0, "subset": 0}
    assert on_disk["train_counts"] == data.counts_for("digits-lt", 10)
    assert on_disk["device"] == "cpu"
    # top1 is the mean of per-class accuracies (the test set is balanced)
    assert abs(sum(on_disk["per_class_acc"]) / 10 - on_disk["top1"]) < 1e-9
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(lines) == FAST["epochs"] and json.loads(lines[-1])["top1"] == m["top1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.json",
        "model.pt",
        "train.jsonl",
    ]  # no temp files left


def test_same_cell_twice_is_identical_on_cpu(prepared, tmp_path):
    a = train.run(spec(epochs=3), 10, 1, prepared, tmp_path / "a")
    b = train.run(spec(epochs=3), 10, 1, prepared, tmp_path / "b")
    train.run(spec(epochs=3), 10, 2, prepared, tmp_path / "c")
    assert a["per_class_acc"] == b["per_class_acc"] and a["top1"] == b["top1"]
    la = [json.loads(x)["train_loss"] for x in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["train_loss"] for x in (tmp_path / "b" / "train.jsonl").read_text().splitlines()]
    lc = [json.loads(x)["train_loss"] for x in (tmp_path / "c" / "train.jsonl").read_text().splitlines()]
    assert la == lb and la != lc


def test_divergence_is_a_clear_error_and_writes_nothing(prepared, tmp_path):
    with pytest.raises(FloatingPointError, match="training loss became"):
        train.run(spec(epochs=2, lr=1e6, warmup_epochs=0), 10, 0, prepared, tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_train_command(prepared, tmp_path, cli):
    p = cli(
        "train",
        "--dataset",
        "digits-lt",
        "--ratio",
        10,
        "--backbone",
        "resnet8",
        "--epochs",
        2,
        "--warmup-epochs",
        1,
        "--batch-size",
        64,
        "--data",
        prepared,
        "--out",
        tmp_path / "cell",
        "--seed",
        3,
    )
    out = json.loads(p.stdout)
    assert set(out) >= {"top1", "many", "medium", "few"}
    assert "epoch 2/2" in p.stderr  # progress lines when not on a terminal
    m = json.loads((tmp_path / "cell" / "metrics.json").read_text())
    assert m["seeds"]["train"] == 3 and m["spec"]["train"]["epochs"] == 2 and m["spec"]["train"]["warmup_epochs"] == 1
    # `python -m ltbench` ran with glibc's malloc keeping freed memory (ltbench/malloc.py), and says so
    if malloc.tuned_environ({}) is not None:
        assert malloc.TUNABLES in m["environment"]["glibc_tunables"]
    bad = cli(
        "train", "--dataset", "digits-lt", "--ratio", 10, "--method", "nope", "--out", tmp_path / "x", check=False
    )
    assert bad.returncode == 2 and "unknown method 'nope'" in bad.stderr


# ---- methods through the training loop ----


@pytest.mark.parametrize("method", methods.available())
def test_every_builtin_method_trains_and_records_its_recipe(prepared, tmp_path, method):
    staged = methods.recipe(method)["decoupled"]["enabled"]
    epochs = 15 if staged else 5  # a re-initialized classifier gets 3 epochs of its own
    # overrides: a published recipe's own epochs (200+), warmup (5), lr (0.1) and batch (128, 512: few steps an epoch
    # on digits-lt) give way to the test's
    only = {"datasets": None} if methods.recipe(method)["datasets"] else None  # e.g. nbn@published: imagenet-lt only
    if methods.recipe(method)["strong_view"]["cutout"]:  # Cutout's 16-px hole covers a whole 8 × 8 digit
        only = {**(only or {}), "strong_view": {**methods.recipe(method)["strong_view"], "cutout": False}}
    s = spec(method, only, checkpoint_every=0)
    m = train.run(
        s,
        10,
        0,
        prepared,
        tmp_path,
        overrides={"epochs": epochs, "warmup_epochs": 1, "lr": 0.05, "batch_size": min(64, s["train"]["batch_size"])},
    )
    assert m["top1"] > 20.0, m["top1"]  # chance is 10%
    r = m["spec"]["recipe"]
    assert r == {**methods.recipe(method), **(only or {})}  # every resolved knob, norm and loss defaults included
    rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    stages = [row["stage"] for row in rows]
    if r["decoupled"]["enabled"] and r["decoupled"]["classifier"] != "tau_norm":
        head = int(round(r["decoupled"]["fraction"] * epochs))  # 20% (3 of 15); published: 10 of 210 → 1 of 15
        assert head >= 1 and stages == ["representation"] * (epochs - head) + ["classifier"] * head
    else:
        assert set(stages) == {"representation"}
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    if r["norm"]["name"] == "cbn":
        assert any(k.endswith("running_prior") for k in state)
    # which code ran CBN's per-pixel path (C kernels or torch; none without such layers)
    o = r["norm"]["options"]
    per_pixel = (
        r["norm"]["name"] == "cbn"
        and o.get("num_components", 4) > 1
        and o.get("em", True)
        and o.get("responsibilities", "pixel") == "pixel"
    )
    assert m["environment"]["cbn_kernel"] == (cbn_cpu.describe() if per_pixel else None)


def test_split_path_uses_class_groups(prepared, tmp_path, monkeypatch):
    seen = []
    real = norm.split_mode

    def spy(model, groups):
        seen.append(groups.clone())
        return real(model, groups)

    monkeypatch.setattr(norm, "split_mode", spy)
    train.run(spec("baseline+cbn+sbn", epochs=1, warmup_epochs=0, checkpoint_every=0), 10, 0, prepared, tmp_path)
    assert seen and all(g.max() <= 3 and g.min() >= 0 for g in seen)  # M = 4 groups of the 10 classes
    assert set(torch.cat(seen).tolist()) == {0, 1, 2, 3}


def test_classifier_stage_backbone_mode(prepared, tmp_path):
    """backbone_mode eval: the final backbone is the representation stage's (equal to 4 epochs of ce);
    train (default): the same weights, BN running statistics re-estimated in the classifier stage."""
    ce = torch.load(_cell(spec("ce", epochs=4), prepared, tmp_path / "ce") / "model.pt", weights_only=True)
    got = {}
    for mode in ("eval", "train"):
        s = spec("crt", recipe={"decoupled": {"backbone_mode": mode}}, epochs=5, checkpoint_every=0)
        assert s["recipe"]["decoupled"]["backbone_mode"] == mode
        got[mode] = torch.load(_cell(s, prepared, tmp_path / mode) / "model.pt", weights_only=True)
    backbone = [k for k in ce if not k.startswith("fc.")]
    stats = [k for k in backbone if k.endswith(("running_mean", "running_var"))]
    assert all(torch.equal(ce[k], got["eval"][f"backbone.{k}"]) for k in backbone)
    assert all(
        torch.equal(ce[k], got["train"][f"backbone.{k}"])
        for k in backbone
        if k not in stats and not k.endswith("num_batches_tracked")
    )
    assert all(not torch.equal(ce[k], got["train"][f"backbone.{k}"]) for k in stats)


def _cell(s, prepared, out):
    train.run(s, 10, 0, prepared, out)
    return out


class _SignalAfter(train._Signals):
    """Pretends SIGUSR1 arrived after ``n`` training steps."""

    n = 7

    def __enter__(self):
        self._count = 0
        return self

    def __exit__(self, *exc):
        pass

    @property
    def caught(self):
        self._count += 1
        return signal.SIGUSR1 if self._count >= self.n else None

    @caught.setter
    def caught(self, value):
        pass


@pytest.mark.parametrize("method", ["baseline+cbn+sbn+dpl", "nbn", "lws"])
def test_preempted_run_resumes_bit_identically(prepared, tmp_path, monkeypatch, method):
    s = spec(method, epochs=5, checkpoint_every=2)
    ref = train.run(s, 10, 0, prepared, tmp_path / "ref")
    monkeypatch.setattr(train, "_Signals", _SignalAfter)
    for n in (7, 28):  # 8 steps per epoch: inside epoch 1, then at step 35 (the classifier stage for lws)
        _SignalAfter.n = n
        with pytest.raises(Preempted):
            train.run(s, 10, 0, prepared, tmp_path / "cut")
        assert (tmp_path / "cut" / "checkpoint.pt").exists() and not (tmp_path / "cut" / "metrics.json").exists()
    monkeypatch.setattr(train, "_Signals", _SignalAfter.__mro__[1])
    got = train.run(s, 10, 0, prepared, tmp_path / "cut")
    assert got["per_class_acc"] == ref["per_class_acc"]
    assert (tmp_path / "cut" / "train.jsonl").read_text().count("\n") == 5
    assert got["wall_time_s"] >= got["train_time_s"] > 0  # both sum the three processes' parts
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_balanced_softmax_improves_few_shot_accuracy_over_cross_entropy(prepared, tmp_path):
    few = {
        m: [
            train.run(spec(m, epochs=20, checkpoint_every=0), 10, s, prepared, tmp_path / f"{m}{s}")["few"]
            for s in (0, 1, 2)
        ]
        for m in ("ce", "balanced-softmax")
    }
    assert sum(few["balanced-softmax"]) / 3 > sum(few["ce"]) / 3 + 2.0, few
