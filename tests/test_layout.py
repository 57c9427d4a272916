"""Layers point one way: common/ <- models/, dataset/ <- netcompress/ <- scripts
(README.md, "Layout"). Read from the source, so any import, also one inside a
function, counts."""

import ast
import os

import pytest

from helpers import REPO

PROJECT_PACKAGES = ("common", "models", "dataset", "netcompress")
# What each package may import from the project.
ALLOWED = {
    "common": {"common"},
    "models": {"common", "models"},
    "dataset": {"common", "dataset"},
    "netcompress": {"common", "models", "dataset", "netcompress"},
}


def project_imports(path):
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names)
    return found & set(PROJECT_PACKAGES + ("train", "evaluate", "get_oracle_rank",
                                           "prun_model"))


@pytest.mark.parametrize("package", PROJECT_PACKAGES)
def test_package_imports_only_lower_layers(package):
    directory = os.path.join(REPO, package)
    modules = sorted(name for name in os.listdir(directory) if name.endswith(".py"))
    assert modules, f"no modules in {package}/"
    for name in modules:
        imported = project_imports(os.path.join(directory, name))
        assert imported <= ALLOWED[package], \
            f"{package}/{name} imports {sorted(imported - ALLOWED[package])}"


def test_the_check_sees_a_wrong_import(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from netcompress.cli import run_main\n")
    assert project_imports(str(module)) == {"netcompress"}
