"""Command line: ``python -m ltbench <subcommand>``. Snakemake rules call these subcommands."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from ltbench import data, io
from ltbench.data import imagelists
from ltbench.errors import USER_ERRORS, CellBusy, ConfigError, DownloadError, ListCheckError, Preempted
from ltbench.spec import config

# `train` stopped by SIGTERM/SIGUSR1 after writing checkpoint.pt (EX_TEMPFAIL: retry to resume).
EXIT_PREEMPTED = 75


def _number(s: str, kind: type = float) -> float | int:
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {s}")
    return v


def _float(s: str) -> float:
    """An imbalance ratio: a finite number >= 1 (whether it leaves every class an image depends on
    the dataset: checked with it, see :func:`ltbench.spec.config.check_ratio`)."""
    v = _number(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"imbalance ratio must be >= 1, got {s}")
    return v


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (bench's step, round and worker counts)."""

    def parse(s: str) -> int:
        v = int(_number(s, int))
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v

    parse.__name__ = f"integer >= {low}"
    return parse


def _json(s: str, flag: str) -> Any:
    """A JSON value given on the command line; invalid JSON names the flag."""
    try:
        return json.loads(s)
    except ValueError as e:
        raise ConfigError(f"argument {flag}: not valid JSON ({e})") from None


def _schema_type(definition: str, key: str | None = None, kind: type = int) -> Callable[[str], Any]:
    """An argparse type: parse ``kind`` and validate it with the config schema's ``$defs`` entry
    (``key`` of its properties), as the same value in a config file would be."""

    def parse(s: str) -> Any:
        v = _number(s, kind)
        sub = config.schema()["$defs"][definition]
        errors = config.schema_errors(v, sub["properties"][key] if key else definition)
        if errors:
            raise argparse.ArgumentTypeError(errors[0][1])
        return v

    parse.__name__ = key or definition  # argparse names the type in its messages
    return parse


def _load_config(a: argparse.Namespace) -> dict:
    """The workflow config from ``--config-json`` (what Snakemake passes) or ``--config FILE``."""
    if getattr(a, "config_json", None):
        return config.validate(_json(a.config_json, "--config-json"))
    if a.config:
        return config.load(a.config)
    # no config file: an empty grid with every default
    return config.validate(
        {
            "experiments": {
                "cli": {"datasets": ["digits-lt"], "ratios": [1], "methods": ["ce"], "backbones": ["resnet8"]}
            }
        }
    )


def cmd_counts(a: argparse.Namespace) -> int:
    config.check_ratio(a.dataset, a.ratio, a.profile)
    counts = data.counts_for(a.dataset, a.ratio, a.profile)
    print(
        json.dumps(
            {"dataset": a.dataset, "ratio": a.ratio, "profile": a.profile, "counts": counts, "total": sum(counts)}
        )
    )
    return 0


def cmd_download(a: argparse.Namespace) -> int:
    cfg = _load_config(a)
    spec = data.get(a.dataset)
    if spec.fetch is None:
        print(f"{a.dataset} is embedded; nothing to download", file=sys.stderr)
    else:
        spec.fetch(Path(a.data_dir or cfg["data_dir"]), cfg["datasets"].get(a.dataset, {}))
    if a.done:
        Path(a.done).parent.mkdir(parents=True, exist_ok=True)
        Path(a.done).write_text("ok\n")
    return 0


def cmd_prepare(a: argparse.Namespace) -> int:
    cfg = _load_config(a)
    opts = dict(cfg["datasets"].get(a.dataset, {}))
    if a.subset_seed is not None:
        opts["subset_seed"] = a.subset_seed
    config.check_ratio(a.dataset, a.ratio, opts.get("profile", "exp"))
    info = data.prepare(a.dataset, a.ratio, Path(a.data_dir or cfg["data_dir"]), Path(a.out), opts)
    print(json.dumps({k: v for k, v in info.items() if k != "counts"}), file=sys.stderr)
    return 0


def _check_warmup_flags(a: argparse.Namespace, train: dict) -> None:
    """``--epochs`` / ``--warmup-epochs`` that leave the warmup as long as the run: an error naming the flag."""
    w, e = train["warmup_epochs"], train["epochs"]
    if w < e:
        return
    if a.warmup_epochs is not None:
        where = "--epochs" if a.epochs is not None else "train.epochs"
        raise ConfigError(f"argument --warmup-epochs: {w:g} is not below {where} {e}")
    if a.epochs is not None:
        raise ConfigError(
            f"argument --epochs: {e} is not above train.warmup_epochs {w:g} (the config's or the method's); "
            "pass --warmup-epochs below it too"
        )


def cmd_train(a: argparse.Namespace) -> int:
    from ltbench.training import trainer as train  # lazy: torch takes seconds to import

    cfg = _load_config(a)
    if a.spec:
        spec = config.parse_spec(_json(a.spec, "--spec"), "argument --spec")
    else:
        try:
            spec = config.cell_spec(cfg, a.dataset, a.method, a.backbone)
        except KeyError as e:
            raise ConfigError(e.args[0]) from None
    overrides = {
        k: v
        for k, v in (
            ("epochs", a.epochs),
            ("batch_size", a.batch_size),
            ("lr", a.lr),
            ("warmup_epochs", a.warmup_epochs),
            ("device", a.device),
            ("threads", a.threads),
        )
        if v is not None
    }
    config.check_ratio(a.dataset, a.ratio, spec["dataset_options"].get("profile", "exp"))
    _check_warmup_flags(a, {**spec["train"], **overrides})
    config.check_spec({**spec, "train": {**spec["train"], **overrides}})  # e.g. --epochs vs decoupled.fraction
    data_file = (
        Path(a.data)
        if a.data
        else data.prepared_path(
            cfg["results_dir"], a.dataset, a.ratio, cfg["datasets"].get(a.dataset, {}).get("subset_seed", 0)
        )
    )
    if not data_file.exists():
        dspec = data.get(a.dataset)
        opts = cfg["datasets"].get(a.dataset, {})
        if dspec.fetch is not None:
            dspec.fetch(Path(cfg["data_dir"]), opts)
        data.prepare(a.dataset, a.ratio, Path(cfg["data_dir"]), data_file, opts)
    data.check_prepared(data_file, a.dataset, a.ratio, spec["dataset_options"].get("profile", "exp"))
    m = train.run(spec, a.ratio, a.seed, data_file, a.out, overrides)
    if m is not None:  # None: a rank > 0 of a multi-GPU run (rank 0 reports)
        print(json.dumps({k: m[k] for k in ("top1", "many", "medium", "few", "wall_time_s")}))
    return 0


def cmd_inat_lists(a: argparse.Namespace) -> int:
    out_dir = Path(a.out_dir)
    for split, js in (("train", a.train_json), ("val", a.val_json)):
        info = imagelists.inat_to_list(js, out_dir / f"iNaturalist18_{split}.txt")
        print(json.dumps(info), file=sys.stderr)
    print(
        f"datasets:\n  inat2018:\n    root: <folder containing train_val2018/>\n"
        f"    train_list: {out_dir / 'iNaturalist18_train.txt'}\n    test_list: {out_dir / 'iNaturalist18_val.txt'}"
    )
    return 0


def cmd_aggregate(a: argparse.Namespace) -> int:
    from ltbench.analysis import aggregate  # lazy: pandas and scipy

    cfg = _load_config(a) if (a.config or a.config_json) else None
    try:
        aggregate.main(a.metrics, Path(a.out_dir), cfg, existing=a.existing)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return 0


def cmd_findings(a: argparse.Namespace) -> int:
    from ltbench.analysis import findings  # lazy: pandas

    if not (a.config or a.config_json):
        raise ConfigError("findings needs the workflow config (--config or --config-json): its experiments")
    findings.write(Path(a.aggregate_dir), _load_config(a))
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    from ltbench.tools import plan  # lazy: pandas

    path = a.configfile or a.config or "config/config.yaml"  # snakemake's default config file
    cfg = config.load(path)
    result = plan.plan(cfg, throughput_files=a.throughput or [])
    print(json.dumps(result, indent=2) if a.json else plan.format_text(result, path))
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from ltbench.tools import run  # lazy: pandas, scipy

    return run.main(a.configfile, a.snakemake_args, until_decided=a.until_decided)


def cmd_report(a: argparse.Namespace) -> int:
    from ltbench.report import page as report  # lazy: matplotlib, seaborn, pandas

    cfg = _load_config(a) if (a.config or a.config_json) else None
    report.main(Path(a.aggregate_dir), Path(a.out), cfg, figures_dir=a.figures_dir, tables_dir=a.tables_dir)
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from ltbench.tools import bench  # lazy: torch

    if a.suite:
        from ltbench.tools import gpu_suite  # lazy: torch

        result = gpu_suite.run(device=a.device, quick=a.quick)
        if a.out:
            io.write_text(a.out, bench.format_json(result) + "\n")
        print(gpu_suite.markdown(result))
        return 0 if result["cuda_tests"].get("failed", 0) == 0 else 1
    if a.layer:
        result = bench.layer_main(device=a.device, reps=a.steps)
    elif a.compare:
        result = bench.compare(
            [m.strip() for m in a.compare.split(",")],
            backbone=a.backbone,
            steps=a.steps,
            rounds=a.rounds,
            batch_size=a.batch_size,
            device=a.device,
            warmup=a.warmup,
        )
    else:
        result = bench.main(
            method=a.method,
            backbone=a.backbone,
            steps=a.steps,
            batch_size=a.batch_size,
            device=a.device,
            workers=a.workers,
            common=not a.no_common,
            config_path=a.config,
            warmup=a.warmup,
        )
    text = bench.format_json(result)
    if a.out:
        io.write_text(a.out, text + "\n")
    print(text)
    return 0


def _config_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", help="workflow config file (YAML): settings, datasets, recipes")
    s.add_argument("--config-json", help="the validated workflow config as JSON (what Snakemake passes)")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (``ltbench <subcommand>: error: ...``), without the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ltbench", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("counts", help="per-class training counts of a long-tailed dataset (JSON)")
    s.add_argument("--dataset", required=True)
    s.add_argument("--ratio", type=_float, required=True)
    s.add_argument("--profile", default="exp", choices=["exp", "step"])
    s.set_defaults(fn=cmd_counts)

    s = sub.add_parser("download", help="download and verify a dataset's original archive")
    s.add_argument("--dataset", required=True)
    _config_args(s)
    s.add_argument("--data-dir")
    s.add_argument("--done", help="write this marker file on success")
    s.set_defaults(fn=cmd_download)

    s = sub.add_parser("prepare", help="write the long-tailed subset of a dataset as .npz")
    s.add_argument("--dataset", required=True)
    s.add_argument("--ratio", type=_float, required=True)
    _config_args(s)
    s.add_argument("--data-dir")
    s.add_argument("--subset-seed", type=_schema_type("seed"), help="override the config's subset seed")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_prepare)

    s = sub.add_parser("train", help="train one cell and write metrics.json")
    s.add_argument("--dataset", required=True)
    s.add_argument("--ratio", type=_float, required=True)
    s.add_argument("--method", default="ce")
    s.add_argument("--backbone", default="resnet32")
    s.add_argument("--seed", type=_schema_type("seed"), default=0)
    s.add_argument("--out", required=True, help="output directory of the cell")
    _config_args(s)
    s.add_argument("--spec", help="resolved cell spec as JSON (what the Snakemake rule passes)")
    s.add_argument("--data", help="prepared .npz (default: prepared on demand under results_dir/data)")
    s.add_argument("--epochs", type=_schema_type("train", "epochs"))
    s.add_argument("--batch-size", type=_schema_type("train", "batch_size"))
    s.add_argument("--lr", type=_schema_type("train", "lr", float))
    s.add_argument(
        "--warmup-epochs", type=_schema_type("train", "warmup_epochs"), help="linear warmup epochs (below --epochs)"
    )
    s.add_argument("--device", choices=["auto", "cpu", "cuda"])
    s.add_argument("--threads", type=_schema_type("train", "threads"))
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("inat-lists", help="convert iNaturalist 2018 train/val json to '<path> <label>' lists")
    s.add_argument("--train-json", required=True, help="train2018.json")
    s.add_argument("--val-json", required=True, help="val2018.json (the test set)")
    s.add_argument("--out-dir", required=True, help="writes iNaturalist18_train.txt and iNaturalist18_val.txt")
    s.set_defaults(fn=cmd_inat_lists)

    s = sub.add_parser(
        "aggregate", help="collect metrics.json files into tidy tables (CSV) and compare with the papers"
    )
    s.add_argument("metrics", nargs="*", help="metrics.json files, or directories to search for them (recursively)")
    s.add_argument("--out-dir", required=True)
    s.add_argument(
        "--existing",
        action="store_true",
        help="also take every existing metrics.json of the config's cells (a partial grid)",
    )
    _config_args(s)
    s.set_defaults(fn=cmd_aggregate)

    s = sub.add_parser(
        "findings",
        help="(re)write an aggregate's findings.csv from its comparison.csv and gains.csv (an aggregate written "
        "before findings.csv existed; `aggregate` writes it itself)",
    )
    s.add_argument("--aggregate-dir", required=True)
    _config_args(s)
    s.set_defaults(fn=cmd_findings)

    s = sub.add_parser("report", help="write the self-contained HTML comparison report")
    s.add_argument("--aggregate-dir", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--figures-dir", help="figures (PNG + SVG) go here (default: next to --out)")
    s.add_argument("--tables-dir", help="paper-layout tables (HTML, Markdown, LaTeX) go here (default: next to --out)")
    _config_args(s)
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("plan", help="the grid of a config: cells per experiment, unique total, projected GPU-hours")
    s.add_argument("--configfile", help="workflow config file (YAML), as for snakemake")
    s.add_argument("--config", help=argparse.SUPPRESS)
    s.add_argument(
        "--throughput",
        action="append",
        metavar="FILE",
        help="measured speed: `ltbench bench --out` JSON or an aggregate runs.csv (repeatable)",
    )
    s.add_argument("--json", action="store_true", help="print the plan as JSON")
    s.set_defaults(fn=cmd_plan)

    s = sub.add_parser(
        "run",
        allow_abbrev=False,  # snakemake's --config must not read as --configfile
        help="run the workflow (snakemake); --until-decided: add seeds where sequential verdicts are undecided, "
        "round by round (every other argument goes to snakemake)",
    )
    s.add_argument("--configfile", required=True, help="workflow config file (YAML), given to snakemake too")
    s.add_argument(
        "--until-decided",
        action="store_true",
        help="repeat: run snakemake, judge the sequential experiments, extend their cells' seeds; until decided",
    )
    s.set_defaults(fn=cmd_run, snakemake_args=[])

    s = sub.add_parser("bench", help="training speed: resident-data fast path vs the common DataLoader recipe (JSON)")
    s.add_argument("--method", default="baseline", help="method recipe to benchmark (default: CBN's baseline)")
    s.add_argument("--backbone", default="resnet32")
    s.add_argument("--steps", type=_at_least(1), default=20, help="timed training steps per path")
    s.add_argument("--warmup", type=_at_least(0), default=3, help="untimed steps first")
    s.add_argument("--batch-size", type=_at_least(2), default=128)
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--workers", type=_at_least(0), default=4, help="DataLoader workers of the common recipe")
    s.add_argument("--no-common", action="store_true", help="only the fast path")
    s.add_argument("--config", help="also project the device-hours of this config's grid")
    s.add_argument("--out", help="also write the JSON here")
    s.add_argument(
        "--layer",
        action="store_true",
        help="instead: per-layer fwd+bwd ms of BatchNorm2d, a 3x3 conv and CBN M=4 (per pixel, per "
        "sample) on a 128x16x32x32 input, ratios to the conv, and the evaluation path against "
        "the bare model (--steps = timed repetitions)",
    )
    s.add_argument(
        "--compare",
        metavar="M1,M2,...",
        help="instead: the fast path of these methods in one process, in alternating rounds of "
        "--steps steps; images/s and the ratio of each to the first (medians over rounds)",
    )
    s.add_argument("--rounds", type=_at_least(1), default=5, help="rounds of --compare")
    s.add_argument(
        "--suite",
        choices=["gpu"],
        help="instead: the prepared GPU check (CUDA-only tests; baseline, baseline+cbn, baseline+cbn+sbn+dpl "
        "images/s eager, compiled, reduce-overhead and the common recipe; one train cell per method family); "
        "JSON to --out, a Markdown block for BENCHMARKS.md on stdout",
    )
    s.add_argument("--quick", action="store_true", help="--suite on tiny sizes (CPU: a few minutes)")
    s.set_defaults(fn=cmd_bench)
    return p


def _one_line(e: BaseException) -> str:
    """An error's message on one line (a list of problems joined by '; ')."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()] or [type(e).__name__]
    out = lines[0]
    for ln in lines[1:]:
        out += (" " if out.endswith(":") else "; ") + ln
    return out


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A bad input (an error typed at the boundary where it is read,
    :data:`ltbench.errors.USER_ERRORS`) ends with one line ``ltbench <subcommand>: error: <what>``
    and a non-zero exit; anything else is a bug and keeps its traceback. ``LTBENCH_TRACEBACK=1``
    shows the traceback of bad inputs too."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.cmd != "run":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd == "run":
        args.snakemake_args = extra  # everything ltbench run does not know goes to snakemake
    try:
        return args.fn(args)
    except Preempted as e:
        print(f"ltbench {args.cmd}: preempted: {e}; run the same command again to resume", file=sys.stderr)
        return EXIT_PREEMPTED
    except USER_ERRORS as e:
        if os.environ.get("LTBENCH_TRACEBACK"):
            raise
        print(f"ltbench {args.cmd}: error: {_one_line(e)}", file=sys.stderr)
        # a failure while running (download, lock, lists, divergence) 1; a bad value (config, flag, data file) 2
        return 1 if isinstance(e, (CellBusy, DownloadError, ListCheckError, FloatingPointError)) else 2
