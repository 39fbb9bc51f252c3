"""The flagos backend: vendor-neutral Triton kernels (and FlagGems where it imports)."""

from __future__ import annotations

from fl_dispatch import BackendInfo, hookimpl


@hookimpl
def fl_dispatch_backend_info() -> BackendInfo:
    return BackendInfo("flagos", "vendor-neutral Triton kernels")
