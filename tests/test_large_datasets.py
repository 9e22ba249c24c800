"""Image-list datasets (ImageNet-LT, Places-LT, iNaturalist 2018) on a tiny fake image tree.

The tree has the real list formats (OLTR ``<path> <label>`` lines, iNat COCO-style json) with a
long tail of 4 classes; ``expected`` overrides point the real dataset names at it.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, run_cli
from PIL import Image
from test_workflow import job_counts, snakemake

from ltbench import data
from ltbench.data import imagelists
from ltbench.data.imagelists import ListCheckError
from ltbench.data.sources import ImageListSource, make_source
from ltbench.errors import ConfigError
from ltbench.spec import config
from ltbench.training import trainer as train

TRAIN_COUNTS = [10, 5, 2, 1]  # ratio 10
TEST_PER_CLASS = 3
COLORS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 230, 40)]


def _image(rng, c, path: Path, mode="RGB"):
    w, h = int(rng.integers(20, 33)), int(rng.integers(20, 33))  # not square, not the crop size
    x = np.clip(np.array(COLORS[c])[None, None] + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(x).convert(mode).save(path)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """root/{train,val}/n<c>/..., plus ImageNet_LT_{train,test}.txt lists."""
    base = tmp_path_factory.mktemp("fake_imagenet_lt")
    root, lists = base / "images", base / "lists"
    lists.mkdir()
    rng = np.random.default_rng(0)
    train_lines, test_lines = [], []
    for c, n in enumerate(TRAIN_COUNTS):
        for i in range(n):
            rel = f"train/n{c:04d}/n{c:04d}_{i}.{'JPEG' if i % 2 == 0 else 'png'}"
            _image(rng, c, root / rel, mode="L" if (c, i) == (0, 1) else "RGB")
            train_lines.append(f"{rel} {c}")
        for i in range(TEST_PER_CLASS):
            rel = f"val/ILSVRC2012_val_{c}_{i}.JPEG"
            _image(rng, c, root / rel)
            test_lines.append(f"{rel} {c}")
    (lists / "ImageNet_LT_train.txt").write_text("\n".join(train_lines) + "\n")
    (lists / "ImageNet_LT_test.txt").write_text("\n".join(test_lines) + "\n")
    return {
        "root": root,
        "train_list": lists / "ImageNet_LT_train.txt",
        "test_list": lists / "ImageNet_LT_test.txt",
        "base": base,
    }


def options(tree, **over):
    o = {
        "root": str(tree["root"]),
        "train_list": str(tree["train_list"]),
        "test_list": str(tree["test_list"]),
        "expected": {
            "train": sum(TRAIN_COUNTS),
            "test": TEST_PER_CLASS * len(TRAIN_COUNTS),
            "classes": len(TRAIN_COUNTS),
            "ratio": 10,
        },
        "image_size": 16,
    }
    o.update(over)
    return o


def copy_list(tree, tmp_path, name, edit):
    lines = tree[name].read_text().splitlines()
    edit(lines)
    out = tmp_path / tree[name].name
    out.write_text("\n".join(lines) + "\n")
    return str(out)


# ---------------------------------------------------------------------------------------------- checks


def test_registered_with_the_known_sizes():
    assert data.get("imagenet-lt").num_classes == 1000
    assert data.get("places-lt").num_classes == 365
    assert data.get("inat2018").num_classes == 8142
    e = imagelists.expected("imagenet-lt")
    assert (e["train"], e["test"], e["val"], e["ratio"]) == (115846, 50000, 20000, 256)
    e = imagelists.expected("places-lt")
    assert (e["train"], e["test"], e["val"], e["ratio"]) == (62500, 36500, 7300, 996)
    e = imagelists.expected("inat2018")
    assert (e["train"], e["test"], e["ratio"]) == (437513, 24426, 500)
    with pytest.raises(ConfigError, match="counts come from its training list"):
        data.counts_for("imagenet-lt", 256)


def test_prepare_writes_a_manifest(tree, tmp_path):
    out = tmp_path / "m.lists.json"
    info = data.prepare("imagenet-lt", 10, tmp_path, out, options(tree))
    assert info["counts"] == TRAIN_COUNTS
    m = json.loads(out.read_text())
    assert m["counts"] == TRAIN_COUNTS and m["test_counts"] == [TEST_PER_CLASS] * 4
    assert m["measured_ratio"] == 10 and m["num_classes"] == 4
    assert m["lists"]["train"]["images"] == 18 and len(m["lists"]["train"]["sha256"]) == 64


def test_the_known_sizes_are_checked_by_default(tree, tmp_path):
    o = options(tree)
    del o["expected"]
    with pytest.raises(ConfigError, match="fixed by its lists at 256"):
        imagelists.check("imagenet-lt", 10, o)
    with pytest.raises(ListCheckError) as e:
        imagelists.check("imagenet-lt", 256, o)
    msg = str(e.value)
    assert f"{tree['train_list']}: 18 images listed, expected 115846" in msg
    assert "datasets.imagenet-lt.expected.train" in msg
    assert f"{tree['test_list']}: 12 images listed, expected 50000" in msg
    assert "no training was started" in msg


def test_wrong_line_count_names_file_and_values(tree, tmp_path):
    train_list = copy_list(tree, tmp_path, "train_list", lambda lines: lines.pop())  # drops the class-3 image
    with pytest.raises(ListCheckError) as e:
        imagelists.check("imagenet-lt", 10, options(tree, train_list=train_list))
    msg = str(e.value)
    assert f"{train_list}: 17 images listed, expected 18" in msg
    assert "3 of 4 classes have images; classes without any: 3" in msg


def test_label_out_of_range_names_file_line_and_label(tree, tmp_path):
    def edit(lines):
        lines[4] = lines[4].rsplit(" ", 1)[0] + " 7"

    train_list = copy_list(tree, tmp_path, "train_list", edit)
    with pytest.raises(ListCheckError) as e:
        imagelists.check("imagenet-lt", 10, options(tree, train_list=train_list))
    assert f"{train_list}: 1 label(s) out of range 0..3" in str(e.value)
    assert f"{train_list}:5: label 7" in str(e.value)


def test_malformed_line_names_file_and_line(tree, tmp_path):
    def edit(lines):
        lines[2] = "train/n0000/only_a_path.JPEG"
        lines[6] = "train/n0000/x.JPEG zero"

    train_list = copy_list(tree, tmp_path, "train_list", edit)
    with pytest.raises(ListCheckError) as e:
        imagelists.check("imagenet-lt", 10, options(tree, train_list=train_list))
    msg = str(e.value)
    assert "2 malformed line(s)" in msg
    assert f"{train_list}:3: expected '<relative path> <label>', got 'train/n0000/only_a_path.JPEG'" in msg
    assert f"{train_list}:7: label 'zero' is not an integer" in msg


def test_missing_files_reported_by_count_and_first_examples(tree, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(tree["root"], root)
    (root / "train" / "n0000" / "n0000_3.png").unlink()
    shutil.rmtree(root / "train" / "n0002")
    with pytest.raises(ListCheckError) as e:
        imagelists.check("imagenet-lt", 10, options(tree, root=str(root)))
    msg = str(e.value)
    assert f"3 of 18 listed images missing under root {root}" in msg
    assert "first: train/n0000/n0000_3.png (ImageNet_LT_train.txt:4), train/n0002/n0002_0.JPEG" in msg
    assert msg.count("missing under root") == 1  # the test list is complete


def test_wrong_ratio_of_the_list(tree, tmp_path):
    o = options(tree)
    o["expected"] = {**o["expected"], "ratio": 5}
    with pytest.raises(ListCheckError, match=r"give ratio 10, expected 5"):
        imagelists.check("imagenet-lt", 5, o)


def test_config_checks_at_dag_build(tree):
    exp = {"e": {"datasets": ["imagenet-lt"], "ratios": [100], "methods": ["ce"], "backbones": ["resnet50"]}}
    cfg = config.validate(
        {
            "experiments": exp,
            "datasets": {
                "imagenet-lt": {"root": "/nowhere", "train_list": "/nowhere/a.txt", "test_list": "/nowhere/b.txt"}
            },
        }
    )
    with pytest.raises(
        ConfigError,
        match=r"experiments\.e\.ratios\[0\]: imagenet-lt's imbalance ratio is fixed "
        r"by its lists at 256 .* got 100",
    ):
        imagelists.check_config(cfg)
    cfg["experiments"]["e"]["ratios"] = [256]
    imagelists.check_config(cfg)  # the files are not read at DAG-build time
    del cfg["datasets"]["imagenet-lt"]["root"]
    with pytest.raises(ConfigError, match=r"datasets\.imagenet-lt\.root: required"):
        imagelists.check_config(cfg)
    with pytest.raises(ConfigError, match="expected"):
        config.validate({"experiments": exp, "datasets": {"places-lt": {"expected": {"lines": 3}}}})


# ---------------------------------------------------------------------------------------------- iNat


def test_inat_json_to_list(tmp_path, cli):
    images = [
        {"id": 10 + i, "file_name": f"train_val2018/Plantae/{c}/{i}.jpg", "width": 8, "height": 8}
        for i, c in enumerate([2, 0, 2, 1])
    ]
    anns = [{"id": i, "image_id": 10 + i, "category_id": c} for i, c in enumerate([2, 0, 2, 1])][::-1]
    (tmp_path / "train2018.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": k} for k in range(3)]})
    )
    (tmp_path / "val2018.json").write_text(json.dumps({"images": images[:2], "annotations": anns[2:]}))
    p = cli(
        "inat-lists",
        "--train-json",
        tmp_path / "train2018.json",
        "--val-json",
        tmp_path / "val2018.json",
        "--out-dir",
        tmp_path / "lists",
    )
    train_list = (tmp_path / "lists" / "iNaturalist18_train.txt").read_text().splitlines()
    assert train_list == [
        "train_val2018/Plantae/2/0.jpg 2",
        "train_val2018/Plantae/0/1.jpg 0",
        "train_val2018/Plantae/2/2.jpg 2",
        "train_val2018/Plantae/1/3.jpg 1",
    ]
    assert (tmp_path / "lists" / "iNaturalist18_val.txt").read_text().splitlines() == train_list[:2]
    assert "test_list:" in p.stdout
    paths, labels, _ = imagelists.read_list(tmp_path / "lists" / "iNaturalist18_train.txt")
    assert labels.tolist() == [2, 0, 2, 1]
    # an image without annotation is an error naming the file and the image
    (tmp_path / "bad.json").write_text(json.dumps({"images": images, "annotations": anns[:-1]}))
    with pytest.raises(
        ListCheckError,
        match=r"bad\.json: images\[0\] \(id 10, train_val2018/Plantae/2/0.jpg\) "
        "has no annotation",
    ):
        imagelists.inat_to_list(tmp_path / "bad.json", tmp_path / "x.txt")
    assert not (tmp_path / "x.txt").exists()


# ---------------------------------------------------------------------------------------------- source


@pytest.fixture(scope="module")
def manifest(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / f"imagenet-lt_r10{imagelists.MANIFEST_SUFFIX}"
    data.prepare("imagenet-lt", 10, out.parent, out, options(tree))
    return out


def test_source_batches_follow_the_order(tree, manifest):
    src = make_source(
        manifest, torch.device("cpu"), data.get("imagenet-lt"), options(tree), {"batch_size": 5, "workers": 0}
    )
    assert isinstance(src, ImageListSource)
    assert len(src) == 18 and src.counts == TRAIN_COUNTS and src.settings["resize"] == 18
    assert src.settings["color_jitter"] is True  # ImageNet-LT's default
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(18, generator=gen)[:11]  # 5 + 5 + a last batch of one: dropped
    batches = list(src.epoch(order, 5, ["weak", "strong"], gen))
    assert src.steps(11, 5) == len(batches) == 2
    for b, (xs, y) in enumerate(batches):
        assert len(xs) == 2 and all(x.shape == (5, 3, 16, 16) and x.dtype == torch.float32 for x in xs)
        assert torch.equal(y, src.labels[order[5 * b : 5 * b + 5]])
        assert not torch.equal(xs[0], xs[1])  # two independent augmentations
    # the weak view's colours still tell the classes apart (normalization on the images' colours)
    xs, y = next(iter(src.epoch(torch.arange(18), 18, ["none"], gen)))
    red = xs[0][:, 0].mean((1, 2))
    assert red[y == 0].mean() > red[y == 1].mean() + 1.0
    test = list(src.test(batch_size=5))
    assert [len(t[1]) for t in test] == [5, 5, 2]
    assert torch.equal(torch.cat([t[1] for t in test]), torch.tensor([0] * 3 + [1] * 3 + [2] * 3 + [3] * 3))
    assert test[0][0].shape == (5, 3, 16, 16)


def test_source_is_deterministic_with_workers(tree, manifest):
    def epoch(workers):
        src = ImageListSource(manifest, torch.device("cpu"), "imagenet-lt", options(tree), 6, workers)
        gen = torch.Generator().manual_seed(3)
        return [
            (torch.stack(xs), y) for xs, y in src.epoch(torch.randperm(18, generator=gen), 6, ["weak", "strong"], gen)
        ]

    a, b = epoch(0), epoch(2)
    assert len(a) == len(b) == 3
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_source_rejects_lists_changed_after_prepare(tree, tmp_path):
    train_list = tmp_path / "train.txt"
    shutil.copy(tree["train_list"], train_list)
    out = tmp_path / f"m{imagelists.MANIFEST_SUFFIX}"
    data.prepare("imagenet-lt", 10, tmp_path, out, options(tree, train_list=str(train_list)))
    train_list.write_text(train_list.read_text().replace(" 3\n", " 2\n"))
    with pytest.raises(ListCheckError, match="the train list changed or vanished since"):
        ImageListSource(out, torch.device("cpu"), "imagenet-lt", {})


def test_train_run_on_image_lists(tree, manifest, tmp_path):
    cfg = config.validate(
        {
            "train": {"epochs": 2, "batch_size": 6, "lr": 0.05, "warmup_epochs": 0, "device": "cpu", "workers": 0},
            "datasets": {"imagenet-lt": options(tree)},
            "experiments": {
                "e": {
                    "datasets": ["imagenet-lt"],
                    "ratios": [10],
                    "methods": ["balanced-softmax"],
                    "backbones": ["resnet8"],
                }
            },
        }
    )
    spec = config.cell_spec(cfg, "imagenet-lt", "balanced-softmax", "resnet8")
    m = train.run(spec, 10, 0, manifest, tmp_path)
    assert len(m["per_class_acc"]) == 4 and m["train_counts"] == TRAIN_COUNTS
    assert 0.0 <= m["top1"] <= 100.0


def test_cli_prepare_fails_clearly(tree, tmp_path):
    o = options(tree)
    o["expected"] = {**o["expected"], "test": 13}
    cfg = {
        "experiments": {
            "e": {"datasets": ["imagenet-lt"], "ratios": [10], "methods": ["ce"], "backbones": ["resnet8"]}
        },
        "datasets": {"imagenet-lt": o},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    p = run_cli(
        "prepare",
        "--dataset",
        "imagenet-lt",
        "--ratio",
        10,
        "--config",
        tmp_path / "c.yaml",
        "--out",
        tmp_path / "m.lists.json",
        check=False,
    )
    assert p.returncode == 1
    assert "ltbench prepare: error: imagenet-lt: the image lists do not match" in p.stderr
    assert f"{tree['test_list']}: 12 images listed, expected 13" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "m.lists.json").exists()


# ---------------------------------------------------------------------------------------------- DAG


def test_large_config_dry_run(tmp_path):
    p = snakemake("-n", "--cores", 1, "--configfile", ROOT / "config" / "large.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stderr + p.stdout
    jobs = job_counts(p.stdout)
    assert jobs["prepare_lists"] == 3 and jobs["train"] == 2 + 2 + 2 + 4
    assert "prepare" not in jobs and "download" not in jobs
    cfg = config.load(ROOT / "config" / "large.yaml")
    spec = config.cell_spec(cfg, "imagenet-lt", "nbn", "resnext50_32x4d")
    assert {k: spec["train"][k] for k in ("epochs", "lr", "batch_size", "weight_decay", "warmup_epochs")} == {
        "epochs": 90,
        "lr": 0.2,
        "batch_size": 512,
        "weight_decay": 5e-4,
        "warmup_epochs": 0,
    }
    assert config.cell_spec(cfg, "imagenet-lt", "baseline+cbn+sbn+dpl", "resnet50")["train"]["lr"] == 0.05
    assert config.cell_spec(cfg, "places-lt", "baseline", "resnet152")["train"]["pretrained"]


def _overlay(tree, tmp_path, **dataset_over):
    cfg = {
        "name": "fake",
        "results_dir": str(tmp_path / "results"),
        "reports_dir": str(tmp_path / "reports"),
        "data_dir": str(tmp_path / "data"),
        "train": {
            "epochs": 2,
            "batch_size": 6,
            "lr": 0.05,
            "warmup_epochs": 0,
            "device": "cpu",
            "workers": 1,
            "threads": 1,
            "checkpoint_every": 0,
        },
        "datasets": {"imagenet-lt": options(tree, **dataset_over)},
        "experiments": {
            "fake": {
                "datasets": ["imagenet-lt"],
                "ratios": [10],
                "methods": ["baseline+cbn+sbn+dpl"],
                "backbones": ["resnet8"],
                "seeds": [0],
            }
        },
    }
    (tmp_path / "fake.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "fake.yaml"


def test_dag_trains_on_the_fake_tree(tree, tmp_path):
    target = (
        tmp_path
        / "results"
        / "runs"
        / "imagenet-lt"
        / "r10"
        / "baseline+cbn+sbn+dpl"
        / "resnet8"
        / "s0"
        / "metrics.json"
    )
    p = snakemake(target, "--cores", 2, "--configfile", _overlay(tree, tmp_path), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = job_counts(p.stdout + p.stderr)
    assert jobs["prepare_lists"] == 1 and jobs["train"] == 1
    m = json.loads(target.read_text())
    assert m["train_counts"] == TRAIN_COUNTS and m["spec"]["train"]["workers"] == 1
    assert len(m["per_class_acc"]) == 4
    assert (tmp_path / "results" / "data" / f"imagenet-lt_r10{imagelists.MANIFEST_SUFFIX}").exists()


def test_dag_fails_before_training_on_bad_lists(tree, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(tree["root"], root)
    (root / "val" / "ILSVRC2012_val_1_2.JPEG").unlink()
    p = snakemake("--cores", 1, "--configfile", _overlay(tree, tmp_path, root=str(root)), cwd=tmp_path)
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert "1 of 12 listed images missing under root" in out and "val/ILSVRC2012_val_1_2.JPEG" in out
    assert not (tmp_path / "results" / "runs").exists()
