"""FlagGems' MoE kernels as ``default.flagos.flaggems`` impls (kind flagos, priority 140).

Every call is checked against FlagGems 5.0.2 (tag ``v5.0.2``, commit 30bfcc07 of
flagos-ai/FlagGems, ``src/flag_gems/fused/``):

* ``topk_softmax(topk_weights, topk_indices, token_expert_indices, gating_output,
  renormalize=False)`` (``topk_softmax.py``): no bias, ``assert topk <= 32``, one block of at
  most 1024 experts per row, ``+1e-8`` in the softmax and renormalisation denominators,
  contiguous rows assumed (row stride = E, k).
* ``grouped_topk(scores, n_group, topk_group, topk, renormalize, routed_scaling_factor, bias,
  scoring_func=0)`` (``grouped_topk.py``): bias required (converted to the scores' dtype),
  ``n_group <= 32``, ``topk <= 32`` (ValueError), ``tl.arange(0, TOPK)`` so ``topk`` must be a
  power of two; sigmoid, ``score + bias`` and the group scores in the scores' dtype.
* ``moe_align_block_size_triton(topk_ids, num_experts, block_size, sorted_token_ids,
  expert_ids, num_tokens_post_pad)`` (``moe_align_block_size.py``): fills
  ``sorted_token_ids`` with ``numel`` and ``expert_ids`` with 0 over the whole buffers, no map;
  ids outside ``[0, num_experts)`` are not skipped (its counters are indexed with them).
* ``moe_sum(input, output)`` (``moe_sum.py``): fp32 accumulation; the hidden dim must be
  contiguous (its strides are not used); autotuned (first call per shape benchmarks).
* ``fused_experts_impl(hidden_states, w1, w2, topk_weights, topk_ids, inplace=False,
  activation="silu", apply_router_weight_on_input=False, ..., global_num_experts=-1,
  expert_map=None, ...)`` (``fused_moe.py``): ``assert activation == "silu"``; ``inplace`` is
  the SIXTH positional argument, so everything after ``topk_ids`` is passed by name;
  ``global_num_experts=-1`` means E even with a map; the map goes through its non-ignoring
  align wrapper (``expert_ids = expert_map[expert_ids]``, blocks of -1 written as zeros).

Not served: ``flash_mla`` (see ``GAPS``). Whatever FlagGems cannot serve is delegated to our own
Triton impls (``moe_routing``, ``moe_experts``), which cover every argument.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from fl_dispatch import checked, write_contiguous

from .flaggems import impls

TOPK_MAX = 32
"""FlagGems topk_softmax: ``assert topk <= 32``; grouped_topk: ``n_group``/``topk`` <= 32."""
TOPK_SOFTMAX_MAX_EXPERTS = 1024
"""FlagGems topk_softmax loads at most 1024 experts per row (``BLOCK_SIZE_EXPERTS`` cap)."""
ALIGN_MAX_EXPERTS = 1024
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _fused() -> Any:
    """FlagGems' ``flag_gems.fused`` package (its top level re-exports the same names)."""
    import flag_gems.fused as fused

    return fused


def _own() -> Any:
    """Our own Triton impls: the delegation target for what FlagGems cannot serve."""
    from . import moe_routing

    return moe_routing


# FlagGems' table (impl default.flagos.flaggems, kind flagos, priority 140, check: FlagGems
# imports): importing this module adds the MoE impls below to it.


@impls.impl()
@checked
def topk_softmax(topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 token_expert_indices: torch.Tensor, gating_output: torch.Tensor,
                 renormalize: bool = False, e_score_correction_bias: torch.Tensor | None = None,
                 ) -> None:
    num_tokens, num_experts = gating_output.shape
    k = topk_weights.shape[1]
    if e_score_correction_bias is not None or k > TOPK_MAX or \
            num_experts > TOPK_SOFTMAX_MAX_EXPERTS or gating_output.dtype not in _FLOATS or \
            token_expert_indices.dtype != torch.int32:
        return _own().topk_softmax(topk_weights, topk_ids, token_expert_indices,
                                   gating_output, renormalize, e_score_correction_bias)
    if num_tokens == 0:
        return None
    gating = gating_output.contiguous()
    write_contiguous(lambda w, ids, tei: _fused().topk_softmax(w, ids, tei, gating,
                                                                bool(renormalize)),
                     topk_weights, topk_ids, token_expert_indices)
    return None


# Not registered: on the H200 (bench/moe_routing.py, 2026-11-30) FlagGems 5.0.2's grouped_topk
# chose other experts than vLLM's _moe_C kernel and the reference in tie-free rows (T >= 64)
# and its weights differed by up to 1.2e-3 (docs/results/h200-moe-routing.txt); vLLM's kernel
# and ours agreed exactly. Kept as an adapter for when that is understood.
@checked
def grouped_topk(scores: torch.Tensor, num_expert_group: int, topk_group: int, topk: int,
                 renormalize: bool, routed_scaling_factor: float, bias: torch.Tensor | None,
                 scoring_func: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    if scores.dtype not in _FLOATS or num_expert_group > TOPK_MAX or topk > TOPK_MAX or \
            topk & (topk - 1) or (bias is not None and bias.numel() != scores.shape[1]):
        return _own().grouped_topk(scores, num_expert_group, topk_group, topk, renormalize,
                                   routed_scaling_factor, bias, scoring_func)
    num_tokens, num_experts = scores.shape
    if num_tokens == 0:
        return (torch.empty((0, topk), dtype=torch.float32, device=scores.device),
                torch.empty((0, topk), dtype=torch.int32, device=scores.device))
    if bias is None:  # FlagGems requires a bias
        b = torch.zeros(num_experts, dtype=scores.dtype, device=scores.device)
    else:
        b = bias.reshape(-1).to(scores.dtype).contiguous()
    return _fused().grouped_topk(scores.contiguous(), int(num_expert_group), int(topk_group),
                                 int(topk), bool(renormalize), float(routed_scaling_factor),
                                 b, int(scoring_func))


def apply_expert_map(experts_ids: torch.Tensor, num_tokens_post_pad: torch.Tensor,
                     block_size: int, num_experts: int, expert_map: torch.Tensor) -> None:
    """``experts_ids[b] = expert_map[experts_ids[b]]`` on the used blocks (``b <
    num_tokens_post_pad / block_size``), 0 on the others, in place; graph-safe."""
    blocks = torch.arange(experts_ids.numel(), device=experts_ids.device)
    used = blocks < torch.div(num_tokens_post_pad.reshape(-1)[:1].long(), block_size,
                              rounding_mode="floor")
    experts = experts_ids.long().clamp(0, num_experts - 1)
    mapped = expert_map.reshape(-1).long()[experts]
    experts_ids.copy_(torch.where(used, mapped, torch.zeros_like(mapped)))


@impls.impl()
@checked
def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int,
                         sorted_token_ids: torch.Tensor, experts_ids: torch.Tensor,
                         num_tokens_post_pad: torch.Tensor,
                         expert_map: torch.Tensor | None = None) -> None:
    if topk_ids.numel() == 0 or num_experts >= ALIGN_MAX_EXPERTS or \
            not sorted_token_ids.is_contiguous() or not experts_ids.is_contiguous() or \
            (expert_map is not None and expert_map.numel() < num_experts):
        return _own().moe_align_block_size(topk_ids, num_experts, block_size,
                                           sorted_token_ids, experts_ids,
                                           num_tokens_post_pad, expert_map)
    _fused().moe_align_block_size_triton(topk_ids.contiguous(), int(num_experts),
                                         int(block_size), sorted_token_ids, experts_ids,
                                         num_tokens_post_pad)
    if expert_map is not None:
        apply_expert_map(experts_ids, num_tokens_post_pad, block_size, num_experts,
                         expert_map)
    return None


@impls.impl()
def moe_sum(input: torch.Tensor, output: torch.Tensor) -> None:
    if input.dim() != 3 or output.shape != (input.shape[0], input.shape[2]) or \
            input.dtype not in _FLOATS or output.dtype not in _FLOATS:
        return _own().moe_sum(input, output)
    tokens, topk, hidden = input.shape
    if tokens == 0 or hidden == 0:
        return None
    if topk == 0:
        output.zero_()
        return None
    x = input if input.stride(2) == 1 else input.contiguous()
    out, copy = (output, False) if output.stride(1) == 1 else \
        (torch.empty((tokens, hidden), dtype=output.dtype, device=output.device), True)
    _fused().moe_sum(x, out)
    if copy:
        output.copy_(out)
    return None


@impls.impl()
@checked
def fused_experts(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str = "silu",
                  apply_router_weight_on_input: bool = False, global_num_experts: int = -1,
                  expert_map: torch.Tensor | None = None) -> torch.Tensor:
    num_local = w1.shape[0]
    if expert_map is None:
        covered = global_num_experts in (-1, num_local)  # ids >= E would be read as experts
        glob = num_local
    else:  # FlagGems reads -1 as E even with a map: pass the map's length
        covered = global_num_experts in (-1, expert_map.numel())
        glob = expert_map.numel()
    if activation != "silu" or not covered or hidden_states.dtype not in _FLOATS or \
            w1.stride(-1) != 1 or w2.stride(-1) != 1:
        from .moe_experts import fused_experts as own

        return own(hidden_states, w1, w2, topk_weights, topk_ids, activation,
                   apply_router_weight_on_input, global_num_experts, expert_map)
    if hidden_states.shape[0] == 0:
        return torch.empty((0, hidden_states.shape[1]), dtype=hidden_states.dtype,
                           device=hidden_states.device)
    return _fused().fused_experts_impl(
        hidden_states.contiguous(), w1, w2, topk_weights.to(torch.float32).contiguous(),
        topk_ids.contiguous(), inplace=False, activation="silu",
        apply_router_weight_on_input=bool(apply_router_weight_on_input),
        global_num_experts=int(glob), expert_map=expert_map)

