"""Train one cell (dataset × ratio × method × backbone × seed) and write its metrics.

The whole loop is in :func:`run`. The prepared uint8 images live on the training device, each
batch is augmented there with per-sample random ops, and per-step statistics accumulate on the
device, so there is no host synchronisation inside an epoch. A method recipe (``methods.yaml``)
decides the views per image (weak / strong), the forward paths (compound / split = SBN), which
logits get the classification loss, the stop-gradient consistency of dual-path learning, and an
optional decoupled classifier stage.

Outputs in ``out_dir``: ``model.pt`` (the final state_dict), ``train.jsonl`` (one line per
epoch) and ``metrics.json`` (final accuracy overall / many / medium / few and per class, counts,
the resolved spec, seeds, code version, device, wall time, throughput), written atomically, in
that order, so ``metrics.json`` exists only for a finished cell.

Preemption: ``checkpoint.pt`` (model with every norm-layer buffer, optimizers, schedules, the
sampler's permutation and position in the epoch, the torch / CUDA / generator / NumPy / Python RNG
states) is written atomically every ``train.checkpoint_every`` epochs and when SIGTERM or SIGUSR1
arrives (what SLURM sends before a kill; the run then raises :class:`Preempted`); a run started
again in the same ``out_dir`` resumes from it, and on CPU ends with bit-identical metrics. A run
killed outright (SIGKILL) resumes from the last periodic checkpoint. Checkpoints hold tensors and
plain containers only and load with ``torch.load(weights_only=True)``.

Divergence: a non-finite training loss stops the cell with :class:`FloatingPointError` naming the
epoch, the first non-finite step and its learning rate, and writes ``diverged.json`` (that
diagnostic plus the epochs so far); no ``metrics.json`` is written, so the cell is never
aggregated. A rerun of the same spec, seed and code fails at once with the recorded diagnostic
(no retraining on every retry); delete ``diverged.json`` to train it again.
"""
from __future__ import annotations

import json
import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ltbench import data, io
from ltbench.nn import backbones as models, classifier, losses, norm, sampling
from ltbench.errors import Preempted
from ltbench.data.longtail import format_ratio
from ltbench.training import distributed, gpus
from ltbench.data.sources import TensorSource, make_source  # noqa: F401




def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def lr_lambda(train: Mapping[str, Any], steps_per_epoch: int, epochs: int | None = None,
              warmup_epochs: float | None = None):
    """LR multiplier per optimizer step: linear warmup, then cosine / step / constant."""
    epochs = train["epochs"] if epochs is None else epochs
    total = epochs * steps_per_epoch
    warm = int(round((train["warmup_epochs"] if warmup_epochs is None else warmup_epochs) * steps_per_epoch))
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
def evaluate(model: nn.Module, source, num_classes: int, adjust: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class count of correct test predictions (int64 tensor on the device).

    ``adjust`` is subtracted from the logits first (post-hoc logit adjustment, τ log π).
    """
    was_training = model.training
    model.eval()
    correct = None
    for x, y in source.test():
        if correct is None:
            correct = torch.zeros(num_classes, dtype=torch.long, device=y.device)
        logits = model(x).float()
        if adjust is not None:
            logits = logits - adjust
        correct.index_add_(0, y, (logits.argmax(1) == y).long())
    model.train(was_training)
    return correct


def group_accuracy(per_class: np.ndarray, groups: list[str]) -> dict[str, float | None]:
    """Mean accuracy (%) over the classes of each group; None for an empty group."""
    out: dict[str, float | None] = {}
    for g in ("many", "medium", "few"):
        sel = [i for i, gg in enumerate(groups) if gg == g]
        out[g] = float(100.0 * per_class[sel].mean()) if sel else None
    return out


def consistency_loss(logits: Mapping[str, torch.Tensor], pairing: str) -> torch.Tensor:
    """Stop-gradient cosine consistency between the compound and split paths (CBN Eq. 19).

    cross:     −½[cos(z^c_s, sg(z^s_w)) + cos(z^s_s, sg(z^c_w))]  (weak-view predictions are targets)
    same_view: −½[cos(z^c_s, sg(z^s_s)) + cos(z^s_w, sg(z^c_w))]
    """
    c_w, c_s, s_w, s_s = (logits[k] for k in ("compound/weak", "compound/strong", "split/weak", "split/strong"))
    if pairing == "cross":
        pairs = ((c_s, s_w), (s_s, c_w))
    elif pairing == "same_view":
        pairs = ((c_s, s_s), (s_w, c_w))
    else:
        raise ValueError(f"unknown consistency pairing {pairing!r}; known: cross, same_view")
    return -0.5 * sum(F.cosine_similarity(a, b.detach(), dim=1).mean() for a, b in pairs)


class PathsForward(nn.Module):
    """Every wanted (path, view) logit of one training step in one call (:func:`forward_paths`), so
    that DistributedDataParallel sees one forward per backward even for SBN's and DPL's passes."""

    def __init__(self, model: nn.Module, paths, wanted: set[str], amp: bool):
        super().__init__()
        self.model, self.paths, self.wanted, self.amp = model, list(paths), set(wanted), amp

    def forward(self, views: Mapping[str, torch.Tensor], groups: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return forward_paths(self.model, views, self.paths, self.wanted, groups, self.amp)


def forward_paths(model: nn.Module, views: Mapping[str, torch.Tensor], paths, wanted: set[str],
                  groups: torch.Tensor | None, amp: bool) -> dict[str, torch.Tensor]:
    """Logits keyed ``"path/view"`` for every wanted pair; the split path runs in SBN mode."""
    out = {}
    for p in paths:
        ctx = norm.split_mode(model, groups) if p == "split" else nullcontext()
        with ctx, torch.autocast(next(iter(views.values())).device.type, dtype=torch.bfloat16, enabled=amp):
            for v, x in views.items():
                if f"{p}/{v}" in wanted:
                    out[f"{p}/{v}"] = model(x).float()
    return out


class Progress:
    """One updating line on a terminal; a plain line per epoch otherwise (log files)."""

    def __init__(self, total: int, label: str):
        self.total, self.label = total, label
        self.tty = sys.stderr.isatty()

    def update(self, epoch: int, msg: str) -> None:
        if self.tty:
            width = 30
            done = int(width * epoch / self.total)
            print(f"\r{self.label} [{'#' * done}{'.' * (width - done)}] {epoch}/{self.total} {msg}",
                  end="" if epoch < self.total else "\n", file=sys.stderr, flush=True)
        else:
            print(f"{self.label} epoch {epoch}/{self.total} {msg}", file=sys.stderr, flush=True)


class _Signals:
    """Turns SIGTERM/SIGUSR1 into a flag the loop checks between steps."""

    def __init__(self):
        self.caught: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.caught = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def build_model(spec: Mapping[str, Any], num_classes: int, channels: int) -> nn.Module:
    """The backbone with the recipe's norm layers (in scope) and optional logit rectification."""
    recipe = spec["recipe"]
    n = recipe["norm"]
    scope = n.get("scope", "all")
    # A norm layer is injected through the backbone's norm_layer; restricted scopes and NBN's
    # shared α (one Parameter across layers) need model-level surgery instead (norm.apply).
    if scope == "all" and n["options"].get("alpha") != "shared":
        model = models.build(spec["backbone"], num_classes, channels, norm.factory(n["name"], n["options"]))
    else:
        model = norm.apply(models.build(spec["backbone"], num_classes, channels), n["name"], scope=scope,
                           **n["options"])
    if spec["train"].get("pretrained"):
        models.load_pretrained(model, spec["train"]["pretrained"])
    if models.HEADS[recipe["head"]] is not None:
        model.fc = models.HEADS[recipe["head"]](model.fc.in_features, num_classes)
    if recipe["logit_rectification"]:
        norm.rectify_logits(model)
    return model


def run(spec: Mapping[str, Any], ratio: float, seed: int, data_file: str | Path, out_dir: str | Path,
        overrides: Mapping[str, Any] | None = None) -> dict | None:
    """Train the cell described by ``spec`` (see :func:`ltbench.spec.config.cell_spec`).

    Returns the metrics (also written to ``out_dir/metrics.json``); under ``torchrun`` with several
    processes (:mod:`ltbench.training.distributed`) rank 0 returns them and the other ranks None."""
    world = distributed.from_env()
    try:
        return _run(spec, ratio, seed, data_file, out_dir, overrides, world)
    finally:
        distributed.teardown(world)


def _rank_seed(seed: int, world: distributed.World, *position: int) -> int:
    """Rank 0 draws from ``seed`` (a single-process run's stream); other ranks from their own."""
    if world.main and not position:
        return seed
    return int(np.random.SeedSequence([seed, world.rank, *position]).generate_state(1, np.uint64)[0] >> 1)


def _run(spec: Mapping[str, Any], ratio: float, seed: int, data_file: str | Path, out_dir: str | Path,
         overrides: Mapping[str, Any] | None, world: distributed.World) -> dict | None:
    spec = json.loads(json.dumps(spec))  # private deep copy
    train = {**spec["train"], **(overrides or {})}
    spec["train"] = train
    recipe = spec["recipe"]
    out_dir = Path(out_dir)
    t_start = time.time()

    device = distributed.setup(world, pick_device(train["device"]))
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        device = torch.device("cuda", gpus.claim(torch.cuda.device_count()))  # a local multi-GPU machine
        torch.cuda.set_device(device)
    distributed.check_batch(train["batch_size"], world)
    if train["threads"]:
        torch.set_num_threads(train["threads"])
    torch.manual_seed(seed)  # the same initial weights on every rank
    np.random.seed(seed)
    random.seed(seed)
    gen = torch.Generator(device=device).manual_seed(_rank_seed(seed, world))  # sampling, augmentation

    dspec = data.get(spec["dataset"])
    source = make_source(data_file, device, dspec, spec["dataset_options"], train)  # .npz or image lists
    source.strong_view = {**source.strong_view, **recipe.get("strong_view", {})}  # AutoAugment variant, Cutout
    counts = source.counts
    K = len(counts)  # dspec.num_classes, or an image-list dataset's expected.classes
    opts = spec["dataset_options"]
    groups = data.class_groups(counts, opts["many_threshold"], opts["few_threshold"])
    test_per_class = np.maximum(np.bincount(source.test_y.cpu().numpy(), minlength=K), 1).astype(np.float64)
    counts_t = torch.tensor(counts, dtype=torch.float32, device=device)

    model = build_model(spec, K, dspec.channels).to(device)
    if train["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    criterion = losses.make(recipe["loss"]["name"], counts, **recipe["loss"]["options"]).to(device)
    nopts = recipe["norm"]["options"]
    fused = {"fused": True} if device.type == "cuda" else {}  # one kernel for the whole update on CUDA
    opt = torch.optim.SGD(norm.param_groups(model, train["weight_decay"],
                                            alpha_weight_decay=nopts.get("alpha_weight_decay", True)),
                          lr=train["lr"], momentum=train["momentum"], nesterov=train["nesterov"], **fused)

    # Stages: representation epochs, then (decoupled cRT / LWS) the classifier alone on frozen
    # features; τ-normalization is post hoc and trains no classifier stage.
    dt = recipe["decoupled"]
    epochs = train["epochs"]
    head_epochs = int(round(dt["fraction"] * epochs)) if dt["enabled"] and dt["classifier"] != "tau_norm" else 0
    rep_epochs = epochs - head_epochs
    stage_criterion = losses.make(dt["loss"], counts).to(device)
    if rep_epochs < 1:
        raise ValueError(f"decoupled.fraction {dt['fraction']} leaves no representation epoch of {epochs}")
    bs = train["batch_size"] // world.size  # per process; train.batch_size is the global batch
    steps_per_epoch = source.steps(len(distributed.shard(torch.arange(len(source)), world)), bs)
    # the classifier stage's sampler may set its own epoch length (Kang's class_aware: max n_c × classes)
    head_steps = source.steps(len(distributed.shard(torch.arange(
        sampling.epoch_length(dt["sampler"], source.labels)), world)), bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train, steps_per_epoch, epochs=rep_epochs))
    amp = device.type == "cuda" and train["amp"] == "bf16"
    views, paths = recipe["views"], recipe["paths"]
    wanted = set(recipe["classify_on"])
    cons = recipe["consistency"]
    if cons["weight"] > 0:
        wanted |= {f"{p}/{v}" for p in ("compound", "split") for v in ("weak", "strong")}
    group_of_class = norm.class_groups(K, nopts["num_components"]).to(device) if "split" in paths else None
    adjust = None
    if recipe["posthoc_tau"] is not None:
        adjust = recipe["posthoc_tau"] * torch.log(counts_t / counts_t.sum())

    label = f"{spec['dataset']} r{format_ratio(ratio)} {spec['method']} {spec['backbone']} s{seed}"
    if world.active:
        print(f"{label}: rank {world.rank} of {world.size} on {device}, {bs} of the global batch of "
              f"{train['batch_size']}", file=sys.stderr, flush=True)
    progress = Progress(epochs, label) if world.main else None
    state = {"epoch": 0, "step": 0, "perm": None, "log": [], "best": None, "images_seen": 0,
             "train_time": 0.0, "loss_sum": torch.zeros((), device=device),
             "correct": torch.zeros((), device=device), "first_bad": torch.full((), -1, device=device)}
    ckpt_path = out_dir / "checkpoint.pt"
    spec_hash = io.config_hash(spec)
    _remove_stale_temp_files(out_dir)
    _fail_if_diverged_before(out_dir / "diverged.json", spec_hash, seed)
    head = head_opt = head_sched = None
    stage_dt, tau_scores = dt, None  # τ-normalization: τ chosen on the validation split (select_tau)

    def enter_classifier_stage():
        nonlocal head, head_opt, head_sched, stage_dt, tau_scores
        head = classifier.setup_stage(model, dt, K).to(device)
        if dt["classifier"] == "tau_norm":
            if dt.get("select_tau"):
                tau, tau_scores = classifier.select_tau(model, source.val(), classifier.tau_grid(dt))
                stage_dt = {**dt, "tau": tau}
            return
        lr = dt["lr"] if dt["lr"] is not None else train["lr"]
        head_opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=train["momentum"],
                                   weight_decay=train["weight_decay"], **fused)
        head_sched = torch.optim.lr_scheduler.LambdaLR(
            head_opt, lr_lambda(train, head_steps, epochs=head_epochs, warmup_epochs=0))

    def save_checkpoint():
        if not world.main:
            return
        payload = {"spec_hash": spec_hash, "seed": seed, "model": model.state_dict(),
                   "opt": opt.state_dict(), "sched": sched.state_dict(),
                   "head": head.state_dict() if head is not None else None,
                   "head_opt": head_opt.state_dict() if head_opt else None,
                   "head_sched": head_sched.state_dict() if head_sched else None,
                   "criterion": criterion.state_dict(),
                   "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                   "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                   "numpy_rng": _numpy_rng_state(), "python_rng": random.getstate(),
                   **{k: v for k, v in state.items() if k != "best"},
                   "best_row": json.dumps(state["best"][0]) if state["best"] else None,
                   "best_per_class": torch.from_numpy(state["best"][1]) if state["best"] else None}
        with io.atomic_path(ckpt_path) as tmp:
            torch.save(payload, tmp)

    ck = _load_checkpoint(ckpt_path, device, label)
    if ck is not None:
        if ck["spec_hash"] != spec_hash or ck["seed"] != seed:
            print(f"{label}: {ckpt_path} belongs to another spec or seed; starting afresh", file=sys.stderr)
        else:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            sched.load_state_dict(ck["sched"])
            criterion.load_state_dict(ck["criterion"])
            if ck["head"] is not None:
                enter_classifier_stage()
                head.load_state_dict(ck["head"])
                if head_opt is not None:
                    head_opt.load_state_dict(ck["head_opt"])
                    head_sched.load_state_dict(ck["head_sched"])
            gen.set_state(ck["gen"].cpu() if device.type == "cpu" else ck["gen"])
            torch.set_rng_state(ck["torch_rng"].cpu())
            if ck["cuda_rng"] is not None:
                torch.cuda.set_rng_state_all([s.cpu() for s in ck["cuda_rng"]])
            if ck.get("numpy_rng") is not None:
                _set_numpy_rng_state(ck["numpy_rng"])
            if ck.get("python_rng") is not None:
                random.setstate(ck["python_rng"])
            for k in ("epoch", "step", "perm", "log", "images_seen", "train_time", "loss_sum", "correct"):
                state[k] = ck[k]
            if "first_bad" in ck:
                state["first_bad"] = ck["first_bad"]
            if not world.main:  # rank 0 saved the sums of all ranks and its own random streams
                state.update(loss_sum=torch.zeros((), device=device), correct=torch.zeros((), device=device))
                gen.manual_seed(_rank_seed(seed, world, state["epoch"], state["step"]))
            if ck["best_row"] is not None:
                state["best"] = (json.loads(ck["best_row"]), ck["best_per_class"].numpy())
            print(f"{label}: resumed from {ckpt_path} at epoch {state['epoch']} step {state['step']}",
                  file=sys.stderr)

    # DistributedDataParallel over all the passes of a step; a single process calls the model directly
    step_forward = PathsForward(model, paths, wanted, amp)
    if world.active:
        step_forward = torch.nn.parallel.DistributedDataParallel(
            step_forward, device_ids=[device.index] if device.type == "cuda" else None)

    with _Signals() as signals:
        while state["epoch"] < epochs:
            epoch = state["epoch"]
            in_head_stage = epoch >= rep_epochs
            if in_head_stage and head is None:
                enter_classifier_stage()
            criterion.set_epoch(epoch, epochs)
            t0 = time.time()
            if state["perm"] is None:
                state["perm"] = distributed.broadcast(sampling.SAMPLERS.get(
                    dt["sampler"] if in_head_stage else recipe["sampler"])(source.labels, gen), world)
                state["step"] = 0
            perm = distributed.shard(state["perm"], world)  # this rank's share of every global batch
            for xs, yb in source.epoch(perm[state["step"] * bs:], bs, views, gen):
                if in_head_stage:
                    loss, logits = classifier.stage_loss(model, head, xs[-1], yb, stage_criterion, dt, counts_t)
                    step_opt, step_sched = head_opt, head_sched
                else:
                    out = step_forward(dict(zip(views, xs)),
                                       group_of_class[yb] if group_of_class is not None else None)
                    loss = sum(criterion(out[k], yb) for k in recipe["classify_on"]) / len(recipe["classify_on"])
                    if cons["weight"] > 0:
                        loss = loss + cons["weight"] * consistency_loss(out, cons["pairing"])
                    logits = out[recipe["classify_on"][0]]
                    step_opt, step_sched = opt, sched
                step_opt.zero_grad(set_to_none=True)
                loss.backward()
                if in_head_stage:  # the classifier stage trains outside DDP: average its gradients
                    distributed.average_gradients(head.parameters(), world)
                step_opt.step()
                step_sched.step()
                state["loss_sum"] += loss.detach() * len(yb)
                state["correct"] += (logits.argmax(1) == yb).sum()
                # the first step of the epoch whose loss is not finite, tracked on the device (no sync)
                state["first_bad"] = torch.where((state["first_bad"] < 0) & ~torch.isfinite(loss.detach()),
                                                 state["step"], state["first_bad"])
                state["step"] += 1
                if distributed.any_rank(signals.caught is not None, world, device):  # every rank stops here
                    state["train_time"] += time.time() - t0
                    state["loss_sum"] = distributed.all_sum(state["loss_sum"], world)
                    state["correct"] = distributed.all_sum(state["correct"], world)
                    save_checkpoint()
                    distributed.barrier(world)
                    raise Preempted(f"{label}: signal {signals.caught} at epoch {epoch + 1}, step "
                                    f"{state['step']}; checkpoint written to {ckpt_path}")
            seen = min(len(perm), state["step"] * bs)
            if world.active:
                seen = int(distributed.all_sum(torch.tensor(seen, device=device), world))
            state["images_seen"] += seen
            loss_sum = distributed.all_sum(state["loss_sum"], world).item()
            correct = distributed.all_sum(state["correct"], world).item()
            row = {"epoch": epoch + 1, "stage": "classifier" if in_head_stage else "representation",
                   "lr": (head_opt if in_head_stage else opt).param_groups[0]["lr"],
                   "train_loss": loss_sum / seen, "train_acc": 100.0 * correct / seen}
            if not math.isfinite(row["train_loss"]):
                if not world.main:
                    raise FloatingPointError(f"{label}: training diverged (rank {world.rank}; rank 0 reports)")
                ckpt_path.unlink(missing_ok=True)
                bad = int(state["first_bad"])
                st = head_sched if in_head_stage else sched
                k = (epoch - rep_epochs) * head_steps + bad if in_head_stage else epoch * steps_per_epoch + bad
                raise _diverged(out_dir / "diverged.json", label, row, spec, spec_hash, seed, state["log"],
                                step=bad + 1, steps=state["step"], lr=st.base_lrs[0] * st.lr_lambdas[0](k))
            state["train_time"] += time.time() - t0
            last = epoch + 1 == epochs
            if last and head is None and dt["enabled"]:  # τ-normalization: post hoc, on the final weights
                enter_classifier_stage()
            if ((epoch + 1) % train["eval_every"] == 0 or last) and world.main:  # rank 0 evaluates
                net = classifier.eval_model(model, head, stage_dt) if head is not None else model
                per_class = evaluate(net, source, K, adjust).cpu().numpy() / test_per_class
                row["top1"] = float(100.0 * per_class.mean())
                row.update(group_accuracy(per_class, groups))
                best = state["best"]
                if best is None or train["report_epoch"] == "last" or row["top1"] > best[0]["top1"]:
                    state["best"] = (row, per_class)
            row["epoch_time_s"] = time.time() - t0
            state["log"].append(json.dumps(row))
            state.update(epoch=epoch + 1, step=0, perm=None, loss_sum=torch.zeros((), device=device),
                         correct=torch.zeros((), device=device), first_bad=torch.full((), -1, device=device))
            if progress is not None:
                progress.update(epoch + 1, f"loss {row['train_loss']:.3f}" +
                                (f" top1 {row['top1']:.2f}" if "top1" in row else ""))
            if train["checkpoint_every"] and (epoch + 1) % train["checkpoint_every"] == 0 and not last:
                save_checkpoint()

    if not world.main:  # rank 0 writes the outputs
        distributed.barrier(world)
        return None
    final, per_class = state["best"]
    final_model = classifier.eval_model(model, head, stage_dt) if head is not None else model
    metrics = {
        "cell": {"dataset": spec["dataset"], "ratio": ratio, "method": spec["method"],
                 "backbone": spec["backbone"], "seed": seed},
        "top1": final["top1"], "many": final["many"], "medium": final["medium"], "few": final["few"],
        "reported_epoch": final["epoch"],
        "tau": stage_dt["tau"] if dt["enabled"] and dt["classifier"] == "tau_norm" else None,
        "tau_val_accuracy": {str(t): v for t, v in tau_scores.items()} if tau_scores else None,
        "per_class_acc": [float(100.0 * a) for a in per_class],
        "train_counts": counts, "class_groups": groups,
        "seeds": {"train": seed, "subset": opts["subset_seed"]},
        "spec": spec, "spec_hash": spec_hash,
        "code": io.code_version(), "environment": io.environment(), "device": str(device),
        "world_size": world.size,
        "wall_time_s": time.time() - t_start, "train_time_s": state["train_time"],
        "images_per_s": state["images_seen"] / max(state["train_time"], 1e-9),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with io.atomic_path(out_dir / "model.pt") as tmp:
        torch.save(final_model.state_dict(), tmp)
    io.write_text(out_dir / "train.jsonl", "\n".join(state["log"]) + "\n")
    io.write_json(out_dir / "metrics.json", metrics)
    ckpt_path.unlink(missing_ok=True)
    (out_dir / "diverged.json").unlink(missing_ok=True)  # from an earlier spec, seed or code version
    distributed.barrier(world)
    return metrics


# Outputs written through io.atomic_path; a SIGKILL during a write leaves ".<name>.<random>.tmp".
_OWN_FILES = ("checkpoint.pt", "model.pt", "train.jsonl", "metrics.json", "diverged.json")


def _remove_stale_temp_files(out_dir: Path) -> None:
    """Delete the temporary files of writes that a killed run of this cell left behind."""
    if not out_dir.is_dir():
        return
    for p in out_dir.iterdir():
        if p.name.endswith(".tmp") and any(p.name.startswith(f".{name}.") for name in _OWN_FILES):
            p.unlink(missing_ok=True)


def _load_checkpoint(path: Path, device: torch.device, label: str) -> dict | None:
    """The checkpoint at ``path`` (tensors and plain containers only: ``weights_only=True``), or
    None when there is none or it cannot be read (then the cell starts afresh, with a warning)."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # writes are atomic; a damaged file means a file-system crash
        bad = path.with_name(path.name + ".unreadable")
        path.replace(bad)
        print(f"{label}: {path} is unreadable ({type(e).__name__}: {e}); moved to {bad.name}, "
              "starting afresh", file=sys.stderr)
        return None


def _numpy_rng_state() -> dict:
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def _set_numpy_rng_state(s: Mapping[str, Any]) -> None:
    np.random.set_state(("MT19937", s["key"].cpu().numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                         s["gauss"]))


def _fail_if_diverged_before(path: Path, spec_hash: str, seed: int) -> None:
    """A cell that diverged stays diverged: rerunning the same spec, seed and code (a cluster retry)
    fails at once with the recorded diagnostic instead of training to the same NaN again."""
    if not path.exists():
        return
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if (prev.get("spec_hash"), prev.get("seed"), prev.get("code", {}).get("git_commit")) == \
            (spec_hash, seed, io.code_version()["git_commit"]):
        raise FloatingPointError(f"{prev['message']} [recorded by an earlier run of this spec, seed and code in "
                                 f"{path}; delete it to train the cell again]")


def _diverged(path: Path, label: str, row: Mapping[str, Any], spec: Mapping[str, Any], spec_hash: str,
              seed: int, log: list[str], step: int, steps: int, lr: float) -> FloatingPointError:
    """Write the divergence diagnostic next to the cell's outputs and return the error to raise."""
    epochs = [json.loads(x) for x in log]
    last = epochs[-1] if epochs else None
    where = f"step {step} of {steps}" if step > 0 else f"one of its {steps} steps"
    message = (f"{label}: training diverged: the training loss became {row['train_loss']} in epoch {row['epoch']} "
               f"({row['stage']} stage; first non-finite loss at {where}, lr {lr:.4g}); "
               + (f"the last finite epoch loss was {last['train_loss']:.4g} (epoch {last['epoch']}). "
                  if last else "no epoch finished before. ")
               + f"The cell is not usable and is not aggregated. Lower train.lr (now {spec['train']['lr']:g}), "
               f"lengthen train.warmup_epochs (now {spec['train']['warmup_epochs']:g}) or check the method's "
               f"options. Diagnostic: {path}")
    io.write_json(path, {"message": message, "cell": label, "spec_hash": spec_hash, "seed": seed,
                         "epoch": row["epoch"], "stage": row["stage"], "first_nonfinite_step": step or None,
                         "steps_per_epoch": steps, "lr_at_first_nonfinite_step": lr,
                         "epoch_train_loss": str(row["train_loss"]), "epochs": epochs, "spec": spec,
                         "code": io.code_version()})
    return FloatingPointError(message)
