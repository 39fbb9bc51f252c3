"""Gated activations: ``act(x[..., :d]) * x[..., d:]`` (vLLM's SiluAndMul, GeluAndMul)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..opspec import GELU_APPROXIMATIONS, bad_approximate, define_op, write_out


@define_op(mutates=("out",), layer="silu_and_mul")
def silu_and_mul(x: Tensor, out: Tensor | None = None) -> Tensor:
    """silu(x[..., :d]) * x[..., d:], d = x.shape[-1] // 2, computed as vLLM's
    ``SiluAndMul.forward_native`` (in x's dtype). With ``out`` the result is written into it
    and ``out`` is returned; otherwise a new tensor is returned. ``x`` may be a strided view."""
    d = x.shape[-1] // 2
    return write_out(F.silu(x[..., :d]) * x[..., d:], out)


@define_op(mutates=("out",), layer="gelu_and_mul")
def gelu_and_mul(x: Tensor, approximate: str = "none", out: Tensor | None = None) -> Tensor:
    """gelu(x[..., :d], approximate) * x[..., d:] (approximate: 'none' or 'tanh', anything
    else raises ValueError), as vLLM's ``GeluAndMul.forward_native``; ``out`` as for
    silu_and_mul."""
    if approximate not in GELU_APPROXIMATIONS:
        raise bad_approximate(approximate)
    d = x.shape[-1] // 2
    return write_out(F.gelu(x[..., :d], approximate=approximate) * x[..., d:], out)


# torch custom ops for compiled graphs: the result is a new tensor (schemas cannot return `out`)
@silu_and_mul.torch_op("silu_and_mul")
def _silu_and_mul_op(op, x: torch.Tensor) -> torch.Tensor:
    return op(x)


@gelu_and_mul.torch_op("gelu_and_mul")
def _gelu_and_mul_op(op, x: torch.Tensor, approximate: str) -> torch.Tensor:
    return op(x, approximate)


@silu_and_mul.cases
def _silu_cases(dtype: str, size: str) -> list:
    from fl_dispatch.testing.inputs import act_cases

    return act_cases("silu_and_mul", dtype, size, (None,))


@gelu_and_mul.cases
def _gelu_cases(dtype: str, size: str) -> list:
    from fl_dispatch.testing.inputs import act_cases

    return act_cases("gelu_and_mul", dtype, size, ("none", "tanh"))


@silu_and_mul.bench
def _silu_bench(tokens: int, dims, dtype: str) -> list:
    from fl_dispatch.testing.inputs import act_case

    return [act_case("silu_and_mul", tokens, dims.intermediate, dtype, out="contiguous")]


@gelu_and_mul.bench
def _gelu_bench(tokens: int, dims, dtype: str) -> list:
    from fl_dispatch.testing.inputs import act_case

    return [act_case("gelu_and_mul", tokens, dims.intermediate, dtype, out="contiguous",
                     approximate="none")]
