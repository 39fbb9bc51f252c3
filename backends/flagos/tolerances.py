"""Per-dtype tolerances of our kernels against the reference backend (tests and ``verify``).

The kernels round where the reference rounds, so the remaining differences come from the
order of the fp32 variance sum and from ``exp``/``erf``/``rsqrt`` differing by an ulp, which
can flip one rounding of the low-precision output: about one ulp of the output dtype.
"""

from __future__ import annotations

from typing import Any

TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-5, 1e-5),
    "float16": (1e-3, 2e-3),
    "bfloat16": (1e-2, 1.6e-2),
}
"""dtype name -> (atol, rtol) for ``torch.testing.assert_close``-style comparisons."""


def tolerance(dtype: Any) -> tuple[float, float]:
    """(atol, rtol) for a torch dtype or a dtype name like ``'bfloat16'``."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    try:
        return TOLERANCES[name]
    except KeyError:
        raise KeyError(f"no tolerance for dtype {name!r}; known: {sorted(TOLERANCES)}") from None
