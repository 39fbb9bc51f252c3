"""Probe: faster Triton kernels for DeepSeek-V3's ``grouped_topk`` at decode sizes.

    python3 bench/probe_gtopk.py [--out DIR]            # GPU: check, then time (needs
                                                        # .gpu-ops/vllm_moe_C.so.xz for vLLM)
    TRITON_INTERPRET=1 python3 bench/probe_gtopk.py --check   # correctness only (CPU works)

Shape: E 256 in 8 groups of 32, keep 4 groups, top-8, sigmoid scoring, a bf16 bias,
renormalised, routed_scaling_factor 2.5. The shipped kernel (``grouped_topk_kernel`` of
``backends/flagos/kernels_moe_routing.py``, one row per program and one warp at these sizes)
is the ground truth: every variant must give its weights (fp32) and ids (int32) bit for bit,
ties, non-finite inputs and the all-NaN fallback included; a variant that does not is reported
as MISMATCH and is not timed.

What the shipped kernel compiles to (Triton 3.6, sm_90, its PTX/SASS read off-GPU with the
16-byte alignment the launch specializes on): the [1, 8, 32] row tile is laid out
sizePerThread [1, 1, 8], threadsPerWarp [1, 8, 4]: each lane holds 8 consecutive experts (one
16-byte load), a group is 4 lanes. The group stage is three reductions (m1, first index of m1,
m2), each in-thread plus 2 shuffle levels; the 4 group rounds are int64 maxima over 8 lane
groups (3 levels of 2 shuffles); each of the 8 top-K rounds is an in-thread int64 max of 8 then
5 butterfly levels of 2 shuffles each (118 SHFL in all). Triton lowers a 32-bit integer
max/min/add over all 32 lanes to one ``redux.sync``; int64 and fp32 ones to shuffles.

Every variant is one jit kernel, ``gtopk_var``, one row per program (grid = T: no row mask),
the row as a [E/R, R] tile, expert = row*R + i (R = 8: the shipped kernel's layout), with these
constexpr switches, named in the labels:

``g`` (GRP), the group score (top-2 sum), on the [8, 32/R, R] view of the tile.
    g0: the shipped three reductions (m1, first index of m1, m2 without that index).
    g1 (idea a): int64 keys ordered(s)<<32 | (EPG - e), NaN keyed below -inf; k1 = max key
    beside the fp32 max m1 (independent: one stage), m2 decoded from the max key other than
    k1: 2 sequential stages instead of 3. A group with one non-NaN value gets m1 + -inf and one
    with none m1 + m1, as the shipped max gives (so m1 stays the fp32 max, for its NaN bits).
    g2: 32-bit only, 2 stages: m1; then, side by side, c = count(s == m1) and m2' = max of s
    with every m1 replaced by -inf; m2 = m1 if c > 1 else m2' (c == 1: m2' reduces exactly the
    shipped m2's input; c == 0, an all-NaN group: m2' = max of the unchanged group, as shipped).
``s`` (GSEL), the TOPK_GROUP group rounds. s0: the shipped int64 key max per round. s1: two
    32-bit reductions a round (m = max ordered score of the groups left, then the lowest group
    index left scoring m). ``x`` (GEXP): the group values spread to one per tile row first
    ([E/R] = 32, one a lane), so that those reductions span the warp: redux.sync.
``e`` (EXP), the K expert rounds (ties: lower GLOBAL expert index).
    e0: one int64 key max per round (the shipped key; in-thread axis first).
    e1 (idea c): two 32-bit reductions a round: m = max ordered(s) of the live experts, then
    the min expert index among the live ones with ordered(s) == m. ordered() is the shipped
    key's high word (-0.0 -> +0.0 first, NaN where the key puts it), so the order is the key's;
    ``live`` (kept, not taken) is a mask beside the values, so that a real ordered value of
    INT32_MIN (a NaN 0xFFFFFFFF) can never tie with a taken expert.
    e2: each lane sorts its own row of keys once (a sorting network: 19 compare-exchanges for
    8, 5 for 4), then a round only compares the lanes' heads: max of the heads' high words,
    then max of the low words among those heads (both redux.sync: the int64 max exactly), and
    the winning lane shifts its list up by one.
``k4`` (KEPT, idea b): the top-K stage over the kept groups only: a [TOPK_GROUP*EPG/4, 4] tile
    re-loaded at the chosen groups (L1/L2 hit) and re-scored by the same arithmetic (128
    candidates, 4 a lane, instead of 256, 8 a lane); keys still carry the global expert index.
    (RK = 8, ``k8``, gives [16, 8]: half the lanes replicate the other half.)
``c`` (WCARRY): f at each chosen expert taken in the round that chose it (a sum over the warp
    of the hit's f bits, off the next round's path; with e2 carried through the sort), instead
    of the K scores re-read and re-scored after the rounds (without ``c``: one scalar load per
    round, issued once its id is known).
``s2`` (GSEL 2): the kept groups from ranks computed at once (rank[g] = number of groups with a
    higher ordered score, or an equal one and a lower index; kept: rank < TOPK_GROUP) on an
    [8, 8] comparison tile, instead of TOPK_GROUP dependent rounds.
``w2``: two warps. (``r4``, R = 4: a [64, 4] tile.)

The ids and weights are K scalars each, stored one by one. The renormalising sum is written
out in the shipped kernel's order, which depends on where it runs: compiled, its [1, 8] weight
tile lies in lanes 4k (the group axis of its layout) and the butterfly (xor 16, 8, 4) adds
((w0+w4)+(w2+w6))+((w1+w5)+(w3+w7)); under the interpreter ``np.sum`` adds
((w0+w1)+(w2+w3))+((w4+w5)+(w6+w7)). The variant takes the order of the mode it runs in
(``INTERP``, from TRITON_INTERPRET): an add in another order differs in the last bit on a few
rows in every 16 (seen in --check).

Timing: CUDA-graph replay median (``triton.testing.do_bench_cudagraph``), 3 interleaved rounds,
at 1, 16, 64 and 256 tokens: shipped, vLLM's ``_moe_C.grouped_topk`` when loadable, every
variant that passed; a table sorted by time with the ratio to vLLM (about 1.5 minutes).

First run (H200, Triton 3.6, 2026-12-02, vLLM's library not carried): all 28 variants bit-exact
on the GPU. Best ``g2 s2 e2 c t w1``: 2.03 / 2.10 / 2.17 / 2.33 us at T = 1 / 16 / 64 / 256,
shipped 3.03 / 3.08 / 3.06 / 3.18 (vLLM 2.88 / 2.87 at 1 / 16 by earlier runs). The sorted
lane lists (e2) give most of it (``g0 s0 e2``: 2.35 at T=1, ``g0 s0 e0``, the shipped
algorithm here, 2.99); carrying the weights (c) pays with e2 only (2.18 with it; with e0 a
third reduction a round: 3.08); the count group score (g2) with ranks (s2) or 32-bit group
rounds (s1x) about 0.15 more; the tree (t) 0.02. The 32-bit expert rounds (e1) alone: 2.77.
Not paying: int64 group keys (g1: 3.08), 32-bit group rounds on the [8] vector (s1: 3.21),
the kept-only tile (k4: 2.91 with e0, none with e2), two warps (3.10).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _gpu_env import setup

setup()

import torch
import triton
import triton.language as tl

E, NG, TG, K = 256, 8, 4, 8  # experts, groups, groups kept, top-k
EPG = E // NG
RSF = 2.5
TOKENS = (1, 16, 64, 256)

_max = tl.standard._elementwise_max
_min = tl.standard._elementwise_min
_sum = tl.standard._sum_combine
INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
INT32_MIN: tl.constexpr = tl.constexpr(-2147483648)


def _general():
    """``grouped_topk`` pinned to the general ``grouped_topk_kernel`` (the ground truth here and
    the "shipped" row): the kernel that ships since this probe, ``grouped_topk_lanes_kernel``,
    is variant ``g2 s2 e2 c`` with its sum in id order."""
    from fl_dispatch_flagos import moe_routing as mr

    return mr.grouped_topk_variant(0)


# ----------------------------------------------------------------------------- jit helpers

def _shipped_helpers():
    """The shipped kernel module's ``_ord32`` (fp32 -> int32 in the float's order, -0.0 and
    +0.0 tying: the key's high word) and its sorting networks ``_sort4``/``_sort8`` (of int64
    keys, descending, payloads along), decorated as the launcher decorates them (with the
    helpers they call), here with this script's ``triton.jit``."""
    from fl_dispatch_flagos import kernels_moe_routing as kmr
    from fl_dispatch_flagos.launcher import bind_helpers

    helpers = bind_helpers(kmr.grouped_topk_lanes_kernel, kmr, triton.jit).__globals__
    return helpers["_ord32"], helpers["_sort4"], helpers["_sort8"]


_ord, _sort4, _sort8 = _shipped_helpers()


@triton.jit
def _unord(o):
    """The inverse of ``_ord`` (up to the sign of zero)."""
    return (o ^ ((o >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _score(srow, bias_ptr, expert, SCORING: tl.constexpr):
    """(f(x), s = f(x) + bias) at ``expert``: the shipped kernel's arithmetic, op for op."""
    x = tl.load(srow + expert).to(tl.float32)
    if SCORING == 1:
        f = 1.0 / (1.0 + tl.exp(-x))
    else:
        f = x
    return f, f + tl.load(bias_ptr + expert).to(tl.float32)


@triton.jit
def _split2(x):
    """[N, 2m] -> two [N, m] (even and odd columns)."""
    return tl.split(tl.reshape(x, [x.shape[0], x.shape[1] // 2, 2]))


@triton.jit
def _split4(x):
    """[N, 4] -> its 4 columns as [N] tensors (in some order)."""
    a, b = _split2(x)
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    return a0, a1, b0, b1


@triton.jit
def _tree(x, TREE: tl.constexpr):
    """[..., 8] -> [..., 2, 2, 2] when TREE: reducing those axes one by one is a tree of depth
    3 over a thread's 8 values instead of Triton's in-thread chain of 7."""
    if TREE:
        return tl.reshape(x, x.shape[:-1] + [2, 2, 2])
    else:
        return x


@triton.jit
def _max3(x, TREE: tl.constexpr):
    """Max of a [G, C, R] view over its last two axes (in-thread axis first) -> [G]."""
    y = _tree(x, TREE)
    if TREE:
        y = tl.reduce(tl.reduce(y, 4, _max), 3, _max)
    return tl.reduce(tl.reduce(y, 2, _max), 1, _max)


@triton.jit
def _min3(x, TREE: tl.constexpr):
    y = _tree(x, TREE)
    if TREE:
        y = tl.reduce(tl.reduce(y, 4, _min), 3, _min)
    return tl.reduce(tl.reduce(y, 2, _min), 1, _min)


@triton.jit
def _sum3(x, TREE: tl.constexpr):  # integers only (exact in any order)
    y = _tree(x, TREE)
    if TREE:
        y = tl.reduce(tl.reduce(y, 4, _sum), 3, _sum)
    return tl.reduce(tl.reduce(y, 2, _sum), 1, _sum)


@triton.jit
def _max2(x, TREE: tl.constexpr):
    """Max of a [N, R] tile: the in-thread axis 1 first, then the lanes."""
    y = _tree(x, TREE)
    if TREE:
        y = tl.reduce(tl.reduce(y, 3, _max), 2, _max)
    return tl.reduce(tl.reduce(y, 1, _max), 0, _max)


@triton.jit
def _min2(x, TREE: tl.constexpr):
    y = _tree(x, TREE)
    if TREE:
        y = tl.reduce(tl.reduce(y, 3, _min), 2, _min)
    return tl.reduce(tl.reduce(y, 1, _min), 0, _min)


@triton.jit
def _sum2(x, TREE: tl.constexpr):  # integers only
    y = _tree(x, TREE)
    if TREE:
        y = tl.reduce(tl.reduce(y, 3, _sum), 2, _sum)
    return tl.reduce(tl.reduce(y, 1, _sum), 0, _sum)


@triton.jit
def _group_score(s, G: tl.constexpr, EPG: tl.constexpr, R: tl.constexpr,
                 GRP: tl.constexpr, TREE: tl.constexpr):
    """Top-2 sum of each group of the [G*EPG/R, R] tile ``s`` -> [G], as shipped."""
    C: tl.constexpr = EPG // R
    neg_inf = float("-inf")
    s3 = tl.reshape(s, [G, C, R])
    e3 = (tl.arange(0, C)[:, None] * R + tl.arange(0, R)[None, :])[None, :, :]  # in group
    m1 = _max3(s3, TREE)
    if GRP == 0:  # shipped: m1, its first index, the max without that index
        first = _min3(tl.where(s3 == m1[:, None, None], e3, EPG), TREE)
        m2 = _max3(tl.where(e3 == first[:, None, None], neg_inf, s3), TREE)
        gscore = m1 + m2
    elif GRP == 1:  # int64 keys: k1 (beside the fp32 m1), then the max key other than k1
        o = tl.where(s3 == s3, _ord(s3), INT32_MIN)  # NaN below -inf: ignored, as by max
        key = (o.to(tl.int64) << 32) | (EPG - e3).to(tl.int64)
        k1 = _max3(key, TREE)
        k2 = _max3(tl.where(key == k1[:, None, None], -9223372036854775808, key), TREE)
        h1 = (k1 >> 32).to(tl.int32)
        h2 = (k2 >> 32).to(tl.int32)
        # fewer than 2 non-NaN values: shipped m2 = max(-inf at m1's place, NaNs) = -inf;
        # none: shipped m2 = max of the unchanged group = m1
        v2 = tl.where(h2 == INT32_MIN, neg_inf, _unord(h2))
        gscore = tl.where(h1 == INT32_MIN, m1 + m1, m1 + v2)
    else:  # count of m1 and the max without any m1, side by side
        eq = s3 == m1[:, None, None]
        cnt = _sum3(eq.to(tl.int32), TREE)
        m2x = _max3(tl.where(eq, neg_inf, s3), TREE)
        gscore = m1 + tl.where(cnt > 1, m1, m2x)
    return gscore


@triton.jit
def gtopk_var(s_ptr, bias_ptr, w_ptr, ids_ptr, stride_s, scaling,
              G: tl.constexpr, EPG: tl.constexpr, K: tl.constexpr, TOPK_GROUP: tl.constexpr,
              SCORING: tl.constexpr, RENORM: tl.constexpr,
              R: tl.constexpr, GRP: tl.constexpr, GSEL: tl.constexpr, GEXP: tl.constexpr,
              EXP: tl.constexpr, KEPT: tl.constexpr, RK: tl.constexpr,
              WCARRY: tl.constexpr, TREE: tl.constexpr, INTERP: tl.constexpr):
    """One row per program (grid = rows); G, EPG, R, RK powers of two, R and RK divide EPG;
    K == 8 (the renormalising sum is written out). Outputs as the shipped kernel's:
    contiguous [T, K] fp32 weights and int32 ids. INTERP: running under Triton's interpreter
    (only the summation order of the weights depends on it: see the module docstring)."""
    NR: tl.constexpr = G * EPG // R  # tile rows
    C: tl.constexpr = EPG // R  # tile rows per group
    big: tl.constexpr = G * EPG
    row = tl.program_id(0).to(tl.int64)
    srow = s_ptr + row * stride_s
    r = tl.arange(0, NR)
    expert = r[:, None] * R + tl.arange(0, R)[None, :]
    f, s = _score(srow, bias_ptr, expert, SCORING)  # [NR, R]

    # ---- group scores, the fallback flag, the TOPK_GROUP groups (ties: lower group)
    gscore = _group_score(s, G, EPG, R, GRP, TREE)  # [G]
    finite = (gscore == gscore) & (gscore != float("inf")) & (gscore != float("-inf"))
    gord = _ord(gscore)
    if GEXP:  # one value per tile row: whole-warp reductions when a lane holds one row
        gv = tl.reshape(tl.broadcast_to(gord[:, None], [G, C]), [NR])
        gf = tl.reshape(tl.broadcast_to(finite.to(tl.int32)[:, None], [G, C]), [NR])
        gi_of = r // C
    else:
        gv = gord
        gf = finite.to(tl.int32)
        gi_of = tl.arange(0, G)
    any_finite = tl.reduce(gf, 0, _max) > 0
    if KEPT:
        CK: tl.constexpr = EPG // RK
        NK: tl.constexpr = TOPK_GROUP * CK
        rk = tl.arange(0, NK)
        grp_k = tl.zeros([NK], tl.int32)  # the kept group of each row of the kept tile
    kept = tl.full([], 0, tl.int32)  # bitmask of the kept groups
    if GSEL == 2:  # ranks at once: rank[g] = groups beating g (higher score, or equal and lower)
        gg = tl.arange(0, G)
        ob = gord[None, :]  # [g, h]: group h against group g
        oa = gord[:, None]
        beats = (ob > oa) | ((ob == oa) & (gg[None, :] < gg[:, None]))
        rank = tl.reduce(beats.to(tl.int32), 1, _sum)
        kept = tl.reduce(tl.where(rank < TOPK_GROUP, 1 << gg, 0), 0, _sum)
        if KEPT:  # slot j: the group of rank j
            grp_k = tl.reduce(tl.where(rank[None, :] == (rk // CK)[:, None], gg[None, :], 0),
                              1, _sum)
    else:
        if GSEL == 0:
            gkey = (gv.to(tl.int64) << 32) | (G - gi_of).to(tl.int64)
        for j in tl.static_range(TOPK_GROUP):
            if GSEL == 0:
                best = tl.reduce(gkey, 0, _max)
                gi = G - (best - ((best >> 32) << 32)).to(tl.int32)
                gkey = tl.where(gi_of == gi, -9223372036854775808, gkey)
            else:
                avail = ((kept >> gi_of) & 1) == 0
                m = tl.reduce(tl.where(avail, gv, INT32_MIN), 0, _max)
                gi = tl.reduce(tl.where(avail & (gv == m), gi_of, G), 0, _min)
            kept = kept | (1 << gi)
            if KEPT:
                grp_k = tl.where(rk // CK == j, gi, grp_k)

    # ---- top-K experts of the kept groups (ties: lower expert index)
    if KEPT:  # the kept groups only, re-loaded and re-scored
        ex = (grp_k * EPG + (rk % CK) * RK)[:, None] + tl.arange(0, RK)[None, :]
        fv, sv = _score(srow, bias_ptr, ex, SCORING)
        live = ex >= 0
    else:
        ex = expert
        fv = f
        sv = s
        live = (((kept >> (r // C)) & 1) != 0)[:, None] & (ex >= 0)
    # ids and f at the ids as K scalars each (tuples), in selection order
    ids = ()
    fs = ()
    fbits = fv.to(tl.int32, bitcast=True)
    if EXP == 0:  # the shipped int64 key
        key = (_ord(sv).to(tl.int64) << 32) | (big - ex).to(tl.int64)
        key = tl.where(live, key, -9223372036854775808)
        for _ in tl.static_range(K):
            best = _max2(key, TREE)
            idx = big - (best - ((best >> 32) << 32)).to(tl.int32)
            hit = ex == idx
            key = tl.where(hit, -9223372036854775808, key)
            ids = ids + (idx,)
            if WCARRY:
                fs = fs + (_sum2(tl.where(hit, fbits, 0), TREE).to(tl.float32, bitcast=True),)
    elif EXP == 1:  # two 32-bit reductions a round
        o = tl.where(live, _ord(sv), INT32_MIN)
        for _ in tl.static_range(K):
            m = _max2(o, TREE)
            idx = _min2(tl.where(live & (o == m), ex, big), TREE)
            hit = ex == idx
            o = tl.where(hit, INT32_MIN, o)
            live = live & (ex != idx)
            ids = ids + (idx,)
            if WCARRY:
                fs = fs + (_sum2(tl.where(hit, fbits, 0), TREE).to(tl.float32, bitcast=True),)
    else:  # each lane sorts its row once; a round compares the lanes' heads only
        # a tile row lies in one group: the sort needs no group choice (it can overlap the
        # group stage); the rows of groups not kept are emptied after it
        key = (_ord(sv).to(tl.int64) << 32) | (big - ex).to(tl.int64)
        W: tl.constexpr = key.shape[1]
        if W == 4:
            h0, h1, h2, h3 = _split4(key)
            q0, q1, q2, q3 = _split4(fbits)
            h0, h1, h2, h3, q0, q1, q2, q3 = _sort4(h0, h1, h2, h3, q0, q1, q2, q3)
        else:
            ka, kb = _split2(key)
            qa, qb = _split2(fbits)
            h0, h1, h2, h3 = _split4(ka)
            h4, h5, h6, h7 = _split4(kb)
            q0, q1, q2, q3 = _split4(qa)
            q4, q5, q6, q7 = _split4(qb)
            h0, h1, h2, h3, h4, h5, h6, h7, q0, q1, q2, q3, q4, q5, q6, q7 = _sort8(
                h0, h1, h2, h3, h4, h5, h6, h7, q0, q1, q2, q3, q4, q5, q6, q7)
        if not KEPT:
            dead = ((kept >> (r // C)) & 1) == 0
            h0 = tl.where(dead, -9223372036854775808, h0)
            h1 = tl.where(dead, -9223372036854775808, h1)
            h2 = tl.where(dead, -9223372036854775808, h2)
            h3 = tl.where(dead, -9223372036854775808, h3)
            if W == 8:
                h4 = tl.where(dead, -9223372036854775808, h4)
                h5 = tl.where(dead, -9223372036854775808, h5)
                h6 = tl.where(dead, -9223372036854775808, h6)
                h7 = tl.where(dead, -9223372036854775808, h7)
        for _ in tl.static_range(K):
            # the int64 max of the heads as two 32-bit ones: high word, then low word among
            # the heads with that high word (dead heads: low word 0, below every expert's)
            hi = (h0 >> 32).to(tl.int32)
            lo = (h0 - ((h0 >> 32) << 32)).to(tl.int32)
            m = tl.reduce(hi, 0, _max)
            top = hi == m
            lmax = tl.reduce(tl.where(top, lo, 0), 0, _max)
            win = top & (lo == lmax)
            ids = ids + (big - lmax,)
            if WCARRY:
                fs = fs + (tl.reduce(tl.where(win, q0, 0), 0, _sum).to(tl.float32, bitcast=True),)
            h0 = tl.where(win, h1, h0)
            h1 = tl.where(win, h2, h1)
            h2 = tl.where(win, h3, h2)
            q0 = tl.where(win, q1, q0)
            q1 = tl.where(win, q2, q1)
            q2 = tl.where(win, q3, q2)
            if W == 4:
                h3 = tl.where(win, -9223372036854775808, h3)
            else:
                h3 = tl.where(win, h4, h3)
                h4 = tl.where(win, h5, h4)
                h5 = tl.where(win, h6, h5)
                h6 = tl.where(win, h7, h6)
                h7 = tl.where(win, -9223372036854775808, h7)
                q3 = tl.where(win, q4, q3)
                q4 = tl.where(win, q5, q4)
                q5 = tl.where(win, q6, q5)
                q6 = tl.where(win, q7, q6)
    if not WCARRY:  # as shipped: f at the ids from the re-read (cached) scores
        for j in tl.static_range(K):
            xk = tl.load(srow + ids[j]).to(tl.float32)
            if SCORING == 1:
                fs = fs + (1.0 / (1.0 + tl.exp(-xk)),)
            else:
                fs = fs + (xk,)

    # ---- weights: renormalised (the shipped kernel's summation order), scaled; the fallback
    if RENORM:
        if INTERP:  # numpy's pairwise order (np.sum of the shipped [1, 8] tile)
            tot = ((fs[0] + fs[1]) + (fs[2] + fs[3])) + ((fs[4] + fs[5]) + (fs[6] + fs[7]))
        else:  # the shipped kernel's butterfly over lanes 4k: xor 16, 8, 4 pair k^4, k^2, k^1
            tot = ((fs[0] + fs[4]) + (fs[2] + fs[6])) + ((fs[1] + fs[5]) + (fs[3] + fs[7]))
        den = tot + 1e-20
    for j in tl.static_range(K):
        if RENORM:
            wj = fs[j] / den * scaling
        else:
            wj = fs[j] * scaling
        tl.store(w_ptr + row * K + j, tl.where(any_finite, wj, 1.0 / K))
        tl.store(ids_ptr + row * K + j, tl.where(any_finite, ids[j], j))


# ----------------------------------------------------------------------------- variants

def _v(grp, gsel, gexp, exp, kept=0, rk=4, carry=0, tree=0, warps=1, r=8):
    """(label, constexprs, num_warps) of one variant; the label names its switches."""
    label = (f"g{grp} s{gsel}{'x' if gexp else ''} e{exp}{f' k{rk}' if kept else ''}"
             f"{' c' if carry else ''}{' t' if tree else ''}{f' r{r}' if r != 8 else ''}"
             f" w{warps}")
    cfg = dict(R=r, GRP=grp, GSEL=gsel, GEXP=gexp, EXP=exp, KEPT=kept, RK=rk, WCARRY=carry,
               TREE=tree)
    return label, cfg, warps


VARIANTS = [
    _v(0, 0, 0, 0),  # the shipped algorithm in this kernel (one row, no masks)
    # one idea at a time
    _v(1, 0, 0, 0), _v(2, 0, 0, 0),  # group score: int64 keys / count
    _v(0, 1, 0, 0), _v(0, 1, 1, 0),  # group choice: 32-bit rounds, on [8] / spread per lane
    _v(0, 0, 0, 1), _v(0, 0, 0, 2),  # expert rounds: 32-bit pairs / sorted lane lists
    _v(0, 0, 0, 0, kept=1), _v(0, 0, 0, 0, carry=1),  # kept groups only / weights carried
    _v(0, 2, 0, 0),  # group choice: ranks at once
    # combinations
    _v(2, 1, 1, 1), _v(2, 1, 1, 1, carry=1), _v(2, 1, 1, 1, kept=1),
    _v(2, 1, 1, 2), _v(2, 1, 1, 2, carry=1), _v(2, 1, 1, 2, kept=1),
    _v(2, 1, 1, 2, kept=1, carry=1), _v(1, 1, 1, 2, carry=1), _v(0, 0, 0, 2, carry=1),
    _v(2, 0, 0, 2, carry=1), _v(2, 1, 1, 2, carry=1, warps=2),
    _v(2, 2, 0, 2, carry=1), _v(2, 2, 0, 2), _v(2, 2, 0, 2, kept=1, carry=1),
    _v(2, 2, 0, 1, carry=1),
    _v(0, 0, 0, 0, tree=1), _v(2, 2, 0, 2, carry=1, tree=1), _v(2, 1, 1, 1, carry=1, tree=1),
]


def launch_variant(cfg: dict, warps: int, s: torch.Tensor, bias: torch.Tensor,
                   w: torch.Tensor, ids: torch.Tensor, scoring: int = 1) -> None:
    t = s.shape[0]
    gtopk_var[(t,)](s, bias, w, ids, s.stride(0), RSF, G=NG, EPG=EPG, K=K, TOPK_GROUP=TG,
                    SCORING=scoring, RENORM=True, INTERP=INTERP, num_warps=warps,
                    **cfg)


# ----------------------------------------------------------------------------- check

def _cases(dev: str, tokens) -> list[tuple[str, torch.Tensor, int]]:
    """(name, scores, scoring_func) pairs: random bf16 per T, edge rows, fp32 scores."""
    out = []
    for t in tokens:
        g = torch.Generator().manual_seed(1000 + t)
        out.append((f"rand bf16 T={t}",
                    torch.randn(t, E, generator=g).to(torch.bfloat16).to(dev), 1))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(12, E, generator=g)
    x[0, :10] = 3.0  # ties on the low experts (equal maxima: lower expert index wins)
    x[1] = 0.0  # every score equal: group and expert ties
    x[2] = float("-inf")  # sigmoid 0: s = bias
    x[3, 5] = float("nan")  # some NaN
    x[3, 40:44] = float("nan")
    x[3, 200] = float("nan")
    x[4] = float("nan")  # all NaN: no finite group score, the 1/K fallback
    x[5, :EPG] = float("nan")  # one group all NaN
    x[5, EPG:2 * EPG - 1] = float("nan")  # one group with a single non-NaN value
    x[6, ::2] = float("inf")
    x[6, 1::2] = float("-inf")
    x[7, :] = -0.0
    x[7, 3::4] = 0.0
    x[8, 64:96] = 3.0  # a whole group tied
    x[8, 160:192] = 3.0
    x[9] = x[9].round()  # many ties
    x[10, :] = float("nan")
    x[10, 100] = 1.0  # all NaN but one value
    x[11, :] = float("nan")
    x[11, 100:102] = 1.0  # all NaN but two values: one finite group
    out.append(("edge rows bf16", x.to(torch.bfloat16).to(dev), 1))
    out.append(("edge rows fp32", x.clone().to(dev), 1))
    g = torch.Generator().manual_seed(8)
    out.append(("rand fp32 T=16", torch.randn(16, E, generator=g).to(dev), 1))
    # identity scoring (fp32): +-inf reach the group scores (sigmoid keeps s finite or NaN)
    xi = torch.randn(6, E, generator=g)
    xi[0, :40] = float("inf")
    xi[1, ::3] = float("-inf")
    xi[2, :EPG + 1] = float("-inf")
    xi[3, 7] = float("inf")
    xi[3, 8] = float("-inf")
    xi[4, :] = float("-inf")
    xi[5, 33] = float("nan")
    out.append(("identity fp32 +-inf", xi.to(dev), 0))
    return out


def check(dev: str, tokens, variants) -> dict[str, str]:
    """Every variant against the shipped kernel on every case: label -> '' or the first
    mismatch."""
    general = _general()

    g = torch.Generator().manual_seed(0)
    bias = (torch.randn(E, generator=g) * 0.05).to(torch.bfloat16).to(dev)
    cases = [(n, s, f, general(s, NG, TG, K, True, RSF, bias, f))
             for n, s, f in _cases(dev, tokens)]
    result = {}
    for label, cfg, warps in variants:
        bad = ""
        for name, s, func, (want_w, want_i) in cases:
            w = torch.full((s.shape[0], K), -1.0, device=dev)
            i = torch.full((s.shape[0], K), -1, device=dev, dtype=torch.int32)
            try:
                launch_variant(cfg, warps, s, bias, w, i, func)
            except Exception as exc:  # a compile error is a result too
                bad = f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                break
            same_i = torch.equal(i, want_i)
            same_w = torch.equal(w.view(torch.int32), want_w.view(torch.int32))
            if not (same_i and same_w):
                rows = ((i != want_i).any(1) | (w.view(torch.int32) != want_w.view(torch.int32))
                        .any(1)).nonzero().flatten().tolist()
                bad = (f"{name}: {'ids' if not same_i else ''}{' weights' if not same_w else ''}"
                       f" differ in rows {rows[:8]}")
                break
        result[label] = bad
    return result


# ----------------------------------------------------------------------------- timing

def _time(fns: dict, rounds: int = 3, rep: int = 100) -> dict[str, float]:
    from triton.testing import do_bench_cudagraph

    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(do_bench_cudagraph(fn, rep=rep) * 1000.0)
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


def probe(out: list[str], ok: list) -> None:
    general = _general()
    from moe_routing import _load_vllm

    vllm = _load_vllm()
    if isinstance(vllm, str):  # the reason it is missing
        out.append(f"vllm _moe_C: {vllm}")
        vllm = None
    g = torch.Generator().manual_seed(0)
    bias = (torch.randn(E, generator=g) * 0.05).to(torch.bfloat16).cuda()
    best: dict[str, list[float]] = {}
    t0 = time.time()
    for t in TOKENS:
        if time.time() - t0 > 120:  # keep the whole run within ~3 minutes
            out.append(f"T={t}: skipped (time)")
            continue
        gen = torch.Generator(device="cuda").manual_seed(t)
        s = torch.randn(t, E, device="cuda", generator=gen).to(torch.bfloat16)
        fns = {"ours (shipped)": lambda s=s: general(s, NG, TG, K, True, RSF, bias, 1)}
        if vllm is not None:
            fns["vllm _moe_C"] = lambda s=s: vllm.grouped_topk(s, NG, TG, K, True, RSF, bias, 1)
        for label, cfg, warps in ok:
            w = torch.empty(t, K, device="cuda")
            i = torch.empty(t, K, device="cuda", dtype=torch.int32)
            fns[label] = (lambda s=s, w=w, i=i, cfg=cfg, warps=warps:
                          launch_variant(cfg, warps, s, bias, w, i))
        times = _time(fns)
        ref = times.get("vllm _moe_C")
        for k, v in sorted(times.items(), key=lambda kv: kv[1]):
            ratio = f"  x{ref / v:5.3f} vs vLLM" if ref else ""
            out.append(f"grouped_topk T={t:4d} {k:26s} {v:7.3f} us{ratio}")
            best.setdefault(k, []).append(v)
        out.append("")
    out.append("mean over T (us): " + ", ".join(
        f"{k} {sum(v) / len(v):.3f}" for k, v in sorted(best.items(),
                                                          key=lambda kv: sum(kv[1]))[:8]))


def lanes_range(out: list[str]) -> None:
    """The shipped decode kernel (grouped_topk_lanes_kernel) against the general kernel at
    prefill sizes (where its first rule did not pick it): both through
    ``moe_routing.grouped_topk_variant``; ids must agree."""
    from fl_dispatch_flagos import moe_routing as mr

    g = torch.Generator().manual_seed(0)
    bias = (torch.randn(E, generator=g) * 0.05).to(torch.bfloat16).cuda()

    def forced(warps: int):
        variant = mr.grouped_topk_variant(warps)
        return lambda s: variant(s, NG, TG, K, True, RSF, bias, 1)

    for t in (256, 512, 1024, 2048, 4096, 16384):
        s = torch.randn(t, E, device="cuda", generator=torch.Generator(device="cuda")
                        .manual_seed(t)).to(torch.bfloat16)
        runs = {"general": forced(0), "lanes w1": forced(1), "lanes w2": forced(2)}
        want = runs["general"](s)[1]
        fns = {}
        for k, run in runs.items():
            if not torch.equal(run(s)[1], want):
                out.append(f"T={t} {k}: ids MISMATCH")
                continue
            fns[k] = lambda run=run, s=s: run(s)
        times = _time(fns)
        out.append(f"T={t:5d} " + "  ".join(f"{k} {v:7.3f} us" for k, v in times.items()))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--check", action="store_true", help="correctness only (any device)")
    p.add_argument("--lanes-range", action="store_true",
                   help="the shipped lanes kernel vs the general one at 256-16384 tokens")
    p.add_argument("--out", default="")
    p.add_argument("--only", default="", help="comma-separated substrings of variant labels")
    a = p.parse_args()
    if INTERP:  # numpy's all-NaN / invalid-value warnings from the interpreted kernels
        warnings.filterwarnings("ignore", category=RuntimeWarning)
    dev = "cpu" if INTERP or not torch.cuda.is_available() else "cuda"
    if a.lanes_range:
        out_l: list[str] = []
        lanes_range(out_l)
        print("\n".join(out_l))
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, "probe-gtopk-lanes-range.txt"), "w") as f:
                f.write("\n".join(out_l) + "\n")
        return
    variants = [v for v in VARIANTS
                if not a.only or any(o in v[0] for o in a.only.split(","))]
    out: list[str] = []
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)"
    out.append(f"{name} torch {torch.__version__} triton {triton.__version__}")
    t0 = time.time()
    res = check(dev, TOKENS, variants)
    for label, bad in res.items():
        out.append(f"check {label:26s} {'ok' if not bad else 'MISMATCH ' + bad}")
    out.append(f"check: {sum(not b for b in res.values())}/{len(res)} variants bit-exact "
               f"({time.time() - t0:.0f} s)")
    out.append("")
    print("\n".join(out), flush=True)
    if not a.check and dev == "cuda":
        n = len(out)
        probe(out, [v for v in variants if not res[v[0]]])
        print("\n".join(out[n:]))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "probe-gtopk.txt"), "w") as f:
            f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
