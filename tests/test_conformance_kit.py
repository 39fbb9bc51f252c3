"""The conformance kit (fl_dispatch.testing): a plugin-defined op with its own cases gets verify
and bench like a built-in op (tests/plugins/fl_test_scaled_op.py), and ``backend_conformance``
gives a vendor's pytest suite one test per (op, impl, case, dtype), run here by pytest in a
subprocess on a generated test file, with its outcomes read from the JUnit XML report.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "tests" / "plugins"
ACME = ROOT / "examples" / "acme_backend"
OP, IMPL, BUGGY = "row_scale", "vendor.scaledop", "vendor.scaledop.buggy"
SCALED = {"PYTHONPATH": str(PLUGINS), "VLLM_FL_PLUGIN_MODULES": "fl_test_scaled_op"}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VLLM_FL_", "FL_TEST_", "ACME_"))
           and k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    return {**env, **extra}


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fl_dispatch", *args], cwd=ROOT,
                          env=clean_env(**env), capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------- a plugin's op
def test_plugin_op_declares_cases_and_tolerances(test_plugins: Path) -> None:
    import importlib

    import torch

    from fl_dispatch.testing import Case, tolerance

    spec = importlib.import_module("fl_test_scaled_op").row_scale
    assert spec.verify_cases is not None and spec.bench_cases is not None
    cases = spec.verify_cases("bf16", "small")
    assert all(isinstance(c, Case) and c.op == OP for c in cases)
    names = " | ".join(c.name for c in cases)
    for feature in ("x:strided", "out:strided", "out:contiguous", "out:none", "B=2",
                    "n=64", "n=200"):
        assert feature in names, feature
    strided = next(c for c in cases if "x:strided out:strided" in c.name)
    args = strided.build(torch.device("cpu"))
    assert not args["x"].is_contiguous() and not args["out"].is_contiguous()
    assert strided.returns == ("out",)
    assert len(spec.verify_cases("fp32", "quick")) < len(cases)
    fp16, fp32 = tolerance(spec, "fp16"), tolerance(spec, "fp32")
    assert (fp16.atol, fp16.rtol) == (0.0, 1e-3) and "row_scale" in fp16.reason  # override
    assert (fp32.atol, fp32.rtol) == (1e-5, 1e-5)  # the table's row


def test_verify_runs_a_plugin_op_like_a_builtin() -> None:
    proc = run_cli("verify", "--json", "--op", OP, **SCALED)
    assert proc.stdout, proc.stderr
    data = json.loads(proc.stdout)
    assert proc.returncode == 0 and data["ok"], proc.stdout[-3000:]
    rows = [r for r in data["results"] if r["impl"] == IMPL]
    assert len(rows) == 3 * 11 and all(r["status"] == "PASS" for r in rows), rows
    assert data["summary"]["no_input_generator"] == 0
    assert {r["dtype"] for r in rows} == {"fp32", "fp16", "bf16"}
    fp16 = next(r for r in rows if r["dtype"] == "fp16")
    assert (fp16["atol"], fp16["rtol"]) == (0.0, 1e-3)  # tolerances= applies


def test_verify_fails_a_wrong_impl_of_a_plugin_op() -> None:
    proc = run_cli("verify", "--json", "--op", OP, "--impl", BUGGY, "--quick",
                   FL_TEST_SCALED_OP_BUG="1", **SCALED)
    data = json.loads(proc.stdout)
    assert proc.returncode == 1 and not data["ok"]
    rows = [r for r in data["results"] if r["impl"] == BUGGY]
    assert rows
    for r in rows:  # a contiguous copy of out: wrong exactly where out is strided
        assert r["status"] == ("FAIL" if "out:strided" in r["case"] else "PASS"), r
        if r["status"] == "FAIL":
            assert "expected the caller's 'out' tensor" in r["note"]
            assert "buffer of out" in r["note"]


def test_bench_times_a_plugin_op(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "--op", OP, "--decode", "1,8", "--prefill", "", "--hidden", "256",
                   "--repeats", "3", "--json", str(out), **SCALED)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    timed = {(m["impl"], m["tokens"]) for m in data["results"] if m["status"] == "ok"}
    assert timed == {(i, t) for i in (IMPL, "reference.scaledop") for t in (1, 8)}
    assert data["no_input_generator"] == [] and OP in data["fastest"]
    assert f"{OP}  " in proc.stdout and IMPL in proc.stdout


# --------------------------------------------------------------------------- in process
def test_conformance_items_cover_every_impl_of_the_plugin(test_plugins: Path) -> None:
    from fl_dispatch.testing import PASS, conformance_items
    from fl_dispatch.testing.conformance import run_item

    items = conformance_items("fl_test_scaled_op", modules=["fl_test_scaled_op"],
                              size="quick", dtypes=("fp32", "bf16"))
    assert {i.impl_id for i in items} == {IMPL, "reference.scaledop"}
    assert len({i.id for i in items}) == len(items) == 2 * 2 * 6
    assert all(r.status == PASS for i in items for r in run_item(i))


@pytest.mark.parametrize("kwargs, message", [
    ({"size": "huge"}, "valid: quick, small, full"),
    ({"dtypes": ("fp8",)}, "valid: fp32, fp16, bf16"),
    ({"device": "tpu9"}, "device 'tpu9'"),
])
def test_bad_arguments_are_one_failing_item(kwargs: dict[str, Any], message: str) -> None:
    from fl_dispatch.testing import conformance_items

    items = conformance_items("reference", **kwargs)
    assert len(items) == 1 and message in (items[0].error or "")


def test_import_stays_free_of_pytest() -> None:
    code = ("import sys, fl_dispatch.testing as t; "
            "assert 'pytest' not in sys.modules and '_pytest' not in sys.modules; "
            "print(sorted(t.__all__))")
    proc = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("backend_conformance", "Case", "tolerance", "DEFAULT_TOLERANCES",
                 "verify_case"):
        assert f"'{name}'" in proc.stdout


# --------------------------------------------------------------------------- in a vendor suite
SUITE = '''
from fl_dispatch.testing import backend_conformance

test_broken = backend_conformance("broken_backend", modules=("broken_backend",),
                                  size="quick", dtypes=("fp32",))
test_scaled = backend_conformance("fl_test_scaled_op", modules=("fl_test_scaled_op",),
                                  size="quick")
test_acme_off = backend_conformance("acme", modules=("acme_fl_backend",))
test_no_load = backend_conformance("fl_test_import_error", modules=("fl_test_import_error",))
test_missing = backend_conformance("nosuchvendor")
'''


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the generated suite once; per test function, the (id, outcome, message) of each
    test, plus pytest's exit status and summary line."""
    where = tmp_path_factory.mktemp("vendor_suite")
    (where / "pytest.ini").write_text("[pytest]\n")
    (where / "test_vendor.py").write_text(SUITE)
    report = where / "report.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         f"--junitxml={report}", "test_vendor.py"], cwd=where, capture_output=True, text=True,
        timeout=600, env=clean_env(PYTHONPATH=os.pathsep.join((str(PLUGINS), str(ACME))),
                                   ACME_DISABLE="1"))
    assert report.exists(), proc.stdout + proc.stderr
    tests: dict[str, list[tuple[list[str], str, str]]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        match = re.fullmatch(r"(\w+)\[(.*)\]", case.get("name", ""))
        assert match, case.get("name")
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error"}.get(child.tag, "skipped")
                message = (child.get("message") or "") + "\n" + (child.text or "")
        tests.setdefault(match.group(1), []).append((match.group(2).split("|"), outcome,
                                                     message))
    return {"tests": tests, "rc": proc.returncode, "stdout": proc.stdout}


def outcomes(suite: dict[str, Any], name: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, outcome, _ in suite["tests"][name]:
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def test_suite_fails_and_reports_pytest_counts(suite: dict[str, Any]) -> None:
    assert suite["rc"] == 1  # tests failed
    total = {k: sum(outcomes(suite, n).get(k, 0) for n in suite["tests"])
             for k in ("passed", "failed", "skipped")}
    last = suite["stdout"].strip().splitlines()[-1]
    for outcome, n in total.items():
        assert f"{n} {outcome}" in last, (outcome, n, last)


def test_broken_backend_fails_where_its_bugs_are(suite: dict[str, Any]) -> None:
    tests = suite["tests"]["test_broken"]
    assert {tuple(parts[:2]) for parts, _, _ in tests} == {
        ("silu_and_mul", "vendor.brokenvendor.offby"), ("rms_norm", "vendor.brokenvendor.offby"),
        ("rms_norm", "vendor.brokenvendor.contiguous"),
        ("rotary_embedding", "vendor.brokenvendor.contiguous"),
        ("silu_and_mul", "vendor.brokenvendor.ignoreout"),
        ("gelu_and_mul", "vendor.brokenvendor.ignoreout")}
    for (op, impl, case, dtype), outcome, message in tests:
        assert dtype == "fp32"
        if impl.endswith("offby"):  # 2e-3 off: beyond fp32's tolerance everywhere
            broken, note = True, "elements off"
        elif impl.endswith("ignoreout"):
            broken, note = "out:none" not in case, "expected the caller's 'out' tensor"
        elif op == "rms_norm":  # contiguous copies: in place on strided views is lost
            broken = "no-residual" not in case and "strided" in case
            note = "not the caller's 'x' tensor"
        else:
            broken, note = " qkv" in case, "buffer of query"
        assert outcome == ("failed" if broken else "passed"), (op, impl, case, message)
        if broken:
            assert note in message and "tolerance 1e-05+1e-05*|ref|" in message, message
    assert outcomes(suite, "test_broken") == {"failed": 34, "passed": 15}


def test_good_plugin_passes_every_case(suite: dict[str, Any]) -> None:
    assert outcomes(suite, "test_scaled") == {"passed": 2 * 3 * 6}  # 2 impls, 3 dtypes


def test_unavailable_impl_is_one_visible_skip(suite: dict[str, Any]) -> None:
    [(parts, outcome, message)] = suite["tests"]["test_acme_off"]
    assert parts[:2] == ["silu_and_mul", "vendor.acme"] and outcome == "skipped"
    assert "vendor.acme unavailable: ACME_DISABLE=1 is set" in message
    assert "ACME_DISABLE=1 is set" in suite["stdout"]  # -rs lists the reason


def test_plugin_that_fails_to_load_is_one_failure(suite: dict[str, Any]) -> None:
    [(parts, outcome, message)] = suite["tests"]["test_no_load"]
    assert parts[0] == "load plugin" and outcome == "failed"
    assert "ModuleNotFoundError" in message and "fl_test_dependency_that_is_not_installed" \
        in message
    [(parts, outcome, message)] = suite["tests"]["test_missing"]
    assert outcome == "failed" and "no plugin named 'nosuchvendor'" in message


def test_align_mismatch_compares_what_the_contract_fixes() -> None:
    """The kit's alignment comparison: order inside an expert segment and the slots past the
    used blocks are free; the padded total, the used blocks' experts and each segment's token
    multiset are not."""
    import torch

    from fl_dispatch.testing.inputs_moe import align_mismatch

    pad = 6
    # expert 0: blocks 0-1 (tokens 0, 3), expert 1: blocks 2-3 (1, 2, 4, 5), block 4 unused
    want = (torch.tensor([0, 3, pad, pad, 1, 2, 4, 5, pad, pad], dtype=torch.int32),
            torch.tensor([0, 0, 1, 1, 0], dtype=torch.int32), torch.tensor([8]))
    got = (torch.tensor([3, pad, 0, pad, 2, 5, 4, 1, 7, 7], dtype=torch.int32),
           torch.tensor([0, 0, 1, 1, 9], dtype=torch.int32), torch.tensor([8]))
    assert align_mismatch(got, want, 2) is None
    assert align_mismatch((got[0], got[1], torch.tensor([10])), want, 2).startswith(
        "num_tokens_post_pad 10 vs 8")
    assert align_mismatch((got[0], torch.tensor([0, 1, 1, 1, 0], dtype=torch.int32), got[2]),
                          want, 2) == "experts_ids differ"
    moved = got[0].clone()
    moved[[0, 4]] = moved[[4, 0]]  # token 3 to expert 1's segment, token 2 to expert 0's
    assert align_mismatch((moved, got[1], got[2]), want, 2) == "per-expert token sets differ"
