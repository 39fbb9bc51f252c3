"""The one tolerance table: how close an impl must be to the reference, per dtype, and why.

An element passes when ``|impl - reference| <= atol + rtol * |reference|`` (``torch.isclose``).
Impls round where the reference rounds (the ops' contracts say where); what remains comes from
reducing in another order and from ``exp``/``erf``/``rsqrt`` differing by an ulp, which can flip
one rounding of a low-precision result. An op whose arithmetic leaves more room (a GEMM that
accumulates thousands of products, say) overrides its row with ``define_op(tolerances=...)``,
with its own reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Tolerance:
    """``atol``, ``rtol`` and why they are what they are."""

    atol: float
    rtol: float
    reason: str


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    # fp32 results differ only by reduction order and libm ulps: a few ulps of 2^-23
    "fp32": Tolerance(1e-5, 1e-5, "fp32: reduction order and transcendental ulps only"),
    # fp16 has an 11-bit mantissa: one flipped final rounding is 2^-11 ~ 4.9e-4 relative
    "fp16": Tolerance(1e-3, 2e-3, "fp16: one ulp (2^-11) of the result, plus fp32 noise"),
    # bf16 has an 8-bit mantissa: one flipped rounding is 2^-8 ~ 3.9e-3 relative; a rounded
    # intermediate (activation before the multiply, normalized value before the weight) can
    # flip too, hence about four ulps
    "bf16": Tolerance(1e-2, 1.6e-2, "bf16: up to four ulps (2^-8) of rounded intermediates"),
}
"""dtype short name (fp32, fp16, bf16) -> tolerance."""

_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def dtype_name(dtype: Any) -> str:
    """The short name of a torch dtype or of a name like ``'bfloat16'``."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    return _ALIASES.get(name, name)


def tolerance(op: Any, dtype: Any) -> Tolerance:
    """The tolerance of ``op`` (an OpSpec, or None for the table) in ``dtype``.

    Raises KeyError saying how to add one when neither the op nor the table has the dtype."""
    name = dtype_name(dtype)
    if name in ("int32", "int64", "bool"):
        return Tolerance(0.0, 0.0, "integer results must be equal")
    override = getattr(op, "tolerances", {}).get(name) if op is not None else None
    if override is not None:
        atol, rtol, reason = override
        return Tolerance(atol, rtol, reason)
    try:
        return DEFAULT_TOLERANCES[name]
    except KeyError:
        op_name = getattr(op, "name", "?")
        raise KeyError(f"no tolerance for dtype {name!r} in op {op_name!r}; add it with "
                       f"define_op(tolerances={{{name!r}: (atol, rtol, reason)}}) or to "
                       f"DEFAULT_TOLERANCES (known: {', '.join(DEFAULT_TOLERANCES)})") from None
