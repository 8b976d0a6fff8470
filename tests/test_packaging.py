"""The built wheel ships exactly one import package, ``labvault``, with every subpackage.

The repository keeps the design's top-level folders (policies/, datastore/, ...) and
pyproject.toml maps them under ``labvault.*`` with an explicit package list. These tests build
a real wheel and check that nothing generic ("extension", "widgets") lands at the top of
site-packages, that no subpackage was forgotten in that list, and that the unpacked wheel
imports on its own (not from the working tree).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]

# Folders of the design's folder map and the import names they must install as.
EXPECTED_PACKAGE_DIRS = {
    "labvault": "labvault",
    "labvault.policies": "policies",
    "labvault.datastore": "datastore",
    "labvault.hub": "jupyterhub_config",
    "labvault.extension": "extension",
    "labvault.kernels": "kernels",
    "labvault.widgets": "widgets",
}

REQUIRED_FILES = [
    "labvault/__init__.py",
    "labvault/policies/__init__.py",
    "labvault/datastore/__init__.py",
    "labvault/hub/__init__.py",
    "labvault/extension/__init__.py",
    "labvault/kernels/__init__.py",
    "labvault/widgets/__init__.py",
    "labvault/datastore/migrations/env.py",
    "labvault/kernels/environments/python-scientific.toml",  # the shipped environment catalogue
]

IMPORTS = [
    "labvault",
    "labvault.policies",
    "labvault.datastore",
    "labvault.datastore.migrations",
    "labvault.hub",
    "labvault.extension",
    "labvault.kernels",
    "labvault.widgets",
]

# Never copied into the scratch source tree the wheel is built from: generated or local state
# at the top of the repository, and caches anywhere.
_TOP_LEVEL_SKIP = {
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "var",
    "test-artifacts",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "node_modules",
}
_ANYWHERE_SKIP = {"__pycache__", "node_modules"}


def _copy_ignore(directory: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n in _ANYWHERE_SKIP or n.endswith((".pyc", ".egg-info"))}
    if Path(directory).resolve() == REPO_ROOT:
        skip |= _TOP_LEVEL_SKIP.intersection(names)
    return skip


def _pyproject() -> dict:
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _package_dirs() -> dict[str, str]:
    return dict(_pyproject()["tool"]["setuptools"]["package-dir"])


@pytest.fixture(scope="module")
def wheel_path(tmp_path_factory) -> Path:
    # Build from a scratch copy of the working tree: building in place would write build/ and
    # *.egg-info into the repository, and stale files left in build/lib by an earlier build end
    # up in the wheel -- hiding exactly the "forgotten subpackage" mistakes tested here.
    src = tmp_path_factory.mktemp("src") / "labvault-src"
    shutil.copytree(REPO_ROOT, src, ignore=_copy_ignore, symlinks=True)
    out = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    if proc.returncode != 0:
        pytest.fail(
            "pip wheel failed (it builds with this interpreter's own setuptools/wheel; "
            "`make venv` installs pyproject's [build-system].requires):\n"
            + proc.stdout[-3000:]
            + proc.stderr[-3000:]
        )
    wheels = sorted(out.glob("labvault-*.whl"))
    assert len(wheels) == 1, f"expected one labvault wheel in {out}, got {os.listdir(out)}"
    return wheels[0]


@pytest.fixture(scope="module")
def wheel_names(wheel_path) -> set[str]:
    with zipfile.ZipFile(wheel_path) as zf:
        return {n for n in zf.namelist() if not n.endswith("/")}


@pytest.fixture(scope="module")
def unpacked(wheel_path, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(wheel_path) as zf:
        zf.extractall(dest)
    return dest


def test_pyproject_maps_the_design_folders_under_labvault():
    assert _package_dirs() == EXPECTED_PACKAGE_DIRS


def test_only_labvault_at_top_level(wheel_names):
    allowed = re.compile(r"^(labvault|labvault-[^/]+\.dist-info|labvault-[^/]+\.data)$")
    top = {name.split("/", 1)[0] for name in wheel_names}
    unexpected = sorted(t for t in top if not allowed.match(t))
    assert not unexpected, f"wheel installs generic top-level names: {unexpected}"
    assert "labvault" in top
    assert any(t.endswith(".dist-info") for t in top)


@pytest.mark.parametrize("path", REQUIRED_FILES)
def test_required_file_shipped(wheel_names, path):
    assert path in wheel_names


def _expected_from_source() -> tuple[set[str], set[str]]:
    """(package __init__ files, all modules) the wheel must contain, derived from the tree."""
    inits: set[str] = set()
    modules: set[str] = set()
    for import_name, folder in _package_dirs().items():
        root = REPO_ROOT / folder
        prefix = import_name.replace(".", "/")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
            if "__init__.py" not in filenames:
                continue
            rel = Path(dirpath).relative_to(root).as_posix()
            target = prefix if rel == "." else f"{prefix}/{rel}"
            inits.add(f"{target}/__init__.py")
            modules.update(f"{target}/{f}" for f in filenames if f.endswith(".py"))
    return inits, modules


def test_every_source_package_is_shipped(wheel_names):
    inits, modules = _expected_from_source()
    assert inits, "found no packages in the repository's package folders"
    missing_pkgs = sorted(inits - wheel_names)
    assert not missing_pkgs, (
        "packages missing from the wheel (add them to [tool.setuptools].packages in "
        f"pyproject.toml): {[p.rsplit('/', 1)[0].replace('/', '.') for p in missing_pkgs]}"
    )
    missing_modules = sorted(modules - wheel_names)
    assert not missing_modules, f"modules missing from the wheel: {missing_modules}"


def test_package_data_shipped(wheel_names):
    package_dirs = _package_dirs()
    package_data = _pyproject()["tool"]["setuptools"].get("package-data", {})
    expected = set()
    for package, patterns in package_data.items():
        # longest mapped prefix gives the source folder of `package`
        owner = max(
            (p for p in package_dirs if package == p or package.startswith(p + ".")), key=len
        )
        src = REPO_ROOT / package_dirs[owner] / package[len(owner) :].lstrip(".").replace(".", "/")
        target = package.replace(".", "/")
        for pattern in patterns:
            for f in src.glob(pattern):
                if f.is_file():
                    expected.add(f"{target}/{f.relative_to(src).as_posix()}")
    missing = sorted(expected - wheel_names)
    assert not missing, f"package data missing from the wheel: {missing}"


def test_unpacked_wheel_imports_from_itself(unpacked):
    code = (
        "import importlib, json, sys\n"
        f"names = {IMPORTS!r}\n"
        "print(json.dumps({n: importlib.import_module(n).__file__ for n in names}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(unpacked))
    env.pop("PYTHONSAFEPATH", None)
    # cwd is the unpacked dir, so the working tree is not on sys.path via '' either.
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=unpacked,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    root = unpacked.resolve()
    for name, file in files.items():
        assert file, f"{name} has no __file__ (namespace package?)"
        path = Path(file).resolve()
        assert path.is_relative_to(root), f"{name} imported from {path}, not from the wheel"
        assert not path.is_relative_to(REPO_ROOT)


def test_console_script_declared(wheel_names, unpacked):
    (entry_points,) = unpacked.glob("labvault-*.dist-info/entry_points.txt")
    parser = configparser.ConfigParser()
    parser.read(entry_points, encoding="utf-8")
    assert parser.has_option("console_scripts", "labvault"), entry_points.read_text()
    target = parser.get("console_scripts", "labvault").strip()
    assert target == _pyproject()["project"]["scripts"]["labvault"]
    module, _, func = target.partition(":")
    assert module.startswith("labvault.") and func, target
    module_path = module.replace(".", "/")
    assert {f"{module_path}.py", f"{module_path}/__init__.py"} & wheel_names, (
        f"the labvault script points at {module}, which is not in the wheel"
    )
