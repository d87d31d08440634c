"""The wheel and the sdist built from this checkout hold every file the library reads at run time (modules, recipes,
the `evaluate` metric script, the `optimum-cli dfq` portion) and none of the repository's tests, benchmarks or
examples: a user installs the wheel, not this folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: pyproject.toml's build-system floor (the SPDX `license` string).
SETUPTOOLS_MIN = 77
#: Left out of the copy built from: build outputs, caches, and the reference models' weights (50 MB, not packaged).
NOT_COPIED = (".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".venv", "runs",
              "outputs")
REPOSITORY_ONLY = ("tests/", "benchmarks/", "examples/", "recipes/", ".ci/")

pytestmark = pytest.mark.slow


def _require_backend() -> None:
    setuptools = pytest.importorskip("setuptools", reason="building the wheel needs setuptools (pip install it)")
    pytest.importorskip("wheel", reason="building the wheel needs the wheel package (pip install it)")
    if int(setuptools.__version__.split(".")[0]) < SETUPTOOLS_MIN:
        pytest.skip(f"pyproject.toml needs setuptools>={SETUPTOOLS_MIN}, this environment has {setuptools.__version__}")


def _copy_checkout(dest: Path) -> Path:
    """A copy of the checkout, so that the build neither writes into it nor picks up a stale build/ folder."""
    ignore = shutil.ignore_patterns(*NOT_COPIED)
    shutil.copytree(ROOT, dest, ignore=lambda folder, names: set(ignore(folder, names)) | (
        {"models"} if Path(folder) == ROOT / "examples" else set()))
    return dest


def _pip_wheel(source: Path, out: Path) -> Path:
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                             "-q", "-w", str(out)], check=False, capture_output=True, text=True, cwd=out.parent,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    (wheel,) = out.glob("optimum_dfq-*.whl")
    return wheel


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    _require_backend()
    return _copy_checkout(tmp_path_factory.mktemp("checkout") / "src")


@pytest.fixture(scope="module")
def wheel(checkout, tmp_path_factory) -> Path:
    return _pip_wheel(checkout, tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def wheel_names(wheel) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_wheel_holds_what_the_library_reads(wheel_names):
    names = set(wheel_names)
    recipes = sorted(path.name for path in (ROOT / "recipes").glob("*.yaml"))
    assert recipes
    assert {f"optimum_dfq/recipes/{name}" for name in recipes} <= names, "recipes missing from the wheel"
    assert "optimum_dfq/metrics/top_k_accuracy/top_k_accuracy.py" in names, "the evaluate metric script is missing"
    assert "optimum/commands/register/dfq.py" in names, "the optimum-cli dfq portion is missing"
    # a portion of the optimum namespace: an __init__.py here would shadow the installed optimum package
    assert not {"optimum/__init__.py", "optimum/commands/__init__.py", "optimum/commands/register/__init__.py"} & names
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "optimum_dfq").rglob("*.py")
               if "__pycache__" not in path.parts}
    assert modules - names == set(), "modules left out of the wheel (a package missing from pyproject.toml?)"


def test_wheel_holds_nothing_of_the_repository_only(wheel_names):
    leaked = [name for name in wheel_names if name.startswith(REPOSITORY_ONLY)]
    assert leaked == []
    others = {name.split("/")[0] for name in wheel_names} - {"optimum_dfq", "optimum"}
    assert len(others) == 1 and others.pop().endswith(".dist-info")


def test_wheel_metadata(wheel, wheel_names):
    info = next(name for name in wheel_names if name.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(f"{info}/METADATA").decode()
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert f"{info}/licenses/LICENSE" in wheel_names
    assert "optimum-dfq = optimum_dfq.cli:main" in entry_points


def test_sdist_builds_the_same_wheel(checkout, wheel_names, tmp_path):
    """A release's sdist holds what the wheel is built from (recipes/ included) and no tests; its wheel is the same."""
    build = "import setuptools.build_meta as b, sys; print(b.build_sdist(sys.argv[1]))"
    result = subprocess.run([sys.executable, "-c", build, str(tmp_path / "sdist")], check=False, capture_output=True,
                            text=True, cwd=checkout, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    sdist = tmp_path / "sdist" / result.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as archive:
        root = archive.getnames()[0].split("/")[0]
        names = {name.removeprefix(f"{root}/") for name in archive.getnames()}
        archive.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    assert {f"recipes/{path.name}" for path in (ROOT / "recipes").iterdir() if path.suffix in (".yaml", ".py")} <= names
    assert {"pyproject.toml", "README.md", "LICENSE", "optimum/commands/register/dfq.py"} <= names
    assert [name for name in names if name.startswith(REPOSITORY_ONLY) and not name.startswith("recipes/")] == []
    rebuilt = zipfile.ZipFile(_pip_wheel(tmp_path / root, tmp_path / "rebuilt")).namelist()
    assert sorted(rebuilt) == sorted(wheel_names)
