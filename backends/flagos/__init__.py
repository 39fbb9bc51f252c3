"""The flagos backend: vendor-neutral Triton kernels (and FlagGems where it imports).

Registering imports neither Triton nor our kernels: the adapters load and compile a kernel on
its first call; the capability check imports Triton only. Impls are registered next to their
functions (``@impls.impl()`` in :mod:`.ops`, :mod:`.flaggems`).
"""

from __future__ import annotations

from fl_dispatch import MLA_BACKEND, BackendInfo, ImplTable, Registrar, hookimpl

from .capability import gpu_unavailable_reason, unavailable_reason

IMPL_ID = "default.flagos"
KIND = "flagos"

choices = ImplTable(impl_id=IMPL_ID, kind=KIND, check=gpu_unavailable_reason)
"""Choices (not kernels): they need a GPU, not only Triton."""


@choices.impl()
def attention_backend(use_mla: bool = False) -> str | None:
    """vLLM's Triton attention backends: the vendor-neutral choice. For MLA models,
    fl-dispatch's own MLA backend (TRITON_MLA with decode through the dispatched
    ``flash_mla``; the glue falls back to TRITON_MLA where it is not registered)."""
    return MLA_BACKEND if use_mla else "TRITON_ATTN"


@hookimpl
def fl_dispatch_backend_info() -> BackendInfo:
    from .flaggems import GAPS

    return BackendInfo("flagos", "vendor-neutral Triton kernels", unavailable_reason,
                       gaps=GAPS)


@hookimpl
def fl_dispatch_register_impls(registrar: Registrar) -> None:
    from . import flaggems, flaggems_moe, mla, moe_experts, moe_routing, ops  # noqa: F401

    ops.impls.register_all(registrar)
    flaggems.impls.register_all(registrar)
    choices.register_all(registrar)


@hookimpl
def fl_dispatch_process_init(policy) -> str | None:
    """Enable FlagGems' aten-level registration in this process, as the policy says."""
    from .flaggems import enable_flaggems

    return enable_flaggems(policy)
