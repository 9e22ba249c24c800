"""The documentation site (mkdocs.yml, docs/): generated reference pages, a strict build, and the
built site read in a headless browser.

The configuration reference and the methods catalogue are generated from the code's own sources
(ltbench/spec/docgen.py, called by docs/hooks.py at build time); these tests pin that every schema
key has a description and appears in the reference, that every built-in recipe and open detail is in
the catalogue, that `mkdocs build --strict` passes (and fails on a broken link), and that the built
site, served over HTTP and rendered by Chromium, shows the navigation and a generated page.
"""

from __future__ import annotations

import functools
import html
import http.server
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from ltbench.spec import docgen, methods

ROOT = Path(__file__).resolve().parents[1]
HAVE_MKDOCS = all(importlib.util.find_spec(m) for m in ("mkdocs", "material", "mkdocstrings_handlers.python"))
needs_mkdocs = pytest.mark.skipif(
    not HAVE_MKDOCS,
    reason='mkdocs, mkdocs-material or mkdocstrings[python] is not installed (pip install -e ".[docs]")',
)


def undocumented(schema: dict) -> list[str]:
    """Every configuration key whose schema node (after $ref) has no description."""
    return [path for _, keys in docgen.sections(schema) for path, node, _ in keys if not node.get("description")]


def count_properties(node) -> int:
    """Property entries anywhere in the raw schema: each is one key of the reference."""
    if isinstance(node, dict):
        own = len(node["properties"]) if isinstance(node.get("properties"), dict) else 0
        return own + sum(count_properties(v) for v in node.values())
    if isinstance(node, list):
        return sum(count_properties(v) for v in node)
    return 0


def test_every_schema_key_has_a_description():
    assert undocumented(docgen.load_schema()) == []


def test_a_key_without_a_description_is_caught():
    schema = docgen.load_schema()
    del schema["$defs"]["train"]["properties"]["epochs"]["description"]
    del schema["$defs"]["dataset"]["properties"]["expected"]["properties"]["classes"]["description"]
    assert undocumented(schema) == ["train.epochs", "datasets.<name>.expected.classes"]


def test_the_reference_has_one_row_per_schema_key():
    schema = docgen.load_schema()
    text = docgen.config_reference(schema)
    rows = re.findall(r"^\| `([^`]+)` \|", text, flags=re.M)
    assert len(rows) == len(set(rows)) == count_properties(schema)
    for key in ("name", "train.epochs", "datasets.<name>.root", "methods.<name>.decoupled.tau_grid"):
        assert key in rows
    assert "resources.cells[].gpu" in rows and "experiments.<name>.seeds" in rows
    epochs = next(line for line in text.splitlines() if line.startswith("| `train.epochs` |"))
    assert "| integer | `200` | ≥ 1 | Training epochs. |" in epochs


def test_the_catalogue_lists_every_builtin_recipe_and_open_detail():
    text = docgen.methods_catalogue()
    raw = yaml.safe_load((ROOT / "ltbench" / "spec" / "methods.yaml").read_text())
    for name in raw:
        assert f"| `{name}` |" in text, name
    for key in methods.OPEN_DETAILS:
        assert f"| `{key}` |" in text, key
    row = next(line for line in text.splitlines() if line.startswith("| `cbn-m2` |"))
    assert "`norm.options.num_components=2`" in row and "`consistency.weight=1.0`" in row
    assert docgen.open_detail_default("recipe.norm.options.responsibilities") == {"cbn": "pixel"}
    assert docgen.open_detail_default("train.warmup_per") == "step"


def _mkdocs(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd), "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if not HAVE_MKDOCS:
        pytest.skip('mkdocs, mkdocs-material or mkdocstrings[python] is not installed (pip install -e ".[docs]")')
    out = tmp_path_factory.mktemp("docs") / "site"
    p = _mkdocs("build", "--strict", "--site-dir", str(out), cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    return out


@needs_mkdocs
def test_the_site_builds_strict_with_the_generated_pages(site):
    config = html.unescape((site / "configuration" / "index.html").read_text())
    for _, keys in docgen.sections(docgen.load_schema()):
        for path, _, _ in keys:
            assert f"<code>{path}</code>" in config, path
    catalogue = (site / "methods" / "index.html").read_text()
    for name in methods.builtin():
        assert f"<code>{html.escape(name)}</code>" in catalogue, name
    assert "ltbench:config-reference" not in config  # the marker was replaced
    assert (site / "reports" / "fashion" / "figures" / "fashion_fig5" / "components.png").is_file()


@needs_mkdocs
def test_a_broken_link_fails_the_strict_build(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", repo / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "ltbench", repo / "ltbench", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copytree(ROOT / "reports", repo / "reports")
    shutil.copy2(ROOT / "mkdocs.yml", repo / "mkdocs.yml")
    shutil.copy2(ROOT / "BENCHMARKS.md", repo / "BENCHMARKS.md")
    with (repo / "docs" / "extending.md").open("a") as f:
        f.write("\nSee [the missing page](no-such-page.md).\n")
    p = _mkdocs("build", "--strict", "--site-dir", str(tmp_path / "site"), cwd=repo)
    assert p.returncode != 0
    assert "no-such-page.md" in p.stderr


def find_chromium() -> str | None:
    env = os.environ.get("LTBENCH_CHROMIUM")
    names = [env] if env else ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
    return next((p for n in names if (p := shutil.which(n))), None)


def rendered(url: str, binary: str, profile: Path) -> str:
    """The DOM of ``url`` after Chromium ran its scripts (headless ``--dump-dom``)."""
    argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
    argv += [f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def nav_titles(nav: list) -> list[str]:
    out = []
    for entry in nav:
        for title, target in entry.items():
            out.append(title)
            if isinstance(target, list):
                out += nav_titles(target)
    return out


@pytest.fixture
def served(site):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@needs_mkdocs
def test_the_built_site_renders_its_navigation_and_a_generated_page_in_a_browser(served, tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the site is not read in a browser")
    home = rendered(served + "/", binary, tmp_path / "profile")
    nav = re.search(r'<nav class="md-nav md-nav--primary".*?</nav>\s*</div>\s*</div>\s*</div>', home, flags=re.S)
    assert nav, "no primary navigation in the rendered page"
    labels = {html.unescape(" ".join(t.split())) for t in re.findall(r">([^<>]+)<", nav.group(0))}
    expected = nav_titles(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    assert [t for t in expected if t not in labels] == []
    html_tag = re.search(r"<html[^>]*>", home).group(0)
    assert "no-js" not in html_tag and re.search(r'class="[^"]*\bjs\b', html_tag), html_tag  # Material's scripts ran

    page = html.unescape(rendered(served + "/configuration/", binary, tmp_path / "profile"))
    for key in ("train.epochs", "datasets.<name>.subset_seed", "methods.<name>.strong_view.policy"):
        assert f"<code>{key}</code>" in page, key
    assert "Training epochs." in page
