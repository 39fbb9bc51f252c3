"""Triton kernel: gated activations ``act(x[:, :d]) * x[:, d:]`` (silu, gelu, gelu-tanh).

Plain functions, decorated by :mod:`.launcher` on first use. Arithmetic in fp32; the
activation is rounded to the input dtype before the multiply, as vLLM's native layer does
(``F.silu(a) * b`` in the input dtype), so the result matches the reference bit for bit
except where the transcendental functions differ by an ulp.
"""

from __future__ import annotations

import triton.language as tl

ACT_SILU = 0
ACT_GELU = 1
ACT_GELU_TANH = 2


def act_and_mul_kernel(
    x_ptr, out_ptr,
    d, stride_x, stride_out,
    ACT: tl.constexpr, BLOCK: tl.constexpr, STREAM: tl.constexpr,
):
    """Program (column block, row): out[row, cols] = act(x[row, cols]) * x[row, d + cols].
    Column blocks on grid axis 0, so the programs that run together read one row in order.
    STREAM (for tensors larger than L2): 1 loads with evict_first, 2 also stores streaming."""
    row = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    x_row = x_ptr + row * stride_x
    if STREAM == 0:
        a = tl.load(x_row + cols, mask=mask, other=0.0)
        b = tl.load(x_row + d + cols, mask=mask, other=0.0)
    else:
        a = tl.load(x_row + cols, mask=mask, other=0.0, eviction_policy="evict_first")
        b = tl.load(x_row + d + cols, mask=mask, other=0.0, eviction_policy="evict_first")
    af = a.to(tl.float32)
    if ACT == 0:
        y = af / (1.0 + tl.exp(-af))
    elif ACT == 1:
        y = 0.5 * af * (1.0 + tl.math.erf(af * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (af + 0.044715 * af * af * af)
        # tanh(u) = 1 - 2 / (exp(2u) + 1): exact limits at +-inf, no libdevice needed
        y = 0.5 * af * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))
    x_ty = x_ptr.dtype.element_ty
    y = y.to(x_ty).to(tl.float32) * b.to(tl.float32)
    y = y.to(x_ty).to(out_ptr.dtype.element_ty)
    if STREAM == 2:
        tl.store(out_ptr + row * stride_out + cols, y, mask=mask, cache_modifier=".cs")
    else:
        tl.store(out_ptr + row * stride_out + cols, y, mask=mask)
