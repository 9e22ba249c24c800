"""profiles/slurm on a real SLURM: the demo workflow, a preemption, a failing cell.

The cluster tests need a running SLURM with a GPU GRES and root: .ci/slurm-test.sh installs
slurm-wlm and munge, starts a single-node cluster, sets LTBENCH_SLURM=1 and runs this file (CI runs
it after `make test`, where these tests are skipped). The profile tests at the end need no cluster.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT

PROFILE = ROOT / "profiles" / "slurm"
OVERLAY = ROOT / ".ci" / "slurm" / "profile"  # the single CI node: squeue status checks, no conda
EPOCHS = 8
PREEMPTED = "baseline+cbn+sbn+dpl"  # the cell that gets the profile's time-limit signal mid-training
METHODS = ["ce", PREEMPTED]
VOLATILE = {"wall_time_s", "train_time_s", "images_per_s", "finished_at", "environment", "code"}

needs_cluster = pytest.mark.skipif(
    not os.environ.get("LTBENCH_SLURM"),
    reason="needs a running SLURM with a GPU GRES: run by `bash .ci/slurm-test.sh` (as root; it installs "
    "slurm-wlm and munge and starts a single-node cluster), as CI does after `make test`",
)


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def snakemake_cmd(*args):
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), *map(str, args)]


def slurm_args(config):
    return ["--profile", PROFILE, "--profile", OVERLAY, "--configfile", config]


def demo_config(base: Path, methods=METHODS, extra_methods=None) -> Path:
    """config/demo.yaml, shrunk to one ratio and seed; train jobs ask SLURM for a GPU."""
    cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    cfg.update(results_dir=str(base / "results"), reports_dir=str(base / "reports"), data_dir=str(base / "data"))
    cfg["train"].update(epochs=EPOCHS, device="cpu")
    cfg["experiments"] = {
        "demo": {
            "datasets": ["digits-lt"],
            "ratios": [10],
            "methods": list(methods),
            "backbones": ["resnet8"],
            "seeds": [0],
        }
    }
    cfg["methods"] = {**cfg.get("methods", {}), **(extra_methods or {})}
    cfg["resources"] = {"train": {"gpu": 1, "runtime": 10, "mem_mb": 1000}, "default": {"runtime": 10}}
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.yaml").write_text(yaml.safe_dump(cfg))
    return base / "config.yaml"


def profile_signal():
    """The signal profiles/slurm asks SLURM to send before the time limit, and scancel's options
    that deliver it the same way (to the job steps, or with B: to the batch shell only)."""
    extra = yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"]["train"]["slurm_extra"]
    m = re.search(r"--signal=(B:)?([A-Z0-9]+)@(\d+)", extra)
    assert m, f"no --signal in the train rule's slurm_extra: {extra}"
    return m.group(2), (["--batch"] if m.group(1) else [])


def sq(*fields, jobs=None):
    """squeue rows (finished jobs included, for MinJobAge) as tuples of the given % fields."""
    cmd = ["squeue", "-h", "--states=all", "-o", "|".join(fields)]
    if jobs:
        cmd += ["-j", ",".join(jobs)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [tuple(line.split("|")) for line in out.splitlines() if line]


def submissions(log: str) -> dict[str, str]:
    """SLURM job id → the rule it ran, from snakemake's own log."""
    ids = dict(re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+)/", log))
    assert ids, log[-3000:]
    return ids


def wait_for_line(path: Path, text: str, proc, timeout: float):
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and text in path.read_text():
            return
        assert proc.poll() is None, f"snakemake exited ({proc.returncode}) before {path} showed {text!r}"
        time.sleep(0.05)
    raise AssertionError(f"{path} did not show {text!r} within {timeout} s")


def stop(proc):
    if proc.poll() is None:  # SIGINT: snakemake cancels its SLURM jobs
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def comparable_cell(run_dir: Path):
    m = json.loads((run_dir / "metrics.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "train.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("epoch_time_s")
    return {k: v for k, v in m.items() if k not in VOLATILE}, rows


@pytest.fixture(scope="module")
def cluster():
    assert shutil.which("sbatch"), "LTBENCH_SLURM is set but sbatch is not on PATH"
    p = subprocess.run(["sinfo", "-h", "-o", "%n|%t|%G"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, f"LTBENCH_SLURM is set but SLURM does not answer: {p.stderr}"
    nodes = [line.split("|") for line in p.stdout.splitlines()]
    assert any(state == "idle" and "gpu" in gres for _, state, gres in nodes), p.stdout
    return nodes


@needs_cluster
def test_demo_through_slurm_equals_a_local_run_and_resumes_a_preempted_cell(cluster, tmp_path):
    # the reference: the same config run locally
    local_cfg = demo_config(tmp_path / "local")
    p = subprocess.run(
        snakemake_cmd("--cores", 2, "--configfile", local_cfg),
        cwd=tmp_path / "local",
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    local_jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", p.stdout + p.stderr, re.M)}
    local_jobs.pop("all"), local_jobs.pop("total")

    base = tmp_path / "slurm"
    cfg = demo_config(base)
    sig, scancel_opts = profile_signal()
    log_path = base / "snakemake.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            snakemake_cmd(*slurm_args(cfg)),
            cwd=base,
            env=env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # once the CBN cell trains inside its SLURM job, send what the time limit would send
        train_log = base / "results" / "logs" / "train" / "digits-lt" / "r10" / PREEMPTED / "resnet8" / "s0.log"
        wait_for_line(train_log, f"epoch 2/{EPOCHS} ", proc, timeout=240)
        running = [
            jid
            for jid, state, comment in sq("%i", "%T", "%k")
            if state == "RUNNING" and comment.endswith(f"_{PREEMPTED}_resnet8_0")
        ]
        assert len(running) == 1, sq("%i", "%T", "%k")
        subprocess.run(["scancel", f"--signal={sig}", *scancel_opts, running[0]], check=True)
        rc = proc.wait(timeout=420)
    finally:
        stop(proc)
    out = log_path.read_text()
    assert rc == 0, out[-4000:]

    # every job went through sbatch: one SLURM job per local job, plus the preempted attempt
    jobs = submissions(out)
    rows = {jid: (state, comment, tres) for jid, state, comment, tres in sq("%i", "%T", "%k", "%b", jobs=list(jobs))}
    assert set(rows) == set(jobs), (rows, jobs)
    per_rule = {}
    for jid, rule in jobs.items():
        per_rule[rule] = per_rule.get(rule, 0) + 1
        assert rows[jid][1].startswith(f"rule_{rule}"), rows[jid]
    assert per_rule == {**local_jobs, "train": local_jobs["train"] + 1}, (per_rule, local_jobs)
    failed = [jid for jid, (state, _, _) in rows.items() if state != "COMPLETED"]
    assert len(failed) == 1 and rows[failed[0]][0] == "FAILED" and PREEMPTED in rows[failed[0]][1], rows
    assert running[0] == failed[0]
    # the train jobs (only they) were given a GPU
    for jid, rule in jobs.items():
        shown = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True).stdout
        assert ("gres/gpu=1" in shown or "gres:gpu:1" in shown) == (rule == "train"), shown

    # the retry resumed from the checkpoint written on the signal, and finished
    text = train_log.read_text()
    assert re.search(r"resumed from \S+checkpoint\.pt at epoch \d+ step [1-9]", text), text
    assert not list((base / "results" / "runs").rglob("checkpoint.pt"))

    # the same results as the local run, cell by cell and in the aggregate
    for cell in sorted((tmp_path / "local" / "results" / "runs").rglob("metrics.json")):
        rel = cell.parent.relative_to(tmp_path / "local" / "results")
        assert comparable_cell(base / "results" / rel) == comparable_cell(cell.parent), rel
    for table in ("summary.csv", "per_class.csv"):
        a = (tmp_path / "local" / "results" / "aggregate" / table).read_text()
        assert (base / "results" / "aggregate" / table).read_text() == a, table
    keys = ["dataset", "ratio", "method", "backbone", "seed", "spec_hash", "metric", "value"]
    runs = [pd.read_csv(d / "results" / "aggregate" / "runs.csv")[keys] for d in (tmp_path / "local", base)]
    pd.testing.assert_frame_equal(*runs)
    assert (base / "reports" / "demo.html").stat().st_size > 0


@needs_cluster
def test_a_diverging_cell_fails_in_slurm_is_reported_and_never_aggregated(cluster, tmp_path):
    base = tmp_path / "diverge"
    cfg = demo_config(
        base,
        methods=["ce-diverge"],
        extra_methods={"ce-diverge": {"extends": "ce", "train": {"lr": 1.0e6, "warmup_epochs": 0}}},
    )
    p = subprocess.run(
        snakemake_cmd(*slurm_args(cfg), "--retries", 1),
        cwd=base,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )  # a failed job must not be waited on forever
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    jobs = submissions(out)
    train = [jid for jid, rule in jobs.items() if rule == "train"]
    assert len(train) == 2  # the first attempt and one retry, both reported as failed
    states = {jid: state for jid, state in sq("%i", "%T", jobs=train)}
    assert set(states.values()) == {"FAILED"}, states
    assert len(re.findall(rf"SLURM-job '({'|'.join(train)})' failed", out)) == 2, out[-3000:]
    log = (base / "results" / "logs" / "train" / "digits-lt" / "r10" / "ce-diverge" / "resnet8" / "s0.log").read_text()
    assert "training loss became nan" in log and "recorded by an earlier run" in log, log  # the retry did not retrain
    cell = base / "results" / "runs" / "digits-lt" / "r10" / "ce-diverge" / "resnet8" / "s0"
    assert not (cell / "metrics.json").exists() and (cell / "diverged.json").exists()
    # no aggregate job ran; the partial report (snakemake's onerror handler, beside the rules' outputs: a rerun
    # trains the missing cells) lists the cell as failed, without values
    assert "aggregate" not in jobs.values() and not (base / "results" / "aggregate").exists()
    assert (base / "reports" / "demo.partial.html").exists()
    agg = base / "results" / "partial" / "aggregate"
    assert pd.read_csv(agg / "runs.csv").empty
    cells = pd.read_csv(agg / "cells.csv")
    assert cells[["method", "status"]].values.tolist() == [["ce-diverge", "failed"]]
    assert "training loss became nan" in cells.detail[0]


# ---- the profile itself (no cluster needed) ----


def test_profile_requests_and_fault_tolerance_settings():
    prof = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert prof["executor"] == "slurm" and prof["use-conda"] is True
    assert prof["retries"] >= 1 and prof["rerun-incomplete"] is True
    assert prof["slurm-requeue"] is True
    assert prof["seconds-between-status-checks"] >= 10 and prof["slurm-init-seconds-before-status-checks"] >= 10
    assert {"runtime", "mem_mb", "cpus_per_task"} <= set(prof["default-resources"])
    assert "gpu" not in prof["default-resources"]  # the CPU-only rules ask for no GPU
    # the train rule's GPU, runtime and memory come from the config, not from the profile
    assert not {"gpu", "runtime", "mem_mb"} & set(prof["set-resources"]["train"])
    sig, opts = profile_signal()
    assert sig in ("TERM", "USR1") and opts == []  # to the job step that runs the trainer
    text = (PROFILE / "config.yaml").read_text()
    for knob in ("slurm_account", "slurm_partition", "constraint", "gpu_model"):
        assert f"# {knob}:" in text, f"the profile does not document the {knob} knob"


def test_train_jobs_get_resources_per_dataset_and_backbone(tmp_path):
    """What each job would ask SLURM for (a dry run with the profile; sbatch is not called)."""
    cfg = yaml.safe_load(demo_config(tmp_path).read_text())
    cfg["experiments"]["demo"]["backbones"] = ["resnet8", "resnet20"]
    cfg["resources"] = {
        "default": {"runtime": 7, "mem_mb": 1500},
        "train": {"gpu": 1, "runtime": 30},
        "cells": [
            {"backbones": ["resnet20"], "runtime": 90, "mem_mb": 6000, "gpu_model": "a100"},
            {"datasets": ["digits-lt"], "backbones": ["resnet20"], "gpu": 2},
        ],
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    p = subprocess.run(
        snakemake_cmd("-n", *slurm_args(tmp_path / "config.yaml")),
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = {}
    for block in re.split(r"\n(?=rule \w+:)", p.stdout):
        m = re.match(r"rule (\w+):", block)
        if not m:
            continue
        wc = re.search(r"wildcards: (.*)", block)
        res = dict(kv.split("=", 1) for kv in re.search(r"resources: (.*)", block).group(1).split(", "))
        jobs.setdefault(m.group(1), {})[wc.group(1) if wc else ""] = res
    train = {k: v for k, v in jobs["train"].items()}
    r8 = next(v for k, v in train.items() if "backbone=resnet8" in k)
    r20 = next(v for k, v in train.items() if "backbone=resnet20" in k)
    assert (r8["gpu"], r8["runtime"], r8["mem_mb"], "gpu_model" in r8) == ("1", "30", "1500", False), r8
    assert (r20["gpu"], r20["runtime"], r20["mem_mb"], r20["gpu_model"]) == ("2", "90", "6000", "a100"), r20
    assert "--signal=" in r8["slurm_extra"], (r8, r20)
    for rule in ("prepare", "aggregate", "report"):  # CPU only
        for res in jobs[rule].values():
            assert "gpu" not in res and "slurm_extra" not in res, (rule, res)


def test_unknown_names_in_resource_cells_are_config_errors(tmp_path):
    cfg = yaml.safe_load(demo_config(tmp_path).read_text())
    cfg["resources"] = {"cells": [{"backbones": ["resnet9000"], "runtime": 5}]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    p = subprocess.run(
        snakemake_cmd("-n", "--cores", 1, "--configfile", tmp_path / "bad.yaml"),
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0 and "resources.cells[0].backbones[0]: unknown backbone 'resnet9000'" in p.stdout + p.stderr
