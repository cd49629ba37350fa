"""The package works installed from a wheel, away from the source checkout: the bundled model
ships as package data and is the default model; `rwkvstate --version` answers."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import rwkvstate

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = importlib.metadata.version("setuptools") if importlib.util.find_spec("setuptools") else "0"


def _pip(*args, cwd):
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs the source tree")
@pytest.mark.skipif(int(SETUPTOOLS.split(".")[0]) < 77, reason="building the wheel offline needs setuptools >= 77")
def test_a_wheel_installed_elsewhere_runs_the_bundled_model(tmp_path):
    # build from a copy of the sources, offline (no build isolation), so the checkout stays clean
    src = tmp_path / "src-copy"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "wheels"), str(src), cwd=tmp_path)
    (wheel,) = (tmp_path / "wheels").glob("rwkvstate-*.whl")
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel), cwd=tmp_path)
    shutil.rmtree(src)  # nothing may come from the sources any more

    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKVSTATE_")}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    where = tmp_path / "elsewhere"
    where.mkdir()

    def run(*argv):
        done = subprocess.run([str(site / "bin" / "rwkvstate"), *argv], capture_output=True, text=True,
                              timeout=300, cwd=where, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert run("--version").strip() == f"rwkvstate {rwkvstate.__version__}"
    out = run("generate", "--prompt", "def fib(n):", "--max-tokens", "12", "--temperature", "0")
    assert out.startswith("def fib(n):") and len(out) > len("def fib(n):\n")
    listing = run("models")
    bundled = site / "rwkvstate" / "data" / "stdlib-byte-l8-c256.safetensors"
    assert f"stdlib-byte-l8-c256  bundled" in listing and str(bundled) in listing and bundled.exists()
