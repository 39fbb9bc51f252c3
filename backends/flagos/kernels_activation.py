"""Triton kernel: gated activations ``act(x[:, :d]) * x[:, d:]`` (silu, gelu, gelu-tanh).

Plain functions, decorated by :mod:`.launcher` on first use. Arithmetic in fp32; the
activation is rounded to the input dtype before the multiply, as vLLM's native layer does
(``F.silu(a) * b`` in the input dtype), so the result matches the reference bit for bit
except where the transcendental functions differ by an ulp.

Exact gelu comes in two forms: ``ACT_GELU`` calls libdevice's ``erff`` (two polynomial
branches, about 25 instructions: on an H200 the kernel is instruction-bound at prefill sizes),
``ACT_GELU_FAST`` evaluates ``erfc(|x|/sqrt(2)) = exp2(q(|x|))`` with ``q`` one degree-8
polynomial (8 FMAs, one ``ex2``, no branch, no clamp) and then rounds exactly where the
libdevice form does (``erf = 1 - erfc`` in fp32, ``0.5 * x * (1 + erf)``), so the negative
tail is quantized like the reference's. ``q`` is a weighted minimax fit of
``log2(erfc(t/sqrt(2)))`` on ``[0, 5.6]`` (absolute error of ``erfc`` weighted), coefficients
rounded to fp32; measured on the CPU (tests/test_fast_gelu.py): ``|erf error| <= 1.06e-7``
(1.8 ulp of values just below 1) over ``|x| <= 8``, beyond which ``q`` decreases
monotonically below -25.5, so ``erf`` rounds to exactly +-1 as the reference's does up to
+-inf; the GPU's ``ex2.approx`` adds at most 2 ulp of ``erfc`` (<= 2.4e-7 absolute).
"""

from __future__ import annotations

import triton.language as tl

ACT_SILU = 0
ACT_GELU = 1
ACT_GELU_TANH = 2
ACT_GELU_FAST = 3
"""Exact gelu through the branch-free erfc polynomial (see above); chosen per device by
``ops.act_config``, never by the caller."""


def act_and_mul_kernel(
    x_ptr, out_ptr,
    d, stride_x, stride_out,
    ACT: tl.constexpr, BLOCK: tl.constexpr, STREAM: tl.constexpr,
):
    """Program (column block, row): out[row, cols] = act(x[row, cols]) * x[row, d + cols].
    Column blocks on grid axis 0, so the programs that run together read one row in order.
    STREAM (for tensors larger than L2): 1 loads with evict_first, 2 also stores streaming.
    ACT: 0 silu, 1 gelu (libdevice erf), 2 gelu tanh, 3 gelu (fast erfc polynomial)."""
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
    elif ACT == 3:
        # erfc(|x|/sqrt(2)) = 2^q(|x|), q of degree 8 without a constant term (Horner)
        t = tl.abs(af)
        q = tl.fma(t, -2.834912720572902e-06, 3.937769361073151e-05)
        q = tl.fma(q, t, -0.00018618024478200823)
        q = tl.fma(q, t, -0.00013693634537048638)
        q = tl.fma(q, t, 0.00706342002376914)
        q = tl.fma(q, t, -0.052496179938316345)
        q = tl.fma(q, t, -0.4592081904411316)
        q = tl.fma(q, t, -1.1511051654815674)
        q = q * t  # q(0) = 0: erfc(0) = 1
        erf_abs = 1.0 - tl.exp2(q)  # rounded like erff's result: the tail is quantized alike
        sign = af.to(tl.int32, bitcast=True) & -2147483648
        erf = (erf_abs.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        y = af * tl.fma(erf, 0.5, 0.5)  # = 0.5 * x * (1 + erf), the same roundings
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
