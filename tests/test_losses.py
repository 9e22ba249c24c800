"""Every loss against a closed form written in numpy (float64) on small random inputs."""

import numpy as np
import pytest
import torch

from ltbench.nn import losses

COUNTS = np.array([500.0, 120.0, 40.0, 9.0, 2.0])
K, N = len(COUNTS), 32


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3.0, size=(N, K))
    y = rng.integers(0, K, size=N)
    y[:K] = np.arange(K)  # every class present
    return z, y


def np_ce(z, y):
    m = z.max(1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(1)) + m[:, 0]
    return lse - z[np.arange(len(y)), y]


def np_weights(n, kind, beta=0.9999):
    if kind == "none":
        return np.ones_like(n)
    w = (1 - beta) / (1 - beta**n) if kind == "cb" else 1.0 / n
    return w / w.sum() * len(n)


def np_reduce(per, y, n, kind):
    w = np_weights(n, kind)[y]
    return (w * per).sum() / w.sum()


def np_per_sample(name, z, y, n, opts):
    if name == "ce":
        return np_ce(z, y)
    if name == "focal":
        ce = np_ce(z, y)
        return (1 - np.exp(-ce)) ** opts.get("gamma", 1.0) * ce
    if name == "ldam":
        m = n**-0.25
        m = m * opts.get("max_m", 0.5) / m.max()
        zz = z.copy()
        zz[np.arange(len(y)), y] -= m[y]
        return np_ce(opts.get("s", 30.0) * zz, y)
    if name == "balanced_softmax":
        return np_ce(z + np.log(n), y)
    if name == "logit_adjust":
        return np_ce(z + opts.get("tau", 1.0) * np.log(n / n.sum()), y)
    raise KeyError(name)


def torch_call(loss, z, y, per_sample=False):
    zt, yt = torch.tensor(z, dtype=torch.float32), torch.tensor(y)
    out = loss.per_sample(zt, yt) if per_sample else loss(zt, yt)
    return out.double().numpy()


CASES = [
    ("ce", {}),
    ("focal", {}),
    ("focal", {"gamma": 2.0}),
    ("focal", {"gamma": 0.5}),
    ("ldam", {"drw": False}),
    ("ldam", {"drw": False, "max_m": 0.3, "s": 10.0}),
    ("balanced_softmax", {}),
    ("logit_adjust", {}),
    ("logit_adjust", {"tau": 0.5}),
]


def test_registry_names():
    assert set(losses.LOSSES) == {"ce", "focal", "ldam", "balanced_softmax", "logit_adjust"}


@pytest.mark.parametrize("kind", ["none", "cb", "inverse"])
def test_class_weights(kind):
    w = losses.class_weights(torch.tensor(COUNTS), kind)
    np.testing.assert_allclose(w.numpy(), np_weights(COUNTS, kind), rtol=1e-5)
    assert w.dtype == torch.float32 and abs(w.sum().item() - K) < 1e-4
    np.testing.assert_allclose(
        losses.class_weights(list(COUNTS), "cb", beta=0.9).numpy(), np_weights(COUNTS, "cb", beta=0.9), rtol=1e-5
    )


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("weighting", ["none", "cb", "inverse"])
def test_loss_matches_closed_form(batch, name, opts, weighting):
    z, y = batch
    loss = losses.make(name, COUNTS, weighting=weighting, **opts)
    ref = np_per_sample(name, z, y, COUNTS, opts)
    per = torch_call(loss, z, y, per_sample=True)
    assert per.shape == (N,)
    np.testing.assert_allclose(per, ref, rtol=1e-4, atol=1e-5)
    if name == "focal":  # LDAM-DRW's FocalLoss(weight=w): w_y inside the focal term, mean over N
        g = opts.get("gamma", 1.0)
        v = np_weights(COUNTS, weighting)[y] * np_ce(z, y)
        want = ((1 - np.exp(-v)) ** g * v).mean()
    else:
        want = np_reduce(ref, y, COUNTS, weighting)
    np.testing.assert_allclose(torch_call(loss, z, y), want, rtol=1e-4)


def test_cb_focal_is_normalized_by_batch_size_by_hand():
    """Two samples, two classes, hand-computed: LDAM-DRW's FocalLoss(weight=w, gamma=1) divides by N = 2,
    not by Σ w_y (which would give a loss (w_0 + w_1)/2 times smaller/larger)."""
    counts = [3.0, 1.0]  # inverse weights 1/3, 1 → normalized to sum K = 2: w = (0.5, 1.5)
    loss = losses.make("focal", counts, gamma=1.0, weighting="inverse")
    z = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # CE = log 2 for both
    y = torch.tensor([0, 0])  # two class-0 samples: Σ w_y = 1, N = 2
    v = 0.5 * np.log(2.0)
    by_hand = (1 - np.exp(-v)) * v  # both samples equal; mean over N
    assert abs(loss(z, y).item() - by_hand) < 1e-6
    assert abs(loss(z, y).item() - 2 * by_hand) > 1e-3  # Σ w_y normalization would double it


def test_special_cases_equal_ce(batch):
    z, y = batch
    ce = np_ce(z, y)
    for name, opts in (("focal", {"gamma": 0.0}), ("logit_adjust", {"tau": 0.0})):
        np.testing.assert_allclose(torch_call(losses.make(name, COUNTS, **opts), z, y, True), ce, rtol=1e-5, atol=1e-6)
    # τ = 1 logit adjustment is Balanced Softmax: log Σn cancels in the softmax
    np.testing.assert_allclose(
        torch_call(losses.make("logit_adjust", COUNTS), z, y, True), np_ce(z + np.log(COUNTS), y), rtol=1e-5, atol=1e-5
    )


def test_ldam_margins():
    loss = losses.make("ldam", COUNTS, max_m=0.5)
    m = COUNTS**-0.25
    np.testing.assert_allclose(loss.margins.numpy(), 0.5 * m / m.max(), rtol=1e-6)
    assert loss.margins.argmax().item() == K - 1 and abs(loss.margins.max().item() - 0.5) < 1e-7


@pytest.mark.parametrize("total", [200, 10, 7])
def test_ldam_drw_switch(batch, total):
    z, y = batch
    per = np_per_sample("ldam", z, y, COUNTS, {})
    switch = int(0.8 * total)
    loss = losses.make("ldam", COUNTS)
    np.testing.assert_allclose(torch_call(loss, z, y), per.mean(), rtol=1e-5)  # before any set_epoch
    for epoch, kind in ((0, "none"), (switch - 1, "none"), (switch, "cb"), (total - 1, "cb")):
        loss.set_epoch(epoch, total)
        np.testing.assert_allclose(torch_call(loss, z, y), np_reduce(per, y, COUNTS, kind), rtol=1e-5)
    # an explicit weighting replaces cb after the switch only; drw_epoch_fraction moves the switch
    loss = losses.make("ldam", COUNTS, weighting="inverse", drw_epoch_fraction=0.5)
    loss.set_epoch(int(0.5 * total) - 1, total)
    np.testing.assert_allclose(torch_call(loss, z, y), per.mean(), rtol=1e-5)
    loss.set_epoch(int(0.5 * total), total)
    np.testing.assert_allclose(torch_call(loss, z, y), np_reduce(per, y, COUNTS, "inverse"), rtol=1e-5)


def test_ldam_without_drw_ignores_schedule(batch):
    z, y = batch
    per = np_per_sample("ldam", z, y, COUNTS, {})
    for weighting, kind in ((None, "none"), ("cb", "cb")):
        opts = {} if weighting is None else {"weighting": weighting}
        loss = losses.make("ldam", COUNTS, drw=False, **opts)
        for epoch in (0, 199):
            loss.set_epoch(epoch, 200)
            np.testing.assert_allclose(torch_call(loss, z, y), np_reduce(per, y, COUNTS, kind), rtol=1e-5)


def test_ce_gradient_closed_form(batch):
    z, y = batch
    zt = torch.tensor(z, dtype=torch.float32, requires_grad=True)
    losses.make("balanced_softmax", COUNTS)(zt, torch.tensor(y)).backward()
    a = z + np.log(COUNTS)
    p = np.exp(a - a.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(N), y] -= 1
    np.testing.assert_allclose(zt.grad.double().numpy(), p / N, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,opts", CASES + [("focal", {"gamma": 0.0})])
def test_gradients_finite(batch, name, opts):
    z, y = batch
    for scale in (1.0, 100.0):  # confident logits: p_y → 1 for focal
        zt = torch.tensor(z * scale, dtype=torch.float32, requires_grad=True)
        loss = losses.make(name, COUNTS, weighting="cb", **opts)
        out = loss(zt, torch.tensor(y))
        out.backward()
        assert out.dim() == 0 and torch.isfinite(out) and torch.isfinite(zt.grad).all()
        assert zt.grad.abs().sum() > 0


def test_buffers_and_options():
    loss = losses.make("ldam", torch.tensor(COUNTS))
    assert {"class_weight", "margins", "counts"} <= dict(loss.named_buffers()).keys()
    with pytest.raises(TypeError, match="gama"):
        losses.make("focal", COUNTS, gama=2.0)
    with pytest.raises(TypeError, match="tau"):
        losses.make("ce", COUNTS, tau=1.0)
    with pytest.raises(ValueError, match="weighting"):
        losses.make("ce", COUNTS, weighting="sqrt")
    with pytest.raises(KeyError, match="balanced_softmax"):
        losses.make("nope", COUNTS)
