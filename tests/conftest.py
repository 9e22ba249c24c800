import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)


def run_cli(*args, check=True, cwd=ROOT, timeout=600):
    """Run ``python -m ltbench ...`` in a subprocess; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "ltbench", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"ltbench {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}")
    return p


def pytest_collection_modifyitems(config, items):
    """Mark ``cuda`` every test that needs a CUDA device: skipped for want of it (its skipif reason says
    CUDA) or parametrized on the device "cuda"; ``ltbench bench --suite gpu`` selects them with ``-m cuda``."""
    for item in items:
        reasons = [m.kwargs.get("reason", "") for m in item.iter_markers("skipif")]
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any("CUDA" in r for r in reasons) or "cuda" in params.values():
            item.add_marker(pytest.mark.cuda)


@pytest.fixture
def cli():
    return run_cli
