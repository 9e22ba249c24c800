"""Normalization layers, chosen by name, and the model surgery that installs them.

``make(name, num_features, **options)`` returns an ``nn.Module`` with ``nn.BatchNorm2d``'s call
signature; :func:`factory` turns a config entry into the ``norm_layer`` callable the backbones
take, like torchvision's ``norm_layer`` argument. Registered layers:

``bn``
    Plain ``nn.BatchNorm2d``.
``cbn``
    :class:`CompoundBatchNorm2d`, Compound Batch Normalization (Cheng et al., ACM MM 2022):
    a mixture of M Gaussians over the C channels, fitted by moving-average EM, one affine per
    component (compound path), plus the class-group split normalization SBN (split path, see
    :func:`split_mode`).
``nbn``
    :class:`NormalizedBatchNorm2d`, Normalizing Batch Normalization (Bao et al., 2025):
    BatchNorm2d whose weight and bias are used as unit vectors times a learned scalar magnitude.

Model-level helpers: :func:`apply` (replace a model's BatchNorm2d layers in a scope),
:func:`param_groups` (SGD groups, NBN magnitudes optionally without weight decay),
:func:`rectify_logits` (NBN's logit rectification), :func:`class_groups` and :func:`split_mode`
(CBN's split path).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltbench.nn import cbn_cpu
from ltbench.registry import Registry

NORMS = Registry("norm layer")

SCOPES = ("all", "last_stage", "last_stage_all")
ALPHA_MODES = ("shared", "per_layer", "separate")

_LOG_2PI = math.log(2.0 * math.pi)
# A component with less total responsibility than this in a batch has no usable batch statistics:
# its running statistics are left as they are and it is normalized with them.
_MIN_MASS = 1e-6
_TINY_R = 1e-20


def _choice(what: str, value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; known: {', '.join(map(str, allowed))}")
    return value


# --------------------------------------------------------------------------------------------
# Fused CBN kernels: one autograd Function, hand-derived backward, no full-size copies of x
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


class _Mixture(NamedTuple):
    """The running mixture as the E-step and the output need it, in coordinates shifted by ``shift``:
    log r_ik = const_k + Σ_c (xc_ic² w2_kc + xc_ic w1_kc) − logsumexp, xc = x − shift, with
    w2 = −½/(σ²+ε), w1 = (μ−shift)/(σ²+ε) (Eq. 8–9 in log space); ``estep`` = [w1 | w2] (M, 2C)."""

    shift: torch.Tensor
    estep: torch.Tensor
    const: torch.Tensor
    prec: torch.Tensor
    center: torch.Tensor


def _mixture(prior: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float, shift: torch.Tensor) -> _Mixture:
    v = var + eps
    prec = v.reciprocal()
    mc = mean - shift
    const = prior.clamp_min(1e-12).log() - 0.5 * (v.log().sum(1) + mean.shape[1] * _LOG_2PI + (mc * mc * prec).sum(1))
    return _Mixture(shift, torch.cat([mc * prec, -0.5 * prec], 1), const, prec, mc)


def _affine(
    weight: torch.Tensor, bias: torch.Tensor, mean_c: torch.Tensor, var: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """γ (x − μ)/sqrt(σ² + ε) + β = xc·scale + offset with xc = x − shift, mean_c = μ − shift: (inv_std, scale, offset)."""
    inv = torch.rsqrt(var + eps)
    scale = weight * inv
    return inv, scale, bias - mean_c * scale


def _bessel(n: torch.Tensor) -> torch.Tensor:
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


def _pixel_estep(lay: _Layout, x: torch.Tensor, mix: _Mixture) -> tuple[torch.Tensor, torch.Tensor]:
    """Z = [xc | xc²] (2C channels, written once) and per-point r = softmax(const + Z·estep)."""
    C = x.shape[lay.c]
    z = lay.empty(x, 2 * C)
    xc = lay.narrow(z, 0, C)
    torch.sub(x, lay.vec(mix.shift), out=xc)
    torch.mul(xc, xc, out=lay.narrow(z, C, C))
    logit = lay.to_components(z, mix.estep).add_(lay.vec(mix.const))
    return z, _flush(_softmax(logit, lay.c))


def _fused(x4: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether the per-pixel path runs on the fused CPU kernels (:mod:`ltbench.nn.cbn_cpu`): contiguous
    float32 CPU input and float32 statistics, kernels built and not switched off."""
    return all(p.dtype == torch.float32 for p in params) and cbn_cpu.usable(x4)


def _pixel_estep_fused(x: torch.Tensor, mix: _Mixture) -> torch.Tensor:
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


def _pooled_r(pc: torch.Tensor, mix: _Mixture) -> torch.Tensor:
    """Per-sample r (N, M) from shifted pooled features pc (N, C)."""
    return _flush(torch.softmax(torch.cat([pc, pc * pc], 1) @ mix.estep.t() + mix.const, 1))


def _stat_grads(ctx, dscale: torch.Tensor, doff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From ∂L/∂scale, ∂L/∂offset (M, C) with scale = γ/sqrt(v+ε), offset = β − m·scale: ∂L/∂γ and
    D1 = ∂L/∂μ̃ / n, D2 = ∂L/∂σ̃² / n, zero where the normalization did not use the batch statistics
    (running stats, dead component)."""
    dscale = dscale - ctx.use_m * doff  # offset depends on scale
    live = ctx.alive[:, None] if ctx.batch_stats else torch.zeros_like(ctx.alive)[:, None]
    d1 = torch.where(live, -doff * ctx.scale / ctx.denom, 0.0)
    d2 = torch.where(live, -0.5 * dscale * ctx.scale * ctx.inv * ctx.inv / ctx.denom, 0.0)
    return d1, d2, dscale * ctx.inv


class _CompoundFunction(torch.autograd.Function):
    """y = Σ_k r_ik (scale_k ⊙ (x_i − shift) + offset_k) with the M-step statistics (Eq. 10–12) and
    r from the E-step (Eq. 8–9, per pixel or per sample) or fixed (SBN's one-hot groups).

    Only x, r and (M, C)/(N, C) statistics are kept for the backward, which recomputes x − shift and
    applies the hand-derived chain rule: through the mixed affine, the weighted mean/variance
    (∂μ̃_k/∂x_i = r_ik/n_k, ∂σ̃²_k/∂x_i = 2 r_ik (x_i − μ̃_k)/n_k, ∂μ̃_k/∂r_ik = (x_i − μ̃_k)/n_k,
    ∂σ̃²_k/∂r_ik = ((x_i − μ̃_k)² − σ̃²_k)/n_k), the softmax and the Gaussian log-densities
    (∂ log p_ik/∂x_i = −(x_i − μ_k)/(σ²_k + ε)). Returns (y, n, mean, var); the last three (the
    batch estimates for the running update) carry no gradient.
    """

    @staticmethod
    def forward(ctx, x4, weight, bias, prior, rmean, rvar, fixed_r, mode, batch_stats, detach, eps, shift):
        lay = _Layout(x4)
        x = lay.flat(x4)
        C, L = x.shape[lay.c], x.shape[lay.l]
        fused = mode == "pixel" and _fused(x4, weight, rmean, rvar)
        if mode == "pixel":
            s = _location(lay, x) if shift is None else shift
            mix = _mixture(prior, rmean, rvar, eps, s)
            if fused:  # Z is not written: the kernels recompute x − shift
                z, r = None, _pixel_estep_fused(x, mix)
                sums = cbn_cpu.moments(x, None, s, r)
            else:
                z, r = _pixel_estep(lay, x, mix)
                sums = lay.reduce(r, z)
            n = r.sum((0, lay.l))
            s1, s2 = sums[:, :C], sums[:, C:]
            ctx.pooled, ctx.z = None, z
        else:
            mean_s, var_s, s = _sample_stats(lay, x)
            s = s if shift is None else shift
            pc = mean_s - s
            mix = _mixture(prior, rmean, rvar, eps, s) if mode == "sample" else None
            r = _pooled_r(pc, mix) if mode == "sample" else fixed_r
            n, s1, s2 = r.sum(0) * L, L * (r.t() @ pc), L * (r.t() @ (var_s + pc * pc))
            ctx.pooled = (pc, var_s)
        ctx.denom = n.clamp_min(_MIN_MASS)[:, None]
        mean_c = s1 / ctx.denom
        var = (s2 / ctx.denom - mean_c * mean_c).clamp_min(0.0)
        ctx.alive = n > _MIN_MASS
        use_m, use_v = rmean - s, rvar
        if batch_stats:
            use_m = torch.where(ctx.alive[:, None], mean_c, use_m)
            use_v = torch.where(ctx.alive[:, None], var, use_v)
        ctx.inv, ctx.scale, ctx.offset = _affine(weight, bias, use_m, use_v, eps)
        ctx.use_m = use_m
        # the output is written into its own 4-D tensor, not returned as a view of a 3-D one: autograd
        # forbids in-place ops (ReLU(inplace=True) after the norm, torchvision's Bottleneck) on views
        # created inside a custom Function
        y4 = torch.empty(
            lay.shape, dtype=torch.promote_types(x.dtype, ctx.scale.dtype), device=x.device, memory_format=lay.format
        )
        if fused:
            cbn_cpu.mix(x, None, s, r, None, torch.stack([ctx.scale, ctx.offset], 1), None, out=y4)
        elif mode == "pixel":
            _mixed_affine(lay, r, lay.narrow(z, 0, C), ctx.scale, ctx.offset, out=lay.flat(y4))
        else:
            a = r @ ctx.scale
            torch.addcmul(lay.vec(r @ ctx.offset - s * a), x, lay.vec(a), out=lay.flat(y4))
        ctx.save_for_backward(x4)
        ctx.r, ctx.mix, ctx.shift, ctx.mean_c, ctx.var = r, mix, s, mean_c, var
        ctx.mode, ctx.fused, ctx.batch_stats, ctx.grad_r = mode, fused, batch_stats, mode != "fixed" and not detach
        mean = mean_c + s
        ctx.mark_non_differentiable(n, mean, var)
        return y4, n, mean, var

    @staticmethod
    def backward(ctx, g4, *_):
        (x4,) = ctx.saved_tensors
        lay = _Layout(x4)
        x, g = lay.flat(x4), lay.flat(g4.contiguous(memory_format=lay.format))
        if ctx.fused:
            dx, dgamma, dbeta = _pixel_backward_fused(ctx, x, g)
        elif ctx.mode == "pixel":
            dx, dgamma, dbeta = _pixel_backward(ctx, lay, x, g)
        else:
            dx, dgamma, dbeta = _sample_backward(ctx, lay, x, g)
        dx = lay.unflat(dx) if ctx.needs_input_grad[0] else None
        return dx, dgamma, dbeta, None, None, None, None, None, None, None, None, None


def _dlogits(ctx, r: torch.Tensor, dr: torch.Tensor, dim: int) -> torch.Tensor:
    """Through r = softmax(logits): r ⊙ (dr − Σ_k r dr)."""
    return r * (dr - (r * dr).sum(dim, keepdim=True))


def _pixel_backward(ctx, lay: _Layout, x: torch.Tensor, g: torch.Tensor):
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
        mix = ctx.mix
        zero = torch.zeros_like(ctx.scale)
        w = torch.cat(
            [torch.cat([ctx.scale, 2.0 * d2, lin], 1), torch.cat([zero, -mix.prec, mix.center * mix.prec], 1)], 0
        )
        t = lay.to_points(torch.cat([r, da], lay.c), w)
    else:
        t = lay.to_points(r, torch.cat([ctx.scale, 2.0 * d2, lin], 1))
    dx = torch.addcmul(lay.narrow(t, 2 * C, C), lay.narrow(t, 0, C), g)
    return dx.addcmul_(lay.narrow(t, C, C), xc), dgamma, doff


def _pixel_backward_fused(ctx, x: torch.Tensor, g: torch.Tensor):
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
        wd = torch.stack([-ctx.mix.prec, ctx.mix.center * ctx.mix.prec], 1)
    dx = cbn_cpu.mix(x, g, s, r, da, torch.stack([2.0 * d2, lin, ctx.scale], 1), wd, out=torch.empty_like(x))
    return dx, dgamma, doff


def _sample_backward(ctx, lay: _Layout, x: torch.Tensor, g: torch.Tensor):
    """Per-sample or fixed r (N, M): per-sample sums, then one broadcast multiply-add for dx."""
    L, r, s = x.shape[lay.l], ctx.r, ctx.shift
    gs = g.sum(lay.l)
    gxs = (g * x).sum(lay.l) - s * gs
    dscale, doff = r.t() @ gxs, r.t() @ gs
    d1, d2, dgamma = _stat_grads(ctx, dscale, doff)
    lin = d1 - 2.0 * d2 * ctx.mean_c
    k1, k0 = r @ (2.0 * d2), r @ lin
    if ctx.grad_r:
        pc, var_s = ctx.pooled
        dr = gxs @ ctx.scale.t() + gs @ ctx.offset.t()
        if ctx.batch_stats:
            const = (d2 * (ctx.mean_c * ctx.mean_c - ctx.var) - d1 * ctx.mean_c).sum(1)
            dr = dr + L * (pc @ lin.t() + (var_s + pc * pc) @ d2.t() + const)
        da = _dlogits(ctx, r, dr, 1)
        mix = ctx.mix
        k0 = k0 + (da @ (mix.center * mix.prec) - pc * (da @ mix.prec)) / L
    a = r @ ctx.scale
    dx = torch.addcmul(lay.vec(k0 - s * k1), x, lay.vec(k1))
    return dx.addcmul_(g, lay.vec(a)), dgamma, doff


# --------------------------------------------------------------------------------------------
# CBN
# --------------------------------------------------------------------------------------------


class CompoundBatchNorm2d(nn.Module):
    """Compound Batch Normalization (Cheng et al. 2022, Eq. 7–16) with the SBN split path (Sec. 3.3).

    The C-channel feature vectors are modelled by a mixture of M diagonal Gaussians with running
    priors π_k, means μ_k and variances σ²_k. In training (compound path) every forward is one
    moving-average EM step: the E-step uses the running mixture,
    r_ik = π_k N(x_i | μ_k, diag(σ²_k + ε)) / Σ_j π_j N(x_i | μ_j, diag(σ²_j + ε)) (log space),
    the M-step computes the batch estimates π̃_k, μ̃_k, σ̃²_k weighted by r, and the running
    statistics move towards them with the momenta α (prior), β (mean), η (variance). Branch k
    normalizes every point with component k's statistics and affine γ_k, β_k, and the output is
    y_i = Σ_k r_ik (γ_k ⊙ (x_i − μ_k)/sqrt(σ²_k + ε) + β_k). In eval the running mixture is used
    for both the responsibilities and the normalization. With M = 1, r ≡ 1 and the layer is
    exactly ``nn.BatchNorm2d``.

    While ``split_groups`` holds a LongTensor (N,) of group ids (set by :func:`split_mode`), a
    training forward takes the split path instead: the samples of group k are normalized with the
    batch mean/variance of exactly those samples and γ_k, β_k, and these statistics update
    μ_k, σ²_k (not π_k). Groups without samples are skipped. In eval the split path is ignored.

    Args:
        num_features: C.
        num_components: M, the number of Gaussian components.
        eps: ε added to the variances, in the normalization and in the E-step densities.
        prior_momentum, mean_momentum, var_momentum: the paper's α, β, η of Eq. 13–15.
        responsibilities: ``"pixel"``: one responsibility vector per point (N·H·W points, as the
            equations read); ``"sample"``: computed from each sample's spatially averaged features
            and shared by the sample's pixels (the M-step still weights every pixel).
        train_stats: which statistics normalize the branches in training, ``"batch"`` (the M-step
            estimates μ̃_k, σ̃²_k, like BatchNorm) or ``"running"`` (the running statistics before
            this step's update, the same ones the E-step uses). A component with (almost) no
            responsibility in the batch is always normalized with its running statistics.
        init: symmetry breaking. Components that start identical get identical responsibilities
            and identical M-step updates, so they never separate. ``"first_batch"``: on the first
            training forward (compound or split) the means are set to M distinct points of the batch (drawn with
            torch's global RNG; in ``"sample"`` mode M distinct samples' pooled features), the
            variances to the batch variance and the priors to 1/M. ``"random"``: at construction,
            means ~ N(0, init_std²) from torch's global RNG, variances 1, priors 1/M. With M = 1
            (nothing to break) or ``em=False`` (no compound mixture) the buffers start like
            BatchNorm's (means 0, variances 1).
        init_std: standard deviation of the ``"random"`` initial means.
        detach_responsibilities: stop gradients through r (default: gradients flow through r).
        em: ``False`` gives the "Baseline + SBN" reading: the compound path (training and eval)
            is a plain BatchNorm over the whole batch with its own buffers ``global_running_mean``,
            ``global_running_var`` and affine ``global_weight``, ``global_bias``; the M components
            and their affines serve only the split path.
        unbiased_var: running variances accumulate σ̃²_k · n_k/(n_k − 1) with the effective count
            n_k = Σ_i r_ik, which for M = 1 is BatchNorm's unbiased update. ``False`` accumulates
            the biased σ̃²_k, which makes the layer with all momenta 1 run exact batch EM.

    State: parameters ``weight``, ``bias`` (M, C); buffers ``running_prior`` (M), ``running_mean``,
    ``running_var`` (M, C), ``num_batches_tracked`` and ``initialized`` (bool; ``"first_batch"``
    initialization happens once and is remembered across ``state_dict`` round trips).
    Statistics, the E-step and the normalization run in float32 with autocast disabled; the output
    has the input's dtype and memory format. Training and eval run in one autograd Function with a
    hand-derived backward (:class:`_CompoundFunction`); on CPU, contiguous input takes the per-pixel
    path through the fused C loops of :mod:`ltbench.nn.cbn_cpu` (same results to float rounding).
    """

    split_groups: torch.Tensor | None

    def __init__(
        self,
        num_features: int,
        num_components: int = 4,
        eps: float = 1e-5,
        prior_momentum: float = 0.1,
        mean_momentum: float = 0.1,
        var_momentum: float = 0.1,
        responsibilities: str = "pixel",
        train_stats: str = "batch",
        init: str = "first_batch",
        init_std: float = 0.1,
        detach_responsibilities: bool = False,
        em: bool = True,
        unbiased_var: bool = True,
    ):
        super().__init__()
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        self.num_features = C = num_features
        self.num_components = M = num_components
        self.eps = eps
        self.prior_momentum = prior_momentum
        self.mean_momentum = mean_momentum
        self.var_momentum = var_momentum
        self.responsibilities_mode = _choice("responsibilities", responsibilities, ("pixel", "sample"))
        self.train_stats = _choice("train_stats", train_stats, ("batch", "running"))
        self.init = _choice("init", init, ("first_batch", "random"))
        self.init_std = init_std
        self.detach_responsibilities = detach_responsibilities
        self.em = em
        self.unbiased_var = unbiased_var
        self.split_groups = None

        self.weight = nn.Parameter(torch.ones(M, C))
        self.bias = nn.Parameter(torch.zeros(M, C))
        self.register_buffer("running_prior", torch.full((M,), 1.0 / M))
        self.register_buffer("running_mean", torch.zeros(M, C))
        self.register_buffer("running_var", torch.ones(M, C))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        needs_init = em and M > 1
        if needs_init and init == "random":
            with torch.no_grad():
                self.running_mean.normal_(0.0, init_std)
        self.register_buffer("initialized", torch.tensor(not (needs_init and init == "first_batch")))
        self._initialized_cache: bool | None = None  # host copy of `initialized`, avoids a sync per step
        self._eval_cache: tuple | None = None  # see _eval_constants
        if not em:
            self.global_weight = nn.Parameter(torch.ones(C))
            self.global_bias = nn.Parameter(torch.zeros(C))
            self.register_buffer("global_running_mean", torch.zeros(C))
            self.register_buffer("global_running_var", torch.ones(C))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_components={self.num_components}, eps={self.eps}, "
            f"momenta(prior, mean, var)=({self.prior_momentum}, {self.mean_momentum}, {self.var_momentum}), "
            f"responsibilities={self.responsibilities_mode}, train_stats={self.train_stats}, "
            f"init={self.init}, detach_responsibilities={self.detach_responsibilities}, em={self.em}, "
            f"unbiased_var={self.unbiased_var}"
        )

    # ---- state ---------------------------------------------------------------------------

    def reset_running_stats(self) -> None:
        """Back to the state after construction (``"random"`` redraws the means)."""
        M = self.num_components
        with torch.no_grad():
            self.running_prior.fill_(1.0 / M)
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()
            needs_init = self.em and M > 1
            if needs_init and self.init == "random":
                self.running_mean.normal_(0.0, self.init_std)
            self.initialized.fill_(not (needs_init and self.init == "first_batch"))
            if not self.em:
                self.global_running_mean.zero_()
                self.global_running_var.fill_(1.0)
        self._initialized_cache = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._initialized_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def _is_initialized(self) -> bool:
        if not self._initialized_cache:
            self._initialized_cache = bool(self.initialized)
        return self._initialized_cache

    @torch.no_grad()
    def _init_from_batch(self, x: torch.Tensor) -> None:
        """``"first_batch"``: means from M distinct points (or samples), batch variance, uniform prior."""
        N, C, L = x.shape
        M = self.num_components
        if self.responsibilities_mode == "pixel":
            points = x.permute(0, 2, 1).reshape(N * L, C)
        else:
            points = x.mean(2)
        P = points.shape[0]
        idx = torch.randperm(P, device=x.device)[torch.arange(M, device=x.device) % P]
        self.running_mean.copy_(points[idx])
        self.running_var.copy_(x.var(dim=(0, 2), unbiased=False).expand(M, C))
        self.running_prior.fill_(1.0 / M)
        self.initialized.fill_(True)
        self._initialized_cache = True

    # ---- E-step --------------------------------------------------------------------------

    def _running_shift(self) -> torch.Tensor:
        return (self.running_prior[:, None] * self.running_mean).sum(0)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """The E-step under the running mixture: r (N, M, H, W) for input x (N, C, H, W)."""
        N, C, H, W = x.shape
        M = self.num_components
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            x4 = x.float()
            if M == 1:
                return x4.new_ones(N, 1, H, W)
            lay = _Layout(x4)
            xf = lay.flat(x4)
            mix = _mixture(self.running_prior, self.running_mean, self.running_var, self.eps, self._running_shift())
            if self.responsibilities_mode == "sample":
                r = _pooled_r(xf.mean(lay.l) - mix.shift, mix)
                return r[:, :, None, None].expand(N, M, H, W)
            return lay.unflat(_pixel_estep(lay, xf, mix)[1], M)

    # ---- diagnostics (read-only: no buffer or parameter changes) --------------------------

    @torch.no_grad()
    def component_spread(self) -> float:
        """How far apart the running component means are, in units of the features' scale:
        mean over channels c of std_k(μ_kc) / sqrt(mean_k σ²_kc + ε) (population std over the M
        components). 0 for M = 1 or fully collapsed components; ~1 when the means are a standard
        deviation apart."""
        if self.num_components == 1:
            return 0.0
        spread = self.running_mean.float().std(0, unbiased=False) / (self.running_var.float().mean(0) + self.eps).sqrt()
        return float(spread.mean())

    @torch.no_grad()
    def confident_points(self, x: torch.Tensor, threshold: float = 0.9) -> tuple[torch.Tensor, int]:
        """(count on x's device, total): the points of x (N·H·W pixels) whose largest responsibility
        under the running mixture (Eq. 8–9, :meth:`responsibilities`) exceeds ``threshold``."""
        r = self.responsibilities(x)
        return (r.amax(1) > threshold).sum(), r[:, 0].numel()

    # ---- forward -------------------------------------------------------------------------

    def train(self, mode: bool = True):
        self._eval_cache = None
        return super().train(mode)

    def _batchnorm_exact(self) -> bool:
        """Whether the current call is exactly ``F.batch_norm`` (M = 1 with BatchNorm's update rule,
        or ``em=False``'s global path): then it is computed by it, bit for bit ``nn.BatchNorm2d``."""
        single = not self.em or self.num_components == 1
        if self.training and self.em and self.train_stats != "batch":
            return False
        return single and (not self.training or (self.mean_momentum == self.var_momentum and self.unbiased_var))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D input (N, C, H, W), got {x.dim()}-D")
        with torch.autocast(x.device.type, enabled=False):
            x4 = x.float()
            split = self.training and self.split_groups is not None
            if split and self.split_groups.shape != (x.shape[0],):
                raise ValueError(f"split_groups must have shape ({x.shape[0]},), got {tuple(self.split_groups.shape)}")
            if self._batchnorm_exact() and (self.num_components == 1 or not split):
                y = self._batchnorm(x4, global_path=not self.em and not split)
            elif not self.training:
                y = self._eval(x4)
            elif split:
                y = self._train_split(x4, self.split_groups)
            elif self.em:
                y = self._train_compound(x4)
            else:
                y = self._train_global(x4)
        return y.to(dtype=x.dtype)

    def _batchnorm(self, x: torch.Tensor, global_path: bool) -> torch.Tensor:
        """M = 1 (r ≡ 1) or the ``em=False`` compound path: ``F.batch_norm`` on the matching buffers."""
        if global_path:
            w, b, rm, rv = self.global_weight, self.global_bias, self.global_running_mean, self.global_running_var
        else:
            w, b, rm, rv = self.weight[0], self.bias[0], self.running_mean[0], self.running_var[0]
        if self.training:
            self.num_batches_tracked.add_(1)
            if not global_path:
                with torch.no_grad():
                    self.running_prior.lerp_(torch.ones_like(self.running_prior), self.prior_momentum)
        return F.batch_norm(x, rm, rv, w, b, self.training, self.mean_momentum, self.eps)

    def _apply_fn(self, x, r, mode, batch_stats, shift=None, weight=None, bias=None, buffers=None):
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        prior, mean, var = buffers or (self.running_prior, self.running_mean, self.running_var)
        return _CompoundFunction.apply(
            x, weight, bias, prior, mean, var, r, mode, batch_stats, self.detach_responsibilities, self.eps, shift
        )

    def _train_compound(self, x: torch.Tensor) -> torch.Tensor:
        """One moving-average EM step on x (Eq. 8–15) and the compound output (Eq. 16)."""
        N, C, H, W = x.shape
        if self.num_components > 1 and not self._is_initialized():
            self._init_from_batch(x.reshape(N, C, H * W))
        self.num_batches_tracked.add_(1)
        y, n, mean, var = self._apply_fn(x, None, self.responsibilities_mode, self.train_stats == "batch")
        with torch.no_grad():
            self.running_prior.lerp_(n / (N * H * W), self.prior_momentum)
            self._update(self.running_mean, self.running_var, n, mean, var, n > _MIN_MASS)
        return y

    def _train_split(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """SBN: group k's samples normalized with their own batch statistics and γ_k, β_k."""
        N, C, H, W = x.shape
        M = self.num_components
        if self.em and M > 1 and not self._is_initialized():
            self._init_from_batch(x.reshape(N, C, H * W))
        self.num_batches_tracked.add_(1)
        onehot = (groups[:, None] == torch.arange(M, device=groups.device)).to(x.dtype)  # (N, M)
        y, n, mean, var = self._apply_fn(x, onehot, "fixed", True)
        with torch.no_grad():
            self._update(self.running_mean, self.running_var, n, mean, var, n > _MIN_MASS)
        return y

    def _train_global(self, x: torch.Tensor) -> torch.Tensor:
        """``em=False`` compound path with momenta BatchNorm cannot express: BatchNorm over the batch."""
        self.num_batches_tracked.add_(1)
        gm, gv = self.global_running_mean[None], self.global_running_var[None]
        y, n, mean, var = self._apply_fn(
            x,
            x.new_ones(x.shape[0], 1),
            "fixed",
            True,
            weight=self.global_weight[None],
            bias=self.global_bias[None],
            buffers=(self.running_prior[:1], gm, gv),
        )
        with torch.no_grad():
            self._update(gm, gv, n, mean, var, n > 0)
        return y

    def _eval(self, x: torch.Tensor) -> torch.Tensor:
        """Test time (M > 1, EM): the compound path with the running statistics only. Without autograd
        the E-step weights and the per-component affine come from a cache (:meth:`_eval_constants`):
        then the layer costs one pass for [x − shift | (x − shift)²], one matmul to log r, a softmax
        over M, one matmul for the mixed affine and one multiply-add."""
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or self.bias.requires_grad):
            return self._apply_fn(x, None, self.responsibilities_mode, False, shift=self._running_shift())[0]
        mix, scale, offset = self._eval_constants()
        lay = _Layout(x)
        xf = lay.flat(x)
        if self.responsibilities_mode == "pixel" and _fused(x, scale, offset, mix.estep):
            r = _pixel_estep_fused(xf, mix)
            return cbn_cpu.mix(
                xf, None, mix.shift, r, None, torch.stack([scale, offset], 1), None, out=torch.empty_like(x)
            )
        if self.responsibilities_mode == "pixel":
            z, r = _pixel_estep(lay, xf, mix)
            return lay.unflat(_mixed_affine(lay, r, lay.narrow(z, 0, x.shape[1]), scale, offset))
        r = _pooled_r(xf.mean(lay.l) - mix.shift, mix)
        a = r @ scale
        return lay.unflat(torch.addcmul(lay.vec(r @ offset - mix.shift * a), xf, lay.vec(a)))

    def _eval_constants(self) -> tuple[_Mixture, torch.Tensor, torch.Tensor]:
        """E-step weights and the affine of every component under the running statistics, recomputed
        only when a parameter or buffer changed (storage or in-place version) or after ``train()``."""
        tensors = (self.weight, self.bias, self.running_prior, self.running_mean, self.running_var)
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._eval_cache is None or self._eval_cache[0] != key:
            with torch.no_grad():
                mix = _mixture(self.running_prior, self.running_mean, self.running_var, self.eps, self._running_shift())
                _, scale, offset = _affine(self.weight, self.bias, mix.center, self.running_var, self.eps)
            self._eval_cache = (key, mix, scale, offset)
        return self._eval_cache[1:]

    def _update(
        self,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        n: torch.Tensor,
        mean: torch.Tensor,
        var: torch.Tensor,
        alive: torch.Tensor,
    ) -> None:
        """Eq. 14–15 in place for the components in ``alive`` (others keep their values)."""
        if self.unbiased_var:
            var = var * _bessel(n)[:, None]
        keep = ~alive[:, None]
        running_mean.copy_(torch.where(keep, running_mean, running_mean.lerp(mean.detach(), self.mean_momentum)))
        running_var.copy_(torch.where(keep, running_var, running_var.lerp(var.detach(), self.var_momentum)))


# --------------------------------------------------------------------------------------------
# NBN
# --------------------------------------------------------------------------------------------


class NormalizedBatchNorm2d(nn.BatchNorm2d):
    """Normalizing Batch Normalization (Bao et al. 2025, public code).

    ``nn.BatchNorm2d`` (batch statistics in training, running statistics in eval) whose affine is
    used as w = α_w · γ / (‖γ‖₂ + 1e-6) and b = α_b · β / (‖β‖₂ + 1e-6), the norms over the C
    channels. The magnitude parameters start at 1.0.

    Args:
        num_features, eps, momentum: as ``nn.BatchNorm2d``.
        alpha: how magnitudes are shared. The layer itself always owns its parameter ``alpha``
            (used for weight and bias) or, for ``"separate"``, ``alpha`` (weight) and
            ``alpha_bias`` (bias). :func:`apply` with ``"shared"`` then makes all layers it
            installs use one ``alpha`` Parameter; ``"per_layer"`` keeps one per layer.
        alpha_weight_decay: whether the magnitudes get weight decay (read by :func:`param_groups`).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        alpha: str = "shared",
        alpha_weight_decay: bool = True,
    ):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.alpha_mode = _choice("alpha", alpha, ALPHA_MODES)
        self.alpha_weight_decay = alpha_weight_decay
        self.alpha = nn.Parameter(torch.ones(()))
        self.alpha_bias = nn.Parameter(torch.ones(())) if alpha == "separate" else None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha_mode}, alpha_weight_decay={self.alpha_weight_decay}"

    def alpha_parameters(self) -> list[nn.Parameter]:
        return [self.alpha] if self.alpha_bias is None else [self.alpha, self.alpha_bias]

    def effective_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, b), the weight and bias BatchNorm applies."""
        alpha_b = self.alpha if self.alpha_bias is None else self.alpha_bias
        w = self.alpha * self.weight / (torch.linalg.vector_norm(self.weight) + 1e-6)
        b = alpha_b * self.bias / (torch.linalg.vector_norm(self.bias) + 1e-6)
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        w, b = self.effective_affine()
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, w, b, self.training, self.momentum, self.eps)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@NORMS.register("bn")
def batchnorm(num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> nn.Module:
    """Plain ``nn.BatchNorm2d``."""
    return nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)


NORMS.register("cbn")(CompoundBatchNorm2d)
NORMS.register("nbn")(NormalizedBatchNorm2d)


def make(name: str, num_features: int, **options: Any) -> nn.Module:
    """One layer of the registered kind ``name`` for ``num_features`` channels."""
    return NORMS.get(name)(num_features, **options)


def factory(name: str = "bn", options: Mapping[str, Any] | None = None) -> Callable[[int], nn.Module]:
    """``norm_layer`` callable for a backbone: ``factory("bn")(64)`` builds one layer."""
    NORMS.get(name)  # fail early on an unknown name
    return partial(make, name, **dict(options or {}))


# --------------------------------------------------------------------------------------------
# Model surgery
# --------------------------------------------------------------------------------------------


def _is_bn(module: nn.Module) -> bool:
    return type(module) is nn.BatchNorm2d  # layers installed by `apply` (NBN included) are left alone


def _last_stage(model: nn.Module) -> nn.Module:
    for attr in ("layer4", "layer3"):
        if isinstance(getattr(model, attr, None), nn.Module):
            return getattr(model, attr)
    raise ValueError(f"{type(model).__name__} has neither layer4 nor layer3: no last stage to normalize")


def _in_scope(model: nn.Module, scope: str) -> list[nn.Module]:
    """The BatchNorm2d modules of ``model`` that ``scope`` selects (see :func:`apply`)."""
    _choice("norm scope", scope, SCOPES)
    if scope == "all":
        return [m for m in model.modules() if _is_bn(m)]
    stage = _last_stage(model)
    if scope == "last_stage_all":
        return [m for m in stage.modules() if _is_bn(m)]
    chosen = []
    for block in stage.children():
        own = [m for m in block.children() if _is_bn(m)]
        chosen += own[-1:]
        shortcut = getattr(block, "downsample", None)
        if isinstance(shortcut, nn.Module):
            chosen += [m for m in shortcut.modules() if _is_bn(m)]
    return chosen


def apply(model: nn.Module, name: str, scope: str = "all", **options: Any) -> nn.Module:
    """Replace the ``nn.BatchNorm2d`` layers of ``model`` in ``scope`` by ``make(name, C, **options)``.

    Scopes: ``"all"``: every BatchNorm2d. ``"last_stage"`` (NBN's public code): in the last stage
    (``model.layer4`` if present, else ``model.layer3`` as in the CIFAR ResNets) the last BN of
    each residual block (``bn2`` of a BasicBlock, ``bn3`` of a Bottleneck) and the BNs of a
    ``downsample`` shortcut. ``"last_stage_all"``: every BN of the last stage. Only modules whose
    type is exactly ``nn.BatchNorm2d`` are replaced; the new layers go to the device of the ones
    they replace. NBN layers installed with ``alpha="shared"`` (the default) all use one ``alpha``
    Parameter. Works in place and returns ``model``.
    """
    NORMS.get(name)  # unknown name: KeyError before anything changes
    targets = {id(m) for m in _in_scope(model, scope)}
    installed: list[nn.Module] = []
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in targets:
                layer = make(name, child.num_features, **options).to(device=child.weight.device)
                setattr(parent, child_name, layer)
                installed.append(layer)
    shared = [m for m in installed if isinstance(m, NormalizedBatchNorm2d) and m.alpha_mode == "shared"]
    for layer in shared[1:]:
        layer.alpha = shared[0].alpha
    return model


def _alpha_parameters(model: nn.Module, alpha_weight_decay: bool | None) -> list[nn.Parameter]:
    """NBN magnitudes that get no weight decay (each once)."""
    found: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, NormalizedBatchNorm2d):
            decay = m.alpha_weight_decay if alpha_weight_decay is None else alpha_weight_decay
            if not decay:
                found.update((id(p), p) for p in m.alpha_parameters())
    return list(found.values())


def param_groups(model: nn.Module, weight_decay: float, alpha_weight_decay: bool | None = True) -> list[dict]:
    """SGD parameter groups: every parameter once, with ``weight_decay`` except the NBN magnitudes
    when ``alpha_weight_decay`` is False (those form a group with weight decay 0).

    ``alpha_weight_decay=None`` uses each NBN layer's own ``alpha_weight_decay`` flag.
    """
    no_decay = {id(p) for p in _alpha_parameters(model, alpha_weight_decay)}
    params = list(model.parameters())  # shared parameters appear once
    groups = [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def rectify_logits(model: nn.Module) -> nn.Module:
    """NBN's logit rectification: ``model.fc`` becomes ``Sequential(fc, BatchNorm1d(K, affine=False))``.

    The original Linear stays as ``model.fc[0]``. In place; returns ``model``.
    """
    fc = model.fc
    if not isinstance(fc, nn.Linear):
        raise TypeError(f"rectify_logits expects model.fc to be nn.Linear, got {type(fc).__name__}")
    bn = nn.BatchNorm1d(fc.out_features, affine=False).to(device=fc.weight.device)
    model.fc = nn.Sequential(fc, bn)
    return model


def compound_layers(model: nn.Module) -> list[tuple[str, CompoundBatchNorm2d]]:
    """(qualified name, layer) of every CBN layer of ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, CompoundBatchNorm2d)]


def implementation(model: nn.Module, device: torch.device, channels_last: bool = False) -> str | None:
    """What runs the per-pixel path of the model's CBN layers (``metrics.json`` records it): None without
    such layers (M > 1, EM, per-pixel responsibilities), ``"torch"`` on a GPU or for channels_last activations, else
    :func:`ltbench.nn.cbn_cpu.describe` (``"c"``, ``"torch"`` or ``"torch (why)"``)."""
    if not any(m.em and m.num_components > 1 and m.responsibilities_mode == "pixel" for _, m in compound_layers(model)):
        return None
    return "torch" if device.type != "cpu" or channels_last else cbn_cpu.describe()


def class_groups(num_classes: int, num_groups: int) -> torch.Tensor:
    """SBN's uniform split by class index: group of class c = ⌊c·M/K⌋, a LongTensor (K,)."""
    if num_groups < 1 or num_classes < 1:
        raise ValueError(f"need num_classes >= 1 and num_groups >= 1, got {num_classes}, {num_groups}")
    return torch.arange(num_classes) * num_groups // num_classes


@contextmanager
def split_mode(model: nn.Module, groups_per_sample: torch.Tensor) -> Iterator[nn.Module]:
    """Run every CBN layer of ``model`` in split (SBN) mode while the context is active.

    ``groups_per_sample`` is a LongTensor (N,) with each sample's group id in [0, M), on the
    batch's device (e.g. ``class_groups(K, M).to(device)[labels]``). The previous mode of each
    layer is restored on exit, also when the body raises. Layers other than CBN are unaffected,
    and CBN layers in eval mode ignore split mode.
    """
    if groups_per_sample.dim() != 1 or groups_per_sample.dtype != torch.long:
        raise ValueError("groups_per_sample must be a 1-D LongTensor of group ids")
    layers = [m for m in model.modules() if isinstance(m, CompoundBatchNorm2d)]
    if layers and groups_per_sample.device.type == "cpu" and len(groups_per_sample):  # no host sync on GPUs
        lo, hi = int(groups_per_sample.min()), int(groups_per_sample.max())
        M = min(m.num_components for m in layers)
        if lo < 0 or hi >= M:
            raise ValueError(f"group ids must lie in [0, {M}), got ids from {lo} to {hi}")
    previous = [m.split_groups for m in layers]
    for m in layers:
        m.split_groups = groups_per_sample
    try:
        yield model
    finally:
        for m, old in zip(layers, previous):
            m.split_groups = old
