"""Triton kernel: RMS normalization, optionally fused with the residual add, in place.

Plain functions, decorated by :mod:`.launcher` on first use. Rounding order of vLLM's
``rms_norm``/``fused_add_rms_norm``: ``s = x + residual`` in fp32 (residual receives ``s`` in
its dtype), ``n = s * rsqrt(mean(s^2) + eps)`` in fp32, ``n`` cast to the weight's dtype,
times the weight (rounded to the weight's dtype), cast to the output dtype.
Rows are addressed through their strides, so strided views are updated in place.
"""

from __future__ import annotations

import triton.language as tl

_sum = tl.standard._sum_combine
"""``tl.sum`` is itself a jit function, decorated (for the compiler or the interpreter) when
``triton.language`` is first imported; ``tl.reduce`` with its combiner works in either mode."""


def rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr,
    n_rows, n_cols, stride_x, stride_res, stride_out, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr,
    STREAM: tl.constexpr,
):
    """Program: rows [pid*BLOCK_M, +BLOCK_M). SINGLE_PASS: a whole row fits in BLOCK_N;
    otherwise (BLOCK_M == 1) two passes over BLOCK_N chunks, recomputing ``s`` in the second
    so that the normalized value comes from the unrounded fp32 sum, as in the reference.
    STREAM (single pass only; for tensors larger than L2): 1 loads x and the residual with
    evict_first, 2 also stores streaming (``.cs``)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows = rows.to(tl.int64)
    x_rows = x_ptr + rows[:, None] * stride_x
    r_rows = res_ptr + rows[:, None] * stride_res
    o_rows = out_ptr + rows[:, None] * stride_out
    if SINGLE_PASS:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        if STREAM == 0:
            s = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            s = tl.load(x_rows + cols[None, :], mask=mask, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
        if HAS_RESIDUAL:
            if STREAM == 0:
                r = tl.load(r_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                r = tl.load(r_rows + cols[None, :], mask=mask, other=0.0,
                            eviction_policy="evict_first").to(tl.float32)
            s = s + r
            if STREAM == 2:
                tl.store(r_rows + cols[None, :], s.to(res_ptr.dtype.element_ty), mask=mask,
                         cache_modifier=".cs")
            else:
                tl.store(r_rows + cols[None, :], s.to(res_ptr.dtype.element_ty), mask=mask)
        rstd = tl.math.rsqrt(tl.reduce(s * s, 1, _sum) / n_cols + eps)
        y = s * rstd[:, None]
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=col_mask, other=0.0)
            w_ty = w_ptr.dtype.element_ty
            y = (y.to(w_ty).to(tl.float32) * w.to(tl.float32)[None, :]).to(w_ty)
        if STREAM == 2:
            tl.store(o_rows + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask,
                     cache_modifier=".cs")
        else:
            tl.store(o_rows + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # tl.zeros is a jit function
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < n_cols)[None, :]
            s = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                s += tl.load(r_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += s * s
        rstd = tl.math.rsqrt(tl.reduce(acc, 1, _sum) / n_cols + eps)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_mask = cols < n_cols
            mask = row_mask[:, None] & col_mask[None, :]
            s = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                s += tl.load(r_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                tl.store(r_rows + cols[None, :], s.to(res_ptr.dtype.element_ty), mask=mask)
            y = s * rstd[:, None]
            if HAS_WEIGHT:
                w = tl.load(w_ptr + cols, mask=col_mask, other=0.0)
                w_ty = w_ptr.dtype.element_ty
                y = (y.to(w_ty).to(tl.float32) * w.to(tl.float32)[None, :]).to(w_ty)
            tl.store(o_rows + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
