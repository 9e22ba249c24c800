"""Reference CBN for tests: a verbatim copy of ``CompoundBatchNorm2d`` as it was before the fused
implementation (commit 356afee, ltbench/nn/norm.py), kept as the straightforward reading of CBN
Eq. 7–16 and SBN against which the fast layer is compared (outputs, gradients, running statistics).
Not used by the package.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

_LOG_2PI = math.log(2.0 * math.pi)
# A component with less total responsibility than this in a batch has no usable batch statistics:
# its running statistics are left as they are and it is normalized with them.
_MIN_MASS = 1e-6


def _choice(what: str, value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; known: {', '.join(map(str, allowed))}")
    return value


# --------------------------------------------------------------------------------------------
# Weighted batch statistics shared by the compound, split and plain paths of CBN
# --------------------------------------------------------------------------------------------


def _moments(
    x: torch.Tensor, r: torch.Tensor | None, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Responsibility-weighted count, mean and biased variance of the points of ``x``.

    ``x`` is (N, C, L) float32 (L = H·W). ``r`` is ``None`` (one component owning every point),
    (N, M, L) (one weight per point) or (N, M) (one weight per sample, shared by its L points).
    ``shift`` (C,) is a constant subtracted before the sums, which keeps E[x²] − E[x]² accurate.
    Returns n (M,) = Σ_i r_ik, mean (M, C) = Σ_i r_ik x_i / n_k, var (M, C) = Σ_i r_ik (x_i − mean_k)² / n_k.
    """
    N, C, L = x.shape
    if r is None:
        var, mean = torch.var_mean(x, dim=(0, 2), correction=0)
        return x.new_full((1,), N * L), mean[None], var[None]
    xc = x - shift[:, None]
    if r.dim() == 3:
        n = r.sum((0, 2))
        s1 = torch.einsum("nkl,ncl->kc", r, xc)
        s2 = torch.einsum("nkl,ncl->kc", r, xc * xc)
    else:
        n = r.sum(0) * L
        s1 = r.t() @ xc.sum(2)
        s2 = r.t() @ (xc * xc).sum(2)
    denom = n.clamp_min(_MIN_MASS)[:, None]
    mean_c = s1 / denom
    var = (s2 / denom - mean_c * mean_c).clamp_min(0.0)
    return n, mean_c + shift, var


def _mix(x: torch.Tensor, r: torch.Tensor | None, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """y_i = Σ_k r_ik (scale_k ⊙ x_i + offset_k) for x (N, C, L), scale/offset (M, C), r as in :func:`_moments`."""
    if r is None:
        return x * scale[0, :, None] + offset[0, :, None]
    if r.dim() == 3:
        return x * torch.einsum("nkl,kc->ncl", r, scale) + torch.einsum("nkl,kc->ncl", r, offset)
    return x * (r @ scale)[:, :, None] + (r @ offset)[:, :, None]


def _affine_coefficients(
    weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """γ (x − μ)/sqrt(σ² + ε) + β written as x·scale + offset (all (M, C))."""
    scale = weight * torch.rsqrt(var + eps)
    return scale, bias - mean * scale


def _bessel(n: torch.Tensor) -> torch.Tensor:
    """BatchNorm's unbiased factor n/(n − 1) for an effective count n, bounded by 2 for n < 2."""
    return n.clamp_min(1.0) / (n - 1.0).clamp_min(1.0)


# --------------------------------------------------------------------------------------------
# CBN
# --------------------------------------------------------------------------------------------


class ReferenceCBN(nn.Module):
    """Verbatim pre-fusion CompoundBatchNorm2d (see the module docstring)."""

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
        points = x.permute(0, 2, 1).reshape(N * L, C) if self.responsibilities_mode == "pixel" else x.mean(2)
        P = points.shape[0]
        idx = torch.randperm(P, device=x.device)[torch.arange(M, device=x.device) % P]
        self.running_mean.copy_(points[idx])
        self.running_var.copy_(x.var(dim=(0, 2), unbiased=False).expand(M, C))
        self.running_prior.fill_(1.0 / M)
        self.initialized.fill_(True)
        self._initialized_cache = True

    # ---- E-step --------------------------------------------------------------------------

    def _log_responsibilities(self, points: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """log r under the running mixture for points (N, C, L) → (N, M, L) or pooled (N, C) → (N, M)."""
        C = self.num_features
        var = self.running_var + self.eps
        prec = var.reciprocal()
        mc = self.running_mean - shift
        const = self.running_prior.clamp_min(1e-12).log() - 0.5 * (
            var.log().sum(1) + C * _LOG_2PI + (mc * mc * prec).sum(1)
        )  # (M,)
        if points.dim() == 3:
            pc = points - shift[:, None]
            quad = torch.einsum("ncl,kc->nkl", pc * pc, prec) - 2.0 * torch.einsum("ncl,kc->nkl", pc, mc * prec)
            logp = const[None, :, None] - 0.5 * quad
        else:
            pc = points - shift
            quad = (pc * pc) @ prec.t() - 2.0 * (pc @ (mc * prec).t())
            logp = const[None] - 0.5 * quad
        return logp - logp.logsumexp(1, keepdim=True)

    def _responsibilities(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor | None:
        """r for x (N, C, L): (N, M, L) per pixel, (N, M) per sample, ``None`` when M = 1 (r ≡ 1)."""
        if self.num_components == 1:
            return None
        points = x if self.responsibilities_mode == "pixel" else x.mean(2)
        r = self._log_responsibilities(points, shift).exp()
        return r.detach() if self.detach_responsibilities else r

    def _running_shift(self) -> torch.Tensor:
        return (self.running_prior[:, None] * self.running_mean).sum(0)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """The E-step under the running mixture: r (N, M, H, W) for input x (N, C, H, W)."""
        N, C, H, W = x.shape
        with torch.autocast(x.device.type, enabled=False):
            x3 = x.float().reshape(N, C, H * W)
            r = self._responsibilities(x3, self._running_shift())
        if r is None:
            return x3.new_ones(N, 1, H, W)
        if r.dim() == 2:
            return r[:, :, None, None].expand(N, self.num_components, H, W)
        return r.reshape(N, self.num_components, H, W)

    # ---- forward -------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D input (N, C, H, W), got {x.dim()}-D")
        N, C, H, W = x.shape
        with torch.autocast(x.device.type, enabled=False):
            x3 = x.float().reshape(N, C, H * W)
            if not self.training:
                y = self._eval(x3)
            elif self.split_groups is not None:
                y = self._train_split(x3, self.split_groups)
            elif self.em:
                y = self._train_compound(x3)
            else:
                y = self._train_global(x3)
        fmt = (
            torch.channels_last
            if (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
            else torch.contiguous_format
        )
        return y.reshape(N, C, H, W).to(dtype=x.dtype, memory_format=fmt)

    def _train_compound(self, x: torch.Tensor) -> torch.Tensor:
        """One moving-average EM step on x (N, C, L) and the compound output (Eq. 7–16)."""
        if self.num_components > 1 and not self._is_initialized():
            self._init_from_batch(x)
        self.num_batches_tracked.add_(1)
        shift = x.mean((0, 2)).detach()
        r = self._responsibilities(x, shift)
        n, mean, var = _moments(x, r, shift)
        alive = n > _MIN_MASS
        if self.train_stats == "batch":
            norm_mean = torch.where(alive[:, None], mean, self.running_mean)
            norm_var = torch.where(alive[:, None], var, self.running_var)
        else:  # copies: the buffers are updated in place below, autograd may keep these
            norm_mean, norm_var = self.running_mean.clone(), self.running_var.clone()
        scale, offset = _affine_coefficients(self.weight, self.bias, norm_mean, norm_var, self.eps)
        with torch.no_grad():
            self.running_prior.lerp_(n / (x.shape[0] * x.shape[2]), self.prior_momentum)
            self._update(self.running_mean, self.running_var, n, mean, var, alive)
        return _mix(x, r, scale, offset)

    def _train_split(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """SBN: group k's samples normalized with their own batch statistics and γ_k, β_k."""
        M = self.num_components
        if groups.shape != (x.shape[0],):
            raise ValueError(f"split_groups must have shape ({x.shape[0]},), got {tuple(groups.shape)}")
        if self.em and M > 1 and not self._is_initialized():
            self._init_from_batch(x)
        self.num_batches_tracked.add_(1)
        onehot = (groups[:, None] == torch.arange(M, device=groups.device)).to(x.dtype)  # (N, M)
        shift = x.mean((0, 2)).detach()
        n, mean, var = _moments(x, onehot, shift)
        alive = n > _MIN_MASS
        mean = torch.where(alive[:, None], mean, self.running_mean)
        var = torch.where(alive[:, None], var, self.running_var)
        scale, offset = _affine_coefficients(self.weight, self.bias, mean, var, self.eps)
        with torch.no_grad():
            self._update(self.running_mean, self.running_var, n, mean, var, alive)
        return _mix(x, onehot, scale, offset)

    def _train_global(self, x: torch.Tensor) -> torch.Tensor:
        """``em=False`` compound path: BatchNorm over the whole batch with the global buffers."""
        self.num_batches_tracked.add_(1)
        n, mean, var = _moments(x, None, x.mean((0, 2)))
        scale, offset = _affine_coefficients(self.global_weight[None], self.global_bias[None], mean, var, self.eps)
        with torch.no_grad():
            self._update(self.global_running_mean[None], self.global_running_var[None], n, mean, var, n > 0)
        return _mix(x, None, scale, offset)

    def _eval(self, x: torch.Tensor) -> torch.Tensor:
        """Test time: the compound path with running statistics only."""
        if not self.em:
            scale, offset = _affine_coefficients(
                self.global_weight[None],
                self.global_bias[None],
                self.global_running_mean[None],
                self.global_running_var[None],
                self.eps,
            )
            return _mix(x, None, scale, offset)
        r = self._responsibilities(x, self._running_shift())
        scale, offset = _affine_coefficients(self.weight, self.bias, self.running_mean, self.running_var, self.eps)
        return _mix(x, r, scale, offset)

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
