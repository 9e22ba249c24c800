"""The Snakemake DAG: the paper grid dry-runs without data; the demo runs end to end."""

import itertools
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def snakemake(*args, cwd, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_counts(stdout: str) -> dict:
    """The 'job  count' table of a dry run."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stdout, re.M)}


def grid_cells(cfg: dict) -> set:
    """The distinct (dataset, ratio, method, backbone, seed) cells of a config's experiments."""
    keys = ("datasets", "ratios", "methods", "backbones", "seeds")
    out = set()
    for e in cfg["experiments"].values():
        if e.get("protocol") == "published":  # each method runs as its published recipe, `<method>@published`
            e = {**e, "methods": [m if m.endswith("@published") else f"{m}@published" for m in e["methods"]]}
        out |= set(itertools.product(*(e[k] for k in keys)))
    return out


def test_paper_grid_dry_runs_without_data(tmp_path):
    p = snakemake("-n", "--cores", 1, "--configfile", ROOT / "config" / "config.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stderr + p.stdout
    jobs = job_counts(p.stdout)
    cells = grid_cells(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    assert jobs["train"] == len(cells)  # cells shared by several experiments are trained once
    assert jobs["download"] == 2 and jobs["prepare"] == len({(d, r) for d, r, *_ in cells}) and jobs["report"] == 1


def test_bad_config_fails_at_dag_build_naming_the_key(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    cfg["experiments"]["demo"]["methods"] = ["ce", "no-such-method"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    p = snakemake("-n", "--cores", 1, "--configfile", tmp_path / "bad.yaml", cwd=tmp_path)
    assert p.returncode != 0
    assert "experiments.demo.methods[1]: unknown method 'no-such-method'" in p.stdout + p.stderr
    cfg["experiments"]["demo"]["methods"] = ["ce", "m"]
    cfg["methods"] = {"m": {"norm": {"name": "cbn", "options": {"num_components": 0}}}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    p = snakemake("-n", "--cores", 1, "--configfile", tmp_path / "bad.yaml", cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "method 'm': norm 'cbn' option num_components: 0 is less than the minimum of 1" in out
    assert f"(config files: {tmp_path / 'bad.yaml'})" in out


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    cfg.update(
        results_dir=str(tmp_path / "results"), reports_dir=str(tmp_path / "reports"), data_dir=str(tmp_path / "data")
    )
    cfg["train"]["epochs"] = 4
    cfg["experiments"] = {"demo": cfg["experiments"]["demo"]}  # the other experiments: `make demo`
    cfg["experiments"]["demo"]["seeds"] = [0, 1]
    cfg["experiments"]["demo"]["methods"] = ["ce", "nbn", "baseline+cbn+sbn+dpl"]  # nbn: the BN-norms figure
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(cfg))
    p = snakemake("--cores", 2, "--configfile", tmp_path / "demo.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = sorted((tmp_path / "results" / "runs").rglob("metrics.json"))
    assert len(runs) == 2 * 3 * 2  # ratios × methods × seeds
    summary = pd.read_csv(tmp_path / "results" / "aggregate" / "summary.csv", dtype={"ratio": str})
    top1 = summary[(summary.metric == "top1") & (summary.method == "ce")].set_index("ratio")
    assert set(top1.index) == {"10", "50"} and (top1["n"] == 2).all()
    # the aggregate is exactly the mean of what the cells measured
    vals = [json.loads(p.read_text())["top1"] for p in runs if "/r10/ce/" in str(p)]
    assert top1.loc["10", "mean"] == pytest.approx(sum(vals) / len(vals))
    html = (tmp_path / "reports" / "demo.html").read_text()
    assert "data:image/png;base64," in html and f"{top1.loc['10', 'mean']:.2f}" in html
    # the paper details left open are listed with the values used
    assert "Unspecified paper details" in html and "recipe.consistency.pairing" in html
    assert "cross: baseline+cbn+sbn+dpl" in html
    for log in ("logs/aggregate.log", "logs/report.log"):
        assert (tmp_path / "results" / log).exists()
    # nothing left to do: the DAG is complete and a rerun is a no-op
    p = snakemake("-n", "--cores", 1, "--configfile", tmp_path / "demo.yaml", cwd=tmp_path)
    assert "Nothing to be done" in p.stdout + p.stderr
    # a seed added to the finished grid is trained and aggregated (its input was missing, not outdated)
    more = {**cfg, "experiments": {"demo": {**cfg["experiments"]["demo"], "seeds": [0, 1, 2]}}}
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(more))
    jobs = job_counts(snakemake("-n", "--cores", 1, "--configfile", tmp_path / "more.yaml", cwd=tmp_path).stdout)
    assert jobs["train"] == 2 * 3 and jobs["aggregate"] == 1 and jobs["report"] == 1, jobs
    # another config sharing results_dir (its own name, report and experiments) reuses the data and cells
    other = {
        **cfg,
        "name": "other",
        "reports_dir": str(tmp_path / "other-reports"),
        "experiments": {"ce_only": {**cfg["experiments"]["demo"], "methods": ["ce"]}},
    }
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    jobs = job_counts(snakemake("-n", "--cores", 1, "--configfile", tmp_path / "other.yaml", cwd=tmp_path).stdout)
    assert jobs.get("train", 0) == jobs.get("prepare", 0) == 0 and jobs["report"] == 1, jobs
    # Snakemake's own report of the same results, its captions rendered without errors
    p = snakemake("--cores", 1, "--configfile", tmp_path / "demo.yaml", "--report", tmp_path / "smk.zip", cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "Report created" in out and "ERROR/" not in out, out[-3000:]
    with zipfile.ZipFile(tmp_path / "smk.zip") as z:
        names = z.namelist()
    assert any(n.endswith("report.html") for n in names) and any(n.endswith("bn_norms.png") for n in names), names


def test_lint_is_clean(tmp_path):
    p = snakemake("--lint", "--configfile", ROOT / "config" / "demo.yaml", cwd=tmp_path, timeout=120)
    assert p.returncode == 0 and "Congratulations, your workflow is in a good condition" in p.stdout + p.stderr, (
        p.stdout + p.stderr
    )


def test_shell_metacharacters_in_a_path_are_refused_at_dag_build(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    cfg["results_dir"] = f"/tmp/x;touch {tmp_path}/PWNED;#"
    (tmp_path / "evil.yaml").write_text(yaml.safe_dump(cfg))
    p = snakemake("--cores", 1, "--configfile", tmp_path / "evil.yaml", cwd=tmp_path)
    assert p.returncode != 0 and not (tmp_path / "PWNED").exists()
    assert "config key results_dir: '/tmp/x;touch" in p.stdout + p.stderr
    assert "is not an allowed path" in p.stdout + p.stderr


def test_paths_with_spaces_work_quoted(tmp_path):
    """A repository and a results directory with spaces: the prepare rule really runs."""
    repo = tmp_path / "my repo"
    repo.mkdir()
    (repo / "Snakefile").write_text((ROOT / "Snakefile").read_text())
    for d in ("workflow", "ltbench", "config", "envs"):
        (repo / d).symlink_to(ROOT / d)
    cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    cfg.update(
        results_dir=str(tmp_path / "res dir"),
        reports_dir=str(tmp_path / "rep dir"),
        data_dir=str(tmp_path / "data dir"),
    )
    (tmp_path / "sp.yaml").write_text(yaml.safe_dump(cfg))
    target = tmp_path / "res dir" / "data" / "digits-lt_r10_s0.npz"
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}  # ltbench only via the rule's prefix
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(repo / "Snakefile"),
            str(target),
            "--cores",
            "1",
            "--configfile",
            str(tmp_path / "sp.yaml"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert target.is_file() and (tmp_path / "res dir" / "logs" / "prepare" / "digits-lt_r10_s0.log").is_file()
    p = snakemake("-n", "-p", "--cores", 1, "--configfile", tmp_path / "sp.yaml", cwd=tmp_path)
    assert p.returncode == 0 and f"--out '{tmp_path}/res dir/runs/digits-lt/r10/ce/resnet8/s0'" in p.stdout
