"""The dispatched ops as torch.library custom ops (namespace ``fl_dispatch``).

``torch.compile`` sees each as one opaque op with a fake (meta) implementation; the real
implementation calls the frozen choice (``fl_dispatch.fast.<op>``, guarded at the call
site), so the compiled graph is the same whichever backend is selected and no policy work
happens per call.
"""

from __future__ import annotations

import torch

from .dispatch import fast, recover

NAMESPACE = "fl_dispatch"
_lib: torch.library.Library | None = None

SCHEMAS = {
    "silu_and_mul": "silu_and_mul(Tensor x) -> Tensor",
    "gelu_and_mul": "gelu_and_mul(Tensor x, str approximate) -> Tensor",
    "rms_norm": "rms_norm(Tensor x, Tensor? weight, float epsilon) -> Tensor",
    "fused_add_rms_norm": "fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, "
                          "Tensor? weight, float epsilon) -> ()",
    "rotary_embedding": "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!)? key, "
                        "SymInt head_size, Tensor cos_sin_cache, bool is_neox) -> ()",
}


# Each guards its own call (no extra frame): a failing impl falls back through recover().
def _silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    f = fast.silu_and_mul
    try:
        return f(x)
    except Exception as exc:
        return recover("silu_and_mul", f, exc, (x,))


def _gelu_and_mul(x: torch.Tensor, approximate: str) -> torch.Tensor:
    f = fast.gelu_and_mul
    try:
        return f(x, approximate)
    except Exception as exc:
        return recover("gelu_and_mul", f, exc, (x, approximate))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, epsilon: float) -> torch.Tensor:
    f = fast.rms_norm
    try:
        return f(x, weight, epsilon)
    except Exception as exc:
        return recover("rms_norm", f, exc, (x, weight, epsilon))


def _fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                        epsilon: float) -> None:
    f = fast.rms_norm
    try:
        f(x, weight, epsilon, residual)
    except Exception as exc:
        recover("rms_norm", f, exc, (x, weight, epsilon, residual))


def _rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
                      head_size: int, cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    f = fast.rotary_embedding
    try:
        f(positions, query, key, head_size, cos_sin_cache, is_neox)
    except Exception as exc:
        recover("rotary_embedding", f, exc,
                (positions, query, key, head_size, cos_sin_cache, is_neox))


def _half_last(x: torch.Tensor, *_: object) -> torch.Tensor:
    return x.new_empty(x.shape[:-1] + (x.shape[-1] // 2,))


def _like_x(x: torch.Tensor, *_: object) -> torch.Tensor:
    return torch.empty_like(x)


def _nothing(*_: object) -> None:
    return None


_IMPLS = {
    "silu_and_mul": (_silu_and_mul, _half_last),
    "gelu_and_mul": (_gelu_and_mul, _half_last),
    "rms_norm": (_rms_norm, _like_x),
    "fused_add_rms_norm": (_fused_add_rms_norm, _nothing),
    "rotary_embedding": (_rotary_embedding, _nothing),
}


def define() -> None:
    """Define the ops once per process (idempotent)."""
    global _lib
    if _lib is not None:
        return
    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    for name, schema in SCHEMAS.items():
        impl, fake = _IMPLS[name]
        lib.define(schema)
        lib.impl(name, impl, "CompositeExplicitAutograd")
        # A Meta kernel serves FakeTensor tracing like a registered fake, without the
        # source-location lookup register_fake does (~30 ms per op with vLLM imported).
        lib.impl(name, fake, "Meta")
    _lib = lib
