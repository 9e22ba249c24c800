"""One training step (ltbench.training.step): the views × paths it computes and its loss, the one
definition the trainer, `ltbench bench` and `ltbench plan` share."""

import pytest
import torch

from ltbench.nn import backbones as models
from ltbench.nn import losses
from ltbench.spec import methods
from ltbench.training import step


def test_step_logits_and_passes():
    assert methods.step_logits(methods.recipe("ce")) == ["compound/weak"]
    assert methods.step_logits(methods.recipe("baseline+cbn+sbn")) == ["compound/strong", "split/strong"]
    assert methods.step_logits(methods.recipe("baseline+cbn+sbn+dpl")) == [
        "compound/weak",
        "compound/strong",
        "split/weak",
        "split/strong",
    ]  # DPL: every pair for Eq. 19
    assert [methods.passes(methods.recipe(m)) for m in ("ce", "baseline+cbn+sbn", "baseline+cbn+sbn+dpl")] == [1, 2, 4]


def test_paths_forward_computes_exactly_the_step_logits():
    recipe = methods.recipe("baseline+cbn+sbn+dpl")
    calls = []
    model = models.build("resnet8", 10, 3)
    model.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(4, 3, 8, 8)
    out = step.PathsForward(model, recipe, amp=False)({"weak": x, "strong": x + 1}, torch.zeros(4, dtype=torch.long))
    assert list(out) == methods.step_logits(recipe) and len(calls) == 4


def test_step_loss_is_the_mean_classification_loss_plus_the_weighted_consistency():
    torch.manual_seed(0)
    recipe = methods.merge(methods.recipe("baseline+cbn+sbn+dpl"), {"consistency": {"weight": 0.5}})
    z = {k: torch.randn(6, 10) for k in methods.step_logits(recipe)}
    y = torch.randint(0, 10, (6,))
    crit = losses.make("balanced_softmax", torch.arange(1.0, 11.0))
    loss, acc_logits = step.step_loss(recipe, crit, z, y)
    expect = (crit(z["compound/strong"], y) + crit(z["split/strong"], y)) / 2 + 0.5 * step.consistency_loss(z, "cross")
    assert loss.item() == pytest.approx(expect.item()) and acc_logits is z["compound/strong"]


def test_consistency_loss_stops_gradients_at_the_weak_view():
    torch.manual_seed(0)
    z = {
        k: torch.randn(6, 4, requires_grad=True)
        for k in ("compound/weak", "compound/strong", "split/weak", "split/strong")
    }
    loss = step.consistency_loss(z, "cross")
    loss.backward()
    assert z["compound/weak"].grad is None or not z["compound/weak"].grad.any()
    assert z["split/weak"].grad is None or not z["split/weak"].grad.any()
    assert z["compound/strong"].grad.abs().sum() > 0 and z["split/strong"].grad.abs().sum() > 0
    # closed form: −½[cos(c_s, s_w) + cos(s_s, c_w)]
    cos = torch.nn.functional.cosine_similarity
    expect = -0.5 * (
        cos(z["compound/strong"], z["split/weak"]).mean() + cos(z["split/strong"], z["compound/weak"]).mean()
    )
    assert loss.item() == pytest.approx(expect.item())
