"""Triton kernel: rotary position embedding on query and key (neox and GPT-J), in place or
into separate outputs.

Plain functions, decorated by :mod:`.launcher` on first use. Program (token, head block)
rotates BLOCK_H heads of the query and BLOCK_H heads of the key of one token; only the first
``2 * HALF`` (rotary_dim) features of each head are read (partial rotary). They are written
to ``qo``/``ko``: the inputs themselves in place, else the outputs, where the ``REST``
features after them are copied too (0 in place).
Rounding as the reference (vLLM's ``forward_native``): cos/sin cast to the tensor's dtype,
each product and the sum rounded to that dtype.
"""

from __future__ import annotations

import triton.language as tl


def rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr, qo_ptr, ko_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cache,
    stride_qo_tok, stride_qo_head, stride_ko_tok, stride_ko_head,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
    IS_NEOX: tl.constexpr, HAS_KEY: tl.constexpr, REST: tl.constexpr, BLOCK_REST: tl.constexpr,
):
    """q/k (and qo/ko) rows are ``[heads, head_size]`` blocks at ``tok * stride_tok + head *
    stride_head``; head_size = 2 * HALF + REST when REST > 0."""
    tok = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    r = tl.arange(0, BLOCK_R)
    r_mask = r < HALF
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    cs_row = cache_ptr + pos * stride_cache
    cos = tl.load(cs_row + r, mask=r_mask, other=0.0)
    sin = tl.load(cs_row + HALF + r, mask=r_mask, other=0.0)
    if IS_NEOX:
        i1 = r
        i2 = r + HALF
    else:
        i1 = 2 * r
        i2 = 2 * r + 1

    q_ty = q_ptr.dtype.element_ty
    q_mask = (h < num_q_heads)[:, None] & r_mask[None, :]
    q_heads = q_ptr + tok * stride_q_tok + h[:, None] * stride_q_head
    x1 = tl.load(q_heads + i1[None, :], mask=q_mask, other=0.0).to(tl.float32)
    x2 = tl.load(q_heads + i2[None, :], mask=q_mask, other=0.0).to(tl.float32)
    c = cos.to(q_ty).to(tl.float32)[None, :]
    s = sin.to(q_ty).to(tl.float32)[None, :]
    o1 = (x1 * c).to(q_ty).to(tl.float32) - (x2 * s).to(q_ty).to(tl.float32)
    o2 = (x2 * c).to(q_ty).to(tl.float32) + (x1 * s).to(q_ty).to(tl.float32)
    qo_heads = qo_ptr + tok * stride_qo_tok + h[:, None] * stride_qo_head
    tl.store(qo_heads + i1[None, :], o1.to(q_ty), mask=q_mask)
    tl.store(qo_heads + i2[None, :], o2.to(q_ty), mask=q_mask)
    c_rest = tl.arange(0, BLOCK_REST)
    if REST > 0:
        rest_mask = (h < num_q_heads)[:, None] & (c_rest < REST)[None, :]
        rest = tl.load(q_heads + 2 * HALF + c_rest[None, :], mask=rest_mask)
        tl.store(qo_heads + 2 * HALF + c_rest[None, :], rest, mask=rest_mask)

    if HAS_KEY:
        k_ty = k_ptr.dtype.element_ty
        k_mask = (h < num_k_heads)[:, None] & r_mask[None, :]
        k_heads = k_ptr + tok * stride_k_tok + h[:, None] * stride_k_head
        y1 = tl.load(k_heads + i1[None, :], mask=k_mask, other=0.0).to(tl.float32)
        y2 = tl.load(k_heads + i2[None, :], mask=k_mask, other=0.0).to(tl.float32)
        kc = cos.to(k_ty).to(tl.float32)[None, :]
        ks = sin.to(k_ty).to(tl.float32)[None, :]
        p1 = (y1 * kc).to(k_ty).to(tl.float32) - (y2 * ks).to(k_ty).to(tl.float32)
        p2 = (y2 * kc).to(k_ty).to(tl.float32) + (y1 * ks).to(k_ty).to(tl.float32)
        ko_heads = ko_ptr + tok * stride_ko_tok + h[:, None] * stride_ko_head
        tl.store(ko_heads + i1[None, :], p1.to(k_ty), mask=k_mask)
        tl.store(ko_heads + i2[None, :], p2.to(k_ty), mask=k_mask)
        if REST > 0:
            k_rest_mask = (h < num_k_heads)[:, None] & (c_rest < REST)[None, :]
            k_rest = tl.load(k_heads + 2 * HALF + c_rest[None, :], mask=k_rest_mask)
            tl.store(ko_heads + 2 * HALF + c_rest[None, :], k_rest, mask=k_rest_mask)
