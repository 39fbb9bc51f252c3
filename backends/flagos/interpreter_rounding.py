"""Round fp32 -> bf16 to nearest even in Triton's CPU interpreter, as the GPU does.

Triton's interpreter (3.x) converts fp32 to bf16 by truncating the mantissa, while compiled
kernels round to nearest even. Our kernels round where the reference rounds, so on the
interpreter bf16 results would differ from the GPU's (and the reference's) by an ulp, enough
to break comparisons where two rounded products nearly cancel (rotary). While our interpreted
kernels run, the interpreter's converter is wrapped to round correctly; nothing changes when
Triton's interpreter does not look as expected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def rtne_fp32_to_bf16_bits(values: Any) -> Any:
    """bf16 bit patterns (uint16) of fp32 ``values``, rounded to nearest even; NaN stays NaN."""
    import numpy as np

    f32 = np.ascontiguousarray(values, dtype=np.float32)
    bits = f32.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(f32)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return out


@contextlib.contextmanager
def interpreter_rounds_to_nearest() -> Iterator[None]:
    """Within this block, the interpreter's fp32 -> bf16 conversion rounds to nearest even."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        yield
        return
    original = getattr(interpreter, "_convert_float", None)
    if original is None:
        yield
        return

    def convert(data: Any, src: Any, dst: Any, rounding_mode: Any) -> Any:
        if src == tl.float32 and dst == tl.bfloat16:
            return rtne_fp32_to_bf16_bits(data).reshape(getattr(data, "shape", ()))
        return original(data, src, dst, rounding_mode)

    interpreter._convert_float = convert
    try:
        yield
    finally:
        interpreter._convert_float = original
