"""``flash_mla`` over FlashMLA's dense decode kernel, ``torch.ops._flashmla_C.dense_decode_fwd``
(impl ``vendor.cuda``; Hopper, SM90a only).

The call follows vLLM 0.25's ``vllm/third_party/flashmla/flash_mla_interface.py``
(``flash_mla_with_kvcache``, dense branch)::

    out, lse, tile_md, num_splits = torch.ops._flashmla_C.dense_decode_fwd(
        q, k_cache, head_dim_v, cache_seqlens, block_table, softmax_scale, causal,
        tile_scheduler_metadata, num_splits, out)

with ``tile_scheduler_metadata = num_splits = None``: FlashMLA then computes the tile schedule
itself, on the device, from ``cache_seqlens`` (``get_decoding_sched_meta`` kernel in
``csrc/api/dense_decode.h``), so every call is graph-safe and no schedule is reused across
different lengths (vLLM's ``FlashMLASchedMeta`` may be reused only while the lengths stay the
same). The arguments after ``num_splits`` (``out`` in 0.25) are optional and passed as None,
following the loaded schema.

What FlashMLA accepts (TORCH_CHECKs in ``dense_decode.h``): q/kv fp16 or bf16, ``d`` 576 or
512, ``head_dim_v == 512``, page block 64, batch > 0; anything else goes to the op's reference.
Contract fix-ups, all on the device: ``cache_seqlens`` clamped to ``[0, max_blocks *
block_size]`` (the kernel would read the block table past its end), and queries that see no
position (zero-length rows, causal positions before the cache start) get ``out = 0`` and
``lse = +inf`` (FlashMLA writes that for rows it schedules; the fix-up also covers rows its
scheduler skips, whose output buffer is uninitialised).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from fl_dispatch import ImplTable, checked, reference

from .device import device_capability
from .ops import load_extension

LIBRARY_ENV = "FL_DISPATCH_FLASHMLA_C"
"""Path of FlashMLA's ``_flashmla_C.abi3.so`` to load when ``vllm._flashmla_C`` is absent."""

OP = "dense_decode_fwd"
BASE_ARGS = 9
"""q, k_cache, head_dim_v, cache_seqlens, block_table, softmax_scale, causal,
tile_scheduler_metadata, num_splits: the arguments every supported schema starts with."""

HEAD_DIMS = (576, 512)
HEAD_DIM_V = 512
PAGE_BLOCK = 64
_DTYPES = (torch.float16, torch.bfloat16)


def device_reason() -> str | None:
    """None on a Hopper (SM90) CUDA device, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    major, minor = device_capability()  # NVML: vLLM's front end must not initialise CUDA
    if major != 9:
        return f"FlashMLA dense decode needs Hopper (SM90a); this device is SM{major}{minor}"
    return None


def _namespace() -> Any:
    return torch.ops._flashmla_C


def _has_op() -> bool:
    try:
        return hasattr(_namespace(), OP)
    except Exception:
        return False


def load_flashmla() -> str | None:
    """Make ``torch.ops._flashmla_C`` available: ``import vllm._flashmla_C``, else the library
    at ``$FL_DISPATCH_FLASHMLA_C``. None on success, else why not."""
    errors = load_extension("vllm._flashmla_C", LIBRARY_ENV, _has_op)
    if not errors:
        return None
    return (f"FlashMLA (torch.ops._flashmla_C.{OP}) is not loadable (" + "; ".join(errors)
            + ")")


@functools.lru_cache(maxsize=1)
def call_plan() -> tuple[tuple[str, ...], str | None]:
    """Names of the loaded schema's arguments past the first nine (passed as None), or why
    the schema cannot be served."""
    try:
        schema = getattr(_namespace(), OP).default._schema
    except Exception as exc:
        return (), f"torch.ops._flashmla_C.{OP} has no readable schema ({exc})"
    args = list(schema.arguments)
    if len(args) < BASE_ARGS:
        return (), f"torch.ops._flashmla_C.{OP} has an unknown schema: {schema}"
    required = [a.name for a in args[BASE_ARGS:] if not isinstance(a.type, torch.OptionalType)]
    if required:
        return (), (f"torch.ops._flashmla_C.{OP}'s schema adds required argument(s) "
                    f"{', '.join(required)}: {schema}")
    return tuple(a.name for a in args[BASE_ARGS:]), None


def reset() -> None:
    call_plan.cache_clear()


def unavailable_reason() -> str | None:
    """None when FlashMLA's dense decode can run here, else why not."""
    return device_reason() or load_flashmla() or call_plan()[1]


impls = ImplTable(impl_id="vendor.cuda", kind="vendor", vendor="cuda",
                  check=unavailable_reason)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def lonely_queries(cache_seqlens: torch.Tensor, s_q: int, causal: bool) -> torch.Tensor:
    """bool ``[B, s_q]``: the queries that see no cache position (device-side)."""
    visible = cache_seqlens.long().view(-1, 1).expand(-1, s_q)
    if causal:
        visible = visible - s_q + 1 + torch.arange(s_q, device=cache_seqlens.device).view(1, -1)
    return visible <= 0


@impls.impl()
@checked
def flash_mla(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
              cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
              causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    b, s_q, _, d = q.shape
    block_size = kv_cache.shape[1]
    if q.dtype not in _DTYPES or d not in HEAD_DIMS or head_dim_v != HEAD_DIM_V or \
            block_size != PAGE_BLOCK or b == 0:
        return reference("flash_mla")(q, kv_cache, block_table, cache_seqlens, head_dim_v,
                                      softmax_scale, causal)
    capacity = block_table.shape[1] * block_size
    seqlens = cache_seqlens.clamp(0, capacity)  # a new contiguous int32 tensor
    extras = call_plan()[0]
    result = getattr(_namespace(), OP)(
        q.contiguous(), _last_dim_contiguous(kv_cache), int(head_dim_v), seqlens,
        _last_dim_contiguous(block_table), float(softmax_scale), bool(causal), None, None,
        **dict.fromkeys(extras))
    out, lse = result[0], result[1]
    lonely = lonely_queries(seqlens, s_q, bool(causal) and s_q > 1)  # [B, s_q]
    out = out.masked_fill(lonely.view(b, s_q, 1, 1), 0.0)
    lse = lse.masked_fill(lonely.view(b, 1, s_q), float("inf"))
    return out, lse


GAPS = {
    "flash_mla": "vendor.cuda (FlashMLA dense_decode_fwd, Hopper only): fp16/bf16, d 576 or "
                 "512, head_dim_v 512, block size 64 only (others: the reference); the tile "
                 "schedule is recomputed per call on the device (graph-safe, not reused); "
                 "lengths are clamped to the block table and query positions seeing nothing "
                 "are fixed up to out=0, lse=+inf on the device",
}
