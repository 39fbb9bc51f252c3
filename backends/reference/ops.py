"""Reference implementations in plain PyTorch (the semantics the other backends match)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fl_dispatch.opspec import GELU_APPROXIMATIONS, bad_approximate, write_out


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    d = x.shape[-1] // 2
    return write_out(F.silu(x[..., :d]) * x[..., d:], out)


def gelu_and_mul(
    x: torch.Tensor, approximate: str = "none", out: torch.Tensor | None = None
) -> torch.Tensor:
    if approximate not in GELU_APPROXIMATIONS:
        raise bad_approximate(approximate)
    d = x.shape[-1] // 2
    return write_out(F.gelu(x[..., :d], approximate=approximate) * x[..., d:], out)


def _normalize(s: torch.Tensor, weight: torch.Tensor | None, epsilon: float,
               dtype: torch.dtype) -> torch.Tensor:
    """``s`` is fp32; the rounding order is vLLM's: to weight's dtype, times weight, to dtype."""
    variance = s.pow(2).mean(dim=-1, keepdim=True)
    s = s * torch.rsqrt(variance + epsilon)
    if weight is not None:
        s = s.to(weight.dtype) * weight
    return s.to(dtype)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    epsilon: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if residual is None:
        return _normalize(x.to(torch.float32), weight, epsilon, x.dtype)
    s = x.to(torch.float32) + residual.to(torch.float32)
    residual.copy_(s.to(residual.dtype))
    x.copy_(_normalize(s, weight, epsilon, x.dtype))
    return x, residual


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Rotate ``x`` [tokens, heads, rotary_dim] (the layout of vLLM's ApplyRotaryEmb)."""
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    if is_neox:
        x1, x2 = torch.chunk(x, 2, dim=-1)
    else:
        x1, x2 = x[..., ::2], x[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox:
        return torch.cat((o1, o2), dim=-1)
    return torch.stack((o1, o2), dim=-1).flatten(-2)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    positions = positions.flatten()
    num_tokens = positions.shape[0]
    rotary_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    for t in (query, key):
        if t is None:
            continue
        heads = t.view(num_tokens, -1, head_size)
        rot = heads[..., :rotary_dim]
        rot.copy_(_rotate(rot, cos, sin, is_neox))


def attention_backend(use_mla: bool = False) -> str | None:
    return None
