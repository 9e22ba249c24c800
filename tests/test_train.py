import json

import pytest
import torch

from ltbench import config, data, train

FAST = {"epochs": 12, "batch_size": 64, "lr": 0.1, "warmup_epochs": 1, "weight_decay": 5e-4, "device": "cpu"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    data.prepare("digits-lt", 10, d, d / "digits.npz")
    return d / "digits.npz"


def spec(method="ce", **train_overrides):
    c = config.validate({"train": {**FAST, **train_overrides}, "experiments": {
        "e": {"datasets": ["digits-lt"], "ratios": [10], "methods": [method], "backbones": ["resnet8"]}}})
    return config.cell_spec(c, "digits-lt", method, "resnet8")


def test_digits_lt_beats_chance_and_writes_metrics(prepared, tmp_path):
    m = train.run(spec(), 10, 0, prepared, tmp_path)
    assert m["top1"] > 50.0  # chance is 10%
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["top1"] == m["top1"]
    for key in ("many", "medium", "few", "per_class_acc", "train_counts", "seeds", "spec", "code",
                "environment", "device", "wall_time_s", "images_per_s"):
        assert key in on_disk, key
    assert on_disk["seeds"] == {"train": 0, "subset": 0}
    assert on_disk["train_counts"] == data.counts_for("digits-lt", 10)
    assert on_disk["device"] == "cpu"
    # top1 is the mean of per-class accuracies (the test set is balanced)
    assert abs(sum(on_disk["per_class_acc"]) / 10 - on_disk["top1"]) < 1e-9
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(lines) == FAST["epochs"] and json.loads(lines[-1])["top1"] == m["top1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "train.jsonl"]  # no temp files left


def test_same_cell_twice_is_identical_on_cpu(prepared, tmp_path):
    a = train.run(spec(epochs=3), 10, 1, prepared, tmp_path / "a")
    b = train.run(spec(epochs=3), 10, 1, prepared, tmp_path / "b")
    c = train.run(spec(epochs=3), 10, 2, prepared, tmp_path / "c")
    assert a["per_class_acc"] == b["per_class_acc"] and a["top1"] == b["top1"]
    la = [json.loads(x)["train_loss"] for x in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["train_loss"] for x in (tmp_path / "b" / "train.jsonl").read_text().splitlines()]
    lc = [json.loads(x)["train_loss"] for x in (tmp_path / "c" / "train.jsonl").read_text().splitlines()]
    assert la == lb and la != lc


def test_divergence_is_a_clear_error_and_writes_nothing(prepared, tmp_path):
    with pytest.raises(FloatingPointError, match="training loss became"):
        train.run(spec(epochs=2, lr=1e6, warmup_epochs=0), 10, 0, prepared, tmp_path)
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_lr_schedule_shapes(schedule):
    t = {"epochs": 10, "warmup_epochs": 2, "schedule": schedule, "step_milestones": [0.5, 0.8],
         "step_factors": [0.1, 0.01]}
    f = train.lr_lambda(t, steps_per_epoch=10)
    assert f(0) == pytest.approx(0.05) and f(19) == pytest.approx(1.0)  # linear warmup over 20 steps
    if schedule == "cosine":
        assert f(20) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(99) < 0.01
    elif schedule == "step":
        assert f(49) == 1.0 and f(50) == pytest.approx(0.1) and f(80) == pytest.approx(0.01)
    else:
        assert f(99) == 1.0


def test_train_command(prepared, tmp_path, cli):
    p = cli("train", "--dataset", "digits-lt", "--ratio", 10, "--backbone", "resnet8", "--epochs", 2,
            "--batch-size", 64, "--data", prepared, "--out", tmp_path / "cell", "--seed", 3)
    out = json.loads(p.stdout)
    assert set(out) >= {"top1", "many", "medium", "few"}
    assert "epoch 2/2" in p.stderr  # progress lines when not on a terminal
    m = json.loads((tmp_path / "cell" / "metrics.json").read_text())
    assert m["seeds"]["train"] == 3 and m["spec"]["train"]["epochs"] == 2
    bad = cli("train", "--dataset", "digits-lt", "--ratio", 10, "--method", "nope", "--out", tmp_path / "x",
              check=False)
    assert bad.returncode == 2 and "unknown method 'nope'" in bad.stderr
