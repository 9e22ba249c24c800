"""Atomic file writes and provenance (which code, environment and machine produced a result)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ltbench


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was, so a
    crash never leaves a half-written result behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def config_hash(obj: Any) -> str:
    """Short stable hash of a JSON-able object (a config or a cell spec)."""
    blob = json.dumps(obj, sort_keys=True, default=_jsonable).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# What can change a result: a local change under these paths makes a run's code "dirty". Generated
# files that a project commits (reports, docs) do not: regenerating a committed report between two
# cells must not mark the second cell's code as changed.
CODE_PATHS = ("ltbench", "workflow", "Snakefile", "config", "pyproject.toml")
# After a failed workflow run, the report of the finished cells (workflow/rules/common.smk,
# partial_report) is built under <results_dir>/PARTIAL_DIR: its aggregate in PARTIAL_DIR/aggregate.
PARTIAL_DIR = "partial"


def code_version() -> dict:
    """Package version plus the git commit and whether the code had local changes (``git_dirty``: a
    tracked file under :data:`CODE_PATHS` differs from the commit), if in a git checkout."""
    root = Path(ltbench.__file__).resolve().parent.parent
    info: dict[str, str | bool | None] = {"ltbench": ltbench.__version__, "git_commit": None, "git_dirty": None}
    try:

        def run(*a: str) -> str:
            return subprocess.run(
                ["git", *a], cwd=root, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()

        info["git_commit"] = run("rev-parse", "HEAD")
        info["git_dirty"] = bool(run("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def environment() -> dict:
    # lazy: only a run's record needs them, and torch takes seconds to import
    import numpy
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }  # malloc settings (ltbench/malloc.py)
    try:
        import torchvision  # lazy: recorded when installed

        env["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name()
    return env
