"""Bad values are caught before a job starts: recipe options at DAG build (config validation),
command-line flags in the CLI (exit 2, one line, no traceback), YAML syntax errors with file and line."""

import pytest

from ltbench import cli
from ltbench.errors import ConfigError
from ltbench.nn import losses, norm
from ltbench.spec import catalog, config, methods


def grid(method="m", recipe=None, **train):
    cfg = {
        "experiments": {"e": {"datasets": ["digits-lt"], "ratios": [10], "methods": [method], "backbones": ["resnet8"]}}
    }
    if recipe is not None:
        cfg["methods"] = {method: recipe}
    if train:
        cfg["train"] = train
    return cfg


def test_every_option_has_a_constraint_that_its_default_meets():
    for kind, defaults, constraints in (
        ("norm", catalog.NORMS, catalog.NORM_OPTIONS),
        ("loss", catalog.LOSSES, catalog.LOSS_OPTIONS),
    ):
        assert set(constraints) == set(defaults)
        for name, opts in defaults.items():
            assert set(constraints[name]) == set(opts), (kind, name)
            assert config.schema_errors(opts, catalog.options_schema(kind, name)) == [], (kind, name)
    assert catalog.NORM_OPTIONS["nbn"]["alpha"]["enum"] == list(norm.ALPHA_MODES)
    assert catalog.LOSS_OPTIONS["ce"]["weighting"]["enum"] == list(losses.WEIGHTINGS)
    for name in methods.available():  # every built-in recipe passes
        config.check_recipe(name, methods.recipe(name))


@pytest.mark.parametrize(
    "recipe,needle",
    [
        *[
            ({"norm": {"name": "cbn", "options": {"num_components": v}}}, f"norm 'cbn' option num_components: {s}")
            for v, s in (
                (0, "0 is less than the minimum of 1"),
                (-3, "-3 is less than"),
                (2.5, "2.5 is not of type 'integer'"),
                ("four", "'four' is not of type 'integer'"),
                (10**9, "1000000000 is greater than the maximum of 64"),
                (4.0, "4.0 is not of type 'integer'"),
                (True, "True is not of type 'integer'"),
            )
        ],
        ({"norm": {"name": "nbn", "options": {"alpha": "both"}}}, "norm 'nbn' option alpha: 'both' is not one of"),
        ({"loss": {"name": "focal", "options": {"gamma": "high"}}}, "loss 'focal' option gamma: 'high' is not of type"),
        ({"loss": {"name": "ldam", "options": {"s": 0}}}, "loss 'ldam' option s: 0 is less than or equal to"),
        ({"loss": {"name": "ce", "options": {"beta": 1.0}}}, "loss 'ce' option beta: 1.0 is greater than or equal to"),
        (
            {"extends": "crt", "decoupled": {"fraction": 0.001}},
            "decoupled.fraction 0.001 leaves no classifier epoch of train.epochs 200",
        ),
        (
            {"extends": "crt", "decoupled": {"fraction": 0.999}},
            "decoupled.fraction 0.999 leaves no representation epoch",
        ),
    ],
)
def test_bad_recipe_values_name_method_key_and_value(recipe, needle):
    with pytest.raises(ConfigError) as e:
        config.validate(grid(recipe=recipe))
    assert "method 'm'" in str(e.value) and needle in str(e.value)


def test_a_builtin_recipe_with_too_few_epochs_for_its_stages_is_refused():
    with pytest.raises(
        ConfigError, match="method 'crt': decoupled.fraction 0.2 leaves no classifier epoch of train.epochs 2"
    ):
        config.validate(grid("crt", epochs=2, warmup_epochs=0))
    config.validate(grid("crt", epochs=3, warmup_epochs=0))  # round(0.6) = 1 classifier epoch


@pytest.mark.parametrize(
    "ratio,needle",
    [
        (float("nan"), "experiments.e.ratios[0]: nan is not a finite number"),
        (float("inf"), "experiments.e.ratios[0]: inf is not a finite number"),
        (1e6, "experiments.e.ratios[0]: imbalance ratio 1e+06 leaves 6 class(es) of digits-lt without training images"),
        (121, "leaves 1 class(es) of digits-lt"),
    ],
)
def test_a_ratio_that_empties_a_class_is_refused(ratio, needle):
    cfg = grid("ce")
    cfg["experiments"]["e"]["ratios"] = [ratio]
    with pytest.raises(ConfigError) as e:
        config.validate(cfg)
    assert needle in str(e.value)


def run_cli(capsys, *argv):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--epochs", "0"], "argument --epochs: 0 is less than the minimum of 1"),
        (["--epochs", "-2"], "argument --epochs: -2 is less than the minimum of 1"),
        (["--epochs", "2.5"], "argument --epochs: not an integer: '2.5'"),
        (["--batch-size", "0"], "argument --batch-size: 0 is less than the minimum of 2"),
        (["--lr", "-0.1"], "argument --lr: -0.1 is less than or equal to the minimum of 0"),
        (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
        (["--seed", "-1"], "argument --seed: -1 is less than the minimum of 0"),
        (["--seed", str(2**33)], "argument --seed: 8589934592 is greater than the maximum of 4294967295"),
        (["--threads", "-1"], "argument --threads: -1 is less than the minimum of 0"),
        (["--ratio", "nan"], "argument --ratio: must be a finite number, got nan"),
        (["--ratio", "inf"], "argument --ratio: must be a finite number, got inf"),
        (["--ratio", "1e6"], "imbalance ratio 1e+06 leaves 6 class(es) of digits-lt without training images"),
        (
            ["--method", "crt", "--epochs", "2", "--warmup-epochs", "0"],
            "method 'crt': decoupled.fraction 0.2 leaves no classifier epoch of train.epochs 2",
        ),
    ],
)
def test_bad_train_flags_are_one_line_errors(capsys, tmp_path, flags, needle):
    argv = ["train", "--dataset", "digits-lt", "--backbone", "resnet8", "--out", tmp_path / "cell", *flags]
    if "--ratio" not in flags:
        argv += ["--ratio", "10"]
    code, err = run_cli(capsys, *argv)
    assert code == 2 and f"ltbench train: error: {needle}" in err and "Traceback" not in err, err
    assert not (tmp_path / "cell").exists()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["counts", "--dataset", "cifar10", "--ratio", "1e6"], "ltbench counts: error: imbalance ratio 1e+06 leaves"),
        (
            ["prepare", "--dataset", "digits-lt", "--ratio", "500", "--out", "x.npz"],
            "ltbench prepare: error: imbalance",
        ),
        (
            ["prepare", "--dataset", "digits-lt", "--ratio", "10", "--subset-seed", "-1", "--out", "x.npz"],
            "argument --subset-seed: -1 is less than the minimum of 0",
        ),
    ],
)
def test_other_commands_check_ratio_and_seed(capsys, argv, needle):
    code, err = run_cli(capsys, *argv)
    assert code == 2 and needle in err, err


def test_a_yaml_syntax_error_names_file_line_and_column(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiments:\n  e: {datasets: [digits-lt]\n  other: 1\n")
    with pytest.raises(ConfigError, match=f"config file {bad}, line 3, column 3: not valid YAML"):
        config.load(bad)
    code, err = run_cli(capsys, "plan", "--configfile", bad)
    assert code == 2 and f"ltbench plan: error: config file {bad}, line 3, column 3" in err


def test_git_dirty_flags_code_changes_not_regenerated_reports(tmp_path, monkeypatch):
    import subprocess

    import ltbench
    from ltbench import io as ltio

    repo = tmp_path / "repo"
    for rel in ("ltbench/__init__.py", "reports/r.html", "docs/d.md", "config/c.yaml"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("v1\n")

    def git(*a):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=repo, check=True, capture_output=True
        )

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "init")
    monkeypatch.setattr(ltbench, "__file__", str(repo / "ltbench" / "__init__.py"))
    assert ltio.code_version()["git_dirty"] is False
    (repo / "reports" / "r.html").write_text("regenerated\n")
    (repo / "docs" / "d.md").write_text("edited\n")
    assert ltio.code_version()["git_dirty"] is False
    (repo / "config" / "c.yaml").write_text("edited\n")
    assert ltio.code_version()["git_dirty"] is True
    git("checkout", "--", "config")
    (repo / "ltbench" / "__init__.py").write_text("edited\n")
    assert ltio.code_version()["git_dirty"] is True
