"""Fake vendor libraries for the MoE/MLA adapter tests, with the vendors' REAL schemas.

* ``torch.ops.fl_fake_moe_v025`` / ``fl_fake_moe_v032``: vLLM's ``_moe_C`` ops with the schemas
  of the 0.25 CUDA wheel (strings in ``_moe_C_stable_libtorch.abi3.so``) and 0.32's extra
  optional arguments (``is_padding``, ``scatter_idx``, ``topk_ids``/``expert_map``), declared
  WITHOUT defaults so an adapter that does not pass them fails. ``fl_fake_moe_bad`` adds a
  required argument nobody knows. The kernels behave like the C ops: ``grouped_topk`` rejects a
  bias in another dtype than the scores (csrc e35e487 reads it as the scores' dtype) and
  ``n_group``/``topk`` > 32; ``moe_align_block_size`` with a map DROPS non-local routes
  (ignore_invalid_experts) and leaves the blocks past the used ones unwritten (garbage here);
  ``topk_softmax`` requires an fp32 1-D bias.
* ``torch.ops.fl_fake_flashmla``: FlashMLA's ``dense_decode_fwd`` with vLLM 0.25's 10-argument
  schema; its checks (dtype, d, dv, page block 64); a row of length 0 gets NaN output and lse
  -inf (what an unscheduled row of an uninitialised buffer may hold).
* :func:`fake_flag_gems`: a ``flag_gems`` module whose ``fused`` package has FlagGems 5.0.2's
  signatures and limits (no bias in topk_softmax, ``inplace`` as 6th parameter of
  ``fused_experts_impl``, silu only, ``global_num_experts=-1`` meaning E even with a map).
* :func:`fake_vllm_fused_experts`: vLLM's ``fused_experts`` wanting a ``MoEActivation`` enum,
  reading ``global_num_experts=-1`` as E, out of bounds on ids >= E without a map.

Every call is recorded in :data:`CALLS` (op name, the arguments as received).
"""

from __future__ import annotations

import enum
import sys
import types
from typing import Any

import torch

from fl_dispatch import reference

CALLS: list[tuple[str, dict[str, Any]]] = []
"""(name, arguments) of every fake kernel call, in order (tests clear it)."""

GARBAGE = 12345

_LIBS: dict[str, torch.library.Library] = {}


def _ref(op: str) -> Any:
    return reference(op)


# ----------------------------------------------------------------------------- _moe_C
def _topk_softmax(w, ids, tei, gating, renormalize, bias):
    if bias is not None:
        assert bias.dtype == torch.float32, "bias tensor must be float32"
        assert bias.dim() == 1 and bias.is_contiguous(), "bias tensor must be 1D, contiguous"
    _ref("topk_softmax")(w, ids, tei, gating, renormalize, bias)


def _grouped_topk(scores, n_group, topk_group, topk, renormalize, rsf, bias, scoring_func):
    if n_group > 32:
        raise RuntimeError("n_group should be smaller than or equal to 32 for now")
    if topk > 32:
        raise RuntimeError("topk should be smaller than or equal to 32 for now")
    if bias.dtype != scores.dtype:
        raise RuntimeError("fake build: bias is read as the scores' dtype")
    w, i = _ref("grouped_topk")(scores, n_group, topk_group, topk, renormalize, rsf, bias,
                                scoring_func)
    return w, i


def _align(topk_ids, num_experts, block_size, sorted_ids, eids, ntpp, expert_map):
    if -(-num_experts // 32) * 32 >= 1024:
        raise RuntimeError("padded_num_experts must be less than 1024")
    ids = topk_ids
    if expert_map is not None:  # ignore_invalid_experts: non-local routes are dropped
        local = expert_map.long()[ids.long().clamp(0, num_experts - 1)]
        ids = torch.where((ids >= 0) & (ids < num_experts) & (local >= 0), local,
                          torch.full_like(local, num_experts)).to(topk_ids.dtype)
    _ref("moe_align_block_size")(ids, num_experts, block_size, sorted_ids, eids, ntpp, None)
    used = ntpp.long() // block_size
    blocks = torch.arange(eids.numel())
    eids.masked_fill_(blocks >= used, GARBAGE)  # the C op leaves them unwritten


def _moe_sum(inp, out):
    _ref("moe_sum")(inp, out)


_V025 = {
    "topk_softmax": "topk_softmax(Tensor! topk_weights, Tensor! topk_indices, Tensor! "
                    "token_expert_indices, Tensor gating_output, bool renormalize, Tensor? bias)"
                    " -> ()",
    "grouped_topk": "grouped_topk(Tensor scores, int n_group, int topk_group, int topk, "
                    "bool renormalize, float routed_scaling_factor, Tensor bias, "
                    "int scoring_func) -> (Tensor, Tensor)",
    "moe_align_block_size": "moe_align_block_size(Tensor topk_ids, int num_experts, "
                            "int block_size, Tensor! sorted_token_ids, Tensor! experts_ids, "
                            "Tensor! num_tokens_post_pad, Tensor? maybe_expert_map) -> ()",
    "moe_sum": "moe_sum(Tensor input, Tensor! output) -> ()",
}
_V032_EXTRA = {
    "topk_softmax": ("Tensor? is_padding",),
    "grouped_topk": (),
    "moe_align_block_size": ("Tensor? scatter_idx",),
    "moe_sum": ("Tensor? topk_ids", "Tensor? expert_map"),
}


def _with_extras(schema: str, extras: tuple[str, ...]) -> str:
    head, ret = schema.rsplit(") ->", 1)
    return head + "".join(", " + e for e in extras) + ") ->" + ret


_BASE = {"topk_softmax": 6, "grouped_topk": 8, "moe_align_block_size": 7, "moe_sum": 2}


def _recording(name: str, fn: Any, arg_names: list[str]) -> Any:
    def impl(*args: Any) -> Any:
        CALLS.append((name, dict(zip(arg_names, args))))
        return fn(*args[:_BASE[name]])

    return impl


_KERNELS = {"topk_softmax": _topk_softmax, "grouped_topk": _grouped_topk,
            "moe_align_block_size": _align, "moe_sum": _moe_sum}


def _define(ns: str, extras: dict[str, tuple[str, ...]]) -> str:
    if ns in _LIBS:
        return ns
    lib = torch.library.Library(ns, "DEF")
    for op, schema in _V025.items():
        full = _with_extras(schema, extras.get(op, ()))
        lib.define(full)
        names = [a.name for a in getattr(getattr(torch.ops, ns), op).default._schema.arguments]
        lib.impl(op, _recording(op, _KERNELS[op], names), "CPU")
    _LIBS[ns] = lib
    return ns


def moe_namespace(version: str) -> Any:
    """``torch.ops.fl_fake_moe_<version>``: ``v025``, ``v032`` or ``bad``."""
    extras = {"v025": {}, "v032": _V032_EXTRA,
              "bad": {"moe_sum": ("int required_new_arg",)}}[version]
    return getattr(torch.ops, _define(f"fl_fake_moe_{version}", extras))


# ----------------------------------------------------------------------------- FlashMLA
FLASHMLA_SCHEMA = ("dense_decode_fwd(Tensor q, Tensor kcache, int head_size_v, Tensor seqlens_k, "
                   "Tensor block_table, float softmax_scale, bool is_causal, "
                   "Tensor? tile_scheduler_metadata, Tensor? num_splits, Tensor? out) "
                   "-> (Tensor, Tensor, Tensor, Tensor)")


def _dense_decode(q, kcache, dv, seqlens, block_table, scale, causal, tile_md, num_splits,
                  out=None):
    CALLS.append(("dense_decode_fwd", {"q": q, "seqlens_k": seqlens.clone(), "causal": causal,
                                       "tile_scheduler_metadata": tile_md,
                                       "num_splits": num_splits, "out": out,
                                       "softmax_scale": scale}))
    assert q.dtype in (torch.float16, torch.bfloat16) and kcache.dtype == q.dtype
    assert q.shape[-1] in (576, 512) and dv == 512 and kcache.shape[1] == 64
    assert tile_md is None and num_splits is None
    assert int(seqlens.max()) <= block_table.shape[1] * 64, "would read past the block table"
    s_q = q.shape[1]
    o, lse = _ref("flash_mla")(q, kcache, block_table, seqlens, dv, scale,
                               causal and s_q > 1)
    zero = (seqlens == 0).view(-1, 1, 1, 1)
    o = o.masked_fill(zero, float("nan"))  # an unscheduled row: uninitialised memory
    lse = lse.masked_fill(zero.view(-1, 1, 1), float("-inf"))
    meta = torch.zeros(1, 8, dtype=torch.int32)
    return o, lse, meta, torch.zeros(q.shape[0] + 1, dtype=torch.int32)


def flashmla_namespace() -> Any:
    ns = "fl_fake_flashmla"
    if ns not in _LIBS:
        lib = torch.library.Library(ns, "DEF")
        lib.define(FLASHMLA_SCHEMA)
        lib.impl("dense_decode_fwd", _dense_decode, "CPU")
        _LIBS[ns] = lib
    return getattr(torch.ops, ns)


# ----------------------------------------------------------------------------- vLLM experts
class MoEActivation(enum.Enum):
    SILU = "silu"
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"


def fake_vllm_fused_experts(hidden_states, w1, w2, topk_weights, topk_ids,
                            activation: MoEActivation = MoEActivation.SILU,
                            apply_router_weight_on_input=False, global_num_experts=-1,
                            expert_map=None, quant_config=None):
    """vLLM 0.25's ``fused_experts`` semantics: the activation is a MoEActivation; -1 global
    experts means E; without a map an id >= E would be read as an expert (an error here); with
    a map the routes mapped to -1 are dropped."""
    assert isinstance(activation, MoEActivation), f"activation {activation!r} is not the enum"
    assert hidden_states.is_contiguous() and w1.stride(-1) == 1 and w2.stride(-1) == 1
    CALLS.append(("vllm.fused_experts", {"activation": activation,
                                         "global_num_experts": global_num_experts,
                                         "expert_map": expert_map}))
    num_local = w1.shape[0]
    if global_num_experts == -1:
        global_num_experts = num_local
    if expert_map is None and int(topk_ids.max()) >= num_local:
        raise IndexError("fake vLLM: expert id past w1 (out-of-bounds read on a GPU)")
    return _ref("fused_experts")(hidden_states, w1, w2, topk_weights, topk_ids,
                                 activation.value, apply_router_weight_on_input,
                                 global_num_experts, expert_map)


# ----------------------------------------------------------------------------- FlagGems
def fake_flag_gems() -> tuple[types.ModuleType, types.ModuleType]:
    """(flag_gems, flag_gems.fused) fakes with FlagGems 5.0.2's signatures and limits."""
    fused = types.ModuleType("flag_gems.fused")

    def topk_softmax(topk_weights, topk_indices, token_expert_indices, gating_output,
                     renormalize=False):
        CALLS.append(("flag_gems.topk_softmax", {"renormalize": renormalize}))
        assert topk_weights.size(-1) <= 32
        assert gating_output.shape[1] <= 1024
        num_tokens = gating_output.shape[0]
        p = torch.softmax(gating_output.float(), dim=-1)
        ids = torch.sort(-p, dim=-1, stable=True).indices[:, :topk_weights.shape[1]]
        w = p.gather(1, ids)
        if renormalize:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-8)
        topk_weights.copy_(w)
        topk_indices.copy_(ids.to(topk_indices.dtype))
        k = topk_weights.shape[1]
        token_expert_indices.copy_(torch.arange(k, dtype=torch.int32)[None, :] * num_tokens
                                   + torch.arange(num_tokens, dtype=torch.int32)[:, None])

    def grouped_topk(scores, n_group, topk_group, topk, renormalize, routed_scaling_factor,
                     bias, scoring_func=0):
        CALLS.append(("flag_gems.grouped_topk", {"bias": bias, "topk": topk}))
        if n_group > 32 or topk > 32:
            raise ValueError("n_group/topk should be smaller than or equal to 32")
        assert topk & (topk - 1) == 0, "tl.arange(0, TOPK) needs a power of two"
        bias = bias.to(scores.dtype)
        return _ref("grouped_topk")(scores, n_group, topk_group, topk, renormalize,
                                    routed_scaling_factor, bias, scoring_func)

    def moe_align_block_size_triton(topk_ids, num_experts, block_size, sorted_token_ids,
                                    expert_ids, num_tokens_post_pad):
        CALLS.append(("flag_gems.moe_align_block_size_triton", {"num_experts": num_experts}))
        assert int(topk_ids.max()) < num_experts and int(topk_ids.min()) >= 0
        _ref("moe_align_block_size")(topk_ids, num_experts, block_size, sorted_token_ids,
                                     expert_ids, num_tokens_post_pad, None)

    def moe_sum(input, output):
        CALLS.append(("flag_gems.moe_sum", {}))
        assert input.stride(2) == 1 and output.stride(1) == 1
        _ref("moe_sum")(input, output)

    def fused_experts_impl(hidden_states, w1, w2, topk_weights, topk_ids, inplace=False,
                           activation="silu", apply_router_weight_on_input=False,
                           use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=False,
                           use_int4_w4a16=False, ocp_mx_scheme=None, per_channel_quant=False,
                           global_num_experts=-1, expert_map=None, w1_scale=None,
                           w2_scale=None, w1_zp=None, w2_zp=None, a1_scale=None,
                           a2_scale=None, block_shape=None, w1_bias=None, w2_bias=None):
        CALLS.append(("flag_gems.fused_experts_impl",
                      {"inplace": inplace, "activation": activation,
                       "global_num_experts": global_num_experts, "expert_map": expert_map}))
        assert activation == "silu", f"Only 'silu' activation is supported, got {activation}"
        assert inplace is False
        assert hidden_states.is_contiguous()
        if global_num_experts == -1:
            global_num_experts = w1.shape[0]  # E, even with a map
        return _ref("fused_experts")(hidden_states, w1, w2, topk_weights, topk_ids, "silu",
                                     apply_router_weight_on_input, global_num_experts,
                                     expert_map)

    for fn in (topk_softmax, grouped_topk, moe_align_block_size_triton, moe_sum,
               fused_experts_impl):
        setattr(fused, fn.__name__, fn)
    gems = types.ModuleType("flag_gems")
    gems.fused = fused
    gems.__version__ = "5.0.2-fake"
    for name in ("topk_softmax", "grouped_topk", "moe_sum"):
        setattr(gems, name, getattr(fused, name))
    return gems, fused


def install_flag_gems(monkeypatch: Any) -> types.ModuleType:
    gems, fused = fake_flag_gems()
    monkeypatch.setitem(sys.modules, "flag_gems", gems)
    monkeypatch.setitem(sys.modules, "flag_gems.fused", fused)
    return fused

