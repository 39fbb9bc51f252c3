"""End to end: MoE models in vLLM (CPU build) with fl-dispatch's MoE glue
(``fl_dispatch/vllm_glue/moe.py``): routing (``topk_softmax`` for Qwen3-MoE, ``grouped_topk``
for the DeepSeek-V3-style model: groups, sigmoid scores, a nonzero correction bias, a shared
expert, routed_scaling_factor 2.5) and the experts (``fused_experts``) run through the
selected impls in the worker; with the reference backend the greedy tokens equal stock vLLM's,
eager and compiled; ``VLLM_FL_OOT_BLACKLIST=fused_moe`` leaves vLLM's MoE path alone.

Ten vLLM starts (each in its own process, cached per module): per family reference and stock
in eager and compiled mode, plus the blacklist run and the flagos run under the Triton
interpreter (DeepSeek-V3 style, eager).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_vllm_e2e import deltas, run_env, selection_lines

from fl_dispatch.tools.demo import run_generation
from fl_dispatch.tools.demo_model import build_model, run_options

pytestmark = pytest.mark.vllm

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [42, 17, 256, 99], [300, 301, 302]]
MAX_TOKENS = 10
ROUTING = {"qwen3_moe": "topk_softmax", "deepseek_v3": "grouped_topk"}
MOE_LAYERS = {"qwen3_moe": 2, "deepseek_v3": 1}  # deepseek_v3: first_k_dense_replace 1
_models: dict[str, Path] = {}
_runs: dict[str, dict] = {}


def model(family: str, tmp_path_factory) -> Path:
    if family not in _models:
        _models[family] = build_model(family, root=tmp_path_factory.mktemp(family))
    return _models[family]


def generate(family: str, mode: str, tmp_path_factory, *, eager: bool = True,
             **env_extra: str) -> dict:
    """Run (once per family and mode) a generation with ``env_extra`` on a clean environment."""
    name = f"{family}-{mode}-{'eager' if eager else 'compiled'}"
    if name not in _runs:
        env = {**run_env(), **env_extra}
        request = {"model": str(model(family, tmp_path_factory)), "eager": eager,
                   "max_tokens": MAX_TOKENS, "prompts": PROMPTS, **run_options(family)}
        log = tmp_path_factory.mktemp("logs") / f"{name}.log"
        _runs[name] = run_generation(request, env, name, log, quiet=True)
    return _runs[name]


def reference(family, tmp, eager=True):
    return generate(family, "reference", tmp, eager=eager, VLLM_FL_PREFER="reference")


def stock(family, tmp, eager=True):
    return generate(family, "stock", tmp, eager=eager, VLLM_FL_PREFER_ENABLED="0")


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_reference_moe_matches_stock_and_runs_in_the_worker(tmp_path_factory, family, eager):
    on = reference(family, tmp_path_factory, eager)
    off = stock(family, tmp_path_factory, eager)
    assert on["tokens"] == off["tokens"]
    assert all(len(t) == MAX_TOKENS for t in on["tokens"])
    (sel,) = on["selection"]
    assert "VllmWorker" in sel["process"]
    d = deltas(on)
    routing = ROUTING[family]
    for op in ("fused_experts", routing):
        assert sel["selection"][op]["impl_id"] == "reference.torch", op
    # one routing and one experts call per MoE layer per forward step (>= 1 step per token)
    steps = d["fused_experts"] // MOE_LAYERS[family]
    assert d["fused_experts"] == steps * MOE_LAYERS[family]
    assert MAX_TOKENS <= steps <= MAX_TOKENS + 2
    assert d[routing] == d["fused_experts"]
    other = "grouped_topk" if routing == "topk_softmax" else "topk_softmax"
    assert d.get(other, 0) == 0
    # the reference experts need no alignment or sum
    assert d.get("moe_align_block_size", 0) == 0 and d.get("moe_sum", 0) == 0


def test_fused_moe_blacklist_leaves_vllm_moe_alone(tmp_path_factory):
    family = "deepseek_v3"
    black = generate(family, "blacklist", tmp_path_factory, VLLM_FL_PREFER="reference",
                     VLLM_FL_OOT_BLACKLIST="fused_moe")
    off = stock(family, tmp_path_factory)
    assert black["tokens"] == off["tokens"]
    d = deltas(black)
    for op in ("fused_experts", "grouped_topk", "topk_softmax", "moe_align_block_size",
               "moe_sum"):
        assert d.get(op, 0) == 0, op
    assert d["rms_norm"] > 0  # the rest of fl-dispatch still runs
    lines = selection_lines(black)
    assert lines and not any("UnquantizedFusedMoEMethod" in line or "_compute_routing" in line
                             for line in lines)
    on = reference(family, tmp_path_factory)
    assert any("UnquantizedFusedMoEMethod" in line and "CPURouter._compute_routing" in line
               for line in selection_lines(on))


def test_flagos_moe_kernels_under_the_interpreter(tmp_path_factory):
    """Our Triton routing, alignment, GEMM and sum kernels under TRITON_INTERPRET=1 in a
    float32 model: equal to the reference up to fp32 summation order, so greedy tokens match."""
    family = "deepseek_v3"
    fl = generate(family, "flagos", tmp_path_factory, TRITON_INTERPRET="1",
                  VLLM_FL_PREFER="flagos")
    ref = reference(family, tmp_path_factory)
    (sel,) = fl["selection"]
    d = deltas(fl)
    for op in ("grouped_topk", "fused_experts"):
        assert sel["selection"][op]["impl_id"].startswith("default.flagos"), op
        assert d[op] > 0, op
    # flagos fused_experts aligns through the dispatched op (not at decode sizes, where it
    # assigns one block per route as vLLM does) and sums the k routes through moe_sum
    assert d["moe_sum"] > 0
    assert d["moe_align_block_size"] > 0
    assert sel["demoted"] == {}
    assert fl["tokens"] == ref["tokens"]
