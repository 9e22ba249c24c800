"""A cell's output directory: checked writable before any training, and locked by one trainer.

Lock: the trainer of a cell holds an exclusive ``fcntl.flock`` on ``<out_dir>/.ltbench-train.lock``
from start-up until its outputs are written (or it is preempted or fails). A second trainer of the
same directory (a resubmitted job while the first still runs) does not wait: it exits at once with
:class:`~ltbench.errors.CellBusy` naming the holder's pid, host and start time, and leaves the
directory alone; its scheduler may retry it later. Waiting would make the second job train the cell
again after the first has finished it. The kernel releases the lock when its process dies (even by
SIGKILL), so a stale lock file never blocks a rerun. ``flock`` is local to a host on some network
file systems (NFS before Linux 2.6.12, some FUSE file systems); there the lock guards only against
trainers on the same host.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ltbench.errors import CellBusy, ConfigError

LOCK_NAME = ".ltbench-train.lock"


def check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` if needed and write (then delete) a file in it; :class:`ConfigError` naming
    the directory if that fails, so a read-only output directory is found before training."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ltbench-write-test.", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(
            f"the output directory {out_dir} is not writable ({e.strerror or e}); "
            "choose another --out / results_dir or fix its permissions"
        ) from None


def _acquire(path: Path) -> IO[str] | None:
    """The open, locked lock file; :class:`CellBusy` if another process holds it."""
    while True:
        fh = open(path, "a+")  # noqa: SIM115 -- the lock is held by the open file past this function
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "a process that has not written its name yet"
            fh.close()
            raise CellBusy(
                f"{path.parent} is being trained by another process ({holder}); not starting a "
                f"second trainer of the same cell. Wait for it to finish, or stop it and run again "
                f"(it resumes from its checkpoint)."
            ) from None
        except OSError as e:  # a file system without flock
            fh.close()
            print(f"warning: cannot lock {path} ({e.strerror or e}); training without a cell lock", file=sys.stderr)
            return None
        try:  # the previous holder removes the file when it finishes: lock the file that is there now
            if os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino:
                return fh
        except FileNotFoundError:
            pass
        fh.close()


@contextmanager
def claim(out_dir: Path, lock: bool = True) -> Iterator[None]:
    """Check ``out_dir`` is writable and (with ``lock``) hold the cell lock while the block runs."""
    check_writable(out_dir)
    if not lock:
        yield
        return
    path = out_dir / LOCK_NAME
    fh = _acquire(path)
    if fh is not None:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        fh.flush()
    try:
        yield
    finally:
        if fh is not None:
            path.unlink(missing_ok=True)  # while still locked: a waiting opener sees another inode and retries
            fh.close()
