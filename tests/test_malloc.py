"""`python -m ltbench` re-executes itself once with glibc's malloc keeping freed memory (ltbench/malloc.py)."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from ltbench import malloc


def test_tuned_environ_adds_the_tunables_once_and_respects_the_users():
    env = malloc.tuned_environ({"PATH": "/bin"}, libc="glibc")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": malloc.TUNABLES}
    assert malloc.tuned_environ(env, libc="glibc") is None  # already tuned: no second re-exec, no loop
    other = malloc.tuned_environ({"GLIBC_TUNABLES": "glibc.cpu.x86_shstk=on"}, libc="glibc")
    assert other["GLIBC_TUNABLES"] == f"glibc.cpu.x86_shstk=on:{malloc.TUNABLES}"  # appended, not replaced
    assert malloc.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, libc="glibc") is None  # user's
    assert malloc.tuned_environ({malloc.OPT_OUT: "1"}, libc="glibc") is None
    assert malloc.tuned_environ({malloc.OPT_OUT: "0"}, libc="glibc") is not None
    assert malloc.tuned_environ({}, libc="") is None  # not glibc (musl, macOS): nothing to do


def _child_tunables(extra_env: dict) -> str:
    """GLIBC_TUNABLES as a process that calls malloc.reexec() first (as `python -m ltbench` does) sees it."""
    code = "import os, ltbench.malloc as m; m.reexec(); print(os.environ.get('GLIBC_TUNABLES'))"
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", malloc.OPT_OUT)}
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**env, **extra_env}, capture_output=True, text=True, check=True
    )
    return p.stdout.strip()


def test_reexec_replaces_the_process_with_the_same_command_line():
    if malloc.tuned_environ({}) is None:
        pytest.skip("not glibc: reexec is a no-op (tuned_environ's test covers that)")
    assert _child_tunables({}) == malloc.TUNABLES  # the -c command ran again, in the tuned environment
    assert _child_tunables({malloc.OPT_OUT: "1"}) == "None"


def test_reexec_failure_runs_on_with_a_warning(monkeypatch, capsys):
    def refuse(*args):
        raise PermissionError("not allowed")

    monkeypatch.setattr(malloc.os, "execve", refuse)
    monkeypatch.setattr(malloc, "tuned_environ", lambda environ: {"GLIBC_TUNABLES": malloc.TUNABLES})
    malloc.reexec()  # returns instead of raising
    assert "could not apply the malloc settings" in capsys.readouterr().err
