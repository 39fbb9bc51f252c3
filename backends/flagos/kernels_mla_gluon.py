"""Gluon kernel for Hopper: MLA decode (``flash_mla``) with TMA tiles and asynchronous wgmma.

Why it exists: the ``tl`` kernel (:mod:`.kernels_mla`, the one every device and the CPU
interpreter run) reaches about half of FlashMLA at ``h_q`` 128 on an H200. Triton's pipeliner
gives it no control over when its two MMAs, its softmax and its loads run, and Triton 3.6's
automatic warp specialisation deadlocks there (``bench/triton_ws_probe.py``). Here each step is
written out: TMA loads into a ring of shared-memory slots with mbarriers, wgmma issued
asynchronously and waited for by hand.

Program ``(head block, split, batch row)``, 8 warps (two warpgroups), ``BLOCK_H = 64`` query
rows (wgmma's M; fewer rows are zero-padded), the same partition of the KV range and the same
outputs as ``mla_split_kernel`` (direct, or partials for ``mla_combine_kernel``). The two
warpgroups split the columns: of the scores ``S = Q K^T`` (``BLOCK_N`` positions) and of the
output ``O`` (``[64, 512]`` fp32, 128 registers a thread). Shared memory: ``Q`` (72 KB) once,
loaded with pointer loads (any strides); ``STAGES`` slots of KV tiles (``BLOCK_N x 576``, 72 KB
at 64 positions) filled by TMA from the cache viewed as ``[num_blocks * page, d]`` (a tile lies
in one page); ``P`` (``64 x BLOCK_N``) as the A operand of ``P V``.

Iteration ``t`` (``S_t`` complete in registers):

1. softmax of ``S_t`` (positions past the split's end or a row's causal limit masked to
   ``-inf``); ``O *= alpha``; ``P_t`` to shared memory;
2. issue ``O += P_t V_t``, then (once tile ``t+1`` has landed) ``S_{t+1}``: the tensor cores
   run both back to back;
3. wait for ``P_t V_t``; with both warpgroups past that wait, refill tile ``t``'s slot with
   tile ``t + STAGES``; wait for ``S_{t+1}``.

No asynchronous result crosses the loop's back edge: ptxas serialises every wgmma of a kernel
that carries one (warning C7514). Measured on an H200 (2026-12-01, ``docs/performance.md``),
64 positions and two slots: 323-416 TFLOP/s at ``h_q`` 128 against the ``tl`` kernel's 236-294.
Two other orders, kept out: ``S_{t+1}`` under softmax ``t`` needs tile ``t+1`` resident a whole
iteration early, so with two slots (all that fits beside ``Q``) its load was exposed (1040.7
against 810.9 us at h128 8k; with 32-position tiles and four slots the narrow wgmma lost more);
``P_t V_t`` under softmax ``t+1`` likewise (947.6 us).

Positions past a row's length inside its last tile hold whatever the cache holds there: their
scores are masked (``P = 0``) and those value rows are zeroed in shared memory before ``P V``
reads them (``0 * NaN`` would poison ``O``), as the ``tl`` kernel's masked loads do. Hopper only
(TMA, wgmma); there is no CPU interpreter for Gluon: the CPU tests compile it for sm_90, the
GPU tests compare it with the reference.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
"""The TMA tile load: ``async_copy_global_to_shared`` in Triton 3.6 (the GPU machine's),
renamed ``async_load`` later (the old name raises)."""
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
"""All the program's threads: ``thread_barrier`` in Triton 3.6, ``barrier`` later."""


@gluon.jit
def _issue_tile(kvn_desc, kvr_desc, kvn_s, kvr_s, bars, bt_row, start, j, n_tiles,
                PAGE: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA of tile ``j`` (positions ``start + j * BLOCK_N ...``) into slot ``j % STAGES``;
    nothing when ``j >= n_tiles``."""
    ok = j < n_tiles
    pos = start + j * BLOCK_N
    page = gl.load(bt_row + pos // PAGE, mask=ok, other=0)
    row = page * PAGE + pos % PAGE
    slot = j % STAGES
    bar = bars.index(slot)
    mbarrier.expect(bar, kvn_desc.block_type.nbytes + kvr_desc.block_type.nbytes, pred=ok)
    _tma_load(kvn_desc, [row, 0], bar, kvn_s.index(slot), pred=ok)
    _tma_load(kvr_desc, [row, 0], bar, kvr_s.index(slot), pred=ok)


@gluon.jit
def _scores(qn_s, qr_s, kvn_s, kvr_s, slot, s_zero):
    """``S = Q K^T`` of the tile in ``slot``, asynchronous: the 512 latent channels, then the
    64 rope channels accumulated (two wgmma groups)."""
    s = warpgroup_mma(qn_s, kvn_s.index(slot).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    return warpgroup_mma(qr_s, kvr_s.index(slot).permute((1, 0)), s, is_async=True)


@gluon.jit
def _softmax(s, m_i, l_i, offs_n, limit, scale_log2):
    """Online softmax step in base 2 over a tile's scores, positions ``offs_n`` visible to a
    row below its ``limit``: ``(P, alpha, m, l)``."""
    qk = s * scale_log2
    qk = gl.where(offs_n[None, :] < limit[:, None], qk, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(qk, axis=1))
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_use)
    p = gl.exp2(qk - m_use[:, None])
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@gluon.jit
def _stage_p(p, p_s, kvn_s, slot, tile_start, end, ld: gl.constexpr, BLOCK_N: gl.constexpr):
    """``P`` to shared memory for ``P V`` with the tile in ``slot`` as ``V``. In a tile that
    ends past ``end``, the value rows there are zeroed first (``P`` is 0 there, but ``0 * NaN``
    is not)."""
    if (tile_start < end) & (end - tile_start < BLOCK_N):
        v = kvn_s.index(slot).load(ld)
        keep = tile_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld)) < end
        kvn_s.index(slot).store(gl.where(keep[:, None], v, 0.0))
    p_s.store(p.to(p_s.dtype))
    fence_async_shared()


@gluon.jit
def mla_gluon_kernel(
    q_ptr, kvn_desc, kvr_desc, bt_ptr, len_ptr, o_ptr, lse_ptr,
    scale_log2, n_rows, h_q, s_q, capacity, causal, num_splits,
    stride_qb, stride_qs, stride_qh, stride_bt,
    stride_ob, stride_osp, stride_om, stride_lb, stride_lsp, stride_lh, stride_ls,
    DV: gl.constexpr, DR: gl.constexpr, PAGE: gl.constexpr, BLOCK_H: gl.constexpr,
    BLOCK_N: gl.constexpr, STAGES: gl.constexpr, DIRECT: gl.constexpr,
    num_warps: gl.constexpr,
):
    gl.static_assert(num_warps == 8, "two warpgroups")
    gl.static_assert(BLOCK_H == 64, "wgmma M")
    gl.static_assert(STAGES >= 2)
    pid_h = gl.program_id(0)
    pid_sp = gl.program_id(1)
    pid_b = gl.program_id(2)
    dtype: gl.constexpr = kvn_desc.dtype

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, BLOCK_N // 2, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, DV // 2, 16])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    row_ld: gl.constexpr = gl.SliceLayout(1, ld)
    col_ld: gl.constexpr = gl.SliceLayout(0, ld)
    p_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_N], dtype)
    qn_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, DV], dtype)
    qr_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, DR], dtype)

    # ---- the split's KV range (as mla_split_kernel)
    seqlen = gl.minimum(gl.maximum(gl.load(len_ptr + pid_b), 0), capacity)
    per_split = (seqlen + num_splits - 1) // num_splits
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = pid_sp * chunk
    end = gl.minimum(start + chunk, seqlen)
    n_tiles = gl.maximum(end - start + BLOCK_N - 1, 0) // BLOCK_N
    bt_row = bt_ptr + pid_b.to(gl.int64) * stride_bt

    # ---- shared memory and barriers; the first tiles' TMA goes out before Q is staged
    kvn_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, DV], kvn_desc.layout)
    kvr_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, DR], kvr_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    for i in gl.static_range(STAGES):
        _issue_tile(kvn_desc, kvr_desc, kvn_s, kvr_s, bars, bt_row, start, i, n_tiles,
                    PAGE, BLOCK_N, STAGES)

    # ---- Q rows of this program (rows past n_rows: zeros) to shared memory
    rows_ld = pid_h * BLOCK_H + gl.arange(0, BLOCK_H, layout=row_ld)
    q_rows = (q_ptr + pid_b.to(gl.int64) * stride_qb + (rows_ld // h_q) * stride_qs
              + (rows_ld % h_q) * stride_qh)
    rmask = (rows_ld < n_rows)[:, None]
    offs_dv_ld = gl.arange(0, DV, layout=col_ld)
    offs_dr_ld = gl.arange(0, DR, layout=col_ld)
    qn = gl.load(q_rows[:, None] + offs_dv_ld[None, :], mask=rmask, other=0.0)
    qr = gl.load(q_rows[:, None] + DV + offs_dr_ld[None, :], mask=rmask, other=0.0)
    qn_s = gl.allocate_shared_memory(dtype, [BLOCK_H, DV], qn_smem_layout, qn)
    qr_s = gl.allocate_shared_memory(dtype, [BLOCK_H, DR], qr_smem_layout, qr)
    p_s = gl.allocate_shared_memory(dtype, [BLOCK_H, BLOCK_N], p_smem_layout)
    fence_async_shared()

    # ---- per-row visibility (causal: query position s sees [0, seqlen - (s_q - 1 - s)))
    rows = pid_h * BLOCK_H + gl.arange(0, BLOCK_H, layout=row_s)
    limit = seqlen - causal * (s_q - 1 - rows // h_q)
    limit = gl.minimum(gl.where(rows < n_rows, limit, 0), end)  # end: this split's last
    offs_n0 = gl.arange(0, BLOCK_N, layout=col_s)

    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, row_s)
    l_i = gl.full([BLOCK_H], 0.0, gl.float32, row_s)
    acc = gl.zeros([BLOCK_H, DV], gl.float32, o_layout)
    s_zero = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, s_layout)

    # S_0
    mbarrier.wait(bars.index(0), 0, pred=n_tiles > 0)
    s = _scores(qn_s, qr_s, kvn_s, kvr_s, 0, s_zero)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    for t in range(0, n_tiles):
        slot = t % STAGES
        # 1. softmax of tile t; O rescaled; P_t staged
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, start + t * BLOCK_N + offs_n0, limit,
                                      scale_log2)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        _stage_p(p, p_s, kvn_s, slot, start + t * BLOCK_N, end, ld, BLOCK_N)
        # 2. P_t V_t, then S_{t+1} (a dummy on a stale slot after the last tile: masked)
        acc = warpgroup_mma(p_s, kvn_s.index(slot), acc, is_async=True)
        nxt = t + 1
        mbarrier.wait(bars.index(nxt % STAGES), (nxt // STAGES) & 1, pred=nxt < n_tiles)
        s_next = _scores(qn_s, qr_s, kvn_s, kvr_s, nxt % STAGES, s_zero)
        # 3. tile t done by both warpgroups: its slot takes tile t + STAGES
        acc = warpgroup_mma_wait(num_outstanding=2, deps=(acc,))
        _cta_barrier()
        _issue_tile(kvn_desc, kvr_desc, kvn_s, kvr_s, bars, bt_row, start, t + STAGES,
                    n_tiles, PAGE, BLOCK_N, STAGES)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s_next,))

    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    # ---- epilogue (as mla_split_kernel)
    has = l_i > 0.0
    l_safe = gl.where(has, l_i, 1.0)
    lse = (m_i + gl.log2(l_safe)) * 0.6931471805599453
    out = acc / gl.convert_layout(l_safe, row_o)[:, None]
    rows_o = pid_h * BLOCK_H + gl.arange(0, BLOCK_H, layout=row_o)
    offs_dv = gl.arange(0, DV, layout=col_o)
    o_ptrs = (o_ptr + pid_b.to(gl.int64) * stride_ob + pid_sp * stride_osp
              + rows_o[:, None] * stride_om + offs_dv[None, :])
    l_ptrs = (lse_ptr + pid_b.to(gl.int64) * stride_lb + pid_sp * stride_lsp
              + (rows % h_q) * stride_lh + (rows // h_q) * stride_ls)
    row_ok = rows < n_rows
    if DIRECT:
        gl.store(o_ptrs, out.to(o_ptr.dtype.element_ty),
                 mask=gl.convert_layout(row_ok, row_o)[:, None])
        gl.store(l_ptrs, gl.where(has, lse, float("inf")), mask=row_ok)
    else:
        gl.store(o_ptrs, out, mask=gl.convert_layout(row_ok & has, row_o)[:, None])
        gl.store(l_ptrs, gl.where(has, lse, float("-inf")), mask=row_ok)
