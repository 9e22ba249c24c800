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
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltbench.registry import Registry

NORMS = Registry("norm layer")

SCOPES = ("all", "last_stage", "last_stage_all")
ALPHA_MODES = ("shared", "per_layer", "separate")

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

def _moments(x: torch.Tensor, r: torch.Tensor | None, shift: torch.Tensor
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


def _affine_coefficients(weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """γ (x − μ)/sqrt(σ² + ε) + β written as x·scale + offset (all (M, C))."""
    scale = weight * torch.rsqrt(var + eps)
    return scale, bias - mean * scale


def _bessel(n: torch.Tensor) -> torch.Tensor:
    """BatchNorm's unbiased factor n/(n − 1) for an effective count n, bounded by 2 for n < 2."""
    return n.clamp_min(1.0) / (n - 1.0).clamp_min(1.0)


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
    has the input's dtype and memory format.
    """

    split_groups: torch.Tensor | None

    def __init__(self, num_features: int, num_components: int = 4, eps: float = 1e-5,
                 prior_momentum: float = 0.1, mean_momentum: float = 0.1, var_momentum: float = 0.1,
                 responsibilities: str = "pixel", train_stats: str = "batch", init: str = "first_batch",
                 init_std: float = 0.1, detach_responsibilities: bool = False, em: bool = True,
                 unbiased_var: bool = True):
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
        return (f"{self.num_features}, num_components={self.num_components}, eps={self.eps}, "
                f"momenta(prior, mean, var)=({self.prior_momentum}, {self.mean_momentum}, {self.var_momentum}), "
                f"responsibilities={self.responsibilities_mode}, train_stats={self.train_stats}, "
                f"init={self.init}, detach_responsibilities={self.detach_responsibilities}, em={self.em}, "
                f"unbiased_var={self.unbiased_var}")

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

    def _log_responsibilities(self, points: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """log r under the running mixture for points (N, C, L) → (N, M, L) or pooled (N, C) → (N, M)."""
        C = self.num_features
        var = self.running_var + self.eps
        prec = var.reciprocal()
        mc = self.running_mean - shift
        const = (self.running_prior.clamp_min(1e-12).log()
                 - 0.5 * (var.log().sum(1) + C * _LOG_2PI + (mc * mc * prec).sum(1)))  # (M,)
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
        fmt = torch.channels_last if (x.is_contiguous(memory_format=torch.channels_last)
                                      and not x.is_contiguous()) else torch.contiguous_format
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
            scale, offset = _affine_coefficients(self.global_weight[None], self.global_bias[None],
                                                 self.global_running_mean[None], self.global_running_var[None],
                                                 self.eps)
            return _mix(x, None, scale, offset)
        r = self._responsibilities(x, self._running_shift())
        scale, offset = _affine_coefficients(self.weight, self.bias, self.running_mean, self.running_var, self.eps)
        return _mix(x, r, scale, offset)

    def _update(self, running_mean: torch.Tensor, running_var: torch.Tensor, n: torch.Tensor,
                mean: torch.Tensor, var: torch.Tensor, alive: torch.Tensor) -> None:
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

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, alpha: str = "shared",
                 alpha_weight_decay: bool = True):
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
    groups = [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
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
