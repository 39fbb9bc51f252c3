"""``fl-dispatch verify``: passes for correct impls, fails (exit 1, FAIL rows) for broken ones.

The CLI runs in a subprocess so that TRITON_INTERPRET and VLLM_FL_PLUGIN_MODULES apply to it
alone. The broken backend lives in tests/plugins/broken_backend.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "tests" / "plugins"
OFFBY = "vendor.brokenvendor.offby"
CONTIGUOUS = "vendor.brokenvendor.contiguous"
IGNOREOUT = "vendor.brokenvendor.ignoreout"
TENSOR_OPS = {"silu_and_mul", "gelu_and_mul", "rms_norm", "rotary_embedding",
              "rotary_embedding_out", "topk_softmax", "grouped_topk", "moe_align_block_size",
              "moe_sum", "fused_experts", "flash_mla"}


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m fl_dispatch ARGS`` with a clean fl-dispatch environment plus ``env``."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("VLLM_FL_") and k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    return subprocess.run([sys.executable, "-m", "fl_dispatch", *args], cwd=ROOT,
                          env={**base, **env}, capture_output=True, text=True, timeout=300)


def verify_json(*args: str, **env: str) -> tuple[int, dict[str, Any]]:
    proc = run_cli("verify", "--json", *args, **env)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def rows_of(data: dict[str, Any], impl: str) -> list[dict[str, Any]]:
    return [r for r in data["results"] if r["impl"] == impl]


@pytest.fixture(scope="module")
def broken() -> tuple[int, dict[str, Any]]:
    """One quick verify run with the broken backend and an op without an input generator."""
    return verify_json("--quick", PYTHONPATH=str(PLUGINS),
                       VLLM_FL_PLUGIN_MODULES="broken_backend,broken_unverifiable")


# --------------------------------------------------------------------------- passing
def test_reference_passes_every_case() -> None:
    rc, data = verify_json("--impl", "reference.torch")
    rows = rows_of(data, "reference.torch")
    assert rc == 0, [r for r in data["results"] if r["status"] == "FAIL"]
    assert data["ok"] and data["summary"]["failed"] == 0
    assert {r["op"] for r in rows} == TENSOR_OPS | {"attention_backend"}
    assert all(r["status"] == "PASS" for r in rows)
    assert {r["dtype"] for r in rows} == {"fp32", "fp16", "bf16", "int32", "-"}  # align: ints
    cases = " | ".join(r["case"] for r in rows)
    for feature in ("x:strided", "out:strided", "residual", "weight=None", "strided",
                    "key=None", "gptj", "neox", "rot=32", "cache:same", "cache:fp32", "3d"):
        assert feature in cases, feature
    assert data["tolerances"]["bf16"] == {
        "atol": 1e-2, "rtol": 1.6e-2,
        "reason": "bf16: up to four ulps (2^-8) of rounded intermediates"}


def test_flagos_passes_under_the_triton_interpreter() -> None:
    rc, data = verify_json("--impl", "default.flagos", "--quick", TRITON_INTERPRET="1")
    rows = rows_of(data, "default.flagos")
    if not rows or all(r["status"] == "SKIP" for r in rows):
        pytest.skip(f"default.flagos not registered or unavailable: {rows[:1]}")
    failures = [r for r in data["results"] if r["status"] == "FAIL"]
    assert rc == 0 and not failures, failures[:5]
    assert {r["op"] for r in rows if r["status"] == "PASS"} == TENSOR_OPS


# --------------------------------------------------------------------------- failing
def test_broken_backend_fails_with_exit_1(broken: tuple[int, dict[str, Any]]) -> None:
    rc, data = broken
    assert rc == 1 and not data["ok"]
    for impl in (OFFBY, CONTIGUOUS, IGNOREOUT):
        assert any(r["status"] == "FAIL" for r in rows_of(data, impl)), impl
    assert all(r["status"] == "PASS" for r in rows_of(data, "reference.torch"))


def test_off_by_a_little_is_caught_at_fp32_tolerance(broken: tuple[int, dict[str, Any]]) -> None:
    rows = rows_of(broken[1], OFFBY)
    assert {r["op"] for r in rows} == {"silu_and_mul", "rms_norm"}
    for r in rows:  # 2e-3 is beyond fp32's and fp16's tolerance (4 ulps at 1.0) and within
        assert r["status"] == ("PASS" if r["dtype"] == "bf16" else "FAIL"), r  # bf16's
        if r["status"] == "FAIL":
            assert "elements off" in r["note"]
        if r["dtype"] == "fp32":
            assert abs(r["max_err"] - 2e-3) < 1e-3


def test_contiguous_copy_breaks_in_place_on_strided_views(
        broken: tuple[int, dict[str, Any]]) -> None:
    rows = rows_of(broken[1], CONTIGUOUS)
    for r in rows:
        if r["op"] == "rms_norm":  # only the in-place variant on strided views is broken
            broken_case = "no-residual" not in r["case"] and "strided" in r["case"]
        else:  # rotary: query/key are strided column slices of qkv in the "qkv" layout
            broken_case = " qkv" in r["case"]
        assert r["status"] == ("FAIL" if broken_case else "PASS"), r
    notes = " ".join(r["note"] for r in rows)
    assert "not the caller's 'x' tensor" in notes and "buffer of query" in notes


def test_ignoring_out_is_caught(broken: tuple[int, dict[str, Any]]) -> None:
    rows = rows_of(broken[1], IGNOREOUT)
    assert {r["op"] for r in rows} == {"silu_and_mul", "gelu_and_mul"}
    for r in rows:
        gets_out = "out:none" not in r["case"]
        assert r["status"] == ("FAIL" if gets_out else "PASS"), r
        if gets_out:
            assert "expected the caller's 'out' tensor" in r["note"]


def test_op_without_input_generator_is_listed_not_failed(
        broken: tuple[int, dict[str, Any]]) -> None:
    data = broken[1]
    rows = [r for r in data["results"] if r["op"] == "broken_double"]
    assert [r["status"] for r in rows] == ["NO-GEN"]
    assert "declares no input cases" in rows[0]["note"]
    assert data["summary"]["no_input_generator"] == 1


def test_table_output_shows_tolerances_and_fail_rows() -> None:
    proc = run_cli("verify", "--op", "silu_and_mul", "--impl", OFFBY, "--dtype", "fp32",
                   "--quick", PYTHONPATH=str(PLUGINS), VLLM_FL_PLUGIN_MODULES="broken_backend")
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert "fp32  atol=1e-05  rtol=1e-05" in out and "bf16  atol=0.01  rtol=0.016" in out
    header = next(line for line in out.splitlines() if line.startswith("op "))
    for column in ("impl", "case", "dtype", "max abs err", "tolerance", "status"):
        assert column in header
    assert f"silu_and_mul  {OFFBY}" in out and "FAIL" in out and "-> FAILED" in out


# --------------------------------------------------------------------------- misuse
@pytest.mark.parametrize("args, message", [
    (["--op", "rms_nrom"], "did you mean 'rms_norm'"),
    (["--dtype", "fp8"], "valid: fp32, fp16, bf16"),
    (["--impl", "vendor.nosuch"], "no impl 'vendor.nosuch'"),
    (["--device", "tpu9"], "device 'tpu9'"),
])
def test_bad_arguments_exit_2_naming_the_value(args: list[str], message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from fl_dispatch.tools.cli import main

    assert main(["verify", *args]) == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- inputs
def test_replicate_keeps_views_views_and_shared_buffers_shared() -> None:
    import torch

    from fl_dispatch.testing.inputs import buffers, replicate, rope_case

    case = rope_case(3, 2, 1, 64, 32, "fp32", is_neox=True)
    original = case.build(torch.device("cpu"))
    copy = replicate(original)
    q, k = copy["query"], copy["key"]
    assert q.stride() == original["query"].stride() and not q.is_contiguous()
    assert q._base is k._base and q._base is not original["query"]._base
    assert torch.equal(q, original["query"]) and torch.equal(k, original["key"])
    q.zero_()
    assert not torch.equal(q, original["query"])  # a copy, not an alias
    assert list(buffers(copy)) == ["buffer of query"]
