"""glibc malloc settings for ltbench's processes (CPU speed; no result depends on them).

glibc serves an allocation above its mmap threshold (dynamic, at most 32 MiB by default) with fresh
pages from the kernel and hands them back on free, so every large tensor of a CPU run (one activation
of an evaluation batch of 1,000 CIFAR images in the first stage of a ResNet is 1000 × 16 × 32 × 32
floats, 65 MB; CBN's per-pixel buffers are 2–3 × that) is page-faulted and zeroed by the kernel again
each time it is allocated. Measured (2 cores, torch 2.14.1, ``baseline+cbn`` ResNet-32 evaluation,
batches of 1,000): 314 images/s with 7.3 s of system time per 2,000 images by default, 950 images/s
and no system time with :data:`TUNABLES`, which keep freed memory in the process (mmap threshold 2 GiB,
trim threshold 4 GiB). The cost: the process's resident memory stays at its peak.

``python -m ltbench`` re-executes itself once, before importing anything heavy, with ``GLIBC_TUNABLES``
extended by :data:`TUNABLES` (:func:`reexec`): the tunables are read only when a process starts. It
does nothing off Linux/glibc, when ``GLIBC_TUNABLES`` already sets a ``glibc.malloc`` tunable (then
the user's settings stand), or with ``LTBENCH_SYSTEM_MALLOC=1``.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLES = "glibc.malloc.mmap_threshold=2147483648:glibc.malloc.trim_threshold=4294967296"
OPT_OUT = "LTBENCH_SYSTEM_MALLOC"


def tuned_environ(environ: Mapping[str, str], libc: str | None = None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to do (module docstring).
    ``libc``: the C library's name (default: :func:`platform.libc_ver`)."""
    libc = platform.libc_ver()[0] if libc is None else libc
    current = environ.get("GLIBC_TUNABLES", "")
    if libc != "glibc" or environ.get(OPT_OUT, "") not in ("", "0") or "glibc.malloc." in current:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{current}:{TUNABLES}" if current else TUNABLES}


def reexec() -> None:
    """Replace this process (same PID, arguments and interpreter flags: ``sys.orig_argv``) by one with
    the tuned environment, or return when :func:`tuned_environ` says there is nothing to do."""
    env = tuned_environ(os.environ)
    if env is None or not sys.executable:
        return
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError as e:  # an interpreter that cannot be re-executed: run on with glibc's defaults
        print(f"ltbench: could not apply the malloc settings ({e}); continuing without them", file=sys.stderr)
