"""MkDocs hooks of the documentation site (mkdocs.yml `hooks:`).

- Generated sections: a page line ``<!-- ltbench:config-reference -->`` or
  ``<!-- ltbench:methods-catalogue -->`` is replaced, at build time, by the Markdown that
  ``ltbench.spec.docgen`` generates from the schema and the recipes: never copied by hand.
- The committed reports (``reports/*.html`` and their figures) become files of the site at the same
  paths, so a page links them as on GitHub, relative to its own file (``../reports/...`` from
  ``docs/``); such links are rewritten to the site's layout.
"""

from __future__ import annotations

import posixpath
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ltbench.spec import docgen  # noqa: E402  (after the repository is importable)

MARKERS = {
    "<!-- ltbench:config-reference -->": docgen.config_reference,
    "<!-- ltbench:methods-catalogue -->": docgen.methods_catalogue,
}
SITE_FILES = ("reports/*.html", "reports/*/figures/**/*.png", "reports/*/figures/**/*.svg")
LINK = re.compile(r"(\]\()([^)\s#]+)")


def on_files(files: Files, config) -> Files:
    for pattern in SITE_FILES:
        for path in sorted(ROOT.glob(pattern)):
            rel = path.relative_to(ROOT).as_posix()
            files.append(File(rel, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    for marker, generate in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, generate())
    docs = Path(config["docs_dir"]).resolve()
    here = Path(page.file.abs_src_path).parent

    def to_site(m: re.Match) -> str:
        target = m.group(2)
        if "://" in target or target.startswith(("/", "mailto:")):
            return m.group(0)
        path = (here / target).resolve()
        if path.is_relative_to(docs) or not path.is_relative_to(ROOT):
            return m.group(0)
        rel = path.relative_to(ROOT).as_posix()
        return m.group(1) + posixpath.relpath(rel, posixpath.dirname(page.file.src_uri) or ".")

    return LINK.sub(to_site, markdown)
