"""The conda environments of the rules pin the same versions as pyproject.toml."""

import re

import tomllib
import yaml
from conftest import ROOT


def pins(requirements):
    out = {}
    for req in requirements:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^;\s]+)", req.strip())
        assert m, f"unpinned requirement {req!r}"
        out[m.group(1).lower()] = m.group(2)
    return out


def test_every_env_pins_the_versions_of_pyproject():
    project = pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    envs = sorted((ROOT / "envs").glob("*.yaml"))
    assert envs
    for env in envs:
        deps = yaml.safe_load(env.read_text())["dependencies"]
        pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
        got = pins(pip)
        for name, version in got.items():
            assert project.get(name) == version, f"{env.name}: {name}=={version}, pyproject has {project.get(name)}"
        # what the rules import: torch stack, pandas, plotting, sklearn (digits), scipy (t-tests), PIL (image
        # lists), yaml, jsonschema
        for needed in (
            "torch",
            "torchvision",
            "pandas",
            "matplotlib",
            "seaborn",
            "scikit-learn",
            "scipy",
            "numpy",
            "pillow",
            "pyyaml",
            "jsonschema",
        ):
            assert needed in got, f"{env.name} lacks {needed}"


def test_every_rule_has_log_and_conda():
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        for rule in re.split(r"\n(?=rule )", text)[1:]:
            name = rule.split(":")[0]
            assert "\n    log:" in rule, f"{smk.name}: {name} has no log:"
            assert "\n    conda:" in rule, f"{smk.name}: {name} has no conda:"


def test_every_third_party_import_of_the_package_is_pinned_in_the_envs():
    """What `python -m ltbench` imports (any module of the package) is in every rule's env."""
    import ast
    import sys

    dist = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml"}
    imported = set()
    for py in (ROOT / "ltbench").rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ("ltbench", "__future__")}
    assert {"torch", "pandas", "scipy"} <= third_party
    for env in sorted((ROOT / "envs").glob("*.yaml")):
        deps = yaml.safe_load(env.read_text())["dependencies"]
        got = pins(next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d))
        for module in sorted(third_party):
            assert dist.get(module, module).lower() in got, (
                f"{env.name} lacks {dist.get(module, module)} (imported as {module} by ltbench)"
            )
