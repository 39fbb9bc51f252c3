"""The built wheel: platform YAML files, every backend package (with its subpackages and
modules), the entry points and the console script, and no top-level ``backends`` package."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = sorted(p.name for p in (ROOT / "backends").iterdir()
                  if (p / "__init__.py").is_file())
_IGNORE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__",
                                 ".pytest_cache", "*.pyc", "out", ".gpu-ops", ".whl")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """Build the wheel from a copy of the working tree (the build writes build/ and
    *.egg-info next to the sources; the copy keeps that away from the shared checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    out = tmp / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("fl_dispatch-*.whl")
    with zipfile.ZipFile(whl) as zf:
        yield zf


def dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(path).decode()


def entry_points(wheel: zipfile.ZipFile) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # keep names as written
    parser.read_string(dist_info(wheel, "entry_points.txt"))
    return parser


def test_backends_found():
    assert {"reference", "flagos", "cuda", "ascend"} <= set(BACKENDS)


def test_platform_yaml_files_are_package_data(wheel):
    names = set(wheel.namelist())
    for yaml in sorted((ROOT / "config").glob("*.yaml")):
        assert f"fl_dispatch_platforms/{yaml.name}" in names
        assert wheel.read(f"fl_dispatch_platforms/{yaml.name}") == yaml.read_bytes()
    assert {"fl_dispatch_platforms/cuda.yaml", "fl_dispatch_platforms/ascend.yaml"} <= names


def test_every_backend_package_and_module_is_in_the_wheel(wheel):
    """Each backends/<name>/**.py ships as fl_dispatch_<name>/**.py: an explicit package list
    that forgets a subpackage or a module would break the installed backend."""
    names = set(wheel.namelist())
    for backend in BACKENDS:
        base = ROOT / "backends" / backend
        for module in sorted(base.rglob("*.py")):
            rel = module.relative_to(base).as_posix()
            assert f"fl_dispatch_{backend}/{rel}" in names, f"backends/{backend}/{rel}"


def test_core_modules_are_in_the_wheel(wheel):
    names = set(wheel.namelist())
    for module in sorted((ROOT / "fl_dispatch").rglob("*.py")):
        rel = module.relative_to(ROOT).as_posix()
        assert rel in names, rel


def test_no_top_level_backends_or_config_package(wheel):
    tops = {n.split("/")[0] for n in wheel.namelist()}
    assert "backends" not in tops and "config" not in tops and "tests" not in tops
    assert {"fl_dispatch", "fl_dispatch_platforms"} | {f"fl_dispatch_{b}" for b in BACKENDS} \
        <= tops


def test_backend_entry_points_and_console_script(wheel):
    eps = entry_points(wheel)
    backends = dict(eps["fl_dispatch.backends"])
    assert backends == {b: f"fl_dispatch_{b}" for b in BACKENDS}
    assert {"reference", "flagos", "cuda", "ascend"} <= set(backends)
    assert dict(eps["console_scripts"]) == {"fl-dispatch": "fl_dispatch.tools.cli:main"}


def test_every_entry_point_declared_in_pyproject_is_in_the_wheel(wheel):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    eps = entry_points(wheel)
    for group, items in project.get("entry-points", {}).items():
        assert dict(eps[group]) == items, group
    assert dict(eps["console_scripts"]) == project["scripts"]
