"""Adapters from the ops' contracts to torch_npu kernels (imported on first call).

Never run on an NPU in this project's CI; ``tests/test_ascend_double.py`` runs them on CPU
against a behavioural double of the torch_npu calls (written from torch_npu's documentation),
and ``fl-dispatch verify`` checks them on an Ascend host.
"""

from __future__ import annotations

import torch

from fl_dispatch import ImplTable, copy_back, reference, weight_or_ones, write_out


def _npu():
    import torch_npu

    return torch_npu


def unavailable_reason() -> str | None:
    """None when torch_npu imports and an NPU is present, else why not."""
    try:
        _npu()
    except Exception as exc:
        return f"torch_npu is not importable ({type(exc).__name__}: {exc})"
    if not torch.npu.is_available():  # type: ignore[attr-defined]
        return "no Ascend NPU (torch.npu.is_available() is False)"
    return None


impls = ImplTable(impl_id="vendor.ascend", kind="vendor", vendor="ascend",
                  check=unavailable_reason)
"""torch_npu's fused kernels, one impl per op (each decorated below)."""


@impls.impl()
def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return write_out(_npu().npu_swiglu(x.contiguous(), dim=-1), out)


@impls.impl()
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    epsilon: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if weight is not None and weight.dtype != x.dtype:  # the kernels take gamma in x's dtype
        return reference("rms_norm")(x, weight, epsilon, residual)  # (never raise: it demotes)
    npu = _npu()
    w = weight_or_ones(weight, x)
    if residual is None:
        return npu.npu_rms_norm(x, w, epsilon)[0]
    y, _, s = npu.npu_add_rms_norm(x, residual, w, epsilon)
    copy_back(residual, s)
    copy_back(x, y)
    return x, residual


@impls.impl()
def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    if key is None:  # torch_npu's kernel needs a key: delegate, never raise (a raise demotes)
        return reference("rotary_embedding")(positions, query, key, head_size, cos_sin_cache,
                                             is_neox)
    if cos_sin_cache.dtype != query.dtype:
        cos_sin_cache = cos_sin_cache.to(query.dtype)
    # The kernel rotates whole heads of dense [T, heads * head_size] rows in place (vllm-ascend
    # passes .contiguous().view(T, -1), and head_size=rotary_dim for partial rotary): hand it
    # the rotary part as dense rows, then write it back into the caller's (strided) views.
    num_tokens, rotary_dim = positions.numel(), cos_sin_cache.shape[-1]
    q_rot = query.view(num_tokens, -1, head_size)[..., :rotary_dim]
    k_rot = key.view(num_tokens, -1, head_size)[..., :rotary_dim]
    q = q_rot.reshape(num_tokens, -1).contiguous()
    k = k_rot.reshape(num_tokens, -1).contiguous()
    _npu()._npu_rotary_embedding(positions.flatten(), q, k, rotary_dim, cos_sin_cache, is_neox)
    copy_back(q_rot, q.view(q_rot.shape))
    copy_back(k_rot, k.view(k_rot.shape))
    return None
