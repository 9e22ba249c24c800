"""A cell's resumable checkpoint: the payload on disk with its checksum, and the random states.

``checkpoint.pt`` is written atomically (:func:`ltbench.io.atomic_path`). On disk it is a
``torch.save`` of ``{"format", "sha256", "payload"}``: the payload (the trainer's dict of tensors and
plain containers) serialized by ``torch.save`` into a uint8 tensor, and the SHA-256 of those bytes.
:func:`read` loads both levels with ``torch.load(weights_only=True)`` (nothing in the file is
executed), verifies the checksum and that every key in :data:`REQUIRED` is there; :func:`load` moves a
file that fails to ``checkpoint.pt.unreadable`` with a warning, and the cell starts afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _io
import random
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ltbench import io

FORMAT = "ltbench-checkpoint/2"

#: The trainer's progress through the cell, saved in (and restored from) a checkpoint.
COUNTERS = (
    "epoch",
    "step",
    "perm",
    "log",
    "images_seen",
    "train_time",
    "loss_sum",
    "correct",
    "first_bad",
    "grad_sum",
    "grad_max",
    "nonfinite",
)

#: The keys every checkpoint payload has (the trainer's :meth:`~ltbench.training.trainer.Trainer.payload`).
REQUIRED = frozenset(
    {
        "spec_hash",
        "seed",
        "model",
        "opt",
        "sched",
        "head",
        "head_opt",
        "head_sched",
        "criterion",
        "gen",
        "torch_rng",
        "cuda_rng",
        "numpy_rng",
        "python_rng",
        *COUNTERS,
        "best_row",
        "best_per_class",
    }
)

# Outputs written through io.atomic_path; a SIGKILL during a write leaves ".<name>.<random>.tmp".
OWN_FILES = ("checkpoint.pt", "model.pt", "train.jsonl", "metrics.json", "diverged.json")


class CheckpointError(ValueError):
    """A checkpoint file is damaged, incomplete or of another format."""


def save(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` with its checksum to ``path``, atomically."""
    buf = _io.BytesIO()
    torch.save(dict(payload), buf)
    blob = buf.getvalue()
    wrapped = {
        "format": FORMAT,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "payload": torch.frombuffer(bytearray(blob), dtype=torch.uint8),
    }
    with io.atomic_path(path) as tmp:
        torch.save(wrapped, tmp)


def read(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """The verified payload of the checkpoint at ``path``; :class:`CheckpointError` if it is not one."""
    try:
        wrapped = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unpickling failure means a damaged file)
        raise CheckpointError(f"cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(wrapped, dict) or wrapped.get("format") != FORMAT:
        raise CheckpointError(f"is not a checksummed ltbench checkpoint (format {FORMAT})")
    blob = wrapped["payload"].numpy().tobytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != wrapped.get("sha256"):
        raise CheckpointError(f"fails its checksum (stored sha256 {wrapped.get('sha256')}, computed {digest})")
    payload = torch.load(_io.BytesIO(blob), map_location=map_location, weights_only=True)
    if missing := sorted(REQUIRED - set(payload)):
        raise CheckpointError(f"lacks the keys {', '.join(missing)}")
    return payload


def load(path: Path, device: torch.device, label: str) -> dict | None:
    """The verified payload at ``path`` (tensors on ``device``), or None when there is none or it
    fails :func:`read` (then the file is moved to ``<name>.unreadable``, with a warning)."""
    if not path.exists():
        return None
    try:
        return read(path, device)
    except CheckpointError as e:  # writes are atomic: a file-system crash, a disk error or another version
        bad = path.with_name(path.name + ".unreadable")
        with contextlib.suppress(FileNotFoundError):  # another rank of a multi-GPU run moved it first
            path.replace(bad)
        print(f"{label}: warning: {path} {e}; moved to {bad.name}, starting the cell afresh", file=sys.stderr)
        return None


def remove_stale_temp_files(out_dir: Path) -> None:
    """Delete the temporary files of writes that a killed run of this cell left behind."""
    if not out_dir.is_dir():
        return
    for p in out_dir.iterdir():
        if p.name.endswith(".tmp") and any(p.name.startswith(f".{name}.") for name in OWN_FILES):
            p.unlink(missing_ok=True)


def rng_state(gen: torch.Generator, device: torch.device) -> dict:
    """Every random state a run draws from: its generator, torch's (CPU and CUDA), NumPy's and Python's."""
    _, key, pos, has_gauss, gauss = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    return {
        "gen": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        "numpy_rng": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python_rng": random.getstate(),
    }


def set_rng_state(ck: Mapping[str, Any], gen: torch.Generator) -> None:
    """Restore what :func:`rng_state` captured."""
    gen.set_state(ck["gen"].cpu())  # Generator.set_state takes a CPU ByteTensor, for a CUDA generator too
    torch.set_rng_state(ck["torch_rng"].cpu())
    if ck["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all([s.cpu() for s in ck["cuda_rng"]])
    s = ck["numpy_rng"]
    np.random.set_state(("MT19937", s["key"].cpu().numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))
    random.setstate(ck["python_rng"])
