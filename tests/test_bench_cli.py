"""``fl-dispatch bench --device cpu`` with tiny sizes: table, JSON, PNG and a valid policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--decode", "1,4", "--prefill", "16", "--hidden", "64",
        "--intermediate", "96", "--heads", "2", "--kv-heads", "1", "--head-size", "32",
        "--moe-intermediate", "32", "--mla-heads", "2", "--kv-len", "40", "--repeats", "3"]
OPS = {"silu_and_mul", "gelu_and_mul", "rms_norm", "rotary_embedding", "rotary_embedding_out",
       "topk_softmax", "grouped_topk", "moe_align_block_size", "moe_sum", "fused_experts",
       "flash_mla"}
RESULT_KEYS = {"op", "case", "phase", "tokens", "impl", "kind", "bytes", "status", "us", "gbs",
               "tflops",
               "pct_copy", "ratio_to_best_other", "note"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One bench run (Triton interpreter on, so flagos joins in when it is registered)."""
    out = tmp_path_factory.mktemp("bench")
    files = {"json": out / "bench.json", "png": out / "bench.png", "yaml": out / "policy.yaml"}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VLLM_FL_") and k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "fl_dispatch", "bench", *TINY, "--json", str(files["json"]),
         "--png", str(files["png"]), "--write-config", str(files["yaml"])],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {"stdout": proc.stdout, **files,
            "data": json.loads(files["json"].read_text(encoding="utf-8"))}


def test_prints_the_table(run: dict[str, Any]) -> None:
    out = run["stdout"]
    header = next(line for line in out.splitlines() if line.startswith("op "))
    for column in ("tokens", "impl", "us", "GB/s", "% copy", "vs best other"):
        assert column in header
    assert "copy bandwidth" in out and "reference.torch" in out
    for op in OPS | {"rms_norm+residual"}:
        assert f"\n{op} " in out


def test_json_schema(run: dict[str, Any]) -> None:
    data = run["data"]
    assert data["schema"] == "fl-dispatch-bench/1"
    assert data["device"]["type"] == "cpu" and data["device"]["copy_gbs"] > 0
    assert data["dtype"] == "bf16" and data["decode"] == [1, 4] and data["prefill"] == [16]
    assert data["dims"] == {"hidden": 64, "intermediate": 96, "heads": 2, "kv_heads": 1,
                            "head_size": 32, "experts": 8, "topk": 2, "moe_intermediate": 32,
                            "expert_groups": 4, "mla_heads": 2, "kv_len": 40}
    results = data["results"]
    experts = [r for r in results if r["op"] == "fused_experts" and r["status"] == "ok"]
    assert experts and all(r["tflops"] and r["tflops"] > 0 for r in experts)
    assert all(set(r) == RESULT_KEYS for r in results)
    assert {r["case"] for r in results} == OPS | {"rms_norm+residual"}
    ref = [r for r in results if r["impl"] == "reference.torch"]
    assert {(r["case"], r["tokens"]) for r in ref} == {
        (c, t) for c in OPS | {"rms_norm+residual"} for t in (1, 4, 16)}
    for r in ref:
        assert r["status"] == "ok" and r["us"] > 0 and r["phase"] in ("decode", "prefill")
        assert r["gbs"] == pytest.approx(r["bytes"] / r["us"] / 1e3, rel=1e-6)
    assert set(data["fastest"]) == OPS
    for op, ranked in data["ranking"].items():
        assert ranked[0]["impl"] == data["fastest"][op]
        assert [r["score"] for r in ranked] == sorted(r["score"] for r in ranked)
    assert "attention_backend" not in data["no_input_generator"]


def test_bytes_moved(run: dict[str, Any]) -> None:
    got = {(r["case"], r["tokens"]): r["bytes"] for r in run["data"]["results"]}
    bf16 = 2
    assert got[("silu_and_mul", 4)] == 4 * (2 * 96 + 96) * bf16  # reads 2d, writes d
    assert got[("rms_norm", 4)] == 4 * 64 * 2 * bf16 + 64 * bf16  # x in, out; weight
    assert got[("rms_norm+residual", 4)] == 4 * 64 * 4 * bf16 + 64 * bf16  # x, res in + out
    # rotary (full, neox): q (2 heads) and k (1 head) read and written, cache rows, positions
    assert got[("rotary_embedding", 4)] == 2 * 4 * 3 * 32 * bf16 + 4 * 32 * bf16 + 4 * 8


def test_interpreted_impls_are_skipped_at_prefill(run: dict[str, Any]) -> None:
    flagos = [r for r in run["data"]["results"] if r["kind"] == "flagos"]
    if not flagos:
        pytest.skip("no flagos impl available under TRITON_INTERPRET=1")
    for r in flagos:
        if r["phase"] == "prefill":
            assert r["status"] == "skipped" and "Triton interpreter" in r["note"]
    assert "skipped: Triton interpreter" in run["stdout"]


def test_png_is_written(run: dict[str, Any]) -> None:
    assert run["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_written_config_is_a_valid_policy_led_by_the_fastest(run: dict[str, Any]) -> None:
    from fl_dispatch.core.config import resolve_policy
    from fl_dispatch.tools.cli import main

    text = run["yaml"].read_text(encoding="utf-8")
    assert text.startswith("# fl-dispatch policy") and "# device:" in text and "date" in text
    policy = resolve_policy({"VLLM_FL_CONFIG": str(run["yaml"])}, detect=lambda: None)
    orders = policy.op_backends.value
    fastest = run["data"]["fastest"]
    assert set(orders) == set(fastest)
    for op, impl in fastest.items():
        assert orders[op][0] == f"impl:{impl}"
    assert yaml.safe_load(text)["op_backends"] == {k: list(v) for k, v in orders.items()}
    assert main(["check", str(run["yaml"])]) == 0


def test_op_order_puts_the_reference_last() -> None:
    from fl_dispatch.core.impl import Impl
    from fl_dispatch.tools.bench_report import op_order

    def impl(impl_id: str, kind: str) -> Impl:
        return Impl("rms_norm", impl_id, len, kind, "x" if kind == "vendor" else None, 1,
                    None, "p")

    flagos, vendor, ref = (impl("default.flagos", "flagos"), impl("vendor.x", "vendor"),
                           impl("reference.torch", "reference"))
    assert op_order([flagos, vendor, ref]) == ["impl:default.flagos", "impl:vendor.x",
                                               "reference"]
    assert op_order([ref, flagos]) == ["impl:reference.torch", "impl:default.flagos"]
    assert op_order([vendor]) == ["impl:vendor.x", "reference"]


@pytest.mark.parametrize("args, message", [
    (["--decode", "1,x"], "--decode: 'x' is not a positive token count"),
    (["--op", "silu_and_mull"], "did you mean 'silu_and_mul'"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
    (["--decode", "", "--prefill", ""], "nothing to time"),
])
def test_bad_arguments_exit_2_naming_the_value(args: list[str], message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from fl_dispatch.tools.cli import main

    assert main(["bench", "--device", "cpu", *args]) == 2
    assert message in capsys.readouterr().err


def test_benchmark_inputs_stay_finite_when_replayed() -> None:
    """Timing replays one in-place call thousands of times on the same buffers."""
    import torch

    from fl_dispatch.core import ops
    from fl_dispatch.testing.inputs import Dims

    def bench_cases(op, tokens, dims, dtype):
        return getattr(ops, op).bench_cases(tokens, dims, dtype)

    dims = Dims(hidden=64, intermediate=96, heads=2, kv_heads=1, head_size=32)
    rope = bench_cases("rotary_embedding", 4, dims, "bf16")[0]
    args = rope.build(torch.device("cpu"))
    before = args["query"].clone()
    for _ in range(400):  # quarter turns: exact, back to the start every 4 calls
        ops.rotary_embedding(**args)
    assert torch.equal(args["query"], before)
    norm = bench_cases("rms_norm", 4, dims, "fp16")[1]
    args = norm.build(torch.device("cpu"))
    for _ in range(3000):
        ops.rms_norm(**args)
    assert torch.isfinite(args["residual"]).all() and torch.isfinite(args["x"]).all()


def test_time_limit_stops_starting_runs_and_the_policy_rests_on_what_was_timed(
        tmp_path: Path) -> None:
    """--time-limit-s: past the limit no measurement starts; the rest are reported as not
    run, the summary says how many and which ops, and the written policy is still valid
    (ranked on what was measured). Without a terminal each run is one flushed stderr line
    (a log on the GPU machine shows where the time goes, even when the call is cut)."""
    from fl_dispatch.tools.cli import main

    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VLLM_FL_") and k != "PYTHONPATH"}
    policy, out = tmp_path / "policy.yaml", tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fl_dispatch", "bench", *TINY, "--op", "rms_norm,silu_and_mul",
         "--time-limit-s", "1e-9", "--json", str(out), "--write-config", str(policy)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["results"]
    ran = [r for r in results if r["status"] == "ok"]
    cut = [r for r in results if r["note"].startswith("not run: --time-limit-s 1e-09")]
    assert len(ran) == 1 and len(cut) == len(results) - 1 and all(r["us"] is None for r in cut)
    assert f"time limit reached: {len(cut)} of {len(results)} runs not made" in proc.stdout
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("bench [")]
    assert len(progress) == len(results) and progress[-1].startswith(
        f"bench [{len(results)}/{len(results)}]")
    assert main(["check", str(policy)]) == 0
