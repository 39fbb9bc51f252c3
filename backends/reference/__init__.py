"""The reference backend: plain PyTorch, always available, the ground truth of every op.

Its impls are the built-in ops' own definitions (:mod:`fl_dispatch.core.ops`): an op *is* its
reference function, so there is nothing to restate here.
"""

from __future__ import annotations

from fl_dispatch import BackendInfo, Registrar, builtin_ops, hookimpl

IMPL_ID = "reference.torch"


@hookimpl
def fl_dispatch_backend_info() -> BackendInfo:
    return BackendInfo("reference", "plain PyTorch; the semantics of every op")


@hookimpl
def fl_dispatch_register_impls(registrar: Registrar) -> None:
    for op in builtin_ops():
        registrar.register(op.name, op.fn, impl_id=IMPL_ID, kind="reference",
                           traceable=op.traceable)
