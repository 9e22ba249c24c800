"""Train one cell (dataset × ratio × method × backbone × seed) and write its metrics.

:func:`run` builds a :class:`Trainer` and calls :meth:`Trainer.fit`. The prepared uint8 images
live on the training device, each batch is augmented there with per-sample random ops, and
per-step statistics accumulate on the device, so there is no host synchronisation inside an epoch.
A method recipe (``methods.yaml``) decides the views per image, the forward paths and the loss of a
step (:mod:`ltbench.training.step`) and an optional decoupled classifier stage
(:mod:`ltbench.nn.classifier`): the stage plan is representation epochs, then classifier epochs.

Outputs in ``out_dir``: ``model.pt`` (the final state_dict), ``train.jsonl`` (one line per
epoch) and ``metrics.json`` (final accuracy overall / many / medium / few and per class, counts,
the resolved spec, seeds, code version, device, wall time, throughput), written atomically, in
that order, so ``metrics.json`` exists only for a finished cell. Before anything is trained the
directory is checked writable and locked against a second trainer (:mod:`ltbench.training.celldir`).

Preemption: ``checkpoint.pt`` (model with every norm-layer buffer, optimizers, schedules, the
sampler's permutation and position in the epoch, the torch / CUDA / generator / NumPy / Python RNG
states; with a checksum, :mod:`ltbench.training.checkpoint`) is written atomically every
``train.checkpoint_every`` epochs and when SIGTERM or SIGUSR1 arrives (what SLURM sends before a
kill; the run then raises :class:`Preempted`); a run started again in the same ``out_dir`` resumes
from it, and on CPU ends with bit-identical metrics. A run killed outright (SIGKILL) resumes from the
last periodic checkpoint. Checkpoints hold tensors and plain containers only and load with
``torch.load(weights_only=True)``.

Diagnostics (:mod:`ltbench.training.diagnostics`): every ``train.jsonl`` line carries the epoch's
non-finite steps and mean / max gradient norm (tracked on the device), summarised in
``metrics.json`` as ``stability``; a run with CBN layers also gets ``diagnostics`` (priors, spread
of the component means, confident responsibilities, top-1 with batch statistics), computed after the
metrics are fixed, so they change no result.

Collapse: when one class receives at least ``train.collapse_share`` of the reported evaluation's
test predictions, ``metrics.json`` carries a ``failure`` reason and the aggregate lists the cell as
failed with it (:func:`ltbench.analysis.aggregate.check_metrics`), never as an accuracy.

Divergence: a non-finite training loss stops the cell with :class:`FloatingPointError` naming the
epoch, the first non-finite step and its learning rate, and writes ``diverged.json`` (that
diagnostic plus the epochs so far); no ``metrics.json`` is written, so the cell is never
aggregated. A rerun of the same spec, seed and code fails at once with the recorded diagnostic
(no retraining on every retry); delete ``diverged.json`` to train it again.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn

from ltbench import data, io
from ltbench.data.longtail import format_ratio
from ltbench.data.sources import make_source
from ltbench.errors import ConfigError, Preempted
from ltbench.nn import backbones as models
from ltbench.nn import classifier, losses, norm, sampling
from ltbench.training import celldir, checkpoint, diagnostics, distributed, gpus, step
from ltbench.training.evaluation import collapse_reason, evaluate_counts, group_accuracy
from ltbench.training.schedule import lr_lambda

#: The trainer's progress through the cell, saved in (and restored from) a checkpoint.
COUNTERS = checkpoint.COUNTERS


#: Under data parallelism, the ranks agree on a caught signal (SLURM's SIGTERM before the time limit)
#: every this many steps, not at every step: each agreement is an all_reduce and a host sync.
SIGNAL_SYNC_EVERY = 25

GPU_COMPILE = "default"  # what train.compile: auto means on CUDA (docs/architecture.md, "Compiled training")
# graphs one compiled model may need: CBN's first-batch step, compound and split paths, evaluation and
# diagnostics, each again for a smaller last batch; dynamo's default of 8 would run the rest eagerly
RECOMPILE_LIMIT = 32


def compile_mode(setting: str, device: torch.device) -> str:
    """``train.compile`` on ``device``: ``auto`` is ``none`` on CPU and :data:`GPU_COMPILE` on CUDA."""
    if setting == "auto":
        return GPU_COMPILE if device.type == "cuda" else "none"
    return setting


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device (--device) is 'cuda' but no CUDA device is available; use cpu or auto")
    return torch.device(name)


def optimizer_kernel(device: torch.device) -> dict[str, bool]:
    """The SGD implementation keyword for ``device``: on CUDA ``fused`` (one kernel for the whole
    update); elsewhere torch's default. Every optimizer of a run (the representation's, the classifier
    stage's) takes it; tests run the CUDA choice on CPU, where torch supports it too."""
    return {"fused": True} if device.type == "cuda" else {}


def autocast(device: torch.device, amp: bool) -> torch.autocast:
    """bf16 autocast on ``device`` when ``amp`` (``train.amp: bf16``, on CPU as on CUDA), else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


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
        model = norm.apply(
            models.build(spec["backbone"], num_classes, channels), n["name"], scope=scope, **n["options"]
        )
    if spec["train"].get("pretrained"):
        models.load_pretrained(model, spec["train"]["pretrained"])
    head = models.HEADS[recipe["head"]]
    if head is not None:
        model.fc = head(cast(nn.Linear, model.fc).in_features, num_classes)
    if recipe["logit_rectification"]:
        norm.rectify_logits(model)
    return model


def run(
    spec: Mapping[str, Any],
    ratio: float,
    seed: int,
    data_file: str | Path,
    out_dir: str | Path,
    overrides: Mapping[str, Any] | None = None,
) -> dict | None:
    """Train the cell described by ``spec`` (see :func:`ltbench.spec.config.cell_spec`).

    Returns the metrics (also written to ``out_dir/metrics.json``); under ``torchrun`` with several
    processes (:mod:`ltbench.training.distributed`) rank 0 returns them and the other ranks None.
    Rank 0 checks that ``out_dir`` is writable and holds the cell lock while it trains."""
    world = distributed.from_env()
    try:
        with celldir.claim(Path(out_dir), lock=world.main):
            return Trainer(spec, ratio, seed, data_file, out_dir, overrides, world).fit()
    finally:
        distributed.teardown(world)


def _rank_seed(seed: int, world: distributed.World, *position: int) -> int:
    """Rank 0 draws from ``seed`` (a single-process run's stream); other ranks from their own."""
    if world.main and not position:
        return seed
    return int(np.random.SeedSequence([seed, world.rank, *position]).generate_state(1, np.uint64)[0] >> 1)


class Trainer:
    """One cell's training: the setup in ``__init__``, then :meth:`fit` runs the epochs and writes the outputs.

    The setup runs in a fixed order (device, seeds, data source, model, criterion, optimizer, stage
    plan), which fixes what each random stream draws; then the outputs are prepared and a checkpoint
    of the same spec and seed is resumed. Progress is in the attributes named by :data:`COUNTERS`.
    """

    def __init__(
        self,
        spec: Mapping[str, Any],
        ratio: float,
        seed: int,
        data_file: str | Path,
        out_dir: str | Path,
        overrides: Mapping[str, Any] | None = None,
        world: distributed.World | None = None,
    ):
        self.spec = json.loads(json.dumps(spec))  # private deep copy
        self.train = {**self.spec["train"], **(overrides or {})}
        self.spec["train"] = self.train
        self.recipe, self.dt = self.spec["recipe"], self.spec["recipe"]["decoupled"]
        self.ratio, self.seed, self.out_dir = ratio, seed, Path(out_dir)
        self.world = world or distributed.World()
        self.t_start = time.time()
        self.wall_before = 0.0  # wall time of the earlier processes of a resumed cell, to their checkpoint
        self._setup_device()
        self._seed()
        self._setup_data(data_file)
        self._setup_model()
        self._plan_stages()
        self._setup_outputs()
        self._reset_counters()
        self.resume()
        self.step_forward = self._step_forward()

    # ---- setup ----

    def _setup_device(self) -> None:
        world, t = self.world, self.train
        device = distributed.setup(world, pick_device(t["device"]))
        if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
            device = torch.device("cuda", gpus.claim(torch.cuda.device_count()))  # a local multi-GPU machine
            torch.cuda.set_device(device)
        distributed.check_batch(t["batch_size"], world)
        if t["threads"]:
            torch.set_num_threads(t["threads"])
        self.device = device
        self.amp = t["amp"] == "bf16"  # CPU autocast runs it too (default none)
        self.bs = t["batch_size"] // world.size  # per process; train.batch_size is the global batch

    def _seed(self) -> None:
        torch.manual_seed(self.seed)  # the same initial weights on every rank
        np.random.seed(self.seed)
        random.seed(self.seed)
        self.gen = torch.Generator(device=self.device).manual_seed(_rank_seed(self.seed, self.world))

    def _setup_data(self, data_file: str | Path) -> None:
        self.dspec = data.get(self.spec["dataset"])
        opts = self.spec["dataset_options"]
        self.source = make_source(data_file, self.device, self.dspec, opts, self.train)  # .npz or image lists
        self.source.strong_view = {
            **self.source.strong_view,
            **self.recipe.get("strong_view", {}),
        }  # AutoAugment, Cutout
        self.counts = self.source.counts
        self.K = K = len(self.counts)  # dspec.num_classes, or an image-list dataset's expected.classes
        self.groups = data.class_groups(self.counts, opts["many_threshold"], opts["few_threshold"])
        test_y = self.source.test_y.cpu().numpy()
        self.test_per_class = np.maximum(np.bincount(test_y, minlength=K), 1).astype(np.float64)
        self.counts_t = torch.tensor(self.counts, dtype=torch.float32, device=self.device)
        shard = distributed.shard(torch.arange(len(self.source)), self.world)
        self.steps_per_epoch = self.source.steps(len(shard), self.bs)
        # the classifier stage's sampler may set its own epoch length (Kang's class_aware: max n_c × classes)
        head_epoch = sampling.epoch_length(self.dt["sampler"], self.source.labels)
        self.head_steps = self.source.steps(len(distributed.shard(torch.arange(head_epoch), self.world)), self.bs)

    def _setup_model(self) -> None:
        t, r, device = self.train, self.recipe, self.device
        self.model = build_model(self.spec, self.K, self.dspec.channels).to(device)
        if t["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.compile = compile_mode(t.get("compile", "auto"), device)
        if self.compile != "none":  # in place: the same module, state_dict keys and CBN layers for split_mode
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            self.model.compile(mode=self.compile)
        self.criterion = losses.make(r["loss"]["name"], self.counts, **r["loss"]["options"]).to(device)
        nopts = r["norm"]["options"]
        self.fused = optimizer_kernel(device)
        self.opt = torch.optim.SGD(
            norm.param_groups(self.model, t["weight_decay"], alpha_weight_decay=nopts.get("alpha_weight_decay", True)),
            lr=t["lr"],
            momentum=t["momentum"],
            nesterov=t["nesterov"],
            **self.fused,
        )
        self.views = r["views"]
        split = "split" in r["paths"]
        self.group_of_class = norm.class_groups(self.K, nopts["num_components"]).to(device) if split else None
        self.adjust = None  # post-hoc logit adjustment τ log π at evaluation
        if r["posthoc_tau"] is not None:
            self.adjust = r["posthoc_tau"] * torch.log(self.counts_t / self.counts_t.sum())

    def _plan_stages(self) -> None:
        """Representation epochs, then (decoupled cRT / LWS) the classifier alone on the frozen
        backbone; τ-normalization is post hoc and trains no classifier stage."""
        dt, epochs = self.dt, self.train["epochs"]
        self.epochs = epochs
        trained_head = dt["enabled"] and dt["classifier"] != "tau_norm"
        self.head_epochs = int(round(dt["fraction"] * epochs)) if trained_head else 0
        self.rep_epochs = epochs - self.head_epochs
        self.stage_criterion = losses.make(dt["loss"], self.counts).to(self.device)
        if self.rep_epochs < 1:
            raise ValueError(f"decoupled.fraction {dt['fraction']} leaves no representation epoch of {epochs}")
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(self.train, self.steps_per_epoch, epochs=self.rep_epochs)
        )
        self.head: nn.Module | None = None
        self.head_opt: torch.optim.Optimizer | None = None
        self.head_loss: classifier.StageLoss | None = None
        self.head_sched: torch.optim.lr_scheduler.LambdaLR | None = None
        self.stage_dt = self.dt
        self.tau_scores: dict[float, float] | None = None  # τ-normalization: τ chosen on the validation split

    def enter_classifier_stage(self) -> nn.Module:
        """Freeze the model and set up the classifier head (with its optimizer, unless post hoc); returns the head."""
        head = self.head = classifier.setup_stage(self.model, self.dt, self.K).to(self.device)
        if self.dt["classifier"] == "tau_norm":
            if self.dt.get("select_tau"):
                with autocast(self.device, self.amp):
                    tau, self.tau_scores = classifier.select_tau(
                        self.model, self.source.val(), classifier.tau_grid(self.dt)
                    )
                self.stage_dt = {**self.dt, "tau": tau}
            return head
        self.head_loss = classifier.StageLoss(self.dt, self.stage_criterion, self.counts_t)
        t = self.train
        lr = self.dt["lr"] if self.dt["lr"] is not None else t["lr"]
        opt = self.head_opt = torch.optim.SGD(
            head.parameters(), lr=lr, momentum=t["momentum"], weight_decay=t["weight_decay"], **self.fused
        )
        self.head_sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(t, self.head_steps, epochs=self.head_epochs, warmup_epochs=0)
        )
        return head

    def _setup_outputs(self) -> None:
        s = self.spec
        self.label = f"{s['dataset']} r{format_ratio(self.ratio)} {s['method']} {s['backbone']} s{self.seed}"
        if self.world.active:
            print(
                f"{self.label}: rank {self.world.rank} of {self.world.size} on {self.device}, {self.bs} of the "
                f"global batch of {self.train['batch_size']}",
                file=sys.stderr,
                flush=True,
            )
        self.progress = Progress(self.epochs, self.label) if self.world.main else None
        self.ckpt_path = self.out_dir / "checkpoint.pt"
        self.spec_hash = io.config_hash(s)
        if self.world.main:
            checkpoint.remove_stale_temp_files(self.out_dir)
        _fail_if_diverged_before(self.out_dir / "diverged.json", self.spec_hash, self.seed)

    def _reset_counters(self) -> None:
        self.epoch = self.step = self.images_seen = 0
        self.perm: torch.Tensor | None = None
        self.log: list[str] = []  # train.jsonl's lines
        self.best: tuple[dict, np.ndarray] | None = None  # the reported epoch's row and per-class accuracies
        self.train_time = 0.0
        self._reset_sums()

    def _reset_sums(self) -> None:
        """The epoch's running sums, on the device (no host synchronisation inside an epoch)."""
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device)
        self.first_bad = torch.full((), -1, device=self.device)  # first step with a non-finite loss
        self.nonfinite = torch.zeros((), dtype=torch.long, device=self.device)  # steps with a non-finite loss
        self.grad_sum = torch.zeros((), device=self.device)  # Σ and max of the steps' gradient norms
        self.grad_max = torch.zeros((), device=self.device)

    def _step_forward(self) -> nn.Module:
        """DistributedDataParallel over all the passes of a step; a single process calls the model directly."""
        forward: nn.Module = step.PathsForward(self.model, self.recipe, self.amp)
        if self.world.active:
            ids = [self.device.index] if self.device.type == "cuda" else None
            forward = torch.nn.parallel.DistributedDataParallel(forward, device_ids=ids)
        return forward

    # ---- checkpoints ----

    def payload(self) -> dict:
        """Everything a resumed run needs (:data:`ltbench.training.checkpoint.REQUIRED`)."""
        best = self.best
        return {
            "spec_hash": self.spec_hash,
            "seed": self.seed,
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "head": self.head.state_dict() if self.head is not None else None,
            "head_opt": self.head_opt.state_dict() if self.head_opt else None,
            "head_sched": self.head_sched.state_dict() if self.head_sched else None,
            "criterion": self.criterion.state_dict(),
            **checkpoint.rng_state(self.gen, self.device),
            **{k: getattr(self, k) for k in COUNTERS},
            "best_row": json.dumps(best[0]) if best else None,
            "best_per_class": torch.from_numpy(best[1]) if best else None,
            "wall_time": self.wall_time(),  # optional: a checkpoint without it resumes with 0
        }

    def wall_time(self) -> float:
        """Seconds of wall time of the cell: this process's, plus the earlier processes' up to the
        checkpoint this one resumed from (the work a resume redoes is counted once, in this process)."""
        return self.wall_before + time.time() - self.t_start

    def save_checkpoint(self) -> None:
        if self.world.main:
            checkpoint.save(self.ckpt_path, self.payload())

    def resume(self) -> None:
        """Continue from ``checkpoint.pt`` when it holds this spec and seed."""
        ck = checkpoint.load(self.ckpt_path, self.device, self.label)
        if ck is None:
            return
        if ck["spec_hash"] != self.spec_hash or ck["seed"] != self.seed:
            print(f"{self.label}: {self.ckpt_path} belongs to another spec or seed; starting afresh", file=sys.stderr)
            return
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["opt"])
        self.sched.load_state_dict(ck["sched"])
        self.criterion.load_state_dict(ck["criterion"])
        if ck["head"] is not None:
            self.enter_classifier_stage().load_state_dict(ck["head"])
            if self.head_opt is not None and self.head_sched is not None:
                self.head_opt.load_state_dict(ck["head_opt"])
                self.head_sched.load_state_dict(ck["head_sched"])
        checkpoint.set_rng_state(ck, self.gen)
        for k in COUNTERS:
            setattr(self, k, ck[k])
        self.wall_before = float(ck.get("wall_time", 0.0))
        if not self.world.main:  # rank 0 saved the sums of all ranks and its own random streams
            self._reset_sums()
            self.gen.manual_seed(_rank_seed(self.seed, self.world, self.epoch, self.step))
        if ck["best_row"] is not None:
            self.best = (json.loads(ck["best_row"]), ck["best_per_class"].cpu().numpy())
        print(f"{self.label}: resumed from {self.ckpt_path} at epoch {self.epoch} step {self.step}", file=sys.stderr)

    # ---- training ----

    def fit(self) -> dict | None:
        """Train the remaining epochs, then write the outputs; rank 0 returns the metrics."""
        with _Signals() as self.signals:
            while self.epoch < self.epochs:
                self.run_epoch()
        return self.write_outputs()

    def run_epoch(self) -> None:
        in_head = self.epoch >= self.rep_epochs
        if in_head and self.head is None:
            self.enter_classifier_stage()
        self.criterion.set_epoch(self.epoch, self.epochs)
        t0 = time.time()
        perm = self._permutation(in_head)
        for xs, yb in self.source.epoch(perm[self.step * self.bs :], self.bs, self.views, self.gen):
            self.train_step(xs, yb, in_head)
            if self._stop_requested(self.step % SIGNAL_SYNC_EVERY == 0):
                self.preempt(t0)
        if self._stop_requested(True):  # a signal caught since the last agreement stops before the epoch's row
            self.preempt(t0)
        row = self._epoch_row(len(perm), in_head)
        if not math.isfinite(row["train_loss"]):
            raise self.diverged(row, in_head)
        self.train_time += time.time() - t0
        last = self.epoch + 1 == self.epochs
        if last and self.head is None and self.dt["enabled"]:  # τ-normalization: post hoc, on the final weights
            self.enter_classifier_stage()
        if ((self.epoch + 1) % self.train["eval_every"] == 0 or last) and self.world.main:  # rank 0 evaluates
            self.evaluate(row)
        row["epoch_time_s"] = time.time() - t0
        self.end_epoch(row)

    def _stop_requested(self, sync: bool) -> bool:
        """Whether a caught signal stops training now. A single process reads its flag at every step
        (free); under data parallelism every rank must stop at the same step, and agreeing on it costs an
        ``all_reduce`` and a host sync, so the ranks agree only where ``sync`` (every
        :data:`SIGNAL_SYNC_EVERY` steps and at the epoch's end)."""
        caught = self.signals.caught is not None
        if not self.world.active:
            return caught
        return sync and distributed.any_rank(caught, self.world, self.device)

    def _permutation(self, in_head: bool) -> torch.Tensor:
        """This rank's share of the epoch's sample order (drawn at the epoch's start, kept on resume)."""
        if self.perm is None:
            sampler = sampling.SAMPLERS.get(self.dt["sampler"] if in_head else self.recipe["sampler"])
            self.perm = distributed.broadcast(sampler(self.source.labels, self.gen), self.world)
            self.step = 0
        return distributed.shard(self.perm, self.world)

    def train_step(self, xs: list[torch.Tensor], yb: torch.Tensor, in_head: bool) -> None:
        opt: torch.optim.Optimizer
        if in_head:
            if self.head is None or self.head_opt is None or self.head_sched is None or self.head_loss is None:
                raise RuntimeError(f"{self.label}: a classifier-stage step without a trained head")
            with autocast(self.device, self.amp):
                loss, logits = self.head_loss(self.model, self.head, xs[-1], yb)
            opt, sched = self.head_opt, self.head_sched
        else:
            # compiled: one input layout for every view (strides of 1-channel images too), one graph
            if self.compile != "none":
                fmt = torch.channels_last if self.train["channels_last"] else torch.contiguous_format
                xs = [x.clone(memory_format=fmt) for x in xs]
            groups = self.group_of_class[yb] if self.group_of_class is not None else None
            loss, logits = step.step_loss(
                self.recipe, self.criterion, self.step_forward(dict(zip(self.views, xs, strict=True)), groups), yb
            )
            opt, sched = self.opt, self.sched
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.head is not None and in_head:  # the classifier stage trains outside DDP: average its gradients
            distributed.average_gradients(self.head.parameters(), self.world)
        self._track_gradients(opt, loss)
        opt.step()
        sched.step()
        self.loss_sum += loss.detach() * len(yb)
        self.correct += (logits.argmax(1) == yb).sum()
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss.detach()), self.step, self.first_bad)
        self.step += 1

    def _track_gradients(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        """The step's gradient norm and non-finite loss into the epoch's sums, on the device (the
        gradients are read, never changed)."""
        norm_ = diagnostics.grad_norm(p for g in opt.param_groups for p in g["params"])
        self.grad_sum += norm_
        self.grad_max = torch.maximum(self.grad_max, norm_)
        self.nonfinite += (~torch.isfinite(loss.detach())).long()

    def _epoch_row(self, n_perm: int, in_head: bool) -> dict:
        """The epoch's line of train.jsonl (training loss and accuracy over every rank)."""
        seen = min(n_perm, self.step * self.bs)
        if self.world.active:
            seen = int(distributed.all_sum(torch.tensor(seen, device=self.device), self.world))
        self.images_seen += seen
        loss_sum = distributed.all_sum(self.loss_sum, self.world).item()
        correct = distributed.all_sum(self.correct, self.world).item()
        nonfinite = int(distributed.all_sum(self.nonfinite, self.world).item())
        return {
            "epoch": self.epoch + 1,
            "stage": "classifier" if in_head else "representation",
            "lr": (self.head_opt if in_head and self.head_opt is not None else self.opt).param_groups[0]["lr"],
            "train_loss": loss_sum / seen,
            "train_acc": 100.0 * correct / seen,
            "nonfinite_steps": nonfinite,
            "grad_norm_mean": self.grad_sum.item() / max(self.step, 1),
            "grad_norm_max": self.grad_max.item(),
        }

    def end_epoch(self, row: dict) -> None:
        self.log.append(json.dumps(row))
        self.epoch += 1
        self.step, self.perm = 0, None
        self._reset_sums()
        if self.progress is not None:
            self.progress.update(
                self.epoch, f"loss {row['train_loss']:.3f}" + (f" top1 {row['top1']:.2f}" if "top1" in row else "")
            )
        every = self.train["checkpoint_every"]
        if every and self.epoch % every == 0 and self.epoch < self.epochs:
            self.save_checkpoint()

    def evaluate(self, row: dict) -> None:
        """Test accuracy into ``row``; it becomes the reported one (``train.report_epoch``)."""
        net = classifier.eval_model(self.model, self.head, self.stage_dt) if self.head is not None else self.model
        with autocast(self.device, self.amp):
            correct, predicted = evaluate_counts(net, self.source, self.K, self.adjust)
        per_class = correct.cpu().numpy() / self.test_per_class
        pred = predicted.cpu().numpy()
        row["top1"] = float(100.0 * per_class.mean())
        row["pred_top_class"] = int(pred.argmax())  # the collapse check (train.collapse_share)
        row["pred_top_share"] = float(pred.max() / max(pred.sum(), 1))
        row.update(group_accuracy(per_class, self.groups))
        if self.best is None or self.train["report_epoch"] == "last" or row["top1"] > self.best[0]["top1"]:
            self.best = (row, per_class)

    # ---- the ways a run ends ----

    def preempt(self, t0: float) -> None:
        """Checkpoint where the run is (every rank's sums) and raise :class:`Preempted`."""
        self.train_time += time.time() - t0
        self.loss_sum = distributed.all_sum(self.loss_sum, self.world)
        self.correct = distributed.all_sum(self.correct, self.world)
        self.save_checkpoint()
        distributed.barrier(self.world)
        raise Preempted(
            f"{self.label}: signal {self.signals.caught} at epoch {self.epoch + 1}, step "
            f"{self.step}; checkpoint written to {self.ckpt_path}"
        )

    def diverged(self, row: Mapping[str, Any], in_head: bool) -> FloatingPointError:
        """Drop the checkpoint, write ``diverged.json`` (rank 0) and return the error to raise."""
        if not self.world.main:
            return FloatingPointError(f"{self.label}: training diverged (rank {self.world.rank}; rank 0 reports)")
        self.ckpt_path.unlink(missing_ok=True)
        bad = int(self.first_bad)
        sched = self.head_sched if in_head and self.head_sched is not None else self.sched
        k = (
            (self.epoch - self.rep_epochs) * self.head_steps + bad
            if in_head
            else self.epoch * self.steps_per_epoch + bad
        )
        return _diverged(
            self.out_dir / "diverged.json",
            self.label,
            row,
            self.spec,
            self.spec_hash,
            self.seed,
            self.log,
            step=bad + 1,
            steps=self.step,
            lr=float(sched.base_lrs[0] * sched.lr_lambdas[0](k)),
        )

    def metrics(self) -> dict:
        """The content of ``metrics.json``."""
        if self.best is None:
            raise RuntimeError(f"{self.label}: metrics before any evaluated epoch")
        final, per_class = self.best
        s, opts = self.spec, self.spec["dataset_options"]
        return {
            "schema_version": 1,  # ltbench.analysis.aggregate.SCHEMA_VERSION: bump both when the keys change
            "cell": {
                "dataset": s["dataset"],
                "ratio": self.ratio,
                "method": s["method"],
                "backbone": s["backbone"],
                "seed": self.seed,
            },
            "top1": final["top1"],
            "many": final["many"],
            "medium": final["medium"],
            "few": final["few"],
            "reported_epoch": final["epoch"],
            "per_class_acc": [float(100.0 * a) for a in per_class],
            "train_counts": self.counts,
            "class_groups": self.groups,
            "seeds": {"train": self.seed, "subset": opts["subset_seed"]},
            "spec": s,
            "spec_hash": self.spec_hash,
            "code": io.code_version(),
            "device": str(self.device),
            "environment": {
                **io.environment(),
                "cbn_kernel": norm.implementation(self.model, self.device, self.train["channels_last"]),
                "compile": self.compile,
            },
            "world_size": self.world.size,
            "wall_time_s": self.wall_time(),
            "train_time_s": self.train_time,
            "images_per_s": self.images_seen / max(self.train_time, 1e-9),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tau": self.stage_dt["tau"] if self.dt["enabled"] and self.dt["classifier"] == "tau_norm" else None,
            "tau_val_accuracy": {str(t): v for t, v in self.tau_scores.items()} if self.tau_scores else None,
            "stability": diagnostics.stability(json.loads(x) for x in self.log),
            "failure": collapse_reason(
                final.get("pred_top_share"), final.get("pred_top_class"), self.train["collapse_share"]
            ),
        }

    def write_outputs(self) -> dict | None:
        """model.pt, train.jsonl, metrics.json (in that order, atomically) on rank 0; the others wait."""
        if not self.world.main:
            distributed.barrier(self.world)
            return None
        metrics = self.metrics()
        final = classifier.eval_model(self.model, self.head, self.stage_dt) if self.head is not None else self.model
        with io.atomic_path(self.out_dir / "model.pt") as tmp:
            torch.save(final.state_dict(), tmp)
        io.write_text(self.out_dir / "train.jsonl", "\n".join(self.log) + "\n")
        self._add_diagnostics(metrics, final)
        io.write_json(self.out_dir / "metrics.json", metrics)
        self.ckpt_path.unlink(missing_ok=True)
        (self.out_dir / "diverged.json").unlink(missing_ok=True)  # from an earlier spec, seed or code version
        distributed.barrier(self.world)
        return metrics

    def _add_diagnostics(self, metrics: dict, final: nn.Module) -> None:
        """After the metrics are fixed: CBN diagnostics (runs with CBN layers) and the collapse warning."""
        diag = diagnostics.cbn_diagnostics(final, self.source, self.K, self.bs, self.train["diag_images"], self.adjust)
        if diag is not None:
            metrics["diagnostics"] = diag
        if metrics["failure"]:
            print(
                f"{self.label}: {metrics['failure']}; metrics.json records the failure and the cell is not aggregated",
                file=sys.stderr,
            )


class Progress:
    """One updating line on a terminal; a plain line per epoch otherwise (log files)."""

    def __init__(self, total: int, label: str):
        self.total, self.label = total, label
        self.tty = sys.stderr.isatty()

    def update(self, epoch: int, msg: str) -> None:
        if self.tty:
            width = 30
            done = int(width * epoch / self.total)
            print(
                f"\r{self.label} [{'#' * done}{'.' * (width - done)}] {epoch}/{self.total} {msg}",
                end="" if epoch < self.total else "\n",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(f"{self.label} epoch {epoch}/{self.total} {msg}", file=sys.stderr, flush=True)


class _Signals:
    """Turns SIGTERM/SIGUSR1 into a flag the loop checks between steps."""

    def __init__(self) -> None:
        self.caught: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.caught = signum

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _fail_if_diverged_before(path: Path, spec_hash: str, seed: int) -> None:
    """A cell that diverged stays diverged: rerunning the same spec, seed and code (a cluster retry)
    fails at once with the recorded diagnostic instead of training to the same NaN again."""
    if not path.exists():
        return
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if (prev.get("spec_hash"), prev.get("seed"), prev.get("code", {}).get("git_commit")) == (
        spec_hash,
        seed,
        io.code_version()["git_commit"],
    ):
        raise FloatingPointError(
            f"{prev['message']} [recorded by an earlier run of this spec, seed and code in "
            f"{path}; delete it to train the cell again]"
        )


def _diverged(
    path: Path,
    label: str,
    row: Mapping[str, Any],
    spec: Mapping[str, Any],
    spec_hash: str,
    seed: int,
    log: list[str],
    step: int,
    steps: int,
    lr: float,
) -> FloatingPointError:
    """Write the divergence diagnostic next to the cell's outputs and return the error to raise."""
    epochs = [json.loads(x) for x in log]
    last = epochs[-1] if epochs else None
    where = f"step {step} of {steps}" if step > 0 else f"one of its {steps} steps"
    message = (
        f"{label}: training diverged: the training loss became {row['train_loss']} in epoch {row['epoch']} "
        f"({row['stage']} stage; first non-finite loss at {where}, lr {lr:.4g}); "
        + (
            f"the last finite epoch loss was {last['train_loss']:.4g} (epoch {last['epoch']}). "
            if last
            else "no epoch finished before. "
        )
        + f"The cell is not usable and is not aggregated. Lower train.lr (now {spec['train']['lr']:g}), "
        f"lengthen train.warmup_epochs (now {spec['train']['warmup_epochs']:g}) or check the method's "
        f"options. Diagnostic: {path}"
    )
    io.write_json(
        path,
        {
            "message": message,
            "cell": label,
            "spec_hash": spec_hash,
            "seed": seed,
            "epoch": row["epoch"],
            "stage": row["stage"],
            "first_nonfinite_step": step or None,
            "nonfinite_steps": row.get("nonfinite_steps"),
            "steps_per_epoch": steps,
            "lr_at_first_nonfinite_step": lr,
            "epoch_train_loss": str(row["train_loss"]),
            "epochs": epochs,
            "spec": spec,
            "code": io.code_version(),
        },
    )
    return FloatingPointError(message)
