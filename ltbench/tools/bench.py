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

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ltbench import data
from ltbench.data import augment, sources
from ltbench.nn import cbn_cpu, losses, norm
from ltbench.spec import config, methods
from ltbench.tools import plan
from ltbench.training import evaluation, step
from ltbench.training import trainer as train

#: The benchmark's images are CIFAR-shaped and normalized with CIFAR-10's statistics.
CIFAR = data.get("cifar10")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def _synthetic(n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_images`` random CIFAR-shaped uint8 images and labels of 10 classes (seed 0)."""
    g = torch.Generator().manual_seed(0)
    return (
        torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (n_images,), generator=g),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup(method: str, backbone: str, num_classes: int, device: torch.device, channels_last: bool) -> tuple:
    spec: dict[str, Any] = {"recipe": methods.recipe(method), "backbone": backbone, "train": {}}
    model = train.build_model(spec, num_classes, 3).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    counts = torch.full((num_classes,), 100.0)
    criterion = losses.make(spec["recipe"]["loss"]["name"], counts, **spec["recipe"]["loss"]["options"]).to(device)
    opt = torch.optim.SGD(norm.param_groups(model, 2e-4), lr=0.05, momentum=0.9, **train.optimizer_kernel(device))
    return spec["recipe"], model, criterion, opt


def _loss(
    recipe: Mapping[str, Any],
    model: nn.Module,
    criterion: nn.Module,
    views: dict,
    y: torch.Tensor,
    groups: torch.Tensor | None,
    amp: bool,
) -> torch.Tensor:
    """The trainer's step loss (:func:`ltbench.training.step.step_loss`) of one batch."""
    logits = step.forward_paths(model, views, recipe["paths"], set(step.step_logits(recipe)), groups, amp)
    return step.step_loss(recipe, criterion, logits, y)[0]


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


class FastLoop:
    """ltbench's fast training loop of one method: data resident on the device as uint8, per-sample
    crop/flip (and AutoAugment for a strong view) on the device, the trainer's step loss, no per-step
    host synchronisation. ``run(n)`` trains ``n`` steps and returns their wall time in seconds."""

    def __init__(
        self,
        x_u8: torch.Tensor,
        y: torch.Tensor,
        method: str,
        backbone: str,
        batch_size: int,
        device: torch.device,
        amp: bool,
        channels_last: bool,
    ):
        num_classes = int(y.max()) + 1
        self.recipe, self.model, self.criterion, self.opt = _setup(method, backbone, num_classes, device, channels_last)
        self.x, self.y, self.device, self.amp, self.cl, self.batch = (
            x_u8.to(device),
            y.to(device),
            device,
            amp,
            channels_last,
            batch_size,
        )
        self.mean, self.std = torch.tensor(CIFAR.mean, device=device), torch.tensor(CIFAR.std, device=device)
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.groups = norm.class_groups(num_classes, self.recipe["norm"]["options"].get("num_components", 1)).to(device)
        self.total, self.done = torch.zeros((), device=device), 0
        self.step_begin: Callable[[], Any] | None = (
            None  # called before each step (CUDA graphs: torch.compiler.cudagraph_mark_step_begin)
        )

    def view(self, xb: torch.Tensor, kind: str) -> torch.Tensor:
        xb = augment.random_crop_flip(xb, 4, self.gen)
        if kind == "strong":
            xb = augment.autoaugment(xb, self.gen)
        xb = augment.normalize(xb, self.mean, self.std)
        return xb.contiguous(memory_format=torch.channels_last) if self.cl else xb

    def run(self, steps: int) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            if self.step_begin is not None:
                self.step_begin()
            idx = torch.randint(0, len(self.y), (self.batch,), device=self.device, generator=self.gen)
            yb = self.y[idx]
            views = {v: self.view(self.x[idx], v) for v in self.recipe["views"]}
            loss = _loss(
                self.recipe,
                self.model,
                self.criterion,
                views,
                yb,
                self.groups[yb] if "split" in self.recipe["paths"] else None,
                self.amp,
            )
            _step(self.opt, loss)
            self.total += loss.detach()
        _sync(self.device)
        self.done += steps
        return time.perf_counter() - t0


def run_fast(
    x_u8: torch.Tensor,
    y: torch.Tensor,
    method: str,
    backbone: str,
    steps: int,
    batch_size: int,
    device: torch.device,
    amp: bool,
    channels_last: bool,
    warmup: int,
) -> dict:
    loop = FastLoop(x_u8, y, method, backbone, batch_size, device, amp, channels_last)
    loop.run(warmup)
    dt = loop.run(steps)
    return {
        "images_per_s": steps * batch_size / dt,
        "step_time_ms": 1000 * dt / steps,
        "mean_loss": float(loop.total) / loop.done,
        "model": loop.model,
    }


def compare(
    methods: list[str],
    backbone: str = "resnet32",
    steps: int = 5,
    rounds: int = 5,
    batch_size: int = 128,
    device: str = "auto",
    warmup: int = 2,
    n_images: int = 2048,
) -> dict[str, Any]:
    """The fast path of several methods in one process, timed in alternating rounds of ``steps`` steps
    (every method once per round, in order), so that a drift of the machine's speed hits all alike:
    per method the median images/s over the rounds and the median over rounds of its ratio to the
    first method within the same round."""
    dev = train.pick_device(device)
    amp = dev.type == "cuda"
    x, y = _synthetic(n_images)
    loops = {m: FastLoop(x, y, m, backbone, batch_size, dev, amp, channels_last=amp) for m in methods}
    for loop in loops.values():
        loop.run(warmup)
    ips: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for m, loop in loops.items():
            ips[m].append(steps * batch_size / loop.run(steps))
    first = methods[0]
    return {
        "device": _device_name(dev),
        "torch": torch.__version__,
        "backbone": backbone,
        "batch_size": batch_size,
        "steps_per_round": steps,
        "rounds": rounds,
        "amp": "bf16" if amp else "none",
        "cbn_kernel": {m: norm.implementation(loop.model, dev, channels_last=amp) for m, loop in loops.items()},
        "images_per_s": {m: round(float(np.median(v)), 1) for m, v in ips.items()},
        "images_per_s_per_round": {m: [round(t, 1) for t in v] for m, v in ips.items()},
        f"ratio_to_{first}": {
            m: round(float(np.median(np.array(v) / np.array(ips[first]))), 3) for m, v in ips.items()
        },
    }


class _PILDataset(torch.utils.data.Dataset):
    """CIFAR-style dataset of uint8 HWC arrays, transformed per image with PIL (the common recipe)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, views: list[str]):
        import torchvision.transforms as T  # lazy: torchvision, only the common-recipe comparison

        self.images, self.labels = images, labels
        weak = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        tail = [T.ToTensor(), T.Normalize(CIFAR.mean, CIFAR.std)]
        self.transforms = {
            "weak": T.Compose(weak + tail),
            "strong": T.Compose(weak + [T.AutoAugment(T.AutoAugmentPolicy.CIFAR10)] + tail),
            "none": T.Compose(tail),
        }
        self.views = views

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image  # lazy: only the common-recipe comparison

        img = Image.fromarray(self.images[i])
        return [self.transforms[v](img) for v in self.views], int(self.labels[i])


def run_common(
    x_u8: torch.Tensor,
    y: torch.Tensor,
    method: str,
    backbone: str,
    steps: int,
    batch_size: int,
    device: torch.device,
    workers: int,
    warmup: int,
) -> dict:
    num_classes = int(y.max()) + 1
    torch.manual_seed(0)
    recipe, model, criterion, opt = _setup(method, backbone, num_classes, device, channels_last=False)
    ds = _PILDataset(x_u8.permute(0, 2, 3, 1).numpy(), y.numpy(), recipe["views"])
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
    )
    group_of_class = norm.class_groups(num_classes, recipe["norm"]["options"].get("num_components", 1)).to(device)
    losses_seen: list[float] = []
    done, t0 = 0, None
    while done < warmup + steps:
        for xs, yb in loader:
            if done == warmup:
                _sync(device)
                t0 = time.perf_counter()
            xs = [x.to(device, non_blocking=True) for x in xs]
            yb = yb.to(device, non_blocking=True)
            loss = _loss(
                recipe,
                model,
                criterion,
                dict(zip(recipe["views"], xs, strict=True)),
                yb,
                group_of_class[yb] if "split" in recipe["paths"] else None,
                amp=False,
            )
            _step(opt, loss)
            losses_seen.append(loss.item())  # per-step host synchronisation, as such code logs
            done += 1
            if done >= warmup + steps:
                break
    _sync(device)
    assert t0 is not None  # set when done reached warmup, which the loop above passed
    dt = time.perf_counter() - t0
    return {
        "images_per_s": steps * batch_size / dt,
        "step_time_ms": 1000 * dt / steps,
        "mean_loss": float(np.mean(losses_seen)),
    }


@contextlib.contextmanager
def synthetic_test_source(n: int, device: torch.device) -> Iterator[sources.TensorSource]:
    """The trainer's :class:`~ltbench.data.sources.TensorSource` whose test set is ``n`` synthetic
    CIFAR-shaped uint8 images (written as a prepared ``.npz`` to a temporary folder, then loaded)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).numpy()
    y = torch.randint(0, 10, (n,), generator=g).numpy()
    with tempfile.TemporaryDirectory(prefix="ltbench-bench-") as tmp:
        path = os.path.join(tmp, "bench.npz")
        np.savez(path, train_x=x[:2], train_y=y[:2], test_x=x, test_y=y, counts=np.bincount(y, minlength=10))
        yield sources.TensorSource(path, device, CIFAR.mean, CIFAR.std, CIFAR.padding)


def eval_images_per_s(model: nn.Module, device: torch.device, n: int = 2000) -> float:
    """Images/s of the trainer's evaluation (:func:`ltbench.training.evaluation.evaluate_counts` over a
    resident uint8 test set, fp32, the model's memory format) on ``n`` synthetic CIFAR-shaped images."""
    with synthetic_test_source(n, device) as source:
        evaluation.evaluate_counts(model, source, 10)  # untimed: first-call allocations
        _sync(device)
        t0 = time.perf_counter()
        evaluation.evaluate_counts(model, source, 10)
        _sync(device)
    model.train()
    return n / (time.perf_counter() - t0)


def main(
    method: str = "baseline",
    backbone: str = "resnet32",
    steps: int = 20,
    batch_size: int = 128,
    device: str = "auto",
    workers: int = 4,
    common: bool = True,
    config_path: str | None = None,
    n_images: int = 2048,
    warmup: int = 3,
    epochs: int = 400,
) -> dict[str, Any]:
    dev = train.pick_device(device)
    amp = dev.type == "cuda"
    x, y = _synthetic(n_images)
    recipe = methods.recipe(method)
    fast = run_fast(x, y, method, backbone, steps, batch_size, dev, amp, channels_last=amp, warmup=warmup)
    kernel = norm.implementation(fast["model"], dev, channels_last=amp)
    eval_ips = eval_images_per_s(fast.pop("model"), dev)
    n_train = sum(data.counts_for("cifar10", 100))
    epoch_s = n_train * 1.0 / fast["images_per_s"] + 10000 / eval_ips
    out: dict[str, Any] = {
        "device": _device_name(dev),
        "method": method,
        "backbone": backbone,
        "batch_size": batch_size,
        "steps": steps,
        "passes_per_step": methods.passes(recipe),
        "amp": "bf16" if amp else "none",
        "fast": {k: round(v, 3) for k, v in fast.items()},
        "eval_images_per_s": round(eval_ips, 1),
        f"projected_{epochs}_epoch_cifar10_lt_r100_wall_s": round(epochs * epoch_s, 1),
        "torch": torch.__version__,
        "cbn_kernel": kernel,  # what ran CBN's per-pixel path (ltbench.nn.norm.implementation)
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
    return {
        "config": config_path,
        "per_experiment": {e["name"]: round(e["hours"], 3) for e in p["experiments"]},
        "unique_cells": p["unique_cells"],
        "total": round(p["hours_total"], 3),
        "cells_without_estimate": p["cells_without_estimate"],
        "speed_sources": p["speed_sources"],
    }


def format_json(result: dict) -> str:
    return json.dumps(result, indent=2)


# --------------------------------------------------------------------------------------------
# `ltbench bench --layer`: per-layer costs of the norm layers against a 3×3 convolution
# --------------------------------------------------------------------------------------------


def _time_ms(
    fn: Callable[[], object], reps: int, device: torch.device, stat: Callable[[list[float]], Any] = np.median
) -> Any:
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


def _time_pair(
    f: Callable[[], object], g: Callable[[], object], reps: int, device: torch.device
) -> tuple[float, float]:
    """Min wall ms of ``f()`` and of ``g()`` over ``reps`` alternating calls (one untimed call each first),
    so that a change in the machine's load hits both alike."""
    f(), g()
    tf: list[float] = []
    tg: list[float] = []
    for _ in range(reps):
        for fn, times in ((f, tf), (g, tg)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(1000 * (time.perf_counter() - t0))
    return min(tf), min(tg)


def _fwd_bwd(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(g)

    return call


def _eval_model(method: str, backbone: str, device: torch.device, channels_last: bool) -> nn.Module:
    """``method``'s model in eval mode after one training forward (first-batch init of a CBN mixture)."""
    spec: dict[str, Any] = {"recipe": methods.recipe(method), "backbone": backbone, "train": {}}
    model = train.build_model(spec, 10, 3).to(device)
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    with torch.no_grad():
        model.train()
        model(torch.randn(16, 3, 32, 32, device=device))
    return model.eval()


def eval_path_vs_bare(
    method: str, backbone: str, n: int, device: torch.device, channels_last: bool, reps: int
) -> dict[str, float]:
    """Images/s of the trainer's evaluation path (:func:`evaluation.evaluate_counts` over a resident
    uint8 test set: normalization per batch, forward, argmax, per-class counts) against the bare
    forward + argmax of the same model on the same images already normalized and in the model's
    memory format, batches of the source's test batch size; min over ``reps`` interleaved calls."""
    model = _eval_model(method, backbone, device, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with synthetic_test_source(n, device) as source:
        ready = [xb.contiguous(memory_format=fmt) for xb, _ in source.test()]

        def bare() -> None:
            with torch.no_grad():
                for xb in ready:
                    model(xb).argmax(1)

        def path() -> None:
            evaluation.evaluate_counts(model, source, 10)

        bare_ms, path_ms = _time_pair(bare, path, reps, device)
    return {
        "bare_images_per_s": round(n / bare_ms * 1000, 1),
        "path_images_per_s": round(n / path_ms * 1000, 1),
        "path_over_bare": round(bare_ms / path_ms, 3),
    }


def _eval_section(backbone: str, n: int, device: torch.device, reps: int) -> dict[str, Any]:
    """The evaluation path against the bare forward for the BN baseline and ``baseline+cbn``, both memory
    formats, and the CBN model's bare forward against the BN model's."""
    out: dict[str, Any] = {"backbone": backbone, "images": n}
    for fmt in ("contiguous", "channels_last"):
        for method in ("baseline", "baseline+cbn"):
            out[f"{method}/{fmt}"] = eval_path_vs_bare(method, backbone, n, device, fmt == "channels_last", reps)
        bn, cbn = out[f"baseline/{fmt}"], out[f"baseline+cbn/{fmt}"]
        out[f"cbn_model_over_bn_model/{fmt}"] = round(cbn["bare_images_per_s"] / bn["bare_images_per_s"], 3)
    return out


def layer_main(
    device: str = "auto",
    batch: int = 128,
    channels: int = 16,
    size: int = 32,
    reps: int = 10,
    eval_images: int = 2000,
    backbone: str = "resnet32",
    eval_reps: int = 5,
) -> dict[str, Any]:
    """Per-layer fwd+bwd ms (median and min over ``reps``) of BatchNorm2d, Conv2d(C, C, 3, padding=1)
    and CBN M = 4 (per pixel, per sample; where the C kernels run, per pixel once more without them)
    on one (batch, C, size, size) input, their ratios to the convolution, and the evaluation path
    against the bare model's forward (:func:`eval_path_vs_bare`, ``eval_images`` images; 0 skips it),
    all in one run. Layers in training mode, float32, no autocast."""
    dev = train.pick_device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g).to(dev).requires_grad_()
    grad = torch.randn(batch, channels, size, size, generator=g).to(dev)
    layers = {
        "batchnorm2d": nn.BatchNorm2d(channels),
        "conv3x3": nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        "cbn_m4_pixel": norm.make("cbn", channels, num_components=4, responsibilities="pixel"),
        "cbn_m4_sample": norm.make("cbn", channels, num_components=4, responsibilities="sample"),
    }

    def median_min(name: str) -> tuple[float, float]:
        return _time_ms(_fwd_bwd(layers[name].to(dev), x, grad), reps, dev, lambda t: (np.median(t), np.min(t)))

    both = {name: median_min(name) for name in layers}
    kernel = norm.implementation(layers["cbn_m4_pixel"], dev)
    if kernel == "c":  # the same layer without the fused C kernels (ltbench.nn.cbn_cpu)
        with cbn_cpu.choosing("torch"):
            both["cbn_m4_pixel_torch"] = median_min("cbn_m4_pixel")
    ms, best = {k: v[0] for k, v in both.items()}, {k: v[1] for k, v in both.items()}
    conv = ms["conv3x3"]
    out: dict[str, Any] = {
        "device": _device_name(dev),
        "torch": torch.__version__,
        "input": [batch, channels, size, size],
        "reps": reps,
        "cbn_kernel": kernel,
        "fwd_bwd_ms": {k: round(v, 3) for k, v in ms.items()},
        "ratio_to_conv": {k: round(v / conv, 3) for k, v in ms.items()},
        "fwd_bwd_ms_min": {k: round(v, 3) for k, v in best.items()},
        "ratio_to_conv_of_min": {k: round(v / best["conv3x3"], 3) for k, v in best.items()},
    }
    if eval_images:
        out["eval"] = _eval_section(backbone, eval_images, dev, eval_reps)
    return out
