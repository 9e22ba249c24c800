"""Download an archive, verify its md5, and extract it safely.

Nothing half-made is ever left where the final dataset goes: the archive is streamed to a
temporary file, checked, extracted into a temporary directory, and only then renamed into place.
"""
from __future__ import annotations

import hashlib
import shutil
import sys
import tarfile
import tempfile
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


def fetch(url: str, dest: Path, md5: str, timeout: float = 60.0, progress: bool | None = None) -> Path:
    """Download ``url`` to ``dest`` (atomically) and check its md5. Returns ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    progress = sys.stderr.isatty() if progress is None else progress
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
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
                            print(f"\r{dest.name}: {done / 2**20:.0f}/{total / 2**20:.0f} MiB", end="",
                                  file=sys.stderr)
                    if progress:
                        print(file=sys.stderr)
                    if total and done != total:
                        raise DownloadError(f"download of {url} ended after {done} of {total} bytes; "
                                            "run the command again to retry")
            except (urllib.error.URLError, OSError) as e:
                raise DownloadError(f"could not download {url}: {e}. Check the network, or set the "
                                    "dataset's 'url' in the config to a reachable mirror") from e
        got = md5sum(tmp)
        if got != md5:
            raise DownloadError(f"md5 mismatch for {url}: expected {md5}, got {got}. The file is corrupted "
                                "or the mirror serves a different file; nothing was kept. Retry, or point "
                                "the dataset's 'url' at a mirror of the original archive")
        tmp.replace(dest)
        return dest
    finally:
        tmp.unlink(missing_ok=True)


def safe_extract(archive: Path, target: Path) -> Path:
    """Extract a tar archive into ``target`` (which must not exist yet), atomically.

    Every member must stay inside the target directory and be a regular file or directory;
    otherwise nothing is extracted and :class:`DownloadError` names the offending member.
    """
    target = Path(target)
    if target.exists():
        raise DownloadError(f"{target} already exists; remove it to extract again")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            with tarfile.open(archive) as tar:
                root = tmp.resolve()
                members = tar.getmembers()
                for m in members:
                    dest = (tmp / m.name).resolve()
                    if not (m.isfile() or m.isdir()) or (dest != root and root not in dest.parents):
                        raise DownloadError(f"refusing to extract {archive}: member {m.name!r} would be "
                                            "written outside the target directory or is not a plain file")
                tar.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DownloadError(f"{archive} is not a readable tar archive ({e}); delete it and download again") from e
        tmp.replace(target)
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
