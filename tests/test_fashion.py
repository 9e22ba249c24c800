"""fashion-mnist: the IDX reader, where the files are found, integrity errors, the download path,
Fashion-MNIST-LT counts, AutoAugment on 1-channel 28×28 images, and a cell trained on the real files."""

import gzip
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_augment import DEVICES, _images, _tv_autoaugment
from test_download import Server
from test_workflow import ROOT, job_counts, snakemake
from torchvision.transforms import InterpolationMode
from torchvision.transforms import autoaugment as tv_aa

from ltbench import data
from ltbench.data import augment, fashion
from ltbench.errors import ConfigError, DownloadError
from ltbench.spec import config
from ltbench.training import trainer

CANONICAL_R100 = [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
REAL = all((fashion.DEBIAN_DIR / (f.name + ".gz")).is_file() for f in fashion.FILES.values())
needs_real = pytest.mark.skipif(
    not REAL,
    reason=f"Fashion-MNIST not installed in {fashion.DEBIAN_DIR} (Debian: apt-get install {fashion.APT_PACKAGE})",
)


def idx_bytes(a: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[a.dtype]
    return bytes([0, 0, code, a.ndim]) + np.asarray(a.shape, ">u4").tobytes() + a.tobytes()


def tiny_set(folder, gz=True, per_class=3, test_per_class=2):
    """Four crafted IDX files (random 28×28 images) in ``folder``; returns the FILES table for them."""
    rng = np.random.RandomState(0)
    ty = np.repeat(np.arange(10), per_class).astype(np.uint8)
    sy = np.repeat(np.arange(10), test_per_class).astype(np.uint8)
    arrays = {
        "train_x": rng.randint(0, 256, (len(ty), 28, 28)).astype(np.uint8),
        "train_y": ty,
        "test_x": rng.randint(0, 256, (len(sy), 28, 28)).astype(np.uint8),
        "test_y": sy,
    }
    folder.mkdir(parents=True, exist_ok=True)
    table = {}
    for key, f in fashion.FILES.items():
        raw = idx_bytes(arrays[key])
        blob = gzip.compress(raw) if gz else raw
        (folder / (f.name + (".gz" if gz else ""))).write_bytes(blob)
        table[key] = fashion.IdxFile(f.name, hashlib.md5(raw).hexdigest(), len(raw), hashlib.md5(blob).hexdigest())
    return table, arrays


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    monkeypatch.setattr(fashion, "DEBIAN_DIR", tmp_path / "no-debian")


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_plain_and_gzip(tmp_path, gz):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    wide = np.array([[1, -2], [70000, 3]], dtype=">i4")
    for name, a in (("images", images), ("wide", wide)):
        raw = idx_bytes(a)
        path = tmp_path / (name + ".bin")  # gzip is told by the content, not the name
        path.write_bytes(gzip.compress(raw) if gz else raw)
        got = fashion.read_idx(path)
        np.testing.assert_array_equal(got, a)
        assert got.shape == a.shape and got.dtype.isnative


@pytest.mark.parametrize(
    "raw,match",
    [
        (b"\x00\x00\x07\x01" + bytes(8), "not an IDX file"),
        (b"\x01\x00\x08\x01" + bytes(8), "not an IDX file"),
        (b"\x00\x00\x08\x03\x00\x00", "cut short"),
        (idx_bytes(np.zeros((2, 2), np.uint8))[:-1], r"needs 16 bytes, the file has 15"),
        (idx_bytes(np.zeros((2, 2), np.uint8)) + b"\x00", r"needs 16 bytes, the file has 17"),
    ],
)
def test_idx_reader_rejects_malformed_files(tmp_path, raw, match):
    (tmp_path / "bad").write_bytes(raw)
    with pytest.raises(ValueError, match=match):
        fashion.read_idx(tmp_path / "bad")


def test_counts_command_prints_the_canonical_counts(cli):
    out = json.loads(cli("counts", "--dataset", "fashion-mnist", "--ratio", "100").stdout)
    assert out["counts"] == CANONICAL_R100 and out["total"] == 14886
    spec = data.get("fashion-mnist")
    assert (spec.channels, spec.image_size, spec.n_max, spec.num_classes) == (1, 28, 6000, 10)
    groups = data.class_groups(CANONICAL_R100, spec.many_threshold, spec.few_threshold)
    assert groups == ["many"] * 4 + ["medium"] * 3 + ["few"] * 3


@pytest.mark.parametrize("gz", [True, False])
def test_found_in_root_or_data_dir_after_debian(tmp_path, monkeypatch, no_debian, gz):
    table, arrays = tiny_set(tmp_path / "data" / "fashion-mnist", gz=gz)
    monkeypatch.setattr(fashion, "FILES", table)
    tx, ty, sx, sy = fashion.load(tmp_path / "data", {})
    assert tx.shape == (30, 1, 28, 28) and tx.dtype == np.uint8 and ty.dtype == np.int64
    np.testing.assert_array_equal(tx[:, 0], arrays["train_x"])
    np.testing.assert_array_equal(sy, arrays["test_y"])
    # the Debian folder comes first; a configured root replaces both
    debian_table, debian_arrays = tiny_set(fashion.DEBIAN_DIR, gz=gz, per_class=4)
    monkeypatch.setattr(fashion, "FILES", debian_table)
    assert len(fashion.load(tmp_path / "data", {})[1]) == 40
    monkeypatch.setattr(fashion, "FILES", table)
    assert len(fashion.load(tmp_path / "elsewhere", {"root": str(tmp_path / "data" / "fashion-mnist")})[1]) == 30


def test_missing_files_say_how_to_get_them(tmp_path, no_debian):
    (tmp_path / "fashion-mnist").mkdir()
    (tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as e:
        fashion.load(tmp_path, {})
    msg = str(e.value)
    for part in (
        "apt-get install dataset-fashion-mnist",
        fashion.BASE_URL,
        "python -m ltbench download",
        "no-debian (no such folder)",
        "missing train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte",
        "datasets.fashion-mnist.root",
    ):
        assert part in msg, part
    assert "missing train-images" not in msg
    assert f"into {tmp_path / 'fashion-mnist'}" in msg  # where download puts them
    with pytest.raises(FileNotFoundError, match=f"searched {tmp_path / 'mine'} .*into {tmp_path / 'mine'}"):
        fashion.load(tmp_path, {"root": str(tmp_path / "mine")})  # a configured root: the only folder


def test_corrupt_file_names_the_file_expected_md5_and_remedy(tmp_path, no_debian):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for f in fashion.FILES.values():  # the real table: wrong content of the right names
        (folder / f.name).write_bytes(idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    with pytest.raises(DownloadError) as e:
        fashion.load(tmp_path, {})
    msg = str(e.value)
    for part in (
        str(folder / "train-images-idx3-ubyte"),
        "2368 bytes",
        "47040016 bytes",
        "md5 f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "apt-get install --reinstall dataset-fashion-mnist",
        fashion.BASE_URL + "train-images-idx3-ubyte.gz",
    ):
        assert part in msg, part


def test_flipped_byte_and_truncated_gzip_are_corrupt(tmp_path, monkeypatch, no_debian):
    folder = tmp_path / "fashion-mnist"
    table, _ = tiny_set(folder)
    monkeypatch.setattr(fashion, "FILES", table)
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[-1] ^= 1  # same size, other md5
    labels.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(
        DownloadError,
        match=f"t10k-labels-idx1-ubyte.gz is corrupt.*{table['test_y'].size} bytes "
        f"with md5 {hashlib.md5(raw).hexdigest()}; the original",
    ):
        fashion.load(tmp_path, {})
    labels.write_bytes(gzip.compress(bytes(raw))[:-12])
    with pytest.raises(DownloadError, match="t10k-labels-idx1-ubyte.gz is corrupt.*cannot be decompressed"):
        fashion.load(tmp_path, {})


def test_download_fetches_upstream_gz_into_data_dir(tmp_path, monkeypatch, no_debian):
    table, arrays = tiny_set(tmp_path / "upstream")
    monkeypatch.setattr(fashion, "FILES", table)
    server = Server()
    try:
        for f in table.values():
            server.files[f"/fm/{f.name}.gz"] = (tmp_path / "upstream" / (f.name + ".gz")).read_bytes()
        opts = {"url": server.url("/fm/")}
        assert fashion.download(tmp_path / "data", opts) == tmp_path / "data" / "fashion-mnist"
        np.testing.assert_array_equal(fashion.load(tmp_path / "data", {})[0][:, 0], arrays["train_x"])
        server.files.clear()  # a second call finds the files: no network
        fashion.download(tmp_path / "data", opts)
        # a server with other bytes: the upstream .gz md5 check fails, the hint names the apt package
        server.files[f"/fm/{table['train_x'].name}.gz"] = gzip.compress(b"other")
        with pytest.raises(DownloadError, match="md5 mismatch.*apt-get install dataset-fashion-mnist"):
            fashion.download(tmp_path / "other", opts)
    finally:
        server.close()
    with pytest.raises(ConfigError, match="datasets.fashion-mnist.md5"):
        fashion.download(tmp_path / "data", {"md5": "0" * 32})


def test_the_real_constants():
    assert data.get("fashion-mnist").url == "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    assert [f.gz_md5 for f in fashion.FILES.values()] == [  # upstream's (and torchvision's) .gz md5s
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79",
        "bb300cfdad3c16e7a12a480ee83cd310",
    ]
    assert [f.size for f in fashion.FILES.values()] == [47040016, 60008, 7840016, 10008]


def test_fashion_config_dry_runs_the_mini_reproduction(tmp_path):
    cfg = config.load(ROOT / "config" / "fashion.yaml")
    cells = config.cells(cfg)
    methods = {c.method for c in cells}
    assert methods == {
        "ce",
        "balanced-softmax",
        "la",
        "ldam-drw",
        "crt",
        "tau-norm",
        "nbn",
        "baseline",
        "baseline+cbn",
        "baseline+cbn+sbn+dpl",
        "cbn-m1",
        "cbn-m2",
    }
    assert {(c.dataset, c.ratio, c.backbone) for c in cells} == {("fashion-mnist", "100", "resnet8")}
    assert len(cells) == 3 * (len(methods) - 2) + 2  # M = 1 and 2 (the accuracy-vs-M figure): one seed
    assert {e.get("figure") for e in cfg["experiments"].values()} >= {"ablation", "components"}
    p = snakemake("-n", "--cores", 2, "--configfile", ROOT / "config" / "fashion.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    counts = job_counts(p.stdout)
    assert (counts["download"], counts["prepare"], counts["train"], counts["report"]) == (1, 1, len(cells), 1)


def test_fashion_config_reports_its_claims_and_figures(tmp_path):
    """Synthetic metrics for every cell → aggregate → report: the claims the config promises are tested
    and the ablation and accuracy-vs-M figures are drawn."""
    import synthetic

    from ltbench.analysis import aggregate
    from ltbench.report import page

    cfg = config.load(ROOT / "config" / "fashion.yaml", {"results_dir": str(tmp_path), "reports_dir": str(tmp_path)})
    synthetic.write_grid(cfg)
    aggregate.main([], tmp_path / "aggregate", cfg, existing=True)
    page.main(
        tmp_path / "aggregate",
        tmp_path / "fashion.html",
        cfg,
        figures_dir=str(tmp_path / "figures"),
        tables_dir=str(tmp_path / "tables"),
    )
    gains = pd.read_csv(tmp_path / "aggregate" / "gains.csv")
    gains = gains[gains["kind"] == "claim"]
    assert set(zip(gains["claim"], gains["experiment"], strict=True)) == {
        ("nbn-over-ce", "fashion_nbn"),
        ("bs-over-ce", "fashion_bs"),
        ("t2-cbn", "fashion_table2"),
        ("t2-full", "fashion_table2"),
    }
    assert (gains["n_method"] == 3).all() and (gains["n_over"] == 3).all()
    assert (tmp_path / "figures" / "fashion_table2" / "ablation_vs_baseline.png").is_file()
    assert (tmp_path / "figures" / "fashion_fig5" / "components.png").is_file()
    assert "Fashion-MNIST-LT ρ=100" in (tmp_path / "tables" / "fashion_methods.md").read_text()


# ---- AutoAugment on 1-channel 28×28 images: 784 pixels take the lookup-table path (> 256 pixels),
# which the 1-channel 8×8 tests of test_augment.py do not reach. Color is the identity, as in torchvision.


def _real_or_random(n, seed):
    if not REAL:
        return _images(n, 1, 28, 28, seed=seed)
    rng = np.random.RandomState(seed)
    x = fashion.read_idx(fashion.DEBIAN_DIR / "t10k-images-idx3-ubyte.gz")
    return torch.from_numpy(x[rng.choice(len(x), n, replace=False)][:, None].copy())


@pytest.mark.parametrize("name", augment.OP_NAMES)
@pytest.mark.parametrize("real", [False, True])
def test_every_op_on_grayscale_28x28_matches_torchvision(name, real):
    if real and not REAL:
        pytest.skip(f"real images need {fashion.DEBIAN_DIR} (apt-get install {fashion.APT_PACKAGE})")
    bins, signed = augment.magnitude_bins(name, (28, 28))
    mags = [m * s for m in bins.tolist() for s in ((1, -1) if signed else (1,))]
    n = 2 * len(mags)
    x = _real_or_random(n, seed=augment.OP_NAMES.index(name)) if real else _images(n, 1, 28, 28, seed=3)
    m = torch.tensor([mags[i % len(mags)] for i in range(n)], dtype=torch.float64)
    out = augment.OPS[name](x, m)
    ref = torch.stack([tv_aa._apply_op(x[i], name, float(m[i]), InterpolationMode.NEAREST, None) for i in range(n)])
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, ref), f"{name}: {int((out != ref).flatten(1).any(1).sum())} images differ"
    # every other op changes something (AutoContrast is the identity on the 92% of Fashion-MNIST
    # training images whose pixels already span 0..255, so real images need not show it)
    if not (real and name == "AutoContrast"):
        assert torch.equal(out, x) == (name == "Color")


@pytest.mark.parametrize("device", DEVICES)
def test_autoaugment_policy_on_grayscale_28x28_matches_torchvision(device):
    x = _real_or_random(200, seed=9).to(device)
    out = augment.autoaugment(x, torch.Generator(device).manual_seed(4))
    draw = augment.sample_autoaugment(200, (28, 28), torch.Generator(device).manual_seed(4), device=device)
    assert torch.equal(out, _tv_autoaugment(x, draw, 0))


def test_crop_flip_on_grayscale_28x28_is_a_padded_crop():
    x = _real_or_random(20, seed=2)
    out = augment.random_crop_flip(x, 4, torch.Generator().manual_seed(0))
    assert out.shape == (20, 1, 28, 28) and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    views = {
        (oy, ox, f): padded[:, :, oy : oy + 28, ox : ox + 28].flip(3) if f else padded[:, :, oy : oy + 28, ox : ox + 28]
        for oy in range(9)
        for ox in range(9)
        for f in (0, 1)
    }
    found = [[k for k, v in views.items() if torch.equal(v[i], out[i])] for i in range(20)]
    assert all(found), "an output is no 28×28 crop of the zero-padded image (flipped or not)"
    assert len({k[:2] for f in found for k in f}) > 5  # the offsets vary per sample


# ---- the real files ----


@needs_real
def test_prepare_builds_fashion_mnist_lt_like_cifar_lt(tmp_path):
    info = data.prepare("fashion-mnist", 100, tmp_path, tmp_path / "fm.npz")
    assert info["counts"] == CANONICAL_R100 and info["test_total"] == 10000
    tx, ty, _, _ = fashion.load(tmp_path, {})
    with np.load(tmp_path / "fm.npz") as z:
        assert z["train_x"].shape == (14886, 1, 28, 28) and z["test_x"].shape == (10000, 1, 28, 28)
        np.testing.assert_array_equal(np.bincount(z["train_y"]), CANONICAL_R100)
        np.testing.assert_array_equal(np.bincount(z["test_y"]), [1000] * 10)
        np.testing.assert_array_equal(z["subset_indices"], data.longtail_indices(ty, CANONICAL_R100, 0))
        np.testing.assert_array_equal(z["train_x"], tx[z["subset_indices"]])


@needs_real
@pytest.mark.slow
def test_a_cell_trains_on_the_real_files(tmp_path):
    """The real files → Fashion-MNIST-LT (ρ = 100) → a ResNet-8 epoch; for speed on 2 shared CPU cores
    the prepared subset is cut to ≤ 100 training images per class and 100 test images per class."""
    data.prepare("fashion-mnist", 100, tmp_path, tmp_path / "full.npz")
    with np.load(tmp_path / "full.npz") as z:
        tr = np.concatenate([np.where(z["train_y"] == c)[0][:100] for c in range(10)])
        te = np.concatenate([np.where(z["test_y"] == c)[0][:100] for c in range(10)])
        counts = np.bincount(z["train_y"][tr])
        np.savez(
            tmp_path / "small.npz",
            train_x=z["train_x"][tr],
            train_y=z["train_y"][tr],
            test_x=z["test_x"][te],
            test_y=z["test_y"][te],
            counts=counts,
            subset_indices=z["subset_indices"][tr],
        )
    cfg = config.validate(
        {
            "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "warmup_epochs": 0, "device": "cpu"},
            "experiments": {
                "e": {
                    "datasets": ["fashion-mnist"],
                    "ratios": [100],
                    "methods": ["ce", "baseline"],
                    "backbones": ["resnet8"],
                }
            },
        }
    )
    # ce, and the baseline's strong view: crop + flip + AutoAugment on the grayscale images
    for method, epochs in (("ce", 2), ("baseline", 1)):
        m = trainer.run(
            config.cell_spec(cfg, "fashion-mnist", method, "resnet8"),
            100,
            0,
            tmp_path / "small.npz",
            tmp_path / method,
            {"epochs": epochs},
        )
        assert m["train_counts"] == [100] * 9 + [60] and len(m["per_class_acc"]) == 10
        assert m["top1"] > {"ce": 40.0, "baseline": 15.0}[method], (method, m["top1"])  # chance: 10%
