"""The built-in ops, one module per family; each op is its reference function
(:func:`fl_dispatch.core.opspec.define_op`).

``BUILTIN_OPS`` is collected from the family modules, in the order the ops are defined there:
a new op in a family module needs no list edited anywhere; a new family module is added to
``FAMILIES``.
"""

from __future__ import annotations

from types import ModuleType

from ..opspec import OpSpec
from . import activation, attention, layernorm, mla, moe, rotary

FAMILIES: tuple[ModuleType, ...] = (activation, layernorm, rotary, attention, moe, mla)
"""The family modules, in the order tools list their ops."""

BUILTIN_OPS: tuple[OpSpec, ...] = tuple({
    id(value): value for family in FAMILIES for value in vars(family).values()
    if isinstance(value, OpSpec)}.values())  # unique: a family may also bind an alias
"""The ops the core defines. Backends may define more through ``fl_dispatch_define_ops``."""

globals().update({op.name: op for op in BUILTIN_OPS})  # fl_dispatch.core.ops.<op>
__all__ = ["BUILTIN_OPS", "FAMILIES", *sorted(op.name for op in BUILTIN_OPS)]
