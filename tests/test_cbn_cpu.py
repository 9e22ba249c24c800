"""The fused CPU kernels of CBN's per-pixel path (ltbench/nn/cbn_cpu.py, cbn_cpu.c): used where they
apply, equal to the torch implementation across point blocks, built once into the cache, and a clear
fallback or error when no compiler works. (Equality with the reference layer: tests/test_cbn_fast.py.)"""

from __future__ import annotations

import pytest
import torch

from ltbench.nn import cbn_cpu
from ltbench.nn.norm import CompoundBatchNorm2d

needs_cc = pytest.mark.skipif(not cbn_cpu.compiler_found(), reason="needs a C compiler ($CC or cc)")


@pytest.fixture
def kernel(monkeypatch):
    def use(value: str, **env: str):
        monkeypatch.setenv("LTBENCH_CBN_KERNEL", value)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        cbn_cpu.reset()

    yield use
    cbn_cpu.reset()


def close(a, b, atol=2e-5, rtol=2e-4):
    torch.testing.assert_close(a.detach().double(), b.detach().double(), atol=atol, rtol=rtol)


def run(layer, xs, grads):
    """Training steps then a no-grad eval: outputs, input/parameter gradients, buffers."""
    out = []
    layer.train()
    for x, g in zip(xs, grads, strict=True):
        x = x.clone().requires_grad_()
        y = layer(x)
        y.backward(g)
        out += [y, x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()]
        layer.zero_grad(set_to_none=True)
    out += [b.clone() for b in layer.buffers()]
    layer.eval()
    with torch.no_grad():
        out.append(layer(xs[0]))
    return out


@needs_cc
@pytest.mark.parametrize(
    "options",
    [
        {"num_components": 3},
        {"num_components": 4, "detach_responsibilities": True},
        {"num_components": 2, "train_stats": "running"},
    ],
)
def test_kernels_equal_torch_across_point_blocks(kernel, options):
    """17 × 17 = 289 points per channel: one full block of 256 and a partial one."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 6, 17, 17, generator=g) * 2 + torch.arange(6.0)[:, None, None] for _ in range(3)]
    grads = [torch.randn(3, 6, 17, 17, generator=g) for _ in range(3)]
    results = {}
    for value in ("torch", "c"):
        kernel(value)
        torch.manual_seed(0)
        results[value] = run(CompoundBatchNorm2d(6, **options), xs, grads)
    assert cbn_cpu.describe() == "c"
    for a, b in zip(results["c"], results["torch"], strict=True):
        close(a, b, atol=1e-4)


@needs_cc
def test_pixel_path_runs_on_the_kernels_for_contiguous_input_only(kernel, monkeypatch):
    kernel("c")
    calls = []
    for name in ("quad", "moments", "mix"):
        f = getattr(cbn_cpu, name)
        monkeypatch.setattr(cbn_cpu, name, lambda *a, _f=f, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    torch.manual_seed(0)
    layer = CompoundBatchNorm2d(4, num_components=3)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    layer(x).sum().backward()
    assert calls == ["quad", "moments", "mix", "moments", "quad", "mix"]  # forward, then backward
    calls.clear()
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert calls == ["quad", "mix"]
    calls.clear()
    layer.train()
    layer(x.detach().to(memory_format=torch.channels_last).requires_grad_()).sum().backward()
    assert calls == []


@needs_cc
def test_library_is_built_once_into_the_cache(kernel, tmp_path):
    kernel("c", LTBENCH_KERNEL_CACHE=str(tmp_path))
    path = cbn_cpu.build()
    assert path.parent == tmp_path and path.suffix == ".so"
    mtime = path.stat().st_mtime_ns
    assert cbn_cpu.build() == path and path.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    assert cbn_cpu.describe() == "c"


def test_failed_build_falls_back_with_a_warning_or_fails_when_required(kernel, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3)
    kernel("torch")
    torch.manual_seed(1)  # the first batch's initialization draws from the global RNG
    expected = CompoundBatchNorm2d(4, num_components=2)(x)
    kernel("auto", CC=str(tmp_path / "no-such-cc"), LTBENCH_KERNEL_CACHE=str(tmp_path / "cache"))
    torch.manual_seed(1)
    layer = CompoundBatchNorm2d(4, num_components=2)
    with pytest.warns(RuntimeWarning, match="using the torch implementation.*no-such-cc"):
        y = layer(x)
    assert torch.equal(y, expected)
    assert cbn_cpu.describe().startswith("torch (cannot run the C compiler")
    kernel("c")
    with pytest.raises(RuntimeError, match="LTBENCH_CBN_KERNEL=c .*no-such-cc"):
        layer(x)


def test_unknown_choice_names_the_variable(kernel):
    kernel("fast")
    with pytest.raises(ValueError, match="LTBENCH_CBN_KERNEL='fast'.*auto, torch, c"):
        cbn_cpu.describe()


@needs_cc
def test_kernels_refuse_tensors_they_would_index_out_of_bounds(kernel):
    kernel("c")
    assert cbn_cpu.describe() == "c"
    x, shift, M = torch.randn(2, 3, 10), torch.zeros(3), 2
    r = torch.full((2, M, 10), 0.5)
    assert cbn_cpu.moments(x, None, shift, r).shape == (M, 6)
    with pytest.raises(
        ValueError, match=r"cbn_moments: r must be a contiguous torch.float32 CPU tensor of 40 elements"
    ):
        cbn_cpu.moments(x, None, shift, r[:, :, :5])
    with pytest.raises(ValueError, match="cbn_mix: g must be"):
        cbn_cpu.mix(x, x.double(), shift, r, None, torch.zeros(M, 3, 3), None, out=torch.empty_like(x))
    with pytest.raises(ValueError, match="cbn_mix: out must be"):
        cbn_cpu.mix(x, None, shift, r, None, torch.zeros(M, 2, 3), None, out=torch.empty(2, 10, 3).transpose(1, 2))
    with pytest.raises(ValueError, match="cbn_quad: w must be"):
        cbn_cpu.quad(x, None, shift, torch.zeros(M, 2, 4), torch.zeros(M))


def test_kernels_called_without_the_library_say_so(kernel):
    """With the torch implementation chosen no library is loaded: a direct call is a clear error, not a
    NoneType attribute error."""
    kernel("torch")
    x = torch.randn(2, 3, 10)
    assert not cbn_cpu.usable(x.reshape(2, 3, 2, 5))
    with pytest.raises(RuntimeError, match="CBN CPU kernels are not loaded"):
        cbn_cpu.moments(x, None, torch.zeros(3), torch.full((2, 2, 10), 0.5))
