"""The cuda vendor backend: vLLM's compiled CUDA ops (``torch.ops._C``, ``torch.ops._moe_C``),
FlashMLA (``torch.ops._flashmla_C``) and vLLM's Triton ``fused_experts``, adapted to the ops'
contracts (out parameters, in-place updates on strided views, ``weight=None``, the loaded
schema's extra arguments)."""

from __future__ import annotations

from fl_dispatch import BackendInfo, Registrar, hookimpl

VENDOR = "cuda"


def unavailable_reason() -> str | None:
    """None when a CUDA device and vLLM's compiled ops are present, else why not."""
    try:
        from .ops import unavailable_reason as reason
    except ImportError as exc:  # torch missing
        return f"cannot import the adapters ({exc})"
    return reason()


def _gaps() -> dict[str, str]:
    try:
        from .mla import GAPS as MLA_GAPS
        from .moe import GAPS as MOE_GAPS
    except ImportError as exc:  # torch missing
        return {"*": f"cannot import the MoE/MLA adapters ({exc})"}
    return {**MOE_GAPS, **MLA_GAPS}


@hookimpl
def fl_dispatch_backend_info() -> BackendInfo:
    return BackendInfo(VENDOR, "vLLM's compiled CUDA ops (torch.ops._C, _moe_C), FlashMLA, "
                       "vLLM's Triton fused_experts", unavailable_reason, gaps=_gaps())


@hookimpl
def fl_dispatch_register_impls(registrar: Registrar) -> None:
    from . import mla, moe, ops

    ops.impls.register_all(registrar)
    moe.impls.register_all(registrar)
    mla.impls.register_all(registrar)
