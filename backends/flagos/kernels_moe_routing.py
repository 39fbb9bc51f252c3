"""Triton kernels: MoE routing (``topk_softmax``, ``grouped_topk``).

Plain functions, decorated by :mod:`.launcher` on first use. One program handles ``BLOCK_T``
rows held in registers; all math in fp32.

Top-k selection is ``K`` rounds of one int64 max-reduction over a packed key per expert:
``(ordered(score) << 32) | (BLOCK - index)``. ``ordered`` maps the fp32 bit pattern to a
signed int32 with the same order as the float: ``bits ^ ((bits >> 31) & 0x7FFFFFFF)`` (its
own inverse; written out inline, the kernels being single functions), after ``+ 0.0`` turns
``-0.0`` into ``+0.0`` so that the two tie, as float comparison says. The max key is the best
score and, among equal scores, the LOWER index: exactly vLLM's tie rule. The chosen entry's
key is then replaced by the minimum int64 (``taken``), which loses to every real score,
``-inf`` included. Without a bias the selection score is the weight, decoded back from the
key (no second reduction); with a bias the K weights are recomputed from the K chosen inputs,
re-read after the selection (one gathered load from L1/L2 instead of K masked sums over all
experts), by the same arithmetic, so the bits are those of the full-row values.
"""

from __future__ import annotations

import triton.language as tl

_max = tl.standard._elementwise_max
_sum = tl.standard._sum_combine
"""``tl.max``/``tl.sum`` are jit functions decorated when ``triton.language`` is imported;
``tl.reduce`` with these combiners works under the compiler and the interpreter alike."""


def topk_softmax_kernel(
    g_ptr, bias_ptr, w_ptr, ids_ptr, tei_ptr,
    n_rows, n_experts, stride_g,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Rows [pid*BLOCK_T, +BLOCK_T): softmax over the E experts, top-K of (p + bias), weights
    p (renormalised on request), ids, token_expert_indices j*T + t. Outputs contiguous [T,K]."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < n_experts
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(g_ptr + rows64[:, None] * stride_g + cols[None, :], mask=mask,
                other=float("-inf")).to(tl.float32)
    m = tl.reduce(x, 1, _max)
    m = tl.where(m == float("-inf"), 0.0, m)  # all -inf (a masked row): no NaN from inf-inf
    ex = tl.exp(x - m[:, None])
    denom = tl.reduce(ex, 1, _sum)
    p = ex / denom[:, None]
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        sel = p + b[None, :]
    else:
        sel = p
    taken = tl.full([BLOCK_T, BLOCK_E], -2147483648, tl.int64) << 32
    bits = (sel + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0.0 -> +0.0 (they tie)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = (bits.to(tl.int64) << 32) | (BLOCK_E - cols)[None, :].to(tl.int64)
    key = tl.where(col_mask[None, :], key, taken)
    kcols = tl.arange(0, BLOCK_K)
    out_w = tl.full([BLOCK_T, BLOCK_K], 0.0, tl.float32)
    out_i = tl.full([BLOCK_T, BLOCK_K], 0, tl.int32)
    for j in tl.static_range(K):
        best = tl.reduce(key, 1, _max)
        hi = best >> 32
        idx = BLOCK_E - (best - (hi << 32)).to(tl.int32)
        hit = cols[None, :] == idx[:, None]
        if not HAS_BIAS:
            hb = hi.to(tl.int32)
            wj = (hb ^ ((hb >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
            out_w = tl.where(kcols[None, :] == j, wj[:, None], out_w)
        key = tl.where(hit, taken, key)
        out_i = tl.where(kcols[None, :] == j, idx[:, None], out_i)
    omask = row_mask[:, None] & (kcols < K)[None, :]
    if HAS_BIAS:  # the weights are p at the ids: re-read those K logits (cached), not K sums
        xk = tl.load(g_ptr + rows64[:, None] * stride_g + out_i, mask=omask,
                     other=0.0).to(tl.float32)
        out_w = tl.where(omask, tl.exp(xk - m[:, None]) / denom[:, None], 0.0)
    if RENORM:
        out_w = out_w / tl.reduce(out_w, 1, _sum)[:, None]
    offs = rows64[:, None] * K + kcols[None, :]
    tl.store(w_ptr + offs, out_w, mask=omask)
    tl.store(ids_ptr + offs, out_i.to(ids_ptr.dtype.element_ty), mask=omask)
    tei = kcols[None, :] * n_rows + rows[:, None]
    tl.store(tei_ptr + offs, tei, mask=omask)


def grouped_topk_kernel(
    s_ptr, bias_ptr, w_ptr, ids_ptr,
    n_rows, stride_s, scaling,
    G: tl.constexpr, EPG: tl.constexpr, K: tl.constexpr, TOPK_GROUP: tl.constexpr,
    SCORING: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_EPG: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows [pid*BLOCK_T, +BLOCK_T) as [BLOCK_T, BLOCK_G, BLOCK_EPG] tiles: f = score
    (identity or sigmoid), s = f + bias, group score = top-2 sum of s, keep TOPK_GROUP groups,
    top-K of s inside them; weights f at the ids; fallback 1/K on 0..K-1 when no group score
    is finite. Outputs contiguous [T, K] (fp32 weights, int32 ids)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    e = tl.arange(0, BLOCK_EPG)
    expert = g[:, None] * EPG + e[None, :]  # [BLOCK_G, BLOCK_EPG]
    emask = (g < G)[:, None] & (e < EPG)[None, :]
    mask = row_mask[:, None, None] & emask[None, :, :]
    x = tl.load(s_ptr + rows64[:, None, None] * stride_s + expert[None, :, :], mask=mask,
                other=0.0).to(tl.float32)
    if SCORING == 1:
        f = 1.0 / (1.0 + tl.exp(-x))
    else:
        f = x
    if HAS_BIAS:
        b = tl.load(bias_ptr + expert, mask=emask, other=0.0).to(tl.float32)
        s = f + b[None, :, :]
    else:
        s = f
    neg_inf = float("-inf")
    s_m = tl.where(mask, s, neg_inf)
    # group score: the two largest of each group (a repeated maximum counts twice)
    m1 = tl.reduce(s_m, 2, _max)
    first = tl.reduce(tl.where(s_m == m1[:, :, None], e[None, None, :], BLOCK_EPG), 2,
                      tl.standard._elementwise_min)
    m2 = tl.reduce(tl.where(e[None, None, :] == first[:, :, None], neg_inf, s_m), 2, _max)
    gscore = m1 + m2  # [BLOCK_T, BLOCK_G]
    finite = (gscore == gscore) & (gscore != float("inf")) & (gscore != neg_inf)
    any_finite = tl.reduce(finite.to(tl.int32), 1, _max) > 0
    # keep TOPK_GROUP groups (ties: lower group index)
    taken_g = tl.full([BLOCK_T, BLOCK_G], -2147483648, tl.int64) << 32
    gbits = (gscore + 0.0).to(tl.int32, bitcast=True)
    gbits = gbits ^ ((gbits >> 31) & 0x7FFFFFFF)
    gkey = (gbits.to(tl.int64) << 32) | (BLOCK_G - g)[None, :].to(tl.int64)
    gkey = tl.where((g < G)[None, :], gkey, taken_g)
    keep = tl.full([BLOCK_T, BLOCK_G], 0, tl.int1)
    for _ in tl.static_range(TOPK_GROUP):
        best = tl.reduce(gkey, 1, _max)
        gi = BLOCK_G - (best - ((best >> 32) << 32)).to(tl.int32)
        hit = g[None, :] == gi[:, None]
        keep = keep | hit
        gkey = tl.where(hit, taken_g, gkey)
    # top-K experts of the kept groups (ties: lower expert index; kept -inf beats not kept)
    taken = tl.full([BLOCK_T, BLOCK_G, BLOCK_EPG], -2147483648, tl.int64) << 32
    big = G * EPG
    bits = (s + 0.0).to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = (bits.to(tl.int64) << 32) | (big - expert)[None, :, :].to(tl.int64)
    key = tl.where(mask & keep[:, :, None], key, taken)
    kcols = tl.arange(0, BLOCK_K)
    out_w = tl.full([BLOCK_T, BLOCK_K], 0.0, tl.float32)
    out_i = tl.full([BLOCK_T, BLOCK_K], 0, tl.int32)
    for j in tl.static_range(K):
        best = tl.reduce(tl.reduce(key, 2, _max), 1, _max)
        hi = best >> 32
        idx = big - (best - (hi << 32)).to(tl.int32)
        hit = expert[None, :, :] == idx[:, None, None]
        if not HAS_BIAS:
            hb = hi.to(tl.int32)
            wj = (hb ^ ((hb >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
            out_w = tl.where(kcols[None, :] == j, wj[:, None], out_w)
        key = tl.where(hit, taken, key)
        out_i = tl.where(kcols[None, :] == j, idx[:, None], out_i)
    if HAS_BIAS:  # the weights are f at the ids: re-read those K scores (cached), not K sums
        kmask = row_mask[:, None] & (kcols < K)[None, :] & (out_i < big)
        xk = tl.load(s_ptr + rows64[:, None] * stride_s + out_i, mask=kmask,
                     other=0.0).to(tl.float32)
        if SCORING == 1:
            fk = 1.0 / (1.0 + tl.exp(-xk))
        else:
            fk = xk
        out_w = tl.where(kmask, fk, 0.0)
    if RENORM:
        out_w = out_w / (tl.reduce(out_w, 1, _sum)[:, None] + 1e-20) * scaling
    else:
        out_w = out_w * scaling
    out_w = tl.where(any_finite[:, None], out_w, 1.0 / K)
    out_i = tl.where(any_finite[:, None], out_i, kcols[None, :])
    omask = row_mask[:, None] & (kcols < K)[None, :]
    offs = rows64[:, None] * K + kcols[None, :]
    tl.store(w_ptr + offs, out_w, mask=omask)
    tl.store(ids_ptr + offs, out_i, mask=omask)
