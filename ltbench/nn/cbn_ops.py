"""CBN's computation (Cheng et al. 2022, Eq. 8–16) as two torch custom operators with a hand-derived
backward; :class:`ltbench.nn.cbn.CompoundBatchNorm2d` is the layer that calls them.

``ltbench::cbn_forward`` runs one CBN normalization: the E-step (per pixel, per sample, or fixed
responsibilities such as SBN's one-hot class groups), the M-step's weighted batch statistics and the
mixed affine of Eq. 16. It returns the output, the batch estimates for the running update and the
residuals the backward reads. ``ltbench::cbn_backward`` applies the chain rule from those residuals.
``torch.library.register_autograd`` joins the two, and each has a fake (meta) implementation that
only describes its outputs' shapes, dtypes and memory formats, so ``torch.compile`` (also with
``fullgraph=True`` and CUDA graphs) traces a model with CBN layers without a graph break; the
compiler treats each operator as one opaque call.

Behind the same operators: on CPU, contiguous float32 input of the per-pixel path runs the fused C
loops of :mod:`ltbench.nn.cbn_cpu` (the forward's CPU kernel is registered with
``register_kernel("cpu")``); every other case (CUDA, channels_last, ``LTBENCH_CBN_KERNEL=torch``) runs
the torch code below. Only x, r and (M, C)/(N, C) statistics are kept between forward and backward
(plus Z = [x − shift | (x − shift)²] on the torch per-pixel path, already written once).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from ltbench.nn import cbn_cpu

MODES = ("pixel", "sample", "fixed")

_LOG_2PI = math.log(2.0 * math.pi)
# A component with less total responsibility than this in a batch has no usable batch statistics:
# its running statistics are left as they are and it is normalized with them.
MIN_MASS = 1e-6
_TINY_R = 1e-20

_T = torch.Tensor
_Outputs = tuple[_T, _T, _T, _T, _T, _T, _T, _T, _T]
_Grads = tuple[_T, _T, _T]  # (∂L/∂x, ∂L/∂weight, ∂L/∂bias)


# --------------------------------------------------------------------------------------------
# The mixture maths shared by training, evaluation and the backward
# --------------------------------------------------------------------------------------------


class _Layout:
    """A 4-D tensor (N, C, H, W) seen without a copy as (N, C, L) (contiguous input: channel dim 1)
    or (N, L, C) (channels_last input: channel dim 2), L = H·W. Responsibilities live in the same
    layout with M in place of C, so every per-point contraction is one (batched) matmul."""

    def __init__(self, x: torch.Tensor):
        self.shape = tuple(x.shape)
        self.cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        self.c, self.l = (2, 1) if self.cl else (1, 2)

    @property
    def format(self) -> torch.memory_format:
        return torch.channels_last if self.cl else torch.contiguous_format

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        N, C, H, W = self.shape
        return t.permute(0, 2, 3, 1).reshape(N, H * W, C) if self.cl else t.reshape(N, C, H * W)

    def unflat(self, t: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        N, C, H, W = self.shape
        C = C if channels is None else channels
        return t.reshape(N, H, W, C).permute(0, 3, 1, 2) if self.cl else t.reshape(N, C, H, W)

    def vec(self, v: torch.Tensor) -> torch.Tensor:
        """A per-channel (C,) or per-sample (N, C) vector, broadcastable against the 3-D view."""
        if not self.cl:
            return v.unsqueeze(-1)
        return v[:, None, :] if v.dim() == 2 else v

    def empty(self, like: torch.Tensor, channels: int) -> torch.Tensor:
        N, L = like.shape[0], like.shape[self.l]
        return like.new_empty((N, L, channels) if self.cl else (N, channels, L))

    def narrow(self, t: torch.Tensor, start: int, length: int) -> torch.Tensor:
        return t.narrow(self.c, start, length)

    def to_points(self, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Σ_k r_ik w_kc for r in layout (M channels), w (M, C) → layout (C channels)."""
        return torch.matmul(r, w) if self.cl else torch.bmm(self._batched(w.t(), r), r)

    def to_components(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Σ_c z_ic w_kc for z in layout (C channels), w (M, C) → layout (M channels)."""
        return torch.matmul(z, w.t()) if self.cl else torch.bmm(self._batched(w, z), z)

    @staticmethod
    def _batched(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """w repeated per sample: bmm with a real batch is several times faster on CPU than matmul's
        broadcast of a 2-D operand (measured, torch 2.14)."""
        return w.expand(like.shape[0], *w.shape).contiguous()

    def reduce(self, r: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Σ_i r_ik z_ic over all points → (M, C)."""
        if self.cl:
            return r.reshape(-1, r.shape[2]).t() @ z.reshape(-1, z.shape[2])
        return torch.bmm(r, z.transpose(1, 2)).sum(0)


class Mixture(NamedTuple):
    """The running mixture as the E-step and the output need it, in coordinates shifted by ``shift``:
    log r_ik = const_k + Σ_c (xc_ic² w2_kc + xc_ic w1_kc) − logsumexp, xc = x − shift, with
    w2 = −½/(σ²+ε), w1 = (μ−shift)/(σ²+ε) (Eq. 8–9 in log space); ``estep`` = [w1 | w2] (M, 2C)."""

    shift: torch.Tensor
    estep: torch.Tensor
    const: torch.Tensor
    prec: torch.Tensor
    center: torch.Tensor


def mixture(prior: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float, shift: torch.Tensor) -> Mixture:
    v = var + eps
    prec = v.reciprocal()
    mc = mean - shift
    const = prior.clamp_min(1e-12).log() - 0.5 * (v.log().sum(1) + mean.shape[1] * _LOG_2PI + (mc * mc * prec).sum(1))
    return Mixture(shift, torch.cat([mc * prec, -0.5 * prec], 1), const, prec, mc)


def affine(
    weight: torch.Tensor, bias: torch.Tensor, mean_c: torch.Tensor, var: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """γ (x − μ)/sqrt(σ² + ε) + β = xc·scale + offset with xc = x − shift, mean_c = μ − shift:
    (inv_std, scale, offset)."""
    inv = torch.rsqrt(var + eps)
    scale = weight * inv
    return inv, scale, bias - mean_c * scale


def bessel(n: torch.Tensor) -> torch.Tensor:
    """BatchNorm's unbiased factor n/(n − 1) for an effective count n, bounded by 2 for n < 2."""
    return n.clamp_min(1.0) / (n - 1.0).clamp_min(1.0)


def _flush(r: torch.Tensor) -> torch.Tensor:
    """Responsibilities below 1e-20 set to 0 (in place): far components give subnormal floats, which
    slow every later CPU kernel on them by an order of magnitude (measured: a 2×3×… bmm 87 ms instead
    of 4 ms); their share of any sum is far below float32 rounding."""
    return r.masked_fill_(r < _TINY_R, 0.0)


def _softmax(logit: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over ``dim`` (may overwrite ``logit``). Over a contiguous innermost dim of size M (the
    channels_last layout) torch's CPU kernel is ~10 × slower than these four passes (measured: 17.8
    vs 1.6 ms for 128 × 1024 × 4, torch 2.14); otherwise ``torch.softmax``."""
    if logit.stride(dim) != 1 or logit.device.type != "cpu":
        return torch.softmax(logit, dim)
    e = logit.sub_(logit.amax(dim, keepdim=True)).exp_()
    return e.div_(e.sum(dim, keepdim=True))


def _pixel_estep(lay: _Layout, x: torch.Tensor, mix: Mixture) -> tuple[torch.Tensor, torch.Tensor]:
    """Z = [xc | xc²] (2C channels, written once) and per-point r = softmax(const + Z·estep)."""
    C = x.shape[lay.c]
    z = lay.empty(x, 2 * C)
    xc = lay.narrow(z, 0, C)
    torch.sub(x, lay.vec(mix.shift), out=xc)
    torch.mul(xc, xc, out=lay.narrow(z, C, C))
    logit = lay.to_components(z, mix.estep).add_(lay.vec(mix.const))
    return z, _flush(_softmax(logit, lay.c))


def uses_kernels(x4: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether the per-pixel path runs on the fused CPU kernels (:mod:`ltbench.nn.cbn_cpu`): contiguous
    float32 CPU input and float32 statistics, kernels built and not switched off."""
    return all(p.dtype == torch.float32 for p in params) and cbn_cpu.usable(x4)


def _pixel_estep_fused(x: torch.Tensor, mix: Mixture) -> torch.Tensor:
    """Per-point r = softmax(const + xc·w1 + xc²·w2) for contiguous (N, C, L) x, without writing Z."""
    M, C = mix.estep.shape[0], x.shape[1]
    return _flush(_softmax(cbn_cpu.quad(x, None, mix.shift, mix.estep.view(M, 2, C), mix.const), 1))


def _mixed_affine(
    lay: _Layout,
    r: torch.Tensor,
    xc: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 16 per point: y_i = (Σ_k r_ik scale_k) ⊙ xc_i + Σ_k r_ik offset_k (one matmul, one multiply-add)."""
    C = scale.shape[1]
    t = lay.to_points(r, torch.cat([scale, offset], 1))
    return torch.addcmul(lay.narrow(t, C, C), lay.narrow(t, 0, C), xc, out=out)


def _location(lay: _Layout, x: torch.Tensor, points: int = 64) -> torch.Tensor:
    """A cheap shift for the per-pixel sums: the channel means of the first ``points`` pixels of every
    sample (any value near the data keeps E[xc²] − E[xc]² accurate; the results do not depend on it)."""
    return x.narrow(lay.l, 0, min(points, x.shape[lay.l])).mean((0, lay.l))


def _sample_stats(lay: _Layout, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass: per-sample channel means and variances (N, C) and the shift = their mean."""
    var_s, mean_s = torch.var_mean(x, dim=lay.l, correction=0)
    return mean_s, var_s, mean_s.mean(0)


def _pooled_r(pc: torch.Tensor, mix: Mixture) -> torch.Tensor:
    """Per-sample r (N, M) from shifted pooled features pc (N, C)."""
    return _flush(torch.softmax(torch.cat([pc, pc * pc], 1) @ mix.estep.t() + mix.const, 1))


def _stat_grads(
    ctx: _Saved, dscale: torch.Tensor, doff: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From ∂L/∂scale, ∂L/∂offset (M, C) with scale = γ/sqrt(v+ε), offset = β − m·scale: ∂L/∂γ and
    D1 = ∂L/∂μ̃ / n, D2 = ∂L/∂σ̃² / n, zero where the normalization did not use the batch statistics
    (running stats, dead component)."""
    dscale = dscale - ctx.use_m * doff  # offset depends on scale
    live = ctx.alive[:, None] if ctx.batch_stats else torch.zeros_like(ctx.alive)[:, None]
    d1 = torch.where(live, -doff * ctx.scale / ctx.denom, 0.0)
    d2 = torch.where(live, -0.5 * dscale * ctx.scale * ctx.inv * ctx.inv / ctx.denom, 0.0)
    return d1, d2, dscale * ctx.inv


def _dlogits(ctx: _Saved, r: torch.Tensor, dr: torch.Tensor, dim: int) -> torch.Tensor:
    """Through r = softmax(logits): r ⊙ (dr − Σ_k r dr)."""
    return r * (dr - (r * dr).sum(dim, keepdim=True))


def _pixel_backward(ctx: _Saved, lay: _Layout, x: torch.Tensor, g: torch.Tensor) -> _Grads:
    """Per-pixel r: dx, ∂L/∂γ, ∂L/∂β, reading the forward's Z = [xc | xc²] (kept: already written once).
    G = [g ⊙ xc | g] (2C channels) is written once, so ∂L/∂scale, ∂L/∂offset are one reduction and
    the affine's share of ∂L/∂r one matmul."""
    C, r, z = x.shape[lay.c], ctx.r, ctx.z
    xc = lay.narrow(z, 0, C)
    G = lay.empty(x, 2 * C)
    torch.mul(g, xc, out=lay.narrow(G, 0, C))
    lay.narrow(G, C, C).copy_(g)
    sums = lay.reduce(r, G)
    d1, d2, dgamma = _stat_grads(ctx, sums[:, :C], sums[:, C:])
    doff = sums[:, C:]
    lin = d1 - 2.0 * d2 * ctx.mean_c
    if ctx.grad_r:
        dr = lay.to_components(G, torch.cat([ctx.scale, ctx.offset], 1))
        if ctx.batch_stats:
            const = (d2 * (ctx.mean_c * ctx.mean_c - ctx.var) - d1 * ctx.mean_c).sum(1)
            dr.add_(lay.to_components(z, torch.cat([lin, d2], 1))).add_(lay.vec(const))
        da = _dlogits(ctx, r, dr, lay.c)
        zero = torch.zeros_like(ctx.scale)
        w = torch.cat(
            [torch.cat([ctx.scale, 2.0 * d2, lin], 1), torch.cat([zero, -ctx.prec, ctx.center * ctx.prec], 1)], 0
        )
        t = lay.to_points(torch.cat([r, da], lay.c), w)
    else:
        t = lay.to_points(r, torch.cat([ctx.scale, 2.0 * d2, lin], 1))
    dx = torch.addcmul(lay.narrow(t, 2 * C, C), lay.narrow(t, 0, C), g)
    return dx.addcmul_(lay.narrow(t, C, C), xc), dgamma, doff


def _pixel_backward_fused(ctx: _Saved, x: torch.Tensor, g: torch.Tensor) -> _Grads:
    """:func:`_pixel_backward` on the fused CPU kernels (contiguous (N, C, L) x and g): the same chain
    rule, with ∂L/∂scale, ∂L/∂offset one pass over (x, g, r), ∂L/∂r one and dx one."""
    C, r, s = x.shape[1], ctx.r, ctx.shift
    sums = cbn_cpu.moments(x, g, s, r)
    d1, d2, dgamma = _stat_grads(ctx, sums[:, :C], sums[:, C:])
    doff = sums[:, C:]
    lin = d1 - 2.0 * d2 * ctx.mean_c
    da = wd = None
    if ctx.grad_r:
        # d1 = d2 = 0 without batch statistics: then only the affine's share is left
        const = (d2 * (ctx.mean_c * ctx.mean_c - ctx.var) - d1 * ctx.mean_c).sum(1)
        dr = cbn_cpu.quad(x, g, s, torch.stack([lin, d2, ctx.scale, ctx.offset], 1), const)
        da = _dlogits(ctx, r, dr, 1)
        wd = torch.stack([-ctx.prec, ctx.center * ctx.prec], 1)
    dx = cbn_cpu.mix(x, g, s, r, da, torch.stack([2.0 * d2, lin, ctx.scale], 1), wd, out=torch.empty_like(x))
    return dx, dgamma, doff


def _sample_backward(ctx: _Saved, lay: _Layout, x: torch.Tensor, g: torch.Tensor) -> _Grads:
    """Per-sample or fixed r (N, M): per-sample sums, then one broadcast multiply-add for dx."""
    L, r, s = x.shape[lay.l], ctx.r, ctx.shift
    gs = g.sum(lay.l)
    gxs = (g * x).sum(lay.l) - s * gs
    dscale, doff = r.t() @ gxs, r.t() @ gs
    d1, d2, dgamma = _stat_grads(ctx, dscale, doff)
    lin = d1 - 2.0 * d2 * ctx.mean_c
    k1, k0 = r @ (2.0 * d2), r @ lin
    if ctx.grad_r:
        pc, var_s = ctx.pooled[0], ctx.pooled[1]
        dr = gxs @ ctx.scale.t() + gs @ ctx.offset.t()
        if ctx.batch_stats:
            const = (d2 * (ctx.mean_c * ctx.mean_c - ctx.var) - d1 * ctx.mean_c).sum(1)
            dr = dr + L * (pc @ lin.t() + (var_s + pc * pc) @ d2.t() + const)
        da = _dlogits(ctx, r, dr, 1)
        k0 = k0 + (da @ (ctx.center * ctx.prec) - pc * (da @ ctx.prec)) / L
    a = r @ ctx.scale
    dx = torch.addcmul(lay.vec(k0 - s * k1), x, lay.vec(k1))
    return dx.addcmul_(g, lay.vec(a)), dgamma, doff


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


class _Normalizer(NamedTuple):
    """The statistics each branch normalizes with, as (x − shift)·scale + offset per component."""

    denom: torch.Tensor
    alive: torch.Tensor
    use_m: torch.Tensor
    inv: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor


def _normalizer(
    weight: _T,
    bias: _T,
    rmean: _T,
    rvar: _T,
    shift: _T,
    n: _T,
    mean_c: _T,
    var: _T,
    batch_stats: bool,
    eps: float,
) -> _Normalizer:
    """The batch estimates (``batch_stats``, components with mass) or else the running statistics, and
    the per-component affine γ_k (x − μ_k)/sqrt(σ²_k + ε) + β_k (Eq. 16) they give."""
    denom = n.clamp_min(MIN_MASS)[:, None]
    alive = n > MIN_MASS
    use_m, use_v = rmean - shift, rvar
    if batch_stats:
        use_m = torch.where(alive[:, None], mean_c, use_m)
        use_v = torch.where(alive[:, None], var, use_v)
    inv, scale, offset = affine(weight, bias, use_m, use_v, eps)
    return _Normalizer(denom, alive, use_m, inv, scale, offset)


def _statistics(
    lay: _Layout,
    x: _T,
    prior: _T,
    rmean: _T,
    rvar: _T,
    fixed_r: _T | None,
    shift: _T | None,
    mode: str,
    eps: float,
    fused: bool,
) -> tuple[_T, Mixture | None, _T, _T | None, tuple[_T, _T] | None, _T, _T, _T]:
    """E-step (Eq. 8–9) and the M-step's sums (Eq. 10–12): (shift, mixture or None, r, Z or None,
    (pc, var_s) or None, n = Σ r, Σ r xc, Σ r xc²) with xc = x − shift."""
    C, L = x.shape[lay.c], x.shape[lay.l]
    mix: Mixture | None = None
    if mode == "pixel":
        s = _location(lay, x) if shift is None else shift
        mix = mixture(prior, rmean, rvar, eps, s)
        if fused:  # Z is not written: the kernels recompute x − shift
            z, r = None, _pixel_estep_fused(x, mix)
            sums = cbn_cpu.moments(x, None, s, r)
        else:
            z, r = _pixel_estep(lay, x, mix)
            sums = lay.reduce(r, z)
        return s, mix, r, z, None, r.sum((0, lay.l)), sums[:, :C], sums[:, C:]
    mean_s, var_s, s = _sample_stats(lay, x)
    s = s if shift is None else shift
    pc = mean_s - s
    if mode == "sample":
        mix = mixture(prior, rmean, rvar, eps, s)
        r = _pooled_r(pc, mix)
    elif fixed_r is None:
        raise ValueError('CBN mode "fixed" needs the responsibilities fixed_r (N, M), got None')
    else:
        r = fixed_r
    return s, mix, r, None, (pc, var_s), r.sum(0) * L, L * (r.t() @ pc), L * (r.t() @ (var_s + pc * pc))


def _forward(
    x4: _T,
    weight: _T,
    bias: _T,
    prior: _T,
    rmean: _T,
    rvar: _T,
    fixed_r: _T | None,
    shift: _T | None,
    mode: str,
    batch_stats: bool,
    eps: float,
    kernels: bool,
) -> _Outputs:
    """y = Σ_k r_ik (scale_k ⊙ (x_i − shift) + offset_k), the batch estimates and the residuals
    (see :func:`cbn_forward`); ``kernels``: the per-pixel path may take the C loops."""
    if mode not in MODES:
        raise ValueError(f"unknown CBN mode {mode!r}; known: {', '.join(MODES)}")
    lay = _Layout(x4)
    x = lay.flat(x4)
    fused = kernels and mode == "pixel" and uses_kernels(x4, weight, rmean, rvar)
    s, mix, r, z, pooled, n, s1, s2 = _statistics(lay, x, prior, rmean, rvar, fixed_r, shift, mode, eps, fused)
    denom = n.clamp_min(MIN_MASS)[:, None]
    mean_c = s1 / denom
    var = (s2 / denom - mean_c * mean_c).clamp_min(0.0)
    aff = _normalizer(weight, bias, rmean, rvar, s, n, mean_c, var, batch_stats, eps)
    # the output is written into its own 4-D tensor in x's memory format
    y4 = torch.empty(
        lay.shape, dtype=torch.promote_types(x.dtype, aff.scale.dtype), device=x.device, memory_format=lay.format
    )
    if fused:
        cbn_cpu.mix(x, None, s, r, None, torch.stack([aff.scale, aff.offset], 1), None, out=y4)
    elif mode == "pixel":
        assert z is not None  # the torch per-pixel path writes Z (_statistics)
        _mixed_affine(lay, r, lay.narrow(z, 0, x.shape[lay.c]), aff.scale, aff.offset, out=lay.flat(y4))
    else:
        a = r @ aff.scale
        torch.addcmul(lay.vec(r @ aff.offset - s * a), x, lay.vec(a), out=lay.flat(y4))
    consts = [aff.scale, aff.offset, aff.inv, aff.use_m] + ([] if mix is None else [mix.prec, mix.center])
    # an operator's outputs may not alias its inputs or each other: a clone of an input shift, and
    # one empty tensor for each residual that does not apply
    return (
        y4,
        n,
        mean_c,
        var,
        s if shift is None else s.clone(),
        x.new_empty(0) if mode == "fixed" else r.contiguous(),
        x.new_empty(0) if z is None else z,
        x.new_empty(0) if pooled is None else torch.stack(pooled),
        torch.stack(consts),
    )


@torch.library.custom_op("ltbench::cbn_forward", mutates_args=())
def cbn_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    prior: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    fixed_r: torch.Tensor | None,
    shift: torch.Tensor | None,
    mode: str,
    batch_stats: bool,
    detach_r: bool,
    eps: float,
) -> _Outputs:
    """One CBN normalization of x (N, C, H, W) with M components (weight, bias, running_mean,
    running_var (M, C), prior (M)). ``mode``: ``"pixel"`` / ``"sample"`` responsibilities from the
    running mixture, or ``"fixed"`` (``fixed_r`` (N, M), e.g. SBN's one-hot groups); ``batch_stats``:
    normalize with the batch estimates (else the running statistics); ``shift``: the coordinate origin
    of the sums (None: one near the data); ``detach_r``: no gradient through r (read by the backward).

    Returns (y, n, mean_c, var, shift, r, Z, pooled, consts): the output (x's memory format); the
    effective counts n (M) and the batch estimates mean − shift and var (M, C); and the residuals of
    the backward (r, empty for ``"fixed"``; Z (2C channels) on the torch per-pixel path, else empty;
    the per-sample (pc, var_s) stacked (2, N, C) for ``"sample"``/``"fixed"``, else empty; the (M, C)
    constants [scale, offset, 1/sqrt(v + ε), the normalizing mean − shift] and, unless ``"fixed"``,
    the mixture's [1/(σ² + ε), μ − shift], stacked: the running buffers change in place after the
    forward, so the backward reads nothing from them). This default
    implementation is the torch code (CUDA and any device); the CPU kernel below may take the C loops.
    """
    return _forward(x, weight, bias, prior, running_mean, running_var, fixed_r, shift, mode, batch_stats, eps, False)


@cbn_forward.register_kernel("cpu")
def _cbn_forward_cpu(
    x: _T,
    weight: _T,
    bias: _T,
    prior: _T,
    running_mean: _T,
    running_var: _T,
    fixed_r: _T | None,
    shift: _T | None,
    mode: str,
    batch_stats: bool,
    detach_r: bool,
    eps: float,
) -> _Outputs:
    return _forward(x, weight, bias, prior, running_mean, running_var, fixed_r, shift, mode, batch_stats, eps, True)


@cbn_forward.register_fake
def _cbn_forward_fake(
    x: _T,
    weight: _T,
    bias: _T,
    prior: _T,
    running_mean: _T,
    running_var: _T,
    fixed_r: _T | None,
    shift: _T | None,
    mode: str,
    batch_stats: bool,
    detach_r: bool,
    eps: float,
) -> _Outputs:
    lay = _Layout(x)
    (N, C, H, W), M = x.shape, weight.shape[0]
    y = torch.empty(
        lay.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device, memory_format=lay.format
    )
    stats = (x.new_empty(M), x.new_empty((M, C)), x.new_empty((M, C)), x.new_empty(C))
    consts = x.new_empty((4 if mode == "fixed" else 6, M, C))
    if mode != "pixel":
        r = x.new_empty((N, M) if mode == "sample" else 0)
        return (y, *stats, r, x.new_empty(0), x.new_empty((2, N, C)), consts)
    if x.device.type == "cpu" and uses_kernels(x, weight, running_mean, running_var):
        return (y, *stats, x.new_empty((N, M, H * W)), x.new_empty(0), x.new_empty(0), consts)
    r_shape, z_shape = ((N, H * W, M), (N, H * W, 2 * C)) if lay.cl else ((N, M, H * W), (N, 2 * C, H * W))
    return (y, *stats, x.new_empty(r_shape), x.new_empty(z_shape), x.new_empty(0), consts)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


class _Saved(NamedTuple):
    """What the backward routines read: the forward's intermediate values, from its residuals."""

    r: torch.Tensor
    z: torch.Tensor  # Z = [xc | xc²] on the torch per-pixel path, else empty
    pooled: torch.Tensor  # (pc, var_s) stacked (2, N, C) for "sample"/"fixed", else empty
    prec: torch.Tensor  # the mixture's 1/(σ² + ε) (M, C), unless "fixed" (no gradient through r)
    center: torch.Tensor  # the mixture's μ − shift (M, C), unless "fixed"
    shift: torch.Tensor
    mean_c: torch.Tensor
    var: torch.Tensor
    denom: torch.Tensor
    alive: torch.Tensor
    use_m: torch.Tensor
    inv: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    batch_stats: bool
    grad_r: bool


@torch.library.custom_op("ltbench::cbn_backward", mutates_args=())
def cbn_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    r: torch.Tensor,
    z: torch.Tensor,
    pooled: torch.Tensor,
    consts: torch.Tensor,
    shift: torch.Tensor,
    n: torch.Tensor,
    mean_c: torch.Tensor,
    var: torch.Tensor,
    mode: str,
    batch_stats: bool,
    grad_r: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∂L/∂x, ∂L/∂weight, ∂L/∂bias) of :func:`cbn_forward` from ∂L/∂y and its residuals (r is
    ``fixed_r`` in ``"fixed"`` mode); ``grad_r``: the gradient flows through r. The per-pixel path runs
    on the C loops exactly when its forward did (no Z residual)."""
    lay = _Layout(x)
    xf, g = lay.flat(x), lay.flat(grad.contiguous(memory_format=lay.format))
    scale, offset, inv, use_m = consts[:4]
    prec, center = (consts.new_empty(0), consts.new_empty(0)) if mode == "fixed" else (consts[4], consts[5])
    pixel, fused = mode == "pixel", mode == "pixel" and z.numel() == 0
    denom, alive = n.clamp_min(MIN_MASS)[:, None], n > MIN_MASS
    saved = _Saved(
        r, z, pooled, prec, center, shift, mean_c, var,
        denom, alive, use_m, inv, scale, offset, batch_stats, grad_r,
    )  # fmt: skip
    if fused:
        dx, dgamma, dbeta = _pixel_backward_fused(saved, xf, g)
    elif pixel:
        dx, dgamma, dbeta = _pixel_backward(saved, lay, xf, g)
    else:
        dx, dgamma, dbeta = _sample_backward(saved, lay, xf, g)
    return lay.unflat(dx).contiguous(memory_format=lay.format), dgamma.contiguous(), dbeta.contiguous()


@cbn_backward.register_fake
def _cbn_backward_fake(grad: _T, x: _T, r: _T, z: _T, pooled: _T, consts: _T, *_: object) -> _Grads:
    lay = _Layout(x)
    dx = torch.empty(lay.shape, dtype=x.dtype, device=x.device, memory_format=lay.format)
    return dx, consts.new_empty(consts.shape[1:]), consts.new_empty(consts.shape[1:])


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: _Outputs) -> None:
    x, fixed_r, mode, detach_r = inputs[0], inputs[6], inputs[8], inputs[10]
    _, n, mean_c, var, s, r, z, pooled, consts = output
    r = fixed_r if mode == "fixed" else r
    ctx.save_for_backward(x, r, z, pooled, consts, s, n, mean_c, var)
    ctx.mode, ctx.batch_stats, ctx.grad_r = mode, inputs[9], mode != "fixed" and not detach_r
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx: Any, grad: _T, *_: _T) -> tuple[_T | None, ...]:
    dx, dgamma, dbeta = cbn_backward(grad, *ctx.saved_tensors, ctx.mode, ctx.batch_stats, ctx.grad_r)
    return (dx if ctx.needs_input_grad[0] else None, dgamma, dbeta) + (None,) * 9


cbn_forward.register_autograd(_backward, setup_context=_setup_context)


def compound(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    fixed_r: torch.Tensor | None,
    mode: str,
    batch_stats: bool,
    detach_r: bool,
    eps: float,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, n, mean, var) of :func:`cbn_forward` (buffers: prior, running mean, running var); gradients
    flow to x, weight and bias through y only."""
    y, n, mean_c, var, s = cbn_forward(x, weight, bias, *buffers, fixed_r, shift, mode, batch_stats, detach_r, eps)[:5]
    return y, n, mean_c + s, var


# --------------------------------------------------------------------------------------------
# Without autograd: evaluation from cached constants, diagnostics
# --------------------------------------------------------------------------------------------


def evaluate(x4: torch.Tensor, mix: Mixture, scale: torch.Tensor, offset: torch.Tensor, mode: str) -> torch.Tensor:
    """The test-time output for fixed (M, C) constants (no autograd): one pass for [xc | xc²] (or the
    C loops), one matmul to log r, a softmax over M, one matmul for the mixed affine, one multiply-add."""
    lay = _Layout(x4)
    xf = lay.flat(x4)
    if mode == "pixel" and uses_kernels(x4, scale, offset, mix.estep):
        r = _pixel_estep_fused(xf, mix)
        stacked = torch.stack([scale, offset], 1)
        return cbn_cpu.mix(xf, None, mix.shift, r, None, stacked, None, out=torch.empty_like(x4))
    if mode == "pixel":
        z, r = _pixel_estep(lay, xf, mix)
        return lay.unflat(_mixed_affine(lay, r, lay.narrow(z, 0, x4.shape[1]), scale, offset))
    r = _pooled_r(xf.mean(lay.l) - mix.shift, mix)
    a = r @ scale
    return lay.unflat(torch.addcmul(lay.vec(r @ offset - mix.shift * a), xf, lay.vec(a)))


def responsibilities(x4: torch.Tensor, mix: Mixture, mode: str) -> torch.Tensor:
    """The E-step (Eq. 8–9) of ``mix`` on x (N, C, H, W): r (N, M, H, W), per pixel or per sample."""
    lay = _Layout(x4)
    xf = lay.flat(x4)
    if mode == "sample":
        r = _pooled_r(xf.mean(lay.l) - mix.shift, mix)
        return r[:, :, None, None].expand(r.shape[0], r.shape[1], *x4.shape[2:])
    return lay.unflat(_pixel_estep(lay, xf, mix)[1], mix.const.shape[0])
