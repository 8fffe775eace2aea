"""The wheel carries every module: build it, install it (not editable), import everything from it.

Service folders such as ``services/gpu-worker`` import as ``aegaeon.gpu_worker`` through
setuptools' ``package-dir``; a sub-package missing from ``packages`` would work in the editable
checkout and break in a container image. This test walks the source folders, so any new module
is covered without editing it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def source_modules() -> list[str]:
    """Every importable module under each folder of the package-dir mapping."""
    modules = set()
    for package, folder in SETUPTOOLS["package-dir"].items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            relative = path.relative_to(base).with_suffix("")
            parts = list(relative.parts)
            if "__pycache__" in parts or parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            dotted = ".".join([package, *parts])
            if not _is_nested_package_dir(dotted, package):
                modules.add(dotted)
    return sorted(modules)


def _is_nested_package_dir(dotted: str, package: str) -> bool:
    """``services/…`` folders map to their own package; skip paths another mapping owns."""
    return any(
        other != package and dotted.startswith(other + ".") and other.startswith(package + ".")
        for other in SETUPTOOLS["package-dir"]
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from this checkout and installed into a bare folder.

    Built without isolation from the setuptools in this environment (recent setuptools builds
    wheels itself), so the test needs no network.
    """
    out = tmp_path_factory.mktemp("wheel")
    target = tmp_path_factory.mktemp("site")
    # A clean copy of what the wheel is built from: setuptools' build/ folder in the checkout
    # could otherwise carry modules that no longer exist in the source.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in {path.split("/")[0] for path in SETUPTOOLS["package-dir"].values()}:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    build = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check", "--outdir", str(out), str(source)]  # fmt: skip
    subprocess.run(build, check=True, capture_output=True, cwd=out)
    wheels = list(out.glob("aegaeon-*.whl"))
    assert len(wheels) == 1, wheels
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(target), str(wheels[0])]  # fmt: skip
    subprocess.run(install, check=True, capture_output=True)
    return target


def test_source_walk_finds_every_service_package() -> None:
    modules = source_modules()
    for package in SETUPTOOLS["package-dir"]:
        assert package in modules
    assert "aegaeon.model_store.registry" in modules


def test_every_module_imports_from_the_installed_wheel(installed: Path) -> None:
    modules = source_modules()
    script = (
        "import importlib, json, sys\n"
        "failed = {}\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        module = importlib.import_module(name)\n"
        f"        assert module.__file__.startswith({str(installed)!r}), module.__file__\n"
        "    except BaseException as exc:\n"
        "        failed[name] = f'{type(exc).__name__}: {exc}'\n"
        "print(json.dumps(failed))\n"
    )
    # Run from the install folder, not the checkout, so nothing resolves to the source tree.
    env = {**os.environ, "PYTHONPATH": str(installed), "PYTHONSAFEPATH": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=installed, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    failed = json.loads(result.stdout.strip().splitlines()[-1])
    assert failed == {}, failed


def test_package_data_is_in_the_wheel(installed: Path) -> None:
    for package, patterns in SETUPTOOLS.get("package-data", {}).items():
        folder = ROOT / SETUPTOOLS["package-dir"][package]
        installed_folder = installed / Path(*package.split("."))
        for pattern in patterns:
            for source in folder.glob(pattern):
                assert (installed_folder / source.relative_to(folder)).is_file(), source


def test_the_console_script_is_declared(installed: Path) -> None:
    entry_points = next(installed.glob("aegaeon-*.dist-info")) / "entry_points.txt"
    assert "aegaeon = aegaeon.cli:main" in entry_points.read_text()
