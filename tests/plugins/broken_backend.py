"""A deliberately broken vendor backend ("brokenvendor"): ``fl-dispatch verify`` must catch
each of its bugs. Each impl id carries one kind of bug:

- ``vendor.brokenvendor.offby``: results off by 2e-3 (beyond fp32's tolerance only);
- ``vendor.brokenvendor.contiguous``: in-place updates land in ``.contiguous()`` copies, so a
  strided view of the caller's is never updated (FlagGems' fused_add_rms_norm bug);
- ``vendor.brokenvendor.ignoreout``: ``out`` is ignored; a new tensor is returned instead.
"""

from __future__ import annotations

from fl_dispatch import hookimpl
from fl_dispatch.core import ops as ref

OFFBY, CONTIGUOUS, IGNOREOUT = (f"vendor.brokenvendor.{bug}"
                                for bug in ("offby", "contiguous", "ignoreout"))


def silu_and_mul_offby(x, out=None):
    result = ref.silu_and_mul(x) + 2e-3
    if out is None:
        return result
    out.copy_(result)
    return out


def rms_norm_offby(x, weight, epsilon, residual=None):
    if residual is None:
        return ref.rms_norm(x, weight, epsilon) + 2e-3
    ref.rms_norm(x, weight, epsilon, residual)
    x.add_(2e-3)
    return x, residual


def rms_norm_contiguous(x, weight, epsilon, residual=None):
    if residual is None:
        return ref.rms_norm(x.contiguous(), weight, epsilon)
    return ref.rms_norm(x.contiguous(), weight, epsilon, residual.contiguous())


def rotary_embedding_contiguous(positions, query, key, head_size, cos_sin_cache, is_neox):
    key = None if key is None else key.contiguous()
    ref.rotary_embedding(positions, query.contiguous(), key, head_size, cos_sin_cache, is_neox)


def silu_and_mul_ignoreout(x, out=None):
    return ref.silu_and_mul(x)


def gelu_and_mul_ignoreout(x, approximate="none", out=None):
    return ref.gelu_and_mul(x, approximate)


IMPLS = (
    ("silu_and_mul", silu_and_mul_offby, OFFBY),
    ("rms_norm", rms_norm_offby, OFFBY),
    ("rms_norm", rms_norm_contiguous, CONTIGUOUS),
    ("rotary_embedding", rotary_embedding_contiguous, CONTIGUOUS),
    ("silu_and_mul", silu_and_mul_ignoreout, IGNOREOUT),
    ("gelu_and_mul", gelu_and_mul_ignoreout, IGNOREOUT),
)


@hookimpl
def fl_dispatch_register_impls(registrar):
    for op, fn, impl_id in IMPLS:
        registrar.register(op, fn, impl_id=impl_id, kind="vendor", vendor="brokenvendor")
