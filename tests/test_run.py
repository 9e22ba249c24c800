"""Sequential seed designs in the config, the grid file, and the driver `ltbench run --until-decided`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ltbench import cli
from ltbench.analysis import sequential
from ltbench.errors import ConfigError
from ltbench.spec import config, seeds
from ltbench.tools import run

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, design: dict | None = None) -> dict:
    """Three methods on digits-lt, 1 epoch: `ce-again` trains exactly as `ce` (a gain of exactly 0:
    "no gain" at the first look), `balanced-softmax` differs by chance (undecided at 2 seeds)."""
    return {
        "name": "seqtest",
        "results_dir": str(tmp_path / "results"),
        "reports_dir": str(tmp_path / "reports"),
        "data_dir": str(tmp_path / "data"),
        "train": {"epochs": 1, "batch_size": 64, "warmup_epochs": 0, "eval_every": 1, "checkpoint_every": 0},
        "datasets": {"digits-lt": {"profile": "exp", "subset_seed": 0}},
        "methods": {"ce-again": {"description": "cross-entropy again (trains as ce)", "extends": "ce"}},
        "experiments": {
            "seq": {
                "datasets": ["digits-lt"],
                "ratios": [10],
                "methods": ["ce", "ce-again", "balanced-softmax"],
                "backbones": ["resnet8"],
                "seeds": design or {"initial": 2, "max": 3, "step": 1},
                "figure": "sensitivity",
            }
        },
    }


def test_sequential_seeds_follow_the_grid_file(tmp_path):
    raw = _config(tmp_path, {"initial": 3, "max": 8, "step": 2})
    cfg = config.validate(raw)
    assert cfg["experiments"]["seq"]["sequential"]["spending"] == "obrien-fleming"
    assert {c.seed for c in config.cells(cfg)} == {0, 1, 2}
    key = seeds.cell_key("digits-lt", "10", "balanced-softmax", "resnet8")
    path = seeds.state_path(cfg)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"round": 1, "experiments": {"seq": {"cells": {key: 5}}}}))
    cfg = config.validate(raw)
    by_method = {m: sorted(c.seed for c in config.cells(cfg) if c.method == m) for m in ("ce", "balanced-softmax")}
    assert by_method == {"ce": [0, 1, 2], "balanced-softmax": [0, 1, 2, 3, 4]}
    assert config.validate(json.loads(json.dumps(cfg))) == cfg  # the JSON Snakemake passes validates the same
    path.write_text(json.dumps({"experiments": {"seq": {"cells": {key: 9}}}}))
    with pytest.raises(ConfigError, match=r"seqtest.json: experiments.seq.cells.*= 9 .*\[3, 8\]"):
        config.validate(raw)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="sequential grid file .*seqtest.json: not readable JSON"):
        config.validate(raw)


def test_bad_designs_name_the_key(tmp_path):
    for design, msg in (
        ({"initial": 1, "max": 3}, "seeds.initial: 1 is less than the minimum of 2"),
        ({"initial": 4, "max": 3}, "experiments.seq.seeds: seeds.max \\(3\\) must be at least"),
        ({"initial": 3, "max": 5, "spending": "linear"}, "seeds.spending: 'linear' is not one of"),
        ({"initial": 3}, "'max' is a required property"),
    ):
        with pytest.raises(ConfigError, match=msg):
            config.validate(_config(tmp_path, design))


def test_run_passes_unknown_arguments_to_snakemake():
    args, extra = cli.build_parser().parse_known_args(
        ["run", "--configfile", "c.yaml", "--until-decided", "--cores", "2", "--config", "x=1", "-n"]
    )
    assert args.configfile == "c.yaml" and args.until_decided
    assert extra == ["--cores", "2", "--config", "x=1", "-n"]
    cmd = run.snakemake_command("c.yaml", extra)
    assert cmd[1:4] == ["-m", "snakemake", "--configfile"] and cmd[-1] == "--rerun-incomplete"
    assert run.snakemake_command("c.yaml", ["--profile", "p", "--rerun-incomplete"]).count("--rerun-incomplete") == 1
    with pytest.raises(SystemExit):
        cli.main(["plan", "--configfile", "c.yaml", "--cores", "2"])


def test_needed_seeds_and_extend(tmp_path):
    cfg = config.validate(_config(tmp_path, {"initial": 2, "max": 6, "step": 2}))
    rng = np.random.default_rng(0)
    rows = [
        {**dict(dataset="digits-lt", ratio="10", method=m, backbone="resnet8", metric="top1"), "seed": s, "value": v}
        for m, vals in (("ce", [50.0, 51.0]), ("ce-again", [50.0, 51.0]), ("balanced-softmax", rng.normal(52, 3, 2)))
        for s, v in enumerate(vals)
    ]
    looks = sequential.table(pd.DataFrame(rows), cfg)
    need = sequential.needed_seeds(looks)
    bs, ce = (seeds.cell_key("digits-lt", "10", m, "resnet8") for m in ("balanced-softmax", "ce"))
    assert need == {"seq": {bs: 4, ce: 4}}  # ce-again is decided ("no gain"): it gets no seeds
    state = run.extend({"experiments": {"seq": {"cells": {bs: 6}}}}, need, 2)
    assert state == {"round": 2, "experiments": {"seq": {"cells": {bs: 6, ce: 4}}}}
    assert run._added_runs(cfg, state) == 4 + 2  # balanced-softmax s2..s5, ce s2, s3


def _driver(cfg_path: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ltbench", "run", "--configfile", str(cfg_path), "--until-decided"]
    cmd += ["-s", str(ROOT / "Snakefile"), "--cores", "2", "-q"]
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 600) -> None:
    end = time.time() + timeout
    while not pred():
        assert proc.poll() is None, f"the driver ended early:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < end, "timed out"
        time.sleep(0.5)


@pytest.mark.slow
def test_until_decided_end_to_end_with_a_killed_driver(tmp_path):
    """Round 1 trains 2 seeds; `ce-again` vs `ce` is decided ("no gain": identical training), so
    `ce-again` stays at 2 seeds while `balanced-softmax` and `ce` get a third. The driver is killed
    (SIGKILL to its process group) while round 2 trains; a rerun resumes without retraining anything."""
    cfg_path = tmp_path / "seq.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tmp_path)))
    results = tmp_path / "results"
    state_file = results / "sequential" / "seqtest.json"
    logs = results / "logs" / "train" / "digits-lt" / "r10"
    proc = _driver(cfg_path, tmp_path)
    _wait_for(lambda: state_file.exists() and any(logs.glob("*/resnet8/s2.log")), proc)
    os.killpg(proc.pid, signal.SIGKILL)  # driver, snakemake and its jobs: nothing can clean up
    proc.wait(timeout=120)
    first = {p: p.stat().st_mtime_ns for p in (results / "runs").rglob("metrics.json")}
    assert len(first) >= 6
    state = json.loads(state_file.read_text())
    bs, ce = (seeds.cell_key("digits-lt", "10", m, "resnet8") for m in ("balanced-softmax", "ce"))
    assert state == {"round": 1, "experiments": {"seq": {"cells": {bs: 3, ce: 3}}}}

    proc = _driver(cfg_path, tmp_path)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    assert "ltbench run: round 2" in out and "done: every verdict decided" in out
    metrics = sorted(str(p.relative_to(results / "runs")) for p in (results / "runs").rglob("metrics.json"))
    assert [m for m in metrics if "/ce-again/" in m] == [
        f"digits-lt/r10/ce-again/resnet8/s{s}/metrics.json" for s in (0, 1)
    ]
    assert sum("/s2/" in m for m in metrics) == 2 and len(metrics) == 8
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # nothing trained is retrained
    looks = pd.read_csv(results / "aggregate" / "sequential.csv")
    decided = looks.drop_duplicates("test", keep="last").set_index("method")["decision"]
    assert decided["ce-again"] == "no gain"
    assert decided["balanced-softmax"] in ("gain", "below", "no gain", "undecided at max")
    assert (looks[looks.method == "balanced-softmax"]["n"].tolist()) == [2, 3]
    assert "Sequential verdicts" in (tmp_path / "reports" / "seqtest.html").read_text()
    # a plain snakemake afterwards sees the same grid: nothing to do
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dry = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-n", "--cores", "1"]
        + ["--configfile", str(cfg_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-2000:]


def test_plan_prices_a_sequential_experiment(tmp_path):
    from ltbench.tools import plan

    cfg = config.validate(_config(tmp_path, {"initial": 2, "max": 6, "step": 2}))
    p = plan.plan(cfg)
    (q,) = p["sequential"]
    per_run = q["least_hours"] / q["least_runs"]  # every cell costs the same here (one backbone, dataset)
    assert (q["cells"], q["least_runs"], q["most_runs"], q["now_runs"], q["expected_runs"]) == (3, 6, 18, 6, 18)
    assert q["most_hours"] == pytest.approx(18 * per_run) and q["expected_basis"] == "max"
    # after a look: ce-again is decided at 2 seeds; balanced-softmax (and ce under it) undecided
    rows = [
        {**dict(dataset="digits-lt", ratio="10", method=m, backbone="resnet8", metric="top1"), "seed": s, "value": v}
        for m, vals in (("ce", [50.0, 51.0]), ("ce-again", [50.0, 51.0]), ("balanced-softmax", [53.0, 49.0]))
        for s, v in enumerate(vals)
    ]
    agg = tmp_path / "results" / "aggregate"
    agg.mkdir(parents=True)
    sequential.table(pd.DataFrame(rows), cfg).to_csv(agg / "sequential.csv", index=False)
    (q,) = plan.plan(cfg)["sequential"]
    assert q["expected_basis"] == "3 of 3 cells from sequential.csv"
    assert 2 + 2 * 2 < q["expected_runs"] < 2 + 2 * 6  # ce-again: 2; the other two between 2 and 6 seeds
    assert "Sequential seq (seeds 2 to 6, step 2, 3 cells)" in plan.format_text(plan.plan(cfg))


def test_a_test_whose_runs_failed_is_untested_not_waiting(tmp_path):
    cfg = config.validate(_config(tmp_path, {"initial": 2, "max": 4, "step": 2}))
    rows = [  # balanced-softmax has no runs (its cells failed): nothing to add for it
        {**dict(dataset="digits-lt", ratio="10", method=m, backbone="resnet8", metric="top1"), "seed": s, "value": v}
        for m in ("ce", "ce-again")
        for s, v in enumerate([50.0, 52.0])
    ]
    looks = sequential.table(pd.DataFrame(rows), cfg)
    decision = looks.set_index("method")["decision"]
    assert decision["balanced-softmax"] == "untested" and decision["ce-again"] == "no gain"
    assert sequential.needed_seeds(looks) == {}


def test_reproduction_tests_against_the_paper(tmp_path):
    """Paper cells: ours − the paper's value per seed; "reproduced" (TOST) is checked first, and a
    clear difference is "not reproduced", both at the first look when the spread is tiny."""
    raw = _config(tmp_path, {"initial": 3, "max": 5, "step": 2, "spending": "pocock"})
    raw["datasets"] = {"cifar10": {}}
    raw["experiments"] = {
        "t2": {
            "datasets": ["cifar10"],
            "ratios": [100],
            "methods": ["baseline", "baseline+sbn"],
            "backbones": ["resnet32"],
            "seeds": raw["experiments"]["seq"]["seeds"],
            "reference": {"paper": "cbn2022", "table": 2},
        }
    }
    cfg = config.validate(raw)
    values = {
        "baseline": [81.9, 81.85, 81.88],
        "baseline+sbn": [78.0, 78.2, 77.9],
    }  # paper: 81.87, 82.03
    rows = [
        {**dict(dataset="cifar10", ratio="100", method=m, backbone="resnet32", metric=metric), "seed": s, "value": v}
        for m, vals in values.items()
        for metric in ("top1", "many", "medium", "few")
        for s, v in enumerate(vals)
    ]
    looks = sequential.table(pd.DataFrame(rows), cfg)
    repro = looks[(looks["kind"] == "reproduction") & (looks["metric"] == "top1")].set_index("method")
    assert repro.loc["baseline", "decision"] == "reproduced" and repro.loc["baseline", "paper_value"] == 81.87
    assert repro.loc["baseline+sbn", "decision"] == "not reproduced" and repro.loc["baseline+sbn", "n"] == 3
    assert (repro["estimate"] < 0.1).all() and repro.loc["baseline+sbn", "estimate"] == pytest.approx(
        78.0333 - 82.03, abs=1e-3
    )


def _diverged_json(cfg: dict, cell: config.Cell, commit: str) -> None:
    """What the trainer writes for a diverged cell (the spec with the train rule's --threads)."""
    spec = config.cell_spec(cfg, cell.dataset, cell.method, cell.backbone)
    spec = {**spec, "train": {**spec["train"], "threads": 1}}
    d = Path(cfg["results_dir"]) / "runs" / cell.path
    d.mkdir(parents=True, exist_ok=True)
    (d / "diverged.json").write_text(json.dumps({"seed": cell.seed, "code": {"git_commit": commit}, "spec": spec}))


def test_a_round_with_recorded_divergences_is_judged_on_its_finished_runs(tmp_path, monkeypatch, capsys):
    """`ce-again` s1 diverges (recorded for this spec, seed and code): every round's Snakemake run fails,
    yet each round is judged on the partial report's aggregate. `balanced-softmax` vs `ce` is undecided at
    2 seeds and gets its third; `ce-again` vs `ce` stays untested (no seed replaces the diverged one);
    the driver ends with Snakemake's failed status. A failure that is not a recorded divergence (here: a
    divergence under other code) ends the driver after the first round, as a rerun may finish it."""
    cfg_path = tmp_path / "seq.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tmp_path)))
    cfg = config.load(cfg_path)
    results = Path(cfg["results_dir"])
    bad = config.Cell("digits-lt", "10", "ce-again", "resnet8", 1)
    values = {"ce": [50.0, 51.0, 50.5], "ce-again": [50.0, None, 50.5], "balanced-softmax": [53.0, 49.0, 52.0]}
    calls = []

    def snakemake(cfg_now, cmd):  # trains every cell of the grid but the diverged one; writes the partial aggregate
        calls.append(cmd)
        grid = config.cells(config.load(cfg_path))
        rows = []
        for c in grid:
            if c != bad:
                (results / "runs" / c.path).mkdir(parents=True, exist_ok=True)
                (results / "runs" / c.path / "metrics.json").write_text("{}")
                rows.append(dict(dataset=c.dataset, ratio=c.ratio, method=c.method, backbone=c.backbone,
                                 metric="top1", seed=c.seed, value=values[c.method][c.seed]))  # fmt: skip
        agg = results / "partial" / "aggregate"
        agg.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(agg / "runs.csv", index=False)
        return 1

    monkeypatch.setattr(run, "run_snakemake", snakemake)
    commit = run.io.code_version()["git_commit"]
    _diverged_json(cfg, bad, "0" * 40 if commit != "0" * 40 else "1" * 40)  # recorded under other code
    assert run.unfinished(cfg) == ([], config.cells(cfg))  # nothing trained; no divergence of this code
    assert run.main(str(cfg_path), [], until_decided=True) == 1
    out = capsys.readouterr().out
    assert "cells did not finish (digits-lt r10 ce-again resnet8 s1)" in out and "round 1" not in out
    assert len(calls) == 1 and not seeds.state_path(cfg).exists()

    _diverged_json(cfg, bad, commit)
    assert run.unfinished(cfg) == ([bad], [])
    assert run.main(str(cfg_path), [], until_decided=True) == 1
    out = capsys.readouterr().out
    assert out.count("1 cells diverged and stay diverged (digits-lt r10 ce-again resnet8 s1;") == 2
    assert "ltbench run: round 2" in out and "stopped: 1 untested tests wait for runs that failed" in out
    bs, ce = (seeds.cell_key("digits-lt", "10", m, "resnet8") for m in ("balanced-softmax", "ce"))
    state = json.loads(seeds.state_path(cfg).read_text())
    assert state == {"round": 1, "experiments": {"seq": {"cells": {bs: 3, ce: 3}}}}
    assert len(calls) == 3


def test_the_findings_of_a_sequential_experiment_are_its_sequential_decisions(tmp_path):
    """The first screen (findings.csv) carries the group-sequential decision, not the fixed-design test on
    the seeds so far: `ce-again` (identical to `ce`) is "no gain" at the first look where the t-test on
    2 seeds says "not significant"; `balanced-softmax` is undecided (at its first of two looks), shown
    as "not significant" with the decision in `test`, no p-value and no fixed-design seeds needed."""
    from ltbench.analysis import aggregate, findings
    from ltbench.report import headline

    cfg = config.validate(_config(tmp_path, {"initial": 2, "max": 4, "step": 2}))
    rows = [
        {**dict(dataset="digits-lt", ratio="10", method=m, backbone="resnet8", metric="top1"), "seed": s, "value": v}
        for m, vals in (("ce", [50.0, 51.0]), ("ce-again", [50.0, 51.0]), ("balanced-softmax", [60.0, 62.0]))
        for s, v in enumerate(vals)
    ]
    runs = pd.DataFrame(rows)
    comparison, gains = aggregate.comparisons(runs, cfg)
    looks = sequential.table(runs, cfg)
    fixed = findings.findings(comparison, gains, cfg)
    assert fixed.set_index("method").loc["ce-again", ["verdict", "p_value"]].tolist() == ["not significant", 1.0]
    f = findings.findings(comparison, gains, cfg, looks)
    by = f.set_index("method")
    assert by.loc["ce-again", "verdict"] == "no gain" and bool(by.loc["ce-again", "decided"])
    assert by.loc["ce-again", "test"] == "group-sequential t: no gain at 2 seeds"
    assert by.loc["balanced-softmax", "verdict"] == "not significant"
    assert by.loc["balanced-softmax", "test"] == "group-sequential t: undecided at 2 seeds"
    assert by["p_value"].isna().all() and by["seeds_needed"].isna().all()
    assert list(f["method"]) == ["ce-again", "balanced-softmax"]  # decided first
    html = headline.table_html(f)
    assert html.count(">seq.</span>") == 2 and headline.SEQUENTIAL_NOTE in html
    assert "(seq.)" in headline.to_markdown(f) and headline.SEQUENTIAL_NOTE not in headline.table_html(fixed)
    # an aggregate written before: `ltbench findings` reads its sequential.csv too
    d = tmp_path / "agg"
    d.mkdir()
    comparison.to_csv(d / "comparison.csv", index=False)
    gains.to_csv(d / "gains.csv", index=False)
    looks.to_csv(d / "sequential.csv", index=False)
    assert findings.write(d, cfg).set_index("method").loc["ce-again", "verdict"] == "no gain"
