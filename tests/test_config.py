import pytest
import yaml

from ltbench import data
from ltbench.errors import ConfigError
from ltbench.spec import config
from ltbench.spec.config import Cell

ROOT = config.Path(__file__).resolve().parent.parent


def grid(**exp):
    e = {"datasets": ["digits-lt"], "ratios": [10], "methods": ["ce"], "backbones": ["resnet8"]}
    e.update(exp)
    return {"experiments": {"e": e}}


@pytest.mark.parametrize(
    "cfg,needle",
    [
        (grid(datasets=["cifar11"]), "experiments.e.datasets[0]: unknown dataset 'cifar11'"),
        (grid(methods=["ce", "nope"]), "experiments.e.methods[1]: unknown method 'nope'"),
        (grid(backbones=["resnet33"]), "experiments.e.backbones[0]: unknown backbone 'resnet33'"),
        (grid(ratios=[0.5]), "experiments.e.ratios[0]: 0.5 is less than the minimum of 1"),
        (grid(ratios=["ten"]), "experiments.e.ratios[0]: 'ten' is not of type 'number'"),
        (grid(seeds=[-1]), "experiments.e.seeds[0]: -1 is less than the minimum of 0"),
        ({**grid(), "train": {"lr": "fast"}}, "train.lr: 'fast' is not of type 'number'"),
        ({**grid(), "train": {"epochz": 3}}, "train: Additional properties are not allowed ('epochz' was unexpected)"),
        (
            {**grid(), "datasets": {"cifar10": {"profile": "zigzag"}}},
            "datasets.cifar10.profile: 'zigzag' is not one of",
        ),
        ({**grid(), "datasets": {"mnist": {}}}, "datasets.mnist: unknown dataset 'mnist'"),
        (
            {**grid(), "methods": {"mine": {"loss": {"name": "hinge"}}}},
            "methods.mine: method 'mine': unknown loss 'hinge'",
        ),
        ({"experiments": {}}, "experiments: {} should be non-empty"),
        (
            {**grid(), "results_dir": "/tmp/x;touch /tmp/PWNED;#"},
            "config key results_dir: '/tmp/x;touch /tmp/PWNED;#' is not an allowed path",
        ),
        ({**grid(), "reports_dir": "r$(id)"}, "config key reports_dir: 'r$(id)' is not an allowed path"),
        ({**grid(), "data_dir": "d\n"}, "config key data_dir: 'd\\n' is not an allowed path"),
        ({**grid(), "data_dir": "d/{x}"}, "config key data_dir: 'd/{x}' is not an allowed path"),
        (
            {**grid(), "datasets": {"imagenet-lt": {"root": "`r`"}}},
            "datasets.imagenet-lt.root: '`r`' is not an allowed",
        ),
        ({**grid(), "train": {"pretrained": "w.pt|sh"}}, "train.pretrained: 'w.pt|sh' is not an allowed path"),
        (grid(seeds=[2**33]), "experiments.e.seeds[0]: 8589934592 is greater than the maximum of 4294967295"),
        ({**grid(), "datasets": {"cifar10": {"subset_seed": -2}}}, "datasets.cifar10.subset_seed: -2 is less than"),
        ({**grid(), "train": {"epochs": 10.0}}, "train.epochs: 10.0 is not of type 'integer'"),
        ({**grid(), "train": {"lr": float("inf")}}, "train.lr: inf is not a finite number"),
        ({}, "'experiments' is a required property"),
    ],
)
def test_bad_config_names_key_and_value(cfg, needle):
    with pytest.raises(ConfigError) as e:
        config.validate(cfg)
    assert needle in str(e.value)


def test_defaults_are_filled():
    c = config.validate(grid())
    assert c["train"]["epochs"] == 200 and c["train"]["schedule"] == "cosine"
    assert c["experiments"]["e"]["seeds"] == [0, 1, 2]
    assert c["results_dir"] == "results/ltbench" and c["datasets"] == {}


def test_cells_are_the_union_of_experiments_each_once():
    c = config.validate(
        {
            "experiments": {
                "a": {
                    "datasets": ["digits-lt"],
                    "ratios": [10, 50],
                    "methods": ["ce"],
                    "backbones": ["resnet8"],
                    "seeds": [0, 1],
                },
                "b": {
                    "datasets": ["digits-lt"],
                    "ratios": [10.0],
                    "methods": ["ce"],
                    "backbones": ["resnet8", "resnet20"],
                    "seeds": [1, 2],
                },
            }
        }
    )
    cells = config.cells(c)
    assert len(cells) == len(set(cells)) == 4 + 4 - 1  # (10, ce, resnet8, s1) is shared
    assert Cell("digits-lt", "10", "ce", "resnet8", 1) in cells
    assert len(config.cells(c, "b")) == 4
    assert cells[0].path == "digits-lt/r10/ce/resnet20/s1"


def test_cell_spec_merge_order():
    c = config.validate(
        {
            **grid(),
            "train": {"lr": 0.2, "epochs": 7},
            "datasets": {"digits-lt": {"train": {"lr": 0.3, "batch_size": 32}}},
            "methods": {"ce-slow": {"train": {"lr": 0.01}}},
        }
    )
    assert config.cell_spec(c, "digits-lt", "ce", "resnet8")["train"]["lr"] == 0.3
    spec = config.cell_spec(c, "digits-lt", "ce-slow", "resnet8")
    assert spec["train"]["lr"] == 0.01 and spec["train"]["batch_size"] == 32 and spec["train"]["epochs"] == 7
    assert spec["recipe"]["loss"]["name"] == "ce"  # defaults filled into the new recipe
    assert spec["dataset_options"]["many_threshold"] == 50  # digits-lt's own thresholds


def test_format_ratio():
    assert data.format_ratio(100.0) == "100" and data.format_ratio(12.5) == "12.5"


@pytest.mark.parametrize("name", ["config.yaml", "demo.yaml"])
def test_shipped_configs_are_valid(name):
    c = config.load(ROOT / "config" / name)
    assert config.cells(c)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiments: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
    bad.write_text(yaml.safe_dump(grid(ratios=[0])))
    with pytest.raises(ConfigError, match=f"{bad}: invalid config"):
        config.load(bad)


def test_paths_with_spaces_are_fine():
    c = config.validate(
        {**grid(), "results_dir": "/tmp/my results", "data_dir": "~/data sets/cifar", "train": {"pretrained": None}}
    )
    assert c["results_dir"] == "/tmp/my results"
