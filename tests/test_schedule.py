"""The learning-rate schedule (ltbench.training.schedule): warmup per step or per epoch, then the schedule."""

import pytest

from ltbench.spec import config
from ltbench.training.schedule import lr_lambda

T = {"epochs": 10, "warmup_epochs": 2, "warmup_per": "step", "step_milestones": [0.5, 0.8], "step_factors": [0.1, 0.01]}


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_lr_schedule_shapes(schedule):
    f = lr_lambda({**T, "schedule": schedule}, steps_per_epoch=10)
    assert f(0) == pytest.approx(0.05) and f(19) == pytest.approx(1.0)  # linear warmup over 20 steps
    if schedule == "cosine":
        assert f(20) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(99) < 0.01
    elif schedule == "step":
        assert f(49) == 1.0 and f(50) == pytest.approx(0.1) and f(80) == pytest.approx(0.01)
    else:
        assert f(99) == 1.0


def test_warmup_per_epoch_ramps_once_per_epoch_as_ldam_drw():
    """LDAM-DRW: lr × (e+1)/5 in epochs e = 0..4, constant within an epoch, then the step schedule."""
    t = {
        **T,
        "epochs": 200,
        "warmup_epochs": 5,
        "warmup_per": "epoch",
        "schedule": "step",
        "step_milestones": [0.8, 0.9],
        "step_factors": [0.01, 0.0001],
    }
    f = lr_lambda(t, steps_per_epoch=7)
    for e in range(5):
        assert [f(e * 7 + i) for i in range(7)] == [pytest.approx((e + 1) / 5)] * 7
    assert f(5 * 7) == 1.0 and f(160 * 7 - 1) == 1.0 and f(160 * 7) == pytest.approx(0.01)
    assert f(180 * 7) == pytest.approx(0.0001)
    # a fractional warmup never ramps above 1
    g = lr_lambda({**t, "warmup_epochs": 2.5}, steps_per_epoch=4)
    assert [g(s) for s in (0, 4, 8, 9)] == [pytest.approx(0.4), pytest.approx(0.8), 1.0, 1.0]


def test_warmup_per_is_a_config_knob_defaulting_to_step():
    base = {
        "experiments": {"e": {"datasets": ["digits-lt"], "ratios": [10], "methods": ["ce"], "backbones": ["resnet8"]}}
    }
    assert config.validate(base)["train"]["warmup_per"] == "step"
    assert config.validate({**base, "train": {"warmup_per": "epoch"}})["train"]["warmup_per"] == "epoch"
    with pytest.raises(Exception, match="warmup_per"):
        config.validate({**base, "train": {"warmup_per": "batch"}})


def test_warmup_start_ramps_from_a_fraction_of_the_peak_as_balanced_softmax():
    """Balanced Softmax's CosineAnnealingLRWarmup: 0.05 → 0.1 in epochs 1…W−1, the peak at epoch W, then
    cosine. warmup_start 0.5 over warmup_epochs W − 1: 0.5 + 0.5·e/(W − 1) in epoch e, 1 after the warmup."""
    t = {**T, "epochs": 20, "warmup_epochs": 4, "warmup_per": "epoch", "schedule": "cosine", "warmup_start": 0.5}
    f = lr_lambda(t, steps_per_epoch=3)
    for e in range(4):
        assert [f(e * 3 + i) for i in range(3)] == [pytest.approx(0.5 + 0.5 * e / 4)] * 3
    assert f(4 * 3) == pytest.approx(1.0) and f(20 * 3 - 1) < 0.01
    s = lr_lambda({**t, "warmup_per": "step"}, steps_per_epoch=3)  # per step: 0.5 + 0.5·k/12
    assert [s(k) for k in (0, 6, 11, 12)] == [
        pytest.approx(0.5),
        pytest.approx(0.75),
        pytest.approx(0.5 + 0.5 * 11 / 12),
        1.0,
    ]
    # null (the default) keeps the ramp that reaches the peak inside the warmup
    assert lr_lambda({**t, "warmup_start": None}, steps_per_epoch=3)(0) == pytest.approx(0.25)


def test_warmup_start_is_a_config_knob_defaulting_to_null():
    base = {
        "experiments": {"e": {"datasets": ["digits-lt"], "ratios": [10], "methods": ["ce"], "backbones": ["resnet8"]}}
    }
    assert config.validate(base)["train"]["warmup_start"] is None
    with pytest.raises(Exception, match="warmup_start"):
        config.validate({**base, "train": {"warmup_start": 1.5}})
