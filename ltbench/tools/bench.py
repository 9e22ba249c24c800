"""Training-speed benchmark: the resident-data fast path against the common recipe.

Both paths train the same model (a CIFAR ResNet with the method's norm layers) on the same
synthetic CIFAR-shaped uint8 data for a fixed number of steps:

- ``fast``: ltbench's own loop — images on the training device as uint8, per-sample crop/flip and
  AutoAugment on the device (:mod:`ltbench.data.augment`), the method's views × paths forward
  and loss (:mod:`ltbench.training.step`), bf16 autocast on CUDA, loss accumulated on the device
  (one host synchronisation at the end).
- ``common``: what LDAM-DRW-style code does — a torchvision ``Dataset`` of PIL images,
  ``RandomCrop(32, 4)`` + flip (+ ``AutoAugment(CIFAR10)`` for a strong view) + ``ToTensor`` +
  ``Normalize`` (CIFAR-10's mean and std, as the fast path) in DataLoader workers, the fp32 eager
  model, the same views × paths forward and loss, and
  ``loss.item()`` every step.

The result (JSON) gives images/s and step time of each path, the speed-up, the projected wall
time of a 400-epoch CIFAR-10-LT (ρ = 100) cell including per-epoch evaluation on 10k test images,
and, with ``--config``, the projected device-hours of that config's whole grid: ``ltbench plan``'s
projection (:func:`ltbench.tools.plan.plan`) with this measurement as the speed of its backbone.
"""
from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ltbench import data
from ltbench.data import augment
from ltbench.nn import losses, norm
from ltbench.spec import config, methods
from ltbench.tools import plan
from ltbench.training import step, trainer as train

#: The benchmark's images are CIFAR-shaped and normalized with CIFAR-10's statistics.
CIFAR = data.get("cifar10")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup(method: str, backbone: str, num_classes: int, device: torch.device, channels_last: bool):
    spec = {"recipe": methods.recipe(method), "backbone": backbone, "train": {}}
    model = train.build_model(spec, num_classes, 3).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    counts = torch.full((num_classes,), 100.0)
    criterion = losses.make(spec["recipe"]["loss"]["name"], counts, **spec["recipe"]["loss"]["options"]).to(device)
    opt = torch.optim.SGD(norm.param_groups(model, 2e-4), lr=0.05, momentum=0.9,
                          **({"fused": True} if device.type == "cuda" else {}))
    return spec["recipe"], model, criterion, opt


def _loss(recipe, model, criterion, views: dict, y, groups, amp: bool) -> torch.Tensor:
    """The trainer's step loss (:func:`ltbench.training.step.step_loss`) of one batch."""
    logits = step.forward_paths(model, views, recipe["paths"], set(step.step_logits(recipe)), groups, amp)
    return step.step_loss(recipe, criterion, logits, y)[0]


def _step(opt, loss) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def run_fast(x_u8: torch.Tensor, y: torch.Tensor, method: str, backbone: str, steps: int, batch_size: int,
             device: torch.device, amp: bool, channels_last: bool, warmup: int) -> dict:
    num_classes = int(y.max()) + 1
    recipe, model, criterion, opt = _setup(method, backbone, num_classes, device, channels_last)
    x_u8, y = x_u8.to(device), y.to(device)
    mean, std = torch.tensor(CIFAR.mean, device=device), torch.tensor(CIFAR.std, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    group_of_class = norm.class_groups(num_classes, recipe["norm"]["options"].get("num_components", 1)).to(device)

    def view(xb, kind):
        xb = augment.random_crop_flip(xb, 4, gen)
        if kind == "strong":
            xb = augment.autoaugment(xb, gen)
        xb = augment.normalize(xb, mean, std)
        return xb.contiguous(memory_format=torch.channels_last) if channels_last else xb

    total = torch.zeros((), device=device)
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        idx = torch.randint(0, len(y), (batch_size,), device=device, generator=gen)
        yb = y[idx]
        views = {v: view(x_u8[idx], v) for v in recipe["views"]}
        loss = _loss(recipe, model, criterion, views, yb,
                     group_of_class[yb] if "split" in recipe["paths"] else None, amp)
        _step(opt, loss)
        total += loss.detach()
    _sync(device)
    dt = time.perf_counter() - t0
    return {"images_per_s": steps * batch_size / dt, "step_time_ms": 1000 * dt / steps,
            "mean_loss": float(total) / (warmup + steps), "model": model, "mean": mean, "std": std}


class _PILDataset(torch.utils.data.Dataset):
    """CIFAR-style dataset of uint8 HWC arrays, transformed per image with PIL (the common recipe)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, views: list[str]):
        import torchvision.transforms as T  # lazy: torchvision, only the common-recipe comparison

        self.images, self.labels = images, labels
        weak = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        tail = [T.ToTensor(), T.Normalize(CIFAR.mean, CIFAR.std)]
        self.transforms = {"weak": T.Compose(weak + tail),
                           "strong": T.Compose(weak + [T.AutoAugment(T.AutoAugmentPolicy.CIFAR10)] + tail),
                           "none": T.Compose(tail)}
        self.views = views

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image  # lazy: only the common-recipe comparison

        img = Image.fromarray(self.images[i])
        return [self.transforms[v](img) for v in self.views], int(self.labels[i])


def run_common(x_u8: torch.Tensor, y: torch.Tensor, method: str, backbone: str, steps: int, batch_size: int,
               device: torch.device, workers: int, warmup: int) -> dict:
    num_classes = int(y.max()) + 1
    torch.manual_seed(0)
    recipe, model, criterion, opt = _setup(method, backbone, num_classes, device, channels_last=False)
    ds = _PILDataset(x_u8.permute(0, 2, 3, 1).numpy(), y.numpy(), recipe["views"])
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=workers > 0)
    group_of_class = norm.class_groups(num_classes, recipe["norm"]["options"].get("num_components", 1)).to(device)
    losses_seen, done, t0 = [], 0, None
    while done < warmup + steps:
        for xs, yb in loader:
            if done == warmup:
                _sync(device)
                t0 = time.perf_counter()
            xs = [x.to(device, non_blocking=True) for x in xs]
            yb = yb.to(device, non_blocking=True)
            loss = _loss(recipe, model, criterion, dict(zip(recipe["views"], xs)), yb,
                         group_of_class[yb] if "split" in recipe["paths"] else None, amp=False)
            _step(opt, loss)
            losses_seen.append(loss.item())  # per-step host synchronisation, as such code logs
            done += 1
            if done >= warmup + steps:
                break
    _sync(device)
    dt = time.perf_counter() - t0
    return {"images_per_s": steps * batch_size / dt, "step_time_ms": 1000 * dt / steps,
            "mean_loss": float(np.mean(losses_seen))}


@torch.no_grad()
def eval_images_per_s(model: nn.Module, mean, std, device: torch.device, amp: bool, n: int = 2000) -> float:
    model.eval()
    x = torch.randint(0, 256, (min(n, 1000), 3, 32, 32), dtype=torch.uint8, device=device)
    reps = max(1, n // len(x))
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            model(augment.normalize(x, mean, std)).argmax(1)
    _sync(device)
    model.train()
    return reps * len(x) / (time.perf_counter() - t0)


def main(method: str = "baseline", backbone: str = "resnet32", steps: int = 20, batch_size: int = 128,
         device: str = "auto", workers: int = 4, common: bool = True, config_path: str | None = None,
         n_images: int = 2048, warmup: int = 3, epochs: int = 400) -> dict[str, Any]:
    dev = train.pick_device(device)
    amp = dev.type == "cuda"
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n_images,), generator=g)
    recipe = methods.recipe(method)
    fast = run_fast(x, y, method, backbone, steps, batch_size, dev, amp, channels_last=amp, warmup=warmup)
    eval_ips = eval_images_per_s(fast.pop("model"), fast.pop("mean"), fast.pop("std"), dev, amp)
    n_train = sum(data.counts_for("cifar10", 100))
    epoch_s = n_train * 1.0 / fast["images_per_s"] + 10000 / eval_ips
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "method": method, "backbone": backbone, "batch_size": batch_size, "steps": steps,
        "passes_per_step": methods.passes(recipe), "amp": "bf16" if amp else "none",
        "fast": {k: round(v, 3) for k, v in fast.items()},
        "eval_images_per_s": round(eval_ips, 1),
        f"projected_{epochs}_epoch_cifar10_lt_r100_wall_s": round(epochs * epoch_s, 1),
        "torch": torch.__version__,
    }
    if common:
        c = run_common(x, y, method, backbone, steps, batch_size, dev, workers, warmup)
        out["common"] = {k: round(v, 3) for k, v in c.items()}
        out["speedup"] = round(fast["images_per_s"] / c["images_per_s"], 2)
    if config_path:
        out["projected_device_hours"] = project(config.load(config_path), out, config_path)
    return out


def project(cfg: dict, result: dict, config_path: str) -> dict:
    """GPU-hours of every cell of ``cfg`` by :func:`ltbench.tools.plan.plan`, with this benchmark
    ``result`` as the speed of its backbone (training and evaluation)."""
    p = plan.plan(cfg, bench=result)
    return {"config": config_path, "per_experiment": {e["name"]: round(e["hours"], 3) for e in p["experiments"]},
            "unique_cells": p["unique_cells"], "total": round(p["hours_total"], 3),
            "cells_without_estimate": p["cells_without_estimate"], "speed_sources": p["speed_sources"]}


def format_json(result: dict) -> str:
    return json.dumps(result, indent=2)


# --------------------------------------------------------------------------------------------
# `ltbench bench --layer`: per-layer costs of the norm layers against a 3×3 convolution
# --------------------------------------------------------------------------------------------

def _time_ms(fn, reps: int, device: torch.device, stat=np.median):
    """``stat`` (median; min is the robust choice on a shared machine) of the wall time of ``fn()``
    in ms over ``reps`` calls (after two untimed calls)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    return stat(times)


def _fwd_bwd(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    def call():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(g)
    return call


def _eval_images_per_s(method: str, backbone: str, batch: int, device: torch.device, channels_last: bool,
                       reps: int) -> float:
    """No-grad eval forward throughput of ``method``'s model after a few training steps."""
    spec = {"recipe": methods.recipe(method), "backbone": backbone, "train": {}}
    model = train.build_model(spec, 10, 3).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    with torch.no_grad():
        model.train()
        model(x[:128])  # one training forward: first-batch initialization of any CBN mixture
        model.eval()
        ms = _time_ms(lambda: model(x).argmax(1), reps, device)
    return batch / ms * 1000


def layer_main(device: str = "auto", batch: int = 128, channels: int = 16, size: int = 32, reps: int = 10,
               eval_batch: int = 500, backbone: str = "resnet32", eval_reps: int = 5) -> dict[str, Any]:
    """Per-layer fwd+bwd ms (median and min over ``reps``) of BatchNorm2d, Conv2d(C, C, 3, padding=1) and CBN M = 4 (per pixel,
    per sample) on one (batch, C, size, size) input, their ratios to the convolution, and the eval
    throughput of ``baseline+cbn``'s model against ``baseline``'s (no grad, channels_last), all in
    one run. Layers in training mode, float32, no autocast."""
    dev = train.pick_device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g).to(dev).requires_grad_()
    grad = torch.randn(batch, channels, size, size, generator=g).to(dev)
    layers = {"batchnorm2d": nn.BatchNorm2d(channels),
              "conv3x3": nn.Conv2d(channels, channels, 3, padding=1, bias=False),
              "cbn_m4_pixel": norm.make("cbn", channels, num_components=4, responsibilities="pixel"),
              "cbn_m4_sample": norm.make("cbn", channels, num_components=4, responsibilities="sample")}
    both = {name: _time_ms(_fwd_bwd(layer.to(dev), x, grad), reps, dev, lambda t: (np.median(t), np.min(t)))
            for name, layer in layers.items()}
    ms, best = {k: v[0] for k, v in both.items()}, {k: v[1] for k, v in both.items()}
    conv = ms["conv3x3"]
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "input": [batch, channels, size, size], "reps": reps,
        "fwd_bwd_ms": {k: round(v, 3) for k, v in ms.items()},
        "ratio_to_conv": {k: round(v / conv, 3) for k, v in ms.items()},
        "fwd_bwd_ms_min": {k: round(v, 3) for k, v in best.items()},
        "ratio_to_conv_of_min": {k: round(v / best["conv3x3"], 3) for k, v in best.items()},
    }
    if eval_batch:
        bare = _eval_images_per_s("baseline", backbone, eval_batch, dev, True, eval_reps)
        cbn = _eval_images_per_s("baseline+cbn", backbone, eval_batch, dev, True, eval_reps)
        out["eval"] = {"backbone": backbone, "batch": eval_batch, "channels_last": True,
                       "bare_images_per_s": round(bare, 1), "cbn_images_per_s": round(cbn, 1),
                       "cbn_over_bare": round(cbn / bare, 3)}
    return out
