"""Bad input ends with one line naming the file or flag and what is wrong, a non-zero exit and no
traceback: one table of cases over every subcommand (extend it), then the workflow's config check.

Each case builds its inputs in a fresh folder and gives ``ltbench`` arguments; the message must be
one line ``ltbench <subcommand>: error: ...`` containing the needle."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from test_workflow import ROOT, snakemake

from ltbench import cli, data
from ltbench.errors import ConfigError
from ltbench.spec import config, safeyaml

GRID = {"e": {"datasets": ["digits-lt"], "ratios": [10], "methods": ["ce"], "backbones": ["resnet8"], "seeds": [0]}}
TRAIN = ["train", "--dataset", "digits-lt", "--ratio", "10", "--backbone", "resnet8"]


def write(path, text):
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return path


def cfg_file(d, **top):
    return write(d / "c.yaml", yaml.safe_dump({"experiments": GRID, **top}))


def prepared(d, ratio=10, **change):
    """A prepared digits-lt file, with arrays replaced by ``change`` (None: dropped)."""
    data.prepare("digits-lt", ratio, d, d / "ok.npz", {})
    with np.load(d / "ok.npz") as z:
        arrays = {k: z[k] for k in z.files}
    for k, v in change.items():
        arrays.pop(k) if v is None else arrays.__setitem__(k, v(arrays) if callable(v) else v)
    np.savez(d / "p.npz", **arrays)
    return d / "p.npz"


def truncated(d):
    data.prepare("digits-lt", 10, d, d / "ok.npz", {})
    return write(d / "p.npz", (d / "ok.npz").read_bytes()[:5000])


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)

# (id, argv(tmp_path) -> list, needle)
CASES = [
    # config files
    ("top_level_list", lambda d: ["plan", "--configfile", write(d / "c.yaml", "- 1\n- 2\n")], "top level must be a"),
    ("not_utf8", lambda d: ["plan", "--configfile", write(d / "c.yaml", b"name: \xff\xfe\n")], "is not UTF-8 text"),
    ("a_directory", lambda d: ["plan", "--configfile", d], "is a directory, not a YAML file"),
    ("missing_file", lambda d: ["plan", "--configfile", d / "nope.yaml"], "nope.yaml does not exist"),
    (
        "duplicate_key",
        lambda d: [
            "plan",
            "--configfile",
            write(d / "c.yaml", cfg_file(d).read_text() + "train: {epochs: 3}\ntrain: {lr: 1}\n"),
        ],
        "duplicate key 'train': first on line",
    ),
    ("billion_laughs", lambda d: ["plan", "--configfile", write(d / "c.yaml", LAUGHS)], "a 'billion laughs'?"),
    ("recursive_alias", lambda d: ["plan", "--configfile", write(d / "c.yaml", "a: &a [1, *a]\n")], "recursive alias"),
    (
        "warmup_not_below_epochs",
        lambda d: ["plan", "--configfile", cfg_file(d, train={"epochs": 5, "warmup_epochs": 5})],
        "train.warmup_epochs 5 is not below train.epochs 5",
    ),
    (
        "recipe_warmup_not_below_epochs",
        lambda d: [
            "plan",
            "--configfile",
            cfg_file(
                d,
                train={"epochs": 10, "warmup_epochs": 1},
                methods={"m": {"extends": "ce", "train": {"warmup_epochs": 12}}},
                experiments={"e": {**GRID["e"], "methods": ["m"]}},
            ),
        ],
        "method 'm': train.warmup_epochs 12 is not below train.epochs 10",
    ),
    (
        "unknown_paper",
        lambda d: [
            "plan",
            "--configfile",
            cfg_file(d, experiments={"e": {**GRID["e"], "reference": {"paper": "cbn"}}}),
        ],
        "experiments.e.reference.paper: unknown paper 'cbn'",
    ),
    (
        "unknown_table",
        lambda d: [
            "plan",
            "--configfile",
            cfg_file(d, experiments={"e": {**GRID["e"], "reference": {"paper": "cbn2022", "table": 9}}}),
        ],
        "experiments.e.reference.table: reference 'cbn2022' has no table 9; its tables: 2, 3",
    ),
    (
        "reference_file_with_bad_yaml",
        lambda d: [
            "plan",
            "--configfile",
            cfg_file(d, experiments={"e": {**GRID["e"], "reference": {"paper": str(write(d / "r.yaml", "a: [\n"))}}}),
        ],
        "r.yaml: not valid YAML",
    ),
    # command-line values
    ("spec_not_json", lambda d: [*TRAIN, "--out", d / "cell", "--spec", "{oops"], "argument --spec: not valid JSON"),
    ("spec_not_a_spec", lambda d: [*TRAIN, "--out", d / "cell", "--spec", "[]"], "a cell spec must be a JSON object"),
    ("unknown_dataset", lambda d: ["counts", "--dataset", "x", "--ratio", "2"], "unknown dataset 'x'"),
    (
        "config_json_not_json",
        lambda d: ["prepare", "--dataset", "digits-lt", "--ratio", "10", "--out", d / "x.npz", "--config-json", "{"],
        "argument --config-json: not valid JSON",
    ),
    (
        "epochs_below_warmup",
        lambda d: [*TRAIN, "--out", d / "cell", "--epochs", "1"],
        "argument --epochs: 1 is not above train.warmup_epochs 5",
    ),
    (
        "warmup_flag_not_below_epochs",
        lambda d: [*TRAIN, "--out", d / "cell", "--epochs", "3", "--warmup-epochs", "3"],
        "argument --warmup-epochs: 3 is not below --epochs 3",
    ),
    ("bench_steps_0", lambda d: ["bench", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (
        "bench_rounds_0",
        lambda d: ["bench", "--compare", "ce", "--rounds", "0"],
        "argument --rounds: must be at least 1",
    ),
    (
        "aggregate_missing_path",
        lambda d: ["aggregate", d / "no" / "metrics.json", "--out-dir", d / "a"],
        "does not exist",
    ),
    # prepared data (checked before any training)
    ("npz_truncated", lambda d: [*TRAIN, "--out", d / "cell", "--data", truncated(d)], "cannot be read"),
    (
        "npz_labels_out_of_range",
        lambda d: [*TRAIN, "--out", d / "cell", "--data", prepared(d, train_y=lambda a: a["train_y"] + 3)],
        "train_y has labels 3..12; digits-lt has classes 0..9",
    ),
    (
        "npz_other_ratio",
        lambda d: [*TRAIN, "--out", d / "cell", "--data", prepared(d, ratio=50)],
        "does not hold digits-lt at ratio 10 (exp profile): per-class training counts [120, 77,",
    ),
    (
        "npz_other_image_shape",
        lambda d: [*TRAIN, "--out", d / "cell", "--data", prepared(d, test_x=lambda a: a["test_x"][:, :, :4])],
        "test_x (500, 1, 4, 8)",
    ),
    (
        "npz_missing_array",
        lambda d: [*TRAIN, "--out", d / "cell", "--data", prepared(d, counts=None)],
        "lacks the array(s) counts",
    ),
]
if not torch.cuda.is_available():
    CASES.append(
        (
            "device_cuda_without_gpu",
            lambda d: [
                *TRAIN,
                "--out",
                d / "cell",
                "--data",
                prepared(d),
                "--epochs",
                "2",
                "--warmup-epochs",
                "0",
                "--device",
                "cuda",
            ],
            "train.device (--device) is 'cuda' but no CUDA device is available",
        )
    )


@pytest.mark.parametrize("argv,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(capsys, tmp_path, argv, needle):
    args = [str(a) for a in argv(tmp_path)]
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse
        code = e.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (code, lines)
    assert len(lines) == 1 and lines[0].startswith(f"ltbench {args[0]}: error: ") and needle in lines[0], lines
    assert not (tmp_path / "cell" / "metrics.json").exists()  # nothing trained


def test_a_bad_input_run_as_a_command_prints_no_traceback(tmp_path):
    """The same through `python -m ltbench` (a subprocess): one line on stderr, exit 2."""
    p = subprocess.run(
        [sys.executable, "-m", "ltbench", "plan", "--configfile", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert (
        p.returncode == 2
        and p.stderr.strip() == f"ltbench plan: error: config file {tmp_path} is a directory, not a YAML file"
    )


def test_a_bug_keeps_its_traceback_and_LTBENCH_TRACEBACK_shows_bad_inputs_too(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "cmd_plan", lambda a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["plan"])
    monkeypatch.undo()
    monkeypatch.setenv("LTBENCH_TRACEBACK", "1")
    with pytest.raises(ConfigError, match="is a directory"):
        cli.main(["plan", "--configfile", str(tmp_path)])


def test_duplicate_key_names_the_key_and_both_lines(tmp_path):
    text = "name: a\ntrain:\n  epochs: 3\nexperiments: {}\ntrain:\n  lr: 1\n"
    with pytest.raises(
        ConfigError, match=r"line 5, column 1: .*duplicate key 'train': first on line 2, again on line 5"
    ):
        config.read_yaml(write(tmp_path / "c.yaml", text))
    # nested mappings too; keys merged from an anchor may still be overridden (YAML's `<<`)
    with pytest.raises(ConfigError, match="duplicate key 'lr': first on line 1, again on line 1"):
        config.read_yaml(write(tmp_path / "c.yaml", "train: {lr: 1, lr: 2}\n"))
    base = "base: &b {epochs: 3, lr: 1}\ntrain:\n  <<: *b\n  lr: 2\n"
    assert config.read_yaml(write(tmp_path / "c.yaml", base))["train"] == {"epochs": 3, "lr": 2}


def test_alias_expansion_is_bounded_and_shared_aliases_still_load(tmp_path):
    assert safeyaml.load("a: &a [1, 2]\nb: [*a, *a]\n") == {"a": [1, 2], "b": [[1, 2], [1, 2]]}
    node = yaml.compose(LAUGHS)
    assert safeyaml.expanded_size(node) > 10**9  # computed without expanding
    with pytest.raises(yaml.YAMLError, match="its aliases expand to 1,234,567,909 values, more than 100,000"):
        safeyaml.load(LAUGHS)


# ---- the workflow's config check: the same refusals at DAG build (snakemake -n) ----


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda t: t + "\ntrain: {epochs: 2}\n", "duplicate key 'train': first on line"),
        (
            lambda t: t.replace("reference: {paper: nbn2025}", "reference: {paper: nbn2025, table: 42}"),
            "has no table 42",
        ),
        (
            lambda t: t.replace("warmup_epochs: 2", "warmup_epochs: 10"),
            "train.warmup_epochs 10 is not below train.epochs 10",
        ),
    ],
    ids=["duplicate_key", "unknown_table", "warmup"],
)
def test_the_workflow_refuses_the_same_configs_before_any_job(tmp_path, mutate, needle):
    text = (ROOT / "config" / "demo.yaml").read_text()
    bad = write(tmp_path / "bad.yaml", mutate(text))
    p = snakemake("-n", "--cores", 1, "--configfile", bad, cwd=tmp_path, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and needle in out and "Traceback" not in out, out[-2000:]
