"""The fused CompoundBatchNorm2d against the straightforward reference (tests/cbn_reference.py).

Several training steps (compound and split paths interleaved), then eval, for every combination of
M, responsibilities, detached r, train_stats, em and memory format: outputs, input and parameter
gradients and all buffers must equal the reference's to float rounding; with M = 1 the layer must be
bit-for-bit ``nn.BatchNorm2d``. Also: the eval cache follows parameter/buffer changes.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
from cbn_reference import ReferenceCBN

from ltbench.nn import cbn_cpu, cbn_ops
from ltbench.nn.norm import CompoundBatchNorm2d

C = 5
BUFFERS = ("running_prior", "running_mean", "running_var", "num_batches_tracked", "initialized")


@pytest.fixture(params=["c", "torch"])
def impl(request, monkeypatch):
    """Both CPU implementations of the per-pixel path: the fused C kernels (contiguous input; an error
    if they cannot be built) and the torch one (``LTBENCH_CBN_KERNEL``, ltbench/nn/cbn_cpu.py)."""
    if request.param == "c" and not cbn_cpu.compiler_found():
        pytest.skip("needs a C compiler ($CC or cc)")
    monkeypatch.setenv("LTBENCH_CBN_KERNEL", request.param)
    cbn_cpu.reset()
    yield request.param
    cbn_cpu.reset()


def close(a, b, atol=2e-5, rtol=2e-4):
    torch.testing.assert_close(a.detach().double(), b.detach().double(), atol=atol, rtol=rtol)


def make_pair(**options):
    torch.manual_seed(0)
    fast = CompoundBatchNorm2d(C, **options)
    ref = ReferenceCBN(C, **options)
    with torch.no_grad():
        for p in fast.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def batches(steps: int, channels_last: bool, seed: int = 1):
    """Inputs with per-channel offsets (so E[x]² ≫ Var would hurt without a shift) and upstream grads."""
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    for _ in range(steps):
        x = torch.randn(6, C, 4, 3, generator=g) * 1.5 + torch.linspace(-2, 3, C)[:, None, None]
        x[:3] += 1.0  # two clusters of samples
        out.append((x.contiguous(memory_format=fmt), torch.randn(6, C, 4, 3, generator=g)))
    return out


def step(layer, x, grad, groups=None, seed=0):
    dev = next(layer.parameters()).device
    x, grad = x.to(dev), grad.to(dev)
    groups = None if groups is None else groups.to(dev)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # "first_batch" initialization draws from the global RNG
    layer.split_groups = groups  # what norm.split_mode sets (the reference is no CompoundBatchNorm2d)
    try:
        y = layer(x)
    finally:
        layer.split_groups = None
    y.backward(grad)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    return y, x.grad, grads


def compare(fast, ref, data, groups_every: int | None, check_eval: bool = True):
    groups = torch.tensor([0, 1, 1, 0, 2, 3]) % fast.num_components
    for i, (x, grad) in enumerate(data):
        gr = groups if groups_every and i % groups_every == 1 else None
        y, gx, gp = step(fast, x, grad, gr, seed=i)
        y_ref, gx_ref, gp_ref = step(ref, x, grad, gr, seed=i)
        assert y.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)
        close(y, y_ref)
        close(gx, gx_ref, atol=1e-4)
        for a, b in zip(gp, gp_ref, strict=True):
            close(a, b, atol=1e-4)
        for name in BUFFERS:
            close(getattr(fast, name), getattr(ref, name))
    if not check_eval:
        return
    fast.eval()
    ref.eval()
    for x, grad in data[:2]:  # eval: no-grad (cached) path, then with gradients
        with torch.no_grad():
            xd = x.to(fast.weight.device)
            close(fast(xd), ref(xd))
        y, gx, gp = step(fast, x, grad)
        y_ref, gx_ref, gp_ref = step(ref, x, grad)
        close(y, y_ref)
        close(gx, gx_ref, atol=1e-4)
        for a, b in zip(gp, gp_ref, strict=True):
            close(a, b, atol=1e-4)


@pytest.mark.parametrize(
    "M,resp,detach,channels_last", list(itertools.product([2, 3, 4], ["pixel", "sample"], [False, True], [False, True]))
)
def test_fast_cbn_matches_reference(M, resp, detach, channels_last, impl):
    fast, ref = make_pair(num_components=M, responsibilities=resp, detach_responsibilities=detach)
    compare(fast, ref, batches(4, channels_last), groups_every=2)


@pytest.mark.parametrize(
    "options",
    [
        {"num_components": 3, "train_stats": "running"},
        {"num_components": 3, "train_stats": "running", "responsibilities": "sample"},
        {"num_components": 4, "init": "random"},
        {"num_components": 3, "unbiased_var": False, "prior_momentum": 1.0, "mean_momentum": 0.5, "var_momentum": 0.3},
        {"num_components": 4, "em": False},
        {"num_components": 1, "em": False},
        {"num_components": 1, "mean_momentum": 0.2},
        {"num_components": 1, "unbiased_var": False},
        {"num_components": 1, "train_stats": "running"},
        {"num_components": 1, "responsibilities": "sample"},
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_cbn_matches_reference_options(options, channels_last, impl):
    fast, ref = make_pair(**options)
    compare(fast, ref, batches(3, channels_last), groups_every=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("resp", ["pixel", "sample"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_cbn_matches_reference_cuda(resp, channels_last):
    fast, ref = make_pair(num_components=4, responsibilities=resp)
    fast, ref = fast.cuda(), ref.cuda()
    compare(fast, ref, batches(4, channels_last), groups_every=2)


def test_component_without_mass_matches_reference(impl):
    """Training steps only: in eval both layers shift by Σ π_k μ_k, which the far component (prior
    still 0.16 after two steps) drags to ≈ 160, where both E-steps lose ~1e-3 to cancellation."""
    fast, ref = make_pair(num_components=3)
    far = torch.tensor([[0.0] * C, [1.0] * C, [1e3] * C])
    for layer in (fast, ref):
        with torch.no_grad():
            layer.running_mean.copy_(far)
            layer.initialized.fill_(True)
    compare(fast, ref, batches(2, False), groups_every=None, check_eval=False)
    assert fast.running_mean[2].eq(1e3).all()


@pytest.mark.parametrize("resp", ["pixel", "sample"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_one_component_is_bitwise_batchnorm(resp, channels_last):
    """M = 1 with BatchNorm's settings: outputs, gradients and buffers bit-for-bit nn.BatchNorm2d."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(C)
    cbn = CompoundBatchNorm2d(C, num_components=1, responsibilities=resp)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
        cbn.weight.copy_(bn.weight[None])
        cbn.bias.copy_(bn.bias[None])
    for x, grad in batches(3, channels_last):
        y, gx, (gw, gb) = step(cbn, x, grad)
        y_bn, gx_bn, (gw_bn, gb_bn) = step(bn, x, grad)
        for a, b in (
            (y, y_bn),
            (gx, gx_bn),
            (gw[0], gw_bn),
            (gb[0], gb_bn),
            (cbn.running_mean[0], bn.running_mean),
            (cbn.running_var[0], bn.running_var),
            (cbn.num_batches_tracked, bn.num_batches_tracked),
        ):
            assert torch.equal(a, b)
    cbn.eval()
    bn.eval()
    x = batches(1, channels_last)[0][0]
    with torch.no_grad():
        assert torch.equal(cbn(x), bn(x))


def test_eval_cache_follows_parameters_and_buffers(impl):
    """The no-grad eval path caches per-layer constants; in-place changes, loads and train() invalidate it."""
    fast, ref = make_pair(num_components=3)
    data = batches(2, False)
    for x, grad in data:
        step(fast, x, grad)
        step(ref, x, grad)
    fast.eval()
    ref.eval()
    x = data[0][0]
    with torch.no_grad():
        close(fast(x), ref(x))
        for layer in (fast, ref):  # an optimizer-like in-place update
            layer.weight.mul_(1.5)
            layer.running_var.add_(0.3)
        close(fast(x), ref(x))
        state = {k: v.clone() for k, v in ref.state_dict().items()}
        state["bias"] = state["bias"] - 1.0
        fast.load_state_dict(state)
        ref.load_state_dict(state)
        close(fast(x), ref(x))
    fast.train()
    ref.train()
    step(fast, *data[1])
    step(ref, *data[1])
    fast.eval()
    ref.eval()
    with torch.no_grad():
        close(fast(x), ref(x))


def test_bench_layer_reports_every_layer_and_ratios():
    from ltbench.cli import build_parser
    from ltbench.tools import bench

    assert build_parser().parse_args(["bench", "--layer"]).layer
    out = bench.layer_main(
        device="cpu", batch=2, channels=4, size=4, reps=1, eval_images=3, backbone="resnet8", eval_reps=1
    )
    assert out["cbn_kernel"] == cbn_cpu.describe()
    names = {"batchnorm2d", "conv3x3", "cbn_m4_pixel", "cbn_m4_sample"} | (
        {"cbn_m4_pixel_torch"} if out["cbn_kernel"] == "c" else set()
    )  # the torch code beside the C kernels
    assert set(out["fwd_bwd_ms"]) == names == set(out["ratio_to_conv"])
    assert out["ratio_to_conv"]["conv3x3"] == 1.0
    assert all(v > 0 for v in out["fwd_bwd_ms"].values())
    ev = out["eval"]
    for fmt in ("contiguous", "channels_last"):
        for method in ("baseline", "baseline+cbn"):
            e = ev[f"{method}/{fmt}"]
            assert e["bare_images_per_s"] > 0 and e["path_images_per_s"] > 0
            assert e["path_over_bare"] == pytest.approx(e["path_images_per_s"] / e["bare_images_per_s"], rel=0.02)
        assert ev[f"cbn_model_over_bn_model/{fmt}"] == pytest.approx(
            ev[f"baseline+cbn/{fmt}"]["bare_images_per_s"] / ev[f"baseline/{fmt}"]["bare_images_per_s"], rel=0.02
        )


@pytest.mark.parametrize("responsibilities", ["pixel", "sample"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_output_takes_an_inplace_relu_and_backpropagates(responsibilities, channels_last):
    """torchvision's Bottleneck applies ReLU(inplace=True) to the norm's output: the custom Function
    must return a tensor of its own, not a view autograd refuses to modify in place."""
    torch.manual_seed(0)
    layer = CompoundBatchNorm2d(6, num_components=3, responsibilities=responsibilities)
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    xin = x.to(memory_format=torch.channels_last) if channels_last else x
    y = layer(xin)
    assert y._base is None and y.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    torch.relu_(y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_fixed_mode_without_responsibilities_names_them():
    """``"fixed"`` mode normalizes with given responsibilities: without them a clear error (was a NoneType
    attribute error deep in the statistics)."""
    x, M, C = torch.randn(4, 3, 2, 2), 2, 3
    buffers = (torch.full((M,), 0.5), torch.zeros(M, C), torch.ones(M, C))
    with pytest.raises(ValueError, match='"fixed" needs the responsibilities fixed_r'):
        cbn_ops.compound(x, torch.ones(M, C), torch.zeros(M, C), buffers, None, "fixed", True, False, 1e-5)
    onehot = torch.eye(M)[torch.tensor([0, 1, 1, 0])]
    y = cbn_ops.compound(x, torch.ones(M, C), torch.zeros(M, C), buffers, onehot, "fixed", True, False, 1e-5)[0]
    assert y.shape == x.shape
