"""Norm layers (ltbench.nn.norm) against independent references.

CBN with M = 1 against ``nn.BatchNorm2d``; CBN's EM against scikit-learn's ``GaussianMixture``;
CBN's forward against a direct per-component implementation of Eq. 7–16; the split path
against per-group ``nn.BatchNorm2d`` and a numpy hand computation; NBN against
``nn.BatchNorm2d`` with hand-computed affine parameters.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ltbench.nn import backbones as models
from ltbench.nn import norm
from ltbench.nn.norm import CompoundBatchNorm2d, NormalizedBatchNorm2d

EPS = 1e-5


def close(a, b, atol=1e-5, rtol=1e-4):
    a = a.detach().double() if torch.is_tensor(a) else torch.as_tensor(a, dtype=torch.float64)
    b = b.detach().double() if torch.is_tensor(b) else torch.as_tensor(b, dtype=torch.float64)
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def set_mixture(layer: CompoundBatchNorm2d, prior, mean, var) -> None:
    """Write the running mixture directly and mark it initialized."""
    with torch.no_grad():
        layer.running_prior.copy_(torch.as_tensor(prior, dtype=torch.float32))
        layer.running_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        layer.running_var.copy_(torch.as_tensor(var, dtype=torch.float32))
        layer.initialized.fill_(True)


def randomize_affine(layer: nn.Module) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight))
        layer.bias.copy_(torch.randn_like(layer.bias))


# ---------------------------------------------------------------------------------------------
# CBN, M = 1 == BatchNorm2d
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("responsibilities", ["pixel", "sample"])
def test_cbn_one_component_is_batchnorm(responsibilities):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5)
    cbn = norm.make("cbn", 5, num_components=1, responsibilities=responsibilities)
    randomize_affine(bn)
    with torch.no_grad():
        cbn.weight.copy_(bn.weight[None])
        cbn.bias.copy_(bn.bias[None])
    for _ in range(3):
        x = torch.randn(6, 5, 4, 3) * 3 + 2
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = bn(xa), cbn(xb)
        g = torch.randn_like(ya)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        close(yb, ya)
        close(xb.grad, xa.grad)
        close(cbn.weight.grad[0], bn.weight.grad, atol=1e-4)
        close(cbn.bias.grad[0], bn.bias.grad, atol=1e-4)
        bn.zero_grad()
        cbn.zero_grad()
    close(cbn.running_mean[0], bn.running_mean)
    close(cbn.running_var[0], bn.running_var)
    bn.eval()
    cbn.eval()
    x = torch.randn(2, 5, 4, 3)
    close(cbn(x), bn(x))


# ---------------------------------------------------------------------------------------------
# CBN EM == scikit-learn GaussianMixture(covariance_type="diag")
# ---------------------------------------------------------------------------------------------


def mixture_data(seed: int, sizes=(300, 200, 100), dim=4, spread=6.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, spread, size=(len(sizes), dim))
    scales = rng.uniform(0.5, 2.0, size=(len(sizes), dim))
    X = np.concatenate([c + s * rng.normal(size=(n, dim)) for c, s, n in zip(centers, scales, sizes, strict=True)])
    return X[rng.permutation(len(X))]


def test_cbn_em_matches_sklearn_gaussian_mixture():
    """All momenta 1 and the whole data set each step: the moving-average EM is batch EM.

    sklearn's M-step stores the biased variance + reg_covar and its E-step uses it; CBN stores the
    running variance and its E-step uses running_var + eps. With reg_covar = eps the two E-steps
    see the same variances, and CBN's running_var must equal covariances_ − reg_covar. The unbiased
    correction is switched off (unbiased_var=False) rather than undone afterwards: the corrected
    variance would feed the next E-step, so the iterates themselves would differ from batch EM.
    """
    from sklearn.mixture import GaussianMixture

    torch.manual_seed(0)
    X = mixture_data(0)
    M, C = 3, X.shape[1]
    rng = np.random.default_rng(1)
    mean0 = X[rng.choice(len(X), M, replace=False)] + rng.normal(0, 0.5, size=(M, C))
    var0 = np.full((M, C), 4.0)
    prior0 = np.full(M, 1.0 / M)
    iters = 6

    gmm = GaussianMixture(
        M,
        covariance_type="diag",
        weights_init=prior0,
        means_init=mean0,
        precisions_init=1.0 / (var0 + EPS),
        reg_covar=EPS,
        max_iter=iters,
        tol=0.0,
        init_params="random",
        random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not converged after `iters` steps, on purpose
        gmm.fit(X)

    layer = CompoundBatchNorm2d(
        C, num_components=M, prior_momentum=1.0, mean_momentum=1.0, var_momentum=1.0, unbiased_var=False
    )
    set_mixture(layer, prior0, mean0, var0)
    x = torch.tensor(X, dtype=torch.float32)[:, :, None, None]
    for step in range(iters):
        layer(x)
        if step == 0:
            first_means = layer.running_mean.clone()
    assert (layer.running_mean - first_means).abs().max() > 1e-2  # EM still moving: not a fixed point
    close(layer.running_mean, gmm.means_, atol=1e-4)
    close(layer.running_var, gmm.covariances_ - EPS, atol=1e-4)
    close(layer.running_prior, gmm.weights_, atol=1e-5)


def test_cbn_eval_responsibilities_match_predict_proba():
    """Eval output with γ_k = 0 and β_k = e_k is Σ_k r_ik e_k: channel k carries r_ik."""
    from sklearn.mixture import GaussianMixture

    torch.manual_seed(0)
    X = mixture_data(2, sizes=(150, 100, 50), spread=1.5)  # overlapping: soft responsibilities
    M, C = 3, X.shape[1]
    gmm = GaussianMixture(M, covariance_type="diag", reg_covar=EPS, random_state=0).fit(X)
    proba = gmm.predict_proba(X)
    assert ((proba > 0.05) & (proba < 0.95)).any()

    layer = CompoundBatchNorm2d(C, num_components=M).eval()
    set_mixture(layer, gmm.weights_, gmm.means_, gmm.covariances_ - EPS)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.eye(M, C))
    x = torch.tensor(X, dtype=torch.float32)[:, :, None, None]
    y = layer(x)[:, :, 0, 0]
    close(y[:, :M], proba, atol=1e-5)
    close(y[:, M:], torch.zeros(len(X), C - M))
    close(layer.responsibilities(x)[:, :, 0, 0], proba, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# CBN, M > 1: a direct implementation of Eq. 7–16 (one P×M×C tensor, torch.distributions)
# ---------------------------------------------------------------------------------------------


def reference_cbn(x, prior, mean, var, weight, bias, responsibilities, train_stats, detach, training):
    """Direct Eq. 7–16 on points (P, C); returns (y, prior_new, mean_new, var_new) with momenta 0.1."""
    N, C, H, W = x.shape
    pts = x.permute(0, 2, 3, 1).reshape(-1, C)  # (P, C), sample-major
    e_pts = pts if responsibilities == "pixel" else x.mean((2, 3))
    dens = torch.distributions.Normal(mean, (var + EPS).sqrt())  # batch (M, C)
    logp = dens.log_prob(e_pts[:, None, :]).sum(-1) + prior.log()
    r = torch.softmax(logp, dim=1)  # (P or N, M)
    if responsibilities == "sample":
        r = r.repeat_interleave(H * W, dim=0)
    if detach:
        r = r.detach()
    nk = r.sum(0)
    mu = (r[:, :, None] * pts[:, None, :]).sum(0) / nk[:, None]
    sig = (r[:, :, None] * (pts[:, None, :] - mu) ** 2).sum(0) / nk[:, None]
    if training and train_stats == "batch":
        m_use, v_use = mu, sig
    else:
        m_use, v_use = mean, var
    xhat = (pts[:, None, :] - m_use) / (v_use + EPS).sqrt()  # (P, M, C)
    y = (r[:, :, None] * (weight * xhat + bias)).sum(1)
    y = y.reshape(N, H, W, C).permute(0, 3, 1, 2)
    new_prior = 0.9 * prior + 0.1 * nk / len(pts)
    new_mean = 0.9 * mean + 0.1 * mu.detach()
    new_var = 0.9 * var + 0.1 * sig.detach() * nk[:, None] / (nk[:, None] - 1)
    return y, new_prior, new_mean, new_var


@pytest.mark.parametrize(
    "responsibilities,train_stats,detach",
    [
        ("pixel", "batch", False),
        ("pixel", "batch", True),
        ("sample", "batch", False),
        ("pixel", "running", False),
    ],
)
def test_cbn_compound_matches_direct_equations(responsibilities, train_stats, detach):
    torch.manual_seed(0)
    M, C = 3, 4
    layer = CompoundBatchNorm2d(
        C, num_components=M, responsibilities=responsibilities, train_stats=train_stats, detach_responsibilities=detach
    )
    prior = torch.tensor([0.5, 0.3, 0.2])
    mean = torch.randn(M, C)
    var = torch.rand(M, C) + 0.5
    set_mixture(layer, prior, mean, var)
    randomize_affine(layer)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    x = (torch.randn(5, C, 3, 3) * 1.5).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()

    y = layer(x)
    y_ref, p_ref, m_ref, v_ref = reference_cbn(
        x_ref, prior, mean, var, weight, bias, responsibilities, train_stats, detach, training=True
    )
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    close(y, y_ref)
    close(x.grad, x_ref.grad, atol=1e-4)
    close(layer.weight.grad, weight.grad, atol=1e-4)
    close(layer.bias.grad, bias.grad, atol=1e-4)
    close(layer.running_prior, p_ref)
    close(layer.running_mean, m_ref)
    close(layer.running_var, v_ref)

    layer.eval()
    x2 = torch.randn(3, C, 2, 2)
    y_eval, *_ = reference_cbn(
        x2, p_ref, m_ref, v_ref, weight, bias, responsibilities, train_stats, detach, training=False
    )
    close(layer(x2), y_eval)


def test_detach_responsibilities_changes_the_gradient():
    torch.manual_seed(0)
    grads = []
    for detach in (False, True):
        layer = CompoundBatchNorm2d(4, num_components=3, detach_responsibilities=detach)
        set_mixture(layer, [0.4, 0.3, 0.3], torch.randn(3, 4), torch.ones(3, 4))
        x = torch.randn(4, 4, 3, 3, requires_grad=True)
        (layer(x) * torch.linspace(-1, 1, 4 * 4 * 9).reshape(4, 4, 3, 3)).sum().backward()
        grads.append(x.grad)
        torch.manual_seed(0)
    assert (grads[0] - grads[1]).abs().max() > 1e-4


def test_component_without_mass_keeps_running_statistics():
    """A component far from every point gets r = 0: its running mean and variance stay put."""
    torch.manual_seed(0)
    layer = CompoundBatchNorm2d(3, num_components=3)
    mean0 = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1e3, 1e3, 1e3]])
    set_mixture(layer, [0.4, 0.4, 0.2], mean0, torch.ones(3, 3))
    x = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    close(layer.running_mean[2], mean0[2], atol=0, rtol=0)
    close(layer.running_var[2], torch.ones(3), atol=0, rtol=0)
    close(layer.running_prior[2], 0.9 * 0.2)  # its prior decays: π̃ = 0
    assert (layer.running_mean[:2] - mean0[:2]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# CBN initialization
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("responsibilities", ["pixel", "sample"])
def test_first_batch_init_uses_distinct_batch_points(responsibilities):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2)
    layer = CompoundBatchNorm2d(
        3, num_components=4, responsibilities=responsibilities, prior_momentum=0.0, mean_momentum=0.0, var_momentum=0.0
    )
    assert not bool(layer.initialized)
    layer(x)  # momenta 0: the buffers keep their initial values
    points = x.permute(0, 2, 3, 1).reshape(-1, 3) if responsibilities == "pixel" else x.mean((2, 3))
    dist = torch.cdist(layer.running_mean, points)
    assert (dist.min(1).values < 1e-6).all()  # each mean is a batch point
    assert len(set(dist.argmin(1).tolist())) == 4  # four different points
    close(layer.running_var, x.var(dim=(0, 2, 3), unbiased=False).expand(4, 3))
    close(layer.running_prior, torch.full((4,), 0.25))
    assert bool(layer.initialized)
    first = layer.running_mean.clone()
    layer(x + 5)  # no second initialization
    close(layer.running_mean, first)


def test_random_init_and_single_component_init():
    torch.manual_seed(3)
    a = CompoundBatchNorm2d(512, num_components=4, init="random", init_std=0.1)
    torch.manual_seed(3)
    b = CompoundBatchNorm2d(512, num_components=4, init="random", init_std=0.1)
    close(a.running_mean, b.running_mean, atol=0, rtol=0)
    assert 0.09 < a.running_mean.std().item() < 0.11 and abs(a.running_mean.mean().item()) < 0.01
    close(a.running_var, torch.ones(4, 512))
    assert bool(a.initialized)
    one = CompoundBatchNorm2d(8, num_components=1, init="random")  # nothing to break: BatchNorm's 0 / 1
    close(one.running_mean, torch.zeros(1, 8))


# ---------------------------------------------------------------------------------------------
# SBN (split mode)
# ---------------------------------------------------------------------------------------------


def test_split_mode_group_statistics():
    torch.manual_seed(0)
    M, C = 3, 4
    layer = CompoundBatchNorm2d(C, num_components=M)
    randomize_affine(layer)
    mean0, var0, prior0 = torch.randn(M, C), torch.rand(M, C) + 0.5, torch.tensor([0.2, 0.3, 0.5])
    set_mixture(layer, prior0, mean0, var0)
    groups = torch.tensor([0, 2, 0, 2, 2, 0, 2])  # group 1 has no samples
    x = (torch.randn(7, C, 3, 2) * 2 + 1).requires_grad_()
    model = nn.Sequential(layer)
    with norm.split_mode(model, groups):
        y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()

    # numpy hand computation of the outputs and running statistics
    xn, yn, gn = x.detach().numpy().astype(np.float64), y.detach().numpy(), groups.numpy()
    w, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    for k in (0, 2):
        xs = xn[gn == k]
        mu, var = xs.mean((0, 2, 3)), xs.var((0, 2, 3))
        expect = (
            w[k][:, None, None] * (xs - mu[:, None, None]) / np.sqrt(var + EPS)[:, None, None] + b[k][:, None, None]
        )
        np.testing.assert_allclose(yn[gn == k], expect, atol=1e-5, rtol=1e-4)
        n = xs.shape[0] * xs.shape[2] * xs.shape[3]
        np.testing.assert_allclose(layer.running_mean[k].numpy(), 0.9 * mean0[k].numpy() + 0.1 * mu, atol=1e-6)
        np.testing.assert_allclose(
            layer.running_var[k].numpy(), 0.9 * var0[k].numpy() + 0.1 * var * n / (n - 1), atol=1e-6
        )
    close(layer.running_mean[1], mean0[1], atol=0, rtol=0)  # empty group untouched
    close(layer.running_var[1], var0[1], atol=0, rtol=0)
    close(layer.running_prior, prior0, atol=0, rtol=0)  # split mode never updates the prior

    # gradients: per group, a BatchNorm2d with γ_k, β_k on that group's samples
    for k in (0, 2):
        bn = nn.BatchNorm2d(C)
        with torch.no_grad():
            bn.weight.copy_(layer.weight[k])
            bn.bias.copy_(layer.bias[k])
        xs = x.detach()[groups == k].clone().requires_grad_()
        (bn(xs) * g[groups == k]).sum().backward()
        close(x.grad[groups == k], xs.grad, atol=1e-4)
        close(layer.weight.grad[k], bn.weight.grad, atol=1e-4)
        close(layer.bias.grad[k], bn.bias.grad, atol=1e-4)
    close(layer.weight.grad[1], torch.zeros(C))


def test_split_mode_ignored_in_eval_and_restored_after_exception():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm2d(4), CompoundBatchNorm2d(4, num_components=2), CompoundBatchNorm2d(4, num_components=2)
    )
    x = torch.randn(6, 4, 3, 3)
    groups = torch.tensor([0, 1, 0, 1, 1, 0])
    model(x)  # initialize
    model.eval()
    plain = model(x)
    with norm.split_mode(model, groups):
        assert all(m.split_groups is groups for m in model[1:])
        close(model(x), plain, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="boom"), norm.split_mode(model, groups):
        raise RuntimeError("boom")
    assert all(m.split_groups is None for m in model[1:])
    assert not hasattr(model[0], "split_groups")  # plain BN untouched

    # in training the split path differs from the compound path, and only inside the context
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with norm.split_mode(model, groups):
        split = model(x)
    model.load_state_dict(state)
    compound = model(x)
    assert (split - compound).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"\[0, 2\)"), norm.split_mode(model, torch.tensor([0, 1, 2, 0, 0, 0])):
        pass


def test_class_groups_uniform_by_index():
    assert norm.class_groups(10, 4).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    g = norm.class_groups(100, 3)
    assert g.dtype == torch.long
    assert g.tolist() == [c * 3 // 100 for c in range(100)]
    assert norm.class_groups(10, 1).tolist() == [0] * 10


# ---------------------------------------------------------------------------------------------
# CBN em=False ("Baseline + SBN")
# ---------------------------------------------------------------------------------------------


def test_cbn_without_em_compound_path_is_batchnorm():
    torch.manual_seed(0)
    layer = CompoundBatchNorm2d(4, num_components=3, em=False)
    bn = nn.BatchNorm2d(4)
    randomize_affine(bn)
    with torch.no_grad():
        layer.global_weight.copy_(bn.weight)
        layer.global_bias.copy_(bn.bias)
    comp_mean = layer.running_mean.clone()
    for _ in range(3):
        x = torch.randn(5, 4, 3, 3) * 2 - 1
        close(layer(x), bn(x))
    close(layer.global_running_mean, bn.running_mean)
    close(layer.global_running_var, bn.running_var)
    close(layer.running_mean, comp_mean, atol=0, rtol=0)  # components only move in split mode
    with norm.split_mode(layer, torch.tensor([0, 0, 2, 2, 2])):
        layer(x)
    assert (layer.running_mean[0] - comp_mean[0]).abs().max() > 1e-4
    close(layer.running_mean[1], comp_mean[1], atol=0, rtol=0)
    layer.eval()
    bn.eval()
    close(layer(x), bn(x))


# ---------------------------------------------------------------------------------------------
# NBN
# ---------------------------------------------------------------------------------------------


def test_nbn_is_batchnorm_with_normalized_affine():
    torch.manual_seed(0)
    layer = norm.make("nbn", 6)
    randomize_affine(layer)
    with torch.no_grad():
        layer.alpha.fill_(-2.5)
    gamma, beta = layer.weight.detach().numpy().astype(np.float64), layer.bias.detach().numpy().astype(np.float64)
    w = -2.5 * gamma / (np.linalg.norm(gamma) + 1e-6)
    b = -2.5 * beta / (np.linalg.norm(beta) + 1e-6)
    ew, eb = layer.effective_affine()
    close(torch.linalg.vector_norm(ew), 2.5)
    close(torch.linalg.vector_norm(eb), 2.5)
    close(ew, w)
    close(eb, b)

    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(w))
        bn.bias.copy_(torch.tensor(b))
    for _ in range(2):
        x = torch.randn(4, 6, 3, 3) * 2 + 1
        close(layer(x), bn(x))
    close(layer.running_mean, bn.running_mean)
    close(layer.running_var, bn.running_var)
    layer.eval()
    bn.eval()
    close(layer(x), bn(x))


def test_nbn_alpha_gradient():
    torch.manual_seed(0)
    layer = norm.make("nbn", 3, alpha="separate")
    randomize_affine(layer)
    x = torch.randn(4, 3, 2, 2)
    layer(x).sum().backward()
    # d/dα_b Σ y = Σ_points b̂ = N·H·W · Σ_c β_c/‖β‖ ; α_w's gradient is Σ x̂·ŵ = 0 for a sum loss
    beta = layer.bias.detach()
    close(layer.alpha_bias.grad, 16 * (beta / (beta.norm() + 1e-6)).sum(), atol=1e-4)
    close(layer.alpha.grad, 0.0, atol=1e-4)


@pytest.mark.parametrize("backbone,blocks", [("resnet8", 1), ("resnet32", 5)])
def test_nbn_last_stage_shared_alpha(backbone, blocks):
    torch.manual_seed(0)
    model = models.build(backbone, 10)
    n_before = sum(p.numel() for p in model.parameters())
    norm.apply(model, "nbn", scope="last_stage")
    replaced = {name for name, m in model.named_modules() if isinstance(m, NormalizedBatchNorm2d)}
    assert replaced == {f"layer3.{i}.bn2" for i in range(blocks)}
    alphas = {id(m.alpha) for m in model.modules() if isinstance(m, NormalizedBatchNorm2d)}
    assert len(alphas) == 1
    assert sum(p.numel() for p in model.parameters()) == n_before + 1
    assert all(type(m) is nn.BatchNorm2d for name, m in model.named_modules() if "bn" in name and name not in replaced)
    out = model(torch.randn(2, 3, 8, 8))
    out.sum().backward()
    assert out.shape == (2, 10)


def test_last_stage_scopes_on_torchvision_resnets():
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    bottle = ResNet(Bottleneck, [1, 1, 1, 2])
    norm.apply(bottle, "nbn", scope="last_stage", alpha="per_layer")
    replaced = {n for n, m in bottle.named_modules() if isinstance(m, NormalizedBatchNorm2d)}
    assert replaced == {"layer4.0.bn3", "layer4.0.downsample.1", "layer4.1.bn3"}
    assert len({id(m.alpha) for n, m in bottle.named_modules() if n in replaced}) == 3

    basic = ResNet(BasicBlock, [1, 1, 1, 1])
    norm.apply(basic, "cbn", scope="last_stage_all", num_components=2)
    replaced = {n for n, m in basic.named_modules() if isinstance(m, CompoundBatchNorm2d)}
    assert replaced == {"layer4.0.bn1", "layer4.0.bn2", "layer4.0.downsample.1"}


def test_cifar_all_and_last_stage_all_scopes():
    model = norm.apply(models.build("resnet8", 10), "cbn", scope="last_stage_all", num_components=2)
    assert {n for n, m in model.named_modules() if isinstance(m, CompoundBatchNorm2d)} == {
        "layer3.0.bn1",
        "layer3.0.bn2",
    }
    model = norm.apply(models.build("resnet8", 10), "cbn", num_components=2)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert sum(isinstance(m, CompoundBatchNorm2d) for m in model.modules()) == 7


def test_nbn_alpha_modes_and_param_groups():
    torch.manual_seed(0)
    model = norm.apply(models.build("resnet32", 10), "nbn", scope="last_stage", alpha="separate")
    layers = [m for m in model.modules() if isinstance(m, NormalizedBatchNorm2d)]
    alphas = [p for m in layers for p in (m.alpha, m.alpha_bias)]
    assert len({id(p) for p in alphas}) == 2 * len(layers) == 10

    model = norm.apply(models.build("resnet32", 10), "nbn", scope="last_stage", alpha_weight_decay=False)
    shared = next(m for m in model.modules() if isinstance(m, NormalizedBatchNorm2d)).alpha
    for flag in (False, None):  # explicit, or each layer's own flag (set to False above)
        groups = norm.param_groups(model, 5e-4, alpha_weight_decay=flag)
        ids = [id(p) for g in groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
        assert len(ids) == len(set(ids))
        zero = [g for g in groups if g["weight_decay"] == 0.0]
        assert len(zero) == 1 and len(zero[0]["params"]) == 1 and zero[0]["params"][0] is shared
    groups = norm.param_groups(model, 5e-4, alpha_weight_decay=True)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 5e-4
    assert any(p is shared for p in groups[0]["params"])
    torch.optim.SGD(norm.param_groups(model, 5e-4, alpha_weight_decay=False), lr=0.1)


# ---------------------------------------------------------------------------------------------
# Model-level helpers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,scope,options",
    [
        ("cbn", "all", {"num_components": 3}),
        ("nbn", "last_stage", {"alpha": "shared"}),
        ("cbn", "all", {"num_components": 3, "em": False}),
    ],
)
def test_state_dict_round_trip(tmp_path, name, scope, options):
    torch.manual_seed(0)
    model = norm.apply(models.build("resnet8", 10), name, scope=scope, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    groups = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    for step in range(3):
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
        ctx = norm.split_mode(model, groups) if step == 2 and name == "cbn" else nullcontext()
        with ctx:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), tmp_path / "m.pt")

    torch.manual_seed(1)
    fresh = norm.apply(models.build("resnet8", 10), name, scope=scope, **options)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    fresh.eval()
    close(fresh(x), model(x), atol=0, rtol=0)
    if name == "nbn":
        alphas = {id(m.alpha) for m in fresh.modules() if isinstance(m, NormalizedBatchNorm2d)}
        assert len(alphas) == 1
    # resuming training: the loaded mixture is not initialized again from the next batch
    model.train()
    fresh.train()
    close(fresh(x), model(x), atol=0, rtol=0)


def test_cbn_bf16_autocast_cpu():
    torch.manual_seed(0)
    layer = CompoundBatchNorm2d(8, num_components=4)
    x = torch.randn(4, 8, 5, 5)
    layer(x)  # initialize the mixture in float32
    for dtype in (torch.bfloat16, torch.float32):
        xi = x.to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
            y_bn = nn.BatchNorm2d(8)(xi)
        assert y.dtype == y_bn.dtype == dtype
        y.float().square().sum().backward()
        assert torch.isfinite(y.float()).all() and torch.isfinite(xi.grad).all()
        assert torch.isfinite(layer.weight.grad).all()
        layer.zero_grad()
    # inside, everything is float32: the result is the float32 computation on the bf16 input
    layer.eval()
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xb)
    close(y.float(), layer(xb.float()).bfloat16().float(), atol=0, rtol=0)

    model = norm.apply(models.build("resnet8", 10), "cbn")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 3, 8, 8))
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_rectify_logits():
    torch.manual_seed(0)
    model = models.build("resnet8", 10)
    fc = model.fc
    norm.rectify_logits(model)
    assert model.fc[0] is fc
    assert not list(model.fc[1].parameters())  # affine=False
    x = torch.randn(16, 3, 8, 8)
    z = fc(model.features(x)).detach()
    ref = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
    close(model(x), ref, atol=1e-4)
    model.eval()
    bn = model.fc[1]
    z = fc(model.features(x)).detach()
    close(model(x), (z - bn.running_mean) / torch.sqrt(bn.running_var + 1e-5), atol=1e-4)


def test_apply_errors_name_the_value():
    model = models.build("resnet8", 10)
    with pytest.raises(ValueError, match="everything.*last_stage"):
        norm.apply(model, "cbn", scope="everything")
    with pytest.raises(KeyError, match="xbn"):
        norm.apply(model, "xbn")
    with pytest.raises(ValueError, match="diagonal"):
        norm.make("cbn", 4, responsibilities="diagonal")
    with pytest.raises(ValueError, match="twice"):
        norm.make("nbn", 4, alpha="twice")
    assert all(type(m) is nn.BatchNorm2d for n, m in model.named_modules() if n.endswith(("bn1", "bn2")))
    assert isinstance(norm.factory("cbn", {"num_components": 2})(16), CompoundBatchNorm2d)


def test_cbn_channels_last_and_repr():
    torch.manual_seed(0)
    layer = CompoundBatchNorm2d(4, num_components=2)
    x = torch.randn(3, 4, 5, 5)
    xc = x.contiguous(memory_format=torch.channels_last)
    layer(x)
    layer.eval()
    y, yc = layer(x), layer(xc)
    assert yc.is_contiguous(memory_format=torch.channels_last) and y.is_contiguous()
    close(yc, y)
    assert "num_components=2" in repr(layer) and "responsibilities=pixel" in repr(layer)
