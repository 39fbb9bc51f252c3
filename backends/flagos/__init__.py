"""The flagos backend: vendor-neutral Triton kernels (and FlagGems where it imports).

Registering imports neither Triton nor our kernels: the adapters in :mod:`.ops` load and
compile a kernel on its first call; the capability check imports Triton only.
"""

from __future__ import annotations

from fl_dispatch import BackendInfo, hookimpl

from .capability import gpu_unavailable_reason, unavailable_reason

IMPL_ID = "default.flagos"
KIND = "flagos"
OPS = ("silu_and_mul", "gelu_and_mul", "rms_norm", "rotary_embedding")


@hookimpl
def fl_dispatch_backend_info() -> BackendInfo:
    return BackendInfo("flagos", "vendor-neutral Triton kernels", unavailable_reason)


@hookimpl
def fl_dispatch_register_impls(registrar) -> None:
    from . import flaggems, ops

    for name in OPS:
        registrar.register(name, getattr(ops, name), impl_id=IMPL_ID, kind=KIND,
                           check=unavailable_reason)
    for name in flaggems.OPS:
        registrar.register(name, getattr(flaggems, name), impl_id=flaggems.IMPL_ID,
                           kind=KIND, priority=flaggems.PRIORITY,
                           check=flaggems.flaggems_unavailable_reason)
    registrar.register("attention_backend", attention_backend, impl_id=IMPL_ID, kind=KIND,
                       check=gpu_unavailable_reason)


def attention_backend(use_mla: bool = False) -> str | None:
    """vLLM's Triton attention backends: the vendor-neutral choice."""
    return "TRITON_MLA" if use_mla else "TRITON_ATTN"


@hookimpl
def fl_dispatch_process_init(policy) -> str | None:
    """Enable FlagGems' aten-level registration in this process, as the policy says."""
    from .flaggems import enable_flaggems

    return enable_flaggems(policy)
