"""Adapters from the MoE ops' contracts to vLLM's ``torch.ops._moe_C`` kernels and to vLLM's own
Triton ``fused_experts`` (impl ``vendor.cuda``).

Sources the calls follow (vLLM 0.25 CUDA wheel: ``vllm/_custom_ops.py``, the schemas compiled
into ``_moe_C_stable_libtorch.abi3.so``; vLLM 0.32 where the schemas grew):

* ``topk_softmax(Tensor! topk_weights, Tensor! topk_indices, Tensor! token_expert_indices,
  Tensor gating_output, bool renormalize, Tensor? bias)`` (0.32 adds ``Tensor? is_padding``).
  The library checks "bias tensor must be float32 / 1D / contiguous". The bias shifts only the
  selection: vLLM 0.25's ``fused_topk_bias`` returns the kernel's weights where its non-CUDA
  path returns ``scores.gather(1, ids)`` (unbiased), and vLLM's
  ``tests/kernels/moe/test_fused_topk.py::test_fused_topk_bias`` checks the CUDA weights
  against exactly that unbiased gather.
* ``grouped_topk(Tensor scores, int n_group, int topk_group, int topk, bool renormalize,
  float routed_scaling_factor, Tensor bias, int scoring_func) -> (Tensor, Tensor)``: bias
  required; ``n_group <= 32``, ``topk <= 32`` (TORCH_CHECKs in the library).
* ``moe_align_block_size(Tensor topk_ids, int num_experts, int block_size, Tensor!
  sorted_token_ids, Tensor! experts_ids, Tensor! num_tokens_post_pad, Tensor?
  maybe_expert_map)`` (0.32 adds ``Tensor? scatter_idx``); ``padded_num_experts < 1024``
  with ``num_experts`` padded to a multiple of 32. With a map the C op DROPS the routes of
  non-local experts (``ignore_invalid_experts``); our contract is the wrapper's other path
  (``expert_ids = expert_map[expert_ids]``, ``fused_moe/moe_align_block_size.py``), so the map
  is applied here, after the C op, on the used blocks.
* ``moe_sum(Tensor input, Tensor! output)`` (0.32 adds ``Tensor? topk_ids, Tensor?
  expert_map``).

An adapter follows the LOADED schema: the arguments past the 0.25 ones must be optional and
are passed as None, by name. Every adapter is graph-safe (no host synchronisation) and
delegates what the kernels cannot serve to the op's reference (never raises for it).
"""

from __future__ import annotations

import enum
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from fl_dispatch import ImplTable, checked, reference, write_contiguous

from .ops import load_extension

LIBRARY_ENV = "FL_DISPATCH_VLLM_MOE_C"
"""Path of a vLLM ``_moe_C`` library to load when ``vllm._moe_C`` is not importable."""

BASE_ARGS = {"topk_softmax": 6, "grouped_topk": 8, "moe_align_block_size": 7, "moe_sum": 2}
"""The number of arguments of each op in vLLM 0.25's schema; later arguments are extras."""

GROUPED_TOPK_MAX = 32
"""``_moe_C.grouped_topk``: ``n_group <= 32`` and ``topk <= 32`` (TORCH_CHECK)."""

ALIGN_MAX_PADDED_EXPERTS = 1024
"""``_moe_C.moe_align_block_size``: ``round_up(num_experts, 32) < 1024`` (TORCH_CHECK)."""

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def cuda_reason() -> str | None:
    """None when a CUDA device is present, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def _namespace() -> Any:
    return torch.ops._moe_C


def _has_ops() -> bool:
    ns = _namespace()
    try:
        return all(hasattr(ns, op) for op in BASE_ARGS)
    except Exception:  # a namespace that cannot be inspected: not loaded
        return False


def load_moe_ops() -> str | None:
    """Make ``torch.ops._moe_C`` available: ``import vllm._moe_C`` (or, in the CUDA build
    since vLLM 0.25, ``vllm._moe_C_stable_libtorch``), else the library at
    ``$FL_DISPATCH_VLLM_MOE_C``. None on success, else why not."""
    errors = load_extension(("vllm._moe_C", "vllm._moe_C_stable_libtorch"), LIBRARY_ENV,
                            _has_ops)
    if not errors:
        return None
    return "vLLM's MoE ops (torch.ops._moe_C) are not loadable (" + "; ".join(errors) + ")"


@functools.cache
def call_plan(op: str) -> tuple[tuple[str, ...], str | None]:
    """The names of the loaded schema's arguments past vLLM 0.25's (passed as None), or why
    the schema cannot be served. Read once per op (``reset()`` forgets it)."""
    try:
        schema = getattr(_namespace(), op).default._schema
    except Exception as exc:
        return (), f"torch.ops._moe_C.{op} has no readable schema ({type(exc).__name__}: {exc})"
    args = list(schema.arguments)
    base = BASE_ARGS[op]
    if len(args) < base:
        return (), (f"torch.ops._moe_C.{op} has {len(args)} arguments, fewer than vLLM 0.25's "
                    f"{base} ({schema})")
    extras = args[base:]
    required = [a.name for a in extras if not isinstance(a.type, torch.OptionalType)]
    if required:
        return (), (f"torch.ops._moe_C.{op}'s schema adds required argument(s) "
                    f"{', '.join(required)} this adapter does not know ({schema})")
    return tuple(a.name for a in extras), None


def reset() -> None:
    """Forget the schemas read (tests swapping libraries; a reloaded library)."""
    call_plan.cache_clear()
    _vllm_fused_experts.cache_clear()


def unavailable_reason() -> str | None:
    """None when a CUDA device and vLLM's ``_moe_C`` ops are present, else why not."""
    return cuda_reason() or load_moe_ops()


def _op_check(op: str) -> Callable[[], str | None]:
    def check() -> str | None:
        return unavailable_reason() or call_plan(op)[1]

    check.__name__ = f"{op}_unavailable_reason"
    return check


def _call(op: str, *args: Any) -> Any:
    extras = call_plan(op)[0]
    return getattr(_namespace(), op)(*args, **dict.fromkeys(extras))


impls = ImplTable(impl_id="vendor.cuda", kind="vendor", vendor="cuda",
                  check=unavailable_reason)
"""vLLM's MoE kernels, one impl per op (each with its own check: library + schema)."""


# ----------------------------------------------------------------------------- routing
@impls.impl(check=_op_check("topk_softmax"))
@checked
def topk_softmax(topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 token_expert_indices: torch.Tensor, gating_output: torch.Tensor,
                 renormalize: bool = False, e_score_correction_bias: torch.Tensor | None = None,
                 ) -> None:
    num_tokens, num_experts = gating_output.shape
    bias = e_score_correction_bias
    if gating_output.dtype not in _FLOATS or token_expert_indices.dtype != torch.int32 or \
            (bias is not None and bias.numel() != num_experts):
        return reference("topk_softmax")(topk_weights, topk_ids, token_expert_indices,
                                         gating_output, renormalize, bias)
    if num_tokens == 0:
        return None
    if bias is not None:  # the library wants fp32, 1-D, contiguous
        bias = bias.reshape(-1).to(torch.float32).contiguous()
    gating = gating_output.contiguous()
    write_contiguous(lambda w, ids, tei: _call("topk_softmax", w, ids, tei, gating,
                                               bool(renormalize), bias),
                     topk_weights, topk_ids, token_expert_indices)
    return None


@impls.impl(check=_op_check("grouped_topk"))
@checked
def grouped_topk(scores: torch.Tensor, num_expert_group: int, topk_group: int, topk: int,
                 renormalize: bool, routed_scaling_factor: float, bias: torch.Tensor | None,
                 scoring_func: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    if scores.dtype not in _FLOATS or num_expert_group > GROUPED_TOPK_MAX or \
            topk > GROUPED_TOPK_MAX or (bias is not None and bias.numel() != scores.shape[1]):
        return reference("grouped_topk")(scores, num_expert_group, topk_group, topk,
                                         renormalize, routed_scaling_factor, bias,
                                         scoring_func)
    num_tokens, num_experts = scores.shape
    if num_tokens == 0:
        return (torch.empty((0, topk), dtype=torch.float32, device=scores.device),
                torch.empty((0, topk), dtype=torch.int32, device=scores.device))
    # the schema's bias is required; builds at csrc e35e487 read it as the scores' dtype
    if bias is None:
        b = torch.zeros(num_experts, dtype=scores.dtype, device=scores.device)
    else:
        b = bias.reshape(-1).to(scores.dtype).contiguous()
    weights, ids = _call("grouped_topk", scores.contiguous(), int(num_expert_group),
                         int(topk_group), int(topk), bool(renormalize),
                         float(routed_scaling_factor), b, int(scoring_func))
    if weights.dtype != torch.float32:  # builds before e35e487 return the scores' dtype
        weights = weights.float()
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    return weights, ids


# ----------------------------------------------------------------------------- align / sum
def apply_expert_map(experts_ids: torch.Tensor, num_tokens_post_pad: torch.Tensor,
                     block_size: int, num_experts: int, expert_map: torch.Tensor) -> None:
    """``experts_ids[b] = expert_map[experts_ids[b]]`` on the used blocks (``b <
    num_tokens_post_pad / block_size``), 0 on the others, in place. Graph-safe: the number
    of used blocks stays on the device."""
    blocks = torch.arange(experts_ids.numel(), device=experts_ids.device)
    used = blocks < torch.div(num_tokens_post_pad.reshape(-1)[:1].long(), block_size,
                              rounding_mode="floor")
    experts = experts_ids.long().clamp(0, num_experts - 1)  # unused blocks hold anything
    mapped = expert_map.reshape(-1).long()[experts]
    experts_ids.copy_(torch.where(used, mapped, torch.zeros_like(mapped)))


@impls.impl(check=_op_check("moe_align_block_size"))
@checked
def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int,
                         sorted_token_ids: torch.Tensor, experts_ids: torch.Tensor,
                         num_tokens_post_pad: torch.Tensor,
                         expert_map: torch.Tensor | None = None) -> None:
    padded_experts = -(-num_experts // 32) * 32
    if padded_experts >= ALIGN_MAX_PADDED_EXPERTS or not sorted_token_ids.is_contiguous() or \
            not experts_ids.is_contiguous() or \
            (expert_map is not None and expert_map.numel() < num_experts):
        return reference("moe_align_block_size")(topk_ids, num_experts, block_size,
                                                 sorted_token_ids, experts_ids,
                                                 num_tokens_post_pad, expert_map)
    # without the map: the C op's map path drops non-local routes (ignore_invalid_experts)
    _call("moe_align_block_size", topk_ids.contiguous(), int(num_experts), int(block_size),
          sorted_token_ids, experts_ids, num_tokens_post_pad, None)
    if expert_map is not None:
        apply_expert_map(experts_ids, num_tokens_post_pad, block_size, num_experts,
                         expert_map)
    return None


@impls.impl(check=_op_check("moe_sum"))
def moe_sum(input: torch.Tensor, output: torch.Tensor) -> None:
    if input.dim() != 3 or output.shape != (input.shape[0], input.shape[2]) or \
            input.dtype not in _FLOATS or output.dtype != input.dtype:
        return reference("moe_sum")(input, output)
    tokens, topk, hidden = input.shape
    if tokens == 0 or hidden == 0:
        return None
    if topk == 0:
        output.zero_()
        return None
    x = input.contiguous()
    write_contiguous(lambda out: _call("moe_sum", x, out), output)
    return None


# ----------------------------------------------------------------------------- experts
@functools.lru_cache(maxsize=1)
def _vllm_fused_experts() -> tuple[Callable[..., Any] | None, Any, str | None]:
    """vLLM's Triton ``fused_experts``, how it wants ``activation`` (the ``MoEActivation``
    enum of its default, or a string), or why it is not usable."""
    try:
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts as fn
    except Exception as exc:
        return None, None, (f"vLLM's Triton fused_experts does not import "
                            f"({type(exc).__name__}: {exc})")
    try:
        default = inspect.signature(fn).parameters["activation"].default
    except (KeyError, TypeError, ValueError) as exc:
        return None, None, f"vLLM's fused_experts has no 'activation' parameter ({exc})"
    act_type = type(default) if isinstance(default, enum.Enum) else None
    return fn, act_type, None


def fused_experts_unavailable_reason() -> str | None:
    """None when a CUDA device and vLLM's Triton ``fused_experts`` are present."""
    reason = cuda_reason()
    if reason is not None:
        return (f"{reason}; vLLM's Triton fused_experts (vllm.model_executor.layers."
                f"fused_moe.fused_moe) runs on CUDA only")
    return _vllm_fused_experts()[2]


@impls.impl(check=fused_experts_unavailable_reason)
@checked
def fused_experts(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str = "silu",
                  apply_router_weight_on_input: bool = False, global_num_experts: int = -1,
                  expert_map: torch.Tensor | None = None) -> torch.Tensor:
    fn, act_type, _ = _vllm_fused_experts()
    num_local = w1.shape[0]
    if fn is None or hidden_states.dtype not in _FLOATS:
        return reference("fused_experts")(hidden_states, w1, w2, topk_weights, topk_ids,
                                          activation, apply_router_weight_on_input,
                                          global_num_experts, expert_map)
    if hidden_states.shape[0] == 0:
        return torch.empty((0, hidden_states.shape[1]), dtype=hidden_states.dtype,
                           device=hidden_states.device)
    if expert_map is not None:
        # vLLM reads -1 as E; our contract (and the align over global ids) needs the map's
        if global_num_experts == -1:
            global_num_experts = expert_map.numel()
    elif global_num_experts not in (-1, num_local):
        # ids >= E must contribute zeros; vLLM would read w1[id] past the end: a map that
        # sends them to -1 makes vLLM drop them (its align ignores -1 experts)
        glob = torch.arange(global_num_experts, device=topk_ids.device, dtype=torch.int32)
        expert_map = torch.where(glob < num_local, glob, torch.full_like(glob, -1))
    act = act_type(activation) if act_type is not None else activation
    return fn(hidden_states=hidden_states.contiguous(),
              w1=w1 if w1.stride(-1) == 1 else w1.contiguous(),
              w2=w2 if w2.stride(-1) == 1 else w2.contiguous(),
              topk_weights=topk_weights.to(torch.float32).contiguous(),
              topk_ids=topk_ids.contiguous(), activation=act,
              apply_router_weight_on_input=bool(apply_router_weight_on_input),
              global_num_experts=int(global_num_experts), expert_map=expert_map)


GAPS = {
    "topk_softmax": "vendor.cuda (_moe_C.topk_softmax): the bias is passed as fp32 (the "
                    "library's requirement); gating dtypes other than fp32/fp16/bf16 go to "
                    "the reference; token_expert_indices must be int32; is_padding (0.32) "
                    "is passed as None",
    "grouped_topk": "vendor.cuda (_moe_C.grouped_topk): n_group > 32 or topk > 32 go to the "
                    "reference; bias None becomes zeros, and the bias is converted to the "
                    "scores' dtype (builds at csrc e35e487 read it as that dtype, the schema "
                    "cannot tell them from 0.25's, which accepts any float bias): with bf16 "
                    "scores and an fp32 bias, selection near-ties can differ from the fp32-bias "
                    "contract",
    "moe_align_block_size": "vendor.cuda (_moe_C.moe_align_block_size): called without the "
                            "map, then experts_ids = expert_map[experts_ids] on the used "
                            "blocks (the C op's map path drops non-local routes instead); "
                            "num_experts > 992 (padded to 32 must stay < 1024) and "
                            "non-contiguous output buffers go to the reference; negative "
                            "topk_ids are not skipped by the kernel (it skips ids >= "
                            "num_experts only); scatter_idx (0.32) is None",
    "moe_sum": "vendor.cuda (_moe_C.moe_sum): k = 2..4 accumulate in the tensor dtype (one "
               "rounding per route, within tolerance); input and output dtypes must match "
               "(else the reference); topk_ids/expert_map (0.32) are None",
    "fused_experts": "vendor.cuda (vLLM's Triton fused_experts): CUDA only; without a map and "
                     "global_num_experts != E a map sending ids >= E to -1 is built per call; "
                     "with a map and global_num_experts=-1 the map's length is passed; "
                     "negative topk_ids are not skipped; non-contiguous w1/w2 are copied",
}
"""What the MoE adapters do not cover (shown by ``fl-dispatch plugins``)."""
