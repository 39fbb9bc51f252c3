"""Adapters from the ops' contracts to torch_npu kernels (imported on first call).

Not run in this project's CI (no NPU); ``fl-dispatch verify`` checks them on an Ascend host.
"""

from __future__ import annotations

import torch

from fl_dispatch.opspec import write_out


def _npu():
    import torch_npu

    return torch_npu


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return write_out(_npu().npu_swiglu(x.contiguous(), dim=-1), out)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    epsilon: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    npu = _npu()
    w = weight if weight is not None else torch.ones(x.shape[-1], dtype=x.dtype,
                                                    device=x.device)
    if residual is None:
        return npu.npu_rms_norm(x, w, epsilon)[0]
    y, _, s = npu.npu_add_rms_norm(x, residual, w, epsilon)
    residual.copy_(s)
    x.copy_(y)
    return x, residual


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    if key is None:
        raise NotImplementedError("torch_npu rotary embedding needs a key tensor")
    if cos_sin_cache.dtype != query.dtype:
        cos_sin_cache = cos_sin_cache.to(query.dtype)
    _npu()._npu_rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)
