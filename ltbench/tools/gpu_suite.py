"""`ltbench bench --suite gpu`: a GPU session's measurements as one prepared command.

In about 8 minutes of one H100 (``--quick``: tiny sizes, a few minutes of CPU, so that the suite runs
in the tests and cannot rot between GPU sessions) it runs, in this order:

1. the CUDA-only tests (``pytest -m cuda`` over the test files that mention CUDA; on a machine without
   CUDA they are skipped, and their skip reasons are recorded);
2. for ``baseline``, ``baseline+cbn`` and ``baseline+cbn+sbn+dpl`` on ResNet-32 with CIFAR-10-LT-shaped
   synthetic data (12,406 uint8 images of 3 × 32 × 32 resident on the device, per-sample augmentation
   on the device; on CUDA bf16 autocast, channels_last and the fused update:
   :class:`ltbench.tools.bench.FastLoop`) the training images/s eager, compiled (``torch.compile(model)``)
   and with ``torch.compile(model, mode="reduce-overhead")`` (CUDA graphs; not applicable without
   CUDA), beside the common recipe
   (torchvision DataLoader + CPU transforms, :func:`ltbench.tools.bench.run_common`) in the same
   process; the aten operators of one eager step (the launch budget: every one is a kernel launch or
   a host-side call on a GPU); the evaluation's images/s; and the projected wall time of a 400-epoch
   CIFAR-10-LT cell (training at that speed plus an evaluation of 10,000 images per epoch). A figure
   whose compilation fails (today: CBN's fused autograd Function, whose ``out=`` writes dynamo cannot
   trace) records the failure's reason instead of a number; graph breaks are counted;
3. one ``ltbench train`` cell per method family (2 epochs, or the fewest a decoupled recipe allows), as
   a separate process end to end, on the same synthetic CIFAR-10-LT data with ``amp: bf16`` and
   ``channels_last``; ``--quick`` trains them 1 epoch on digits-lt (ResNet-8).

On a CPU the loop and the cells run in float32 and contiguous (bf16 autocast is slow there; every
method's bf16 training is tested in ``tests/test_gpu_settings.py``), and ``--quick`` compiles with the
``aot_eager`` backend: dynamo's capture and AOT autograd, which is where a method's compilation
breaks, without inductor's C++ build (minutes on a small CPU).

:func:`run` returns the JSON; :func:`markdown` the block for BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from ltbench import data
from ltbench.errors import ConfigError
from ltbench.spec import config
from ltbench.tools import bench
from ltbench.training import trainer as train

ROOT = Path(__file__).resolve().parents[2]

#: The methods whose throughput the suite measures: plain BN, CBN, and the full CBN method (4 passes).
METHODS = ("baseline", "baseline+cbn", "baseline+cbn+sbn+dpl")
#: Training modes: the model as is, and ``torch.compile`` with the given mode.
MODES = {"eager": None, "compiled": "default", "reduce-overhead": "reduce-overhead"}
#: One end-to-end ``ltbench train`` cell per method family: family -> method.
FAMILIES = {
    "loss (LDAM-DRW)": "ldam-drw",
    "CBN + SBN + DPL": "baseline+cbn+sbn+dpl",
    "NBN": "nbn+rect",
    "decoupled (cRT)": "crt",
    "post hoc (τ-norm)": "tau-norm",
}
CIFAR10_LT_R100 = data.counts_for("cifar10", 100)  # 12,406 images
EPOCHS = 400  # the projected cell: CBN's 400 epochs on CIFAR-10-LT ρ = 100, 10,000 test images evaluated each


@dataclass(frozen=True)
class Sizes:
    """How big each part of the suite is (:data:`FULL` on a GPU, :data:`QUICK` to keep it running)."""

    backbone: str
    images: int
    batch_size: int
    steps: int
    warmup: int
    common_steps: int
    workers: int
    eval_images: int
    compile_backend: str  # inductor; aot_eager in --quick (inductor's C++ build takes minutes on a small CPU)
    cell_dataset: str
    cell_ratio: float
    cell_backbone: str
    cell_epochs: int
    cell_batch: int
    timeout_s: int  # each subprocess: the CUDA-only tests, one cell


FULL = Sizes("resnet32", sum(CIFAR10_LT_R100), 128, 30, 3, 20, 8, 10000, "inductor", "cifar10", 100, "resnet32", 2,
             128, 240)  # fmt: skip
QUICK = Sizes("resnet8", 64, 8, 2, 1, 2, 0, 64, "aot_eager", "digits-lt", 10, "resnet8", 1, 64, 120)


class _OpCount(TorchDispatchMode):
    """Counts the aten operators dispatched, views and allocations left out."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if not func.is_view and not func.__name__.startswith(("empty", "_to_copy", "detach")):
            self.ops += 1
        return func(*args, **(kwargs or {}))


def _reason(e: BaseException) -> str:
    """One line that says why a figure is missing."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def _graph_breaks() -> dict[str, Any]:
    breaks = counters["graph_break"]
    reasons = sorted({_reason_line(k) for k in breaks})
    return {"graph_breaks": int(sum(breaks.values())), "graph_break_reasons": reasons[:5]}


def _reason_line(text: str) -> str:
    return text.strip().splitlines()[0][:200] if text.strip() else ""


def _mode_figure(
    x: torch.Tensor, y: torch.Tensor, method: str, sizes: Sizes, dev: torch.device, mode: str
) -> dict[str, Any]:
    """Images/s of ``method``'s fast loop in ``mode`` (the failure's reason where it does not run)."""
    cuda = dev.type == "cuda"
    if mode == "reduce-overhead" and not cuda:
        return {"images_per_s": None, "skipped": "CUDA graphs need a CUDA device"}
    torch.manual_seed(0)
    loop = bench.FastLoop(x, y, method, sizes.backbone, sizes.batch_size, dev, amp=cuda, channels_last=cuda)
    out: dict[str, Any] = {}
    if MODES[mode] is not None:
        torch._dynamo.reset()  # a fresh cache: no recompile limit carried over from the last figure
        counters.clear()
        if sizes.compile_backend == "inductor":
            loop.model = torch.compile(loop.model, mode=MODES[mode])
        else:
            loop.model = torch.compile(loop.model, backend=sizes.compile_backend)
        if mode == "reduce-overhead":
            loop.step_begin = torch.compiler.cudagraph_mark_step_begin
    try:
        t0 = time.perf_counter()
        loop.run(sizes.warmup)
        out["warmup_s"] = round(time.perf_counter() - t0, 2)  # compilation included
        dt = loop.run(sizes.steps)
        loss = float(loop.total) / loop.done
        if not np.isfinite(loss):
            raise FloatingPointError(f"mean training loss {loss}")
        out |= {
            "images_per_s": round(sizes.steps * sizes.batch_size / dt, 1),
            "step_time_ms": round(1000 * dt / sizes.steps, 3),
        }
    except Exception as e:  # noqa: BLE001  (a figure that fails is recorded, the suite goes on)
        out |= {"images_per_s": None, "error": _reason(e)}
    if MODES[mode] is not None:
        out |= _graph_breaks()
        torch._dynamo.reset()
    elif "error" not in out:
        out["ops_per_step"] = _ops_per_step(loop)
        with train.autocast(dev, cuda):
            out["eval_images_per_s"] = round(bench.eval_images_per_s(loop.model, dev, sizes.eval_images), 1)
    return out


def _ops_per_step(loop: bench.FastLoop) -> int:
    count = _OpCount()
    with count:
        loop.run(1)
    return count.ops


def _projected_s(ips: float | None, eval_ips: float | None) -> float | None:
    """Wall seconds of a 400-epoch CIFAR-10-LT ρ = 100 cell at ``ips`` training and ``eval_ips`` test images/s."""
    if not ips or not eval_ips:
        return None
    return round(EPOCHS * (sum(CIFAR10_LT_R100) / ips + 10000 / eval_ips), 1)


def throughput(sizes: Sizes, dev: torch.device, methods_: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Per method: every mode's figure beside the common recipe's, and the projected cell wall time."""
    x, y = bench._synthetic(sizes.images)
    out: dict[str, Any] = {}
    for m in methods_:
        row = {mode: _mode_figure(x, y, m, sizes, dev, mode) for mode in MODES}
        try:
            c = bench.run_common(x, y, m, sizes.backbone, sizes.common_steps, sizes.batch_size, dev, sizes.workers, 1)
            row["common"] = {"images_per_s": round(c["images_per_s"], 1), "step_time_ms": round(c["step_time_ms"], 3)}
        except Exception as e:  # noqa: BLE001
            row["common"] = {"images_per_s": None, "error": _reason(e)}
        eval_ips = row["eval_images_per_s"] = row["eager"].pop("eval_images_per_s", None)
        row["ops_per_step"] = row["eager"].pop("ops_per_step", None)
        row[f"projected_{EPOCHS}_epoch_wall_s"] = {
            k: _projected_s(row[k]["images_per_s"], eval_ips) for k in (*MODES, "common")
        }
        out[m] = row
    return out


def cuda_tests(sizes: Sizes) -> dict[str, Any]:
    """``pytest -m cuda`` over the test files that mention CUDA: counts, and every skip reason."""
    tests = ROOT / "tests"
    files = sorted(str(p) for p in tests.glob("test_*.py") if "torch.cuda.is_available()" in p.read_text())
    if not files:
        return {"ran": False, "reason": f"no test files under {tests}"}
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", *files]
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=sizes.timeout_s)
    except subprocess.TimeoutExpired:
        return {"ran": True, "returncode": None, "reason": f"timed out after {sizes.timeout_s} s"}
    text = p.stdout + p.stderr
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", text)}
    skips = sorted({m.strip() for m in re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", text)})
    return {
        "ran": True,
        "files": [Path(f).name for f in files],
        "returncode": p.returncode,
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0),
        "skipped": counts.get("skipped", 0),
        "skip_reasons": skips,
        "tail": text[-1500:] if p.returncode not in (0, 5) else "",  # 5: nothing selected
    }


def _cell_spec(method: str, sizes: Sizes, dev: torch.device) -> dict:
    """``method``'s cell with a CUDA run's settings, at the suite's epochs or the fewest its stages allow."""
    cuda = dev.type == "cuda"
    t = {"batch_size": sizes.cell_batch, "device": dev.type, "amp": "bf16" if cuda else "none", "channels_last": cuda}
    t |= {"checkpoint_every": 0, "warmup_epochs": 0, "diag_images": sizes.eval_images}
    for epochs in range(sizes.cell_epochs, 21):
        exp = {"datasets": [sizes.cell_dataset], "ratios": [sizes.cell_ratio], "methods": [method]}
        cfg = {"train": {**t, "epochs": epochs}, "experiments": {"e": {**exp, "backbones": [sizes.cell_backbone]}}}
        try:
            return config.cell_spec(config.validate(cfg), sizes.cell_dataset, method, sizes.cell_backbone)
        except ConfigError as e:
            if "leaves no" not in str(e):
                raise
    raise ConfigError(f"method {method!r}: no epoch count up to 20 gives both decoupled stages an epoch")


def synthetic_cifar10_lt(path: Path) -> Path:
    """A CIFAR-10-LT ρ = 100-shaped prepared file of random uint8 images (the class sizes of the real
    one, 10,000 test and 1,000 validation images): what the cells train on where nothing is downloaded."""
    g = np.random.default_rng(0)
    counts = np.array(CIFAR10_LT_R100)
    ys = {"train": np.repeat(np.arange(10), counts), "test": np.repeat(np.arange(10), 1000)}
    ys["val"] = np.repeat(np.arange(10), 100)
    arrays = {f"{k}_y": v.astype(np.int64) for k, v in ys.items()}
    arrays |= {f"{k}_x": g.integers(0, 256, (len(v), 3, 32, 32), dtype=np.uint8) for k, v in ys.items()}
    np.savez(path, counts=counts, **arrays)  # type: ignore[arg-type]  # numpy's stub reads **arrays as allow_pickle
    return path


def _cell_data(sizes: Sizes, tmp: Path) -> Path:
    if sizes.cell_dataset == "cifar10":
        return synthetic_cifar10_lt(tmp / "cifar10-lt-synthetic.npz")
    out = tmp / f"{sizes.cell_dataset}.npz"
    data.prepare(sizes.cell_dataset, sizes.cell_ratio, tmp, out)  # digits-lt: embedded, nothing downloaded
    return out


def cells(sizes: Sizes, dev: torch.device, families: dict[str, str] = FAMILIES) -> dict[str, Any]:
    """One ``python -m ltbench train`` process per method family: exit status, top-1, images/s, wall time."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ltbench-suite-") as tmp_:
        tmp = Path(tmp_)
        data_file = _cell_data(sizes, tmp)
        for family, method in families.items():
            out[family] = _cell(method, sizes, dev, data_file, tmp / re.sub(r"\W+", "_", method))
    return out


def _cell(method: str, sizes: Sizes, dev: torch.device, data_file: Path, cell_dir: Path) -> dict[str, Any]:
    spec = _cell_spec(method, sizes, dev)
    args = ["--dataset", sizes.cell_dataset, "--ratio", str(sizes.cell_ratio), "--method", method]
    args += ["--backbone", sizes.cell_backbone, "--spec", json.dumps(spec), "--data", str(data_file)]
    cmd = [sys.executable, "-m", "ltbench", "train", *args, "--out", str(cell_dir)]
    row: dict[str, Any] = {"method": method, "epochs": spec["train"]["epochs"]}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=sizes.timeout_s, env=_env())
    except subprocess.TimeoutExpired:
        return row | {"returncode": None, "error": f"timed out after {sizes.timeout_s} s"}
    row |= {"returncode": p.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
    if p.returncode != 0:
        return row | {"error": p.stderr.strip()[-600:]}
    m = json.loads((cell_dir / "metrics.json").read_text())
    return row | {
        "top1": round(m["top1"], 2),
        "train_images_per_s": round(m["images_per_s"], 1),
        "train_time_s": round(m["train_time_s"], 1),
        "device": m["device"],
        "cbn_kernel": m["environment"].get("cbn_kernel"),
    }


def _env() -> dict[str, str]:
    """The subprocesses import this checkout's ltbench."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def run(device: str = "auto", quick: bool = False) -> dict[str, Any]:
    """The whole suite (module docstring) as JSON."""
    dev = train.pick_device(device)
    sizes = QUICK if quick else FULL
    t0 = time.time()
    result: dict[str, Any] = {
        "suite": "gpu",
        "quick": quick,
        "command": "python -m ltbench bench --suite gpu"
        + (f" --device {device}" if device != "auto" else "")
        + (" --quick" if quick else ""),
        "date": time.strftime("%Y-%m-%d"),
        "device": bench._device_name(dev),
        "torch": torch.__version__,
        "sizes": asdict(sizes),
        "settings": {
            "amp": "bf16" if dev.type == "cuda" else "none",  # CPU: bf16 is tested (tests/test_gpu_settings.py), slow
            "channels_last": dev.type == "cuda",
            "optimizer": train.optimizer_kernel(dev) or "default",
        },
    }
    result["section_wall_s"] = {}
    parts: tuple[tuple[str, Callable[[], Any]], ...] = (
        ("cuda_tests", lambda: cuda_tests(sizes)),
        ("throughput", lambda: throughput(sizes, dev)),
        ("cells", lambda: cells(sizes, dev)),
    )
    for name, part in parts:
        t1 = time.time()
        result[name] = part()
        result["section_wall_s"][name] = round(time.time() - t1, 1)
    result["wall_s"] = round(time.time() - t0, 1)
    return result


def _fmt(v: float | None, error: str | None = None) -> str:
    if v is None:
        return "failed¹" if error else "n/a"
    return f"{v:,.0f}"


def _minutes(s: float | None) -> str:
    return "–" if s is None else f"{s / 60:,.0f} min"


def markdown(r: dict[str, Any]) -> str:
    """The Markdown block for BENCHMARKS.md: the throughput table, the failures, the tests and the cells."""
    s = r["sizes"]
    lines = [
        f"#### GPU suite: {r['device']}, torch {r['torch']}, {r['date']}",
        "",
        f"`{r['command']}` ({r['wall_s']:.0f} s). Fast loop: {s['backbone']}, {s['images']:,} synthetic "
        f"3 × 32 × 32 images resident on the device, batch {s['batch_size']}, amp {r['settings']['amp']}, "
        f"channels_last {r['settings']['channels_last']}, "
        f"{s['steps']} timed steps; compiled with {s['compile_backend']}. Common recipe: DataLoader "
        f"({s['workers']} workers) + CPU transforms, fp32. Projection: {EPOCHS} epochs of CIFAR-10-LT ρ = 100 "
        "plus 10,000 test images an epoch.",
        "",
        "| method | eager img/s | compiled | reduce-overhead | common recipe | eager ÷ common | aten ops/step "
        f"| {EPOCHS}-epoch cell: eager / compiled / reduce-overhead / common |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes: list[str] = []
    skipped: set[str] = set()
    for m, row in r["throughput"].items():
        cells_ = [_fmt(row[k]["images_per_s"], row[k].get("error")) for k in (*MODES, "common")]
        e, c = row["eager"]["images_per_s"], row["common"]["images_per_s"]
        ratio = f"{e / c:.1f}×" if e and c else "–"
        proj = " / ".join(_minutes(v) for v in row[f"projected_{EPOCHS}_epoch_wall_s"].values())
        lines.append(f"| {m} | {' | '.join(cells_[:1])} | {' | '.join(cells_[1:])} | {ratio} | "
                     f"{_fmt(row['ops_per_step'])} | {proj} |")  # fmt: skip
        notes += [f"- ¹ {m}, {k}: {row[k]['error']}" for k in (*MODES, "common") if row[k].get("error")]
        skipped.update({f"- n/a, {k}: {row[k]['skipped']}" for k in MODES if row[k].get("skipped")})
        notes += [
            f"- {m}, {k}: {row[k]['graph_breaks']} graph breaks ({'; '.join(row[k]['graph_break_reasons'])})"
            for k in MODES
            if row[k].get("graph_breaks")
        ]
    notes += sorted(skipped)
    lines += ["", *notes, *([""] if notes else []), _tests_line(r["cuda_tests"]), ""]
    lines += [
        "| family | method | epochs | exit | top-1 | train img/s | wall s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for fam, c in r["cells"].items():
        lines.append(
            f"| {fam} | {c['method']} | {c['epochs']} | {c['returncode']} | {c.get('top1', '–')} | "
            f"{_fmt(c.get('train_images_per_s'))} | {c.get('wall_s', '–')} |"
        )
    lines += [f"- {fam}: {c['error']}" for fam, c in r["cells"].items() if c.get("error")]
    return "\n".join(lines) + "\n"


def _tests_line(t: dict[str, Any]) -> str:
    if not t.get("ran") or t.get("returncode") is None:
        return f"CUDA-only tests: not run ({t.get('reason')})."
    line = f"CUDA-only tests (`pytest -m cuda`): {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
    return line + (f" ({'; '.join(t['skip_reasons'])})." if t["skip_reasons"] else ".")
