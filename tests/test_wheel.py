"""The package as a user gets it: `python -m build` makes an sdist and a wheel (the wheel
built from the sdist, so both are complete), and each installs into a fresh venv and runs.

Needs `build` (the test extra) and the package registry for the dependencies and the
isolated build's setuptools; where the registry cannot be reached it skips, saying so.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import time
import venv
import zipfile

import pytest

import triofwd
from tests.conftest import REPO

pytestmark = pytest.mark.slow

# About 40 s on an idle machine with pip's cache warm (two isolated builds, two installs);
# the bound leaves room for a machine busy with other tests.
BUDGET = 120.0
# What a source tree holds that the package must ship: code, the typing marker, pages.
SHIPPED = ("*.py", "py.typed", "*.html")
# pip's words when the registry cannot be reached (no network, no DNS, a proxy refusing).
# Not "Could not find a version": that is also what a wrong requirement gets, which must fail.
UNREACHABLE = ("Failed to establish a new connection", "Network is unreachable", "Temporary failure in name resolution", "Max retries exceeded", "ProxyError")


class Steps:
    """Run commands under one time budget; a registry that cannot be reached skips the test."""

    def __init__(self, budget: float) -> None:
        self.deadline = time.monotonic() + budget

    def run(self, *cmd: str | pathlib.Path, cwd: pathlib.Path, env: dict[str, str] | None = None) -> str:
        remaining = self.deadline - time.monotonic()
        assert remaining > 0, f"out of time before {cmd}"
        result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=remaining)
        if result.returncode != 0 and any(words in result.stderr + result.stdout for words in UNREACHABLE):
            pytest.skip(f"the package registry cannot be reached: {result.stderr.strip().splitlines()[-1]}")
        assert result.returncode == 0, f"{cmd}: exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        return result.stdout


def source_copy(dest: pathlib.Path) -> pathlib.Path:
    """What the package is built from, copied so that the build writes nothing into the working tree."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "triofwd", dest / "triofwd", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def package_files(root: pathlib.Path) -> set[str]:
    """Every file under root/triofwd the package ships, as "triofwd/..." paths."""
    return {p.relative_to(root).as_posix() for pattern in SHIPPED for p in (root / "triofwd").rglob(pattern) if "__pycache__" not in p.parts}


def test_the_sdist_and_the_wheel_install_into_a_fresh_venv_and_run(tmp_path: pathlib.Path) -> None:
    steps = Steps(BUDGET)
    src = source_copy(tmp_path / "src")
    expected = package_files(src)
    assert {"triofwd/__init__.py", "triofwd/py.typed", "triofwd/control/__init__.py"} <= expected
    dist = tmp_path / "dist"
    steps.run(sys.executable, "-m", "build", "--outdir", dist, src, cwd=tmp_path)
    version = triofwd.__version__
    [wheel] = dist.glob(f"triofwd-{version}-*.whl")
    [sdist] = dist.glob(f"triofwd-{version}.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = set(archive.namelist())
    with tarfile.open(sdist) as archive:
        in_sdist = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert expected <= in_wheel, f"not in the wheel: {sorted(expected - in_wheel)}"
    assert expected <= in_sdist, f"not in the sdist: {sorted(expected - in_sdist)}"
    assert {"pyproject.toml", "README.md"} <= in_sdist

    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    bin_ = env / "bin"
    # Run outside the repository: nothing may be imported from the working tree.
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    demo = REPO / "routes" / "demo.toml"
    # The wheel with its dependencies, then the sdist over it (built by pip this time: its
    # dependencies are there already).
    for artifact, options in ((wheel, ()), (sdist, ("--force-reinstall", "--no-deps"))):
        steps.run(bin_ / "python", "-m", "pip", "install", "--quiet", *options, artifact, cwd=tmp_path, env=clean_env)
        assert steps.run(bin_ / "triofwd", "--version", cwd=tmp_path, env=clean_env) == f"triofwd {version}\n"
        assert steps.run(bin_ / "triofwd", "check", demo, cwd=tmp_path, env=clean_env) == "ok: 2 routes\n"
        where = steps.run(bin_ / "python", "-c", "import triofwd, pathlib; print(pathlib.Path(triofwd.__file__).parent)", cwd=tmp_path, env=clean_env)
        installed = pathlib.Path(where.strip())
        assert installed.is_relative_to(env), installed
        assert package_files(installed.parent) == expected, artifact.name
