"""Batched data augmentation on uint8 image tensors of shape (N, C, H, W), on any device.

Every sample draws its own random parameters (crop offset, flip, ...), unlike torchvision's
batched transforms which apply one draw to the whole batch. Randomness comes from an explicit
``torch.Generator`` so that runs are reproducible.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F


def random_crop_flip(
    x: torch.Tensor, padding: int, generator: torch.Generator | None = None, flip: bool = True
) -> torch.Tensor:
    """Per-sample ``RandomCrop(H, padding, fill=0)`` followed by ``RandomHorizontalFlip()``."""
    n, _, h, w = x.shape
    dev = x.device
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]  # (N, H, 1)
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]  # (N, 1, W)
        x = x[torch.arange(n, device=dev)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(n, device=dev, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) → float, scaled to [0, 1] then standardized per channel."""
    return (x.float().div_(255.0) - mean[:, None, None]) / std[:, None, None]


# ---------------------------------------------------------------------------------------------
# AutoAugment
#
# Pixel semantics follow torchvision's ``torchvision.transforms.AutoAugment`` on a uint8 tensor
# image (``autoaugment._apply_op`` with the ``torchvision.transforms.functional`` ops, nearest
# interpolation), reproduced bit for bit, including torchvision's float32 rounding:
#
# * geometric ops (ShearX/Y, TranslateX/Y, Rotate): the inverse affine matrix of
#   ``functional._get_inverse_affine_matrix`` is evaluated in float64 and cast to float32; the
#   sampling grid is built like ``_functional_tensor._gen_affine_grid`` (pixel-centre grid,
#   float32 ``bmm``) and sampled with ``grid_sample(mode="nearest", align_corners=False)``, so
#   ties round exactly as in torchvision. Shears use torchvision's ``center=[0, 0]`` (top-left
#   corner of the image); Rotate and Translate use the image centre. Outside pixels get ``fill``
#   (rounded half to even, like torchvision's ``_cast_squeeze_out``).
# * Brightness/Contrast/Color/Sharpness: ``_blend`` = ``ratio * img + (1 - ratio) * degenerate``
#   in float32, clamped to [0, 255] and truncated to uint8. Contrast's degenerate value is the
#   mean of the uint8 (truncated) grayscale image (1 channel: of the image itself); Color on an
#   image that does not have 3 channels is the identity (torchvision: "Match PIL behaviour");
#   Sharpness's degenerate image is the 3x3 [1 1 1; 1 5 1; 1 1 1]/13 blur rounded to uint8 on
#   the interior, the border kept; images with H or W <= 2 are left unchanged.
# * Posterize (``img & -2**(8 - bits)``), Solarize (``img >= threshold`` inverted, compared in
#   float32), AutoContrast (per-channel min/max rescale in float32, truncated), Equalize
#   (torchvision's per-channel histogram LUT) and Invert.
#
# Channel counts other than 1 and 3 (rejected by torchvision) are handled like 1-channel images:
# Color is the identity and Contrast's mean is taken over all channels.
#
# Vectorization: each sample applies at most one op per slot (slot 1, then slot 2, as in
# torchvision). A slot is applied to the whole batch at once, with no host synchronisation:
# the ops are grouped into three families that are each computed once for the whole batch and
# merged per sample with ``torch.where``:
#
# * per-sample per-channel 256-entry lookup tables (Brightness, Contrast, Posterize, Solarize,
#   AutoContrast, Equalize, Invert; identity for the other samples), applied with one
#   ``index_select`` (images of at most 256 pixels evaluate them on the pixels directly
#   instead). Their statistics (grayscale mean, channel min/max, channel histograms via
#   ``index_add_`` on per-channel offsets) are full-batch reductions;
# * a blend with a per-sample factor and degenerate image (Color: grayscale, Sharpness: blur);
# * one ``grid_sample`` with per-sample affine matrices (identity for the other samples).
#
# So every slot costs one pass of each family over the full batch (about 20 elementwise passes
# over the uint8/float32 batch), whatever the op mix, instead of the ~2 op applications per
# image that subset indexing would need. Subsets would require their sizes on the host (a
# device synchronisation per op); on the GPU these passes are bandwidth-bound and cheap for
# small images. Families that cannot occur in a slot (decided from the static policy table,
# not from the random draws) are skipped.
# ---------------------------------------------------------------------------------------------

OP_NAMES = (
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
    "Invert",
)
_OP = {name: i for i, name in enumerate(OP_NAMES)}
_GEOMETRIC = frozenset(_OP[k] for k in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"))
_POINTWISE = frozenset(
    _OP[k] for k in ("Brightness", "Contrast", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
)
_BLEND = frozenset(_OP[k] for k in ("Color", "Sharpness"))

# torchvision.transforms.AutoAugment._get_policies: ((op, probability, magnitude bin), x2).
POLICIES: dict[str, tuple] = {
    "imagenet": (
        (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
        (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
        (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
        (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
        (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
        (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
        (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
        (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
        (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
        (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
        (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
        (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
        (("Color", 0.4, 0), ("Equalize", 0.6, None)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    ),
    "cifar10": (
        (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
        (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
        (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
        (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
        (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
        (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
        (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
        (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
        (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
        (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
        (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
        (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
        (("Equalize", 0.8, None), ("Invert", 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
    ),
    "svhn": (
        (("ShearX", 0.9, 4), ("Invert", 0.2, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.6, None), ("Solarize", 0.6, 6)),
        (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("AutoContrast", 0.8, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.4, None)),
        (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
        (("Invert", 0.9, None), ("AutoContrast", 0.8, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)),
        (("ShearY", 0.8, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.9, None), ("TranslateY", 0.6, 6)),
        (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)),
        (("Invert", 0.8, None), ("TranslateY", 0.0, 2)),
        (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)),
        (("Invert", 0.6, None), ("Rotate", 0.8, 4)),
        (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)),
        (("ShearX", 0.1, 6), ("Invert", 0.6, None)),
        (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)),
        (("ShearY", 0.8, 4), ("Invert", 0.8, None)),
        (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)),
        (("ShearY", 0.8, 5), ("AutoContrast", 0.7, None)),
        (("ShearX", 0.7, 2), ("Invert", 0.1, None)),
    ),
}

NUM_MAGNITUDE_BINS = 10
_DEG2RAD = math.pi / 180.0  # CPython's math.radians multiplies by this constant
_RAD2DEG = 180.0 / math.pi  # ... and math.degrees by this one


def magnitude_bins(
    op: str, image_size: tuple[int, int], num_bins: int = NUM_MAGNITUDE_BINS
) -> tuple[torch.Tensor, bool]:
    """``AutoAugment._augmentation_space(num_bins, (H, W))[op]``: (float64 magnitudes, signed).

    The values are torchvision's float32 (or int) bins widened to float64, i.e. exactly the
    ``float(magnitudes[bin].item())`` that torchvision passes to its ops.
    """
    h, w = image_size
    lin = {
        "ShearX": 0.3,
        "ShearY": 0.3,
        "TranslateX": 150.0 / 331.0 * w,
        "TranslateY": 150.0 / 331.0 * h,
        "Rotate": 30.0,
        "Brightness": 0.9,
        "Color": 0.9,
        "Contrast": 0.9,
        "Sharpness": 0.9,
    }
    if op in lin:
        return torch.linspace(0.0, lin[op], num_bins).double(), True
    if op == "Posterize":
        return (8 - (torch.arange(num_bins) / ((num_bins - 1) / 4)).round().int()).double(), False
    if op == "Solarize":
        return torch.linspace(255.0, 0.0, num_bins).double(), False
    if op in ("AutoContrast", "Equalize", "Invert"):
        return torch.zeros(num_bins, dtype=torch.float64), False
    raise ValueError(f"unknown AutoAugment op {op!r}; known: {', '.join(OP_NAMES)}")


@functools.lru_cache(maxsize=32)
def _policy_table(policy: str, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(op ids, probabilities as float32, unsigned magnitudes, signed flags), each (P, 2)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown AutoAugment policy {policy!r}; known: {', '.join(POLICIES)}")
    ops, probs, mags, signed = [], [], [], []
    for sub in POLICIES[policy]:
        for name, p, b in sub:
            bins, s = magnitude_bins(name, (h, w))
            ops.append(_OP[name])
            probs.append(p)
            mags.append(float(bins[b]) if b is not None else 0.0)
            signed.append(s)
    shape = (len(POLICIES[policy]), 2)
    return (
        torch.tensor(ops, device=device).view(shape),
        torch.tensor(probs, dtype=torch.float32, device=device).view(shape),
        torch.tensor(mags, dtype=torch.float64, device=device).view(shape),
        torch.tensor(signed, device=device).view(shape),
    )


class AutoAugmentDraw(NamedTuple):
    """Per-sample AutoAugment parameters for a batch of N images.

    ``subpolicy``: (N,) index into the policy; ``ops``: (N, 2) op ids (indices into
    ``OP_NAMES``) of slot 1 and slot 2, ``-1`` where the op's probability coin said no;
    ``magnitudes``: (N, 2) float64 signed magnitudes as torchvision passes them to its ops.
    """

    subpolicy: torch.Tensor
    ops: torch.Tensor
    magnitudes: torch.Tensor


def sample_autoaugment(
    n: int,
    image_size: tuple[int, int],
    generator: torch.Generator | None = None,
    policy: str = "cifar10",
    device: torch.device | str | None = None,
) -> AutoAugmentDraw:
    """Draw every sample's sub-policy, apply coins and magnitude signs independently.

    Same distribution as torchvision's ``AutoAugment.get_params`` per image: sub-policy
    uniform, slot i applied iff ``coin_i <= p_i``, a signed magnitude negated iff its sign draw
    is 0.
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    policy = getattr(policy, "value", policy)
    op_t, prob_t, mag_t, signed_t = _policy_table(policy, int(image_size[0]), int(image_size[1]), device)
    sub = torch.randint(len(op_t), (n,), device=device, generator=generator)
    coin = torch.rand((n, 2), device=device, generator=generator)
    sign = torch.randint(2, (n, 2), device=device, generator=generator)
    ops = torch.where(coin <= prob_t[sub], op_t[sub], -1)
    mags = torch.where(signed_t[sub] & (sign == 0), -mag_t[sub], mag_t[sub])
    return AutoAugmentDraw(sub, ops, mags)


def autoaugment(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    policy: str = "cifar10",
    fill: float | Sequence[float] = 0,
) -> torch.Tensor:
    """Per-sample torchvision ``AutoAugment(policy, NEAREST, fill)`` on a uint8 (N, C, H, W) batch.

    Every sample draws its own sub-policy, apply coins and magnitude signs (torchvision draws
    once per call, i.e. once per batch). Randomness comes only from ``generator``, which must
    live on ``x.device`` (``None``: torch's default generator of that device).
    """
    policy = getattr(policy, "value", policy)
    draw = sample_autoaugment(x.shape[0], (x.shape[-2], x.shape[-1]), generator, policy, x.device)
    return apply_autoaugment(x, draw, policy, fill)


def apply_autoaugment(
    x: torch.Tensor, draw: AutoAugmentDraw, policy: str | None = "cifar10", fill: float | Sequence[float] = 0
) -> torch.Tensor:
    """Apply drawn AutoAugment parameters: slot 1, then slot 2, per sample.

    ``policy`` only restricts the op families computed per slot to those its table can
    produce (``None``: all of them).
    """
    _check_image_batch(x)
    for slot in range(2):
        present = (
            frozenset(range(len(OP_NAMES)))
            if policy is None
            else frozenset(_OP[sub[slot][0]] for sub in POLICIES[getattr(policy, "value", policy)])
        )
        x = _apply_slot(x, draw.ops[:, slot], draw.magnitudes[:, slot], fill, present)
    return x.contiguous()


def _check_image_batch(x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise TypeError(f"expected a uint8 (N, C, H, W) tensor, got {x.dtype} of shape {tuple(x.shape)}")


def _per_sample(magnitude: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(magnitude, torch.Tensor):
        return torch.full((x.shape[0],), float(magnitude), dtype=torch.float64, device=x.device)
    m = magnitude.to(device=x.device, dtype=torch.float64)
    return m.expand(x.shape[0]) if m.dim() == 0 else m


def _make_op(name: str) -> Callable[..., torch.Tensor]:
    op_id = _OP[name]

    def op(x: torch.Tensor, magnitude: float | torch.Tensor, fill: float | Sequence[float] = 0) -> torch.Tensor:
        _check_image_batch(x)
        m = _per_sample(magnitude, x)
        ops = torch.full((x.shape[0],), op_id, device=x.device)
        return _apply_slot(x, ops, m, fill, frozenset((op_id,))).contiguous()

    op.__name__ = name
    op.__doc__ = (
        f"torchvision's AutoAugment ``{name}`` with a per-sample magnitude (a float or an "
        f"(N,) tensor, the value ``_apply_op`` receives) on a uint8 (N, C, H, W) batch."
    )
    return op


#: Batched ops with per-sample magnitudes: ``OPS[name](x, magnitude, fill=0)``; they run the
#: same code as one AutoAugment slot in which every sample applies ``name``.
OPS = {name: _make_op(name) for name in OP_NAMES}


def _apply_slot(
    x: torch.Tensor, ops: torch.Tensor, mag: torch.Tensor, fill: float | Sequence[float], present: frozenset
) -> torch.Tensor:
    """One AutoAugment slot: sample i applies op ``ops[i]`` (-1: none) with magnitude ``mag[i]``."""
    x = x.contiguous()
    n, c, h, w = x.shape
    if c != 3:
        present = present - {_OP["Color"]}
    if h <= 2 or w <= 2:
        present = present - {_OP["Sharpness"]}
    xf = x.float() if present & (_BLEND | _GEOMETRIC) else None
    gray = _grayscale(x) if c == 3 and present & {_OP["Color"], _OP["Contrast"]} else None
    out = x
    if present & _POINTWISE:
        # flat[i] = 256 * (sample * C + channel) + value: histogram bins and LUT entries
        offsets = torch.arange(0, n * c * 256, 256, dtype=torch.int32, device=x.device).view(n, c, 1)
        flat = (x.reshape(n, c, h * w).int() + offsets).view(-1)
        if h * w <= 256:  # evaluate the ops on the pixels directly
            out = _slot_pointwise(x, flat, gray, ops, mag, present, x.reshape(n, c, h * w).long())
            out = out.view(n, c, h, w)
        else:  # evaluate them on all 256 values, then look the pixels up
            values = torch.arange(256, device=x.device).view(1, 1, 256)
            lut = _slot_pointwise(x, flat, gray, ops, mag, present, values)
            out = lut.reshape(-1).index_select(0, flat).view(n, c, h, w)
    if present & _BLEND and xf is not None:
        blended = _slot_blend(xf, gray, ops, mag, present)
        sel = torch.zeros_like(ops, dtype=torch.bool)
        for k in present & _BLEND:
            sel |= ops == k
        out = torch.where(sel[:, None, None, None], blended, out)
    if present & _GEOMETRIC and xf is not None:
        theta, sel = _slot_theta(ops, mag, h, w, present)
        out = torch.where(sel[:, None, None, None], _affine(xf, theta, fill), out)
    return out


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """``_functional_tensor.rgb_to_grayscale``: (N, 1, H, W) uint8, truncated."""
    r, g, b = x.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(x.dtype).unsqueeze(1)


def _blend_factors(mag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``ratio`` and ``1.0 - ratio`` for ``ratio = 1.0 + magnitude`` (computed in float64)."""
    ratio = 1.0 + mag
    return ratio.float(), (1.0 - ratio).float()


def _slot_pointwise(
    x: torch.Tensor,
    flat: torch.Tensor,
    gray: torch.Tensor | None,
    ops: torch.Tensor,
    mag: torch.Tensor,
    present: frozenset,
    v: torch.Tensor,
) -> torch.Tensor:
    """The pointwise ops (identity for samples applying none) evaluated at pixel values ``v``.

    ``v``: (1, 1, 256) ``arange`` (the result is a per-sample per-channel lookup table) or the
    (N, C, H*W) pixels themselves (the result is the output image); uint8 (N, C, K).
    """
    n, c, h, w = x.shape
    k = v.shape[-1]
    vf = v.float()
    out = v.to(torch.uint8).expand(n, c, k)

    def put(name: str, result: torch.Tensor) -> None:
        nonlocal out
        out = torch.where((ops == _OP[name])[:, None, None], result, out)

    r, one_minus_r = _blend_factors(mag)
    r, one_minus_r = r[:, None, None], one_minus_r[:, None, None]
    if _OP["Brightness"] in present:  # blend with a black image
        put("Brightness", (r * vf + one_minus_r * torch.zeros_like(vf)).clamp(0, 255).to(torch.uint8))
    if _OP["Contrast"] in present:  # blend with the mean of the grayscale image
        mean = (gray if gray is not None else x).float().mean(dim=(-3, -2, -1), keepdim=True).view(n, 1, 1)
        put("Contrast", (r * vf + one_minus_r * mean).clamp(0, 255).to(torch.uint8))
    if _OP["Posterize"] in present:
        keep = (256 - torch.pow(2, 8 - mag.trunc().long())).to(torch.uint8)
        put("Posterize", v.to(torch.uint8) & keep[:, None, None])
    if _OP["Solarize"] in present:
        put("Solarize", torch.where(vf >= mag.float()[:, None, None], 255 - v, v).to(torch.uint8))
    if _OP["Invert"] in present:
        put("Invert", (255 - v).to(torch.uint8))
    if present & {_OP["AutoContrast"], _OP["Equalize"]}:
        pixels = x.reshape(n, c, h * w)
        hi = pixels.amax(dim=2, keepdim=True)
        if _OP["AutoContrast"] in present:
            lo = pixels.amin(dim=2, keepdim=True).float()
            scale = 255 / (hi.float() - lo)
            same = ~torch.isfinite(scale)
            lo = torch.where(same, 0.0, lo)
            scale = torch.where(same, 1.0, scale)
            put("AutoContrast", ((vf - lo) * scale).clamp(0, 255).to(torch.uint8))
        if _OP["Equalize"] in present:
            put("Equalize", _equalize(flat, hi, v.expand(n, c, k)))
    return out


def _equalize(flat: torch.Tensor, hi: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``_functional_tensor._scale_channel``'s lookup table, per sample and channel, at ``v``.

    ``flat``: the batch's pixels as ``256 * (sample * C + channel) + value``; ``hi``: (N, C, 1)
    channel maxima; ``v``: (N, C, K) int64 values.
    """
    n, c, _ = hi.shape
    hist = torch.zeros(n * c * 256, dtype=torch.int32, device=flat.device)
    hist.index_add_(0, flat, torch.ones(1, dtype=torch.int32, device=flat.device).expand(flat.numel()))
    cum = hist.view(n, c, 256).cumsum(dim=2, dtype=torch.int32)
    below = torch.cat([torch.zeros_like(cum[..., :1]), cum], dim=2)  # below[v] = #pixels < v
    # step = sum of the histogram without its last non-empty bin (the channel maximum) // 255
    step = below.gather(2, hi.long()) // 255
    lut = (below.gather(2, v) + step // 2) // step.clamp(min=1)
    return torch.where(step == 0, v, lut.clamp(0, 255)).to(torch.uint8)


def _gray_float(gray: torch.Tensor | None) -> torch.Tensor:
    """The float grayscale of a Color op's batch (:func:`_apply_slot` drops Color from batches that are not RGB)."""
    if gray is None:
        raise ValueError("AutoAugment's Color op needs an RGB batch")
    return gray.float()


def _slot_blend(
    xf: torch.Tensor, gray: torch.Tensor | None, ops: torch.Tensor, mag: torch.Tensor, present: frozenset
) -> torch.Tensor:
    """Color/Sharpness: ``_blend(img, degenerate, 1 + magnitude)`` for every sample."""
    if _OP["Sharpness"] in present:
        degenerate = _sharpness_degenerate(xf)
        if _OP["Color"] in present:
            degenerate = torch.where((ops == _OP["Color"])[:, None, None, None], _gray_float(gray), degenerate)
    else:
        degenerate = _gray_float(gray)
    r, one_minus_r = _blend_factors(mag)
    # (r * img + (1 - r) * degenerate): two float32 products, then their sum, as in torchvision
    out = xf * r[:, None, None, None]
    out += (
        degenerate.mul_(one_minus_r[:, None, None, None])
        if degenerate.shape == out.shape
        else degenerate * one_minus_r[:, None, None, None]
    )
    return out.clamp_(0, 255).to(torch.uint8)


def _sharpness_degenerate(xf: torch.Tensor) -> torch.Tensor:
    """``_blurred_degenerate_image`` (as float32): interior = round(3x3 [1 1 1; 1 5 1; 1 1 1] / 13).

    The weighted sum S is computed exactly (small integers in float32); torchvision convolves
    with float32 weights 1/13 and 5/13, whose rounding error (< 1e-3) cannot move S/13 across a
    half-integer since S/13 is at least 1/26 away from one, so both round to the same value.
    """
    rows = xf[:, :, :-2] + xf[:, :, 1:-1]
    rows += xf[:, :, 2:]
    s = rows[..., :-2] + rows[..., 1:-1]
    s += rows[..., 2:]
    s += 4.0 * xf[:, :, 1:-1, 1:-1]
    out = xf.clone()
    out[:, :, 1:-1, 1:-1] = s.div_(13.0).round_()
    return out


def _inverse_affine_matrix(
    cx: torch.Tensor,
    cy: torch.Tensor,
    angle: torch.Tensor,
    tx: torch.Tensor,
    ty: torch.Tensor,
    shear_x: torch.Tensor,
    shear_y: torch.Tensor,
) -> torch.Tensor:
    """``functional._get_inverse_affine_matrix`` (scale 1, float64, per sample): (N, 6)."""
    rot = angle * _DEG2RAD
    sx = shear_x * _DEG2RAD
    sy = shear_y * _DEG2RAD
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = 0.0 + (m0 * (-cx - tx) + m1 * (-cy - ty)) + cx
    m5 = 0.0 + (m3 * (-cx - tx) + m4 * (-cy - ty)) + cy
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=1)


def _slot_theta(
    ops: torch.Tensor, mag: torch.Tensor, h: int, w: int, present: frozenset
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (N, 2, 3) float32 inverse affine matrices and the mask of geometric samples."""
    zero = torch.zeros_like(mag)
    shear_deg = torch.atan(mag) * _RAD2DEG  # math.degrees(math.atan(magnitude))
    is_shear_x, is_shear_y = ops == _OP["ShearX"], ops == _OP["ShearY"]
    is_shear = is_shear_x | is_shear_y
    # Shears use center=[0, 0], which torchvision turns into [-W/2, -H/2] image-centred.
    cx = torch.where(is_shear, -w * 0.5, zero)
    cy = torch.where(is_shear, -h * 0.5, zero)
    angle = torch.where(ops == _OP["Rotate"], -mag, zero)  # F.rotate passes -angle
    tx = torch.where(ops == _OP["TranslateX"], mag.trunc(), zero)  # translate=[int(magnitude), 0]
    ty = torch.where(ops == _OP["TranslateY"], mag.trunc(), zero)
    shx = torch.where(is_shear_x, shear_deg, zero)
    shy = torch.where(is_shear_y, shear_deg, zero)
    theta = _inverse_affine_matrix(cx, cy, angle, tx, ty, shx, shy).float().view(-1, 2, 3)
    sel = torch.zeros_like(ops, dtype=torch.bool)
    for k in present & _GEOMETRIC:
        sel |= ops == k
    return theta, sel


def _affine(xf: torch.Tensor, theta: torch.Tensor, fill: float | Sequence[float]) -> torch.Tensor:
    """``_functional_tensor.affine`` (nearest, same output size) with per-sample ``theta``."""
    n, c, h, w = xf.shape
    dev = xf.device
    base = torch.empty(1, h, w, 3, device=dev)
    base[..., 0].copy_(torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, steps=w, device=dev))
    base[..., 1].copy_(torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, steps=h, device=dev).unsqueeze_(-1))
    base[..., 2].fill_(1)
    # divided by float32 [W/2, H/2] like torchvision, with scalars (no host-to-device copy)
    t = theta.transpose(1, 2)
    scaled = torch.stack([t[..., 0] / (0.5 * w), t[..., 1] / (0.5 * h)], dim=2)
    grid = base.view(1, h * w, 3).expand(n, h * w, 3).bmm(scaled).view(n, h, w, 2)
    fills = [float(fill)] if isinstance(fill, (int, float)) else [float(f) for f in fill]
    if len(fills) not in (1, c):
        raise ValueError(f"fill has {len(fills)} values for {c} channels")
    plain = fills == [0.0] * len(fills)
    if not plain:
        fill_t = torch.stack([torch.full((), f, dtype=torch.float32, device=dev) for f in fills])
        # torchvision's extra all-ones channel marks the pixels sampled from inside the image
        xf = torch.cat([xf, torch.ones_like(xf[:, :1])], dim=1)
    out = F.grid_sample(xf, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if not plain:
        out, inside = out[:, :-1], out[:, -1:]
        # torchvision rounds (half to even) before the uint8 cast; only fill can be fractional
        out = torch.where(inside < 0.5, fill_t.round().view(1, -1, 1, 1), out)
    return out.to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Strong-view variants (recipe.strong_view): which AutoAugment, and Cutout

#: AutoAugment variants of the strong view. ``torchvision``: torchvision's ``AutoAugment`` (fill 0),
#: the default. ``cifar10_policy``: the ``CIFAR10Policy`` reimplementation most long-tail code copies
#: (e.g. jiawei-ren/BalancedMetaSoftmax-Classification ``data/autoaugment.py``, from DeepVoltaire/
#: AutoAugment): the same 25 sub-policies, probabilities and magnitude bins, geometric ops filled
#: with grey 128. Not reproduced: its Solarize thresholds linspace(256, 0) instead of (255, 0), which
#: differ by less than one grey level.
STRONG_POLICIES: dict[str, dict] = {"torchvision": {"fill": 0}, "cifar10_policy": {"fill": 128}}
CUTOUT_HOLES, CUTOUT_LENGTH = 1, 16  # Balanced Softmax's CIFAR pipeline: Cutout(n_holes=1, length=16)


def cutout(
    x: torch.Tensor, generator: torch.Generator | None = None, holes: int = CUTOUT_HOLES, length: int = CUTOUT_LENGTH
) -> torch.Tensor:
    """Per-sample Cutout (DeVries & Taylor 2017) on a uint8 (N, C, H, W) batch: ``holes`` squares of
    side ``length`` with uniform integer centres (y, x), rows clip(y − L/2, 0, H) … clip(y + L/2, 0, H)
    (end excluded) and likewise columns, set to 0 — the reference applies it after ToTensor, before
    Normalize, so the pixels become black."""
    N, _, H, W = x.shape
    rows = torch.arange(H, device=x.device)
    cols = torch.arange(W, device=x.device)
    keep = torch.ones((N, 1, H, W), dtype=torch.bool, device=x.device)
    for _ in range(holes):
        cy = torch.randint(0, H, (N,), generator=generator, device=x.device)
        cx = torch.randint(0, W, (N,), generator=generator, device=x.device)
        in_r = (rows >= (cy - length // 2).clamp(0, H)[:, None]) & (rows < (cy + length // 2).clamp(0, H)[:, None])
        in_c = (cols >= (cx - length // 2).clamp(0, W)[:, None]) & (cols < (cx + length // 2).clamp(0, W)[:, None])
        keep &= ~(in_r[:, None, :, None] & in_c[:, None, None, :])
    return x * keep.to(x.dtype)


def strong_view(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    policy: str = "torchvision",
    use_cutout: bool = False,
    table: str = "cifar10",
) -> torch.Tensor:
    """The strong view after crop+flip: AutoAugment variant ``policy`` (:data:`STRONG_POLICIES`) of the
    policy table ``table``, then Cutout(1 hole, 16 px) when ``use_cutout``."""
    if policy not in STRONG_POLICIES:
        raise ValueError(f"unknown strong_view.policy {policy!r}; known: {', '.join(STRONG_POLICIES)}")
    x = autoaugment(x, generator, policy=table, fill=STRONG_POLICIES[policy]["fill"])
    return cutout(x, generator) if use_cutout else x
