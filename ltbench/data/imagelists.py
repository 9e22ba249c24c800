"""Large long-tailed datasets read from image lists: ImageNet-LT, Places-LT, iNaturalist 2018.

The user provides the images and the split lists; the harness checks them and loads them.

* ImageNet-LT and Places-LT use the OLTR split files (Liu et al. 2019): one ``<relative path>
  <label>`` line per image, paths relative to the image root (``ImageNet_LT_train.txt``, ...).
* iNaturalist 2018 ships COCO-style ``train2018.json`` / ``val2018.json``;
  ``python -m ltbench inat-lists`` (:func:`inat_to_list`) converts them to the same line format
  (``file_name category_id``). The 24,426-image val split is the test set, as in the community.

The long tail is in the lists: nothing is subsampled, and the imbalance ratio n_max / n_min is
fixed by them (256 / 996 / 500). A config must use that ratio for these datasets
(:func:`check_config`, at DAG-build time); ``prepare`` (:func:`prepare`) checks line counts,
classes, label range, the ratio and that every listed image exists, and writes a small JSON
manifest (``*.lists.json``) that the training rule takes as input instead of a ``.npz``. The
manifest pins the lists by sha256; :class:`ltbench.data.sources.ImageListSource` reads it.

Known sizes (``expected``; override per dataset with ``datasets.<name>.expected`` for a custom
or test tree): ImageNet-LT 115,846 train / 20,000 val / 50,000 test, 1000 classes (max 1280,
min 5); Places-LT 62,500 / 7,300 / 36,500, 365 classes (max 4980, min 5); iNaturalist 2018
437,513 train / 24,426 val (used as test), 8142 classes (max 1000, min 2).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ltbench import io
from ltbench.data import DATASETS, DatasetSpec, register
from ltbench.errors import ConfigError, ListCheckError

MANIFEST_SUFFIX = ".lists.json"
MANIFEST_FORMAT = "ltbench-image-lists/1"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# NBN public code's iNaturalist 2018 normalization (nbn-2025.md)
INAT_MEAN, INAT_STD = (0.466, 0.471, 0.380), (0.195, 0.194, 0.192)
SPLITS = ("train", "test", "val")
MAX_EXAMPLES = 5


@dataclass(frozen=True)
class ImageListSpec(DatasetSpec):
    """A dataset whose splits are image lists under a user-provided root (no subsampling)."""

    image_lists: bool = True
    train_size: int = 0
    test_size: int = 0
    val_size: int | None = None
    ratio: float = 1.0
    color_jitter: bool = False  # ColorJitter(0.4, 0.4, 0.4, 0) in the training views by default
    list_files: tuple[str, ...] = ()  # the usual file names, for error messages and docs


IMAGENET_LT = register(
    ImageListSpec(
        name="imagenet-lt",
        num_classes=1000,
        n_max=1280,
        image_size=224,
        channels=3,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        padding=0,
        train_size=115846,
        test_size=50000,
        val_size=20000,
        ratio=256,
        color_jitter=True,
        list_files=("ImageNet_LT_train.txt", "ImageNet_LT_test.txt", "ImageNet_LT_val.txt"),
    )
)
PLACES_LT = register(
    ImageListSpec(
        name="places-lt",
        num_classes=365,
        n_max=4980,
        image_size=224,
        channels=3,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        padding=0,
        train_size=62500,
        test_size=36500,
        val_size=7300,
        ratio=996,
        color_jitter=False,
        list_files=("Places_LT_train.txt", "Places_LT_test.txt", "Places_LT_val.txt"),
    )
)
INAT2018 = register(
    ImageListSpec(
        name="inat2018",
        num_classes=8142,
        n_max=1000,
        image_size=224,
        channels=3,
        mean=INAT_MEAN,
        std=INAT_STD,
        padding=0,
        train_size=437513,
        test_size=24426,
        val_size=None,
        ratio=500,
        color_jitter=False,
        list_files=("iNaturalist18_train.txt", "iNaturalist18_val.txt"),
    )
)


def image_list_spec(name: str) -> ImageListSpec:
    """The registered spec of the image-list dataset ``name``; a clear error for any other dataset."""
    spec = DATASETS.get(name)
    if not isinstance(spec, ImageListSpec):
        raise ConfigError(f"dataset {name!r} is not an image-list dataset (ImageNet-LT, Places-LT, iNaturalist)")
    return spec


def is_image_list(name: str) -> bool:
    return name in DATASETS and bool(getattr(DATASETS.get(name), "image_lists", False))


def expected(name: str, options: Mapping[str, Any] | None = None) -> dict:
    """Known sizes of ``name`` with ``options['expected']`` overrides: train/test/val/classes/ratio."""
    spec = image_list_spec(name)
    out: dict[str, Any] = {
        "train": spec.train_size,
        "test": spec.test_size,
        "val": spec.val_size,
        "classes": spec.num_classes,
        "ratio": float(spec.ratio),
    }
    out.update((options or {}).get("expected") or {})
    out["ratio"] = float(out["ratio"])
    return out


def transform_options(name: str, options: Mapping[str, Any] | None = None) -> dict:
    """The resolved transform settings of an image-list dataset (defaults filled in)."""
    spec = image_list_spec(name)
    options = options or {}
    size = int(options.get("image_size") or spec.image_size)
    resize = options.get("resize")
    return {
        "image_size": size,
        "resize": int(resize) if resize else int(round(size * 256 / 224)),
        "color_jitter": bool(options.get("color_jitter", spec.color_jitter)),
        "autoaugment_policy": options.get("autoaugment_policy", "imagenet"),
        "mean": list(spec.mean),
        "std": list(spec.std),
    }


def manifest_path(results_dir: str | Path, name: str, ratio_str: str) -> Path:
    return Path(results_dir) / "data" / f"{name}_r{ratio_str}{MANIFEST_SUFFIX}"


def ratio_matches(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-3)


# --------------------------------------------------------------------------------------------
# config checks (DAG-build time: no file is read)


def check_config(cfg: Mapping[str, Any]) -> None:
    """Image-list datasets used by an experiment need root/train_list/test_list, and the
    experiment's ratios must be the dataset's natural ratio (the lists fix it)."""
    for ename, exp in cfg["experiments"].items():
        for d in exp["datasets"]:
            if not is_image_list(d):
                continue
            opts = cfg["datasets"].get(d, {})
            require_options(d, opts)
            want = expected(d, opts)["ratio"]
            for i, r in enumerate(exp["ratios"]):
                if not ratio_matches(r, want):
                    raise ConfigError(
                        f"config key experiments.{ename}.ratios[{i}]: {d}'s imbalance ratio is fixed by its "
                        f"lists at {want:g} (n_max / n_min; nothing is subsampled), got {r:g}; use "
                        f"ratios: [{want:g}] for {d} (put it in an experiment of its own), or set "
                        f"datasets.{d}.expected.ratio for a custom list"
                    )


def require_options(name: str, opts: Mapping[str, Any]) -> None:
    spec = image_list_spec(name)
    for key in ("root", "train_list", "test_list"):
        if not opts.get(key):
            hint = {
                "root": "the image root that the list paths are relative to",
                "train_list": f"the training list, e.g. {spec.list_files[0]}",
                "test_list": f"the test list, e.g. {spec.list_files[1]}",
            }[key]
            raise ConfigError(f"config key datasets.{name}.{key}: required for {name} ({hint})")


# --------------------------------------------------------------------------------------------
# lists


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_list(path: str | Path) -> tuple[list[str], np.ndarray, list[int]]:
    """Parse ``<relative path> <label>`` lines: (paths, labels int64, line numbers).

    Blank lines are skipped; a path may contain spaces (the label is the last field). A
    malformed line raises :class:`ListCheckError` naming ``file:line`` and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise ListCheckError(f"image list {path} does not exist")
    paths, labels, lines, bad = [], [], [], []
    with open(path, encoding="utf-8") as f:
        for no, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                bad.append(f"{path}:{no}: expected '<relative path> <label>', got {line!r}")
                continue
            try:
                label = int(parts[1])
            except ValueError:
                bad.append(f"{path}:{no}: label {parts[1]!r} is not an integer (line {line!r})")
                continue
            paths.append(parts[0])
            labels.append(label)
            lines.append(no)
    if bad:
        more = f"\n  ... and {len(bad) - MAX_EXAMPLES} more malformed lines" if len(bad) > MAX_EXAMPLES else ""
        raise ListCheckError(f"{len(bad)} malformed line(s) in {path}:\n  " + "\n  ".join(bad[:MAX_EXAMPLES]) + more)
    return paths, np.asarray(labels, dtype=np.int64), lines


def missing_files(root: Path, paths: list[str], threads: int = 8) -> list[int]:
    """Indices of ``paths`` that are not files under ``root`` (one listdir per directory)."""
    by_dir: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(paths):
        by_dir[os.path.dirname(p)].append(i)

    def scan(item: tuple[str, list[int]]) -> list[int]:
        d, idx = item
        try:
            names = set(os.listdir(root / d))
        except (FileNotFoundError, NotADirectoryError):
            return idx
        return [i for i in idx if os.path.basename(paths[i]) not in names]

    with ThreadPoolExecutor(max_workers=threads) as ex:
        out = [i for part in ex.map(scan, by_dir.items()) for i in part]
    return sorted(out)


def _check_split(name: str, split: str, file: Path, root: Path, exp: Mapping, problems: list[str]) -> dict:
    paths, labels, lines = read_list(file)
    K = exp["classes"]
    key = f"datasets.{name}.expected.{split}"
    if exp.get(split) is not None and len(paths) != exp[split]:
        problems.append(
            f"{file}: {len(paths)} images listed, expected {exp[split]} for the {split} split "
            f"of {name} (override with {key} for a custom list)"
        )
    out_of_range = np.flatnonzero((labels < 0) | (labels >= K))
    if len(out_of_range):
        ex = ", ".join(f"{file}:{lines[i]}: label {labels[i]}" for i in out_of_range[:MAX_EXAMPLES])
        problems.append(
            f"{file}: {len(out_of_range)} label(s) out of range 0..{K - 1} ({name} has {K} "
            f"classes; datasets.{name}.expected.classes), first: {ex}"
        )
        counts = None
    else:
        counts = np.bincount(labels, minlength=K)
        absent = np.flatnonzero(counts == 0)
        if len(absent):
            problems.append(
                f"{file}: {K - len(absent)} of {K} classes have images; classes without any: "
                f"{', '.join(map(str, absent[:10].tolist()))}{' ...' if len(absent) > 10 else ''}"
            )
    miss = missing_files(root, paths)
    if miss:
        ex = ", ".join(f"{paths[i]} ({file.name}:{lines[i]})" for i in miss[:MAX_EXAMPLES])
        problems.append(f"{file}: {len(miss)} of {len(paths)} listed images missing under root {root}; first: {ex}")
    return {
        "file": str(file.resolve()),
        "sha256": sha256(file),
        "images": len(paths),
        "counts": counts.tolist() if counts is not None else None,
    }


def check(name: str, ratio: float, options: Mapping[str, Any]) -> dict:
    """Check every configured list of ``name``; the manifest dict, or :class:`ListCheckError`
    listing every problem found (each naming the file, line and value)."""
    require_options(name, options)
    exp = expected(name, options)
    if not ratio_matches(ratio, exp["ratio"]):
        raise ConfigError(
            f"{name}: ratio {ratio:g} requested, but {name}'s ratio is fixed by its lists at "
            f"{exp['ratio']:g} (datasets.{name}.expected.ratio)"
        )
    root = Path(options["root"])
    if not root.is_dir():
        raise ListCheckError(f"datasets.{name}.root: image root {root} is not a directory")
    problems: list[str] = []
    splits = {}
    for split in SPLITS:
        file = options.get(f"{split}_list")
        if file:
            splits[split] = _check_split(name, split, Path(file), root, exp, problems)
    counts = splits["train"]["counts"]
    measured = None
    if counts is not None and min(counts) > 0:
        measured = max(counts) / min(counts)
        if not ratio_matches(measured, exp["ratio"]):
            problems.append(
                f"{options['train_list']}: class sizes {max(counts)} (max) / {min(counts)} (min) give "
                f"ratio {measured:.4g}, expected {exp['ratio']:g} for {name} "
                f"(datasets.{name}.expected.ratio)"
            )
    if problems:
        raise ListCheckError(
            f"{name}: the image lists do not match (no training was started):\n- " + "\n- ".join(problems)
        )
    return {
        "format": MANIFEST_FORMAT,
        "dataset": name,
        "ratio": float(ratio),
        "measured_ratio": measured,
        "root": str(root.resolve()),
        "num_classes": exp["classes"],
        "counts": counts,
        "test_counts": splits["test"]["counts"],
        "lists": {s: {k: v[k] for k in ("file", "sha256", "images")} for s, v in splits.items()},
        "expected": exp,
    }


def prepare(name: str, ratio: float, out: str | Path, options: Mapping[str, Any]) -> dict:
    """Check the lists and write the manifest atomically (the train rule's input)."""
    manifest = check(name, ratio, options)
    io.write_json(out, manifest)
    return {
        "dataset": name,
        "ratio": ratio,
        "counts": manifest["counts"],
        "manifest": str(out),
        "train_total": manifest["lists"]["train"]["images"],
        "test_total": manifest["lists"]["test"]["images"],
    }


def load_manifest(path: str | Path) -> tuple[dict, dict[str, tuple[list[str], np.ndarray]]]:
    """The manifest and its lists re-read, verified against the sha256 recorded by prepare."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ListCheckError(f"{path}: not a readable image-list manifest ({e})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ListCheckError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    splits = {}
    for split in [s for s in ("train", "test", "val") if s in manifest["lists"]]:  # val: when configured
        entry = manifest["lists"][split]
        if not Path(entry["file"]).is_file() or sha256(entry["file"]) != entry["sha256"]:
            raise ListCheckError(
                f"{entry['file']}: the {split} list changed or vanished since {path} was written "
                f"(sha256 {entry['sha256'][:12]}...); delete {path} and run prepare again"
            )
        p, y, _ = read_list(entry["file"])
        splits[split] = (p, y)
    return manifest, splits


# --------------------------------------------------------------------------------------------
# iNaturalist 2018 json → list


def inat_to_list(json_path: str | Path, out: str | Path) -> dict:
    """Write ``file_name category_id`` lines (in the json's image order) for a COCO-style iNat file."""
    json_path = Path(json_path)
    try:
        d = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise ListCheckError(f"{json_path} does not exist") from None
    except ValueError as e:
        raise ListCheckError(f"{json_path}: not valid JSON ({e})") from None
    for key in ("images", "annotations"):
        if not isinstance(d.get(key), list):
            raise ListCheckError(
                f"{json_path}: no '{key}' list (a COCO-style iNaturalist file has images and "
                "annotations; test2018.json has no labels)"
            )
    label: dict[Any, int] = {}
    for i, a in enumerate(d["annotations"]):
        try:
            img, cat = a["image_id"], a["category_id"]
        except (KeyError, TypeError):
            raise ListCheckError(f"{json_path}: annotations[{i}] has no image_id/category_id: {a!r}") from None
        if not isinstance(cat, int) or isinstance(cat, bool):
            raise ListCheckError(f"{json_path}: annotations[{i}].category_id {cat!r} is not an integer")
        if img in label and label[img] != cat:
            raise ListCheckError(f"{json_path}: image_id {img!r} has two categories ({label[img]}, {cat})")
        label[img] = cat
    lines: list[str] = []
    counts: defaultdict[int, int] = defaultdict(int)
    for i, im in enumerate(d["images"]):
        try:
            img, fname = im["id"], im["file_name"]
        except (KeyError, TypeError):
            raise ListCheckError(f"{json_path}: images[{i}] has no id/file_name: {im!r}") from None
        if img not in label:
            raise ListCheckError(f"{json_path}: images[{i}] (id {img!r}, {fname}) has no annotation")
        if not isinstance(fname, str) or not fname.strip() or "\n" in fname:
            raise ListCheckError(f"{json_path}: images[{i}].file_name {fname!r} is not a usable path")
        lines.append(f"{fname} {label[img]}")
        counts[label[img]] += 1
    known = {im["id"] for im in d["images"]}
    orphans = [k for k in label if k not in known]
    if orphans:
        raise ListCheckError(
            f"{json_path}: {len(orphans)} annotation(s) refer to unknown image ids, first: {orphans[:MAX_EXAMPLES]}"
        )
    io.write_text(out, "\n".join(lines) + "\n")
    return {
        "json": str(json_path),
        "out": str(out),
        "images": len(lines),
        "classes": len(counts),
        "max": max(counts.values(), default=0),
        "min": min(counts.values(), default=0),
    }
