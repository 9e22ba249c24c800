"""fashion-mnist: Fashion-MNIST (Xiao, Rasul & Vollgraf 2017), long-tailed like CIFAR-LT.

60,000 training and 10,000 test grayscale 28×28 images of 10 clothing classes (6,000 / 1,000 per
class) in the IDX format of MNIST. The long-tailed training subset is drawn exactly like CIFAR-LT
(:func:`ltbench.data.longtail.longtail_indices`, exponential profile from ``n_max`` = 6,000); the
test set is the balanced 10,000 images, as CIFAR-LT keeps CIFAR's balanced test set.

Where the four files are found (the first folder holding all four, each ``<name>.gz`` or
``<name>``): ``datasets.fashion-mnist.root`` if set, else Debian's package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``), else ``<data_dir>/fashion-mnist``. ``python -m ltbench
download --dataset fashion-mnist`` (the workflow's download rule) downloads them there from the
canonical upstream URLs if no folder has them, checking upstream's ``.gz`` md5s. Every load checks
the *decompressed* content (size and md5): Debian re-compressed the files, so their ``.gz`` md5s
differ from upstream's while the IDX content is identical.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ltbench.data import Arrays, DatasetSpec, register
from ltbench.data.download import fetch
from ltbench.errors import ConfigError, DownloadError

NAME = "fashion-mnist"
APT_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"  # the project README's links


class IdxFile(NamedTuple):
    name: str  # file name without .gz
    md5: str  # of the decompressed IDX content
    size: int  # bytes of the decompressed IDX content
    gz_md5: str  # of upstream's .gz (the download path)


FILES = {
    "train_x": IdxFile(
        "train-images-idx3-ubyte", "f4a8712d7a061bf5bd6d2ca38dc4d50a", 47_040_016, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    ),
    "train_y": IdxFile(
        "train-labels-idx1-ubyte", "9018921c3c673c538a1fc5bad174d6f9", 60_008, "25c81989df183df01b3e8a0aad5dffbe"
    ),
    "test_x": IdxFile(
        "t10k-images-idx3-ubyte", "8181f5470baa50b63fa0f6fddb340f0a", 7_840_016, "bef4ecab320f06d8554ea6380940ec79"
    ),
    "test_y": IdxFile(
        "t10k-labels-idx1-ubyte", "15d484375f8d13e6eb1aabb0c3f46965", 10_008, "bb300cfdad3c16e7a12a480ee83cd310"
    ),
}

# IDX type byte -> element type (big-endian), as in the MNIST file format description
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(raw: bytes, source: str = "IDX data") -> np.ndarray:
    """An IDX file's content: magic ``00 00 <type> <ndim>``, ndim big-endian uint32 sizes, the data."""
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{source}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'})")
    ndim, start = raw[3], 4 + 4 * raw[3]
    if len(raw) < start:
        raise ValueError(f"{source}: IDX header of {ndim} dimensions is cut short ({len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{source}: IDX shape {shape} of {dtype} needs {expected} bytes, the file has {len(raw)}")
    return np.frombuffer(raw, dtype, offset=start).reshape(shape).astype(dtype.newbyteorder("="))


def read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped if it is gzip-compressed (told by its magic bytes, not its name)."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    with (gzip.open if gz else open)(path, "rb") as f:
        return f.read()


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, plain or gzip-compressed."""
    return parse_idx(read_bytes(Path(path)), str(path))


def candidates(data_dir: Path, options: dict) -> list[Path]:
    """The folders searched, in order; the last one is where ``download`` puts the files."""
    if options.get("root"):
        return [Path(options["root"])]
    return [DEBIAN_DIR, Path(data_dir) / NAME]


def _download_hint(data_dir: Path, options: dict) -> str:
    return (
        f"run `python -m ltbench download --dataset {NAME}` to download them from {BASE_URL} into "
        f"{candidates(data_dir, options)[-1]}"
    )


def how_to_get(data_dir: Path, options: dict) -> str:
    return (
        f"install Debian's package (`apt-get install {APT_PACKAGE}`, files in {DEBIAN_DIR}), or "
        f"{_download_hint(data_dir, options)}, or set datasets.{NAME}.root to a folder holding them"
    )


def _find(folder: Path) -> dict[str, Path]:
    found = {}
    for key, f in FILES.items():
        for name in (f.name + ".gz", f.name):
            if (folder / name).is_file():
                found[key] = folder / name
                break
    return found


def locate(data_dir: Path, options: dict) -> dict[str, Path]:
    """The four files in the first candidate folder that holds all of them."""
    searched = []
    for folder in candidates(data_dir, options):
        found = _find(folder)
        if len(found) == len(FILES):
            return found
        missing = [FILES[k].name + "[.gz]" for k in FILES if k not in found]
        searched.append(f"{folder} (missing {', '.join(missing)})" if folder.is_dir() else f"{folder} (no such folder)")
    raise FileNotFoundError(
        f"{NAME}: the IDX files were not found; searched {'; '.join(searched)}. To get them, "
        f"{how_to_get(data_dir, options)}"
    )


def verified(path: Path, key: str, data_dir: Path, options: dict) -> bytes:
    """``path``'s decompressed content, after checking its size and md5 against :data:`FILES`."""
    f = FILES[key]
    try:
        raw = read_bytes(path)
    except (OSError, EOFError, zlib.error) as e:
        problem = f"cannot be decompressed ({e})"
    else:
        got = hashlib.md5(raw).hexdigest()
        if len(raw) == f.size and got == f.md5:
            return raw
        problem = (
            f"decompressed content is {len(raw)} bytes with md5 {got}; the original {f.name} is "
            f"{f.size} bytes with md5 {f.md5}"
        )
    raise DownloadError(
        f"{NAME}: {path} is corrupt or not the original Fashion-MNIST file: {problem}. "
        f"Replace it: reinstall the package (`apt-get install --reinstall {APT_PACKAGE}`) if it "
        f"is Debian's, or delete it and {_download_hint(data_dir, options)} (upstream URL: "
        f"{BASE_URL}{f.name}.gz)"
    )


def load(data_dir: Path, options: dict) -> Arrays:
    """(train_x, train_y, test_x, test_y): uint8 images (N, 1, 28, 28), int64 labels."""
    paths = locate(data_dir, options)
    arrays = {k: parse_idx(verified(p, k, data_dir, options), str(p)) for k, p in paths.items()}
    return (
        arrays["train_x"][:, None],
        arrays["train_y"].astype(np.int64),
        arrays["test_x"][:, None],
        arrays["test_y"].astype(np.int64),
    )


def download(data_dir: Path, options: dict) -> Path:
    """Make sure verified files exist: a no-op where a candidate folder holds them (corrupt ones
    are an error, not silently replaced); else fetch upstream's ``.gz`` files into ``root`` or
    ``<data_dir>/fashion-mnist``. Returns the folder."""
    if options.get("md5"):
        raise ConfigError(
            f"datasets.{NAME}.md5: not used; the four files are checked against the built-in md5s "
            "of their decompressed content (and upstream's .gz md5s when downloaded)"
        )
    try:
        paths = locate(data_dir, options)
    except FileNotFoundError:
        target = candidates(data_dir, options)[-1]
        base = options.get("url") or BASE_URL
        for key, f in FILES.items():
            if key not in _find(target):
                url = base.rstrip("/") + "/" + f.name + ".gz"
                try:
                    fetch(url, target / (f.name + ".gz"), f.gz_md5)
                except DownloadError as e:
                    raise DownloadError(f"{e}. Without network access: `apt-get install {APT_PACKAGE}`") from e
        paths = locate(data_dir, options)
    for key, p in paths.items():
        verified(p, key, data_dir, options)
    return next(iter(paths.values())).parent


# Mean and std of all 47,040,000 training pixels (60,000 balanced images, values / 255), computed
# once from the IDX content with float64 numpy: x.mean() = 0.28604, x.std() = 0.35302 (population).
MEAN, STD = (0.2860,), (0.3530,)

# Many/Few thresholds: CIFAR-100-LT's 100/20 (of n_max = 500) scaled by n_max (6000 / 500 = 12), so
# that at ρ = 100 the classes split 4 many / 3 medium / 3 few instead of 8 many and no few classes.
SPEC = register(
    DatasetSpec(
        name=NAME,
        num_classes=10,
        n_max=6000,
        image_size=28,
        channels=1,
        mean=MEAN,
        std=STD,
        # CIFAR-LT's RandomCrop padding of 4 (zero fill) kept: a shift of up to 4 of 28 pixels (CIFAR:
        # of 32). Like CIFAR's objects, Fashion-MNIST's items fill the frame (73% of the training images
        # have ink in their top 4 rows), so crops cut an item's edge about as often as on CIFAR.
        padding=4,
        many_threshold=1200,
        few_threshold=240,
        load=load,
        fetch=download,
        url=BASE_URL,
        needs_download=True,
    )
)
