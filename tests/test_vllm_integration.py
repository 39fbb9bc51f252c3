"""The vLLM glue without starting an engine: layer replacement, opaque ops under
torch.compile, the vllm.ir provider, the compile-cache fingerprint, the attention backend,
collisions with other plugins, and the global switch. Each case runs in a fresh interpreter,
because vLLM's out-of-tree layer registry is process-global."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

PLUGINS = str(Path(__file__).parent / "e2e_plugins")

PRELUDE = """
import json, torch
from vllm.config import VllmConfig, set_current_vllm_config
def emit(**kw):
    print("RESULT " + json.dumps(kw))
"""


def run(code: str, **env_extra: str) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_FL_")}
    env["PYTHONPATH"] = os.pathsep.join([PLUGINS, env.get("PYTHONPATH", "")])
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300)
    results = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and results, proc.stderr[-3000:]
    return json.loads(results[-1][len("RESULT "):]), proc.stderr


def test_layers_are_replaced_and_match_vllm_native_eager_and_compiled():
    result, log = run("""
    from fl_dispatch.vllm_glue import plugin as vllm_plugin
    vllm_plugin.register()
    vllm_plugin.register()  # idempotent
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.activation import SiluAndMul
    from vllm.model_executor.layers.rotary_embedding import get_rope
    from vllm import ir
    out = {}
    with set_current_vllm_config(VllmConfig()):
        norm, act = RMSNorm(64, eps=1e-6), SiluAndMul()
        rope = get_rope(32, max_position=128, is_neox_style=True, rope_parameters=None,
                        dtype=torch.float32)
    out["classes"] = [type(m).__name__ for m in (norm, act, rope)]
    torch.manual_seed(0)
    norm.weight.data.normal_()
    x, r = torch.randn(5, 64), torch.randn(5, 64)
    native = ir.ops.rms_norm.impls["native"].impl_fn
    native_add = ir.ops.fused_add_rms_norm.impls["native"].impl_fn
    out["norm"] = torch.equal(norm(x), native(x, norm.weight.data, 1e-6))
    xc, rc = x.clone(), r.clone()
    o, res = norm(xc, rc)
    eo, er = native_add(x, r, norm.weight.data, 1e-6)
    out["norm_add_inplace"] = o is xc and res is rc and torch.equal(o, eo) and torch.equal(res, er)
    h = torch.randn(5, 128)
    out["silu"] = torch.equal(act(h), SiluAndMul.forward_native(h))
    pos = torch.arange(5)
    q, k = torch.randn(5, 4 * 32), torch.randn(5, 2 * 32)
    eq, ek = rope.forward_static(pos, q.clone(), k.clone(), 32, 32, rope.cos_sin_cache, True)
    qq, kk = rope(pos, q, k)
    out["rope_inplace"] = qq is q and torch.equal(q, eq) and torch.equal(k, ek)
    def block(x, r, h):
        o, r2 = norm(x, r)
        return act(h) * 2, o + 0, r2 + 0
    compiled = torch.compile(block, backend="inductor", fullgraph=True)
    xa, ra = x.clone(), r.clone()
    c = compiled(xa, ra, h)
    out["compiled"] = torch.equal(c[0], SiluAndMul.forward_native(h) * 2) and \\
        torch.allclose(c[1], eo) and torch.allclose(c[2], er)
    from torch._dynamo.testing import CompileCounterWithBackend
    from fl_dispatch import get_dispatcher
    d = get_dispatcher()
    before = d.counts["silu_and_mul"]
    compiled(x.clone(), r.clone(), h)
    out["compiled_calls_dispatch"] = d.counts["silu_and_mul"] - before
    gm = torch._dynamo.export(block)(x.clone(), r.clone(), h).graph_module
    out["graph_ops"] = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"
                               and "fl_dispatch" in str(n.target)})
    emit(**out)
    """, VLLM_FL_DISPATCH_DEBUG="1")
    assert result["classes"] == ["FlDispatchRMSNorm", "FlDispatchSiluAndMul",
                                 "FlDispatchRotaryEmbedding"]
    for key in ("norm", "norm_add_inplace", "silu", "rope_inplace", "compiled"):
        assert result[key] is True, key
    assert result["compiled_calls_dispatch"] == 1  # the compiled graph calls the entry
    assert result["graph_ops"] == ["fl_dispatch.fused_add_rms_norm",
                                   "fl_dispatch.silu_and_mul"]
    # one selection line at plugin load, one set-up line when the block's layers were built
    assert log.count("fl-dispatch rank=") == 2
    assert log.count("(builds the model)") == 1


def test_oot_lists_decide_which_layers_are_replaced():
    code = """
    from fl_dispatch.vllm_glue import plugin as vllm_plugin
    vllm_plugin.register()
    from vllm.model_executor.custom_op import op_registry_oot
    emit(replaced=sorted(k for k, v in op_registry_oot.items() if hasattr(v, "_fl_dispatch_layer")))
    """
    black, _ = run(code, VLLM_FL_OOT_BLACKLIST="rms_norm,silu_and_mul")
    assert "RMSNorm" not in black["replaced"] and "SiluAndMul" not in black["replaced"]
    assert "RotaryEmbedding" in black["replaced"] and "GeluAndMul" in black["replaced"]
    white, _ = run(code, VLLM_FL_OOT_WHITELIST="rms_norm")
    assert white["replaced"] == ["RMSNorm"]
    off, _ = run(code, VLLM_FL_OOT_ENABLED="0")
    assert off["replaced"] == []


def test_collision_with_another_plugins_layer_is_reported():
    code = """
    from vllm.model_executor.layers.activation import SiluAndMul
    @SiluAndMul.register_oot
    class VendorSilu(SiluAndMul):
        pass
    from fl_dispatch.vllm_glue import plugin as vllm_plugin
    try:
        vllm_plugin.register()
        emit(raised=None)
    except RuntimeError as exc:
        emit(raised=str(exc))
    """
    result, log = run(code)
    assert result["raised"] is None
    assert "vLLM layer SiluAndMul is already replaced out-of-tree by __main__.VendorSilu" in log
    strict, _ = run(code, VLLM_FL_STRICT="1")
    assert "already replaced out-of-tree by __main__.VendorSilu" in strict["raised"]


def test_disabled_plugin_does_nothing():
    result, log = run("""
    from fl_dispatch.core import dispatch
    from fl_dispatch.vllm_glue import plugin as vllm_plugin
    vllm_plugin.register()
    from vllm.model_executor.custom_op import op_registry_oot
    emit(oot=sorted(op_registry_oot), dispatcher=dispatch.current_dispatcher() is not None,
         ops=hasattr(torch.ops.fl_dispatch, "rms_norm"))
    """, VLLM_FL_PREFER_ENABLED="false")
    assert result == {"oot": [], "dispatcher": False, "ops": False}
    assert "fl_dispatch" not in log


def test_compile_cache_key_changes_with_the_selection():
    code = """
    from fl_dispatch.vllm_glue import plugin as vllm_plugin
    from vllm.config import VllmConfig
    stock = VllmConfig.compute_hash(VllmConfig())
    vllm_plugin.register()
    emit(stock=stock, ours=VllmConfig().compute_hash(), fp=vllm_plugin.fingerprint())
    """
    ref, _ = run(code, VLLM_FL_PREFER="reference", VLLM_FL_PLUGIN_MODULES="perturb_backend")
    other, _ = run(code, VLLM_FL_PREFER="vendor", VLLM_FL_PLUGIN_MODULES="perturb_backend")
    again, _ = run(code, VLLM_FL_PREFER="reference", VLLM_FL_PLUGIN_MODULES="perturb_backend")
    assert ref["stock"] == other["stock"]
    assert ref["ours"] != ref["stock"] and len(ref["ours"]) == len(ref["stock"])
    assert ref["fp"] != other["fp"] and ref["ours"] != other["ours"]
    assert ref["ours"] == again["ours"]  # stable across processes


def test_ir_provider_serves_vllm_ir_rms_norm():
    result, _ = run("""
    from fl_dispatch import get_dispatcher
    from fl_dispatch.vllm_glue import plugin as vllm_plugin
    vllm_plugin.register()
    from vllm import ir
    x, w, r = torch.randn(3, 32), torch.randn(32), torch.randn(3, 32)
    before = get_dispatcher().counts["rms_norm"]
    with ir.ops.rms_norm.set_priority(["fl_dispatch", "native"]):
        a = ir.ops.rms_norm(x, w, 1e-5)
    with ir.ops.fused_add_rms_norm.set_priority(["fl_dispatch", "native"]):
        o, s = ir.ops.fused_add_rms_norm(x, r, w, 1e-5)
    eo, es = ir.ops.fused_add_rms_norm.impls["native"].impl_fn(x, r, w, 1e-5)
    emit(providers=sorted(ir.ops.rms_norm.impls),
         same=torch.equal(a, ir.ops.rms_norm.impls["native"].impl_fn(x, w, 1e-5)),
         same_add=torch.equal(o, eo) and torch.equal(s, es),
         calls=get_dispatcher().counts["rms_norm"] - before)
    """, VLLM_FL_DISPATCH_DEBUG="1")
    assert "fl_dispatch" in result["providers"]
    assert result["same"] and result["same_add"] and result["calls"] == 2


def test_attention_backend_choice_and_user_override():
    code = """
    from fl_dispatch.vllm_glue import plugin as vllm_plugin
    vllm_plugin.register()
    from types import SimpleNamespace
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    auto = SimpleNamespace(model_config=SimpleNamespace(use_mla=False),
                           attention_config=SimpleNamespace(backend=None))
    chosen = vllm_plugin.apply_attention_backend(auto)
    user = SimpleNamespace(model_config=SimpleNamespace(use_mla=False),
                           attention_config=SimpleNamespace(backend=AttentionBackendEnum.FLEX_ATTENTION))
    kept = vllm_plugin.apply_attention_backend(user)
    emit(chosen=chosen, applied=str(getattr(auto.attention_config.backend, "name", None)),
         kept=kept, user=user.attention_config.backend.name)
    """
    result, log = run(code, VLLM_FL_PLUGIN_MODULES="attention_backend_plugin",
                      VLLM_FL_PER_OP="attention_backend=vendor:attnpick")
    assert result["chosen"] == "TRITON_ATTN" and result["applied"] == "TRITON_ATTN"
    assert result["kept"] == "FLEX_ATTENTION" and result["user"] == "FLEX_ATTENTION"
    assert "the user's explicit FLEX_ATTENTION wins over TRITON_ATTN" in log
    default, _ = run(code)  # the reference returns None: vLLM's own choice stays
    assert default["chosen"] is None and default["applied"] == "None"


def test_compiled_graph_traces_plain_pytorch_and_keeps_kernels_opaque():
    """The reference backend is plain PyTorch: the compiler may fuse it (as it fuses vLLM's
    native code). Any other impl stays one opaque op; asking for call counts also keeps the
    reference opaque so that every call is counted."""
    code = """
    from fl_dispatch.vllm_glue import plugin as vllm_plugin
    vllm_plugin.register()
    from vllm.model_executor.layers.layernorm import RMSNorm
    with set_current_vllm_config(VllmConfig()):
        norm = RMSNorm(32, eps=1e-6)
    x = torch.randn(4, 32)
    gm = torch._dynamo.export(lambda t: norm(t) * 1)(x).graph_module
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    emit(opaque=[t for t in targets if "fl_dispatch" in t],
         traced=any("rsqrt" in t for t in targets), fp=vllm_plugin.fingerprint())
    """
    traced, _ = run(code, VLLM_FL_PREFER="reference")
    assert traced["opaque"] == [] and traced["traced"]
    counted, _ = run(code, VLLM_FL_PREFER="reference", VLLM_FL_DISPATCH_DEBUG="1")
    assert counted["opaque"] == ["fl_dispatch.rms_norm"] and not counted["traced"]
    kernel, _ = run(code, VLLM_FL_PLUGIN_MODULES="perturb_backend",
                    VLLM_FL_PER_OP="rms_norm=vendor:perturb|reference")
    assert kernel["opaque"] == ["fl_dispatch.rms_norm"] and not kernel["traced"]
    assert len({traced["fp"], counted["fp"], kernel["fp"]}) == 3  # three compile cache keys


def test_bad_global_switch_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_FL_")}
    env["VLLM_FL_PREFER_ENABLED"] = "maybe"
    proc = subprocess.run([sys.executable, "-c", "from fl_dispatch.vllm_glue import plugin; "
                           "plugin.register()"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "env:VLLM_FL_PREFER_ENABLED: 'maybe' is not a boolean" in proc.stderr


@pytest.mark.parametrize("form", ["out", "copies"])
def test_compiled_rotary_on_qkv_views_never_copies_qkv(form):
    """Regression (H200, Llama-3-8B: plugin on 2-4% below stock at batch 64/256): vLLM
    compiles with auto_functionalized v1, under which an opaque op mutating the q/k slices of
    the qkv projection made Inductor clone each slice's whole span of qkv (and scatter it
    back). The compiled rotary writes fresh tensors of exactly q's and k's sizes instead, and
    the result is vLLM's. "out": the chosen backend serves rotary_embedding_out, which reads
    the q/k views of qkv directly: no kernel between the projection and the rotation (the
    copy kernel this removes was one launch per layer, about 1% of a batch-1 step on the
    H200). "copies": a backend without it rotates copies (one fused copy kernel)."""
    result, _ = run("""
    import re, sys
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code
    from fl_dispatch.vllm_glue import plugin as vllm_plugin, layers
    vllm_plugin.register()
    oop = layers.OUT_OF_PLACE["rotary_embedding"]
    layers.OUT_OF_PLACE["rotary_embedding"] = FORM == "out"
    from vllm.model_executor.layers.rotary_embedding import get_rope
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(32, max_position=128, is_neox_style=True, rope_parameters=None,
                        dtype=torch.float32)
    torch.manual_seed(0)
    w = torch.randn(64, 6 * 32)
    def f(x, pos):
        q, k, v = (x @ w).split([4 * 32, 32, 32], -1)
        q, k = rope(pos, q, k)
        return q * 2, k + 1, v
    x, pos = torch.randn(9, 64), torch.randint(0, 128, (9,))
    with inductor_config.patch(enable_auto_functionalized_v2=False):
        out, code = run_and_get_code(torch.compile(f, dynamic=True), x, pos)
    def before_rotary(code):
        src = "\\n".join(code)
        call = re.search(r"torch\\.ops\\.fl_dispatch\\.(rotary_embedding\\w*)\\.default\\(", src)
        before = src[src.index("def call("):call.start()]
        allocs = [re.sub(r"\\bs\\d+\\b", "T", a)
                  for a in re.findall(r"empty_strided_cpu\\(\\(([^)]*)\\)", before)]
        kernels = re.findall(r"^\\s*(cpp_fused_\\w+)\\(", before, re.M)
        return allocs, kernels, call.group(1), src
    q, k, v = (x @ w).split([4 * 32, 32, 32], -1)
    eq, ek = rope.forward_native(pos, q.clone(), k.clone())
    views, kernels, op, src = before_rotary(code)
    # q and k normalised first (Qwen3's q/k norms, opaque ops here): fresh tensors; copies
    # of them Inductor drops (the rotation runs in place on the norms' outputs)
    from vllm.model_executor.layers.layernorm import RMSNorm
    with set_current_vllm_config(VllmConfig()):
        qn, kn = RMSNorm(32, eps=1e-6), RMSNorm(32, eps=1e-6)
    def g(x, pos):
        q, k, _ = (x @ w).split([4 * 32, 32, 32], -1)
        q, k = qn(q.reshape(-1, 4, 32)).reshape(q.shape), kn(k.reshape(-1, 1, 32)).reshape(k.shape)
        q, k = rope(pos, q, k)
        return q * 2, k + 1
    with inductor_config.patch(enable_auto_functionalized_v2=False):
        out2, code2 = run_and_get_code(torch.compile(g, dynamic=True), x, pos)
    packed, kernels2, _, _ = before_rotary(code2)
    pq, pk = rope.forward_native(pos, qn(q.reshape(-1, 4, 32)).reshape(q.shape),
                                 kn(k.reshape(-1, 1, 32)).reshape(k.shape))
    emit(oop=oop, op=op, views=views, kernels=kernels, packed=packed, kernels2=kernels2,
         scatter="slice_scatter" in src,
         same=[torch.allclose(out[0], eq * 2, atol=1e-6),
               torch.allclose(out[1], ek + 1, atol=1e-6), torch.equal(out[2], v),
               torch.allclose(out2[0], pq * 2, atol=1e-6),
               torch.allclose(out2[1], pk + 1, atol=1e-6)])
    """.replace("FORM", repr(form)), VLLM_FL_PREFER="reference", VLLM_FL_DISPATCH_DEBUG="1")
    # the reference serves both ops: out of place unless forced off
    assert result["oop"] is True
    assert not result["scatter"] and all(result["same"]), result
    if form == "out":
        assert result["op"] == "rotary_embedding_out"
        # the mm output, then the two outputs; no kernel before the rotation
        assert result["views"] == ["T, 192", "T, 128", "T, 32"], result["views"]
        assert result["kernels"] == [] and result["kernels2"] == [], result
        return
    assert result["op"] == "rotary_embedding"
    # the mm output, then q's and k's copies ([T, 128] and [T, 32]), made by one fused
    # kernel; before the change: two flat spans of 192 * T - 64 and 192 * T - 32 elements
    assert result["views"] == ["T, 192", "T, 128", "T, 32"], result["views"]
    assert len(result["kernels"]) == 1 and "clone" in result["kernels"][0], result
    # normalised first: nothing allocated before the rotation but the mm output
    assert result["packed"] == ["T, 192"], result["packed"]


def test_compiled_rotary_goes_out_of_place_only_with_the_chosen_backend():
    """``rotary_embedding_out`` serves compiled graphs only as the faster form of the impl
    chosen for ``rotary_embedding``: when another backend's rotary is chosen (policy or
    ranking), compiled graphs rotate copies with that one, not another backend's out op."""
    code = """
    from fl_dispatch.vllm_glue import plugin as vllm_plugin, layers
    from fl_dispatch.core.dispatch import get_dispatcher
    vllm_plugin.register()
    d = get_dispatcher()
    emit(oop=layers.OUT_OF_PLACE["rotary_embedding"],
         chosen=[d.selection(op).chosen.impl_id
                 for op in ("rotary_embedding", "rotary_embedding_out")])
    """
    both, _ = run(code, VLLM_FL_PREFER="reference")
    assert both == {"oop": True, "chosen": ["reference.torch", "reference.torch"]}
    vendor, _ = run(code, VLLM_FL_PLUGIN_MODULES="inplace_rotary_backend",
                    VLLM_FL_PER_OP="rotary_embedding=vendor:inplace;rotary_embedding_out=reference")
    assert vendor == {"oop": False, "chosen": ["vendor.inplace", "reference.torch"]}
    back, _ = run(code, VLLM_FL_PLUGIN_MODULES="inplace_rotary_backend",
                  VLLM_FL_PER_OP="rotary_embedding=reference;rotary_embedding_out=reference")
    assert back == {"oop": True, "chosen": ["reference.torch", "reference.torch"]}


def test_replacements_keep_vllms_custom_op_names():
    """vLLM's register_oot overwrites a replacement's ``name`` with its registry key (the
    class name); layers consult ``enabled()`` by that name (rotary's flashinfer choice), so a
    user's ``custom_ops=["none", "+rotary_embedding"]`` must still reach our replacements."""
    result, _ = run("""
    from fl_dispatch.vllm_glue import plugin as vllm_plugin
    vllm_plugin.register()
    from vllm.config import CompilationConfig
    from vllm.model_executor.custom_op import op_registry_oot
    names = {key: cls.name for key, cls in op_registry_oot.items()
             if getattr(cls, "_fl_dispatch_layer", None) is not None}
    from vllm.model_executor.layers.rotary_embedding import get_rope
    on = {}
    for ops in (["none", "+rotary_embedding"], ["none", "-rotary_embedding"]):
        config = VllmConfig(compilation_config=CompilationConfig(custom_ops=ops))
        with set_current_vllm_config(config):
            rope = get_rope(32, max_position=128, is_neox_style=True, rope_parameters=None,
                            dtype=torch.float32)
            on[ops[1]] = [type(rope).__name__, rope.enabled()]
    emit(names=names, on=on)
    """)
    names = result["names"]
    assert names["RotaryEmbedding"] == names["DeepseekScalingRotaryEmbedding"] == "rotary_embedding"
    assert names["RMSNorm"] == "rms_norm" and names["SiluAndMul"] == "silu_and_mul"
    assert names["UnquantizedFusedMoEMethod"] == "unquantized_fused_moe", names
    assert result["on"] == {"+rotary_embedding": ["FlDispatchRotaryEmbedding", True],
                            "-rotary_embedding": ["FlDispatchRotaryEmbedding", False]}
