"""The decoupled classifier stage: cRT, τ-normalization and LWS (Kang et al. 2020), CBN Table 3 DT.

After the representation epochs the backbone is frozen and only a classifier head is learned
(or, for τ-normalization, the classifier is rescaled post hoc). ``dt`` is a recipe's
``decoupled`` dict (keys ``enabled``, ``fraction``, ``classifier``, ``sampler``, ``reweight``,
``reinit``, ``lr``, ``tau``, ``backbone_mode``; missing keys take the defaults of
``methods.DEFAULT_RECIPE["decoupled"]``). The stage's sampler is chosen by the caller
(``ltbench.nn.sampling``); re-weighting (RW) is applied here, in :class:`StageLoss`.

The model is a backbone with ``model.features(x) -> (N, D)`` and its classifier ``model.fc``:
an ``nn.Linear``, or, with NBN logit rectification, ``nn.Sequential(nn.Linear,
nn.BatchNorm1d(K, affine=False))``. The rectification BatchNorm1d is part of the classifier: it
is applied (in eval mode, running statistics frozen) to the linear logits in training and is
folded into the test-time weights.

Choices the papers leave open, made here:

- Frozen features are computed under ``torch.no_grad`` with the backbone in the mode
  ``dt["backbone_mode"]`` names: ``train`` (default; Kang et al.'s classifier-balancing code keeps
  every network in train mode in this stage: BN normalizes with the stage's (class-balanced) batch
  statistics and its running statistics move towards them, so the test-time backbone changes in
  this stage although no weight does) or ``eval`` (running statistics, no update). :class:`StageLoss`
  leaves the model in that mode. The rectification BatchNorm1d stays in eval mode either way (it is
  part of the frozen classifier).
- ``crt``: the classifier Linear is the head; with ``reinit`` it is re-initialized as
  ``nn.Linear.reset_parameters`` does (Kaiming-uniform, a = √5; bias U(±1/√D)), from the global
  RNG. The loss is the recipe's criterion.
- ``lws``: a per-class scale s (init 1) multiplies the frozen classifier's logits, bias and
  rectification included: z = s ⊙ fc(f), as Kang et al.'s code scales ``fc(x)``. ``reinit`` is
  ignored (re-initializing would discard the classifier that LWS rescales).
- ``tau_norm``: post hoc, no training: the test weights are w_c / ‖w_c‖^τ with τ = ``dt["tau"]``
  and **no bias**, as in Kang et al.'s τ-normalization code (logits = f · pnorm(W, τ)ᵀ). With
  rectification, w_c and the bias are those of the folded Linear∘BatchNorm1d. ``reinit`` is
  ignored.
- RW: ``dt["reweight"]`` weights each sample's ``criterion.per_sample`` value by its class
  weight (``losses.class_weights``, cb with β = 0.9999 or inverse), Σ w_y l_i / Σ w_y; any
  weighting configured on the criterion itself is not applied in this stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, cast

import torch
import torch.nn as nn

from ltbench.nn import losses
from ltbench.registry import Factory, Registry
from ltbench.spec.methods import DEFAULT_RECIPE

STAGES: Registry[Factory] = Registry("decoupled classifier")
BACKBONE_MODES = ("train", "eval")
POST_HOC = (
    "τ-normalization (classifier: tau_norm) is post hoc and has no training step; "
    "skip the classifier-stage epochs and call eval_model"
)


def _options(dt: Mapping[str, Any]) -> dict:
    return {**DEFAULT_RECIPE["decoupled"], **dt}


class Backbone(Protocol):
    """What every backbone of :data:`ltbench.nn.backbones.BACKBONES` has besides ``forward``."""

    def features(self, x: torch.Tensor) -> torch.Tensor: ...


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's pooled features of ``x`` (the classifier's input)."""
    return cast(Backbone, model).features(x)


def classifier_layers(model: nn.Module) -> tuple[nn.Linear, nn.BatchNorm1d | None]:
    """(the classifier Linear, the rectification BatchNorm1d or None) of ``model.fc``."""
    fc = model.fc
    if isinstance(fc, nn.Linear):
        return fc, None
    if (
        isinstance(fc, nn.Sequential)
        and len(fc) == 2
        and isinstance(fc[0], nn.Linear)
        and isinstance(fc[1], nn.BatchNorm1d)
    ):
        return fc[0], fc[1]
    raise TypeError(f"model.fc must be nn.Linear or nn.Sequential(nn.Linear, nn.BatchNorm1d); got {fc}")


@torch.no_grad()
def folded_weights(linear: nn.Linear, rect: nn.BatchNorm1d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of the affine map ``rect(linear(f))`` with ``rect`` in eval mode (copies)."""
    w = linear.weight.detach().clone()
    b = linear.bias.detach().clone() if linear.bias is not None else w.new_zeros(w.shape[0])
    if rect is None:
        return w, b
    if rect.running_mean is None or rect.running_var is None:
        raise ValueError("the rectification BatchNorm1d has no running statistics; it cannot be frozen")
    scale = (rect.running_var + rect.eps).rsqrt()
    shift = -rect.running_mean * scale
    if rect.affine:
        scale, shift = scale * rect.weight, shift * rect.weight + rect.bias
    return w * scale[:, None], b * scale + shift


class LearnableWeightScaling(nn.Module):
    """LWS head: per-class scales s (init 1) on the frozen classifier's logits, z = s ⊙ fc(f)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(num_classes))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.scale


class PostHoc(nn.Module):
    """The τ-normalization 'head': no parameters and no training (the stage is post hoc)."""


class DecoupledModel(nn.Module):
    """Test-time model: ``classifier(backbone.features(x))`` with the staged classifier as one Linear.

    ``backbone`` is the trained model (its own ``fc`` included, unused here); ``classifier`` holds
    the effective test weights (rectification folded in).
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(features(self.backbone, x))


class Stage:
    """One way of learning the classifier on frozen features."""

    trainable = True

    def setup(self, linear: nn.Linear, dt: Mapping, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def logits(self, model: nn.Module, head: nn.Module, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def test_weights(self, model: nn.Module, head: nn.Module, dt: Mapping) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


@STAGES.register("crt")
class ClassifierRetraining(Stage):
    """cRT: retrain the classifier Linear (re-initialized when ``reinit``) on frozen features."""

    def setup(self, linear: nn.Linear, dt: Mapping[str, Any], num_classes: int) -> nn.Module:
        if dt["reinit"]:
            linear.reset_parameters()
        linear.requires_grad_(True)
        return linear

    def logits(self, model: nn.Module, head: nn.Module, features: torch.Tensor) -> torch.Tensor:
        _, rect = classifier_layers(model)
        z = head(features)
        return rect(z) if rect is not None else z

    def test_weights(
        self, model: nn.Module, head: nn.Module, dt: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return folded_weights(*classifier_layers(model))


@STAGES.register("lws")
class WeightScaling(Stage):
    """LWS: learn per-class scales of the frozen classifier's logits."""

    def setup(self, linear: nn.Linear, dt: Mapping[str, Any], num_classes: int) -> nn.Module:
        return LearnableWeightScaling(num_classes).to(linear.weight.device)

    def logits(self, model: nn.Module, head: nn.Module, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = cast(nn.Module, model.fc)(features)
        return head(z)

    def test_weights(
        self, model: nn.Module, head: nn.Module, dt: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = folded_weights(*classifier_layers(model))
        s = cast(LearnableWeightScaling, head).scale.detach()
        return w * s[:, None], b * s


@STAGES.register("tau_norm")
class TauNormalization(Stage):
    """τ-normalization: test weights w_c / ‖w_c‖^τ, bias dropped; nothing is trained."""

    trainable = False

    def setup(self, linear: nn.Linear, dt: Mapping[str, Any], num_classes: int) -> nn.Module:
        return PostHoc()

    def logits(self, model: nn.Module, head: nn.Module, features: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(POST_HOC)

    def test_weights(
        self, model: nn.Module, head: nn.Module, dt: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, _ = folded_weights(*classifier_layers(model))
        norms = w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return w / norms.pow(float(dt["tau"])), None


def _stage(dt: Mapping) -> Stage:
    return STAGES.get(dt["classifier"])()


def setup_stage(model: nn.Module, dt: Mapping[str, Any], num_classes: int) -> nn.Module:
    """Freeze every model parameter and return the trainable head for ``dt["classifier"]``.

    crt: the classifier Linear itself (part of ``model``; re-initialized if ``reinit``).
    lws: a :class:`LearnableWeightScaling` module, *not* part of ``model`` (checkpoint it apart).
    tau_norm: a :class:`PostHoc` module without parameters (there is nothing to optimize).
    """
    dt = _options(dt)
    stage = _stage(dt)
    for p in model.parameters():
        p.requires_grad_(False)
    linear, _ = classifier_layers(model)
    if linear.out_features != num_classes:
        raise ValueError(f"model.fc has {linear.out_features} outputs, expected {num_classes}")
    return stage.setup(linear, dt, num_classes)


class StageLoss:
    """The classifier stage's loss, set up once when the stage starts: ``(model, head, x, y)`` →
    (loss, logits) of one batch; gradients reach only ``head``.

    Features come from the backbone in ``dt["backbone_mode"]`` (train: batch statistics, running
    statistics updated; eval: running statistics) under ``torch.no_grad``; the loss is
    ``criterion.per_sample`` reduced with class weights of kind ``dt["reweight"]`` ("none" =
    plain mean), computed here once from ``counts`` (on its device). Raises ``RuntimeError`` for
    tau_norm, which is not trained, and ``ValueError`` for an unknown backbone mode.
    """

    def __init__(self, dt: Mapping[str, Any], criterion: losses.Loss, counts: torch.Tensor) -> None:
        dt = _options(dt)
        self.stage = _stage(dt)
        if not self.stage.trainable:
            raise RuntimeError(POST_HOC)
        if dt["backbone_mode"] not in BACKBONE_MODES:
            raise ValueError(
                f"decoupled.backbone_mode must be one of {', '.join(BACKBONE_MODES)}, not {dt['backbone_mode']!r}"
            )
        self.train_backbone = dt["backbone_mode"] == "train"
        self.criterion = criterion
        self.weight = None if dt["reweight"] == "none" else losses.class_weights(counts, dt["reweight"])

    def __call__(
        self, model: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model.train(self.train_backbone)
        _, rect = classifier_layers(model)
        if rect is not None:
            rect.eval()
        with torch.no_grad():
            feats = features(model, x)
        logits = self.stage.logits(model, head, feats).float()
        return losses.weighted_mean(self.criterion.per_sample(logits, y), y, self.weight), logits


def stage_loss(
    model: nn.Module,
    head: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: losses.Loss,
    dt: Mapping[str, Any],
    counts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of one classifier-stage batch (:class:`StageLoss`; a training loop builds that
    once and calls it every step)."""
    return StageLoss(dt, criterion, counts)(model, head, x, y)


def tau_grid(dt: Mapping[str, Any]) -> list[float]:
    """The τ values of ``dt["tau_grid"]`` = [start, stop, step], stop included (Kang et al.: 0, 0.1, …, 2)."""
    start, stop, step = (float(v) for v in _options(dt)["tau_grid"])
    if step <= 0 or stop < start:
        raise ValueError(f"decoupled.tau_grid {[start, stop, step]}: need step > 0 and stop >= start")
    return [round(start + i * step, 10) for i in range(int(round((stop - start) / step)) + 1)]


@torch.no_grad()
def select_tau(
    model: nn.Module, val_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], grid: list[float]
) -> tuple[float, dict[float, float]]:
    """(τ, {τ: balanced val accuracy %}) for τ-normalization, chosen on a validation split (Kang et al.).

    ``val_batches`` yields (normalized images, labels), e.g. a source's ``val()``: never the test
    set. Features come from the backbone in eval mode, once; for each τ of ``grid`` the logits are
    f · (w_c / ‖w_c‖^τ)ᵀ without bias (:class:`TauNormalization`) and the score is the mean per-class
    accuracy over the classes present in the split. Ties go to the first τ of the grid.
    """
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for x, y in val_batches:
        feats.append(features(model, x).float())
        labels.append(y)
    model.train(was_training)
    if not labels:
        raise ValueError("the validation split is empty: τ cannot be selected")
    f, y = torch.cat(feats), torch.cat(labels)
    w, _ = folded_weights(*classifier_layers(model))
    norms = w.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    present = torch.bincount(y, minlength=w.shape[0]) > 0
    scores = {}
    for tau in grid:
        correct = (f @ (w.float() / norms.pow(tau)).t()).argmax(1) == y
        per_class = torch.zeros(w.shape[0], device=y.device).index_add_(0, y, correct.float())
        per_class = per_class[present] / torch.bincount(y, minlength=w.shape[0])[present]
        scores[tau] = float(100.0 * per_class.mean())
    best = max(grid, key=lambda t: (scores[t], -grid.index(t)))
    return best, scores


def eval_model(model: nn.Module, head: nn.Module, dt: Mapping[str, Any]) -> DecoupledModel:
    """A :class:`DecoupledModel` giving the staged classifier's test logits.

    The classifier is a snapshot (a new ``nn.Linear``) of the current weights: call again after
    further training. crt: the retrained Linear; lws: rows and bias times s; tau_norm:
    w_c / ‖w_c‖^τ without bias; the rectification BatchNorm1d, when present, is folded in first.
    """
    dt = _options(dt)
    w, b = _stage(dt).test_weights(model, head, dt)
    linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
        if b is not None:
            linear.bias.copy_(b)
    linear.requires_grad_(False)
    return DecoupledModel(model, linear)
