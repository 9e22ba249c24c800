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

A cell that diverged stays diverged: its ``diverged.json`` records the divergence for the cell's spec,
seed and code, and a rerun fails it again at once (:mod:`ltbench.training.trainer`). A round whose
only failed cells are such recorded divergences is therefore judged on its finished runs (the
aggregate of the partial report that the failed Snakemake run wrote) instead of ending the loop: the
tests that need a diverged cell stay ``untested`` (no seed is added in its place: that would keep only
the seeds that trained), the others go on. Any other failure ends the driver with Snakemake's status;
rerunning the same command retries those cells.
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


def _runs(cfg: Mapping, partial: bool = False) -> pd.DataFrame:
    """The aggregate's runs; ``partial``: those of the partial report's aggregate (after a failed run)."""
    path = Path(cfg["results_dir"]) / (f"{io.PARTIAL_DIR}/aggregate" if partial else "aggregate") / "runs.csv"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist after the Snakemake run: give a target that includes the aggregate "
            "(the default `all`, or the aggregate's outputs)"
        )
    return pd.read_csv(path, dtype={"ratio": str})


# Training settings the train rule sets on the command line (not part of the cell's config spec).
_COMMAND_LINE_TRAIN_KEYS = ("threads",)


def _spec_without_command_line(spec: Mapping) -> dict:
    train = {k: v for k, v in spec.get("train", {}).items() if k not in _COMMAND_LINE_TRAIN_KEYS}
    return json.loads(json.dumps({**spec, "train": train}, sort_keys=True))


def recorded_divergence(cfg: Mapping, cell: config.Cell, commit: str) -> bool:
    """Whether the cell's ``diverged.json`` records a divergence of this cell's spec and seed under the
    code ``commit`` (the one checked out): the train rule then fails it again at once (the trainer's
    check, which also compares the spec), so rerunning cannot finish it."""
    try:
        prev = json.loads((Path(cfg["results_dir"]) / "runs" / cell.path / "diverged.json").read_text())
        spec = config.cell_spec(cfg, cell.dataset, cell.method, cell.backbone)
        return (
            prev["seed"] == cell.seed
            and prev["code"]["git_commit"] == commit
            and _spec_without_command_line(prev["spec"]) == _spec_without_command_line(spec)
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def unfinished(cfg: Mapping) -> tuple[list[config.Cell], list[config.Cell]]:
    """The grid's cells without ``metrics.json``: (recorded divergences, the others)."""
    runs_dir = Path(cfg["results_dir"]) / "runs"
    todo = [c for c in config.cells(cfg) if not (runs_dir / c.path / "metrics.json").exists()]
    commit = io.code_version()["git_commit"] if todo else ""
    diverged = [c for c in todo if recorded_divergence(cfg, c, commit)]
    return diverged, [c for c in todo if c not in diverged]


def _shown(cells: Sequence[config.Cell], most: int = 5) -> str:
    """The cells' labels, the first ``most`` of them and how many more."""
    labels = ", ".join(f"{c.dataset} r{c.ratio} {c.method} {c.backbone} s{c.seed}" for c in cells[:most])
    return labels + (f" and {len(cells) - most} more" if len(cells) > most else "")


def judge_failed_round(cfg: Mapping, started: float) -> bool:
    """After a failed Snakemake run: whether the round can be judged on its finished runs (every
    unfinished cell a recorded divergence, and the partial report's aggregate written by this run)."""
    diverged, other = unfinished(cfg)
    if other or not diverged:
        print(
            f"ltbench run: {len(other)} cells did not finish ({_shown(other) or 'no cell: another job failed'}); "
            "run the same command again to retry them",
            flush=True,
        )
        return False
    runs_csv = Path(cfg["results_dir"]) / io.PARTIAL_DIR / "aggregate" / "runs.csv"
    if not runs_csv.exists() or runs_csv.stat().st_mtime < started:
        print(f"ltbench run: the failed run wrote no partial aggregate ({runs_csv}); see its log", flush=True)
        return False
    print(
        f"ltbench run: {len(diverged)} cells diverged and stay diverged ({_shown(diverged)}; "
        "each one's diverged.json says how); the round is judged on the finished runs, and the tests that "
        "need a diverged cell stay untested",
        flush=True,
    )
    return True


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
    waiting = sequential.counts(looks).query("decision == @sequential.UNTESTED")["tests"].sum()
    if added:
        lines.append(f"  next: {added} more runs")
    elif waiting:  # their seeds are in the grid but have no runs: failed cells (cells.csv says why)
        lines.append(f"  stopped: {waiting} untested tests wait for runs that failed (see the aggregate's cells.csv)")
    else:
        lines.append("  done: every verdict decided or at its maximum of seeds")
    return "\n".join(lines)


def decide_round(configfile: str, round_no: int, partial: bool = False) -> int:
    """Judge the aggregate's runs (``partial``: the partial report's), extend the grid file, print the
    round; returns the runs added."""
    cfg = config.load(configfile)
    looks = sequential.table(_runs(cfg, partial), cfg)
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
        started = time.time()
        rc = run_snakemake(cfg, cmd)
        if not until_decided or not sequential_exps:
            return rc
        if rc and not judge_failed_round(config.load(configfile), started):
            return rc
        if not decide_round(configfile, round_no, partial=bool(rc)):
            return rc
