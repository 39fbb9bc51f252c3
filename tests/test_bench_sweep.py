"""``bench/kernels.py --sweep`` on a CPU machine: its plan fits one GPU run, its variants have
the shapes ops.py's config functions return, and gelu is swept in both erf forms."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _kernels():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("_bench_kernels_sweep",
                                                      BENCH / "kernels.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_sweep_plan_fits_one_gpu_run():
    k = _kernels()
    timings, seconds = k.sweep_plan(k.SWEEP_OPS, k.SWEEP_SIZES, True)
    assert set(k.SWEEP_OPS) == {"gelu_and_mul", "silu_and_mul", "rms_norm",
                                "fused_add_rms_norm"}
    assert k.SWEEP_SIZES == (1, 16, 64, 256, 4096, 16384)
    assert timings < 400 and seconds < 4 * 60


def test_sweep_variants_match_the_config_functions():
    from fl_dispatch_flagos import ops

    k = _kernels()
    for tokens in k.SWEEP_SIZES:
        gelu = k._sweep_variants("gelu_and_mul", tokens)
        forms = {entry[3] for _, _, entry in gelu}
        assert forms == {1, 3}
        for _label, attrs, entry in gelu:
            cfg = attrs["act_config"](tokens, 14336, 1, 0)
            assert cfg == entry and len(cfg) == len(ops.act_config(tokens, 14336, 1))
        for _label, attrs, entry in k._sweep_variants("silu_and_mul", tokens):
            assert attrs["act_config"](tokens, 14336, 0, 0)[3] == 0 == entry[3]
        for op in ("rms_norm", "fused_add_rms_norm"):
            for _label, attrs, entry in k._sweep_variants(op, tokens):
                cfg = attrs["norm_config"](tokens, 4096, op != "rms_norm", 0)
                assert len(cfg) == len(ops.norm_config(tokens, 4096))
                assert (cfg[0], cfg[3], cfg[4]) == entry and cfg[1] == 4096
        prefill = k._sweep_variants("rms_norm", tokens)
        assert ({e[2] for _, _, e in prefill} == {0, 2}) == (tokens >= 4096)
    assert k._min_rows([1, 16, 64, 256, 4096, 16384]) == [1, 5, 33, 129, 1025, 8193]


def test_sweep_runs_end_to_end_on_the_interpreter(monkeypatch, capsys):
    """The whole sweep loop at one token on the CPU: Triton's interpreter checks every
    variant against the reference, a fake timer stands in for the GPU; the summary and the
    TUNED entry come out in the shape ops.TUNED takes."""
    import random

    import torch

    k = _kernels()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(k, "DEV", "cpu")
    monkeypatch.setattr(k, "device_us", lambda case, impl, rep=30: random.uniform(10, 12))
    monkeypatch.setattr(k, "copy_bandwidth", lambda: 4.25e12)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: -1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    cpu_generator = torch.Generator
    monkeypatch.setattr(torch, "Generator", lambda device=None: cpu_generator())
    lines: list[str] = []
    res = k.sweep(lines, (1,), None, vllm=k.ref, log=lambda line: None)
    assert not any("WRONG" in line or "ERR" in line for line in lines), lines
    assert sum(line.startswith("summary") for line in lines) == len(k.SWEEP_OPS)
    tuned_src = "\n".join(lines[lines.index("TUNED['H200'] = {"):])
    tuned = ast.literal_eval(tuned_src.split("=", 1)[1])
    assert set(tuned) == {"gelu", "silu", "rms_norm", "fused_add_rms_norm"}
    assert tuned == {kind: tuple(v) for kind, v in res["tuned"].items()}
    assert len(tuned["gelu"][0][1]) == 4 and len(tuned["rms_norm"][0][1]) == 3
