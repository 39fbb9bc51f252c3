"""The cuda vendor backend: vLLM's compiled CUDA ops (``torch.ops._C``), adapted to the ops'
contracts (out parameters, in-place updates on strided views, ``weight=None``)."""

from __future__ import annotations

from fl_dispatch import BackendInfo, hookimpl

VENDOR = "cuda"
IMPL_ID = "vendor.cuda"
OPS = ("silu_and_mul", "gelu_and_mul", "rms_norm", "rotary_embedding")


def unavailable_reason() -> str | None:
    """None when a CUDA device and vLLM's compiled ops are present, else why not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    from .ops import load_vllm_ops

    return load_vllm_ops()


@hookimpl
def fl_dispatch_backend_info() -> BackendInfo:
    return BackendInfo(VENDOR, "vLLM's compiled CUDA ops (torch.ops._C)", unavailable_reason)


@hookimpl
def fl_dispatch_register_impls(registrar) -> None:
    from . import ops

    for name in OPS:
        registrar.register(name, getattr(ops, name), impl_id=IMPL_ID, kind="vendor",
                           vendor=VENDOR, check=unavailable_reason)
