# Config validation (JSON schema + registry names) and the grid of cells, at DAG-build time; the
# rules' input and resource functions, and the partial report written when a run fails (report.smk).
import json
import os
import re
import shlex
import sys

sys.path.insert(0, workflow.basedir)  # the ltbench package next to this Snakefile

from ltbench.errors import ConfigError
from ltbench.spec import config as ltconfig
from ltbench import data as ltdata
from ltbench import io as ltio
from ltbench.spec import catalog

# A YAML syntax error in a config file never gets here: Snakemake parses --configfile (and the
# Snakefile's default config) itself and says only "Config file is not valid JSON or YAML";
# `python -m ltbench plan --configfile FILE` names the file, line and column (docs/security.md).
try:
    for _f in workflow.overwrite_configfiles or workflow.configfiles:
        ltconfig.read_yaml(_f)  # what Snakemake's own YAML reading lets through: duplicate keys, alias bombs
    config = ltconfig.validate(config)
    ltdata.imagelists.check_config(config)  # image-list datasets: lists configured, natural ratio
except ConfigError as e:
    _files = [str(f) for f in (workflow.overwrite_configfiles or workflow.configfiles)]
    raise WorkflowError(f"{e}\n(config files: {', '.join(_files) or 'none; --config only'})")

# Rules run `python -m ltbench` from the package next to the Snakefile (also inside conda envs).
# Every value the rules put into a shell command is quoted (`{output:q}`, ...), this path too.
shell.prefix(f'export PYTHONPATH={shlex.quote(workflow.basedir)}:"$PYTHONPATH"; ')

R = config["results_dir"]
DATA = config["data_dir"]
CELLS = ltconfig.cells(config)
REPORT = f"{config['reports_dir']}/{config['name']}.html"
GRID = f"{R}/grid/{config['name']}.json"  # see grid_file
PARTIAL = f"{config['reports_dir']}/{config['name']}.partial.html"  # see partial_report
ENV = f"{workflow.basedir}/envs/ltbench.yaml"


def _alternatives(values):
    return "|".join(re.escape(v) for v in sorted(set(values)))


wildcard_constraints:
    dataset=_alternatives(c.dataset for c in CELLS),
    method=_alternatives(c.method for c in CELLS),
    backbone=_alternatives(c.backbone for c in CELLS),
    ratio=r"[0-9]+(\.[0-9]+)?",
    seed=r"[0-9]+",
    subset=r"[0-9]+",


def subset_seed(dataset):
    return config["datasets"].get(dataset, {}).get("subset_seed", 0)


def prepared(w):
    return str(ltdata.prepared_path(R, w.dataset, w.ratio, subset_seed(w.dataset)))


def download_marker(w):
    spec = ltdata.get(w.dataset)
    return f"{DATA}/{w.dataset}.downloaded" if spec.needs_download else []


def metrics_files():
    return [f"{R}/runs/{c.path}/metrics.json" for c in CELLS]


def data_config(w):
    """The config a data job (download, prepare) is given: the paths of the data and this dataset's
    own entry, with one placeholder experiment, not the whole config. A param of the data rules: the
    whole config there made a new seed, method or experiment redo the data and, through it, every
    cell; the config's name and reports_dir there made every config sharing a results_dir (each with
    its own name and report) redo them too."""
    ratio = float(getattr(w, "ratio", 1))
    return json.dumps(
        {
            "data_dir": DATA,
            "results_dir": R,
            "datasets": {w.dataset: config["datasets"].get(w.dataset, {})},
            "experiments": {
                "data": {
                    "datasets": [w.dataset],
                    "ratios": [ratio],
                    "methods": ["ce"],
                    "backbones": ["resnet8"],
                    "seeds": [0],
                }
            },
        },
        sort_keys=True,
    )


def grid_file():
    """``{R}/grid/<name>.json``: this config's cells and experiments, rewritten only when they change.

    An input of the aggregate rule: Snakemake does not rerun a job whose outputs exist because one of
    its inputs is missing, so a cell added to a finished grid (a method, a seed) would otherwise be
    neither trained nor aggregated. A changed grid file makes the aggregate (and so the new cells'
    training) due; an unchanged one keeps its date, so a complete run stays a no-op."""
    path = GRID
    text = (
        json.dumps(
            {"cells": [c.path for c in CELLS], "experiments": config["experiments"], "margin": config.get("margin")},
            indent=1,
            sort_keys=True,
            default=str,
        )
        + "\n"
    )
    try:
        if not os.path.exists(path) or open(path).read() != text:
            ltio.write_text(path, text)
    except OSError as e:  # a read-only results folder: the aggregate cannot run there either
        print(f"ltbench: cannot write {path}: {e}", file=sys.stderr)
    return path


def resource(rule, key, default):
    return config["resources"].get(rule, {}).get(key, config["resources"].get("default", {}).get(key, default))


def _check_resource_cells():
    known = {"datasets": set(ltdata.DATASETS), "backbones": set(catalog.BACKBONES)}
    for i, entry in enumerate(config["resources"].get("cells", [])):
        for key, names in known.items():
            for j, name in enumerate(entry.get(key, [])):
                if name not in names:
                    raise WorkflowError(
                        f"config key resources.cells[{i}].{key}[{j}]: unknown {key[:-1]} "
                        f"{name!r}; known: {', '.join(sorted(names))}"
                    )


def train_resource(key, default):
    """A train job's resource (a function of its wildcards, as Snakemake wants): the last
    resources.cells entry that matches the cell's dataset and backbone and sets ``key``, else
    resources.train, else resources.default, else ``default`` (None leaves the resource unset)."""

    def get(w):
        value = resource("train", key, default)
        for entry in config["resources"].get("cells", []):
            if (
                key in entry
                and w.dataset in entry.get("datasets", [w.dataset])
                and w.backbone in entry.get("backbones", [w.backbone])
            ):
                value = entry[key]
        return value

    return get


def launcher(gpus):
    """How a train job starts: one process, or one per GPU (DDP) when the cell has several."""
    gpus = int(gpus or 0)
    return f"torchrun --standalone --nproc_per_node={gpus}" if gpus > 1 else "python"


_check_resource_cells()


def partial_report(snakemake_log=None):
    """After a failed run: the report of the finished cells (the others marked missing), written
    where no rule's output lives: ``<reports_dir>/<name>.partial.html`` and ``{R}/partial/`` (ltbench.io.PARTIAL_DIR).

    Runs the same two commands as the rules, with `aggregate --existing`. No rule's output is
    written or redated, and the grid file (an input of the aggregate rule, rewritten when the next
    run builds its DAG) is removed: rerunning the same command then schedules every missing cell,
    whether none, some or all had finished, and cells whose rerun failed. Never raises: the run has
    already failed and says why.
    """
    import os
    import subprocess

    log = f"{R}/logs/partial_report.log"
    out = f"{R}/{ltio.PARTIAL_DIR}"
    os.makedirs(os.path.dirname(log), exist_ok=True)
    try:
        os.remove(GRID)
    except OSError:
        pass
    cfg = json.dumps(config)
    env = {**os.environ, "PYTHONPATH": f"{workflow.basedir}:{os.environ.get('PYTHONPATH', '')}"}
    cmds = [
        [
            sys.executable,
            "-m",
            "ltbench",
            "aggregate",
            "--existing",
            "--config-json",
            cfg,
            "--out-dir",
            f"{out}/aggregate",
        ],
        [
            sys.executable,
            "-m",
            "ltbench",
            "report",
            "--aggregate-dir",
            f"{out}/aggregate",
            "--figures-dir",
            f"{out}/figures",
            "--tables-dir",
            f"{out}/tables",
            "--config-json",
            cfg,
            "--out",
            PARTIAL,
        ],
    ]
    try:
        with open(log, "w") as fh:
            for cmd in cmds:
                if subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode:
                    print(f"ltbench: could not write the partial report; see {log}", file=sys.stderr)
                    return
        done = [p for p in metrics_files() if os.path.exists(p)]
        print(
            f"ltbench: some jobs failed; partial report of the {len(done)} finished cells of {len(CELLS)}: "
            f"{PARTIAL} (missing cells listed there; log: {log}); run the same command again to finish the grid",
            file=sys.stderr,
        )
    except Exception as e:  # noqa: BLE001 - the handler must not mask the run's own error
        print(f"ltbench: could not write the partial report: {e}", file=sys.stderr)


def remove_partial_report():
    """After a successful run: the partial report of an earlier failed run is out of date."""
    import shutil

    if os.path.exists(PARTIAL):
        os.remove(PARTIAL)
    shutil.rmtree(f"{R}/{ltio.PARTIAL_DIR}", ignore_errors=True)
