"""The GPU bench scripts import on a CPU machine and skip what an impl does not serve.

Regression: bench/kernels.py called ``fl_dispatch_flagos.flaggems.rotary_embedding`` on a GPU
host where FlagGems imports; FlagGems has no rotary impl (its GAPS say why), every rotary row
raised and the host-time table was never printed."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_kernels_bench_skips_ops_an_impl_does_not_serve() -> None:
    kernels = _load("kernels")
    from fl_dispatch_flagos import flaggems
    from fl_dispatch_flagos import ops as flagos

    assert not hasattr(flaggems, "rotary_embedding")
    assert not kernels.serves(flaggems, "rotary_neox")
    assert kernels.serves(flaggems, "fused_add_rms_norm") and kernels.serves(flagos,
                                                                            "rotary_neox")


def test_vllm_gpu_define_adds_a_configuration_and_rejects_what_it_cannot_set(
        tmp_path: Path) -> None:
    """--define 'NAME=VAR=VALUE VAR=VALUE' gives a configuration of fl-dispatch variables (the
    per-op ablations of the dense model); anything else is refused with the offending part
    named.
    --layers keeps the layer shapes and changes only the depth."""
    import json

    vg = _load("vllm_gpu")
    name, env = vg.define_config("flagos-normref=VLLM_FL_PREFER=flagos "
                                 "VLLM_FL_PER_OP=rms_norm=reference|flagos;fused_add_rms_norm"
                                 "=reference")
    assert name == "flagos-normref"
    assert env == {"VLLM_FL_PREFER": "flagos",
                   "VLLM_FL_PER_OP": "rms_norm=reference|flagos;fused_add_rms_norm=reference"}
    for bad, says in (("stock=VLLM_FL_PREFER=flagos", "new NAME"),
                      ("x=CUDA_VISIBLE_DEVICES=1", "'CUDA_VISIBLE_DEVICES=1' is not VLLM_FL_"),
                      ("x=VLLM_FL_PREFER", "'VLLM_FL_PREFER' is not VLLM_FL_"),
                      ("x=", "sets no variable"), ("noequals", "expected 'NAME=VAR=VALUE")):
        with pytest.raises(SystemExit, match=says):
            vg.define_config(bad)
    full = json.loads((vg.write_model("qwen3-30b-a3b", False, "bfloat16", tmp_path)
                       / "config.json").read_text())
    cut = json.loads((vg.write_model("qwen3-30b-a3b", False, "bfloat16", tmp_path, layers=4)
                      / "config.json").read_text())
    assert cut.pop("num_hidden_layers") == 4 and full.pop("num_hidden_layers") == 48
    assert cut == full


@pytest.mark.vllm
def test_vllm_gpu_bench_runs_alternated_engines_and_checks_agreement(tmp_path: Path) -> None:
    """bench/vllm_gpu.py on the CPU build (--tiny): two engines alive at once, timed in
    alternation, the reference backend's greedy tokens and teacher-forced log-probabilities
    equal stock's, and every vLLM process that loaded the plugin logged its line."""
    import json
    import subprocess

    cmd = [sys.executable, str(BENCH / "vllm_gpu.py"), "--tiny", "--configs", "stock,reference",
           "--batches", "1,3", "--rounds", "1", "--max-tokens", "3", "--check-prompts", "2",
           "--check-tokens", "3", "--mem", "0.08", "--count-calls", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "vllm_gpu-llama3-8b-tiny.json").read_text())
    assert result["errors"] == {}
    assert set(result["timing"]) == {"stock", "reference"}
    for name in ("stock", "reference"):
        assert result["timing"][name]["1"]["n"] == 1 and result["timing"][name]["3"]["median"] > 0
        assert result["timing"][name]["3"]["values"] == [result["timing"][name]["3"]["median"]]
    ref = result["agreement"]["reference"]
    assert ref["requests_equal"] == "2/2" and ref["first_diff"] is None
    assert ref["forced_positions"] == 2 * 3 and ref["forced_dlogprob_max"] < 1e-4
    # the weights were redrawn (once per engine) with a spread: choices far from flat
    # (-ln(512) = -6.24 with vLLM's uniform +-1e-3 dummy weights)
    assert result["weights"] == "spread" and result["weights_redrawn"] == {"stock": 1,
                                                                          "reference": 1}
    assert result["agreement"]["stock"]["mean_logprob"] > -5.0
    procs = result["processes"]["reference"]
    assert any("process=EngineCore" in p or "rank=0" in p for p in procs), procs
    assert result["processes"]["stock"] == []  # plugin off: no process loaded it
    # per-op call counts from the worker (collective_rpc), plugin on only
    worker_counts = [c for c in result["counts"]["reference"] if c]
    assert worker_counts and worker_counts[0].get("rms_norm", 0) > 0, result["counts"]
    assert not any(result["counts"]["stock"] or [])
    md = (tmp_path / "vllm_gpu-llama3-8b-tiny.md").read_text()
    assert md.count("| reference |") == 3  # timing, start-up and agreement tables
    # vLLM's own start-up breakdown, read from the engine's log
    assert result["startup_detail"]["reference"]["init_s"] > 0, result


@pytest.mark.interpreter
def test_moe_layer_bench_cpu_smoke_matches_reference(tmp_path: Path) -> None:
    """bench/moe_layer.py on the CPU (--device cpu --tiny, Triton's interpreter): the whole
    layer (flagos routing -> fused_experts) of each shape matches the reference composition at
    the check sizes, and every timed point has its whole-layer and summed-pieces numbers
    (host wall clock, labelled so)."""
    import json
    import os
    import subprocess

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(BENCH / "moe_layer.py"), "--device", "cpu", "--tiny",
           "--tokens", "1,4", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "moe_layer.json").read_text())
    assert result["problems"] == [], result["problems"]
    checks = result["check"]
    assert {(c["shape"], c["T"]) for c in checks} == {
        (s, t) for s in ("mixtral", "qwen3", "deepseek") for t in (1, 33)}
    assert result["check_all_ok"] and all(c["ok"] and c["routing"] == "same" for c in checks)
    assert all(c["max_abs_vs_ref"] <= 2e-2 for c in checks)
    assert len(result["rows"]) == 6
    for row in result["rows"]:
        assert row["wall"] and row["whole"] > 0 and row["sum_flagos"] > 0
        assert row["met_flagos"] is None  # wall clock: no verdict on the target
    assert "NOT device time" in (tmp_path / "moe_layer.txt").read_text()


def test_vllm_gpu_checks_every_configuration_before_starting_engines(tmp_path: Path) -> None:
    """The H200 run's mistakes, caught before any engine starts: an op that does not exist
    in a --define (``fused_add_rms_norm`` is rms_norm with a residual) and a policy file that
    was never written. Stock (plugin off) is not checked; a valid --define passes."""
    vg = _load("vllm_gpu")
    name, env = vg.define_config("normref=VLLM_FL_PREFER=flagos "
                                 "VLLM_FL_PER_OP=rms_norm=reference;fused_add_rms_norm=reference")
    good_name, good_env = vg.define_config("actref=VLLM_FL_PREFER=flagos "
                                           "VLLM_FL_PER_OP=silu_and_mul=reference")
    base = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_FL_")}
    envs = {"stock": {**base, "VLLM_FL_PREFER_ENABLED": "0", "VLLM_FL_PER_OP": "nonsense"},
            name: {**base, **env}, good_name: {**base, **good_env},
            "policy": {**base, "VLLM_FL_CONFIG": str(tmp_path / "never-written.yaml")}}
    with pytest.raises(SystemExit) as exc:
        vg.check_configs(envs)
    text = str(exc.value)
    assert "normref:" in text and "fused_add_rms_norm" in text
    assert "policy:" in text and "never-written.yaml" in text
    assert "stock:" not in text and "actref:" not in text
    vg.check_configs({good_name: {**base, **good_env}})  # no problem: returns


def test_vllm_gpu_startup_detail_reads_vllms_own_lines(tmp_path: Path) -> None:
    """The start-up breakdown comes from vLLM 0.25's log lines (the H200 runs' format); the
    first match per log wins (TP workers log theirs after the engine's)."""
    vg = _load("vllm_gpu")
    log = tmp_path / "engine.log"
    log.write_text(
        "(EngineCore pid=1) INFO [model_runner.py:302] Model loading took 14.96 GiB and "
        "1.905394 seconds\n(EngineCore pid=1) INFO [core.py:1] init engine (profile, create kv "
        "cache, warmup model) took 42.79 s (compilation: 21.18 s)\n(Worker pid=2) INFO init "
        "engine (profile, create kv cache, warmup model) took 50.00 s (compilation: 30.00 s)\n")
    assert vg.startup_detail(log) == {"load_s": 1.905394, "init_s": 42.79, "compile_s": 21.18}
    log.write_text("(EngineCore pid=1) INFO init engine (profile, create kv cache, warmup "
                   "model) took 18.71 s\n")  # enforce_eager: nothing compiled
    assert vg.startup_detail(log) == {"init_s": 18.71}
    assert vg.startup_detail(tmp_path / "missing.log") == {}
    # vLLM 0.25's warning when the front end initialised CUDA (every plugin-on engine on the
    # H200 before the NVML fix): the engine was spawned, not forked
    log.write_text("WARNING 11-30 20:56:31 [system_utils.py:157] We must use the `spawn` "
                   "multiprocessing start method. Overriding VLLM_WORKER_MULTIPROC_METHOD to "
                   "'spawn'. See https://docs.vllm.ai/... Reasons: CUDA is initialized\n")
    assert vg.startup_detail(log) == {"spawned": 1.0}


@pytest.mark.vllm
def test_vllm_gpu_bench_keeps_what_it_measured_when_timeout_signals_twice(
        tmp_path: Path) -> None:
    """`timeout` sends SIGTERM to the script and then to its whole process group: on the H200
    the second signal arrived while the results were being written and the rounds were lost.
    Now the first ends the measuring, the second is ignored, and the JSON keeps the values
    already printed."""
    import json
    import os
    import signal
    import subprocess

    cmd = [sys.executable, str(BENCH / "vllm_gpu.py"), "--tiny", "--configs", "stock",
           "--batches", "1,2", "--rounds", "500", "--max-tokens", "3", "--check-prompts", "1",
           "--check-tokens", "2", "--mem", "0.08", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("  stock bs2:"):  # a measurement, printed as it is taken
            break
    os.kill(proc.pid, signal.SIGTERM)
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("!! interrupted: writing what was measured"):
            break
    os.killpg(proc.pid, signal.SIGTERM)  # what `timeout` does next, here while writing
    rest, _ = proc.communicate(timeout=300)
    out = "".join(seen) + rest
    assert proc.returncode == 0, out[-3000:]
    result = json.loads((tmp_path / "vllm_gpu-llama3-8b-tiny.json").read_text())
    assert "logged_counts" in result  # the last write, after the engines were stopped
    assert result["errors"]["(run)"].startswith("interrupted")
    assert result["timing"]["stock"]["2"]["n"] >= 1 and result["timing"]["stock"]["2"]["median"] > 0


def test_ptx_diff_sees_no_change_against_head_and_reports_one(monkeypatch, capsys) -> None:
    """bench/ptx_diff.py compiles a case for sm_90 from HEAD and from the tree: against HEAD
    (the tree's kernels unchanged, or changed only in what the case does not reach) nothing
    moves; an opcode count that does move is reported and fails (exit status 1)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    import subprocess

    clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "backends/flagos/"
                            "kernels_moe_align.py"], cwd=BENCH.parent).returncode == 0
    if not clean:
        pytest.skip("kernels_moe_align.py has uncommitted changes")
    ptx_diff = _load("ptx_diff")
    assert ptx_diff.main(["HEAD", "--only", "align fan"]) == 0
    out = capsys.readouterr().out
    assert "align fan" in out and out.rstrip().endswith("none")
    a = ptx_diff.opcodes("\tadd.s32 %r1, %r2, 1;\n@%p1 st.global.b32 [%rd1], %r1;\n$L1:\n")
    assert a == {"add.s32": 1, "st.global.b32": 1}
    with pytest.raises(SystemExit):
        ptx_diff.main(["HEAD", "--only", "no such case"])
    sides = ["add.s32 %r1;\n", "add.s32 %r1;\n@%p2 add.s32 %r2;\n"] * 2  # then, now
    monkeypatch.setattr(ptx_diff, "compile_ptx", lambda *a: sides.pop(0))
    assert ptx_diff.main(["HEAD", "--only", "align fan"]) == 1
    assert "add.s32 +1" in capsys.readouterr().out
    assert ptx_diff.main(["HEAD", "--only", "align fan", "--tolerance", "1"]) == 0


def test_moe_experts_sweep_helpers_on_cpu() -> None:
    """bench/moe_experts.py's sweep pieces that need no GPU: dropping tile keys from both
    GEMMs, one coordinate of the descent (the fastest differing variant wins, the current
    config is not re-timed), and a candidate that raises or whose output differs from the
    table's is never timed: inf, logged."""
    import torch

    moe = _load("moe_experts")
    cfg = {"BLOCK_SIZE_M": 128, "gemm1": {"BLOCK_SIZE_N": 64, "TMA_W": 1, "HALF_M": 1},
           "gemm2": {"BLOCK_SIZE_N": 128, "SORTED_C": 1, "PDL": 1}}
    assert moe._without(cfg, moe.PREFILL_KEYS) == {
        "BLOCK_SIZE_M": 128, "gemm1": {"BLOCK_SIZE_N": 64},
        "gemm2": {"BLOCK_SIZE_N": 128, "PDL": 1}}
    assert moe._without_pdl(cfg)["gemm2"] == {"BLOCK_SIZE_N": 128, "SORTED_C": 1}
    assert cfg["gemm1"]["TMA_W"] == 1  # not modified in place

    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    seen = []

    def timed(c, label):
        seen.append(label)
        return times[c]
    assert moe.descend("a", 3.0, [("x", "a"), ("y", "c"), ("z", "b")], timed) == ("b", 1.0)
    assert seen == ["y", "z"]

    class Fake:
        def __init__(self, out):
            self.out = out

        def fused_experts(self, *args, config):
            if self.out is None:
                raise RuntimeError("no kernel")
            return self.out

    lines: list[str] = []
    inputs = (None,) * 5
    want = torch.zeros(2)
    assert moe.timed_config(Fake(torch.ones(2)), inputs, cfg, lines.append, "here",
                            want) == float("inf")
    assert moe.timed_config(Fake(None), inputs, cfg, lines.append, "there") == float("inf")
    assert lines[0].startswith("here: DIFFERS from the table config (max |diff| 1.000e+00)")
    assert lines[1] == "there failed: RuntimeError: no kernel"


def test_triton_ws_probe_reports_a_hang_an_error_and_a_result() -> None:
    """bench/triton_ws_probe.py runs each variant in a child under a timeout: a child that
    never returns is reported as a hang (the bench itself does not hang), one that fails
    with its last line, one that prints ``us maxdiff`` with its time; a size the tiles do not
    divide is refused naming the option."""
    probe = _load("triton_ws_probe")
    py = sys.executable
    assert probe.run_variant([py, "-c", "import time; time.sleep(30)"], 0.5) == (
        None, "HANGS (killed after 0.5 s)")
    us, result = probe.run_variant([py, "-c", "raise SystemExit('no GPU here')"], 30)
    assert us is None and result == "error: no GPU here"
    assert probe.run_variant([py, "-c", "print('12.5 0')"], 30) == (
        12.5, "ok (max |diff| vs torch 0)")
    with pytest.raises(SystemExit):
        probe.main(["--size", "1000"])
