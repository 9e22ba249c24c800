"""Data-parallel training over the GPUs of one node (``torchrun --standalone``, DDP).

The train rule launches ``torchrun --standalone --nproc_per_node=<gpu>`` instead of ``python``
when a cell asks for more than one GPU (``resources.train.gpu`` or ``resources.cells``); torchrun
sets ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` and :func:`setup` joins the process group (NCCL on
CUDA, gloo on CPU).

How a cell is split: every rank holds the whole (small) label array and the same per-epoch
permutation (drawn on rank 0 and broadcast, once per epoch). ``train.batch_size`` is the *global*
batch; rank ``r`` of ``W`` takes every W-th sample of each global batch (:func:`shard`), so the W
local batches of a step are exactly that step's global batch. Gradients are averaged by DDP;
normalization statistics (BN, CBN, SBN groups) are per GPU over the local batch, as in
torchvision's reference recipe without ``--sync-bn``. Rank 0 evaluates, writes the log, the
checkpoints and ``metrics.json``; the others only train. A run resumed from a checkpoint is
not bit-identical to an uninterrupted one under DDP (the other ranks' augmentation streams are
re-seeded), unlike a single-process run on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ltbench.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def from_env() -> World:
    """The process's place in a torchrun launch (a single process without one)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def setup(world: World, device: torch.device) -> torch.device:
    """Join the process group; on CUDA each rank takes the GPU of its local rank."""
    if not world.active:
        return device
    if device.type == "cuda":
        if torch.cuda.device_count() <= world.local_rank:
            raise RuntimeError(
                f"rank {world.rank} (local rank {world.local_rank}) has no GPU: "
                f"{torch.cuda.device_count()} visible for {world.size} processes"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank, world_size=world.size)
    return device


def teardown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def check_batch(batch_size: int, world: World) -> None:
    if batch_size % world.size:
        raise ConfigError(
            f"train.batch_size {batch_size} (the global batch) is not divisible by the {world.size} GPUs of the run"
        )


def shard(perm: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's samples of an epoch's permutation: every ``size``-th, starting at ``rank``.

    The permutation is first cut to a multiple of ``size`` so that every rank takes the same number
    of steps (DDP needs it). With a global batch B divisible by ``size``, local batch i
    (``B / size`` samples) is the rank's share of global batch i."""
    if not world.active:
        return perm
    n = len(perm) - len(perm) % world.size
    return perm[:n][world.rank :: world.size]


def broadcast(t: torch.Tensor, world: World) -> torch.Tensor:
    """Rank 0's tensor on every rank (in place)."""
    if world.active:
        dist.broadcast(t, src=0)
    return t


def all_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    """The sum over ranks of a (small) tensor, e.g. an epoch's loss sum."""
    if not world.active:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (a signal caught by one rank)."""
    if not world.active:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def average_gradients(params: Iterable[torch.Tensor], world: World) -> None:
    """Average the gradients of ``params`` over the ranks (what DDP does, for a few small tensors)."""
    if not world.active:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world.size)
