"""The cuda vendor backend: vLLM's compiled CUDA ops (``torch.ops._C``), adapted to the ops'
contracts (out parameters, in-place updates on strided views, ``weight=None``)."""

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


@hookimpl
def fl_dispatch_backend_info() -> BackendInfo:
    return BackendInfo(VENDOR, "vLLM's compiled CUDA ops (torch.ops._C)", unavailable_reason)


@hookimpl
def fl_dispatch_register_impls(registrar: Registrar) -> None:
    from .ops import impls

    impls.register_all(registrar)
