"""Backbones: parameter counts, forward FLOPs, every backbone × norm combination, pretrained loading."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ltbench.nn import backbones as models
from ltbench.nn import norm

CIFAR = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
IMAGENET = ["resnet50", "resnet152", "resnext50_32x4d"]


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def forward_flops(name, size, classes):
    with torch.device("meta"):
        model = models.build(name, classes)
        x = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "name, params",
    [  # He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M
        ("resnet20", 0.27e6),
        ("resnet32", 0.46e6),
        ("resnet44", 0.66e6),
        ("resnet56", 0.85e6),
        ("resnet110", 1.7e6),
    ],
)
def test_cifar_resnet_parameter_counts(name, params):
    assert n_params(models.build(name, 10)) == pytest.approx(params, rel=0.03)


def test_forward_flops():
    # ResNet-32 ≈ 69M multiply-adds per 32×32 image (FlopCounterMode counts 2 FLOPs per MAC)
    assert forward_flops("resnet32", 32, 10) == pytest.approx(2 * 69.1e6, rel=0.02)
    assert forward_flops("resnet110", 32, 10) > 3.4 * forward_flops("resnet32", 32, 10)
    # torchvision's published GFLOPS (MACs) at 224×224: ResNet-50 4.09, ResNeXt-50 4.23, ResNet-152 11.51
    for name, gmacs in (("resnet50", 4.09), ("resnext50_32x4d", 4.23), ("resnet152", 11.51)):
        assert forward_flops(name, 224, 1000) == pytest.approx(2 * gmacs * 1e9, rel=0.02), name


def test_imagenet_backbones_match_torchvision():
    import torchvision

    for name in IMAGENET:
        ours = models.build(name, 1000)
        with torch.device("meta"):
            ref = getattr(torchvision.models, name)()
        assert n_params(ours) == n_params(ref), name
        assert list(ours.state_dict()) == list(ref.state_dict()), name


NORMS = [
    ("bn", "all", {}),
    ("nbn", "last_stage", {"alpha": "shared"}),
    ("nbn", "all", {"alpha": "shared"}),
    ("cbn", "all", {"num_components": 2, "responsibilities": "sample"}),
]


def build(name, norm_name, scope, options, classes=5):
    if scope == "all" and options.get("alpha") != "shared":
        return models.build(name, classes, 3, norm.factory(norm_name, options))
    return norm.apply(models.build(name, classes), norm_name, scope=scope, **options)


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "resnext50_32x4d", "resnet152"])
@pytest.mark.parametrize("norm_name, scope, options", NORMS, ids=[f"{n}-{s}" for n, s, _ in NORMS])
def test_every_backbone_and_norm_builds_trains_and_round_trips(name, norm_name, scope, options, tmp_path):
    torch.manual_seed(0)
    model = build(name, norm_name, scope, options)
    size = 32 if name.startswith("resnet") and name[6:].isdigit() and int(name[6:]) < 50 else 64
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(norm.param_groups(model, 1e-4), lr=1e-4)  # tiny batches: keep the step small
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    opt.step()
    if norm_name == "nbn":
        alphas = {
            id(p) for m in model.modules() if isinstance(m, norm.NormalizedBatchNorm2d) for p in m.alpha_parameters()
        }
        assert len(alphas) == 1  # one α shared by every normalized layer
        replaced = [k for k, m in model.named_modules() if isinstance(m, norm.NormalizedBatchNorm2d)]
        last = "layer4" if hasattr(model, "layer4") else "layer3"
        assert replaced and (scope == "all" or all(k.startswith(last) for k in replaced))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    again = build(name, norm_name, scope, options)
    again.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    model.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert model.features(x).shape == (4, model.fc.in_features)


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    src = models.build("resnet50", 1000)
    torch.save(src.state_dict(), tmp_path / "imagenet.pt")
    dst = models.load_pretrained(models.build("resnet50", 365), tmp_path / "imagenet.pt")
    s, d = src.state_dict(), dst.state_dict()
    assert all(torch.equal(s[k], d[k]) for k in d if not k.startswith("fc."))
    assert d["fc.weight"].shape == (365, 2048)
    # a CBN backbone takes the BN affine into every component
    cbn = models.load_pretrained(
        models.build("resnet50", 365, 3, norm.factory("cbn", {"num_components": 3})), tmp_path / "imagenet.pt"
    )
    assert torch.equal(cbn.bn1.weight, s["bn1.weight"].expand(3, -1))


def test_pretrained_errors_name_the_file_and_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file .*nope.pt"):
        models.load_pretrained(models.build("resnet50", 10), tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt is not a loadable state_dict"):
        models.load_pretrained(models.build("resnet50", 10), tmp_path / "junk.pt")
    torch.save(models.build("resnext50_32x4d", 10).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt does not match the model: shape of layer1.0.conv1.weight"):
        models.load_pretrained(models.build("resnet50", 10), tmp_path / "other.pt")
    partial = models.build("resnet50", 10).state_dict()
    del partial["layer2.0.conv2.weight"]
    partial["extra.weight"] = torch.zeros(3)
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"unexpected extra.weight; missing layer2.0.conv2.weight"):
        models.load_pretrained(models.build("resnet50", 10), tmp_path / "partial.pt")
