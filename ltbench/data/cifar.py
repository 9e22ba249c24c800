"""CIFAR-10 / CIFAR-100 in the original "python" format, as torchvision downloads them.

Training order is torchvision's (data_batch_1..5, or the single ``train`` file), which the
long-tail subset construction depends on.
"""

from __future__ import annotations

import pickle
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ltbench.data import Arrays

try:  # NumPy >= 2 moved the reconstruct functions to numpy._core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]  # the same module, older home
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]  # the same module, older home

from ltbench.data import DatasetSpec, register
from ltbench.data.download import DownloadError, fetch, md5sum, safe_extract

BASE_URL = "https://www.cs.toronto.edu/~kriz/"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)

# name -> (archive, md5, extracted folder, train files, test file, label key)
FILES = {
    "cifar10": (
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "labels",
    ),
    "cifar100": (
        "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
        ["train"],
        "test",
        "fine_labels",
    ),
}


def folder(name: str, data_dir: Path) -> Path:
    return Path(data_dir) / name


def download(name: str, data_dir: Path, options: dict) -> Path:
    """Fetch, verify and extract into ``<data_dir>/<name>/``; a no-op if it is already there."""
    archive, md5, inner, *_ = FILES[name]
    target = folder(name, data_dir)
    if (target / inner).is_dir():
        return target
    url = options.get("url") or BASE_URL + archive
    md5 = options.get("md5") or md5
    tar = Path(data_dir) / archive
    if not (tar.exists() and _md5_ok(tar, md5)):
        fetch(url, tar, md5)
    safe_extract(tar, target, expect=inner)  # nothing lands in place unless inner/ is there
    return target


def _md5_ok(path: Path, md5: str) -> bool:
    return md5sum(path) == md5


# The only globals a CIFAR batch may name: NumPy's array reconstruction (the Python 2 module
# name of the original files and NumPy 2's), ndarray and dtype. Anything else is refused.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,  # type: ignore[attr-defined]  # private: no stub
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,  # type: ignore[attr-defined]  # private: no stub
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, bytes, numbers and NumPy arrays, and nothing callable else:
    a pickle naming any other global (os.system, builtins.eval, ...) is refused before it runs."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which a CIFAR batch never contains") from None


def read_batch(path: Path) -> dict:
    """One CIFAR batch file (a Python 2 protocol-2 pickle) as a dict with ``str`` keys."""
    try:
        with open(path, "rb") as f:
            d = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DownloadError(
            f"refusing to read {path}: {e}; it is not a CIFAR python batch. Delete "
            f"{path.parent} (and the archive next to it) and download the original again"
        ) from None
    if not isinstance(d, dict):
        raise DownloadError(f"{path} holds a {type(d).__name__}, not a CIFAR batch dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _read(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `python -m ltbench download` for this dataset")
    d = read_batch(path)
    if "data" not in d or label_key not in d:
        raise DownloadError(f"{path} has no 'data' or {label_key!r} entry; it is not a CIFAR python batch")
    x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return x, np.asarray(d[label_key], dtype=np.int64)


def load(name: str, data_dir: Path, options: dict) -> Arrays:
    _, _, inner, train_files, test_file, key = FILES[name]
    root = folder(name, data_dir) / inner
    parts = [_read(root / f, key) for f in train_files]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _read(root / test_file, key)
    return train_x, train_y, test_x, test_y


for _name, _classes, _nmax in (("cifar10", 10, 5000), ("cifar100", 100, 500)):
    register(
        DatasetSpec(
            name=_name,
            num_classes=_classes,
            n_max=_nmax,
            image_size=32,
            channels=3,
            mean=MEAN,
            std=STD,
            padding=4,
            load=partial(load, _name),
            fetch=partial(download, _name),
            url=BASE_URL + FILES[_name][0],
            md5=FILES[_name][1],
            needs_download=True,
        )
    )
