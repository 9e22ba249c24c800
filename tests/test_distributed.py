"""Data-parallel training (torchrun, DDP on gloo here): sharding, a 2-process cell, preemption and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

from ltbench import data
from ltbench.errors import ConfigError
from ltbench.training import distributed


def test_the_ranks_local_batches_are_exactly_each_global_batch():
    perm = torch.randperm(103, generator=torch.Generator().manual_seed(0))
    world, batch = 4, 16
    local = {r: distributed.shard(perm, distributed.World(rank=r, size=world)) for r in range(world)}
    assert {len(v) for v in local.values()} == {103 // world}  # same number of steps on every rank
    used = perm[: 103 - 103 % world]
    for i in range(0, len(used), batch):
        together = torch.cat([local[r][i // world : (i + batch) // world] for r in range(world)])
        assert sorted(together.tolist()) == sorted(used[i : i + batch].tolist())
    assert distributed.shard(perm, distributed.World()) is perm  # one process: untouched


def test_global_batch_must_split_evenly():
    with pytest.raises(ConfigError, match="train.batch_size 64 .* not divisible by the 3 GPUs"):
        distributed.check_batch(64, distributed.World(rank=0, size=3))
    distributed.check_batch(64, distributed.World(rank=1, size=2))


def torchrun(*args, out, epochs, nproc=2):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "ltbench",
        "train",
        "--dataset",
        "digits-lt",
        "--ratio",
        "10",
        "--backbone",
        "resnet8",
        "--seed",
        "0",
        "--epochs",
        str(epochs),
        "--batch-size",
        "64",
        "--device",
        "cpu",
        "--out",
        str(out),
        *args,
    ]
    return cmd, {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    data.prepare("digits-lt", 10, d, d / "digits.npz")
    return d / "digits.npz"


def test_two_processes_train_one_cell_and_rank_0_writes_it(digits, tmp_path):
    cmd, env = torchrun("--method", "baseline+cbn+sbn+dpl", "--data", digits, out=tmp_path / "cell", epochs=8)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 1 of 2 on cpu, 32 of the global batch of 64" in p.stderr
    m = json.loads((tmp_path / "cell" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["top1"] > 20.0  # chance: 10 %
    rows = [json.loads(x) for x in (tmp_path / "cell" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    # every image of the epoch is counted once over both ranks (486 training images, cut to an even number)
    assert m["images_per_s"] * m["train_time_s"] == pytest.approx(8 * 486, rel=1e-6)
    assert sorted(f.name for f in (tmp_path / "cell").iterdir()) == ["metrics.json", "model.pt", "train.jsonl"]


def test_sigterm_to_torchrun_checkpoints_and_the_rerun_resumes(digits, tmp_path):
    out = tmp_path / "cell"
    cmd, env = torchrun("--method", "ce", "--data", digits, out=out, epochs=40)
    log = tmp_path / "log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        end = time.time() + 120
        while "epoch 3/40" not in log.read_text():
            assert proc.poll() is None and time.time() < end, log.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # what SLURM sends before the time limit; torchrun forwards it
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode != 0 and "preempted" in text and (out / "checkpoint.pt").exists(), text[-3000:]
    assert not (out / "metrics.json").exists()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["top1"] > 50.0 and len((out / "train.jsonl").read_text().splitlines()) == 40
    assert not (out / "checkpoint.pt").exists()


def test_ranks_agree_on_a_caught_signal_only_at_sync_steps(monkeypatch):
    """Under data parallelism a step without agreement costs no all_reduce; a single process reads
    its own flag every step."""
    from types import SimpleNamespace

    from ltbench.training import trainer

    calls = []
    monkeypatch.setattr(distributed, "any_rank", lambda flag, world, device: calls.append(flag) or flag)
    ddp = SimpleNamespace(signals=SimpleNamespace(caught=15), world=SimpleNamespace(active=True), device="cpu")
    assert trainer.Trainer._stop_requested(ddp, False) is False and calls == []
    assert trainer.Trainer._stop_requested(ddp, True) is True and calls == [True]
    single = SimpleNamespace(signals=SimpleNamespace(caught=15), world=SimpleNamespace(active=False), device="cpu")
    assert trainer.Trainer._stop_requested(single, False) is True and calls == [True]
    single.signals.caught = None
    assert trainer.Trainer._stop_requested(single, True) is False
