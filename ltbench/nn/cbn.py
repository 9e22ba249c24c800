"""Compound Batch Normalization (Cheng et al., ACM MM 2022) and its split path SBN, whole in one place.

:class:`CompoundBatchNorm2d` is the layer (``norm.name: cbn``): a mixture of M Gaussians over the C
channels fitted by moving-average EM, one affine per component (compound path, Eq. 7–16), and the
class-group split normalization SBN (split path, Sec. 3.3) while :func:`split_mode` is active
(groups from :func:`class_groups`). Its arithmetic runs in the torch custom operators of
:mod:`ltbench.nn.cbn_ops` (forward, hand-derived backward, fake implementations for
``torch.compile``), whose CPU kernel uses the C loops of :mod:`ltbench.nn.cbn_cpu`. Model helpers:
:func:`compound_layers`, :func:`implementation` (which code runs, for ``metrics.json``).
``ltbench.nn.norm`` registers the layer and re-exports these names.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltbench.nn import cbn_cpu, cbn_ops
from ltbench.nn.cbn_ops import MIN_MASS, Mixture, affine, bessel, mixture
from ltbench.registry import choice

_Layer = TypeVar("_Layer", bound="CompoundBatchNorm2d")


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
    hand-derived backward: the custom operators of :mod:`ltbench.nn.cbn_ops`, which ``torch.compile``
    traces without a graph break; on CPU, contiguous input takes the per-pixel path through the fused
    C loops of :mod:`ltbench.nn.cbn_cpu` (same results to float rounding).
    """

    split_groups: torch.Tensor | None
    # buffers (registered in __init__; typed here, as torch's BatchNorm does, since Module.__getattr__ is untyped)
    running_prior: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor
    initialized: torch.Tensor
    global_running_mean: torch.Tensor  # em=False only
    global_running_var: torch.Tensor  # em=False only

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
    ) -> None:
        super().__init__()
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        self.num_features = C = num_features
        self.num_components = M = num_components
        self.eps = eps
        self.prior_momentum = prior_momentum
        self.mean_momentum = mean_momentum
        self.var_momentum = var_momentum
        self.responsibilities_mode = choice("responsibilities", responsibilities, ("pixel", "sample"))
        self.train_stats = choice("train_stats", train_stats, ("batch", "running"))
        self.init = choice("init", init, ("first_batch", "random"))
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
        initialized = not (needs_init and init == "first_batch")
        self.register_buffer("initialized", torch.tensor(initialized))
        self._initialized_cache: bool | None = initialized  # host copy of `initialized` (see _is_initialized)
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
            initialized = not (needs_init and self.init == "first_batch")
            self.initialized.fill_(initialized)
            if not self.em:
                self.global_running_mean.zero_()
                self.global_running_var.fill_(1.0)
        self._initialized_cache = initialized

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized_cache = None if self.initialized.is_meta else bool(self.initialized)

    def _is_initialized(self) -> bool:
        """The host copy of ``initialized``, so that a step needs no device sync. Eager calls read the
        buffer again while the copy is False (a hand-set buffer is seen); compiled code trusts the copy
        (reading the buffer would break the graph), which construction, :meth:`reset_running_stats`,
        ``load_state_dict`` and the first-batch initialization keep equal to the buffer."""
        if self._initialized_cache is None or not (self._initialized_cache or torch.compiler.is_compiling()):
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
            mix = mixture(self.running_prior, self.running_mean, self.running_var, self.eps, self._running_shift())
            return cbn_ops.responsibilities(x4, mix, self.responsibilities_mode)

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

    def train(self: _Layer, mode: bool = True) -> _Layer:
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
            groups = self.split_groups if self.training else None
            split = groups is not None
            if groups is not None and groups.shape != (x.shape[0],):
                raise ValueError(f"split_groups must have shape ({x.shape[0]},), got {tuple(groups.shape)}")
            if self._batchnorm_exact() and (self.num_components == 1 or not split):
                y = self._batchnorm(x4, global_path=not self.em and not split)
            elif not self.training:
                y = self._eval(x4)
            elif groups is not None:
                y = self._train_split(x4, groups)
            elif self.em:
                y = self._train_compound(x4)
            else:
                y = self._train_global(x4)
        return y.to(dtype=x.dtype)

    def _batchnorm(self, x: torch.Tensor, global_path: bool) -> torch.Tensor:
        """M = 1 (r ≡ 1) or the ``em=False`` compound path: ``F.batch_norm`` on the matching buffers."""
        w: torch.Tensor
        b: torch.Tensor
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

    def _apply_fn(
        self,
        x: torch.Tensor,
        r: torch.Tensor | None,
        mode: str,
        batch_stats: bool,
        shift: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        prior, mean, var = buffers or (self.running_prior, self.running_mean, self.running_var)
        buffers = (prior, mean, var)
        return cbn_ops.compound(
            x, weight, bias, buffers, r, mode, batch_stats, self.detach_responsibilities, self.eps, shift
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
            self._update(self.running_mean, self.running_var, n, mean, var, n > MIN_MASS)
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
            self._update(self.running_mean, self.running_var, n, mean, var, n > MIN_MASS)
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
        over M, one matmul for the mixed affine and one multiply-add. Compiled code calls the
        operator instead (its (M, C) algebra is part of the graph)."""
        grads = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or self.bias.requires_grad)
        if grads or torch.compiler.is_compiling():  # compiled: the operator, no host-side cache
            return self._apply_fn(x, None, self.responsibilities_mode, False, shift=self._running_shift())[0]
        mix, scale, offset = self._eval_constants()
        return cbn_ops.evaluate(x, mix, scale, offset, self.responsibilities_mode)

    def _eval_constants(self) -> tuple[Mixture, torch.Tensor, torch.Tensor]:
        """E-step weights and the affine of every component under the running statistics, recomputed
        only when a parameter or buffer changed (storage or in-place version) or after ``train()``."""
        tensors = (self.weight, self.bias, self.running_prior, self.running_mean, self.running_var)
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._eval_cache is None or self._eval_cache[0] != key:
            with torch.no_grad():
                mix = mixture(self.running_prior, self.running_mean, self.running_var, self.eps, self._running_shift())
                _, scale, offset = affine(self.weight, self.bias, mix.center, self.running_var, self.eps)
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
            var = var * bessel(n)[:, None]
        keep = ~alive[:, None]
        running_mean.copy_(torch.where(keep, running_mean, running_mean.lerp(mean.detach(), self.mean_momentum)))
        running_var.copy_(torch.where(keep, running_var, running_var.lerp(var.detach(), self.var_momentum)))


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
        for m, old in zip(layers, previous, strict=True):
            m.split_groups = old
