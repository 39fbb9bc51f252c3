"""Rotary position embedding (vLLM's RotaryEmbedding and its cache-only variants): in place,
and out of place for compiled graphs."""

from __future__ import annotations

import torch
from torch import Tensor

from ..opspec import define_op


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, is_neox: bool) -> Tensor:
    """Rotate ``x`` [tokens, heads, rotary_dim] (the layout of vLLM's ApplyRotaryEmb)."""
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    if is_neox:
        x1, x2 = torch.chunk(x, 2, dim=-1)
    else:
        x1, x2 = x[..., ::2], x[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox:
        return torch.cat((o1, o2), dim=-1)
    return torch.stack((o1, o2), dim=-1).flatten(-2)


@define_op(mutates=("query", "key"), layer="rotary_embedding")
def rotary_embedding(
    positions: Tensor,
    query: Tensor,
    key: Tensor | None,
    head_size: int,
    cos_sin_cache: Tensor,
    is_neox: bool,
) -> None:
    """Rotary position embedding **in place**, as ``vllm._custom_ops.rotary_embedding``.

    ``query``/``key``: ``[num_tokens, num_heads * head_size]`` or
    ``[num_tokens, num_heads, head_size]`` (rows may be strided); ``key`` may be None.
    ``cos_sin_cache``: ``[max_position, rotary_dim]``, cos in the first half, sin in the second;
    only the first ``rotary_dim`` features of each head rotate (partial rotary). ``is_neox``:
    rotate halves (neox) or interleaved pairs (GPT-J). Arithmetic in the query's dtype."""
    positions = positions.flatten()
    num_tokens = positions.shape[0]
    rotary_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    for t in (query, key):
        if t is None:
            continue
        heads = t.view(num_tokens, -1, head_size)
        rot = heads[..., :rotary_dim]
        rot.copy_(_rotate(rot, cos, sin, is_neox))


def _check_out_args(positions: Tensor, query: Tensor, key: Tensor | None, head_size: int,
                    cos_sin_cache: Tensor, is_neox: bool, query_out: Tensor,
                    key_out: Tensor | None) -> None:
    if (key is None) != (key_out is None):
        raise ValueError(f"rotary_embedding_out: key and key_out must both be given or both be "
                         f"None, got key={_desc(key)} and key_out={_desc(key_out)}")
    for name, out, src in (("query_out", query_out, query), ("key_out", key_out, key)):
        if out is None or src is None:
            continue
        if out.shape != src.shape or out.dtype != src.dtype:
            source = name[:-len("_out")]
            raise ValueError(f"rotary_embedding_out: {name} must have {source}'s shape and "
                             f"dtype {tuple(src.shape)} {src.dtype}, got {_desc(out)}")


def _desc(t: Tensor | None) -> str:
    return "None" if t is None else f"{tuple(t.shape)} {t.dtype}"


@define_op(mutates=("query_out", "key_out"), layer="rotary_embedding",
           check_args=_check_out_args)
def rotary_embedding_out(
    positions: Tensor,
    query: Tensor,
    key: Tensor | None,
    head_size: int,
    cos_sin_cache: Tensor,
    is_neox: bool,
    query_out: Tensor,
    key_out: Tensor | None,
) -> None:
    """:func:`rotary_embedding` **out of place**: ``query_out`` and ``key_out`` receive what
    ``rotary_embedding`` would leave in ``query`` and ``key`` (every feature: those past
    ``rotary_dim`` copied), bit for bit; ``query`` and ``key`` are only read.

    ``query_out``/``key_out``: ``query``'s/``key``'s shape and dtype, rows possibly strided;
    ``key_out`` is None exactly when ``key`` is. Arguments otherwise as ``rotary_embedding``.

    The form vLLM's compiled graphs call (:mod:`fl_dispatch.vllm_glue.layers`): there q and k
    are views of the qkv projection, and Inductor (auto_functionalized v1) copies the whole
    of each view before an op that writes it in place; fresh outputs need no copy. A backend
    that implements only ``rotary_embedding`` is still served: the glue then rotates copies
    with it."""
    _check_out_args(positions, query, key, head_size, cos_sin_cache, is_neox, query_out,
                    key_out)
    query_out.copy_(query)
    if key is not None and key_out is not None:
        key_out.copy_(key)
    rotary_embedding.fn(positions, query_out, key_out, head_size, cos_sin_cache, is_neox)


@rotary_embedding.cases
def _cases(dtype: str, size: str) -> list:
    from fl_dispatch.testing.inputs import rope_cases

    return rope_cases(dtype, size)


@rotary_embedding.bench
def _bench(tokens: int, dims, dtype: str) -> list:
    from fl_dispatch.testing.inputs import rope_case

    # quarter turns: replaying the in-place rotation thousands of times stays exact
    return [rope_case(tokens, dims.heads, dims.kv_heads, dims.head_size, dims.head_size, dtype,
                      is_neox=True, cache_dtype="same", max_position=max(4096, tokens),
                      angles="quarter")]


@rotary_embedding_out.cases
def _out_cases(dtype: str, size: str) -> list:
    from fl_dispatch.testing.inputs import rope_cases

    return rope_cases(dtype, size, out=True)


@rotary_embedding_out.bench
def _out_bench(tokens: int, dims, dtype: str) -> list:
    from fl_dispatch.testing.inputs import rope_case

    return [rope_case(tokens, dims.heads, dims.kv_heads, dims.head_size, dims.head_size, dtype,
                      is_neox=True, cache_dtype="same", max_position=max(4096, tokens),
                      out=True)]
