"""Datasets, long-tailed subsets, and the prepared-data file every training run reads.

A dataset is registered by name (:data:`DATASETS`) as a :class:`DatasetSpec`: its class count,
the head-class size ``n_max`` used by the long-tail profile, normalization constants, crop
padding, and functions that fetch and load the balanced originals. ``prepare`` writes one
``.npz`` per (dataset, ratio, subset seed) with uint8 images in (N, C, H, W) layout.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ltbench.data.longtail import class_groups, format_ratio, longtail_counts, longtail_indices  # noqa: F401
from ltbench.errors import ConfigError, DataFileError
from ltbench.io import atomic_path
from ltbench.registry import Registry

DATASETS: Registry[DatasetSpec] = Registry("dataset")

# (train_x, train_y, test_x, test_y) with images uint8 (N, C, H, W)
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    n_max: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int = 4
    many_threshold: int = 100
    few_threshold: int = 20
    # load(data_dir, options) -> Arrays; options are the dataset's config entry
    load: Callable[[Path, dict], Arrays] | None = field(default=None, repr=False)
    # fetch(data_dir, options) -> the folder it filled; None for embedded data
    fetch: Callable[[Path, dict], Path] | None = field(default=None, repr=False)
    url: str | None = None
    md5: str | None = None
    needs_download: bool = False


# Balanced validation images per class held out from the training images the long-tailed subset did
# not keep (datasets.<name>.val_per_class); 20 per class like ImageNet-LT's and Places-LT's val splits.
VAL_PER_CLASS = 20


def heldout_val_indices(targets: np.ndarray, kept: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """A balanced validation set disjoint from the long-tailed subset ``kept``: for each class, up to
    ``per_class`` of its training images that the subset did not keep, drawn with
    ``RandomState(seed)``. A class whose images the subset keeps entirely (CIFAR-LT's head class,
    n_0 = n_max) gets fewer or none; τ selection averages over the classes present."""
    targets = np.asarray(targets)
    free = np.ones(len(targets), dtype=bool)
    free[kept] = False
    rng = np.random.RandomState(seed)
    picked = []
    for c in range(int(targets.max()) + 1 if len(targets) else 0):
        idx = np.where(free & (targets == c))[0]
        picked.append(rng.permutation(idx)[:per_class])
    return np.concatenate(picked).astype(np.int64) if picked else np.zeros(0, dtype=np.int64)


# The prepared file of a CIFAR-style dataset; the prepare rule's output is this pattern too.
PREPARED_PATTERN = "{results_dir}/data/{dataset}_r{ratio}_s{subset}.npz"


def prepared_path(results_dir: str | Path, dataset: str, ratio: float | str, subset_seed: int) -> Path:
    """The file a training run of (dataset, ratio) reads: the ``.npz`` subset, or for an image-list
    dataset the manifest of its checked lists (no subset)."""
    if getattr(get(dataset), "image_lists", False):
        return imagelists.manifest_path(results_dir, dataset, format_ratio(ratio))
    return Path(
        PREPARED_PATTERN.format(results_dir=results_dir, dataset=dataset, ratio=format_ratio(ratio), subset=subset_seed)
    )


def get(name: str) -> DatasetSpec:
    return DATASETS.get(name)


def register(spec: DatasetSpec) -> DatasetSpec:
    DATASETS.register(spec.name)(spec)
    return spec


def counts_for(name: str, ratio: float, profile: str = "exp") -> list[int]:
    spec = get(name)
    if getattr(spec, "image_lists", False):
        raise ConfigError(
            f"{name}'s per-class counts come from its training list, not from a ratio; "
            "`python -m ltbench prepare` checks the list and writes them to its manifest"
        )
    return longtail_counts(spec.num_classes, spec.n_max, ratio, profile)


def prepare(name: str, ratio: float, data_dir: Path, out: Path, options: dict | None = None) -> dict:
    """Subsample the dataset's training set and write the prepared ``.npz`` atomically, with a
    balanced validation set (``val_x``, ``val_y``) from the images the subset did not keep
    (:func:`heldout_val_indices`, ``options["val_per_class"]``, default :data:`VAL_PER_CLASS`)."""
    options = dict(options or {})
    spec = get(name)
    if getattr(spec, "image_lists", False):  # ImageNet-LT, Places-LT, iNat: check lists, write a manifest
        return imagelists.prepare(name, ratio, out, options)
    profile = options.get("profile", "exp")
    subset_seed = int(options.get("subset_seed", 0))
    counts = longtail_counts(spec.num_classes, spec.n_max, ratio, profile)
    if spec.load is None:
        raise ConfigError(f"dataset {name!r} has no loader of its own arrays")
    train_x, train_y, test_x, test_y = spec.load(Path(data_dir), options)
    idx = longtail_indices(train_y, counts, subset_seed)
    val = heldout_val_indices(train_y, idx, int(options.get("val_per_class", VAL_PER_CLASS)), subset_seed)
    info = {
        "dataset": name,
        "ratio": ratio,
        "profile": profile,
        "subset_seed": subset_seed,
        "counts": counts,
        "train_total": int(len(idx)),
        "test_total": int(len(test_y)),
        "val_total": int(len(val)),
    }
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            train_x=train_x[idx],
            train_y=train_y[idx].astype(np.int64),
            test_x=test_x,
            test_y=test_y.astype(np.int64),
            counts=np.asarray(counts),
            subset_indices=idx,
            val_x=train_x[val],
            val_y=train_y[val].astype(np.int64),
            val_indices=val,
        )
    return info


_SPLITS = (("train_x", "train_y"), ("test_x", "test_y"), ("val_x", "val_y"))


def _read_prepared(path: Path) -> dict[str, np.ndarray]:
    """Every array of a prepared ``.npz`` (never pickles); a file that cannot be read is a :class:`DataFileError`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataFileError(f"prepared file {path} does not exist") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataFileError(
            f"prepared file {path} cannot be read ({e}); delete it and run `ltbench prepare` (or the workflow) again"
        ) from None


def check_prepared(path: str | Path, dataset: str, ratio: float, profile: str = "exp") -> None:
    """The prepared ``.npz`` a cell trains on holds what the cell expects: the arrays :func:`prepare`
    writes, images of the dataset's shape, labels of its classes, and per-class training counts equal
    to :func:`counts_for` at this ratio and profile. Raises :class:`DataFileError` naming the file."""
    path = Path(path)
    spec = get(dataset)
    if getattr(spec, "image_lists", False):
        return  # a manifest of lists that `prepare` checked (imagelists.prepare)
    z = _read_prepared(path)
    if missing := [k for k in ("train_x", "train_y", "test_x", "test_y", "counts") if k not in z]:
        raise DataFileError(f"prepared file {path} lacks the array(s) {', '.join(missing)}")
    shape = (spec.channels, spec.image_size, spec.image_size)
    for xk, yk in _SPLITS:
        if xk not in z and yk not in z:
            continue  # val: files from before the held-out split have none
        x, y = z.get(xk), z.get(yk)
        if x is None or y is None or x.ndim != 4 or tuple(x.shape[1:]) != shape or y.shape != (len(x),):
            got = f"{xk} {getattr(x, 'shape', None)}, {yk} {getattr(y, 'shape', None)}"
            raise DataFileError(f"prepared file {path}: {got}; {dataset} needs (N, {', '.join(map(str, shape))}), (N,)")
        if x.dtype != np.uint8 or y.dtype.kind not in "iu":
            raise DataFileError(f"prepared file {path}: {xk} is {x.dtype} and {yk} {y.dtype}; expected uint8, integers")
        if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
            raise DataFileError(
                f"prepared file {path}: {yk} has labels {int(y.min())}..{int(y.max())}; "
                f"{dataset} has classes 0..{spec.num_classes - 1}"
            )
    expected = counts_for(dataset, ratio, profile)
    got = np.bincount(z["train_y"], minlength=spec.num_classes).tolist()
    if got != expected or z["counts"].tolist() != expected:
        raise DataFileError(
            f"prepared file {path} does not hold {dataset} at ratio {format_ratio(ratio)} ({profile} profile): "
            f"per-class training counts {got}, expected {expected}"
        )


from ltbench.data import (  # noqa: E402,F401  (register the datasets)
    cifar,
    digits,
    fashion,  # noqa: E402,F401  (registers fashion-mnist)
    imagelists,
)
