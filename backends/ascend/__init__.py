"""The ascend vendor backend: torch_npu's fused kernels on Huawei Ascend NPUs."""

from __future__ import annotations

from fl_dispatch import BackendInfo, hookimpl

VENDOR = "ascend"
IMPL_ID = "vendor.ascend"
OPS = ("silu_and_mul", "rms_norm", "rotary_embedding")


def unavailable_reason() -> str | None:
    """None when torch_npu imports and an NPU is present, else why not."""
    try:
        import torch_npu  # noqa: F401
    except Exception as exc:
        return f"torch_npu is not importable ({type(exc).__name__}: {exc})"
    import torch

    if not torch.npu.is_available():  # type: ignore[attr-defined]
        return "no Ascend NPU (torch.npu.is_available() is False)"
    return None


@hookimpl
def fl_dispatch_backend_info() -> BackendInfo:
    return BackendInfo(VENDOR, "torch_npu kernels for Ascend NPUs", unavailable_reason)


@hookimpl
def fl_dispatch_register_impls(registrar) -> None:
    from . import ops

    for name in OPS:
        registrar.register(name, getattr(ops, name), impl_id=IMPL_ID, kind="vendor",
                           vendor=VENDOR, check=unavailable_reason)
