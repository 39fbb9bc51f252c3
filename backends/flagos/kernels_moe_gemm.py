"""Triton kernels of ``fused_experts``: grouped GEMMs over expert-aligned blocks of routes.

Plain functions, decorated by :mod:`.launcher` on first use. A *route* is one (token, slot)
pair, flat index ``r = t * top_k + j``. The routes are grouped per expert into blocks of
``BLOCK_M`` (``moe_align_block_size``: ``sorted_ids`` lists routes, pad value ``num_valid``,
``expert_ids`` one expert per block, ``-1`` = not on this rank), or, at decode sizes, one
block per route (``NAIVE``: block ``b`` holds route ``b`` only and its expert is
``topk_ids.flat[b]``), as in vLLM's ``fused_moe_kernel``.

* :func:`moe_gemm1_act_kernel`: for a block of routes and ``BLOCK_N`` intermediate columns,
  computes the gate tile ``x @ w1[e, n].T`` and the up tile ``x @ w1[e, N + n].T`` in the same
  program (two fp32 accumulators sharing the A tile) and writes ``act(gate) * up`` straight
  into the ``[M*k, N]`` intermediate: no ``[M*k, 2N]`` round trip, one launch fewer.
* :func:`moe_gemm2_kernel`: ``y = a @ w2[e].T`` per route, times the router weight in fp32,
  rounded to the dtype, written to row ``r`` of ``[M*k, K]`` (summed over k afterwards), or
  straight into the ``[M, K]`` output when k == 1. Extra leading "clean" programs write zeros
  for routes the alignment skipped (ids outside ``[0, num_global)`` or mapped to -1), so every
  output row is written without a memset.
* :func:`moe_gemm2_sum_kernel`: at decode (``NAIVE``, k > 1) GEMM2 and the sum over k in one
  program per (token, columns block), bit for bit GEMM2 then ``moe_sum``; chosen by the tile
  config's ``FUSE_SUM``.

The tile code is in device functions (``_gemm1_tile``, ``_gemm2_tile``, the loads and the
dot), plain functions listed in ``JIT_HELPERS``: :mod:`.launcher` decorates them with the
kernel that calls them, for the same mode (compiler or interpreter).

Offsets are int64 (vLLM issue #5938: > 65k tokens overflowed int32 products). Only builtins of
``triton.language`` are used (no ``tl.zeros``/``tl.cdiv``/``tl.sum``: those are ``@jit``
library functions, which Triton's interpreter cannot call when ``TRITON_INTERPRET`` is set
after ``triton`` was imported, as our tests do). Rounding as
vLLM's Triton path: fp32 accumulation, GEMM1 result (times the router weight when MUL_W)
rounded to the dtype, act in fp32 rounded to the dtype, times up in fp32, rounded; GEMM2 fp32
times router weight, rounded.

Programmatic dependent launch (``PDL``, sm_90+, compiled kernels only): GEMM2 (either kernel)
may be launched as a PDL dependent of GEMM1 (the launch option ``launch_pdl=True``; the
adapter decides, :func:`.moe_experts.pdl_available`). Its programs then start while GEMM1 still
runs: they compute what does not depend on GEMM1's output, then ``gdc_wait()``
(``griddepcontrol.wait``: returns once GEMM1 has completed and its writes are visible) before
the K loop reads the intermediate. GEMM1 lets the dependents launch early with
``gdc_launch_dependents()`` (``PDL_TRIGGER``). The arithmetic is untouched: results are bit for
bit those without PDL. The PDL code sits under constexprs that are False under the
interpreter, which does not execute ``griddepcontrol`` (Triton 3.9's interpreter builder has no
grid-dependency ops at all). An L2 prefetch of the program's ``w2`` rows before the wait
(``cp.async.bulk.prefetch.L2``) was tried and lost every time on the H200 (2026-12-01, e.g.
Qwen3-30B-A3B at one token 26.2 us vs 25.6 with PDL alone, Mixtral 211.3 vs 170.5 without PDL,
DeepSeek-V3 at 4 tokens 815.9 vs 617.5).

Why reading ``topk_ids`` / ``expert_ids`` / ``sorted_ids`` / ``num_tokens_post_pad`` and the
router weights before the wait is safe: they are written by kernels (routing, alignment, the
dtype/contiguity copies of the adapter) that precede GEMM1 in the stream, and GEMM1 itself is
always launched normally (never as a PDL dependent), so GEMM1 started only after those
kernels completed and their writes became visible; a dependent of GEMM1 starts after GEMM1
did. Nothing launched between GEMM1 and GEMM2. GEMM1 only writes the intermediate (``a`` of
GEMM2), which is read only after the wait; GEMM2's own output is neither read nor written by
GEMM1, so writing it before the wait (zero rows, clean programs) races with nothing.
"""

from __future__ import annotations

import triton.language as tl

try:  # referenced only under PDL constexprs, never traced when those are False
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without them: moe_experts.pdl_available() is False there
    gdc_launch_dependents = gdc_wait = None

ACT_SILU = 0
ACT_GELU = 1
ACT_GELU_TANH = 2

_sum = tl.standard._sum_combine
"""Combiner for ``tl.reduce`` (as ``kernels_moe_align``'s: the interpreter reduces with numpy
for Triton's own combiner, element by element for any other)."""


def _load_a(a_ptrs, rmask, offs_k, kk, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The A tile of K step ``kk``: rows where ``rmask``, zero past K unless ``EVEN_K``."""
    if EVEN_K:
        a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
    else:
        a = tl.load(a_ptrs, mask=rmask[:, None] & (offs_k < K - kk * BLOCK_K)[None, :],
                    other=0.0)
    return a


def _load_w(w_ptrs, offs_k, kk, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
            W_EVICT: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` weight tile of K step ``kk`` by pointers: zero past K unless
    ``EVEN_K``; evicted from the caches first when ``W_EVICT`` (weights streamed once)."""
    if EVEN_K:
        if W_EVICT:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs)
    else:
        kmask = (offs_k < K - kk * BLOCK_K)[:, None]
        if W_EVICT:
            w = tl.load(w_ptrs, mask=kmask, other=0.0, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs, mask=kmask, other=0.0)
    return w


def _dot(a, w, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ w`` in fp32: ieee for fp32 inputs; ``UPCAST`` (the interpreter, whose bf16
    ``tl.dot`` is wrong) on fp32 copies, which are exact."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc=acc, input_precision="ieee")
    elif IEEE:
        acc = tl.dot(a, w, acc=acc, input_precision="ieee")
    else:
        acc = tl.dot(a, w, acc=acc)
    return acc


def _grouped_pid(pid, EM, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` in grouped order: GROUP_M row blocks take each
    column block in turn, so the weight tile of one column block is read by consecutive
    programs (from L2 after the first)."""
    num_pid_m = (EM + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + ((pid % in_group) % group_m), (pid % in_group) // group_m


def _block_routes(pid_m, num_valid, sorted_ids_ptr, expert_ids_ptr, NAIVE: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """``(routes, rmask, expert)`` of block ``pid_m``: its BLOCK_M slots (route ids, int64;
    ``num_valid`` = pad), which hold a route, and the block's expert (NAIVE: block ``b`` is
    route ``b`` alone, its expert ``topk_ids.flat[b]``, passed as ``expert_ids_ptr``)."""
    offs = tl.arange(0, BLOCK_M).to(tl.int64)
    if NAIVE:
        routes = tl.where(offs == 0, pid_m.to(tl.int64), num_valid)
    else:
        routes = tl.load(sorted_ids_ptr + pid_m.to(tl.int64) * BLOCK_M + offs).to(tl.int64)
    return routes, routes < num_valid, tl.load(expert_ids_ptr + pid_m).to(tl.int64)


def _upper_half_empty(sorted_ids_ptr, slot0, num_valid, BLOCK_M: tl.constexpr):
    """Whether slots ``[BLOCK_M/2, BLOCK_M)`` of the block starting at ``slot0`` hold no route
    (all pads: ``>= num_valid``). The whole half is checked, not its first slot: the order
    inside an expert's blocks is the alignment's choice."""
    upper = tl.load(sorted_ids_ptr + slot0 + BLOCK_M // 2 + tl.arange(0, BLOCK_M // 2))
    return tl.reduce((upper < num_valid).to(tl.int32), 0, _sum) == 0


def _half_routes(sorted_ids_ptr, slot0, BLOCK_M: tl.constexpr):
    """The routes of slots ``[0, BLOCK_M/2)`` of the block starting at ``slot0`` (int64)."""
    return tl.load(sorted_ids_ptr + slot0 + tl.arange(0, BLOCK_M // 2)).to(tl.int64)


JIT_HELPERS = ("_grouped_pid", "_block_routes", "_upper_half_empty", "_half_routes", "_load_a",
               "_load_w", "_dot", "_gemm1_tile", "_gemm2_tile")
"""Device functions the kernels call: :mod:`.launcher` decorates them with the kernel, for the
same mode (compiler or interpreter). The kernels keep the early exit past the aligned blocks
themselves: as a helper returning a flag it changed the decode kernels' PTX."""


def _gemm1_tile(
    a_ptr, w_ptr, c_ptr, topk_w_ptr, routes, rmask, expert, slot0, pid_n,
    N, K, top_k, stride_am, stride_we, stride_wn, stride_cm,
    ROWS: tl.constexpr, MUL_W: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, W_EVICT: tl.constexpr,
    UPCAST: tl.constexpr, PDL_TRIGGER: tl.constexpr, TMA_W: tl.constexpr,
    SORTED_C: tl.constexpr,
):
    """GEMM1 and the activation for ``ROWS`` routes (``routes``, valid where ``rmask``) of
    one block of ``expert`` and columns block ``pid_n``: the K loop and the epilogue of
    :func:`moe_gemm1_act_kernel` (its parameters; ``slot0`` is the block's first slot)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (routes // top_k)[:, None] * stride_am + offs_k[None, :]
    if TMA_W:
        g_row = (expert * 2 * N + pid_n * BLOCK_N).to(tl.int32)
    else:
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64) % N  # wrap: no mask
        w_base = w_ptr + expert * stride_we + offs_k[:, None]
        g_ptrs = w_base + offs_n[None, :] * stride_wn
        u_ptrs = w_base + (offs_n + N)[None, :] * stride_wn
    acc_g = tl.full((ROWS, BLOCK_N), 0.0, tl.float32)
    acc_u = tl.full((ROWS, BLOCK_N), 0.0, tl.float32)
    for kk in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        a = _load_a(a_ptrs, rmask, offs_k, kk, K, BLOCK_K, EVEN_K)
        if TMA_W:
            g = tl.trans(w_ptr.load([g_row, kk * BLOCK_K]))
            u = tl.trans(w_ptr.load([g_row + N, kk * BLOCK_K]))
        else:
            g = _load_w(g_ptrs, offs_k, kk, K, BLOCK_K, EVEN_K, W_EVICT)
            u = _load_w(u_ptrs, offs_k, kk, K, BLOCK_K, EVEN_K, W_EVICT)
        acc_g = _dot(a, g, acc_g, IEEE, UPCAST)
        acc_u = _dot(a, u, acc_u, IEEE, UPCAST)
        a_ptrs += BLOCK_K
        if not TMA_W:
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
    if PDL_TRIGGER == 2:
        gdc_launch_dependents()

    if MUL_W:
        wt = tl.load(topk_w_ptr + routes, mask=rmask, other=0.0).to(tl.float32)
        acc_g = acc_g * wt[:, None]
        acc_u = acc_u * wt[:, None]
    c_ty = c_ptr.dtype.element_ty
    gf = acc_g.to(c_ty).to(tl.float32)
    uf = acc_u.to(c_ty).to(tl.float32)
    if ACT == 0:
        y = gf / (1.0 + tl.exp(-gf))
    elif ACT == 1:
        y = 0.5 * gf * (1.0 + tl.math.erf(gf * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (gf + 0.044715 * gf * gf * gf)
        y = 0.5 * gf * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))  # tanh via exp
    y = (y.to(c_ty).to(tl.float32) * uf).to(c_ty)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SORTED_C:  # the whole block, pad rows too (zeros: their A rows were masked to 0)
        slots = slot0 + tl.arange(0, ROWS).to(tl.int64)
        tl.store(c_ptr + slots[:, None] * stride_cm + offs_cn[None, :], y,
                 mask=offs_cn[None, :] < N)
    else:
        c_ptrs = c_ptr + routes[:, None] * stride_cm + offs_cn[None, :]
        tl.store(c_ptrs, y, mask=rmask[:, None] & (offs_cn[None, :] < N))


def moe_gemm1_act_kernel(
    a_ptr, w_ptr, c_ptr, topk_w_ptr, sorted_ids_ptr, expert_ids_ptr, ntpp_ptr,
    N, K, EM, num_valid, top_k, num_local,
    stride_am, stride_we, stride_wn, stride_cm,
    NAIVE: tl.constexpr, MUL_W: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, W_EVICT: tl.constexpr,
    UPCAST: tl.constexpr, PDL_TRIGGER: tl.constexpr, TMA_W: tl.constexpr,
    SORTED_C: tl.constexpr, HALF_M: tl.constexpr,
):
    """c[r, n] = act(x[r // top_k] @ w1[e, n]) * (x[r // top_k] @ w1[e, N + n]).

    ``w`` is ``[E, 2N, K]`` with unit stride along K; ``a`` is ``[M, K]`` with unit stride
    along K; ``c`` is ``[M*k, N]`` (row stride ``stride_cm``, unit column stride).

    ``TMA_W``: ``w_ptr`` is a host tensor descriptor of ``w1`` viewed as ``[E*2N, K]`` with
    block ``[BLOCK_N, BLOCK_K]``: the weight tiles arrive by TMA (bulk copies into shared
    memory, out-of-bounds rows and columns zero-filled), not by per-thread loads. A gate tile
    that runs past row N of its expert reads up rows, an up tile past 2N the next expert's
    (or zeros): only columns >= N see them, and those are never stored.
    ``SORTED_C``: the intermediate is in aligned-block order (row ``pid_m * BLOCK_M + i`` for
    slot i of block pid_m, pad slots included, holding zeros), so GEMM2 can read its blocks
    as dense tiles (its ``SORTED_C``); else row ``r`` for route r.

    ``PDL_TRIGGER`` (when GEMM2 is launched as a PDL dependent): 0: no explicit trigger (the
    dependents launch once every program has exited); 1: ``gdc_launch_dependents()`` first
    thing; 2: after the K loop. The dependent grid launches only once *every* program of this
    grid has triggered or exited, i.e. once the last program has been scheduled: an early
    trigger therefore never holds back a later wave of this grid (all its programs are
    resident by then); the dependents' programs only share the SMs and the memory bandwidth
    with this grid's last wave, which is the overlap wanted, but while they wait they hold
    their registers and shared memory (measured: a win for Qwen3-30B-A3B only, see
    ``moe_experts``). Never set under the interpreter."""
    pid = tl.program_id(0)
    if PDL_TRIGGER == 1:
        gdc_launch_dependents()
    pid_m, pid_n = _grouped_pid(pid, EM, N, BLOCK_M, BLOCK_N, GROUP_M)
    if not NAIVE:
        if pid_m * BLOCK_M >= tl.load(ntpp_ptr):
            return  # past the aligned blocks
    routes, rmask, expert = _block_routes(pid_m, num_valid, sorted_ids_ptr, expert_ids_ptr,
                                          NAIVE, BLOCK_M)
    if (expert < 0) | (expert >= num_local):
        return  # GEMM2 writes zeros for this block; its intermediate rows are never read

    if HALF_M:
        # the upper half of the block holds only pads (at prefill, the last block of most
        # experts): a tile of half the rows, half the MMA work
        slot0 = pid_m.to(tl.int64) * BLOCK_M
        if _upper_half_empty(sorted_ids_ptr, slot0, num_valid, BLOCK_M):
            lower = _half_routes(sorted_ids_ptr, slot0, BLOCK_M)
            _gemm1_tile(a_ptr, w_ptr, c_ptr, topk_w_ptr, lower, lower < num_valid, expert,
                        slot0, pid_n, N, K, top_k, stride_am, stride_we, stride_wn, stride_cm,
                        BLOCK_M // 2, MUL_W, ACT, BLOCK_N, BLOCK_K, EVEN_K, IEEE, W_EVICT,
                        UPCAST, PDL_TRIGGER, TMA_W, SORTED_C)
        else:
            _gemm1_tile(a_ptr, w_ptr, c_ptr, topk_w_ptr, routes, rmask, expert, slot0, pid_n,
                        N, K, top_k, stride_am, stride_we, stride_wn, stride_cm, BLOCK_M,
                        MUL_W, ACT, BLOCK_N, BLOCK_K, EVEN_K, IEEE, W_EVICT, UPCAST,
                        PDL_TRIGGER, TMA_W, SORTED_C)
    else:
        _gemm1_tile(a_ptr, w_ptr, c_ptr, topk_w_ptr, routes, rmask, expert,
                    pid_m.to(tl.int64) * BLOCK_M, pid_n, N, K, top_k, stride_am, stride_we,
                    stride_wn, stride_cm, BLOCK_M, MUL_W, ACT, BLOCK_N, BLOCK_K, EVEN_K, IEEE,
                    W_EVICT, UPCAST, PDL_TRIGGER, TMA_W, SORTED_C)


def _gemm2_tile(
    a_ptr, w_ptr, c_ptr, topk_w_ptr, routes, rmask, expert, slot0, pid_n,
    N, K, stride_am, stride_we, stride_wn, stride_cm,
    ROWS: tl.constexpr, MUL_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, IEEE: tl.constexpr, W_EVICT: tl.constexpr, UPCAST: tl.constexpr,
    TMA_W: tl.constexpr, SORTED_C: tl.constexpr,
):
    """GEMM2 for ``ROWS`` routes of one block of a local ``expert``, columns block ``pid_n``:
    the K loop and the weighted store of :func:`moe_gemm2_kernel` (its parameters; ``slot0``
    is the block's first slot, the row of its A tile when ``SORTED_C``)."""
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + routes[:, None] * stride_cm + offs_cn[None, :]
    c_mask = rmask[:, None] & (offs_cn[None, :] < N)
    offs_k = tl.arange(0, BLOCK_K)
    if SORTED_C:
        a_row = slot0.to(tl.int32)
    else:
        a_ptrs = a_ptr + routes[:, None] * stride_am + offs_k[None, :]
    if TMA_W:
        w_row = (expert * N + pid_n * BLOCK_N).to(tl.int32)
    else:
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64) % N
        w_ptrs = w_ptr + expert * stride_we + offs_k[:, None] + offs_n[None, :] * stride_wn
    acc = tl.full((ROWS, BLOCK_N), 0.0, tl.float32)
    for kk in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        if SORTED_C:  # a dense TMA copy (zero past K)
            a = a_ptr.load([a_row, kk * BLOCK_K])
        else:
            a = _load_a(a_ptrs, rmask, offs_k, kk, K, BLOCK_K, EVEN_K)
        if TMA_W:
            w = tl.trans(w_ptr.load([w_row, kk * BLOCK_K]))
        else:
            w = _load_w(w_ptrs, offs_k, kk, K, BLOCK_K, EVEN_K, W_EVICT)
        acc = _dot(a, w, acc, IEEE, UPCAST)
        if not SORTED_C:
            a_ptrs += BLOCK_K
        if not TMA_W:
            w_ptrs += BLOCK_K
    if MUL_W:
        wt = tl.load(topk_w_ptr + routes, mask=rmask, other=0.0).to(tl.float32)
        acc = acc * wt[:, None]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def moe_gemm2_kernel(
    a_ptr, a_half_ptr, w_ptr, c_ptr, topk_w_ptr, sorted_ids_ptr, expert_ids_ptr, ntpp_ptr,
    topk_ids_ptr, map_ptr,
    N, K, EM, num_valid, num_local, num_global, num_clean,
    stride_am, stride_we, stride_wn, stride_cm,
    NAIVE: tl.constexpr, MUL_W: tl.constexpr, HAS_MAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, W_EVICT: tl.constexpr,
    UPCAST: tl.constexpr, CLEAN_M: tl.constexpr, CLEAN_N: tl.constexpr,
    PDL: tl.constexpr, TMA_W: tl.constexpr, SORTED_C: tl.constexpr, HALF_M: tl.constexpr,
):
    """c[r, :N] = (a[r] @ w2[e].T) * topk_w[r] (K is the reduction: the intermediate size).

    ``w`` is ``[E, N, K]`` (unit stride along K), ``a`` is ``[M*k, K]``, ``c`` rows of N.
    Programs ``pid < num_clean`` write zeros for the routes of their CLEAN_M-route chunk that
    no block holds (invalid id, or mapped to -1 when HAS_MAP), then exit.

    ``TMA_W``: ``w_ptr`` is a host tensor descriptor of ``w2`` viewed as ``[E*N, K]``, block
    ``[BLOCK_N, BLOCK_K]`` (rows past N of the expert are another expert's: their columns are
    not stored). ``SORTED_C``: ``a_ptr`` is a host tensor descriptor of the intermediate in
    aligned-block order (GEMM1's ``SORTED_C``), block ``[BLOCK_M, BLOCK_K]``: the block's A
    tile is one dense TMA copy, no gather.

    ``PDL`` (launched as a PDL dependent of GEMM1, see the module docstring): the clean
    programs and the block's ids, expert and zero rows come before ``gdc_wait()``; the K loop,
    which reads the intermediate, after it. With PDL False the code is the plain kernel's."""
    pid = tl.program_id(0)
    if pid < num_clean:
        r = pid.to(tl.int64) * CLEAN_M + tl.arange(0, CLEAN_M).to(tl.int64)
        in_range = r < num_valid
        e = tl.load(topk_ids_ptr + r, mask=in_range, other=0).to(tl.int64)
        bad = (e < 0) | (e >= num_global)
        if HAS_MAP:
            ok = in_range & (~bad)
            mapped = tl.load(map_ptr + tl.where(ok, e, 0), mask=ok, other=0).to(tl.int64)
            bad = bad | (mapped < 0) | (mapped >= num_local)
        bad = bad & in_range
        # masked stores: with no bad route (the usual case) they move no data
        zeros = tl.full((CLEAN_M, CLEAN_N), 0.0, c_ptr.dtype.element_ty)
        for n0 in range(0, N, CLEAN_N):
            cols = n0 + tl.arange(0, CLEAN_N)
            tl.store(c_ptr + r[:, None] * stride_cm + cols[None, :], zeros,
                     mask=bad[:, None] & (cols[None, :] < N))
        return
    pid = pid - num_clean
    pid_m, pid_n = _grouped_pid(pid, EM, N, BLOCK_M, BLOCK_N, GROUP_M)
    if not NAIVE:
        if pid_m * BLOCK_M >= tl.load(ntpp_ptr):
            return  # past the aligned blocks
    routes, rmask, expert = _block_routes(pid_m, num_valid, sorted_ids_ptr, expert_ids_ptr,
                                          NAIVE, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + routes[:, None] * stride_cm + offs_cn[None, :]
    c_mask = rmask[:, None] & (offs_cn[None, :] < N)
    if (expert < 0) | (expert >= num_local):
        tl.store(c_ptrs, tl.full((BLOCK_M, BLOCK_N), 0.0, c_ptr.dtype.element_ty),
                 mask=c_mask)
        return

    if PDL:
        # Everything above reads only what kernels before GEMM1 wrote (ids, alignment) and
        # writes only rows GEMM1 never touches: safe before the wait (module docstring).
        gdc_wait()
    if HALF_M:  # as GEMM1's HALF_M: an upper half of pads only, a half-height tile
        slot0 = pid_m.to(tl.int64) * BLOCK_M
        if _upper_half_empty(sorted_ids_ptr, slot0, num_valid, BLOCK_M):
            lower = _half_routes(sorted_ids_ptr, slot0, BLOCK_M)
            _gemm2_tile(a_half_ptr, w_ptr, c_ptr, topk_w_ptr, lower, lower < num_valid,
                        expert, slot0, pid_n, N, K, stride_am, stride_we, stride_wn,
                        stride_cm, BLOCK_M // 2, MUL_W, BLOCK_N, BLOCK_K, EVEN_K, IEEE,
                        W_EVICT, UPCAST, TMA_W, SORTED_C)
        else:
            _gemm2_tile(a_ptr, w_ptr, c_ptr, topk_w_ptr, routes, rmask, expert, slot0, pid_n,
                        N, K, stride_am, stride_we, stride_wn, stride_cm, BLOCK_M, MUL_W,
                        BLOCK_N, BLOCK_K, EVEN_K, IEEE, W_EVICT, UPCAST, TMA_W, SORTED_C)
    else:
        _gemm2_tile(a_ptr, w_ptr, c_ptr, topk_w_ptr, routes, rmask, expert,
                    pid_m.to(tl.int64) * BLOCK_M, pid_n, N, K, stride_am, stride_we, stride_wn,
                    stride_cm, BLOCK_M, MUL_W, BLOCK_N, BLOCK_K, EVEN_K, IEEE, W_EVICT, UPCAST,
                    TMA_W, SORTED_C)


def moe_gemm2_sum_kernel(
    a_ptr, w_ptr, c_ptr, topk_w_ptr, topk_ids_ptr,
    N, K, num_local,
    stride_am, stride_we, stride_wn, stride_cm,
    TOP_K: tl.constexpr, MUL_W: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
    W_EVICT: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
):
    """Decode GEMM2 with the sum over k fused (the ``NAIVE`` assignment only: one block per
    route, its expert ``topk_ids.flat[r]``): program ``pid`` -> token ``pid // n_blocks``,
    columns block ``pid % n_blocks``;
    ``c[t, :N] = sum_j round(a[t*k + j] @ w2[ids[t, j]].T * topk_w[t, j])``, the sum in fp32
    over j in order, rounded once: bit for bit :func:`moe_gemm2_kernel` then ``moe_sum``
    (which accumulates the rounded rows in fp32 in the same order), one launch and one
    ``[M, k, N]`` round trip fewer. Routes whose id is outside ``[0, num_local)`` add zero,
    as the unfused kernel's zero rows do. ``tl.dot`` wants 16 rows: row 0 holds the route,
    the other 15 are masked (no memory traffic; the MMA work is free at decode, where the
    weights' bandwidth is the limit).

    ``PDL``: as :func:`moe_gemm2_kernel`; ``gdc_wait()`` comes before the loop over the
    token's routes, the first read of the intermediate."""
    pid = tl.program_id(0)
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    t = (pid // num_pid_n).to(tl.int64)
    pid_n = pid % num_pid_n
    offs_m = tl.arange(0, 16)
    row0 = offs_m == 0
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64) % N
    offs_k = tl.arange(0, BLOCK_K)
    c_ty = c_ptr.dtype.element_ty
    if PDL:
        # Only index arithmetic above. The loop reads topk_ids (written before GEMM1 started:
        # module docstring) and the intermediate (GEMM1's output): after the wait.
        gdc_wait()
    total = tl.full((16, BLOCK_N), 0.0, tl.float32)
    for j in tl.static_range(TOP_K):
        r = t * TOP_K + j
        expert = tl.load(topk_ids_ptr + r).to(tl.int64)
        if (expert >= 0) & (expert < num_local):
            a_ptrs = a_ptr + r * stride_am + (offs_m * 0)[:, None] + offs_k[None, :]
            w_ptrs = w_ptr + expert * stride_we + offs_k[:, None] + offs_n[None, :] * stride_wn
            acc = tl.full((16, BLOCK_N), 0.0, tl.float32)
            for kk in range(0, (K + BLOCK_K - 1) // BLOCK_K):
                a = _load_a(a_ptrs, row0, offs_k, kk, K, BLOCK_K, EVEN_K)
                w = _load_w(w_ptrs, offs_k, kk, K, BLOCK_K, EVEN_K, W_EVICT)
                acc = _dot(a, w, acc, IEEE, UPCAST)
                a_ptrs += BLOCK_K
                w_ptrs += BLOCK_K
            if MUL_W:
                acc = acc * tl.load(topk_w_ptr + r).to(tl.float32)
            total += acc.to(c_ty).to(tl.float32)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + t * stride_cm + (offs_m * 0)[:, None] + offs_cn[None, :]
    tl.store(c_ptrs, total.to(c_ty), mask=row0[:, None] & (offs_cn[None, :] < N))
