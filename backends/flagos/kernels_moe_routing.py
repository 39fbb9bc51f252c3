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


# ----------------------------------------------------------------------------- grouped_topk,
# one row per program with sorted lane lists (bench/probe_gtopk.py, DeepSeek-V3's routing on an
# H200: 2.03 against 3.03 us for grouped_topk_kernel at one token, 19.09 against 27.04 at 16384)

_I64_MIN: tl.constexpr = tl.constexpr(-9223372036854775808)


def _ord32(v):
    """fp32 -> int32 in the float's order, -0.0 and +0.0 tying: the high word of the keys
    above (same bits, so the same order, NaN included)."""
    bits = (v + 0.0).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _ce(a, b, pa, pb):
    """Compare-exchange of int64 keys (descending) with their payloads."""
    gt = a > b
    return tl.where(gt, a, b), tl.where(gt, b, a), tl.where(gt, pa, pb), tl.where(gt, pb, pa)


def _sort4(k0, k1, k2, k3, p0, p1, p2, p3):
    """Sorting network of 4 (5 compare-exchanges), descending."""
    k0, k1, p0, p1 = _ce(k0, k1, p0, p1)
    k2, k3, p2, p3 = _ce(k2, k3, p2, p3)
    k0, k2, p0, p2 = _ce(k0, k2, p0, p2)
    k1, k3, p1, p3 = _ce(k1, k3, p1, p3)
    k1, k2, p1, p2 = _ce(k1, k2, p1, p2)
    return k0, k1, k2, k3, p0, p1, p2, p3


def _sort8(k0, k1, k2, k3, k4, k5, k6, k7, p0, p1, p2, p3, p4, p5, p6, p7):
    """Batcher's odd-even merge sort of 8 (19 compare-exchanges), descending."""
    k0, k1, k2, k3, p0, p1, p2, p3 = _sort4(k0, k1, k2, k3, p0, p1, p2, p3)
    k4, k5, k6, k7, p4, p5, p6, p7 = _sort4(k4, k5, k6, k7, p4, p5, p6, p7)
    k0, k4, p0, p4 = _ce(k0, k4, p0, p4)
    k1, k5, p1, p5 = _ce(k1, k5, p1, p5)
    k2, k6, p2, p6 = _ce(k2, k6, p2, p6)
    k3, k7, p3, p7 = _ce(k3, k7, p3, p7)
    k2, k4, p2, p4 = _ce(k2, k4, p2, p4)
    k3, k5, p3, p5 = _ce(k3, k5, p3, p5)
    k1, k2, p1, p2 = _ce(k1, k2, p1, p2)
    k3, k4, p3, p4 = _ce(k3, k4, p3, p4)
    k5, k6, p5, p6 = _ce(k5, k6, p5, p6)
    return k0, k1, k2, k3, k4, k5, k6, k7, p0, p1, p2, p3, p4, p5, p6, p7


def _columns8(x):
    """The 8 columns of an [N, 8] tile as [N] tensors (in some order)."""
    a, b = tl.split(tl.reshape(x, [x.shape[0], 4, 2]))
    a0, a1 = tl.split(tl.reshape(a, [x.shape[0], 2, 2]))
    b0, b1 = tl.split(tl.reshape(b, [x.shape[0], 2, 2]))
    c0, c1 = tl.split(a0)
    c2, c3 = tl.split(a1)
    c4, c5 = tl.split(b0)
    c6, c7 = tl.split(b1)
    return c0, c1, c2, c3, c4, c5, c6, c7


JIT_HELPERS = ("_ord32", "_ce", "_sort4", "_sort8", "_columns8")


def grouped_topk_lanes_kernel(
    s_ptr, bias_ptr, w_ptr, ids_ptr,
    stride_s, scaling,
    G: tl.constexpr, EPG: tl.constexpr, K: tl.constexpr, TOPK_GROUP: tl.constexpr,
    SCORING: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
):
    """``grouped_topk_kernel``'s result for row ``program_id`` (grid = rows), with every
    selection made by 32-bit whole-warp reductions or in registers. G, EPG powers of two,
    EPG a multiple of 8, G <= 16.

    The row is an [E/8, 8] tile (a lane holds 8 experts of one group, one 16-byte load for
    bf16). Group score: m1 = max, then the count of m1 and the max without m1 side by side
    (two of m1: m1 + m1). Groups kept: rank[g] = groups with a higher ordered score, or an
    equal one and a lower index; kept if rank < TOPK_GROUP (no rounds). Experts: each lane
    sorts its 8 keys ``ordered(s) << 32 | (E - expert)`` once (a sorting network, f carried
    along), lanes of groups not kept are emptied, then each of the K rounds takes the best of
    the lanes' heads (max of the high words, then of the low words among those: the int64 max)
    and the winning lane shifts its list. Same keys as grouped_topk_kernel, so the same ids and
    f; the weights' renormalising sum runs in id order (another order than grouped_topk_kernel's
    reduction: they may differ in the last bit)."""
    NR: tl.constexpr = G * EPG // 8
    C: tl.constexpr = EPG // 8
    big: tl.constexpr = G * EPG
    row = tl.program_id(0).to(tl.int64)
    srow = s_ptr + row * stride_s
    r = tl.arange(0, NR)
    expert = r[:, None] * 8 + tl.arange(0, 8)[None, :]
    x = tl.load(srow + expert).to(tl.float32)
    if SCORING == 1:
        f = 1.0 / (1.0 + tl.exp(-x))
    else:
        f = x
    if HAS_BIAS:
        s = f + tl.load(bias_ptr + expert).to(tl.float32)
    else:
        s = f
    # group scores: top-2 sum (a repeated maximum counts twice), as grouped_topk_kernel
    s3 = tl.reshape(s, [G, C, 8])
    m1 = tl.reduce(tl.reduce(s3, 2, _max), 1, _max)
    eq = s3 == m1[:, None, None]
    cnt = tl.reduce(tl.reduce(eq.to(tl.int32), 2, _sum), 1, _sum)
    m2 = tl.reduce(tl.reduce(tl.where(eq, float("-inf"), s3), 2, _max), 1, _max)
    gscore = m1 + tl.where(cnt > 1, m1, m2)
    finite = (gscore == gscore) & (gscore != float("inf")) & (gscore != float("-inf"))
    any_finite = tl.reduce(finite.to(tl.int32), 0, _max) > 0
    # the TOPK_GROUP groups (ties: lower group index) by rank
    gord = _ord32(gscore)
    gg = tl.arange(0, G)
    beats = (gord[None, :] > gord[:, None]) | ((gord[None, :] == gord[:, None])
                                               & (gg[None, :] < gg[:, None]))
    rank = tl.reduce(beats.to(tl.int32), 1, _sum)
    kept = tl.reduce(tl.where(rank < TOPK_GROUP, 1 << gg, 0), 0, _sum)  # a bitmask
    # each lane's 8 keys sorted, f along; lanes of groups not kept emptied
    key = (_ord32(s).to(tl.int64) << 32) | (big - expert).to(tl.int64)
    fbits = f.to(tl.int32, bitcast=True)
    h0, h1, h2, h3, h4, h5, h6, h7 = _columns8(key)
    q0, q1, q2, q3, q4, q5, q6, q7 = _columns8(fbits)
    h0, h1, h2, h3, h4, h5, h6, h7, q0, q1, q2, q3, q4, q5, q6, q7 = _sort8(
        h0, h1, h2, h3, h4, h5, h6, h7, q0, q1, q2, q3, q4, q5, q6, q7)
    dead = ((kept >> (r // C)) & 1) == 0
    h0 = tl.where(dead, _I64_MIN, h0)
    h1 = tl.where(dead, _I64_MIN, h1)
    h2 = tl.where(dead, _I64_MIN, h2)
    h3 = tl.where(dead, _I64_MIN, h3)
    h4 = tl.where(dead, _I64_MIN, h4)
    h5 = tl.where(dead, _I64_MIN, h5)
    h6 = tl.where(dead, _I64_MIN, h6)
    h7 = tl.where(dead, _I64_MIN, h7)
    ids = ()
    fs = ()
    for _ in tl.static_range(K):
        # the int64 max of the heads as two 32-bit ones (an empty head's low word, 0, is below
        # every expert's, 1..E)
        hi = (h0 >> 32).to(tl.int32)
        lo = (h0 - ((h0 >> 32) << 32)).to(tl.int32)
        m = tl.reduce(hi, 0, _max)
        top = hi == m
        lmax = tl.reduce(tl.where(top, lo, 0), 0, _max)
        win = top & (lo == lmax)
        ids = ids + (big - lmax,)
        fs = fs + (tl.reduce(tl.where(win, q0, 0), 0, _sum).to(tl.float32, bitcast=True),)
        h0 = tl.where(win, h1, h0)
        h1 = tl.where(win, h2, h1)
        h2 = tl.where(win, h3, h2)
        h3 = tl.where(win, h4, h3)
        h4 = tl.where(win, h5, h4)
        h5 = tl.where(win, h6, h5)
        h6 = tl.where(win, h7, h6)
        h7 = tl.where(win, _I64_MIN, h7)
        q0 = tl.where(win, q1, q0)
        q1 = tl.where(win, q2, q1)
        q2 = tl.where(win, q3, q2)
        q3 = tl.where(win, q4, q3)
        q4 = tl.where(win, q5, q4)
        q5 = tl.where(win, q6, q5)
        q6 = tl.where(win, q7, q6)
    if RENORM:
        tot = fs[0]
        for j in tl.static_range(1, K):
            tot = tot + fs[j]
        den = tot + 1e-20
    for j in tl.static_range(K):
        if RENORM:
            wj = fs[j] / den * scaling
        else:
            wj = fs[j] * scaling
        tl.store(w_ptr + row * K + j, tl.where(any_finite, wj, 1.0 / K))
        tl.store(ids_ptr + row * K + j, tl.where(any_finite, ids[j], j))
