"""Train one cell (dataset × ratio × method × backbone × seed) and write its metrics.

The whole loop is in :func:`run`: the prepared uint8 images live on the training device, each
batch is augmented there with per-sample random ops, and per-step statistics accumulate on the
device, so there is no host synchronisation inside an epoch.

Outputs in ``out_dir``: ``train.jsonl`` (one line per epoch) and ``metrics.json`` (final
accuracy overall / many / medium / few and per class, counts, the resolved spec, seeds,
code version, device, wall time, throughput), both written atomically.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from ltbench import data, io, losses, models, norm
from ltbench.sources import TensorSource
from ltbench.config import format_ratio


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def lr_lambda(train: Mapping[str, Any], steps_per_epoch: int):
    """LR multiplier per optimizer step: linear warmup, then cosine / step / constant."""
    total = train["epochs"] * steps_per_epoch
    warm = int(round(train["warmup_epochs"] * steps_per_epoch))
    milestones = [int(round(f * total)) for f in train["step_milestones"]]
    factors = train["step_factors"]

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if train["schedule"] == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        if train["schedule"] == "step":
            passed = sum(step >= m for m in milestones)
            return factors[passed - 1] if passed else 1.0
        return 1.0

    return f


@torch.no_grad()
def evaluate(model: nn.Module, source, num_classes: int) -> torch.Tensor:
    """Per-class count of correct test predictions (int64 tensor on the device)."""
    model.eval()
    correct = None
    for x, y in source.test():
        if correct is None:
            correct = torch.zeros(num_classes, dtype=torch.long, device=y.device)
        correct.index_add_(0, y, (model(x).argmax(1) == y).long())
    model.train()
    return correct


def group_accuracy(per_class: np.ndarray, groups: list[str]) -> dict[str, float | None]:
    """Top-1 (mean over test images, here = mean over classes on a balanced test set) and by group."""
    out: dict[str, float | None] = {}
    for g in ("many", "medium", "few"):
        sel = [i for i, gg in enumerate(groups) if gg == g]
        out[g] = float(100.0 * per_class[sel].mean()) if sel else None
    return out


class Progress:
    """One updating line on a terminal; a plain line per epoch otherwise (log files)."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.tty = total, label, sys.stderr.isatty()

    def update(self, epoch: int, msg: str) -> None:
        if self.tty:
            width = 30
            done = int(width * epoch / self.total)
            print(f"\r{self.label} [{'#' * done}{'.' * (width - done)}] {epoch}/{self.total} {msg}",
                  end="", file=sys.stderr, flush=True)
            if epoch == self.total:
                print(file=sys.stderr)
        else:
            print(f"{self.label} epoch {epoch}/{self.total} {msg}", file=sys.stderr, flush=True)


def run(spec: Mapping[str, Any], ratio: float, seed: int, data_file: str | Path, out_dir: str | Path,
        overrides: Mapping[str, Any] | None = None) -> dict:
    """Train the cell described by ``spec`` (see :func:`ltbench.config.cell_spec`)."""
    spec = json.loads(json.dumps(spec))  # private deep copy
    train = {**spec["train"], **(overrides or {})}
    spec["train"] = train
    out_dir = Path(out_dir)
    t_start = time.time()

    device = pick_device(train["device"])
    if train["threads"]:
        torch.set_num_threads(train["threads"])
    torch.manual_seed(seed)
    np.random.seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)

    dspec = data.get(spec["dataset"])
    source = TensorSource(data_file, device, dspec.mean, dspec.std, dspec.padding)
    counts = source.counts
    K = dspec.num_classes
    opts = spec["dataset_options"]
    groups = data.class_groups(counts, opts["many_threshold"], opts["few_threshold"])
    test_per_class = np.maximum(np.bincount(source.test_y.cpu().numpy(), minlength=K), 1).astype(np.float64)

    recipe = spec["recipe"]
    model = models.build(spec["backbone"], K, dspec.channels,
                         norm.factory(recipe["norm"]["name"], recipe["norm"].get("options")))
    model.to(device)
    criterion = losses.make(recipe["loss"]["name"], counts, **recipe["loss"].get("options", {})).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=train["lr"], momentum=train["momentum"],
                          weight_decay=train["weight_decay"], nesterov=train["nesterov"])
    n = len(source)
    bs = train["batch_size"]
    steps_per_epoch = source.steps(n, bs)
    views = ["weak" if recipe["augment"] == "crop_flip" else
             "strong" if recipe["augment"] == "autoaugment" else "none"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train, steps_per_epoch))
    amp = device.type == "cuda" and train["amp"] == "bf16"

    label = f"{spec['dataset']} r{format_ratio(ratio)} {spec['method']} {spec['backbone']} s{seed}"
    progress = Progress(train["epochs"], label)
    log_lines: list[str] = []
    best = None
    images_seen, train_time = 0, 0.0
    for epoch in range(train["epochs"]):
        criterion.set_epoch(epoch, train["epochs"])
        t0 = time.time()
        perm = torch.randperm(n, device=device, generator=gen)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        for (xb,), yb in source.epoch(perm, bs, views, gen):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(xb)
                loss = criterion(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(yb)
            correct += (logits.argmax(1) == yb).sum()
        seen = min(n, steps_per_epoch * bs)
        images_seen += seen
        row = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": loss_sum.item() / seen,
               "train_acc": 100.0 * correct.item() / seen}
        if not math.isfinite(row["train_loss"]):
            raise FloatingPointError(f"{label}: training loss became {row['train_loss']} at epoch "
                                     f"{epoch + 1} (lr {row['lr']:.4g}); the cell is not usable")
        train_time += time.time() - t0
        if (epoch + 1) % train["eval_every"] == 0 or epoch + 1 == train["epochs"]:
            per_class = evaluate(model, source, K).cpu().numpy() / test_per_class
            row["top1"] = float(100.0 * per_class.mean())
            row.update(group_accuracy(per_class, groups))
            if best is None or train["report_epoch"] == "last" or row["top1"] > best[0]["top1"]:
                best = (row, per_class)
        row["epoch_time_s"] = time.time() - t0
        log_lines.append(json.dumps(row))
        progress.update(epoch + 1, f"loss {row['train_loss']:.3f}" +
                        (f" top1 {row['top1']:.2f}" if "top1" in row else ""))

    final, per_class = best
    metrics = {
        "cell": {"dataset": spec["dataset"], "ratio": ratio, "method": spec["method"],
                 "backbone": spec["backbone"], "seed": seed},
        "top1": final["top1"], "many": final["many"], "medium": final["medium"], "few": final["few"],
        "reported_epoch": final["epoch"],
        "per_class_acc": [float(100.0 * a) for a in per_class],
        "train_counts": counts, "class_groups": groups,
        "seeds": {"train": seed, "subset": opts["subset_seed"]},
        "spec": spec, "spec_hash": io.config_hash(spec),
        "code": io.code_version(), "environment": io.environment(), "device": str(device),
        "wall_time_s": time.time() - t_start, "train_time_s": train_time,
        "images_per_s": images_seen / max(train_time, 1e-9),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    io.write_text(out_dir / "train.jsonl", "\n".join(log_lines) + "\n")
    io.write_json(out_dir / "metrics.json", metrics)
    return metrics
