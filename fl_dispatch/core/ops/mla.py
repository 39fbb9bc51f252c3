"""MLA decode attention (``flash_mla``) over a paged latent KV cache; the op is its fp32
PyTorch reference.

Contract (the one FlashMLA's ``flash_mla_with_kvcache`` implements for dense decode)::

    flash_mla(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                        causal=True) -> (out, lse)

- ``q`` ``[B, s_q, h_q, d]``; ``kv_cache`` ``[num_blocks, block_size, 1, d]`` (one latent KV
  head: keys are all ``d`` channels, values the first ``head_dim_v``); ``block_table`` int
  ``[B, max_blocks]`` (cache position ``t`` of row ``b`` lives in block
  ``block_table[b, t // block_size]``, slot ``t % block_size``); ``cache_seqlens`` int ``[B]``.
- Query position ``i`` (``0 <= i < s_q``) of row ``b`` attends to cache positions
  ``[0, seqlen_b - s_q + i]`` when ``causal`` (the query block is the last ``s_q`` tokens of
  the row: FlashMLA's ``tril(diagonal=s_k - s_q)``), to all ``seqlen_b`` positions otherwise.
  Lengths are clamped to ``max_blocks * block_size`` (what the table can address).
- Scores ``softmax_scale * (q . k)`` in fp32; ``lse = logsumexp`` over the visible positions
  (natural log, fp32, ``[B, h_q, s_q]``); ``out = softmax @ v`` computed in fp32 and returned
  in ``q``'s dtype, ``[B, s_q, h_q, head_dim_v]``.
- A query that sees no position (zero-length row, or a causal position before the cache
  starts) gets ``out = 0`` and ``lse = +inf`` (FlashMLA ``tests/ref.py``: "lonely" queries).

Slots past a row's length are never used, whatever they hold (NaN included).
Graph-safe: no host synchronisation; the gather is batched over ``max_blocks * block_size``
positions and masked, so memory is ``B * max_blocks * block_size * d`` fp32: for tests and
correctness checks, not for speed.
"""

from __future__ import annotations

from typing import Any

import torch

from ..opspec import define_op

_MLA_TOL = {
    "fp32": (2e-5, 1e-5, "fp32: softmax and P@V summed in another order"),
    "fp16": (8e-4, 2.01 / 1024, "FlashMLA's test tolerance (out abs 8e-4), rel scaled to fp16"),
    "bf16": (8e-4, 2.01 / 128, "FlashMLA's test tolerance: out abs 8e-4, rel 2.01/128"),
}



def _bad(name: str, value: Any, valid: str) -> ValueError:
    return ValueError(f"flash_mla: {name} is {value}; {valid}")


def _check_mla(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
               causal=True) -> None:
    """The op's ``check_args``: the argument errors every flash_mla impl raises alike, each
    naming the argument, its bad value and what is valid (shapes and dtypes only)."""
    if q.dim() != 4:
        raise _bad("q.shape", tuple(q.shape), "expected 4 dims [B, s_q, h_q, d]")
    if kv_cache.dim() != 4:
        raise _bad("kv_cache.shape", tuple(kv_cache.shape),
                   "expected 4 dims [num_blocks, block_size, h_kv, d]")
    b, d = q.shape[0], q.shape[3]
    if kv_cache.dtype != q.dtype:
        raise _bad("kv_cache.dtype", kv_cache.dtype, f"expected q's dtype {q.dtype}")
    if kv_cache.shape[-1] != d:
        raise _bad("kv_cache.shape[-1]", kv_cache.shape[-1], f"expected q's head dim d={d}")
    if kv_cache.shape[2] != 1:
        raise _bad("kv_cache.shape[2] (h_kv)", kv_cache.shape[2],
                   "MLA has one latent KV head: expected 1")
    if not 0 < head_dim_v <= d:
        raise _bad("head_dim_v", head_dim_v, f"expected an int in [1, d={d}]")
    if cache_seqlens.dtype != torch.int32:
        raise _bad("cache_seqlens.dtype", cache_seqlens.dtype, "expected torch.int32")
    if tuple(cache_seqlens.shape) != (b,):
        raise _bad("cache_seqlens.shape", tuple(cache_seqlens.shape), f"expected ({b},)")
    if block_table.dtype != torch.int32:
        raise _bad("block_table.dtype", block_table.dtype, "expected torch.int32")
    if block_table.dim() != 2 or block_table.shape[0] != b:
        raise _bad("block_table.shape", tuple(block_table.shape), f"expected ({b}, max_blocks)")
    if block_table.shape[1] < 1 and b:
        raise _bad("block_table.shape[1]", 0, "expected >= 1 column")


@define_op(layer="mla_attention", tolerances=_MLA_TOL, check_args=_check_mla)
def flash_mla(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    softmax_scale: float,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA decode attention over a paged latent cache: ``(out [B, s_q, h_q, head_dim_v] in
    q's dtype, lse [B, h_q, s_q] fp32)``; the contract is the module's docstring."""
    _check_mla(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
    b, s_q, _, d = q.shape
    num_blocks, block_size, h_kv, d_k = kv_cache.shape
    max_blocks = block_table.shape[1]
    n = max_blocks * block_size
    # [B, max_blocks, block_size, d] -> [B, n, d]; ids outside the cache are masked anyway
    ids = block_table.long().clamp(0, max(num_blocks - 1, 0))
    kv = kv_cache[:, :, 0, :][ids].reshape(b, n, d).float()
    pos = torch.arange(n, device=q.device)
    seqlens = cache_seqlens.long().clamp(0, n)
    # slots past a row's length may hold anything (NaN included): never let them in
    kv = kv.masked_fill((pos.view(1, n) >= seqlens.view(b, 1)).unsqueeze(-1), 0.0)
    scores = torch.einsum("bshd,bnd->bshn", q.float(), kv) * softmax_scale
    limit = seqlens.view(b, 1).expand(b, s_q)  # visible positions per query: [B, s_q]
    if causal:
        limit = limit - s_q + 1 + torch.arange(s_q, device=q.device).view(1, s_q)
    visible = pos.view(1, 1, n) < limit.unsqueeze(-1)  # [B, s_q, n]
    scores = scores.masked_fill(~visible.unsqueeze(2), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, s_q, h_q]; -inf where nothing is visible
    lonely = lse == float("-inf")
    probs = torch.exp(scores - lse.masked_fill(lonely, 0.0).unsqueeze(-1))
    probs = probs.masked_fill(lonely.unsqueeze(-1), 0.0)
    out = torch.einsum("bshn,bnv->bshv", probs, kv[..., :head_dim_v])
    lse = lse.masked_fill(lonely, float("inf"))
    return out.to(q.dtype), lse.transpose(1, 2).contiguous()


flash_mla_reference = flash_mla.fn


@flash_mla.cases
def _cases(dtype: str, size: str) -> list:
    from fl_dispatch.testing.inputs_moe import mla_cases

    return mla_cases(dtype, size)


@flash_mla.bench
def _bench(tokens: int, dims, dtype: str) -> list:
    """``tokens`` decode rows (the batch), one query token each, cache ~``dims.kv_len``."""
    from fl_dispatch.testing.inputs_moe import mla_case

    return [mla_case(tokens, 1, dims.mla_heads, dims.kv_len, dtype, zero_row=False)]
