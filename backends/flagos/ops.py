"""The ``default.flagos`` impls: the ops' contracts on top of our Triton kernels.

Each adapter works on the caller's tensors through their strides (in-place ops update strided
views directly), allocates only the result the contract returns, and builds the launcher key
(see :mod:`.launcher`) from exactly what the kernel specializes on. Layouts the kernels cannot
address (a last dimension that is not contiguous, leading dimensions that do not collapse)
go through a contiguous copy and are written back, so the contract still holds.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from fl_dispatch import ImplTable, bad_approximate, checked

from .capability import unavailable_reason
from .launcher import TritonKernel, pow2

impls = ImplTable(impl_id="default.flagos", kind="flagos", check=unavailable_reason)
"""Our Triton kernels, one impl per op (each decorated where it is defined)."""

_PKG = __package__ or "fl_dispatch_flagos"
ACT_KERNEL = TritonKernel(f"{_PKG}.kernels_activation", "act_and_mul_kernel")
NORM_KERNEL = TritonKernel(f"{_PKG}.kernels_norm", "rms_norm_kernel",
                           do_not_specialize=("n_rows",))
ROTARY_KERNEL = TritonKernel(f"{_PKG}.kernels_rotary", "rotary_kernel")
KERNELS = (ACT_KERNEL, NORM_KERNEL, ROTARY_KERNEL)

_GELU_CODES = {"none": 1, "tanh": 2}
_INT32_MAX = 2**31 - 1


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as ``[rows, t.shape[-1]]`` with unit last stride, without a copy, or None."""
    if t.dim() == 2:
        return t if t.stride(1) == 1 or t.shape[1] == 1 else None
    if t.dim() == 1:
        return t.view(1, -1) if t.stride(0) == 1 or t.shape[0] == 1 else None
    try:
        v = t.view(-1, t.shape[-1])
    except RuntimeError:
        return None
    return v if v.stride(1) == 1 or v.shape[1] == 1 else None


# ----------------------------------------------------------------------------- launch configs
# (tuned on an H100, bf16; see docs/performance.md). Each returns the constexprs + num_warps.

_MAX_GRID_Y = 65535
"""CUDA's limit on grid axis 1 (rows of act_and_mul): larger batches launch in chunks."""


TUNED: dict[str, dict[str, tuple[tuple[int, tuple[int, ...]], ...]]] = {
    'H200': {  # bench/kernels.py --sweep
        'gelu': (
            (1, (512, 4, 0, 3)),
            (5, (1024, 8, 0, 3)),
            (33, (2048, 8, 0, 3)),
            (129, (2048, 4, 0, 3)),
            (1025, (4096, 16, 2, 3)),
            (8193, (8192, 16, 0, 3)),
        ),
        'silu': (
            (1, (512, 4, 0, 0)),
            (5, (1024, 8, 0, 0)),
            (33, (1024, 8, 0, 0)),
            (129, (1024, 4, 0, 0)),
            (1025, (4096, 16, 2, 0)),
            (8193, (4096, 16, 2, 0)),
        ),
        'rms_norm': (
            (1, (1, 8, 0)),
            (5, (1, 8, 0)),
            (33, (1, 16, 0)),
            (129, (1, 8, 0)),
            (1025, (1, 4, 2)),
            (8193, (1, 4, 2)),  # 16384 rows: 66.71 vs 67.09 us of (1, 4, 0), same run
        ),
        'fused_add_rms_norm': (
            (1, (1, 16, 0)),
            (5, (1, 16, 0)),
            (33, (1, 16, 0)),
            (129, (1, 16, 0)),
            (1025, (1, 8, 2)),
            (8193, (1, 4, 0)),
        ),
    },
}
"""Per-device launch configs that replace the defaults below (which were tuned on an H100).

``{device: {kind: ((min_rows, config), ...)}}``: ``device`` is a substring of
``torch.cuda.get_device_name`` (first match wins, e.g. ``"H200"``); ``kind`` one of
``silu``, ``gelu``, ``gelu_tanh``, ``rms_norm``, ``fused_add_rms_norm``; the entries ascend in
``min_rows`` and the last one with ``min_rows <= rows`` applies (rows below the first entry keep
the default). Configs: activations ``(BLOCK, num_warps, STREAM, ACT)`` (``ACT`` picks the
kernel's form; for ``gelu`` 1 = libdevice erf, 3 = the fast erfc polynomial; silu 0, gelu_tanh
2); norms ``(BLOCK_M, num_warps, STREAM)``, applied only where a row fits one block of
``NORM_TUNED_WIDTH`` columns (wider or narrower rows keep the default). Block sizes and warps
are clamped to the row as the defaults are. ``bench/kernels.py --sweep`` prints a ready entry
(its ``TUNED[...]`` lines), measured next to vLLM's ops. A device without an entry (the H100
included) keeps the defaults; CPU tensors (the interpreter, device -1) always do."""

NORM_TUNED_WIDTH = 4096
"""The row width (power of two above the hidden size) the norm entries of TUNED were swept at
(Llama-3-8B: hidden 4096)."""

_ACT_KINDS = ("silu", "gelu", "gelu_tanh")
"""TUNED kind of each ``ACT`` code the ops pass in (0 silu, 1 gelu, 2 gelu tanh)."""


@functools.lru_cache(maxsize=64)
def _device_tuning(dev: int) -> dict[str, tuple[tuple[int, tuple[int, ...]], ...]]:
    """TUNED's entry for CUDA device ``dev`` (empty for CPU tensors and unlisted devices)."""
    if dev < 0 or not TUNED:
        return {}
    name = torch.cuda.get_device_name(dev)
    return next((table for key, table in TUNED.items() if key in name), {})


def _tuned(dev: int, kind: str, rows: int) -> tuple[int, ...] | None:
    cfg = None
    for min_rows, entry in _device_tuning(dev).get(kind, ()):
        if min_rows > rows:
            break
        cfg = entry
    return cfg


@functools.lru_cache(maxsize=4096)
def act_config(rows: int, d: int, act: int = 0, dev: int = -1) -> tuple[int, int, int, int]:
    """(BLOCK, num_warps, STREAM, ACT) for act_and_mul on device ``dev``; ACT is ``act``
    or, where TUNED says so, another form of the same activation (gelu: 3, the fast erfc
    polynomial). STREAM=2 (evict-first loads, streaming stores) only where the tensors cannot
    stay in L2 anyway: evicting L2-resident inputs (decode; the matmul before just wrote
    them) cost up to 40% in the H100 sweep."""
    tuned = _tuned(dev, _ACT_KINDS[act], rows) if act < len(_ACT_KINDS) else None
    if tuned is not None:
        block, warps, stream, act = tuned
    else:
        if rows < 16:
            block, warps = 512, 4
        elif rows < 64:
            block, warps = (1024, 8) if act == 0 else (512, 4)
        elif rows <= 256:
            block, warps = 1024, 4
        else:
            block, warps = (1024, 8) if act == 0 else (2048, 8)  # gelu: more work per program
        stream = 2 if rows * d >= 1 << 23 else 0
    block = min(block, pow2(d))
    return block, max(1, min(warps, block // 128)), stream, act


@functools.lru_cache(maxsize=4096)
def norm_config(rows: int, n_cols: int, residual: bool = False,
                dev: int = -1) -> tuple[int, int, bool, int, int]:
    """(BLOCK_M, BLOCK_N, SINGLE_PASS, num_warps, STREAM) for rms_norm (``residual``: the
    fused add + norm) on device ``dev``. STREAM as for act_and_mul (TUNED entries only)."""
    block_n = pow2(n_cols)
    if block_n > 8192:
        return 1, 4096, False, 8, 0
    tuned = (_tuned(dev, "fused_add_rms_norm" if residual else "rms_norm", rows)
             if block_n == NORM_TUNED_WIDTH else None)
    if tuned is not None:
        block_m, warps, stream = tuned
        block_m = max(1, min(block_m, pow2(rows)))
        return block_m, block_n, True, max(1, min(warps, block_m * block_n // 128)), stream
    block_m = max(1, min(16, 1024 // block_n, pow2(rows)))
    warps = 16 if rows <= 64 else 8 if rows < 1024 else 4  # decode: latency; prefill: occupancy
    return block_m, block_n, True, max(1, min(warps, block_m * block_n // 256)), 0


@functools.lru_cache(maxsize=4096)
def rotary_config(tokens: int, heads: int, half: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_H, num_warps) for rotary: few heads per program at decode sizes (more
    programs), all heads of a token at prefill sizes (fewer, longer programs)."""
    block_r = pow2(half)
    if tokens <= 16:
        block_h = 1
    elif tokens <= 64:
        block_h = 4
    elif tokens <= 1024:
        block_h = 8
    else:
        block_h = 32
    block_h = min(block_h, pow2(heads))
    return block_r, block_h, max(1, min(8, block_h * block_r // 128))


# ----------------------------------------------------------------------------- activations

def _act_launch(x2: torch.Tensor, out2: torch.Tensor, rows: int, d: int, sx: int, so: int,
                act: int) -> None:
    dev = x2.get_device()
    block, warps, stream, act = act_config(rows, d, act, dev)
    px, po = x2.data_ptr(), out2.data_ptr()
    key = (act, x2.dtype, out2.dtype, px & 15, po & 15, d, sx, so, block, warps, stream, dev)
    ACT_KERNEL.launch(key, ((d + block - 1) // block, rows, 1), dev, (x2, out2), (px, po),
                      (d, sx, so, act, block, stream), warps)


def _act_and_mul(x: torch.Tensor, out: torch.Tensor | None, act: int) -> torch.Tensor:
    shape = x.shape
    n = shape[-1]
    if n % 2:
        raise ValueError(f"act_and_mul: last dimension of x must be even, got {n}")
    d = n // 2
    if len(shape) == 2 and 0 < shape[0] <= _MAX_GRID_Y and d:  # the common case, few calls
        sx, sx1 = x.stride()
        if sx1 == 1:
            rows = shape[0]
            if out is None:
                out = x.new_empty((rows, d))
                _act_launch(x, out, rows, d, sx, d, act)
                return out
            so = out.stride()
            if len(so) == 2 and so[1] == 1 and out.shape == (rows, d):
                _act_launch(x, out, rows, d, sx, so[0], act)
                return out
    return _act_and_mul_any(x, out, act, d)


def _act_and_mul_any(x: torch.Tensor, out: torch.Tensor | None, act: int,
                     d: int) -> torch.Tensor:
    """Any layout: rows through views where possible, else contiguous copies."""
    n = 2 * d
    if out is None:
        out = torch.empty(x.shape[:-1] + (d,), dtype=x.dtype, device=x.device)
    x2 = _rows(x)
    if x2 is None:
        x2 = x.reshape(-1, n).contiguous()
    rows = x2.shape[0]
    o2 = _rows(out)
    target = o2 if o2 is not None else torch.empty((rows, d), dtype=out.dtype, device=out.device)
    if target.shape[0] != rows or target.shape[1] != d:
        raise ValueError(f"act_and_mul: out has shape {tuple(out.shape)}, "
                         f"expected {tuple(x.shape[:-1]) + (d,)}")
    if rows and d:
        for r0 in range(0, rows, _MAX_GRID_Y):
            xs, ts = x2[r0:r0 + _MAX_GRID_Y], target[r0:r0 + _MAX_GRID_Y]
            _act_launch(xs, ts, xs.shape[0], d, x2.stride(0), target.stride(0), act)
    if o2 is None:
        out.copy_(target.view(out.shape))
    return out


@impls.impl()
def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:]; into ``out`` when given (then ``out`` is returned)."""
    return _act_and_mul(x, out, 0)


@impls.impl()
def gelu_and_mul(
    x: torch.Tensor, approximate: str = "none", out: torch.Tensor | None = None
) -> torch.Tensor:
    """gelu(x[..., :d], approximate) * x[..., d:] (approximate 'none' or 'tanh')."""
    code = _GELU_CODES.get(approximate)
    if code is None:
        raise bad_approximate(approximate)
    return _act_and_mul(x, out, code)


# ----------------------------------------------------------------------------- rms_norm

def _norm_launch(x2: torch.Tensor, r: torch.Tensor, w: torch.Tensor, out2: torch.Tensor,
                 rows: int, n_cols: int, sx: int, sr: int, so: int, epsilon: float,
                 has_res: bool, has_w: bool) -> None:
    """``r``/``w`` stand in for ``x2`` when there is no residual/weight."""
    dev = x2.get_device()
    cfg = norm_config(rows, n_cols, has_res, dev)
    block_m, block_n, single, warps, stream = cfg
    px, pr, pw, po = x2.data_ptr(), r.data_ptr(), w.data_ptr(), out2.data_ptr()
    key = (x2.dtype, r.dtype, w.dtype, out2.dtype, px & 15, pr & 15, pw & 15, po & 15, n_cols,
           sx, sr, so, has_res, has_w, cfg, dev)
    NORM_KERNEL.launch(key, ((rows + block_m - 1) // block_m, 1, 1), dev, (x2, r, w, out2),
                       (px, pr, pw, po), (rows, n_cols, sx, sr, so, epsilon, has_res, has_w,
                                          block_m, block_n, single, stream), warps)


def _weight(weight: torch.Tensor, n_cols: int) -> torch.Tensor:
    if weight.shape != (n_cols,):
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, "
                         f"expected ({n_cols},)")
    return weight if weight.stride() == (1,) else weight.contiguous()


@impls.impl()
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    epsilon: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMS norm; with ``residual`` the fused add + norm, in place on ``x`` and ``residual``.

    The common case (2-D rows with unit column stride, a contiguous weight or none) is written
    out inline with its own launcher keys and calls the cached launcher directly: per eager call
    this path is host-time bound (see docs/performance.md, "Host time")."""
    shape = x.shape
    if len(shape) == 2:
        rows, n_cols = shape
        sx, sx1 = x.stride()
        if weight is None:
            w, has_w = x, False
        elif weight.stride() == (1,) and weight.numel() == n_cols:
            w, has_w = weight, True
        else:
            w = None
        if sx1 == 1 and w is not None and 0 < rows <= _INT32_MAX and n_cols:
            dev = x.get_device()
            block_m, block_n, single, warps, stream = norm_config(rows, n_cols,
                                                                  residual is not None, dev)
            px, pw = x.data_ptr(), w.data_ptr()
            kernel = NORM_KERNEL
            if residual is None:
                # empty_like keeps a dense x's strides: only a contiguous x (or one row) has
                # them equal to a fresh row-major tensor's, and it is the cheaper allocation
                out = torch.empty_like(x) if sx == n_cols or rows == 1 else x.new_empty(shape)
                po = out.data_ptr()
                key = ("norm", x.dtype, w.dtype, px & 15, pw & 15, po & 15, n_cols, sx, has_w,
                       block_m, warps, stream, dev)
                args = (px, px, pw, po, rows, n_cols, sx, sx, n_cols, epsilon, False, has_w,
                        block_m, block_n, single, stream)
                fast = kernel.cached(key)
                if fast is not None:
                    fast[0]((rows + block_m - 1) // block_m, 1, 1, fast[1](dev), *fast[2],
                            *args)
                else:
                    kernel.launch(key, ((rows + block_m - 1) // block_m, 1, 1), dev,
                                  (x, x, w, out), args[:4], args[4:], warps)
                return out
            if residual.shape == shape:
                sr, sr1 = residual.stride()
                if sr1 == 1:
                    pr = residual.data_ptr()
                    key = ("add_norm", x.dtype, residual.dtype, w.dtype, px & 15, pr & 15,
                           pw & 15, n_cols, sx, sr, has_w, block_m, warps, stream, dev)
                    args = (px, pr, pw, px, rows, n_cols, sx, sr, sx, epsilon, True, has_w,
                            block_m, block_n, single, stream)
                    fast = kernel.cached(key)
                    if fast is not None:
                        fast[0]((rows + block_m - 1) // block_m, 1, 1, fast[1](dev), *fast[2],
                                *args)
                    else:
                        kernel.launch(key, ((rows + block_m - 1) // block_m, 1, 1), dev,
                                      (x, residual, w, x), args[:4], args[4:], warps)
                    return x, residual
    return _rms_norm_any(x, weight, epsilon, residual)


def _rms_norm_any(x: torch.Tensor, weight: torch.Tensor | None, epsilon: float,
                  residual: torch.Tensor | None) -> Any:
    """Any layout: rows through views where possible, else contiguous copies written back."""
    n_cols = x.shape[-1]
    if weight is not None:
        weight = _weight(weight, n_cols)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual has shape {tuple(residual.shape)}, "
                         f"x has {tuple(x.shape)}")
    x2 = _rows(x)
    copied = x2 is None
    if copied:
        x2 = x.reshape(-1, n_cols).contiguous()
    rows = x2.shape[0]
    if rows > _INT32_MAX:
        raise ValueError(f"rms_norm: {rows} rows exceed int32")
    has_w = weight is not None
    if residual is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if rows and n_cols:
            out2 = out.view(rows, n_cols)
            _norm_launch(x2, x2, weight if has_w else x2, out2, rows, n_cols, x2.stride(0),
                         x2.stride(0), n_cols, epsilon, False, has_w)
        return out
    r2 = _rows(residual)
    if copied or r2 is None:  # not addressable in place: compute on copies, write back
        xc = x.reshape(-1, n_cols).contiguous()
        rc = residual.reshape(-1, n_cols).contiguous()
        if rows and n_cols:
            _norm_launch(xc, rc, weight if has_w else xc, xc, rows, n_cols, n_cols, n_cols,
                         n_cols, epsilon, True, has_w)
        x.copy_(xc.view(x.shape))
        residual.copy_(rc.view(residual.shape))
        return x, residual
    if rows and n_cols:
        _norm_launch(x2, r2, weight if has_w else x2, x2, rows, n_cols, x2.stride(0),
                     r2.stride(0), x2.stride(0), epsilon, True, has_w)
    return x, residual


# ----------------------------------------------------------------------------- rotary

def _heads(t: torch.Tensor, tokens: int, head_size: int) -> tuple[int, int, int] | None:
    """(token stride, head stride, heads) of ``t`` seen as ``[tokens, heads, head_size]`` with
    unit feature stride, without a copy; None when that needs a copy."""
    shape = t.shape
    st = t.stride()
    if len(shape) == 2:
        if shape[0] == tokens and st[1] == 1 and shape[1] % head_size == 0:
            return st[0], head_size, shape[1] // head_size
    elif len(shape) == 3:
        if shape[0] == tokens and shape[2] == head_size and st[2] == 1:
            return st[0], st[1], shape[1]
    try:
        v = t.view(tokens, -1, head_size)
    except RuntimeError:
        return None
    if v.stride(2) != 1 and head_size != 1:
        return None
    return v.stride(0), v.stride(1), v.shape[1]


@impls.impl()
def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    """Rotary embedding in place on ``query`` and ``key`` (either may be a strided view)."""
    _rotary(positions, query, key, head_size, cos_sin_cache, is_neox, query, key)


@impls.impl()
@checked
def rotary_embedding_out(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    query_out: torch.Tensor,
    key_out: torch.Tensor | None,
) -> None:
    """Rotary embedding of ``query``/``key`` into ``query_out``/``key_out``: the same kernel
    in one pass (rotated part and the features after it)."""
    _rotary(positions, query, key, head_size, cos_sin_cache, is_neox, query_out, key_out)


def _rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
            head_size: int, cos_sin_cache: torch.Tensor, is_neox: bool,
            query_out: torch.Tensor, key_out: torch.Tensor | None) -> None:
    """Rotate ``query``/``key`` into ``query_out``/``key_out`` (the same tensors: in place)."""
    pos = positions if len(positions.shape) == 1 else positions.reshape(-1)
    tokens = pos.shape[0]
    if tokens == 0:
        return None
    if tokens > 1 and pos.stride() != (1,):
        pos = pos.contiguous()
    rotary_dim = cos_sin_cache.shape[-1]
    if rotary_dim % 2 or rotary_dim > head_size:
        raise ValueError(f"rotary_embedding: rotary_dim {rotary_dim} must be even and at "
                         f"most head_size {head_size}")
    cache_stride = cos_sin_cache.stride()
    cache = cos_sin_cache
    if cache_stride[-1] != 1:
        cache = cos_sin_cache.contiguous()
        cache_stride = cache.stride()
    in_place = query_out is query
    qh = _heads(query, tokens, head_size)
    kh = _heads(key, tokens, head_size) if key is not None else (0, 0, 0)
    qoh = qh if in_place else _heads(query_out, tokens, head_size)
    koh = kh if in_place or key_out is None else _heads(key_out, tokens, head_size)
    if qh is None or kh is None or qoh is None or koh is None:
        # a layout the kernel cannot address: rotate contiguous copies, then write them out
        qc = query.contiguous()
        kc = key.contiguous() if key is not None else None
        rotary_embedding(pos, qc, kc, head_size, cache, is_neox)
        query_out.copy_(qc)
        if key_out is not None:
            key_out.copy_(kc)
        return None
    half = rotary_dim // 2
    heads = qh[2] if qh[2] >= kh[2] else kh[2]
    block_r, block_h, warps = rotary_config(tokens, heads, half)
    has_key = key is not None
    k = key if has_key else query
    ko = key_out if has_key else query_out
    rest = 0 if in_place else head_size - rotary_dim
    dev = query.get_device()
    pp, pq, pk, pc = pos.data_ptr(), query.data_ptr(), k.data_ptr(), cache.data_ptr()
    pqo, pko = query_out.data_ptr(), ko.data_ptr()
    args = (qh[0], qh[1], kh[0], kh[1], cache_stride[0], qoh[0], qoh[1], koh[0], koh[1],
            qh[2], kh[2], half, block_r, block_h, bool(is_neox), has_key, rest,
            pow2(rest) if rest else 1)
    launch_key = (pos.dtype, query.dtype, k.dtype, cache.dtype, pp & 15, pq & 15, pk & 15,
                  pc & 15, pqo & 15, pko & 15, args, warps, dev)
    ROTARY_KERNEL.launch(launch_key, (tokens, (heads + block_h - 1) // block_h, 1), dev,
                         (pos, query, k, cache, query_out, ko), (pp, pq, pk, pc, pqo, pko),
                         args, warps)
    return None
