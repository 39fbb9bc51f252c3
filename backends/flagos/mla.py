"""``flash_mla``: MLA decode attention over a paged latent KV cache, on our Triton kernels.

    flash_mla(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=True,
              max_seqlen_k=None, config=None) -> (out, lse)

Contract (FlashMLA's dense decode; ground truth ``fl_dispatch/core/ops/mla_reference.py``):
``q [B, s_q, h_q, d]``, ``kv_cache [num_blocks, block_size, 1, d]`` (keys: all ``d`` channels;
values: the first ``head_dim_v``), ``block_table`` int32 ``[B, max_blocks]``, ``cache_seqlens``
int32 ``[B]``; returns ``out [B, s_q, h_q, head_dim_v]`` in q's dtype and ``lse [B, h_q, s_q]``
fp32 (natural log). Causal: query position ``i`` sees cache positions ``[0, len - s_q + i]``.
A query that sees nothing: ``out = 0``, ``lse = +inf``. bf16, fp16 and fp32.

CUDA graphs: nothing here reads device data on the host. The launch configuration, the number
of KV splits included, depends on shapes only (``B``, ``s_q * h_q``, ``max_blocks *
block_size``, the SM count); each split's range is computed on the device from the row's
length. Lengths beyond ``max_blocks * block_size`` (what the table can address) are clamped
on the device: the kernel never reads past the table. What can be checked without reading
data is checked (ValueError): ranks, ``d``, ``head_dim_v``, ``h_kv == 1``, dtypes, batch
sizes, a table with at least one column, and, when the caller passes the static bound
``max_seqlen_k``, ``max_blocks * block_size >= max_seqlen_k``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import torch

from fl_dispatch import check_args

from .capability import interpreter_enabled
from .launcher import TritonKernel, pow2

_PKG = __package__ or "fl_dispatch_flagos"
_LOG2E = 1.4426950408889634
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


SPLIT_KERNEL = TritonKernel(f"{_PKG}.kernels_mla", "mla_split_kernel")
COMBINE_KERNEL = TritonKernel(f"{_PKG}.kernels_mla", "mla_combine_kernel")
KERNELS = (SPLIT_KERNEL, COMBINE_KERNEL)


class MLAConfig(NamedTuple):
    """Launch configuration of the split kernel (and the split count of the combine)."""

    block_h: int      # query rows (of the s_q * h_q of a batch row) per program: 16..64
    block_n: int      # KV positions per tile (>= 16)
    num_warps: int
    num_stages: int
    num_splits: int   # KV splits per row (1: no combine kernel)


@functools.lru_cache(maxsize=8)
def _num_sms(device: int) -> int:
    if device < 0 or not torch.cuda.is_available():
        return 132  # H200; only the split count depends on it
    return torch.cuda.get_device_properties(device).multi_processor_count


MLA_CONFIGS: dict[tuple, MLAConfig] = {
    # H200, bf16, B=128, lengths ~ normal(mean, mean/2): `python3 bench/mla.py --sweep-all
    # --only ...` (2026-12-01); where the sweep beat the heuristic (its time in brackets)
    (2, 16, 16384, 128): MLAConfig(16, 64, 4, 2, 8),    # h16 s_q1 4k: 186.7 us (190.1)
    (2, 32, 16384, 128): MLAConfig(32, 64, 4, 2, 8),    # h16 s_q2 4k: 276.9 us (299.7)
    (2, 256, 131072, 128): MLAConfig(64, 64, 8, 2, 4),  # h128 s_q2 32k: 8064 us (8582)
}
"""Sweep results written back: ``(dtype_bytes, rows_bucket, capacity_bucket, batch_bucket)``
-> config; consulted before the heuristic (``bench/mla.py --sweep`` prints the entries)."""


@functools.lru_cache(maxsize=4096)
def mla_config(batch: int, rows: int, capacity: int, page: int, d: int, dv: int,
               dtype_bytes: int = 2, num_sms: int = 132) -> MLAConfig:
    """Launch config from shapes only (CUDA-graph safe). ``rows = s_q * h_q`` query rows per
    batch row, ``capacity = max_blocks * block_size`` (the longest row the table allows).

    Heuristic (for an H200, 227 KB shared memory per block): the KV tile ``[BLOCK_N, d]`` is
    shared by ``BLOCK_H`` query rows; q stays in shared memory, the tile is double-buffered.
    Memory-bound shapes (rows <= 32) take all rows in one program with 64-position tiles
    (one page); compute-bound ones 64 rows (fp32 acc 64 x 512 over 8 warps = 128 regs/thread)
    with 32-position tiles so that q (72 KB) and two tiles fit. Splits: enough programs for
    about 8 waves (memory-bound, balances varying lengths) or 4 (compute-bound, fewer partial
    outputs; the measured best), at least 256 positions per split, a power of two (combine is
    specialized on it).
    """
    key = (dtype_bytes, pow2(rows), pow2(max(capacity, 1)), pow2(batch))
    hit = MLA_CONFIGS.get(key)
    if hit is not None:
        block_h, block_n, warps, stages, splits = MLAConfig(*hit)
    else:
        # H200 sweep (2026-11-30, B=128, 8k varlen; docs/performance.md): 4 warps for the
        # memory-bound shapes, 64-position tiles everywhere, about 8 waves of splits when
        # memory-bound (16 splits at B=128) and 4 when compute-bound
        if rows <= 16:
            block_h, block_n, warps, stages = 16, 64, 4, 2
        elif rows <= 32:
            block_h, block_n, warps, stages = 32, 64, 4, 2
        else:
            block_h, block_n, warps, stages = 64, 64, 8, 2
        if dtype_bytes == 4:  # fp32 tiles are twice the size
            block_n, stages = min(block_n, 32), 1
        heads = -(-rows // block_h)
        waves = 8 if rows <= 32 else 4
        want = -(-waves * num_sms // max(batch * heads, 1))
        most = max(1, capacity // 256)
        splits = pow2(max(1, min(want, most)))
        if splits > most:
            splits //= 2
    block_n = max(16, min(block_n, pow2(page)))
    return MLAConfig(block_h, block_n, warps, stages, max(1, splits))


def _bad(name: str, value: Any, valid: str) -> ValueError:
    return ValueError(f"flash_mla: {name} is {value}; {valid}")


def check_inputs(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                 cache_seqlens: torch.Tensor, head_dim_v: int,
                 max_seqlen_k: int | None = None) -> None:
    """What the kernels add to the op's argument checks (``fl_dispatch.check_args``, run
    first): dtypes, strides, one device, the static bound. ValueError naming the argument,
    its bad value and what is valid (shapes only)."""
    if q.dtype not in _DTYPES:
        raise _bad("q.dtype", q.dtype, f"expected one of {_DTYPES}")
    if kv_cache.shape[1] < 1:
        raise _bad("kv_cache.shape[1] (block_size)", kv_cache.shape[1], "expected >= 1")
    if not isinstance(head_dim_v, int):
        raise _bad("head_dim_v", head_dim_v, "expected an int")
    if max_seqlen_k is not None and block_table.shape[1] * kv_cache.shape[1] < max_seqlen_k:
        need = -(-max_seqlen_k // kv_cache.shape[1])
        raise _bad("block_table.shape[1]", block_table.shape[1],
                   f"rows of up to max_seqlen_k={max_seqlen_k} positions need >= {need} "
                   f"columns of {kv_cache.shape[1]}-position blocks")
    for name, t in (("q", q), ("kv_cache", kv_cache), ("block_table", block_table),
                    ("cache_seqlens", cache_seqlens)):
        if t.device != q.device:
            raise _bad(f"{name}.device", t.device, f"expected q's device {q.device}")
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise _bad("q/kv_cache last-dim stride", (q.stride(-1), kv_cache.stride(-1)),
                   "expected 1 (contiguous channels)")


def flash_mla(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
              cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
              causal: bool = True, max_seqlen_k: int | None = None,
              config: MLAConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA decode attention; see the module docstring. ``config`` overrides the launch
    configuration (for sweeps; an ``MLAConfig`` or a plain tuple of its five fields);
    ``max_seqlen_k`` is an optional static bound checked against the table's
    capacity."""
    check_args("flash_mla", q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
               causal)
    check_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v, max_seqlen_k)
    b, s_q, h_q, d = q.shape
    page = kv_cache.shape[1]
    dv = head_dim_v
    out = q.new_empty((b, s_q, h_q, dv))
    lse = torch.empty((b, h_q, s_q), dtype=torch.float32, device=q.device)
    rows = s_q * h_q
    if b == 0 or rows == 0 or dv == 0:
        return out, lse
    capacity = block_table.shape[1] * page
    dev = q.get_device()
    if config is None:
        config = mla_config(b, rows, capacity, page, d, dv, q.element_size(), _num_sms(dev))
    if not isinstance(config, MLAConfig):  # a plain 5-tuple
        config = MLAConfig(*config)
    block_h, block_n, warps, stages, splits = config
    block_n = max(16, min(block_n, pow2(page)))
    tile_in_page = page % block_n == 0
    block_dv = max(16, pow2(dv))
    block_dr = max(16, pow2(d - dv)) if d > dv else 0
    prec = "ieee" if q.dtype == torch.float32 or interpreter_enabled() else "tf32"
    dot_f32 = q.dtype != torch.float32 and interpreter_enabled()
    heads = -(-rows // block_h)
    direct = splits == 1
    scale_log2 = float(softmax_scale) * _LOG2E
    if direct:
        o_buf, l_buf = out, lse
        o_strides = (out.stride(0), 0, dv)   # out is contiguous: row m = s*h_q + h at m*dv
        l_strides = (lse.stride(0), 0, lse.stride(1), lse.stride(2))
    else:
        o_buf = torch.empty((b, splits, rows, dv), dtype=torch.float32, device=q.device)
        l_buf = torch.empty((b, splits, rows), dtype=torch.float32, device=q.device)
        o_strides = (o_buf.stride(0), o_buf.stride(1), dv)
        l_strides = (l_buf.stride(0), l_buf.stride(1), 1, h_q)  # m = s*h_q + h
    ints = (rows, h_q, s_q, capacity, int(bool(causal)), splits,
            q.stride(0), q.stride(1), q.stride(2), kv_cache.stride(0), kv_cache.stride(1),
            block_table.stride(0), *o_strides, *l_strides)
    consts = (d, dv, block_dv, block_dr, page, block_h, block_n, tile_in_page, direct, prec,
              dot_f32)
    tensors = (q, kv_cache, block_table, cache_seqlens, o_buf, l_buf)
    key = ("split", q.dtype, *(t.data_ptr() & 15 for t in tensors), ints, consts, warps,
           stages, dev)
    SPLIT_KERNEL.launch(key, (heads, splits, b), dev, tensors,
                        tuple(t.data_ptr() for t in tensors), (scale_log2, *ints, *consts),
                        warps, stages)
    if not direct:
        ints = (rows, h_q, s_q, splits, o_buf.stride(0), o_buf.stride(1), dv,
                l_buf.stride(0), l_buf.stride(1), out.stride(0), dv,
                lse.stride(0), lse.stride(1), lse.stride(2))
        consts = (dv, block_dv, max(2, pow2(splits)))
        tensors = (o_buf, l_buf, out, lse)
        key = ("combine", q.dtype, *(t.data_ptr() & 15 for t in tensors), ints, consts, dev)
        COMBINE_KERNEL.launch(key, (rows, b, 1), dev, tensors,
                              tuple(t.data_ptr() for t in tensors), (*ints, *consts), 4, 1)
    return out, lse


def default_scale(d: int) -> float:
    """FlashMLA's default ``softmax_scale``: ``d ** -0.5``."""
    return 1.0 / math.sqrt(d)


# ----------------------------------------------------------------------------- registration
def _flash_mla_op(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                  cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                  causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's exact signature (no ``max_seqlen_k``/``config``): what the dispatcher calls."""
    return flash_mla(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)


def _register() -> None:
    from .ops import impls

    impls.add("flash_mla", _flash_mla_op)


_register()
