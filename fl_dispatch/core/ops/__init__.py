"""The built-in ops, one module per family; each op is its reference function
(:func:`fl_dispatch.core.opspec.define_op`)."""

from __future__ import annotations

from ..opspec import OpSpec
from .activation import gelu_and_mul, silu_and_mul
from .attention import attention_backend
from .layernorm import rms_norm
from .mla import flash_mla
from .moe import fused_experts, grouped_topk, moe_align_block_size, moe_sum, topk_softmax
from .rotary import rotary_embedding

BUILTIN_OPS: tuple[OpSpec, ...] = (
    silu_and_mul,
    gelu_and_mul,
    rms_norm,
    rotary_embedding,
    attention_backend,
    topk_softmax,
    grouped_topk,
    moe_align_block_size,
    moe_sum,
    fused_experts,
    flash_mla,
)
"""The ops the core defines, in the order tools list them. Backends may define more through
``fl_dispatch_define_ops``."""

__all__ = ["BUILTIN_OPS", "attention_backend", "flash_mla", "fused_experts", "gelu_and_mul",
           "grouped_topk", "moe_align_block_size", "moe_sum", "rms_norm", "rotary_embedding",
           "silu_and_mul", "topk_softmax"]
