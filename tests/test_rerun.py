"""A failed grid is finished by rerunning the same command (real Snakemake, digits-lt, 1 epoch).

The three ways a run can fail: no cell finished, some finished, and finished cells whose rerun
failed (Snakemake deletes their metrics.json). Each time the onerror handler writes the partial
report beside the final one, and the next run must train every missing cell."""

import pytest
import yaml
from test_workflow import ROOT, snakemake

pytestmark = pytest.mark.slow


def _config(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    cfg.update(results_dir=str(tmp_path / "results"), reports_dir=str(tmp_path / "reports"), data_dir="data")
    cfg["train"].update(epochs=1, warmup_epochs=0, eval_every=1)
    cfg["experiments"] = {
        "demo": {
            "datasets": ["digits-lt"],
            "ratios": [10, 50],
            "methods": ["ce"],
            "backbones": ["resnet8"],
            "seeds": [0],
        }
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cfg, tmp_path, *args):
    p = snakemake(*args, "--cores", 2, "--keep-going", "--configfile", cfg, cwd=tmp_path)  # --configfile: nargs=+
    return p.returncode, p.stdout + p.stderr


def test_a_failed_grid_is_finished_by_rerunning_it(tmp_path):
    cfg = _config(tmp_path)
    res = tmp_path / "results"
    npz = {r: res / "data" / f"digits-lt_r{r}_s0.npz" for r in (10, 50)}
    cell = {r: res / "runs" / "digits-lt" / f"r{r}" / "ce" / "resnet8" / "s0" / "metrics.json" for r in (10, 50)}
    report, partial = tmp_path / "reports" / "demo.html", tmp_path / "reports" / "demo.partial.html"
    rc, out = _run(cfg, tmp_path, *npz.values())  # the prepared data only
    assert rc == 0, out[-3000:]
    good = {r: p.read_bytes() for r, p in npz.items()}

    def corrupt(*ratios):
        for r in ratios:
            npz[r].write_bytes(good[r][:1000])  # a truncated file: every train job on it fails

    def restore(*ratios):
        for r in ratios:
            npz[r].write_bytes(good[r])

    # 1. no cell finished: the partial report says so, and no rule's output is left behind
    corrupt(10, 50)
    rc, out = _run(cfg, tmp_path)
    assert rc != 0 and "partial report of the 0 finished cells of 2" in out, out[-3000:]
    assert partial.exists() and not report.exists() and not (res / "aggregate").exists()
    # 2. fixed for one ratio: the rerun trains both cells (one finishes, the other fails again)
    restore(10)
    rc, out = _run(cfg, tmp_path)
    assert rc != 0 and "partial report of the 1 finished cells of 2" in out, out[-3000:]
    assert cell[10].exists() and not cell[50].exists()
    # 3. fixed for both: the rerun trains the missing cell only and completes the grid
    restore(50)
    rc, out = _run(cfg, tmp_path)
    assert rc == 0, out[-3000:]
    assert cell[50].exists() and report.exists() and not partial.exists() and not (res / "partial").exists()
    assert "Nothing to be done" in _run(cfg, tmp_path, "-n")[1]
    # 4. finished cells whose rerun fails (newer input data): Snakemake deletes their metrics.json
    stamp = report.stat().st_mtime
    corrupt(10, 50)
    rc, out = _run(cfg, tmp_path)
    assert rc != 0 and "partial report of the 0 finished cells of 2" in out, out[-3000:]
    assert not cell[10].exists() and not cell[50].exists() and partial.exists()
    restore(10, 50)
    rc, out = _run(cfg, tmp_path)
    assert rc == 0, out[-3000:]
    assert cell[10].exists() and cell[50].exists() and report.stat().st_mtime > stamp and not partial.exists()
    assert "Nothing to be done" in _run(cfg, tmp_path, "-n")[1]
