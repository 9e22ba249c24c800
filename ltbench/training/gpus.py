"""Which GPU a training job uses on a machine with several (``profiles/local-gpu``).

Snakemake's local executor counts GPUs (``--resources gpu=N``) but does not say which one a job
gets, and every process sees all of them, so without help every cell would train on ``cuda:0``.
:func:`claim` gives each training process a GPU of its own: it takes an exclusive ``flock`` on one
lock file per (GPU, slot) and holds it for the life of the process (the kernel drops it when the
process ends, however it ends). Slots are tried round by round — slot 0 of every GPU, then slot 1,
… — so jobs spread over the GPUs first and share one only when there are more jobs than GPUs
(several small cells per GPU: ``gpu=`` a multiple of the GPU count).

Not used where a scheduler already assigns GPUs (one visible device, e.g. SLURM's ``--gpus``) or
under ``torchrun`` (ranks take the GPU of their local rank).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

_held: list = []  # open lock files of this process (closing one would release its lock)


def default_lock_dir() -> Path:
    return Path(os.environ.get("LTBENCH_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / f"ltbench-gpus-{os.getuid()}")


def claim(num_gpus: int, lock_dir: str | Path | None = None, max_slots: int = 64) -> int:
    """Index of the GPU this process takes (held until the process exits)."""
    if num_gpus < 1:
        raise ValueError(f"no GPU to claim (num_gpus={num_gpus})")
    d = Path(lock_dir) if lock_dir else default_lock_dir()
    d.mkdir(parents=True, exist_ok=True)
    for slot in range(max_slots):
        for gpu in range(num_gpus):
            fh = open(d / f"gpu{gpu}.slot{slot}.lock", "w")  # noqa: SIM115 -- held open: the claim lasts the process
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            _held.append(fh)
            return gpu
    raise RuntimeError(f"more than {max_slots} training processes per GPU hold locks in {d}")
