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
from .activation import gelu_and_mul, silu_and_mul
from .attention import attention_backend
from .layernorm import rms_norm
from .mla import flash_mla
from .moe import fused_experts, grouped_topk, moe_align_block_size, moe_sum, topk_softmax
from .rotary import rotary_embedding

FAMILIES: tuple[ModuleType, ...] = (activation, layernorm, rotary, attention, moe, mla)
"""The family modules, in the order tools list their ops."""

BUILTIN_OPS: tuple[OpSpec, ...] = tuple({
    id(value): value for family in FAMILIES for value in vars(family).values()
    if isinstance(value, OpSpec)}.values())  # unique: a family may also bind an alias
"""The ops the core defines. Backends may define more through ``fl_dispatch_define_ops``."""

__all__ = ["BUILTIN_OPS", "FAMILIES", "attention_backend", "flash_mla", "fused_experts",
           "gelu_and_mul", "grouped_topk", "moe_align_block_size", "moe_sum", "rms_norm",
           "rotary_embedding", "silu_and_mul", "topk_softmax"]
