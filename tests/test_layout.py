"""Layers point one way: common/ <- models/, dataset/ <- netcompress/ <- scripts
(README.md, "Layout"), and inside netcompress/ its packages in NETCOMPRESS_LAYERS
order. Read from the source, so any import, also one inside a function, counts."""

import ast
import os

import pytest

from helpers import REPO

PROJECT_PACKAGES = ("common", "models", "dataset", "netcompress")
SCRIPTS = ("train", "evaluate", "get_oracle_rank", "prun_model", "compress", "predict", "export")
# What each package may import from the project.
ALLOWED = {
    "common": {"common"},
    "models": {"common", "models"},
    "dataset": {"common", "dataset"},
    "netcompress": {"common", "models", "dataset", "netcompress"},
}
# netcompress/'s packages, lowest first: each imports only itself and those before it.
NETCOMPRESS_LAYERS = ("pruning_math", "formats", "settings", "graphs", "jobs")
# Modules only the tests may import.
TEST_MODULES = frozenset(os.path.splitext(name)[0]
                         for name in os.listdir(os.path.join(REPO, "tests"))
                         if name.endswith(".py"))


def imported_modules(path):
    """Every module ``path`` imports, dotted (``from a import b`` counts as
    ``a.b``: b may be a module)."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def project_imports(path):
    """The project's top-level packages and scripts that ``path`` imports."""
    return {name.split(".")[0] for name in imported_modules(path)} & \
        set(PROJECT_PACKAGES + SCRIPTS)


def netcompress_layers(path):
    """The netcompress packages that ``path`` imports."""
    parts = (name.split(".") for name in imported_modules(path))
    return {part[1] for part in parts if part[0] == "netcompress" and len(part) > 1}


def python_files(directory):
    return sorted(os.path.join(directory, name) for name in os.listdir(directory)
                  if name.endswith(".py"))


@pytest.mark.parametrize("package", PROJECT_PACKAGES)
def test_package_imports_only_lower_layers(package):
    directory = os.path.join(REPO, package)
    modules = python_files(directory)
    assert modules, f"no modules in {package}/"
    for path in modules:
        imported = project_imports(path)
        assert imported <= ALLOWED[package], \
            f"{package}/{os.path.basename(path)} imports {sorted(imported - ALLOWED[package])}"


def test_netcompress_is_its_packages_and_nothing_else():
    directory = os.path.join(REPO, "netcompress")
    packages = {name for name in os.listdir(directory)
                if os.path.isfile(os.path.join(directory, name, "__init__.py"))}
    assert packages == set(NETCOMPRESS_LAYERS)
    assert [os.path.basename(path) for path in python_files(directory)] == ["__init__.py"]


@pytest.mark.parametrize("layer", NETCOMPRESS_LAYERS)
def test_netcompress_package_imports_only_lower_packages(layer):
    allowed = set(NETCOMPRESS_LAYERS[:NETCOMPRESS_LAYERS.index(layer) + 1])
    modules = python_files(os.path.join(REPO, "netcompress", layer))
    assert len(modules) > 1, f"no modules in netcompress/{layer}/"
    for path in modules:
        imported = project_imports(path)
        assert imported <= ALLOWED["netcompress"], \
            f"netcompress/{layer}/{os.path.basename(path)} imports " \
            f"{sorted(imported - ALLOWED['netcompress'])}"
        above = netcompress_layers(path) - allowed
        assert not above, \
            f"netcompress/{layer}/{os.path.basename(path)} imports netcompress." \
            f"{sorted(above)[0]}, a package above {layer}"


def test_pruning_math_imports_no_tensorflow():
    for path in python_files(os.path.join(REPO, "netcompress", "pruning_math")):
        imported = {name.split(".")[0] for name in imported_modules(path)}
        assert "tensorflow" not in imported, f"{path} imports TensorFlow"


def _scripts():
    top = [os.path.join(REPO, f"{name}.py") for name in SCRIPTS]
    return top + python_files(os.path.join(REPO, "bench"))


def test_every_script_is_checked():
    listed = {os.path.basename(path) for path in python_files(REPO)}
    assert listed == {f"{name}.py" for name in SCRIPTS}


@pytest.mark.parametrize("path", _scripts(), ids=lambda path: os.path.relpath(path, REPO))
def test_script_imports_nothing_from_tests(path):
    imported = {name.split(".")[0] for name in imported_modules(path)}
    assert not imported & TEST_MODULES, \
        f"{os.path.relpath(path, REPO)} imports {sorted(imported & TEST_MODULES)} from tests/"


def test_the_check_sees_a_wrong_import(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from netcompress.settings.cli import run_main\n")
    assert project_imports(str(module)) == {"netcompress"}
    assert netcompress_layers(str(module)) == {"settings"}
    module.write_text("from netcompress import jobs\nimport helpers\n")
    assert netcompress_layers(str(module)) == {"jobs"}
    assert "helpers" in imported_modules(str(module)) and "helpers" in TEST_MODULES
