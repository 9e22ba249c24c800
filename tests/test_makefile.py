"""The README's `make demo` / `make test`: which Python environment they install into and run from.

Outside an active virtual or conda environment the Makefile creates `.venv/` in the project, so a
distribution's externally managed Python (PEP 668) works; inside one it uses that one. `.ci/run`
runs `make test` with Debian's own /usr/bin/python3 from a fresh clone (the full install path);
these tests pin the Makefile's choices and the stock-interpreter mechanism cheaply.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(*args, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHON", "MAKEFLAGS")}
    env.update(env_extra or {})
    return subprocess.run(
        ["make", "-f", str(ROOT / "Makefile"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_outside_an_environment_make_creates_and_uses_dot_venv(tmp_path):
    p = make("-n", "test", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "python3 -m venv .venv" in p.stdout
    assert '.venv/bin/python -m pip install --quiet -e ".[test,slurm,docs,lint]"' in p.stdout
    assert ".venv/bin/python -m pytest -q" in p.stdout
    assert f'PATH="{tmp_path}/.venv/bin:' in p.stdout  # the environment's snakemake/python first
    # make lint's gates run before the test suite (tests/test_lint.py: what each gate catches)
    assert -1 < p.stdout.index('"ruff check ltbench tests"') < p.stdout.index("-m pytest -q")


@pytest.mark.parametrize("var", ["VIRTUAL_ENV", "CONDA_PREFIX"])
def test_inside_an_active_environment_make_uses_it(tmp_path, var):
    p = make("-n", "demo", cwd=tmp_path, env_extra={var: str(tmp_path / "env")})
    assert p.returncode == 0, p.stderr
    assert "-m venv" not in p.stdout and ".venv" not in p.stdout
    assert 'python3 -m pip install --quiet -e ".[test,slurm,docs,lint]"' in p.stdout
    assert "python3 -m snakemake --cores 2 --configfile config/demo.yaml" in p.stdout


def test_a_python_without_venv_gets_the_package_to_install(tmp_path):
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\nexit 1\n")  # `import venv, ensurepip` fails, as on Debian without python3-venv
    fake.chmod(0o755)
    p = make("install", f"BASE_PYTHON={fake}", cwd=tmp_path)
    assert p.returncode != 0
    assert "apt-get install python3-venv" in p.stderr
    assert not (tmp_path / ".venv").exists()


def _externally_managed(python: str) -> bool:
    code = (
        "import os, sys, sysconfig; print(sys.prefix == sys.base_prefix and "
        "os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))"
    )
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip() == "True"


STOCK = "/usr/bin/python3"


@pytest.mark.skipif(
    not (os.path.exists(STOCK) and _externally_managed(STOCK)),
    reason=f"{STOCK} is not an externally managed interpreter (PEP 668) on this machine",
)
def test_the_venv_the_makefile_creates_from_an_externally_managed_python_accepts_pip(tmp_path):
    """pip refuses to install into the stock interpreter; into the `.venv` that make creates it installs."""
    refused = subprocess.run(
        [STOCK, "-m", "pip", "install", "--dry-run", "--no-index", "ltbench-absent"], capture_output=True, text=True
    )
    if "No module named pip" not in refused.stderr:
        assert "externally-managed-environment" in refused.stderr + refused.stdout
    p = make(".venv/bin/python", f"BASE_PYTHON={STOCK}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    venv_python = str(tmp_path / ".venv" / "bin" / "python")
    assert not _externally_managed(venv_python)
    q = subprocess.run(
        [venv_python, "-m", "pip", "install", "--dry-run", "--no-index", "ltbench-absent"],
        capture_output=True,
        text=True,
    )
    assert "externally-managed-environment" not in q.stderr + q.stdout
    assert "No matching distribution found for ltbench-absent" in q.stderr


def test_ci_runs_the_readme_test_command_with_the_stock_python():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'make test BASE_PYTHON="$BASE_PYTHON"' in ci and "BASE_PYTHON=/usr/bin/python3" in ci
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and ".venv" in readme
