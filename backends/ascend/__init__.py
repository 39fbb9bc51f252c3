"""The ascend vendor backend: torch_npu's fused kernels on Huawei Ascend NPUs.

Never run on an NPU: checked on CPU against a behavioural double of torch_npu only."""

from __future__ import annotations

from fl_dispatch import BackendInfo, Registrar, hookimpl

VENDOR = "ascend"


def unavailable_reason() -> str | None:
    """None when torch_npu imports and an NPU is present, else why not."""
    from .ops import unavailable_reason as reason

    return reason()


@hookimpl
def fl_dispatch_backend_info() -> BackendInfo:
    return BackendInfo(VENDOR, "torch_npu kernels for Ascend NPUs (never run on an NPU here)",
                       unavailable_reason,
                       gaps={"rotary_embedding": "key=None is delegated to the reference "
                                                 "(torch_npu's kernel needs a key); strided, "
                                                 "3-D and partial-rotary q/k go through dense "
                                                 "copies written back",
                             "rotary_embedding_out": "not served: compiled graphs rotate "
                                                     "copies with rotary_embedding (torch_npu's "
                                                     "kernel is in place only)",
                             "rms_norm": "a weight in another dtype than x is delegated to "
                                         "the reference (torch_npu takes gamma in x's "
                                         "dtype only)"})


@hookimpl
def fl_dispatch_register_impls(registrar: Registrar) -> None:
    from .ops import impls

    impls.register_all(registrar)
