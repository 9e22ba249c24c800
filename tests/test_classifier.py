"""The decoupled classifier stage (cRT, LWS, τ-norm) on a ResNet-8 and random 8×8 images."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from ltbench.nn import backbones as models
from ltbench.nn import classifier, losses
from ltbench.spec.methods import DEFAULT_RECIPE

K = 10
COUNTS = torch.tensor([200.0, 120, 80, 50, 30, 20, 12, 8, 5, 3])


def make_dt(kind, **kw):
    return {**DEFAULT_RECIPE["decoupled"], "enabled": True, "classifier": kind, **kw}


def make_model(seed=0, rectified=False):
    torch.manual_seed(seed)
    model = models.build("resnet8", K, in_channels=1)
    if rectified:
        model.fc = nn.Sequential(model.fc, nn.BatchNorm1d(K, affine=False))
    model.train()
    with torch.no_grad():  # non-trivial BN running statistics
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8) * 2 + 0.5)
    return model


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, K, (16,), generator=g)


def frozen_features(model, x, backbone_mode="eval"):
    """The stage's features by hand: eval = running statistics; train = the batch's statistics
    (computed on a copy, so the model's running statistics move only in the stage itself)."""
    if backbone_mode == "train":
        model = copy.deepcopy(model)
    model.train(backbone_mode == "train")
    with torch.no_grad():
        return model.features(x)


def ref_logits(model, f):
    """fc logits by hand: f Wᵀ + b, then (z − μ)/sqrt(var + eps) for a rectified fc."""
    fc = model.fc
    lin = fc[0] if isinstance(fc, nn.Sequential) else fc
    z = f @ lin.weight.detach().T + lin.bias.detach()
    if isinstance(fc, nn.Sequential):
        bn = fc[1]
        z = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    return z


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_backbone_mode_defaults_to_kangs_train_mode():
    assert DEFAULT_RECIPE["decoupled"]["backbone_mode"] == "train"


@pytest.mark.parametrize("rectified", [False, True])
@pytest.mark.parametrize("kind", ["crt", "lws"])
def test_training_step_changes_only_the_head(data, kind, rectified):
    x, y = data
    model = make_model(rectified=rectified)
    dt = make_dt(kind, reweight="cb", backbone_mode="eval")
    head = classifier.setup_stage(model, dt, K)
    before, head_before = snapshot(model), snapshot(head)
    fc_keys = {k for k in before if k.startswith("fc.") and k.endswith(("weight", "bias"))}
    for name, p in model.named_parameters():
        assert p.requires_grad == (kind == "crt" and name in fc_keys), name
    assert len(list(head.parameters())) > 0 and all(p.requires_grad for p in head.parameters())
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    model.train()  # the stage must switch BN to eval itself
    crit = losses.make("balanced_softmax", COUNTS)
    for _ in range(2):
        loss, logits = classifier.stage_loss(model, head, x, y, crit, dt, COUNTS)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, head_after = snapshot(model), snapshot(head)
    for k in before:  # weights, BN running statistics and batch counters
        changed = not torch.equal(before[k], after[k])
        assert changed == (kind == "crt" and k in fc_keys), k
    assert all(not torch.equal(head_before[k], head_after[k]) for k in head_before)
    assert logits.shape == (16, K)
    assert not any(m.training for m in model.modules())  # left in eval mode


@pytest.mark.parametrize("rectified", [False, True])
@pytest.mark.parametrize("kind", ["crt", "lws"])
def test_train_backbone_mode_reestimates_bn_statistics_and_changes_no_weight(data, kind, rectified):
    """Kang et al.'s classifier stage: the frozen backbone in train mode, so BN normalizes with the
    batch's statistics and its running statistics move; no backbone weight and no rectification
    statistic changes."""
    x, y = data
    model = make_model(rectified=rectified)
    dt = make_dt(kind, backbone_mode="train")
    head = classifier.setup_stage(model, dt, K)
    before = snapshot(model)
    model.eval()  # the stage must switch the backbone to train mode itself
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    loss, _ = classifier.stage_loss(model, head, x, y, losses.make("ce", COUNTS), dt, COUNTS)
    loss.backward()
    opt.step()
    after = snapshot(model)
    bn_stats = [k for k in before if k.endswith(("running_mean", "running_var")) and not k.startswith("fc.")]
    assert bn_stats and all(not torch.equal(before[k], after[k]) for k in bn_stats)
    head_keys = {"fc.weight", "fc.bias", "fc.0.weight", "fc.0.bias"} if kind == "crt" else set()
    for k in before:
        if k not in bn_stats and not k.endswith("num_batches_tracked"):
            assert torch.equal(before[k], after[k]) == (k not in head_keys), k
    assert model.layer1.training and (not rectified or not model.fc[1].training)


def test_unknown_backbone_mode_is_an_error(data):
    x, y = data
    model = make_model()
    dt = make_dt("crt", backbone_mode="frozen")
    head = classifier.setup_stage(model, dt, K)
    with pytest.raises(ValueError, match="backbone_mode.*'frozen'"):
        classifier.stage_loss(model, head, x, y, losses.make("ce", COUNTS), dt, COUNTS)


def test_crt_reinit_is_nn_linear_default():
    model = make_model()
    old = model.fc.weight.detach().clone()
    torch.manual_seed(123)
    head = classifier.setup_stage(model, make_dt("crt", reinit=True), K)
    torch.manual_seed(123)
    ref = nn.Linear(model.num_features, K)
    assert head is model.fc and not torch.equal(old, model.fc.weight)
    assert torch.equal(model.fc.weight, ref.weight) and torch.equal(model.fc.bias, ref.bias)
    model = make_model()
    head = classifier.setup_stage(model, make_dt("crt", reinit=False), K)
    assert torch.equal(head.weight, old)


@pytest.mark.parametrize("backbone_mode", ["eval", "train"])
@pytest.mark.parametrize("reweight", ["none", "cb", "inverse"])
@pytest.mark.parametrize("rectified", [False, True])
def test_crt_stage_loss_closed_form(data, reweight, rectified, backbone_mode):
    x, y = data
    model = make_model(rectified=rectified)
    dt = make_dt("crt", reweight=reweight, reinit=False, backbone_mode=backbone_mode)
    head = classifier.setup_stage(model, dt, K)
    f = frozen_features(model, x, backbone_mode)
    loss, logits = classifier.stage_loss(model, head, x, y, losses.make("ce", COUNTS), dt, COUNTS)
    z = ref_logits(model, f).double().numpy()
    torch.testing.assert_close(logits, torch.tensor(z, dtype=torch.float32), rtol=1e-5, atol=1e-5)
    zn, yn = z - z.max(1, keepdims=True), y.numpy()
    ce = np.log(np.exp(zn).sum(1)) - zn[np.arange(len(yn)), yn]
    n = COUNTS.double().numpy()
    w = {"none": np.ones(K), "cb": (1 - 0.9999) / (1 - 0.9999**n), "inverse": 1 / n}[reweight][yn]
    np.testing.assert_allclose(loss.item(), (w * ce).sum() / w.sum(), rtol=1e-5)
    if backbone_mode == "eval":  # in train mode the stage moved the running statistics the test model uses
        em = classifier.eval_model(model, head, dt).eval()
        torch.testing.assert_close(em(x), torch.tensor(z, dtype=torch.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rectified", [False, True])
def test_lws_scales_logits(data, rectified):
    x, y = data
    model = make_model(rectified=rectified)
    dt = make_dt("lws", backbone_mode="eval")
    fc_before = snapshot(model.fc)
    head = classifier.setup_stage(model, dt, K)
    assert torch.equal(head.scale, torch.ones(K))
    assert all(torch.equal(v, model.fc.state_dict()[k]) for k, v in fc_before.items())  # no reinit
    with torch.no_grad():
        head.scale.copy_(torch.linspace(0.5, 2.0, K))
    _, logits = classifier.stage_loss(model, head, x, y, losses.make("ce", COUNTS), dt, COUNTS)
    ref = ref_logits(model, frozen_features(model, x)) * torch.linspace(0.5, 2.0, K)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(classifier.eval_model(model, head, dt).eval()(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.5])
@pytest.mark.parametrize("rectified", [False, True])
def test_tau_norm(data, tau, rectified):
    x, y = data
    model = make_model(rectified=rectified)
    dt = make_dt("tau_norm", tau=tau)
    head = classifier.setup_stage(model, dt, K)
    assert len(list(head.parameters())) == 0
    with pytest.raises(RuntimeError, match="post hoc"):
        classifier.stage_loss(model, head, x, y, losses.make("ce", COUNTS), dt, COUNTS)
    em = classifier.eval_model(model, head, dt).eval()
    # effective weight: the Linear, with the rectification's 1/sqrt(var + eps) folded into its rows
    lin = model.fc[0] if rectified else model.fc
    w = lin.weight.detach().double()
    if rectified:
        w = w / torch.sqrt(model.fc[1].running_var.double() + model.fc[1].eps)[:, None]
    norms = w.norm(dim=1)
    assert em.classifier.bias is None
    np.testing.assert_allclose(
        em.classifier.weight.double().norm(dim=1).numpy(), (norms ** (1 - tau)).numpy(), rtol=1e-5
    )
    ref = frozen_features(model, x).double() @ (w / norms[:, None] ** tau).T
    torch.testing.assert_close(em(x).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["crt", "lws", "tau_norm"])
def test_eval_model_state_dict_round_trip(tmp_path, data, kind):
    x, _ = data
    dt = make_dt(kind, tau=0.7)
    model = make_model(seed=0, rectified=True)
    head = classifier.setup_stage(model, dt, K)
    if kind == "lws":
        with torch.no_grad():
            head.scale.uniform_(0.5, 2.0)
    em = classifier.eval_model(model, head, dt).eval()
    torch.save(em.state_dict(), tmp_path / "model.pt")
    other = make_model(seed=1, rectified=True)
    em2 = classifier.eval_model(other, classifier.setup_stage(other, dt, K), dt).eval()
    assert not torch.allclose(em2(x), em(x))
    em2.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert torch.equal(em2(x), em(x))


def test_bad_inputs():
    model = make_model()
    with pytest.raises(KeyError, match="crt"):
        classifier.setup_stage(model, make_dt("nope"), K)
    with pytest.raises(ValueError, match="outputs"):
        classifier.setup_stage(model, make_dt("crt"), K + 1)
    model.fc = nn.Sequential(model.fc, nn.ReLU())
    with pytest.raises(TypeError, match="model.fc"):
        classifier.setup_stage(model, make_dt("crt"), K)
