"""Triton kernels: MLA decode (``flash_mla``) over a paged latent KV cache, split over KV.

Plain functions, decorated by :mod:`.launcher` on first use. Contract: ``fl_dispatch/core/ops/
mla_reference.py``. Two kernels:

``mla_split_kernel``: program ``(head block, split, row)``. The ``s_q * h_q`` query rows of a
batch row all attend to the one latent KV head, so a program takes ``BLOCK_H`` of them (query
row ``m = s * h_q + h``) and streams its split's KV tiles ``[BLOCK_N, d]`` once for all of them:
``qk = q[:, :DV] @ kv[:, :DV]^T + q[:, DV:] @ kv[:, DV:]^T`` (two ``tl.dot``: the 512-wide
latent part and the 64-wide rope part), then ``acc += p @ kv[:, :DV]`` with the *same* loaded
latent tile as V. Online softmax in fp32 base 2, the scale folded with log2(e) into
``scale_log2``. The split's KV range is computed on the device from the row's length
(``chunk = ceil(len / num_splits)`` rounded up to ``BLOCK_N``), so the grid depends on shapes
only (CUDA graphs); a split beyond its row's length does no work. ``DIRECT`` (one split):
the normalized output and the final lse are written straight away; otherwise the fp32 partial
output (only rows that saw something) and the partial lse (``-inf`` for rows that saw nothing)
go to workspaces and ``mla_combine_kernel`` merges them.

When a KV tile lies inside one page (``TILE_IN_PAGE``: ``BLOCK_N`` divides the page size), its
page id is one scalar load and the tile's addresses are contiguous; otherwise each position
looks up its own page. ``DOT_F32`` (Triton's CPU interpreter only, whose ``dot`` multiplies
16-bit floats as raw bits): operands are widened to fp32 first, exact for bf16/fp16 products.

A swap-AB variant (scores as ``kv @ q^T``, so that the tile's positions, not 16 or 32 query
rows, are the warpgroup MMA's M) was built and measured on an H200 with Triton 3.6
(2026-11-30 and 2026-12-01, ``docs/performance.md``): 0.78-0.83x this kernel at h_q 16, 0.57x
at 128, and one of its configs (64-position tiles, one stage) faulted with an illegal address.
It was removed. Compiled resources of the h_q 128 config (64 rows, 64 positions, 8 warps, 2
stages): 255 registers, no spills, 221 KB of shared memory, wgmma; a lazy rescale (skip
``acc *= alpha`` unless a row's max grew by more than 2^8) spilled 54 registers and took 1.49x.
What is left to FlashMLA there (about 0.5x) is that one program runs its two MMAs and the
softmax one after the other; FlashMLA overlaps them with warp-specialised warpgroups. Triton
3.6 has a Hopper pass for that (``tl.range(..., warp_specialize=True)``): its kernels compile
(a producer and two consumer warpgroups) but deadlock on the H200, even a plain GEMM
(``bench/triton_ws_probe.py``, 2026-12-01), so it is not used. On Hopper, shapes with more
than 16 query rows run :mod:`.kernels_mla_gluon` instead (TMA tiles, asynchronous wgmma
ordered by hand: 1.37x to 1.49x this kernel at h_q 128); this one stays the kernel of every
other device and shape, and the one CI runs.
"""

from __future__ import annotations

import triton.language as tl

_sum = tl.standard._sum_combine
_max = tl.standard._elementwise_max
"""``tl.sum``/``tl.max`` are jit functions decorated at ``triton.language`` import (for the mode
of that moment); ``tl.reduce`` with the plain combiners works in either mode."""


def mla_split_kernel(
    q_ptr, kv_ptr, bt_ptr, len_ptr, o_ptr, lse_ptr,
    scale_log2, n_rows, h_q, s_q, capacity, causal, num_splits,
    stride_qb, stride_qs, stride_qh, stride_kp, stride_kt, stride_bt,
    stride_ob, stride_osp, stride_om, stride_lb, stride_lsp, stride_lh, stride_ls,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    TILE_IN_PAGE: tl.constexpr, DIRECT: tl.constexpr, PREC: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_sp = tl.program_id(1)
    pid_b = tl.program_id(2)
    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = rows < n_rows
    s_idx = rows // h_q
    h_idx = rows % h_q

    seqlen = tl.minimum(tl.maximum(tl.load(len_ptr + pid_b), 0), capacity)
    # visible positions of each query row: [0, limit)
    limit = seqlen - causal * (s_q - 1 - s_idx)
    limit = tl.where(row_mask, limit, 0)
    per_split = (seqlen + num_splits - 1) // num_splits
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = pid_sp * chunk
    end = tl.minimum(start + chunk, seqlen)

    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < DV
    q_rows = (q_ptr + pid_b.to(tl.int64) * stride_qb + s_idx * stride_qs
              + h_idx * stride_qh)
    q_nope = tl.load(q_rows[:, None] + offs_dv[None, :],
                     mask=row_mask[:, None] & dv_mask[None, :], other=0.0)
    if BLOCK_DR > 0:
        offs_dr = tl.arange(0, BLOCK_DR)
        dr_mask = offs_dr < D - DV
        q_rope = tl.load(q_rows[:, None] + DV + offs_dr[None, :],
                         mask=row_mask[:, None] & dr_mask[None, :], other=0.0)

    if DOT_F32:  # interpreter: its dot multiplies 16-bit floats as raw bits; fp32 is exact
        q_nope = q_nope.to(tl.float32)
        if BLOCK_DR > 0:
            q_rope = q_rope.to(tl.float32)

    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_H,), 0.0, tl.float32)
    acc = tl.full((BLOCK_H, BLOCK_DV), 0.0, tl.float32)
    bt_row = bt_ptr + pid_b.to(tl.int64) * stride_bt
    offs_n0 = tl.arange(0, BLOCK_N)

    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        n_mask = offs_n < end
        if TILE_IN_PAGE:
            page = tl.load(bt_row + start_n // PAGE).to(tl.int64)
            tok = page * stride_kp + ((start_n % PAGE) + offs_n0) * stride_kt
        else:
            pages = tl.load(bt_row + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
            tok = pages * stride_kp + (offs_n % PAGE) * stride_kt
        kv = tl.load(kv_ptr + tok[:, None] + offs_dv[None, :],
                     mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
        p_ty = kv.dtype
        if DOT_F32:
            kv = kv.to(tl.float32)
        qk = tl.dot(q_nope, tl.trans(kv), input_precision=PREC)  # [BLOCK_H, BLOCK_N]
        if BLOCK_DR > 0:
            k_rope = tl.load(kv_ptr + tok[None, :] + DV + offs_dr[:, None],
                             mask=n_mask[None, :] & dr_mask[:, None], other=0.0)
            if DOT_F32:
                k_rope = k_rope.to(tl.float32)
            qk = tl.dot(q_rope, k_rope, qk, input_precision=PREC)
        qk = qk * scale_log2
        # online softmax over the positions (axis 1), one row per query row
        visible = offs_n[None, :] < limit[:, None]
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, _max))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _sum)
        acc = acc * alpha[:, None]
        p = p.to(p_ty)  # P rounded to the cache dtype, as on the tensor cores
        if DOT_F32:
            p = p.to(tl.float32)
        acc = tl.dot(p, kv, acc, input_precision=PREC)
        m_i = m_new

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453  # ln 2: base-2 lse to natural
    o_rows = o_ptr + pid_b.to(tl.int64) * stride_ob + pid_sp * stride_osp + rows * stride_om
    o_ptrs = o_rows[:, None] + offs_dv[None, :]
    l_rows = (lse_ptr + pid_b.to(tl.int64) * stride_lb + pid_sp * stride_lsp
              + h_idx * stride_lh + s_idx * stride_ls)
    if DIRECT:
        o_mask = row_mask[:, None] & dv_mask[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=o_mask)
        tl.store(l_rows, tl.where(has, lse, float("inf")), mask=row_mask)
    else:
        o_mask = (row_mask & has)[:, None] & dv_mask[None, :]
        tl.store(o_ptrs, out, mask=o_mask)
        tl.store(l_rows, tl.where(has, lse, float("-inf")), mask=row_mask)


def mla_combine_kernel(
    o_part_ptr, lse_part_ptr, out_ptr, lse_ptr,
    n_rows, h_q, s_q, num_splits,
    stride_pb, stride_psp, stride_pm, stride_qb, stride_qsp,
    stride_ob, stride_om, stride_lb, stride_lh, stride_ls,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program ``(query row m, batch row b)``: ``lse = log sum_s exp(lse_s)`` over the splits
    that saw something, ``out = sum_s exp(lse_s - lse) * o_s``; none: ``out = 0, lse = +inf``."""
    m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    lse_row = lse_part_ptr + b * stride_qb + m
    parts = tl.load(lse_row + offs_s * stride_qsp, mask=offs_s < num_splits,
                    other=float("-inf"))
    top = tl.reduce(parts, 0, _max)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    total = tl.reduce(tl.exp(parts - top_safe), 0, _sum)
    lse = tl.where(total > 0.0, top_safe + tl.log(tl.where(total > 0.0, total, 1.0)),
                   float("inf"))
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < DV
    acc = tl.full((BLOCK_DV,), 0.0, tl.float32)
    o_row = o_part_ptr + b * stride_pb + m * stride_pm
    for sp in range(num_splits):
        part = tl.load(lse_row + sp * stride_qsp)
        w = tl.exp(part - lse)
        n_valid = tl.where(part > float("-inf"), DV, 0)  # a split that saw nothing: skip
        v = tl.load(o_row + sp * stride_psp + offs_dv, mask=offs_dv < n_valid, other=0.0)
        acc += w * v
    s_idx = m // h_q
    h_idx = m % h_q
    tl.store(out_ptr + b * stride_ob + m * stride_om + offs_dv,
             acc.to(out_ptr.dtype.element_ty), mask=dv_mask)
    tl.store(lse_ptr + b * stride_lb + h_idx * stride_lh + s_idx * stride_ls, lse)
