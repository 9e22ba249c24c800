"""The package's shape: stage packages without import cycles, a torch-free DAG build, short
functions, and the part catalog (what a config may name) equal to the registries in ltbench.nn."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "ltbench"
MAX_FUNCTION_LINES = 80
# declarative argument parsers may be longer than a screen
LONG_ALLOWED = {("ltbench/cli.py", "build_parser")}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(top_level_only: bool = True) -> dict[str, set[str]]:
    """module → ltbench modules it imports (module level only, unless top_level_only is False)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        for node in nodes:
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ltbench"):
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("ltbench")]
            for t in targets:
                r = _resolve(t, mods)
                # a package importing its own submodules (registration) is not a dependency on itself
                if r and r != mod and not (mods[mod].name == "__init__.py" and r.startswith(mod + ".")):
                    graph[mod].add(r)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_find_cycle_detects_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_between_modules():
    """Counting function-local imports too: a lazy import must not hide a two-way dependency."""
    assert find_cycle(import_graph(top_level_only=False)) is None


def test_spec_and_data_never_import_the_later_stages():
    graph = import_graph(top_level_only=False)
    later = ("ltbench.nn", "ltbench.training", "ltbench.analysis", "ltbench.report", "ltbench.tools")
    for mod, deps in graph.items():
        if mod.startswith(("ltbench.spec", "ltbench.errors", "ltbench.registry")):
            assert not [d for d in deps if d.startswith(later + ("ltbench.data.sources", "ltbench.data.augment"))], mod


def test_building_the_dag_imports_no_torch():
    """What workflow/rules/common.smk imports, then the validation of the paper grid it runs."""
    code = (
        "import sys; from ltbench.errors import ConfigError; from ltbench.spec import catalog, config; "
        "from ltbench import data; cfg = config.load('config/config.yaml'); data.imagelists.check_config(cfg); "
        "config.cells(cfg); print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'torchvision', 'matplotlib')))"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
    smk = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    imported = {line.split()[1] for line in smk.splitlines() if line.startswith("from ltbench")}
    assert imported <= {"ltbench", "ltbench.errors", "ltbench.spec"}, imported


def _functions():
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT).as_posix(), node


def test_no_function_is_longer_than_a_screen():
    long = [
        f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, node in _functions()
        if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES and (path, node.name) not in LONG_ALLOWED
    ]
    assert not long, "functions over {} lines:\n  {}".format(MAX_FUNCTION_LINES, "\n  ".join(long))


def test_function_local_imports_say_why():
    """A function-local import is a deliberate lazy import of a heavy dependency, with its reason
    in a comment on the line, or above the block of imports it belongs to."""
    bare = []
    for path, node in _functions():
        lines = (ROOT / path).read_text().splitlines()
        for sub in ast.walk(node):
            if isinstance(sub, (ast.Import, ast.ImportFrom)) and sub.lineno != node.lineno:
                i = sub.lineno - 1
                while i > 0 and lines[i - 1].strip().startswith(("import ", "from ")) and "#" not in lines[i]:
                    i -= 1  # the block's first import, or one with its own comment
                if "#" not in lines[i] and not lines[i - 1].strip().startswith("#"):
                    bare.append(f"{path}:{sub.lineno}: {lines[sub.lineno - 1].strip()}")
    assert not bare, "function-local imports without a reason:\n  " + "\n  ".join(bare)


# --- the catalog of part names and defaults (torch-free) equals the registries ------------------------


def test_catalog_names_equal_the_registries():
    from ltbench.nn import backbones, losses, norm, sampling
    from ltbench.spec import catalog

    assert set(catalog.NORMS) == set(norm.NORMS)
    assert set(catalog.LOSSES) == set(losses.LOSSES)
    assert set(catalog.SAMPLERS) == set(sampling.SAMPLERS)
    assert set(catalog.BACKBONES) == set(backbones.BACKBONES)
    assert set(catalog.HEADS) == set(backbones.HEADS)


@pytest.mark.parametrize("kind", ["norm", "loss"])
def test_catalog_defaults_equal_each_factorys_keyword_defaults(kind):
    from ltbench.nn import losses, norm
    from ltbench.spec import catalog

    table, registry = (catalog.NORMS, norm.NORMS) if kind == "norm" else (catalog.LOSSES, losses.LOSSES)
    for name in registry:
        params = list(inspect.signature(registry.get(name)).parameters.values())[1:]
        defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        assert table[name] == defaults, f"catalog.{kind.upper()}S[{name!r}] differs from its factory's defaults"
