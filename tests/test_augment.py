"""Batched per-sample augmentations against torchvision applied image by image."""

from unittest import mock

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode
from torchvision.transforms import autoaugment as tv_aa

from ltbench.data import augment

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _images(n, c, h, w, seed):
    """Random uint8 images plus some low-contrast and constant ones (edge cases of the LUT ops)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)
    x[::5] = x[::5] // 8 + 100  # narrow histogram
    x[1::7] = 77  # constant image: AutoContrast/Equalize leave it unchanged
    x[2::9, :, :, : w // 2] = 255  # many pixels at the maximum
    return x


def _tv_fill(fill, c):
    """The fill torchvision's AutoAugment passes to its ops for ``AutoAugment(fill=fill)``."""
    if fill is None or fill == 0:
        return None
    return [float(fill)] * c if isinstance(fill, (int, float)) else [float(f) for f in fill]


def _tv_autoaugment(x, draw, fill):
    """torchvision's ``_apply_op`` image by image with the per-sample draws."""
    out = []
    for i in range(len(x)):
        img = x[i]
        for slot in range(2):
            op = int(draw.ops[i, slot])
            if op >= 0:
                img = tv_aa._apply_op(
                    img,
                    augment.OP_NAMES[op],
                    float(draw.magnitudes[i, slot]),
                    InterpolationMode.NEAREST,
                    _tv_fill(fill, x.shape[1]),
                )
        out.append(img)
    return torch.stack(out)


def test_tables_match_torchvision():
    for policy in tv_aa.AutoAugmentPolicy:
        assert [tuple(s) for s in augment.POLICIES[policy.value]] == tv_aa.AutoAugment(policy).policies
    aa = tv_aa.AutoAugment()
    for size in [(32, 32), (8, 8), (28, 20)]:
        space = aa._augmentation_space(10, size)
        assert set(space) == set(augment.OP_NAMES)
        for name, (mags, signed) in space.items():
            ours, ours_signed = augment.magnitude_bins(name, size)
            assert ours_signed == signed
            expected = [float(m) for m in mags.expand(10)]  # what torchvision passes: float(.item())
            assert ours.tolist() == expected, name


# Every op used by the CIFAR10 policy, plus ShearX (SVHN/ImageNet policies).
@pytest.mark.parametrize("name", augment.OP_NAMES)
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8), (3, 7, 5)])
def test_op_matches_torchvision(name, shape):
    c, h, w = shape
    bins, signed = augment.magnitude_bins(name, (h, w))
    mags = [m * s for m in bins.tolist() for s in ((1, -1) if signed else (1,))]
    n = 3 * len(mags)
    x = _images(n, c, h, w, seed=100 * augment.OP_NAMES.index(name) + h)
    m = torch.tensor([mags[i % len(mags)] for i in range(n)], dtype=torch.float64)
    geometric = name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
    fills = (0, 127.5, [10.0] * c) if geometric else (0,)
    for fill in fills:
        out = augment.OPS[name](x, m, fill=fill)
        assert out.dtype == torch.uint8 and out.shape == x.shape and out.is_contiguous()
        tv_fill = _tv_fill(fill, c)
        ref = torch.stack(
            [tv_aa._apply_op(x[i], name, float(m[i]), InterpolationMode.NEAREST, tv_fill) for i in range(n)]
        )
        bad = (out != ref).flatten(1).any(1)
        assert not bad.any(), f"{name} fill={fill}: {int(bad.sum())} images differ, e.g. {m[bad].tolist()[:5]}"
    if name not in ("AutoContrast", "Equalize", "Invert") and not (name == "Color" and c == 1):
        assert not torch.equal(out, x)  # the comparison exercised a non-trivial op


def test_op_scalar_magnitude_and_input_untouched():
    x = _images(6, 3, 16, 16, seed=3)
    before = x.clone()
    out = augment.OPS["Rotate"](x, 20.0)
    assert torch.equal(x, before)
    ref = torch.stack([TF.rotate(img, 20.0, interpolation=InterpolationMode.NEAREST) for img in x])
    assert torch.equal(out, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "policy,shape,fill",
    [
        ("cifar10", (3, 32, 32), 0),
        ("cifar10", (1, 8, 8), 0),
        ("cifar10", (3, 32, 32), 127.5),
        ("svhn", (3, 16, 12), 0),
        ("imagenet", (1, 8, 8), 200),
    ],
)
def test_autoaugment_matches_torchvision_per_sample(device, policy, shape, fill):
    n = 400
    x = _images(n, *shape, seed=11).to(device)
    g = torch.Generator(device).manual_seed(5)
    out = augment.autoaugment(x, g, policy=policy, fill=fill)
    draw = augment.sample_autoaugment(n, shape[1:], torch.Generator(device).manual_seed(5), policy, device)
    ref = _tv_autoaugment(x, draw, fill)
    bad = (out != ref).flatten(1).any(1)
    assert not bad.any(), f"{int(bad.sum())} images differ, e.g. ops {draw.ops[bad][:3].tolist()}"
    assert (draw.ops >= 0).all(1).sum() > 50 and (draw.ops < 0).all(1).sum() > 10  # both slots, and none


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_autoaugment_output_and_determinism(shape):
    x = _images(64, *shape, seed=1)
    before = x.clone()
    a = augment.autoaugment(x, torch.Generator().manual_seed(0))
    b = augment.autoaugment(x, torch.Generator().manual_seed(0))
    c = augment.autoaugment(x, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == x.shape and a.is_contiguous()
    assert torch.equal(x, before)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # a non-contiguous input gives the same result
    xt = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert torch.equal(augment.autoaugment(xt, torch.Generator().manual_seed(0)), a)


def test_autoaugment_is_per_sample():
    x = _images(1, 3, 32, 32, seed=2).expand(512, 3, 32, 32).contiguous()
    out = augment.autoaugment(x, torch.Generator().manual_seed(0))
    distinct = torch.unique(out.flatten(1), dim=0)
    assert len(distinct) > 60  # one batch-wide draw (torchvision on a batch) would give 1
    assert (out == x).flatten(1).all(1).float().mean() > 0.05  # some samples get no op at all


def test_autoaugment_draw_frequencies():
    n = 50_000
    x = torch.randint(0, 256, (n, 1, 3, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment.autoaugment(x, torch.Generator().manual_seed(7))
    draw = augment.sample_autoaugment(n, (3, 3), torch.Generator().manual_seed(7))
    assert torch.equal(out, augment.apply_autoaugment(x, draw))  # the draws autoaugment used
    policy = augment.POLICIES["cifar10"]
    freq = torch.bincount(draw.subpolicy, minlength=len(policy)).double() / n
    assert (freq - 1 / len(policy)).abs().max() < 0.01  # ~7 sigma
    for k, sub in enumerate(policy):
        mine = draw.subpolicy == k
        for slot, (name, p, b) in enumerate(sub):
            ops = draw.ops[mine, slot]
            applied = (ops >= 0).double().mean().item()
            assert abs(applied - p) < 0.06, (k, slot, name, applied, p)  # ~5 sigma
            assert (ops[ops >= 0] == augment.OP_NAMES.index(name)).all()
            mags = draw.magnitudes[mine, slot][ops >= 0]
            bins, signed = augment.magnitude_bins(name, (3, 3))
            size = float(bins[b]) if b is not None else 0.0
            assert (mags.abs() == size).all()
            if signed and size > 0:
                assert abs((mags < 0).double().mean().item() - 0.5) < 0.08


def test_autoaugment_rejects_bad_input():
    with pytest.raises(TypeError):
        augment.autoaugment(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError):
        augment.autoaugment(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), policy="mnist")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autoaugment_cuda_no_host_sync():
    x = _images(256, 3, 32, 32, seed=4).cuda()
    g = torch.Generator("cuda").manual_seed(0)
    augment.autoaugment(x, g)  # builds the cached policy table on the device
    torch.cuda.set_sync_debug_mode("error")
    try:
        augment.autoaugment(x, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("shape,padding", [((3, 32, 32), 4), ((1, 8, 8), 2)])
def test_random_crop_flip_matches_torchvision(shape, padding):
    n = 64
    x = _images(n, *shape, seed=9)
    out = augment.random_crop_flip(x, padding, torch.Generator().manual_seed(3))
    # replay the generator: crop rows, crop columns, then flip coins
    g = torch.Generator().manual_seed(3)
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    assert 0 < flip.sum() < n and len(set(oy.tolist())) > 1 and len(set(ox.tolist())) > 1
    crop = T.RandomCrop(shape[1:], padding=padding, fill=0)
    for i in range(n):
        with mock.patch.object(T.RandomCrop, "get_params", return_value=(int(oy[i]), int(ox[i]), shape[1], shape[2])):
            ref = crop(x[i])
        if flip[i]:
            ref = TF.hflip(ref)
        assert torch.equal(out[i], ref), i
    assert out.dtype == torch.uint8 and out.shape == x.shape and out.is_contiguous()
