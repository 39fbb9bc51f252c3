"""The reference backend: plain PyTorch, always available, the ground truth of every op.

Each function follows vLLM's own native implementation of the op (the layers'
``forward_native`` and ``vllm.ir``), including the dtype rounding order.
"""

from __future__ import annotations

from fl_dispatch import BackendInfo, hookimpl

IMPL_ID = "reference.torch"


@hookimpl
def fl_dispatch_backend_info() -> BackendInfo:
    return BackendInfo("reference", "plain PyTorch; the semantics of every op")


@hookimpl
def fl_dispatch_register_impls(registrar) -> None:
    from . import ops

    for name in ("silu_and_mul", "gelu_and_mul", "rms_norm", "rotary_embedding",
                 "attention_backend"):
        registrar.register(name, getattr(ops, name), impl_id=IMPL_ID, kind="reference",
                           traceable=True)
