"""A third-party plugin that defines its own op, ``row_scale``, with what a built-in op has: a
reference body with its contract, conformance cases (``@op.cases``: two shapes, strided views,
``out``), benchmark cases (``@op.bench``), a tolerance override, and an impl of its own
(``vendor.scaledop``). ``fl-dispatch verify`` and ``bench`` then treat it like a built-in op.

``FL_TEST_SCALED_OP_BUG=1`` also registers ``vendor.scaledop.buggy``, which writes ``out``
through a contiguous copy: a strided ``out`` is never updated and the copy is returned. The
kit must fail it on exactly those cases.
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import torch
from torch import Tensor

from fl_dispatch import define_op, hookimpl, write_out
from fl_dispatch.testing import DTYPES, Case, Dims

OP = "row_scale"
IMPL, BUGGY = "vendor.scaledop", "vendor.scaledop.buggy"


@define_op(mutates=("out",), tolerances={
    # the result is rounded once from fp32: impls that also compute in fp32 agree up to one
    # flipped rounding, one ulp of the result (2^-10 relative in fp16, 2^-7 in bf16)
    "fp16": (0.0, 1e-3, "row_scale: one rounding from fp32, at most one ulp (2^-10)"),
    "bf16": (0.0, 8e-3, "row_scale: one rounding from fp32, at most one ulp (2^-7)"),
})
def row_scale(x: Tensor, scale: Tensor, out: Tensor | None = None) -> Tensor:
    """``x * scale[..., None]``: each row of ``x`` (``[..., n]``) times its fp32 ``scale``
    (``[...]``), computed in fp32 and rounded once to x's dtype. With ``out`` the result is
    written into it (it may be a strided view) and ``out`` is returned; otherwise a new tensor.
    ``x`` may be a strided view."""
    return write_out((x.float() * scale.float().unsqueeze(-1)).to(x.dtype), out)


@row_scale.torch_op("row_scale")
def _row_scale_op(op: Any, x: Tensor, scale: Tensor) -> Tensor:
    """The compiled-graph form: a new tensor (a schema cannot return ``out``)."""
    return op(x, scale)


def row_scale_case(tokens: int, n: int, dtype: str, *, x_strided: bool = False,
                   out: str = "none", batch: int | None = None) -> Case:
    """One call on ``[tokens, n]`` (``[batch, tokens, n]``); ``out``: none, contiguous or
    strided (a row-strided view of a larger buffer, whose other elements must stay put)."""
    lead = (batch, tokens) if batch else (tokens,)
    name = (f"{f'B={batch} ' if batch else ''}T={tokens} n={n} "
            f"x:{'strided' if x_strided else 'contig'} out:{out}")

    def build(device: torch.device) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(zlib.crc32(f"{name}|{dtype}".encode()))

        def randn(*shape: int, scale: float = 1.0) -> Tensor:
            t = torch.randn(shape, generator=gen) * scale
            return t.to(device=device, dtype=DTYPES[dtype])

        rows = 1
        for d in lead:
            rows *= d
        x = (randn(rows, n + 24)[:, 8:8 + n] if x_strided else randn(rows, n)).unflatten(
            0, lead)
        target = None
        if out == "contiguous":
            target = randn(*lead, n, scale=100.0)  # garbage no result resembles
        elif out == "strided":
            target = randn(rows, n + 16, scale=100.0)[:, 8:8 + n].unflatten(0, lead)
        scale = (torch.rand(lead, generator=gen) * 4 - 2).to(device)  # fp32, signed
        return {"x": x, "scale": scale, "out": target}

    size = DTYPES[dtype].itemsize
    return Case(OP, name, dtype, build, ("out",) if out != "none" else "new",
                tokens * (batch or 1) * (2 * n * size + 4))


@row_scale.cases
def _cases(dtype: str, size: str) -> list[Case]:
    shapes = [(3, 64)] if size == "quick" else [(3, 64), (17, 200)]
    cases = [row_scale_case(t, n, dtype, x_strided=xs, out=out) for t, n in shapes
             for xs, out in ((False, "none"), (False, "contiguous"), (True, "none"),
                             (True, "strided"), (False, "strided"))]
    return cases + [row_scale_case(4, 32, dtype, out="contiguous", batch=2)]


@row_scale.bench
def _bench(tokens: int, dims: Dims, dtype: str) -> list[Case]:
    return [row_scale_case(tokens, dims.hidden, dtype, out="contiguous")]


def row_scale_vendor(x: Tensor, scale: Tensor, out: Tensor | None = None) -> Tensor:
    """The plugin's impl: the same arithmetic through torch.mul with out= where it can."""
    factors = scale.to(torch.float32).unsqueeze(-1)
    if out is not None and out.dtype == torch.float32 and x.dtype == torch.float32:
        return torch.mul(x, factors, out=out)
    return write_out(torch.mul(x.to(torch.float32), factors).to(x.dtype), out)


def row_scale_buggy(x: Tensor, scale: Tensor, out: Tensor | None = None) -> Tensor:
    """Wrong on purpose: a strided ``out`` is replaced by a contiguous copy."""
    result = (x.float() * scale.float().unsqueeze(-1)).to(x.dtype)
    return write_out(result, None if out is None else out.contiguous())


@hookimpl
def fl_dispatch_define_ops():
    return [row_scale]


@hookimpl
def fl_dispatch_register_impls(registrar):
    registrar.register(OP, row_scale.fn, impl_id="reference.scaledop", kind="reference")
    registrar.register(OP, row_scale_vendor, impl_id=IMPL, kind="vendor", vendor="scaledop")
    if os.environ.get("FL_TEST_SCALED_OP_BUG") == "1":
        registrar.register(OP, row_scale_buggy, impl_id=BUGGY, kind="vendor",
                           vendor="scaledop")
