"""The third-party backend example in examples/acme_backend, as the README shows it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "acme_backend"


def cli(*args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_FL_")}
    env.update(PYTHONPATH=str(EXAMPLE), VLLM_FL_PLUGIN_MODULES="acme_fl_backend", **env_extra)
    return subprocess.run([sys.executable, "-m", "fl_dispatch", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_readme_shows_the_example_verbatim():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n# acme_fl_backend/__init__.py\n(.*?)```", readme, re.S)
    assert block, "README lost the backend example"
    assert block.group(1) == (EXAMPLE / "acme_fl_backend" / "__init__.py").read_text()
    entry = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    assert entry["project"]["entry-points"]["fl_dispatch.backends"] == {
        "acme": "acme_fl_backend"}
    assert 'acme = "acme_fl_backend"' in readme


def test_example_is_selected_and_explained():
    proc = cli("explain", "--json", "--op", "silu_and_mul")
    assert proc.returncode == 0, proc.stderr
    op = json.loads(proc.stdout)["ops"]["silu_and_mul"]
    acme = next(c for c in op["candidates"] if c["impl_id"] == "vendor.acme")
    assert acme == {"impl_id": "vendor.acme", "kind": "vendor", "vendor": "acme",
                    "priority": 100, "available": True, "reason": None}
    assert op["selected"] == "vendor.acme"  # flagos is unavailable here; vendor beats reference


def test_example_unavailable_reason_is_shown():
    proc = cli("explain", "--json", "--op", "silu_and_mul", ACME_DISABLE="1")
    op = json.loads(proc.stdout)["ops"]["silu_and_mul"]
    acme = next(c for c in op["candidates"] if c["impl_id"] == "vendor.acme")
    assert acme["available"] is False
    assert acme["reason"] == "unavailable: ACME_DISABLE=1 is set"
    assert op["selected"] == "reference.torch"


def test_example_passes_verify():
    proc = cli("verify", "--impl", "vendor.acme", "--op", "silu_and_mul", "--quick")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout and "PASS" in proc.stdout
