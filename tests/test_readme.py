"""Every shell command of the ```bash blocks of the README and of the documentation pages (docs/**/*.md)
runs as written, in order (the README first, then the pages by path), after the demo.

A command that cannot run on an offline CPU machine says why at its end, ``# needs: <what>``; it
is skipped here with that reason (and listed in the test's output). ``make demo`` and ``make test``
are this test's precondition and its caller (with the ``make lint`` that ``make test`` runs first):
the test runs in a copy of the repository where a short demo (one experiment, one seed, two epochs)
has run, so the commands see ``results/demo``. Commands that train get tiny epochs (``--epochs 1``,
``--warmup-epochs 0``); paths under /tmp go to the test's folder. A ``python -m MODULE`` command whose
module is not installed (e.g. mkdocs without the docs extra) is skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PRECONDITIONS = {"make demo", "make test", "make lint", "source .venv/bin/activate"}
NEEDS = re.compile(r"#\s*needs:\s*(.+)$")


def readme_commands(text: str) -> list[tuple[str, str | None]]:
    """(command, reason to skip or None) for every command of every ```bash block, in order;
    backslash continuations joined, comments stripped."""
    out, block, joined = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            block = [] if line.strip() == "```bash" and block is None else None
            continue
        if block is None:
            continue
        joined += line.rstrip()
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        full, joined = joined, ""
        need = NEEDS.search(full)
        cmd = " ".join(full.split("#", 1)[0].split())
        if cmd:
            out.append((cmd, need.group(1).strip() if need else None))
    return out


def documented_commands() -> list[tuple[str, str, str | None]]:
    """(file, command, reason or None) for the README and every docs page, in the order they run."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [(p.relative_to(ROOT).as_posix(), c, r) for p in pages for c, r in readme_commands(p.read_text())]


def test_the_docs_pages_commands_are_collected():
    files = {f for f, _, _ in documented_commands()}
    assert "README.md" in files and "docs/index.md" in files
    assert ("docs/index.md", "make docs-serve") in {(f, c) for f, c, _ in documented_commands()}


def _missing_module(argv: list[str]) -> str | None:
    if argv[:2] == ["python", "-m"] and len(argv) > 2 and importlib.util.find_spec(argv[2]) is None:
        return f"{argv[2]} is not installed"
    return None


def test_readme_commands_are_parsed_with_their_reasons():
    cmds = readme_commands("```bash\nls -l \\\n   /x   # c\nfoo  # needs: a GPU\n```\n```\nnot bash\n```\n")
    assert cmds == [("ls -l /x", None), ("foo", "a GPU")]


def _copy_repo(dst: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, text=True
    )
    if files.returncode != 0:
        shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".git", ".venv", "results", "reports", "data"))
        return
    for rel in filter(None, files.stdout.split("\0")):
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)


@pytest.mark.slow
def test_every_offline_readme_and_docs_command_runs_after_the_demo(tmp_path):
    repo, scratch = tmp_path / "repo", tmp_path / "tmp"
    repo.mkdir()
    scratch.mkdir()
    _copy_repo(repo)
    cfg = yaml.safe_load((repo / "config" / "demo.yaml").read_text())
    cfg["experiments"] = {"demo": {**cfg["experiments"]["demo"], "seeds": [0], "methods": ["ce", "nbn"]}}
    cfg["train"].update(epochs=2, warmup_epochs=1)
    (repo / "config" / "demo.yaml").write_text(yaml.safe_dump(cfg))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(repo),
        "OMP_NUM_THREADS": "1",
    }
    demo = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "config/demo.yaml"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]

    skipped = []
    for where, cmd, need in documented_commands():
        need = need or _missing_module(shlex.split(cmd))
        if cmd in PRECONDITIONS or need:
            skipped.append(f"{where}: {cmd}  ({need or 'precondition of this test'})")
            continue
        cmd = re.sub(r"--epochs \d+", "--epochs 1", cmd).replace("/tmp/", f"{scratch}/")
        cmd = re.sub(r"--warmup-epochs \d+", "--warmup-epochs 0", cmd)
        argv = shlex.split(cmd)
        argv[0] = sys.executable if argv[0] == "python" else argv[0]
        p = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{where} command failed ({p.returncode}): {cmd}\n{p.stderr[-3000:]}"
    print("skipped commands:\n  " + "\n  ".join(skipped))
    assert (scratch / "report.html").exists() and (scratch / "agg" / "summary.csv").exists()


def test_readme_carries_the_committed_fashion_findings():
    """The README's findings block is the committed report's findings.md (regenerate both together)."""
    block = (ROOT / "reports" / "fashion" / "tables" / "findings.md").read_text()
    assert block in (ROOT / "README.md").read_text()
