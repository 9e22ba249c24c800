# Config validation (JSON schema + registry names) and the grid of cells, at DAG-build time.
import json
import re
import sys

sys.path.insert(0, workflow.basedir)  # the ltbench package next to this Snakefile

from ltbench import config as ltconfig
from ltbench import data as ltdata
from ltbench import models as ltmodels

try:
    config = ltconfig.validate(config)
    ltdata.imagelists.check_config(config)  # image-list datasets: lists configured, natural ratio
except ltconfig.ConfigError as e:
    raise WorkflowError(str(e))

# Rules run `python -m ltbench` from the package next to the Snakefile (also inside conda envs).
shell.prefix(f"export PYTHONPATH={workflow.basedir}:$PYTHONPATH; ")

R = config["results_dir"]
DATA = config["data_dir"]
CELLS = ltconfig.cells(config)
REPORT = f"{config['reports_dir']}/{config['name']}.html"
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
    if ltdata.imagelists.is_image_list(w.dataset):  # the checked lists' manifest (rule prepare_lists)
        return str(ltdata.imagelists.manifest_path(R, w.dataset, w.ratio))
    return f"{R}/data/{w.dataset}_r{w.ratio}_s{subset_seed(w.dataset)}.npz"


def metrics_files():
    return [f"{R}/runs/{c.path}/metrics.json" for c in CELLS]


def resource(rule, key, default):
    return config["resources"].get(rule, {}).get(key, config["resources"].get("default", {}).get(key, default))


def _check_resource_cells():
    known = {"datasets": set(ltdata.DATASETS), "backbones": set(ltmodels.BACKBONES)}
    for i, entry in enumerate(config["resources"].get("cells", [])):
        for key, names in known.items():
            for j, name in enumerate(entry.get(key, [])):
                if name not in names:
                    raise WorkflowError(f"config key resources.cells[{i}].{key}[{j}]: unknown {key[:-1]} "
                                        f"{name!r}; known: {', '.join(sorted(names))}")


def train_resource(key, default):
    """A train job's resource (a function of its wildcards, as Snakemake wants): the last
    resources.cells entry that matches the cell's dataset and backbone and sets ``key``, else
    resources.train, else resources.default, else ``default`` (None leaves the resource unset)."""

    def get(w):
        value = resource("train", key, default)
        for entry in config["resources"].get("cells", []):
            if key in entry and w.dataset in entry.get("datasets", [w.dataset]) \
                    and w.backbone in entry.get("backbones", [w.backbone]):
                value = entry[key]
        return value

    return get


_check_resource_cells()
