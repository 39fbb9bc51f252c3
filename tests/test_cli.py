"""The ``fl-dispatch`` command line, run as a subprocess with a controlled environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import PLUGINS_DIR

from fl_dispatch.core.config import platform_file
from fl_dispatch.core.ops import BUILTIN_OPS

BIN = Path(sys.executable).parent
CLI = str(BIN / "fl-dispatch")
BUILTIN_BACKENDS = {"reference", "flagos", "cuda", "ascend"}
CANDIDATE_KEYS = {"impl_id", "kind", "vendor", "priority", "available", "reason"}


def run(*args: str, cmd: tuple[str, ...] = (CLI,), **env: str) -> subprocess.CompletedProcess:
    """Run the CLI with the current environment minus every VLLM_FL_* variable, plus ``env``;
    tests/plugins is importable so VLLM_FL_PLUGIN_MODULES may name the test plugins."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_FL_")}
    full.pop("USE_FLAGGEMS", None)
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGINS_DIR),
                                                       full.get("PYTHONPATH")]))
    full.update(env)
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=full, timeout=120)


def run_json(*args: str, **env: str):
    proc = run(*args, **env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- plugins
def test_plugins_text():
    proc = run("plugins")
    assert proc.returncode == 0, proc.stderr
    for name in BUILTIN_BACKENDS:
        assert any(line.startswith(name) for line in proc.stdout.splitlines()), name
    assert "source: entry point reference = fl_dispatch_reference" in proc.stdout


def test_plugins_json_reports_broken_plugins_and_keeps_the_rest():
    data = run_json("plugins", "--json",
                    VLLM_FL_PLUGIN_MODULES="fl_test_import_error,fl_test_good")
    rows = {row["name"]: row for row in data["plugins"]}
    assert BUILTIN_BACKENDS | {"fl_test_import_error", "fl_test_good"} <= set(rows)
    for row in rows.values():
        assert set(row) >= {"name", "source", "description", "loaded", "available", "reason",
                            "impls", "error"}
    bad = rows["fl_test_import_error"]
    assert bad["loaded"] is False and bad["available"] is False
    assert bad["source"] == "module fl_test_import_error (VLLM_FL_PLUGIN_MODULES)"
    assert "ModuleNotFoundError" in bad["error"]
    assert "Traceback" in bad["traceback"]
    good = rows["fl_test_good"]
    assert good["loaded"] and good["available"] and good["error"] is None
    assert good["impls"] == ["silu_and_mul:vendor.acme", "rms_norm:vendor.acme"]
    assert rows["reference"]["available"] is True and rows["reference"]["reason"] is None


# --------------------------------------------------------------------------- explain
def check_explain_schema(data: dict, ops: list[str]) -> None:
    assert set(data) >= {"platform", "config", "ops"}
    assert set(data["platform"]) == {"value", "source"}
    for key, setting in data["config"].items():
        assert set(setting) == {"value", "source"}, key
    assert list(data["ops"]) == ops
    for op, sel in data["ops"].items():
        assert set(sel) >= {"selected", "candidates"}, op
        cands = sel["candidates"]
        for c in cands:
            assert set(c) == CANDIDATE_KEYS, (op, c)
        # reason is null only for the chosen one, and the chosen one is tried first
        nulls = [c["impl_id"] for c in cands if c["reason"] is None]
        if sel["selected"] is None:
            assert nulls == []
        else:
            assert nulls == [sel["selected"]] == [cands[0]["impl_id"]]
            assert cands[0]["available"] is True


def test_explain_json_schema_and_sources():
    data = run_json("explain", "--json", VLLM_FL_PLATFORM="cuda", VLLM_FL_PREFER="vendor")
    check_explain_schema(data, [op.name for op in BUILTIN_OPS])
    assert data["platform"] == {"value": "cuda", "source": "env:VLLM_FL_PLATFORM"}
    config = data["config"]
    assert config["prefer"] == {"value": "vendor", "source": "env:VLLM_FL_PREFER"}
    assert config["deny_vendors"] == {"value": ["ascend"],
                                      "source": f"platform:{platform_file('cuda')}"}
    assert config["strict"]["source"] == f"platform:{platform_file('cuda')}"
    assert config["op_backends"] == {"value": {"attention_backend": ["reference"]},
                                     "source": f"platform:{platform_file('cuda')}"}
    assert config["allow_vendors"] == {"value": None, "source": "default"}
    attn = data["ops"]["attention_backend"]
    assert attn["selected"] == "reference.torch"
    flagos_attn = next(c for c in attn["candidates"] if c["impl_id"] == "default.flagos")
    assert flagos_attn["reason"].startswith("not in the op's order 'reference'")
    rms = {c["impl_id"]: c for c in data["ops"]["rms_norm"]["candidates"]}
    assert rms["vendor.ascend"]["reason"].startswith("vendor 'ascend' denied by deny_vendors")
    assert rms["reference.torch"]["available"] is True
    assert rms["reference.torch"]["priority"] == 50 and rms["reference.torch"]["vendor"] is None


def test_explain_json_candidates_in_try_order():
    data = run_json("explain", "--json", "--op", "rms_norm",
                    VLLM_FL_PLUGIN_MODULES="fl_test_good",
                    VLLM_FL_PER_OP="rms_norm=vendor:acme|reference")
    check_explain_schema(data, ["rms_norm"])
    sel = data["ops"]["rms_norm"]
    assert sel["selected"] == "vendor.acme"
    cands = sel["candidates"]
    assert [c["impl_id"] for c in cands[:2]] == ["vendor.acme", "reference.torch"]
    assert cands[0] == {"impl_id": "vendor.acme", "kind": "vendor", "vendor": "acme",
                        "priority": 100, "available": True, "reason": None}
    assert cands[1]["reason"] == "fallback: tried if 'vendor.acme' fails"
    for c in cands[2:]:
        assert c["reason"].startswith("not in the op's order 'vendor:acme|reference'"), c
    assert data["config"]["op_backends"] == {
        "value": {"rms_norm": ["vendor:acme", "reference"]}, "source": "env:VLLM_FL_PER_OP"}


def test_explain_text_and_unknown_op():
    proc = run("explain")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("platform:")
    assert "op rms_norm: selected" in proc.stdout
    bad = run("explain", "--op", "rms_nrm")
    assert bad.returncode == 2
    assert "'rms_nrm'" in bad.stderr and "did you mean 'rms_norm'" in bad.stderr


def test_explain_with_invalid_config_exits_2_naming_the_problem():
    proc = run("explain", VLLM_FL_STRICT="maybe")
    assert proc.returncode == 2
    assert "env:VLLM_FL_STRICT" in proc.stderr and "'maybe'" in proc.stderr


def test_explain_shows_user_config_warnings(tmp_path):
    user = write(tmp_path, "mine.yaml", "prefer: reference\n")
    data = run_json("explain", "--json", "--op", "silu_and_mul", VLLM_FL_CONFIG=str(user),
                    VLLM_FL_PREFER="vendor")
    assert data["config"]["prefer"] == {"value": "reference", "source": f"user_config:{user}"}
    assert any("VLLM_FL_PREFER" in w for w in data["warnings"])
    assert data["ops"]["silu_and_mul"]["selected"] == "reference.torch"


# --------------------------------------------------------------------------- check
@pytest.mark.parametrize("platform", ["cuda", "ascend"])
def test_check_shipped_platform_files(platform):
    path = str(platform_file(platform))
    proc = run("check", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"{path}: valid"


def test_check_lists_every_problem(tmp_path):
    bad = write(tmp_path, "bad.yaml", """\
        prefr: vendor
        strict: maybe
        op_backends:
          rms_norm: [flagoss]
    """)
    proc = run("check", str(bad))
    assert proc.returncode == 2
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{bad}: 3 problem(s)"
    problems = [line for line in lines if line.startswith("  - ")]
    assert len(problems) == 3, proc.stdout
    text = proc.stdout
    assert "did you mean 'prefer'" in text and "'maybe'" in text
    assert "did you mean 'flagos'" in text


def test_check_names_against_the_backends(tmp_path):
    bad = write(tmp_path, "names.yaml", """\
        op_backends:
          rms_nrm: [reference]
          silu_and_mul: ['vendor:nvdia']
    """)
    proc = run("check", str(bad))
    assert proc.returncode == 2
    assert f"{bad}: 2 problem(s)" in proc.stdout
    assert "did you mean 'rms_norm'" in proc.stdout
    assert "'nvdia'" in proc.stdout and "cuda" in proc.stdout


def test_check_reports_syntax_and_name_problems_together(tmp_path):
    bad = write(tmp_path, "mixed.yaml", """\
        strict: maybe
        op_backends:
          rms_nrm: [reference]
    """)
    proc = run("check", str(bad))
    assert proc.returncode == 2
    assert f"{bad}: 2 problem(s)" in proc.stdout, proc.stdout
    assert "'maybe'" in proc.stdout and "did you mean 'rms_norm'" in proc.stdout


def test_check_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    proc = run("check", str(missing))
    assert proc.returncode == 2
    assert str(missing) in proc.stdout and "does not exist" in proc.stdout


def test_check_effective_configuration_from_env():
    proc = run("check", VLLM_FL_PER_OP="rms_norm=flagoss", VLLM_FL_PREFER="vendr",
               VLLM_FL_PLUGIN_MODULES="fl_test_no_such_module")
    assert proc.returncode == 2
    assert "effective configuration: 3 problem(s)" in proc.stdout, proc.stdout
    assert "env:VLLM_FL_PER_OP" in proc.stdout and "env:VLLM_FL_PREFER" in proc.stdout
    assert "fl_test_no_such_module" in proc.stdout
    ok = run("check", VLLM_FL_PLATFORM="ascend")
    assert ok.returncode == 0 and ok.stdout.strip() == "effective configuration: valid"


def test_python_dash_m():
    proc = run("plugins", "--json", cmd=(sys.executable, "-m", "fl_dispatch"))
    assert proc.returncode == 0, proc.stderr
    names = {row["name"] for row in json.loads(proc.stdout)["plugins"]}
    assert BUILTIN_BACKENDS <= names
    usage = run(cmd=(sys.executable, "-m", "fl_dispatch"))
    assert usage.returncode == 2 and "usage: fl-dispatch" in usage.stderr
