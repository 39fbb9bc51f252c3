"""Ops: a name, a signature and a contract. The reference backend's impls are their semantics.

The signature of every op is the signature of a stub function below; an implementation must
have the same parameter names, order, kinds and defaults (checked once, at registration).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is only needed for the annotations
    import torch


@dataclass(frozen=True)
class OpSpec:
    """An op: its name, its signature (taken from ``stub``) and which arguments it mutates."""

    name: str
    stub: Callable[..., object]
    mutates: tuple[str, ...] = ()
    doc: str = field(default="", compare=False)

    @property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.stub)

    def signature_mismatch(self, fn: Callable[..., object]) -> str | None:
        """Why ``fn``'s signature differs from this op's, or None when it matches."""
        try:
            got = inspect.signature(fn)
        except (TypeError, ValueError) as exc:
            return f"cannot read its signature ({exc})"
        want = [(p.name, p.kind, p.default) for p in self.signature.parameters.values()]
        have = [(p.name, p.kind, p.default) for p in got.parameters.values()]
        if want == have:
            return None
        return f"signature {got} does not match the op's {self.signature}"


GELU_APPROXIMATIONS = ("none", "tanh")
"""Valid values of gelu_and_mul's ``approximate``."""


def bad_approximate(value: object) -> ValueError:
    """The error every gelu_and_mul impl raises for an ``approximate`` it does not know."""
    return ValueError(f"gelu_and_mul: approximate must be 'none' or 'tanh', got {value!r}")


def write_out(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The ``out`` contract of the activation ops: without ``out`` return ``result``; with it,
    copy ``result`` into ``out`` (which may be a strided view) and return ``out``."""
    if out is None:
        return result
    out.copy_(result)
    return out


def _silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:], d = x.shape[-1] // 2, computed as vLLM's
    ``SiluAndMul.forward_native``. With ``out`` the result is written into it and ``out`` is
    returned; otherwise a new tensor is returned. ``x`` may be a strided view."""
    raise NotImplementedError


def _gelu_and_mul(
    x: torch.Tensor, approximate: str = "none", out: torch.Tensor | None = None
) -> torch.Tensor:
    """gelu(x[..., :d], approximate) * x[..., d:] (approximate: 'none' or 'tanh'), as vLLM's
    ``GeluAndMul.forward_native``; ``out`` as for silu_and_mul."""
    raise NotImplementedError


def _rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    epsilon: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMS normalization as ``vllm.ir.ops.rms_norm``: variance in fp32 over the last dim,
    ``(x * rsqrt(var + eps)).to(weight.dtype) * weight``, then cast to x's dtype.

    Without ``residual``: returns a new tensor, ``x`` is untouched.
    With ``residual`` (the fused add + norm of ``vllm.ir.ops.fused_add_rms_norm``):
    ``s = x.float() + residual.float()``; ``residual`` receives ``s`` cast to its dtype, ``x``
    receives the normalized ``s``, both **in place** (also when they are strided views), and
    ``(x, residual)`` is returned. ``weight=None`` skips the multiply."""
    raise NotImplementedError


def _rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    """Rotary position embedding **in place**, as ``vllm._custom_ops.rotary_embedding``.

    ``query``/``key``: ``[num_tokens, num_heads * head_size]`` or
    ``[num_tokens, num_heads, head_size]`` (rows may be strided); ``key`` may be None.
    ``cos_sin_cache``: ``[max_position, rotary_dim]``, cos in the first half, sin in the second;
    only the first ``rotary_dim`` features of each head rotate (partial rotary). ``is_neox``:
    rotate halves (neox) or interleaved pairs (GPT-J). Arithmetic in the query's dtype."""
    raise NotImplementedError


def _attention_backend(use_mla: bool = False) -> str | None:
    """The attention backend vLLM should use: a name of ``vllm``'s ``AttentionBackendEnum``
    (for example ``'FLASH_ATTN'``) or a class path; None leaves vLLM's own choice."""
    raise NotImplementedError


BUILTIN_OPS: tuple[OpSpec, ...] = (
    OpSpec("silu_and_mul", _silu_and_mul, mutates=("out",)),
    OpSpec("gelu_and_mul", _gelu_and_mul, mutates=("out",)),
    OpSpec("rms_norm", _rms_norm, mutates=("x", "residual")),
    OpSpec("rotary_embedding", _rotary_embedding, mutates=("query", "key")),
    OpSpec("attention_backend", _attention_backend),
)
"""The ops the core defines. Backends may define more through ``fl_dispatch_define_ops``."""
