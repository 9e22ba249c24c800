"""`make lint`'s gates fail on what they are for: each runs, with the project's configuration, on a temporary
copy of one project file, clean (it passes) and with a planted defect (an unused import for ruff's linter, a
type error for mypy, an unformatted line for ruff's formatter and snakefmt, a rule without a log for
Snakemake's linter). The gates themselves are the lint extra (``pip install -e ".[lint]"``)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pyproject.toml"
MISSING = [m for m in ("ruff", "mypy", "snakefmt") if importlib.util.find_spec(m) is None]
needs_tools = pytest.mark.skipif(
    bool(MISSING), reason=f"the lint extra is not installed (no {', '.join(MISSING)}): pip install -e '.[lint]'"
)


def gate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def ruff_check(f: Path) -> subprocess.CompletedProcess:
    return gate("ruff", "check", "--no-cache", "--config", str(CONFIG), str(f), cwd=f.parent)


def ruff_format(f: Path) -> subprocess.CompletedProcess:
    return gate("ruff", "format", "--check", "--no-cache", "--config", str(CONFIG), str(f), cwd=f.parent)


def mypy(f: Path) -> subprocess.CompletedProcess:
    cache = str(f.parent / ".mypy_cache")
    return gate("mypy", "--config-file", str(CONFIG), "--cache-dir", cache, str(f), cwd=f.parent)


@pytest.fixture
def module(tmp_path: Path) -> Path:
    """A copy of ltbench/registry.py (standard library imports only, so mypy checks it alone)."""
    return Path(shutil.copy(ROOT / "ltbench" / "registry.py", tmp_path / "registry.py"))


def plant(f: Path, text: str, after: str = "from __future__ import annotations\n") -> None:
    src = f.read_text()
    assert after in src
    f.write_text(src.replace(after, after + text, 1))


@needs_tools
def test_the_clean_copy_passes_every_python_gate(module):
    for run in (ruff_check, ruff_format, mypy):
        p = run(module)
        assert p.returncode == 0, (run.__name__, p.stdout, p.stderr)


@needs_tools
def test_an_unused_import_fails_ruff_check(module):
    plant(module, "\nimport os\n")
    p = ruff_check(module)
    assert p.returncode != 0 and "F401" in p.stdout, p.stdout


@needs_tools
def test_a_type_error_fails_mypy(module):
    plant(module, '\n\ndef planted() -> int:\n    return "not an int"\n', after="Factory = Callable[..., Any]\n")
    assert ruff_check(module).returncode == 0  # formatted and lint-clean: only the types are wrong
    p = mypy(module)
    assert p.returncode != 0 and "[return-value]" in p.stdout, p.stdout


@needs_tools
def test_an_unformatted_line_fails_ruff_format(module):
    plant(module, 'PLANTED = {"a": 1,   "b": 2}\n', after="Factory = Callable[..., Any]\n")
    assert ruff_check(module).returncode == 0
    p = ruff_format(module)
    assert p.returncode != 0 and "would be reformatted" in p.stdout, p.stdout


@needs_tools
def test_an_unformatted_rule_file_fails_snakefmt(tmp_path):
    smk = Path(shutil.copy(ROOT / "workflow" / "rules" / "report.smk", tmp_path / "report.smk"))
    p = gate("snakefmt", "--check", "--config", str(CONFIG), str(smk), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    smk.write_text(smk.read_text() + "\n\nrule planted:\n    output: 'x'\n    shell: 'touch {output}'\n")
    p = gate("snakefmt", "--check", "--config", str(CONFIG), str(smk), cwd=tmp_path)
    assert p.returncode != 0 and "would be changed" in p.stderr, p.stderr


@pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake is not on PATH")
def test_a_rule_without_a_log_fails_snakemake_lint(tmp_path):
    (tmp_path / "Snakefile").write_text(
        'rule planted:\n    output:\n        "x",\n    shell:\n        "touch {output}"\n'
    )
    p = subprocess.run(
        ["snakemake", "--lint", "--dry-run", "--cores", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert p.returncode != 0 and "No log directive" in p.stdout + p.stderr


def test_make_lint_and_pre_commit_run_the_same_gates():
    """The Makefile's gates (which `make test` runs first) and the pre-commit hooks name the same commands."""
    make = (ROOT / "Makefile").read_text()
    gates = re.search(r"^LINT_GATES = (.*?[^\\])$", make, re.M | re.S)
    assert gates and re.search(r"^test: lint$", make, re.M)
    make_cmds = re.findall(r'"([^"]+)"', gates.group(1))
    assert len(make_cmds) == 5
    hooks = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"][0]["hooks"]
    assert [h["entry"] for h in hooks] == [f"python -m {c}" for c in make_cmds]
