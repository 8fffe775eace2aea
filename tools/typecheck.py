"""Type-check the project with mypy.

Services live in folders such as ``services/gpu-worker`` but import as ``aegaeon.gpu_worker``
(setuptools ``package-dir``), which mypy cannot follow. So we lay out a tree of symlinks with the
import names (``.mypy_tree/aegaeon/gpu_worker → services/gpu-worker``) and check that.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / ".mypy_tree"


def build_tree() -> Path:
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    shutil.rmtree(TREE, ignore_errors=True)
    top = TREE / "aegaeon"
    top.mkdir(parents=True)
    for entry in (ROOT / "aegaeon").iterdir():
        (top / entry.name).symlink_to(entry)
    for name, folder in package_dirs.items():
        if name != "aegaeon":
            (top / name.split(".", 1)[1]).symlink_to(ROOT / folder)
    return top


def main() -> int:
    top = build_tree()
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), str(top)]
    return subprocess.call(cmd, cwd=TREE)


if __name__ == "__main__":
    sys.exit(main())
