"""Fault tolerance of `python -m ltbench train`, mostly in real subprocesses.

Killed outright (SIGKILL, no chance to save) at random points, a cell resumes from its last
periodic checkpoint every time; stopped by SIGTERM / SIGUSR1 (what SLURM sends before a time
limit or a preemption) it checkpoints where it is and exits 75. Either way the final metrics are
bit-identical to an uninterrupted run on CPU, and metrics.json never exists until the cell has
finished. A diverging cell stops with a diagnostic, writes no metrics.json and is never retrained
by a retry. A damaged checkpoint (checksum) or one without every key is moved aside and the cell
restarts; a second trainer of a locked cell exits naming the holder; an unwritable output directory
is an error before any training.
"""

import contextlib
import errno
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT

from ltbench.errors import CellBusy, ConfigError
from ltbench.training import celldir, checkpoint

METHOD = "baseline+cbn+sbn+dpl"  # CBN buffers + EM init, split path, two AutoAugment views: the most state
EPOCHS = 10
CHECKPOINT_EVERY = 2  # a SIGKILL loses up to 2 epochs, which the resumed run must redo identically
VOLATILE = {"wall_time_s", "train_time_s", "images_per_s", "finished_at", "environment", "code"}


def cell_cmd(data, out, epochs=EPOCHS, lr=0.1, method=METHOD):
    spec = {
        "train": {
            "epochs": epochs,
            "batch_size": 64,
            "lr": lr,
            "warmup_epochs": 1,
            "weight_decay": 5e-4,
            "device": "cpu",
            "checkpoint_every": CHECKPOINT_EVERY,
            "threads": 1,
        },
        "experiments": {
            "e": {"datasets": ["digits-lt"], "ratios": [10], "methods": [method], "backbones": ["resnet8"]}
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    return [
        sys.executable,
        "-m",
        "ltbench",
        "train",
        "--config",
        str(cfg),
        "--dataset",
        "digits-lt",
        "--ratio",
        "10",
        "--method",
        method,
        "--backbone",
        "resnet8",
        "--seed",
        "0",
        "--data",
        str(data),
        "--out",
        str(out),
    ]


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


class Run:
    """A training subprocess whose stderr lines are collected as they come."""

    def __init__(self, cmd):
        self.p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.p.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout=60.0) -> re.Match:
        end = time.time() + timeout
        while time.time() < end:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m
            if self.p.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.01)
        raise AssertionError(f"no line matching {pattern!r} (rc {self.p.poll()}):\n" + "\n".join(self.lines))

    def finish(self, timeout=120):
        self.p.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return self.p.returncode

    def stderr(self):
        return "\n".join(self.lines)


def comparable(out: Path) -> tuple[dict, list]:
    m = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("epoch_time_s")
    return {k: v for k, v in m.items() if k not in VOLATILE}, rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of the cell (and the prepared data it trains on)."""
    d = tmp_path_factory.mktemp("resume")
    from ltbench import data

    data.prepare("digits-lt", 10, d, d / "digits.npz")
    out = d / "reference"
    run = Run(cell_cmd(d / "digits.npz", out))
    assert run.finish() == 0, run.stderr()
    return d / "digits.npz", comparable(out)


def check_checkpoint(out: Path):
    """What is on disk after an interruption: a loadable checkpoint (weights_only), no metrics."""
    assert not (out / "metrics.json").exists(), "metrics.json of an unfinished cell"
    ck = out / "checkpoint.pt"
    if ck.exists():
        state = checkpoint.read(ck)  # verified: checksum and every key
        assert {"model", "opt", "sched", "perm", "gen", "torch_rng", "numpy_rng", "python_rng"} <= set(state)
        assert any(k.endswith("running_prior") for k in state["model"])  # CBN buffers are in the model state
        assert any(k.endswith("running_mean") for k in state["model"])
        return state["epoch"], state["step"]
    return None


def watch_metrics(out: Path, stop: threading.Event, seen: list):
    """Records every observation of metrics.json; each must be the complete file."""
    path = out / "metrics.json"
    while not stop.is_set():
        if path.exists():
            with contextlib.suppress(FileNotFoundError):  # replaced between exists() and read: look again
                seen.append(json.loads(path.read_text())["top1"])
        time.sleep(0.005)


def test_sigkill_at_random_points_and_preemption_signals_resume_every_time_and_match(reference, tmp_path):
    """SIGKILL inside epochs and at start-up, SIGTERM and SIGUSR1 inside epochs, in one cell."""
    data, expected = reference
    seed = int(os.environ.get("LTBENCH_KILL_SEED", random.SystemRandom().randrange(10**6)))
    rng = random.Random(seed)
    out = tmp_path / "cell"
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=watch_metrics, args=(out, stop, seen), daemon=True)
    watcher.start()
    last = None  # (epoch, step) of the checkpoint on disk
    for sig, where in (
        (signal.SIGKILL, "epoch"),
        (signal.SIGTERM, "epoch"),
        (signal.SIGKILL, "startup"),
        (signal.SIGUSR1, "epoch"),
        (signal.SIGKILL, "epoch"),
    ):
        why = f"{signal.Signals(sig).name} at {where}, after checkpoint {last} (LTBENCH_KILL_SEED={seed})"
        run = Run(cell_cmd(data, out))
        if where == "startup":  # importing, loading the data or the checkpoint, or the first steps
            time.sleep(rng.uniform(0.5, 3.0))
        else:  # anywhere inside one of the next two epochs, checkpoint writes included
            if last:
                m = run.wait_for(r"resumed from .* at epoch (\d+) step (\d+)")
                assert (int(m.group(1)), int(m.group(2))) == last, (why, run.stderr())
            # the next progress line is "epoch e+1/…" for a checkpoint (e, s) (e epochs done); a signal
            # that landed late in an epoch leaves e = EPOCHS - 2, so the target may be the last but one
            target = min((last[0] if last else 0) + rng.randint(1, 2), EPOCHS - 1)
            run.wait_for(rf"epoch {target}/{EPOCHS} ")
            time.sleep(rng.uniform(0.0, 0.35) if target < EPOCHS - 1 else 0.0)  # leave the last epoch running
        assert run.p.poll() is None, f"finished before the signal: {why}"
        run.p.send_signal(sig)
        rc = run.finish()
        on_disk = check_checkpoint(out)
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL, why
            # the checkpoint it resumed from, or a newer periodic one
            assert on_disk == last or (
                on_disk[1] == 0 and on_disk[0] % CHECKPOINT_EVERY == 0 and on_disk > (last or (0, 0))
            ), (why, on_disk)
        else:  # checkpointed where it was, exit 75 (EX_TEMPFAIL: retry to resume)
            assert rc == 75, (why, run.stderr())
            assert f"signal {int(sig)}" in run.stderr() and "run the same command again to resume" in run.stderr()
            assert on_disk[1] > 0 and on_disk > (last or (0, 0)), (why, on_disk)
        last = on_disk
    run = Run(cell_cmd(data, out))
    assert run.finish() == 0, run.stderr()
    assert last and f"at epoch {last[0]} step {last[1]}" in run.stderr(), (seed, run.stderr())
    stop.set()
    watcher.join()
    got = comparable(out)
    assert got[0]["per_class_acc"] == expected[0]["per_class_acc"], f"LTBENCH_KILL_SEED={seed}"
    assert got == expected, f"LTBENCH_KILL_SEED={seed}"
    assert set(seen) <= {got[0]["top1"]}  # metrics.json, whenever it was there, was the final one
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.pt", "train.jsonl"]


def _spec(method="ce", **train):
    from ltbench.spec import config

    c = config.validate(
        {
            "train": {"epochs": 2, "batch_size": 64, "warmup_epochs": 1, "device": "cpu", **train},
            "experiments": {
                "e": {"datasets": ["digits-lt"], "ratios": [10], "methods": [method], "backbones": ["resnet8"]}
            },
        }
    )
    return config.cell_spec(c, "digits-lt", method, "resnet8")


def test_unreadable_checkpoint_and_stale_temp_files(reference, tmp_path):
    from ltbench.training import trainer as train

    data, _ = reference
    ref = train.run(_spec(), 10, 0, data, tmp_path / "ref")
    out = tmp_path / "cell"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"\x80\x02truncated")  # what a file-system crash could leave
    (out / ".metrics.json.x1y2.tmp").write_text('{"top1"')  # a write cut short by SIGKILL
    (out / ".checkpoint.pt.a7b8.tmp").write_bytes(b"")
    (out / "notes.txt").write_text("not ours")
    got = train.run(_spec(), 10, 0, data, out)
    assert got["per_class_acc"] == ref["per_class_acc"]
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt.unreadable",
        "metrics.json",
        "model.pt",
        "notes.txt",
        "train.jsonl",
    ]


def test_divergence_stops_with_a_diagnostic_and_a_retry_does_not_retrain(reference, tmp_path):
    from ltbench.training import trainer as train

    data, _ = reference
    out = tmp_path / "cell"
    run = Run(cell_cmd(data, out, epochs=3, lr=1e6, method="ce"))
    assert run.finish() == 1
    err = run.stderr()
    assert "ltbench train: error:" in err and "training loss became nan" in err and "not aggregated" in err, err
    assert not (out / "metrics.json").exists() and not (out / "checkpoint.pt").exists()
    diag = json.loads((out / "diverged.json").read_text())
    assert diag["epoch"] >= 1 and 1 <= diag["first_nonfinite_step"] <= diag["steps_per_epoch"]
    assert diag["lr_at_first_nonfinite_step"] > 0 and diag["spec"]["train"]["lr"] == 1e6
    assert f"first non-finite loss at step {diag['first_nonfinite_step']} of" in diag["message"]
    # a retry (what a cluster profile's `retries` does) fails at once with the same diagnostic
    retry = Run(cell_cmd(data, out, epochs=3, lr=1e6, method="ce"))
    assert retry.finish() == 1
    assert diag["message"] in retry.stderr() and "delete it to train the cell again" in retry.stderr()
    assert "epoch 1/3" not in retry.stderr()
    # another spec (a lower lr) trains, and its success clears the old diagnostic
    train.run(_spec(), 10, 0, data, out)
    assert (out / "metrics.json").exists() and not (out / "diverged.json").exists()


# ---- damaged checkpoints, the cell lock, unwritable outputs ----


def test_checkpoint_checksum_and_required_keys(tmp_path):
    path = tmp_path / "checkpoint.pt"
    payload = {k: torch.arange(3.0) for k in checkpoint.REQUIRED}
    checkpoint.save(path, payload)
    assert torch.equal(checkpoint.read(path)["model"], torch.arange(3.0))
    wrapped = torch.load(path, weights_only=True)
    wrapped["payload"][len(wrapped["payload"]) // 2] ^= 0x10  # one flipped bit in the payload
    torch.save(wrapped, path)
    with pytest.raises(checkpoint.CheckpointError, match="fails its checksum"):
        checkpoint.read(path)
    checkpoint.save(path, {k: v for k, v in payload.items() if k != "gen"})
    with pytest.raises(checkpoint.CheckpointError, match="lacks the keys gen"):
        checkpoint.read(path)
    torch.save(payload, path)  # a plain torch.save: no checksum to verify
    with pytest.raises(checkpoint.CheckpointError, match="not a checksummed"):
        checkpoint.read(path)


def _checkpoint_after_one_epoch(data, out):
    """A real checkpoint.pt of _spec(checkpoint_every=1), written at the end of epoch 1."""
    from ltbench.training import trainer as train

    t = train.Trainer(_spec(checkpoint_every=1), 10, 0, data, out)
    t.signals = train._Signals()
    t.run_epoch()
    assert t.epoch == 1 and (out / "checkpoint.pt").exists()
    return out / "checkpoint.pt"


@pytest.mark.parametrize("damage", ["flipped_byte", "missing_key"])
def test_damaged_checkpoint_is_moved_aside_and_the_cell_restarts(reference, tmp_path, capfd, damage):
    from ltbench.training import trainer as train

    data, _ = reference
    ref = train.run(_spec(checkpoint_every=1), 10, 0, data, tmp_path / "ref")
    out = tmp_path / "cell"
    ck = _checkpoint_after_one_epoch(data, out)
    if damage == "flipped_byte":
        blob = bytearray(ck.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        ck.write_bytes(bytes(blob))
    else:
        payload = checkpoint.read(ck)
        del payload["gen"]
        checkpoint.save(ck, payload)
    capfd.readouterr()
    got = train.run(_spec(checkpoint_every=1), 10, 0, data, out)
    err = capfd.readouterr().err
    assert "moved to checkpoint.pt.unreadable, starting the cell afresh" in err and "resumed" not in err, err
    assert ("lacks the keys gen" in err) if damage == "missing_key" else ("checksum" in err or "cannot be read" in err)
    assert (out / "checkpoint.pt.unreadable").exists() and got["per_class_acc"] == ref["per_class_acc"]


def test_a_second_trainer_of_a_locked_cell_exits_naming_the_holder(reference, tmp_path):
    data, _ = reference
    out = tmp_path / "cell"
    with celldir.claim(out):  # this test process is the running trainer
        run = Run(cell_cmd(data, out))
        assert run.finish() == 1
        err = run.stderr()
        assert f"being trained by another process (pid {os.getpid()} on {socket.gethostname()}" in err, err
        assert "ltbench train: error:" in err and "epoch 1/" not in err
        from ltbench.training import trainer as train

        with pytest.raises(CellBusy, match=f"pid {os.getpid()}"):
            train.run(_spec(), 10, 0, data, out)
    assert sorted(p.name for p in out.iterdir()) == []  # the lock file goes with its holder
    with celldir.claim(out):  # and the cell can be claimed again
        assert (out / celldir.LOCK_NAME).exists()


def test_unwritable_output_directory_fails_before_training(reference, tmp_path, monkeypatch):
    data, _ = reference
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cmd = cell_cmd(data, tmp_path / "cell")
    cmd[cmd.index("--out") + 1] = str(blocker / "cell")
    run = Run(cmd)
    assert run.finish() == 2
    err = run.stderr()
    assert f"the output directory {blocker / 'cell'} is not writable" in err and "epoch 1/" not in err, err
    # a read-only file system (simulated: as root, permissions do not stop a write)
    from ltbench.training import trainer as train

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(celldir.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(train, "Trainer", None)  # never reached
    with pytest.raises(ConfigError, match=f"{tmp_path / 'ro'} is not writable .Read-only file system"):
        train.run(_spec(), 10, 0, data, tmp_path / "ro")
