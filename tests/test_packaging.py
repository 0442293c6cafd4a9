"""The published package: `python -m build` makes an sdist and a wheel that `twine check`
passes, and the wheel installs into a fresh venv where `runner --version` and `runner schema`
work. Also `make dist-check`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import runner
from tests.conftest import ROOT, run_cli

DISTRIBUTION = "runner-flows"

# What a source distribution is built from; everything else (tests, docs, benchmarks) stays
# out of the package.
SOURCES = ["pyproject.toml", "MANIFEST.in", "README.md", "CHANGELOG.md", "runner", "schemas"]


def _run(*args: str | Path, cwd: Path | None = None, timeout: float = 120) -> str:
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _source_modules() -> set[str]:
    return {
        str(path.relative_to(ROOT)) for path in (ROOT / "runner").rglob("*.py") if path.is_file()
    }


@pytest.mark.slow
def test_build_check_install_and_run_in_a_fresh_venv(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "build", "--outdir", dist, source)

    version = runner.__version__
    stem = f"{DISTRIBUTION.replace('-', '_')}-{version}"
    wheel = dist / f"{stem}-py3-none-any.whl"
    sdist = dist / f"{stem}.tar.gz"
    assert sorted(p.name for p in dist.iterdir()) == sorted([sdist.name, wheel.name])

    checked = _run(sys.executable, "-m", "twine", "check", "--strict", wheel, sdist)
    assert checked.count("PASSED") == 2, checked

    # Every module of the source tree, the schema and the type marker are in the wheel.
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"{stem}.dist-info/METADATA").decode()
        entry_points = zf.read(f"{stem}.dist-info/entry_points.txt").decode()
    assert _source_modules() <= names, sorted(_source_modules() - names)
    assert {"runner/schemas/flow.schema.json", "runner/py.typed"} <= names
    assert not [n for n in names if n.startswith("tests/")]
    assert f"Name: {DISTRIBUTION}\n" in metadata
    assert f"Version: {version}\n" in metadata
    assert "Requires-Dist: orjson" in metadata
    assert 'Requires-Dist: uvloop>=0.19; sys_platform != "win32"' in metadata
    assert "runner = runner.cli:main" in entry_points
    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    assert {"README.md", "CHANGELOG.md", "pyproject.toml", "schemas/flow.schema.json"} <= members

    # A fresh venv (no pip of its own: this venv's pip installs into it, from its cache).
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", wheel, timeout=240)
    assert _run(venv / "bin" / "runner", "--version").strip() == f"runner {version}"
    schema = json.loads(_run(venv / "bin" / "runner", "schema"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    # The installed package, not this checkout, is the one imported there.
    where = _run(python, "-c", "import runner; print(runner.__file__)", cwd=tmp_path)
    assert where.strip().startswith(str(venv))


def test_version_flag_prints_the_package_version() -> None:
    result = run_cli("--version")
    assert (result.code, result.stdout, result.stderr) == (0, f"runner {runner.__version__}\n", "")
