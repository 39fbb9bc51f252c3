"""fl-dispatch backend for the ACME accelerator: one op, silu_and_mul."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fl_dispatch import BackendInfo, ImplTable, Registrar, hookimpl, write_out


def unavailable_reason() -> str | None:
    """None when this machine can run our kernels, else why not (shown by explain)."""
    if os.environ.get("ACME_DISABLE") == "1":
        return "ACME_DISABLE=1 is set"
    return None


impls = ImplTable(impl_id="vendor.acme", kind="vendor", vendor="acme",
                  check=unavailable_reason)


@impls.impl()  # implements the op of the same name
def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same signature and contract as the op (fl_dispatch/core/ops/activation.py)."""
    d = x.shape[-1] // 2
    return write_out((F.silu(x[..., :d].float()) * x[..., d:].float()).to(x.dtype), out)


@hookimpl
def fl_dispatch_backend_info() -> BackendInfo:
    return BackendInfo("acme", "ACME accelerator kernels", unavailable_reason)


@hookimpl
def fl_dispatch_register_impls(registrar: Registrar) -> None:
    impls.register_all(registrar)
