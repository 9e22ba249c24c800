"""Download an archive, verify its md5, and extract it safely.

Nothing half-made is ever left where the final dataset goes: the archive is streamed to a
temporary file, checked, extracted into a temporary directory, checked for the expected layout,
and only then renamed into place. Temporary files carry the host and process id in their name;
those of a process that died (kill -9, a node failure) are removed by the next run. What lands
in place has the user's umask (a shared data directory stays shared).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ltbench.errors import DownloadError  # noqa: F401  (raised here)


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


STALE_AFTER_S = 24 * 3600  # a temporary file of another host counts as abandoned after a day


def _tmp_prefix(name: str) -> str:
    return f".{name}.{socket.gethostname()}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(folder: Path, name: str) -> list[Path]:
    """Remove the temporary files and directories (``.<name>.<host>.<pid>.*``) that a process
    which no longer runs left in ``folder``; another host's only once they are a day old."""
    removed = []
    own = _tmp_prefix(name).rsplit(".", 2)[0] + "."  # .<name>.<host>.
    for p in Path(folder).glob(f".{name}.*"):
        pid = p.name[len(own) :].split(".")[0] if p.name.startswith(own) else ""
        try:
            dead = not _alive(int(pid)) if pid.isdigit() else time.time() - p.lstat().st_mtime > STALE_AFTER_S
        except OSError:
            continue
        if dead:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fetch(url: str, dest: Path, md5: str, timeout: float = 60.0, progress: bool | None = None) -> Path:
    """Download ``url`` to ``dest`` (atomically) and check its md5. Returns ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    progress = sys.stderr.isatty() if progress is None else progress
    remove_stale(dest.parent, dest.name)
    fd, tmp_name = tempfile.mkstemp(prefix=_tmp_prefix(dest.name), suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with open(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    total = int(resp.headers.get("Content-Length") or 0)
                    done = 0
                    while block := resp.read(1 << 20):
                        out.write(block)
                        done += len(block)
                        if progress and total:
                            print(f"\r{dest.name}: {done / 2**20:.0f}/{total / 2**20:.0f} MiB", end="", file=sys.stderr)
                    if progress:
                        print(file=sys.stderr)
                    if total and done != total:
                        raise DownloadError(
                            f"download of {url} ended after {done} of {total} bytes; run the command again to retry"
                        )
            except http.client.HTTPException as e:  # IncompleteRead: the connection closed mid-way
                raise DownloadError(
                    f"download of {url} was cut off ({type(e).__name__}: {e}); nothing was "
                    "kept. Run the command again to retry"
                ) from None
            except (urllib.error.URLError, OSError) as e:
                raise DownloadError(
                    f"could not download {url}: {e}. Check the network, or set the "
                    "dataset's 'url' in the config to a reachable mirror"
                ) from e
        got = md5sum(tmp)
        if got != md5:
            raise DownloadError(
                f"md5 mismatch for {url}: expected {md5}, got {got}. The file is corrupted "
                "or the mirror serves a different file; nothing was kept. Retry, or point "
                "the dataset's 'url' at a mirror of the original archive"
            )
        os.chmod(tmp, 0o666 & ~_umask())
        tmp.replace(dest)
        return dest
    finally:
        tmp.unlink(missing_ok=True)


def safe_extract(archive: Path, target: Path, expect: str | None = None) -> Path:
    """Extract a tar archive into ``target`` (which must not exist yet), atomically.

    Every member must stay inside the target directory and be a regular file or directory;
    otherwise nothing is extracted and :class:`DownloadError` names the offending member. With
    ``expect``, the archive must hold that folder at its top, or nothing is kept either.
    """
    target = Path(target)
    if target.exists():
        raise DownloadError(f"{target} already exists; remove it to extract again")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target.name), dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would make a shared data directory private
        _extract(archive, tmp)
        if expect is not None and not (tmp / expect).is_dir():
            found = ", ".join(sorted(p.name for p in tmp.iterdir())[:5]) or "nothing"
            raise DownloadError(
                f"{archive} does not contain {expect}/ (it has: {found}); nothing was extracted. "
                "Is it the right archive? Check the dataset's url and md5 in the config"
            )
        tmp.replace(target)
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _extract(archive: Path, tmp: Path) -> None:
    try:
        with tarfile.open(archive) as tar:
            root = tmp.resolve()
            members = tar.getmembers()
            for m in members:
                dest = (tmp / m.name).resolve()
                if not (m.isfile() or m.isdir()) or (dest != root and root not in dest.parents):
                    raise DownloadError(
                        f"refusing to extract {archive}: member {m.name!r} would be "
                        "written outside the target directory or is not a plain file"
                    )
            # the "data" filter where Python has it (3.11.4+, 3.12); the checks above refuse the rest
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tar.extractall(tmp, members=members)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DownloadError(f"{archive} is not a readable tar archive ({e}); delete it and download again") from e
