"""``flash_mla``: MLA decode attention over a paged latent KV cache, on our Triton kernels.

    flash_mla(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=True,
              max_seqlen_k=None, config=None) -> (out, lse)

Contract (FlashMLA's dense decode; ground truth ``fl_dispatch/core/ops/mla_reference.py``):
``q [B, s_q, h_q, d]``, ``kv_cache [num_blocks, block_size, 1, d]`` (keys: all ``d`` channels;
values: the first ``head_dim_v``), ``block_table`` int32 ``[B, max_blocks]``, ``cache_seqlens``
int32 ``[B]``; returns ``out [B, s_q, h_q, head_dim_v]`` in q's dtype and ``lse [B, h_q, s_q]``
fp32 (natural log). Causal: query position ``i`` sees cache positions ``[0, len - s_q + i]``.
A query that sees nothing: ``out = 0``, ``lse = +inf``. bf16, fp16 and fp32.

Two kernels: ``kernels_mla`` (``tl``: every device, and the CPU interpreter in CI) and, on
Hopper for DeepSeek's shapes with more than 16 query rows, ``kernels_mla_gluon`` (Gluon: TMA
tiles, asynchronous wgmma ordered by hand; ``MLAConfig.kernel``). Both write the same partial
outputs for the same combine kernel; the heuristic picks (``mla_config``), a cache whose
strides a TMA descriptor cannot describe falls back to ``tl``.

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
    kernel: str = "tl"  # "tl": kernels_mla (every device, the interpreter); "gluon": Hopper


@functools.lru_cache(maxsize=8)
def _num_sms(device: int) -> int:
    if device < 0 or not torch.cuda.is_available():
        return 132  # H200; only the split count depends on it
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=8)
def _hopper(device: int) -> bool:
    """sm_90 (the Gluon kernel's TMA and wgmma), never under Triton's CPU interpreter."""
    if device < 0 or interpreter_enabled() or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) == (9, 0)


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
               dtype_bytes: int = 2, num_sms: int = 132, hopper: bool = False) -> MLAConfig:
    """Launch config from shapes only (CUDA-graph safe). ``rows = s_q * h_q`` query rows per
    batch row, ``capacity = max_blocks * block_size`` (the longest row the table allows),
    ``hopper``: the device is sm_90 (the Gluon kernel's TMA and wgmma).

    Heuristic (for an H200, 227 KB shared memory per block): the KV tile ``[BLOCK_N, d]`` is
    shared by ``BLOCK_H`` query rows; q stays in shared memory, the tile is double-buffered.
    On Hopper, every shape with more than 16 rows whose MMA tiles the Gluon kernel has
    (``gluon_shapes``) runs it: 64 rows, 64 positions, two slots, 8 warps (2026-12-01, H200:
    1.14x to 1.19x the ``tl`` kernel at h_q 16 s_q 2, 1.37x to 1.49x at h_q 128; at h_q 16
    s_q 1 it lost, 226.6 against 184.5 us, its 64-row MMAs padding 16 rows). Otherwise the
    ``tl`` kernel: memory-bound shapes (rows <= 32) take all rows in one program with
    64-position tiles (one page); compute-bound ones 64 rows (fp32 acc 64 x 512 over 8 warps =
    128 regs/thread).
    Splits: enough programs for about 8 waves (``tl``, memory-bound: balances varying
    lengths) or 4 (compute-bound, and the Gluon kernel, whose programs stage 72 KB of q
    first: fewer partial outputs; the measured best), at least 256 positions per split, a
    power of two (combine is specialized on it). ``MLA_CONFIGS`` entries (swept) of the
    chosen kernel replace the heuristic.
    """
    gluon = hopper and rows > 16 and gluon_shapes(d, dv, page, dtype_bytes) is None
    key = (dtype_bytes, pow2(rows), pow2(max(capacity, 1)), pow2(batch))
    hit = MLA_CONFIGS.get(key)
    if hit is not None and (MLAConfig(*hit).kernel == "gluon") == gluon:
        block_h, block_n, warps, stages, splits, kernel = MLAConfig(*hit)
    else:
        kernel = "gluon" if gluon else "tl"
        # H200 sweep (2026-11-30, B=128, 8k varlen; docs/performance.md): 4 warps for the
        # memory-bound shapes, 64-position tiles everywhere, about 8 waves of splits when
        # memory-bound (16 splits at B=128) and 4 when compute-bound
        if gluon or rows > 32:
            block_h, block_n, warps, stages = 64, 64, 8, 2
        elif rows <= 16:
            block_h, block_n, warps, stages = 16, 64, 4, 2
        else:
            block_h, block_n, warps, stages = 32, 64, 4, 2
        if dtype_bytes == 4:  # fp32 tiles are twice the size
            block_n, stages = min(block_n, 32), 1
        heads = -(-rows // block_h)
        waves = 8 if rows <= 32 and not gluon else 4
        want = -(-waves * num_sms // max(batch * heads, 1))
        most = max(1, capacity // 256)
        splits = pow2(max(1, min(want, most)))
        if splits > most:
            splits //= 2
    block_n = max(16, min(block_n, pow2(page)))
    return MLAConfig(block_h, block_n, warps, stages, max(1, splits), kernel)


def gluon_shapes(d: int, dv: int, page: int, dtype_bytes: int) -> str | None:
    """Why the Gluon kernel's fixed MMA tiles do not fit these shapes; None if they do:
    DeepSeek's ``head_dim_v`` 512 and ``d - head_dim_v`` 64, 16-bit dtypes, a page size that
    64-position tiles divide."""
    if (dv, d - dv) != (512, 64):
        return f"(head_dim_v, d - head_dim_v) is {(dv, d - dv)}; it needs (512, 64)"
    if dtype_bytes != 2:
        return f"the dtype has {dtype_bytes} bytes; it needs bfloat16 or float16"
    if page % 64:
        return f"the page size is {page}; it needs a multiple of 64"
    return None


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
    configuration (for sweeps; an ``MLAConfig`` or a plain tuple of its five or six fields);
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
    chosen = config is None
    if config is None:
        config = mla_config(b, rows, capacity, page, d, dv, q.element_size(), _num_sms(dev),
                            _hopper(dev))
    if not isinstance(config, MLAConfig):  # a plain 5-tuple
        config = MLAConfig(*config)
    block_h, block_n, warps, stages, splits, kernel = config
    if kernel == "gluon":
        why = gluon_unsupported(q, kv_cache, dv, block_n)
        if why is not None and not chosen:
            raise ValueError(f"flash_mla: config {config} asks for the Gluon kernel: {why}")
        if why is not None:  # the heuristic's choice, but these strides cannot take it
            config = mla_config(b, rows, capacity, page, d, dv, q.element_size(),
                                _num_sms(dev))
            block_h, block_n, warps, stages, splits, kernel = config
        else:
            block_h, warps = 64, 8
    elif kernel != "tl":
        raise ValueError(f"flash_mla: config.kernel is {kernel!r}; expected 'tl' or 'gluon'")
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
    if kernel == "gluon":
        _launch_gluon((heads, splits, b), q, kv_cache, block_table, cache_seqlens, o_buf, l_buf,
                      scale_log2, ints, dv, d - dv, page, block_n, stages, direct)
    else:
        _launch_tl((heads, splits, b), dev, q, kv_cache, block_table, cache_seqlens, o_buf,
                   l_buf, scale_log2, ints, warps, stages,
                   (d, dv, block_dv, block_dr, page, block_h, block_n, tile_in_page, direct,
                    prec, dot_f32))
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


def _launch_tl(grid, dev, q, kv_cache, block_table, cache_seqlens, o_buf, l_buf, scale_log2,
               ints, warps, stages, consts) -> None:
    tensors = (q, kv_cache, block_table, cache_seqlens, o_buf, l_buf)
    key = ("split", q.dtype, *(t.data_ptr() & 15 for t in tensors), ints, consts, warps,
           stages, dev)
    SPLIT_KERNEL.launch(key, grid, dev, tensors, tuple(t.data_ptr() for t in tensors),
                        (scale_log2, *ints, *consts), warps, stages)


def gluon_unsupported(q: torch.Tensor, kv_cache: torch.Tensor, dv: int,
                      block_n: int) -> str | None:
    """Why the Gluon kernel (:mod:`.kernels_mla_gluon`) cannot run these inputs; None if it
    can: an sm_90 GPU (TMA, wgmma), ``gluon_shapes``, ``block_n`` 16, 32 or 64 dividing the
    page, and pages back to back in memory with 16-byte aligned rows (what a TMA descriptor
    over ``[num_blocks * page, d]`` needs)."""
    if interpreter_enabled() or q.device.type != "cuda":
        return f"it runs on CUDA devices only (no CPU interpreter for Gluon); q is on {q.device}"
    if not _hopper(q.get_device()):  # cached: this runs on every call
        cap = torch.cuda.get_device_capability(q.device)
        return f"it needs sm_90 (Hopper); the device is sm_{cap[0]}{cap[1]}"
    page = kv_cache.shape[1]
    why = gluon_shapes(kv_cache.shape[-1], dv, page, q.element_size())
    if why is not None:
        return why
    if block_n not in (16, 32, 64) or page % block_n:
        return f"block_n is {block_n}; it needs 16, 32 or 64, dividing the page size {page}"
    if kv_cache.stride(0) != page * kv_cache.stride(1) or kv_cache.stride(1) % 8 \
            or kv_cache.data_ptr() % 16:
        return (f"kv_cache has strides {kv_cache.stride()} at {kv_cache.data_ptr():#x}; it "
                "needs pages back to back and 16-byte aligned rows")
    return None


def gluon_descriptors(kv_cache: torch.Tensor, dv: int, block_n: int) -> list[Any]:
    """The Gluon kernel's two TMA descriptors over the cache viewed as ``[num_blocks * page,
    d]``: the latent channels ``[:, :dv]`` and the rope channels ``[:, dv:]``, in tiles of
    ``block_n`` positions (what ``gluon_unsupported`` checks makes the view valid)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    gdt = gl.bfloat16 if kv_cache.dtype == torch.bfloat16 else gl.float16
    d = kv_cache.shape[-1]
    n = kv_cache.shape[0] * kv_cache.shape[1]
    flat = kv_cache.as_strided((n, d), (kv_cache.stride(1), 1))
    return [TensorDescriptor(flat[:, lo:], [n, width], [flat.stride(0), 1], [block_n, width],
                             gl.NVMMASharedLayout.get_default_for([block_n, width], gdt))
            for lo, width in ((0, dv), (dv, d - dv))]


def _launch_gluon(grid, q, kv_cache, block_table, cache_seqlens, o_buf, l_buf, scale_log2,
                  ints, dv, dr, page, block_n, stages, direct) -> None:
    from .kernels_mla_gluon import mla_gluon_kernel

    kvn, kvr = gluon_descriptors(kv_cache, dv, block_n)
    (rows, h_q, s_q, capacity, causal, splits, sqb, sqs, sqh, _skp, _skt, sbt,
     sob, sosp, som, slb, slsp, slh, sls) = ints
    mla_gluon_kernel[grid](
        q, kvn, kvr, block_table, cache_seqlens, o_buf, l_buf,
        scale_log2, rows, h_q, s_q, capacity, causal, splits, sqb, sqs, sqh, sbt,
        sob, sosp, som, slb, slsp, slh, sls,
        DV=dv, DR=dr, PAGE=page, BLOCK_H=64, BLOCK_N=block_n, STAGES=stages, DIRECT=direct,
        num_warps=8)


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
