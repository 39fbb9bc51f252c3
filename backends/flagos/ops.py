"""The ``default.flagos`` impls: the ops' contracts on top of our Triton kernels.

Each adapter works on the caller's tensors through their strides (in-place ops update strided
views directly), allocates only the result the contract returns, and builds the launcher key
(see :mod:`.launcher`) from exactly what the kernel specializes on. Layouts the kernels cannot
address (a last dimension that is not contiguous, leading dimensions that do not collapse)
go through a contiguous copy and are written back, so the contract still holds.
"""

from __future__ import annotations

import torch

from .launcher import TritonKernel

_PKG = __package__ or "fl_dispatch_flagos"
ACT_KERNEL = TritonKernel(f"{_PKG}.kernels_activation", "act_and_mul_kernel")
NORM_KERNEL = TritonKernel(f"{_PKG}.kernels_norm", "rms_norm_kernel",
                           do_not_specialize=("n_rows",))
ROTARY_KERNEL = TritonKernel(f"{_PKG}.kernels_rotary", "rotary_kernel")
KERNELS = (ACT_KERNEL, NORM_KERNEL, ROTARY_KERNEL)

_GELU_CODES = {"none": 1, "tanh": 2}
_INT32_MAX = 2**31 - 1


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


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

def act_config(rows: int, d: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for act_and_mul: enough programs to fill the GPU at small rows."""
    if rows >= 64:
        block = 1024
    elif rows >= 8:
        block = 512
    else:
        block = 256
    block = min(block, _pow2(d))
    return block, max(1, min(8, block // 256))


def norm_config(rows: int, n_cols: int) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_N, SINGLE_PASS, num_warps) for rms_norm."""
    block_n = _pow2(n_cols)
    if block_n > 8192:
        return 1, 4096, False, 8
    block_m = max(1, min(16, 1024 // block_n, _pow2(rows)))
    return block_m, block_n, True, max(1, min(16, block_m * block_n // 512))


def rotary_config(tokens: int, heads: int, half: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_H, num_warps) for rotary: one head per program at decode sizes."""
    block_r = _pow2(half)
    block_h = 1 if tokens <= 32 else min(_pow2(heads), 4)
    return block_r, block_h, max(1, min(4, block_h * block_r // 128))


# ----------------------------------------------------------------------------- activations

def _act_and_mul(x: torch.Tensor, out: torch.Tensor | None, act: int) -> torch.Tensor:
    n = x.shape[-1]
    if n % 2:
        raise ValueError(f"act_and_mul: last dimension of x must be even, got {n}")
    d = n // 2
    if out is None:
        out = torch.empty(x.shape[:-1] + (d,), dtype=x.dtype, device=x.device)
    x2 = x if x.dim() == 2 and x.stride(1) == 1 else _rows(x)
    if x2 is None:
        x2 = x.reshape(-1, n).contiguous()
    rows = x2.shape[0]
    o2 = out if out.dim() == 2 and out.stride(1) == 1 else _rows(out)
    target = o2 if o2 is not None else torch.empty((rows, d), dtype=out.dtype, device=out.device)
    if target.shape[0] != rows or target.shape[1] != d:
        raise ValueError(f"act_and_mul: out has shape {tuple(out.shape)}, "
                         f"expected {tuple(x.shape[:-1]) + (d,)}")
    if rows and d:
        block, warps = act_config(rows, d)
        sx, so = x2.stride(0), target.stride(0)
        key = (act, x2.dtype, target.dtype, x2.data_ptr() % 16 == 0,
               target.data_ptr() % 16 == 0, d, sx, so, block, warps, x2.get_device())
        ACT_KERNEL.launch(key, (rows, (d + block - 1) // block, 1), x2.get_device(),
                          (x2, target, d, sx, so, act, block), warps)
    if o2 is None:
        out.copy_(target.view(out.shape))
    return out


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:]; into ``out`` when given (then ``out`` is returned)."""
    return _act_and_mul(x, out, 0)


def gelu_and_mul(
    x: torch.Tensor, approximate: str = "none", out: torch.Tensor | None = None
) -> torch.Tensor:
    """gelu(x[..., :d], approximate) * x[..., d:] (approximate 'none' or 'tanh')."""
    code = _GELU_CODES.get(approximate)
    if code is None:
        raise ValueError(f"gelu_and_mul: approximate must be 'none' or 'tanh', "
                         f"got {approximate!r}")
    return _act_and_mul(x, out, code)


# ----------------------------------------------------------------------------- rms_norm

def _norm_launch(x2: torch.Tensor, res2: torch.Tensor | None, weight: torch.Tensor | None,
                 out2: torch.Tensor, epsilon: float) -> None:
    rows, n_cols = x2.shape
    if rows == 0 or n_cols == 0:
        return
    if rows > _INT32_MAX:
        raise ValueError(f"rms_norm: {rows} rows exceed int32")
    block_m, block_n, single, warps = norm_config(rows, n_cols)
    has_res = res2 is not None
    has_w = weight is not None
    r = res2 if has_res else x2
    w = weight if has_w else x2
    sx, sr, so = x2.stride(0), r.stride(0), out2.stride(0)
    dev = x2.get_device()
    key = (x2.dtype, r.dtype, w.dtype, out2.dtype, x2.data_ptr() % 16 == 0,
           r.data_ptr() % 16 == 0, w.data_ptr() % 16 == 0, out2.data_ptr() % 16 == 0,
           n_cols, sx, sr, so, has_res, has_w, block_m, block_n, single, warps, dev)
    NORM_KERNEL.launch(key, ((rows + block_m - 1) // block_m, 1, 1), dev,
                       (x2, r, w, out2, rows, n_cols, sx, sr, so, epsilon,
                        has_res, has_w, block_m, block_n, single), warps)


def _weight(weight: torch.Tensor | None, n_cols: int) -> torch.Tensor | None:
    if weight is None:
        return None
    if weight.dim() != 1 or weight.shape[0] != n_cols:
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, "
                         f"expected ({n_cols},)")
    return weight if weight.stride(0) == 1 else weight.contiguous()


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    epsilon: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMS norm; with ``residual`` the fused add + norm, in place on ``x`` and ``residual``."""
    n_cols = x.shape[-1]
    w = _weight(weight, n_cols)
    if residual is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        x2 = x if x.dim() == 2 and x.stride(1) == 1 else _rows(x)
        if x2 is None:
            x2 = x.reshape(-1, n_cols).contiguous()
        _norm_launch(x2, None, w, out.view(-1, n_cols) if out.dim() != 2 else out, epsilon)
        return out
    if residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual has shape {tuple(residual.shape)}, "
                         f"x has {tuple(x.shape)}")
    x2 = x if x.dim() == 2 and x.stride(1) == 1 else _rows(x)
    r2 = residual if residual.dim() == 2 and residual.stride(1) == 1 else _rows(residual)
    if x2 is not None and r2 is not None:
        _norm_launch(x2, r2, w, x2, epsilon)
        return x, residual
    xc = x.reshape(-1, n_cols).contiguous()  # a layout the kernel cannot address: copy,
    rc = residual.reshape(-1, n_cols).contiguous()  # compute, and write back in place
    _norm_launch(xc, rc, w, xc, epsilon)
    x.copy_(xc.view(x.shape))
    residual.copy_(rc.view(residual.shape))
    return x, residual


# ----------------------------------------------------------------------------- rotary

def _heads(t: torch.Tensor, tokens: int, head_size: int) -> tuple[int, int, int] | None:
    """(token stride, head stride, heads) of ``t`` seen as ``[tokens, heads, head_size]`` with
    unit feature stride, without a copy; None when that needs a copy."""
    if t.dim() == 2:
        if t.shape[0] == tokens and t.stride(1) == 1 and t.shape[1] % head_size == 0:
            return t.stride(0), head_size, t.shape[1] // head_size
    elif t.dim() == 3:
        if t.shape[0] == tokens and t.shape[2] == head_size and t.stride(2) == 1:
            return t.stride(0), t.stride(1), t.shape[1]
    try:
        v = t.view(tokens, -1, head_size)
    except RuntimeError:
        return None
    if v.stride(2) != 1 and head_size != 1:
        return None
    return v.stride(0), v.stride(1), v.shape[1]


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    """Rotary embedding in place on ``query`` and ``key`` (either may be a strided view)."""
    pos = positions if positions.dim() == 1 else positions.reshape(-1)
    if pos.stride(0) != 1 and pos.shape[0] > 1:
        pos = pos.contiguous()
    tokens = pos.shape[0]
    if tokens == 0:
        return None
    rotary_dim = cos_sin_cache.shape[-1]
    if rotary_dim % 2 or rotary_dim > head_size:
        raise ValueError(f"rotary_embedding: rotary_dim {rotary_dim} must be even and at "
                         f"most head_size {head_size}")
    cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    qh = _heads(query, tokens, head_size)
    kh = _heads(key, tokens, head_size) if key is not None else (0, 0, 0)
    if qh is None or kh is None:  # a layout the kernel cannot address: copy, rotate, write back
        qc = query.contiguous()
        kc = key.contiguous() if key is not None else None
        rotary_embedding(pos, qc, kc, head_size, cache, is_neox)
        query.copy_(qc)
        if key is not None:
            key.copy_(kc)
        return None
    half = rotary_dim // 2
    block_r, block_h, warps = rotary_config(tokens, max(qh[2], kh[2]), half)
    k = key if key is not None else query
    has_key = key is not None
    dev = query.get_device()
    args = (pos, query, k, cache, qh[0], qh[1], kh[0], kh[1], cache.stride(0), qh[2], kh[2],
            half, block_r, block_h, bool(is_neox), has_key)
    launch_key = (pos.dtype, query.dtype, k.dtype, cache.dtype, pos.data_ptr() % 16 == 0,
                  query.data_ptr() % 16 == 0, k.data_ptr() % 16 == 0,
                  cache.data_ptr() % 16 == 0) + args[4:] + (warps, dev)
    grid = (tokens, (max(qh[2], kh[2]) + block_h - 1) // block_h, 1)
    ROTARY_KERNEL.launch(launch_key, grid, dev, args, warps)
    return None
