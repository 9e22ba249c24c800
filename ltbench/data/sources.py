"""Where a training run's images come from.

A source hands the training loop batches of normalized float images for an epoch order of
sample indices, in one or more *views* (``"weak"`` = crop+flip, ``"strong"`` = AutoAugment,
``"none"``), and the test set in batches. :class:`TensorSource` keeps a small dataset (CIFAR,
digits) on the training device as uint8 and augments there, per sample, with no host
synchronisation. :class:`ImageListSource` (ImageNet-LT, Places-LT, iNaturalist 2018) decodes
image files in DataLoader workers with the same interface; :func:`make_source` picks one by the
prepared file's type.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data

from ltbench.data import augment, imagelists
from ltbench.data.imagelists import MANIFEST_SUFFIX

DEFAULT_STRONG_VIEW: dict[str, Any] = {"policy": "torchvision", "cutout": False}  # recipe.strong_view


class TensorSource:
    strong_view = DEFAULT_STRONG_VIEW  # the trainer sets the recipe's

    def __init__(
        self, data_file: str | Path, device: torch.device, mean: Sequence[float], std: Sequence[float], padding: int
    ) -> None:
        with np.load(data_file) as z:
            self.train_x = torch.from_numpy(z["train_x"]).to(device)
            self.train_y = torch.from_numpy(z["train_y"]).to(device)
            self.test_x = torch.from_numpy(z["test_x"]).to(device)
            self.test_y = torch.from_numpy(z["test_y"]).to(device)
            self.counts = z["counts"].tolist()
            # the held-out validation split (prepare writes it; files from before it existed have none)
            self.val_x = torch.from_numpy(z["val_x"]).to(device) if "val_x" in z.files else None
            self.val_y = torch.from_numpy(z["val_y"]).to(device) if "val_y" in z.files else None
        self.data_file = data_file
        self.device = device
        self.mean = torch.tensor(mean, device=device)
        self.std = torch.tensor(std, device=device)
        self.padding = padding

    def __len__(self) -> int:
        return len(self.train_y)

    @property
    def labels(self) -> torch.Tensor:
        return self.train_y

    def view(self, x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
        if kind == "weak":
            x = augment.random_crop_flip(x, self.padding, gen)
        elif kind == "strong":
            x = augment.random_crop_flip(x, self.padding, gen)
            x = augment.strong_view(x, gen, self.strong_view["policy"], self.strong_view["cutout"])
        elif kind != "none":
            raise ValueError(f"unknown view {kind!r}; known: weak, strong, none")
        return augment.normalize(x, self.mean, self.std)

    def epoch(
        self, order: torch.Tensor, batch_size: int, views: Sequence[str], gen: torch.Generator
    ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Batches of ``order``; a last batch of one sample is dropped (BatchNorm needs two)."""
        n = len(order)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:
                break
            x = self.train_x[idx]
            yield [self.view(x, v, gen) for v in views], self.train_y[idx]

    def steps(self, n: int, batch_size: int) -> int:
        return n // batch_size + (1 if n % batch_size >= 2 else 0)

    def test(self, batch_size: int = 1000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.test_y), batch_size):
            yield (
                augment.normalize(self.test_x[i : i + batch_size], self.mean, self.std),
                self.test_y[i : i + batch_size],
            )

    def val(self, batch_size: int = 1000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out validation split in batches (never the test set); a clear error if absent."""
        if self.val_x is None or self.val_y is None or len(self.val_y) == 0:
            raise ValueError(
                f"{self.data_file} has no validation split (val_x/val_y); run `python -m ltbench "
                "prepare` again (datasets.<name>.val_per_class > 0) to select τ on it"
            )
        for i in range(0, len(self.val_y), batch_size):
            yield augment.normalize(self.val_x[i : i + batch_size], self.mean, self.std), self.val_y[i : i + batch_size]


# ---------------------------------------------------------------------------------------------
# Image-list datasets (ImageNet-LT, Places-LT, iNaturalist 2018)


def make_source(
    data_file: str | Path,
    device: torch.device,
    dspec: Any,
    options: Mapping[str, Any] | None = None,
    train: Mapping[str, Any] | None = None,
) -> TensorSource | ImageListSource:
    """The source for a prepared file: an image-list manifest (``*.lists.json``) gives an
    :class:`ImageListSource`, anything else (the ``.npz`` of CIFAR / digits) a :class:`TensorSource`."""
    if str(data_file).endswith(MANIFEST_SUFFIX):
        train = train or {}
        return ImageListSource(
            data_file,
            device,
            dspec.name,
            options or {},
            batch_size=int(train.get("batch_size", 128)),
            workers=int(train.get("workers", 0)),
        )
    return TensorSource(data_file, device, dspec.mean, dspec.std, dspec.padding)


def _resized_crop_params(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params`` (same algorithm) drawing from ``rng``: (i, j, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = width / height  # fallback: central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ImageFiles(torch.utils.data.Dataset):
    """Decodes and transforms one image per key, in DataLoader workers.

    A key is ``(split, index, seed, position, kinds)``: the image ``index`` of ``split`` ("train" /
    "test") in one uint8 (C, H, W) tensor per view kind. ``"weak"`` and ``"strong"`` get
    RandomResizedCrop(size) + horizontal flip (+ ColorJitter(0.4, 0.4, 0.4, 0) if enabled), drawn
    from a NumPy generator seeded by ``(seed, position, view number)`` only, so the result does
    not depend on which worker decodes it; ``"none"`` gets Resize(resize) + CenterCrop(size).
    AutoAugment of the strong view is applied later, on the device, per sample.
    """

    def __init__(self, root: str, paths: dict[str, list[str]], size: int, resize: int, color_jitter: bool):
        self.root, self.paths = root, paths
        self.size, self.resize, self.color_jitter = size, resize, color_jitter

    def __len__(self) -> int:
        return len(self.paths["train"])

    def open(self, split: str, index: int) -> Any:
        from PIL import Image  # lazy: only image-list datasets decode files

        path = os.path.join(self.root, self.paths[split][index])
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception as e:
            raise RuntimeError(f"cannot decode image {path} ({split} list entry {index}): {e}") from e

    def __getitem__(self, key: tuple) -> tuple[torch.Tensor, ...]:
        # lazy: torchvision, only image-list datasets transform PIL images
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        split, index, seed, position, kinds = key
        img = self.open(split, index)
        out = []
        for v, kind in enumerate(kinds):
            if kind == "none":
                x = TF.center_crop(TF.resize(img, self.resize, InterpolationMode.BILINEAR), self.size)
            else:
                rng = np.random.default_rng([seed, position, v])
                i, j, h, w = _resized_crop_params(rng, *img.size)
                x = TF.resized_crop(img, i, j, h, w, [self.size, self.size], InterpolationMode.BILINEAR)
                if rng.random() < 0.5:
                    x = TF.hflip(x)
                if self.color_jitter:  # ColorJitter(0.4, 0.4, 0.4, 0): factors in [0.6, 1.4], random order
                    factors = rng.uniform(0.6, 1.4, size=3)
                    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
                    for k in rng.permutation(3):
                        x = ops[k](x, float(factors[k]))
            out.append(TF.pil_to_tensor(x))
        return tuple(out)


class _Plan:
    """The DataLoader's batch sampler: the batches of keys set for the current pass."""

    def __init__(self) -> None:
        self.batches: list[list[tuple]] = []

    def __iter__(self) -> Iterator[list[tuple]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class ImageListSource:
    """Images decoded from files in a multi-worker DataLoader (pinned memory), with
    :class:`TensorSource`'s interface.

    Batches follow ``order`` exactly (the sampler's indices; a last batch of one is dropped).
    Workers decode and crop (uint8); the strong view's AutoAugment (``policy``, per sample) and
    the normalization run on the training device.

    Determinism: per epoch one seed is drawn from the training generator; every crop, flip and
    colour jitter is drawn from ``(that seed, position in the epoch, view)``, and AutoAugment from
    the generator in batch order, so an uninterrupted run gives the same batches for any
    ``train.workers`` (0 included). Not covered: a run resumed mid-epoch draws a fresh seed for the
    rest of that epoch; PIL/libjpeg versions may decode or resize slightly differently; GPU
    kernels are not bitwise deterministic.
    """

    strong_view = DEFAULT_STRONG_VIEW  # the trainer sets the recipe's

    def __init__(
        self,
        manifest_file: str | Path,
        device: torch.device,
        dataset: str,
        options: Mapping[str, Any],
        batch_size: int = 128,
        workers: int = 0,
    ) -> None:
        self.manifest, splits = imagelists.load_manifest(manifest_file)
        if self.manifest["dataset"] != dataset:
            raise imagelists.ListCheckError(
                f"{manifest_file} is a manifest of {self.manifest['dataset']}, not {dataset}"
            )
        t = imagelists.transform_options(dataset, options)
        self.settings = t
        self.device = device
        self.mean = torch.tensor(t["mean"], device=device)
        self.std = torch.tensor(t["std"], device=device)
        self.policy = t["autoaugment_policy"]
        self.counts = [int(c) for c in self.manifest["counts"]]
        self.train_y = torch.from_numpy(splits["train"][1]).to(device)
        self.test_y = torch.from_numpy(splits["test"][1]).to(device)
        self.val_y = torch.from_numpy(splits["val"][1]).to(device) if "val" in splits else None
        self.manifest_file = manifest_file
        self.test_batch_size = batch_size
        self.files = ImageFiles(
            self.manifest["root"],
            {s: p for s, (p, _) in splits.items()},
            t["image_size"],
            t["resize"],
            t["color_jitter"],
        )
        self._plan = _Plan()
        self._loader = torch.utils.data.DataLoader(
            self.files,
            batch_sampler=self._plan,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            worker_init_fn=_worker_init if workers > 0 else None,
        )
        self._busy = False

    def __len__(self) -> int:
        return len(self.train_y)

    @property
    def labels(self) -> torch.Tensor:
        return self.train_y

    def _run(self, batches: list[list[tuple]]) -> Iterator[list[torch.Tensor]]:
        if self._busy:
            raise RuntimeError("ImageListSource: one pass at a time (finish the epoch before testing)")
        self._busy = True
        self._plan.batches = batches
        try:
            for xs in self._loader:
                yield [x.to(self.device, non_blocking=True) for x in xs]
        finally:
            self._busy = False

    def epoch(
        self, order: torch.Tensor, batch_size: int, views: Sequence[str], gen: torch.Generator
    ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Batches of ``order``; a last batch of one sample is dropped (BatchNorm needs two)."""
        for v in views:
            if v not in ("weak", "strong", "none"):
                raise ValueError(f"unknown view {v!r}; known: weak, strong, none")
        seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
        idx_cpu = order.tolist()
        kinds = tuple(views)
        batches = []
        for i in range(0, len(idx_cpu), batch_size):
            chunk = idx_cpu[i : i + batch_size]
            if len(chunk) < 2:
                break
            batches.append([("train", k, seed, i + j, kinds) for j, k in enumerate(chunk)])
        for b, xs in enumerate(self._run(batches)):
            out = []
            for v, x in zip(views, xs, strict=True):
                if v == "strong":
                    x = augment.strong_view(
                        x, gen, self.strong_view["policy"], self.strong_view["cutout"], table=self.policy
                    )
                out.append(augment.normalize(x, self.mean, self.std))
            yield out, self.train_y[order[b * batch_size : (b + 1) * batch_size]]

    def steps(self, n: int, batch_size: int) -> int:
        return n // batch_size + (1 if n % batch_size >= 2 else 0)

    def test(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from self._split("test", self.test_y, batch_size)

    def val(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The dataset's own val list (configured as val_list), test-time transform; an error without one."""
        if self.val_y is None:
            raise ValueError(
                f"{self.manifest['dataset']} has no validation list in {self.manifest_file} (configure "
                "datasets.<name>.val_list and run prepare again); τ is never selected on the test set"
            )
        yield from self._split("val", self.val_y, batch_size)

    def _split(
        self, split: str, labels: torch.Tensor, batch_size: int | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bs = batch_size or self.test_batch_size
        n = len(labels)
        batches = [[(split, k, 0, k, ("none",)) for k in range(i, min(i + bs, n))] for i in range(0, n, bs)]
        for b, (x,) in enumerate(self._run(batches)):
            yield augment.normalize(x, self.mean, self.std), labels[b * bs : (b + 1) * bs]
