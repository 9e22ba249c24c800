"""``ltbench run --configfile F [--until-decided] [snakemake args …]``: run the workflow, and with
``--until-decided`` add seeds where a sequential experiment's verdicts are undecided, round by round.

Each round: Snakemake builds the grid (the config, and for a sequential experiment
``<results_dir>/sequential/<name>.json``: :mod:`ltbench.spec.seeds`) and runs it (train, aggregate,
report; with ``--profile profiles/slurm`` it submits the jobs and waits, and this driver runs where
Snakemake runs). Then the group-sequential rule (:mod:`ltbench.analysis.sequential`) judges the
aggregate's runs; the cells of the tests still undecided get the seeds of their next look, written to
the grid file (atomically); the driver prints the round's decisions and repeats until no test needs more
seeds (every verdict decided, or at ``max``).

A killed driver resumes where it stopped: the grid file holds every seed asked for, Snakemake trains
only the cells without ``metrics.json`` (a train job cut off resumes from its checkpoint), and the
decisions are a function of the runs alone, so a rerun reaches the same ones.
``--rerun-incomplete`` is added to the Snakemake arguments unless they hold it (jobs cut off by the
kill), and while Snakemake runs the driver notes its pid in ``<name>.snakemake.json`` next to the
grid file: a driver that finds that note waits for that Snakemake to end and removes the lock it left
(``snakemake --unlock``), so a driver killed even with SIGKILL resumes with the same command.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from ltbench import io
from ltbench.analysis import sequential
from ltbench.spec import config, seeds


def snakemake_command(configfile: str, args: Sequence[str]) -> list[str]:
    extra = [] if any(a.startswith("--rerun-incomplete") or a == "--ri" for a in args) else ["--rerun-incomplete"]
    return [sys.executable, "-m", "snakemake", "--configfile", configfile, *args, *extra]


def _runs(cfg: Mapping) -> pd.DataFrame:
    path = Path(cfg["results_dir"]) / "aggregate" / "runs.csv"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist after the Snakemake run: give a target that includes the aggregate "
            "(the default `all`, or the aggregate's outputs)"
        )
    return pd.read_csv(path, dtype={"ratio": str})


def extend(state: Mapping, need: Mapping[str, Mapping[str, int]], round_no: int) -> dict:
    """The grid file with the seeds ``need`` asks for (a cell never gets fewer than it had)."""
    exps = {e: dict((v or {}).get("cells", {})) for e, v in state.get("experiments", {}).items()}
    for ename, cells in need.items():
        have = exps.setdefault(ename, {})
        for key, n in cells.items():
            have[key] = max(n, have.get(key, 0))
    return {"round": round_no, "experiments": {e: {"cells": c} for e, c in exps.items()}}


def _added_runs(cfg: Mapping, new: Mapping) -> int:
    """Runs the new grid adds over the config's current one (a cell shared by experiments counted once)."""
    before = set(config.cells(cfg))
    after_cfg = {**cfg, "experiments": {}}
    for ename, exp in cfg["experiments"].items():
        if exp.get("sequential"):
            cells = {**exp["sequential"]["cells"], **new["experiments"].get(ename, {}).get("cells", {})}
            exp = {**exp, "sequential": {**exp["sequential"], "cells": cells}}
        after_cfg["experiments"][ename] = exp
    return len(set(config.cells(after_cfg)) - before)


def report_round(round_no: int, looks: pd.DataFrame, added: int) -> str:
    """The lines the driver prints after a round: decisions per experiment and kind, and what comes next."""
    lines = [f"ltbench run: round {round_no}"]
    for (ename, kind), g in sequential.counts(looks).groupby(["experiment", "kind"], sort=False):
        parts = ", ".join(f"{r.tests} {r.decision}" for r in g.itertuples())
        lines.append(f"  {ename} ({kind}): {parts}")
    waiting = sequential.counts(looks).query("decision == @sequential.UNDECIDED")["tests"].sum()
    if added:
        lines.append(f"  next: {added} more runs")
    elif waiting:  # their seeds are in the grid but have no runs: failed cells (cells.csv says why)
        lines.append(f"  stopped: {waiting} undecided tests wait for runs that failed (see the aggregate's cells.csv)")
    else:
        lines.append("  done: every verdict decided or at its maximum of seeds")
    return "\n".join(lines)


def decide_round(configfile: str, round_no: int) -> int:
    """Judge the aggregate's runs, extend the grid file, print the round; returns the runs added."""
    cfg = config.load(configfile)
    looks = sequential.table(_runs(cfg), cfg)
    state = seeds.read_state(cfg)
    new = extend(state, sequential.needed_seeds(looks), round_no)
    added = _added_runs(cfg, new)
    if added:
        io.write_json(seeds.state_path(cfg), new)
    print(report_round(round_no, looks, added), flush=True)
    return added


def _record(cfg: Mapping) -> Path:
    """Where the driver notes the Snakemake process it runs (pid, host) while it runs."""
    return seeds.state_path(cfg).with_suffix(".snakemake.json")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(cfg: Mapping, cmd: list[str]) -> None:
    """After a killed driver: wait for the Snakemake it started to end, then remove the lock that run
    left (Snakemake's own ``--unlock``). Nothing to do when the last run ended normally."""
    path = _record(cfg)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if rec.get("host") != socket.gethostname():
        print(f"ltbench run: {path} names a Snakemake run on {rec.get('host')}; not unlocking from here", flush=True)
        return
    if _alive(int(rec["pid"])):
        print(f"ltbench run: waiting for the Snakemake run of the stopped driver (pid {rec['pid']}) to end", flush=True)
        while _alive(int(rec["pid"])):
            time.sleep(1)
    print("ltbench run: resuming a stopped run: snakemake --unlock", flush=True)
    subprocess.call([*cmd, "--unlock"])
    path.unlink(missing_ok=True)


def run_snakemake(cfg: Mapping, cmd: list[str]) -> int:
    """Snakemake's exit status; SIGTERM / SIGINT to the driver go to Snakemake (which stops its jobs)."""
    child = subprocess.Popen(cmd)
    io.write_json(_record(cfg), {"pid": child.pid, "host": socket.gethostname()})
    forward = lambda sig, frame: child.send_signal(sig)  # noqa: E731
    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = child.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    _record(cfg).unlink(missing_ok=True)
    return rc


def main(configfile: str, snakemake_args: Sequence[str], until_decided: bool = False) -> int:
    """Run Snakemake (once, or round by round until decided); the exit status of the last Snakemake run."""
    cfg = config.load(configfile)
    sequential_exps = [n for n, e in cfg["experiments"].items() if e.get("sequential")]
    if until_decided and not sequential_exps:
        print(f"ltbench run: {configfile} has no sequential experiment (seeds: {{initial, max}}); one run", flush=True)
    cmd = snakemake_command(configfile, snakemake_args)
    recover(cfg, [c for c in cmd if c != "--rerun-incomplete"])
    round_no = int(seeds.read_state(cfg).get("round", 0))
    while True:
        round_no += 1
        rc = run_snakemake(cfg, cmd)
        if rc or not until_decided or not sequential_exps:
            return rc
        if not decide_round(configfile, round_no):
            return 0
