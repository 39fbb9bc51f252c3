"""RMS normalization, plain and fused with the residual add (vLLM's RMSNorm)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..opspec import define_op


def _normalize(s: Tensor, weight: Tensor | None, epsilon: float, dtype: torch.dtype) -> Tensor:
    """``s`` is fp32; the rounding order is vLLM's: to weight's dtype, times weight, to dtype."""
    variance = s.pow(2).mean(dim=-1, keepdim=True)
    s = s * torch.rsqrt(variance + epsilon)
    if weight is not None:
        s = s.to(weight.dtype) * weight
    return s.to(dtype)


@define_op(mutates=("x", "residual"), layer="rms_norm")
def rms_norm(
    x: Tensor,
    weight: Tensor | None,
    epsilon: float,
    residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """RMS normalization as ``vllm.ir.ops.rms_norm``: variance in fp32 over the last dim,
    ``(x * rsqrt(var + eps)).to(weight.dtype) * weight``, then cast to x's dtype.

    Without ``residual``: returns a new tensor, ``x`` is untouched.
    With ``residual`` (the fused add + norm of ``vllm.ir.ops.fused_add_rms_norm``):
    ``s = x.float() + residual.float()``; ``residual`` receives ``s`` cast to its dtype, ``x``
    receives the normalized ``s``, both **in place** (also when they are strided views), and
    ``(x, residual)`` is returned. ``weight=None`` skips the multiply."""
    if residual is None:
        return _normalize(x.to(torch.float32), weight, epsilon, x.dtype)
    s = x.to(torch.float32) + residual.to(torch.float32)
    residual.copy_(s.to(residual.dtype))
    x.copy_(_normalize(s, weight, epsilon, x.dtype))
    return x, residual


# torch custom ops for compiled graphs: the two forms vLLM's layer uses (a union return has
# no schema)
@rms_norm.torch_op("rms_norm")
def _rms_norm_op(op, x: torch.Tensor, weight: torch.Tensor | None,
                 epsilon: float) -> torch.Tensor:
    return op(x, weight, epsilon)


@rms_norm.torch_op("fused_add_rms_norm", mutates=("x", "residual"))
def _fused_add_rms_norm_op(op, x: torch.Tensor, residual: torch.Tensor,
                           weight: torch.Tensor | None, epsilon: float) -> None:
    op(x, weight, epsilon, residual)


@rms_norm.cases
def _cases(dtype: str, size: str) -> list:
    from fl_dispatch.testing.inputs import rms_cases

    return rms_cases(dtype, size)


@rms_norm.bench
def _bench(tokens: int, dims, dtype: str) -> list:
    from fl_dispatch.testing.inputs import rms_case

    # replaying the residual variant adds the output to the residual each call: small weights
    return [rms_case(tokens, dims.hidden, dtype, residual=False),
            rms_case(tokens, dims.hidden, dtype, residual=True, weight_scale=1e-3)]
