"""vLLM's DeepseekScalingRotaryEmbedding (DeepSeek's YaRN rotary) through the dispatched
``rotary_embedding`` op, without an engine (a fresh interpreter each, vLLM's out-of-tree
registry being process-global): built with vLLM's ``get_rope`` from DeepSeek-V2-Lite-style
YaRN parameters (small sizes), called on MLA's layout (``q_pe``/``k_pe``: strided views of
the projections), compared with vLLM's own ``forward_native``: bit for bit with the reference
backend, eagerly and compiled; within the op's tolerance with our Triton kernel under the
interpreter. What the op does not cover (``offsets``, no key, a cache of another dtype, the
flashinfer path, DeepSeek-V4's variant, the OOT blacklist) stays vLLM's own.
"""

from __future__ import annotations

import textwrap

import pytest
from test_vllm_integration import run

SETUP = """
from fl_dispatch.vllm_glue import plugin as vllm_plugin
vllm_plugin.register()
from fl_dispatch import get_dispatcher
from vllm.model_executor.layers.rotary_embedding import get_rope
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# DeepSeek-V2-Lite's rope_scaling at a small original context (64 positions, factor 4: a
# 256-row cache); mscale != mscale_all_dim so that the folded-in mscale is not 1
YARN = {"rope_type": "deepseek_yarn", "rope_theta": 10000, "factor": 4,
        "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.5}
def make(dtype, head_size=64, neox=False, cache_dtype=None, config=None, **extra):
    with set_current_vllm_config(config or VllmConfig()):
        return get_rope(head_size, max_position=256, is_neox_style=neox,
                        rope_parameters={**YARN, **extra}, dtype=cache_dtype or dtype)
def mla_inputs(tokens, dtype, heads=4, nope=32, rope=64, latent=48, seed=0):
    # MLA's layout: q_pe = q[..., nope:] of [T, heads, nope + rope], k_pe = the last rope
    # features of the latent projection with a head dim of 1
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tokens, heads, nope + rope, generator=g).to(dtype)
    kv = torch.randn(tokens, latent + rope, generator=g).to(dtype)
    pos = torch.randint(0, 256, (tokens,), generator=g)
    return pos, q[..., nope:], kv[:, latent:].unsqueeze(1)
def calls(op="rotary_embedding"):
    return get_dispatcher().counts.get(op, 0)
"""


def go(code: str, **env: str) -> dict:
    """Run ``code`` after SETUP in a fresh interpreter; its ``emit`` result."""
    return run(SETUP + textwrap.dedent(code), **env)[0]


def test_replaced_and_bit_exact_with_vllm_native_eager_and_compiled():
    result = go("""
    out = {"classes": [], "rotary_dims": [], "eager": {}, "compiled": {}, "calls": 0,
           "out_calls": 0}
    from vllm.model_executor.layers.rotary_embedding import DeepseekScalingRotaryEmbedding
    out["vllm_name"] = DeepseekScalingRotaryEmbedding.name
    for name, dtype in DTYPES.items():
        for neox in (False, True):
            for partial in (False, True):
                rope = make(dtype, neox=neox, **({"partial_rotary_factor": 0.5} if partial
                                                 else {}))
                out["classes"].append(type(rope).__name__)
                out["rotary_dims"].append(rope.rotary_dim)
                for tokens in (1, 7, 64):
                    pos, q, k = mla_inputs(tokens, dtype, seed=tokens)
                    eq, ek = rope.forward_native(pos, q.clone(), k.clone())
                    before = calls()
                    rq, rk = rope(pos, q, k)
                    out["calls"] += calls() - before
                    key = f"{name}-neox{int(neox)}-partial{int(partial)}-{tokens}"
                    out["eager"][key] = (rq is q and rk is k and torch.equal(q, eq)
                                         and torch.equal(k, ek))
                # compiled: with call counting the chosen impl stays one opaque op
                torch._dynamo.reset()  # one compilation per layer, no recompile limit
                fn = torch.compile(lambda p, a, b: rope(p, a, b), backend="inductor",
                                   fullgraph=True, dynamic=False)
                pos, q, k = mla_inputs(16, dtype, seed=99)
                eq, ek = rope.forward_native(pos, q.clone(), k.clone())
                before = calls("rotary_embedding_out")
                cq, ck = fn(pos, q, k)  # compiled: out of place (layers._rotate_copies)
                out["out_calls"] += calls("rotary_embedding_out") - before
                out["compiled"][f"{name}-neox{int(neox)}-partial{int(partial)}"] = (
                    torch.equal(cq, eq) and torch.equal(ck, ek))
    rope = make(torch.float32)
    pos, q, k = mla_inputs(5, torch.float32)
    gm = torch._dynamo.export(lambda p, a, b: rope(p, a, b))(pos, q, k).graph_module
    out["graph"] = sorted({str(n.target) for n in gm.graph.nodes
                           if n.op == "call_function" and "fl_dispatch" in str(n.target)})
    emit(**out)
    """, VLLM_FL_PREFER="reference", VLLM_FL_DISPATCH_DEBUG="1")
    assert result["vllm_name"] == "rotary_embedding"  # the CustomOp name of its base
    assert set(result["classes"]) == {"FlDispatchDeepseekScalingRotaryEmbedding"}
    assert set(result["rotary_dims"]) == {64, 32}  # full and partial rotary
    assert len(result["eager"]) == 3 * 2 * 2 * 3
    assert all(result["eager"].values()), result["eager"]
    assert len(result["compiled"]) == 3 * 2 * 2 and all(result["compiled"].values()), result
    assert result["calls"] == 3 * 2 * 2 * 3  # every eager call went through the op
    assert result["out_calls"] == 3 * 2 * 2  # every compiled one through its out form
    assert result["graph"] == ["fl_dispatch.rotary_embedding_out"]


def test_compiled_traces_the_plain_pytorch_reference_without_counting():
    """Production mode: the compiler traces the reference (as it traces vLLM's native code)
    instead of calling the opaque op; the result stays within the op's tolerance."""
    result = go("""
    from fl_dispatch.testing.tolerances import tolerance
    from fl_dispatch.core.ops import BUILTIN_OPS
    spec = {s.name: s for s in BUILTIN_OPS}["rotary_embedding"]
    out = {}
    for name, dtype in DTYPES.items():
        rope = make(dtype)
        pos, q, k = mla_inputs(16, dtype)
        eq, ek = rope.forward_native(pos, q.clone(), k.clone())
        torch._dynamo.reset()
        gm = torch._dynamo.export(lambda p, a, b: rope(p, a, b))(pos, q.clone(),
                                                                  k.clone()).graph_module
        opaque = [str(n.target) for n in gm.graph.nodes if "fl_dispatch" in str(n.target)]
        torch.compile(lambda p, a, b: rope(p, a, b), backend="inductor", fullgraph=True)(
            pos, q, k)
        tol = tolerance(spec, dtype)
        out[name] = [opaque, all(torch.allclose(a.float(), b.float(), atol=tol.atol,
                                                rtol=tol.rtol) for a, b in ((q, eq), (k, ek)))]
    emit(**out)
    """, VLLM_FL_PREFER="reference")
    assert result == {name: [[], True] for name in ("fp32", "bf16", "fp16")}


def test_what_the_op_does_not_cover_stays_vllm():
    result = go("""
    from vllm.model_executor.layers.rotary_embedding import deepseek_scaling_rope as dsr
    out = {}
    rope = make(torch.bfloat16)
    # offsets: vLLM's own forward (its result, not the op)
    pos, q, k = mla_inputs(9, torch.bfloat16)
    pos, offsets = pos % 250, torch.full_like(pos, 3)
    eq, ek = rope.forward_native(pos, q.clone(), k.clone(), offsets)
    before = calls()
    rq, rk = rope(pos, q, k, offsets)
    out["offsets"] = [torch.equal(rq, eq), torch.equal(rk, ek), calls() - before]
    # no key: vLLM asserts (forward_native), so do we
    try:
        rope(pos, q)
        out["no_key"] = "ran"
    except AssertionError:
        out["no_key"] = "AssertionError"
    # a float32 cache (kimi_k3 asks for one) with bf16 q/k: vLLM computes in float32 and
    # returns float32 tensors; so does the layer
    rope32 = make(torch.bfloat16, cache_dtype=torch.float32)
    eq, ek = rope32.forward_native(pos, q.clone(), k.clone())
    before = calls()
    rq, rk = rope32(pos, q, k)
    out["fp32_cache"] = [str(rq.dtype), torch.equal(rq, eq), torch.equal(rk, ek),
                         calls() - before, str(rope32.cos_sin_cache.dtype)]
    # the flashinfer path (CUDA, fp16/bf16, flashinfer installed): float32 cache and math,
    # vLLM's forward stays
    dsr.current_platform.is_cuda = lambda: True
    dsr.has_flashinfer = lambda: True
    from vllm.config import CompilationConfig
    eager = VllmConfig(compilation_config=CompilationConfig(custom_ops=["all"]))
    fi = make(torch.bfloat16, config=eager, rope_theta=20000)  # not get_rope's cached one
    out["flashinfer"] = [fi.use_flashinfer, str(fi.cos_sin_cache.dtype),
                         fi._forward_method.__func__.__name__]
    # DeepSeek-V4's variant computes something else (rope at the end, inverse): not replaced
    v4 = make(torch.float32, is_deepseek_v4=True)
    out["v4"] = type(v4).__name__
    emit(**out)
    """, VLLM_FL_PREFER="reference", VLLM_FL_DISPATCH_DEBUG="1")
    assert result["offsets"] == [True, True, 0]
    assert result["no_key"] == "AssertionError"
    assert result["fp32_cache"] == ["torch.float32", True, True, 0, "torch.float32"]
    assert result["flashinfer"] == [True, "torch.float32", "forward_cpu"]
    assert result["v4"] == "DeepseekV4ScalingRotaryEmbedding"


def test_oot_blacklist_names_it_by_vllm_custom_op_name():
    result = go("""
    emit(cls=type(make(torch.float32)).__name__)
    """, VLLM_FL_OOT_BLACKLIST="rotary_embedding")
    assert result["cls"] == "DeepseekScalingRotaryEmbedding"


@pytest.mark.interpreter
def test_flagos_kernel_under_the_interpreter_within_tolerance():
    result = go("""
    from fl_dispatch.testing.tolerances import tolerance
    from fl_dispatch.core.ops import BUILTIN_OPS
    spec = {s.name: s for s in BUILTIN_OPS}["rotary_embedding"]
    out = {"impl": get_dispatcher().selection("rotary_embedding").chosen.impl_id, "cases": {}}
    for name, dtype in DTYPES.items():
        tol = tolerance(spec, dtype)
        for neox in (False, True):
            rope = make(dtype, neox=neox)
            for tokens in (1, 7, 64):
                pos, q, k = mla_inputs(tokens, dtype, seed=tokens)
                eq, ek = rope.forward_native(pos, q.clone(), k.clone())
                before = calls()
                rope(pos, q, k)
                ok = all(torch.allclose(a.float(), b.float(), atol=tol.atol, rtol=tol.rtol)
                         for a, b in ((q, eq), (k, ek)))
                out["cases"][f"{name}-neox{int(neox)}-{tokens}"] = [ok, calls() - before]
    emit(**out)
    """, VLLM_FL_PER_OP="rotary_embedding=flagos", VLLM_FL_DISPATCH_DEBUG="1",
        TRITON_INTERPRET="1")
    assert result["impl"] == "default.flagos"
    assert len(result["cases"]) == 3 * 2 * 3
    assert all(v == [True, 1] for v in result["cases"].values()), result["cases"]
