"""The reference backend against vLLM's own native implementations (the installed vLLM).

vLLM's ground truth: ``vllm.ir.ops.rms_norm`` / ``fused_add_rms_norm`` (their ``native``
impls), ``SiluAndMul.forward_native``, ``GeluAndMul.forward_native`` and
``RotaryEmbedding.forward_static``. The reference performs the same arithmetic in the same
order and dtypes as each of these, so every comparison here is exact (``torch.equal``), not
within a tolerance: any difference is a bug. Every test draws fresh random inputs.

vLLM's layer classes cannot be constructed without a vLLM config context, so the static and
native functions are called directly (``GeluAndMul.forward_native`` with a stand-in ``self``).
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

# importing vLLM is slow (seconds): once, for the whole module
from vllm.ir.ops import fused_add_rms_norm as _ir_fused_add_rms_norm
from vllm.ir.ops import rms_norm as _ir_rms_norm
from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

import fl_dispatch
from fl_dispatch.core import ops as ref

VLLM_RMS_NORM = _ir_rms_norm.impls["native"].impl_fn
VLLM_FUSED_ADD_RMS_NORM = _ir_fused_add_rms_norm.impls["native"].impl_fn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
EPS = 1e-6


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


def padded_view(shape: tuple[int, ...], dtype: torch.dtype, pad: int = 5):
    """A row-strided view into a wider buffer (like vLLM's q/k slices of a qkv tensor);
    returns (buffer, view). The padding is NaN so a stray write or read shows."""
    *rows, cols = shape
    buf = torch.full((*rows, cols + 2 * pad), float("nan"), dtype=dtype)
    view = buf[..., pad:pad + cols]
    view.copy_(randn(*shape, dtype=dtype))
    assert view.is_contiguous() == (view.numel() == cols)  # one row is trivially contiguous
    return buf, view


def assert_padding_untouched(buf: torch.Tensor, cols: int, pad: int = 5) -> None:
    assert torch.isnan(buf[..., :pad]).all() and torch.isnan(buf[..., pad + cols:]).all()


# --------------------------------------------------------------------------- activations
ACT_SHAPES = [(1, 8), (7, 256), (3, 5, 130)]


def make_x(shape, dtype, layout):
    if layout == "contiguous":
        return randn(*shape, dtype=dtype)
    if layout == "row-strided":
        return padded_view(shape, dtype)[1]
    # fully non-contiguous: a transposed buffer
    return randn(*reversed(shape), dtype=dtype).permute(*reversed(range(len(shape))))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "row-strided", "transposed"])
def test_silu_and_mul_matches_vllm_exactly(dtype, shape, layout):
    """Same arithmetic as SiluAndMul.forward_native: bit-exact."""
    x = make_x(shape, dtype, layout)
    before = x.clone()
    got = ref.silu_and_mul(x)
    assert got.dtype == dtype and got.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(got, SiluAndMul.forward_native(x))
    assert torch.equal(x, before)


def gelu_native(x: torch.Tensor, approximate: str) -> torch.Tensor:
    return GeluAndMul.forward_native(SimpleNamespace(approximate=approximate), x)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("layout", ["contiguous", "row-strided"])
def test_gelu_and_mul_matches_vllm_exactly(dtype, shape, approximate, layout):
    """Same arithmetic as GeluAndMul.forward_native: bit-exact."""
    x = make_x(shape, dtype, layout)
    assert torch.equal(ref.gelu_and_mul(x, approximate), gelu_native(x, approximate))
    if approximate == "none":
        assert torch.equal(ref.gelu_and_mul(x), gelu_native(x, "none"))  # the default


def test_gelu_and_mul_rejects_an_unknown_approximation():
    with pytest.raises(ValueError, match="'erf'"):
        ref.gelu_and_mul(randn(2, 8), "erf")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", ["silu", "gelu"])
def test_activation_out_parameter(dtype, op):
    x = randn(6, 64, dtype=dtype)
    if op == "silu":
        fn, expected = ref.silu_and_mul.fn, SiluAndMul.forward_native(x)
    else:
        fn, expected = (lambda x, out: ref.gelu_and_mul(x, "tanh", out=out)), gelu_native(
            x, "tanh")
    out = torch.empty(6, 32, dtype=dtype)
    assert fn(x, out=out) is out
    assert torch.equal(out, expected)
    # a row-strided out (a slice of a wider buffer) is written in place, padding untouched
    buf, view = padded_view((6, 32), dtype)
    assert fn(x, out=view) is view
    assert torch.equal(view, expected)
    assert_padding_untouched(buf, 32)


# --------------------------------------------------------------------------- rms_norm
NORM_SHAPES = [(1, 64), (7, 1024), (2, 3, 128)]


def make_weight(kind: str, hidden: int, dtype: torch.dtype):
    if kind == "none":
        return None
    if kind == "same":
        return randn(hidden, dtype=dtype)
    return randn(hidden, dtype=torch.float32)  # fp32 weight on a low-precision x


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("weight_kind", ["same", "none", "fp32"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "row-strided"])
def test_rms_norm_matches_vllm_exactly(dtype, shape, weight_kind, strided):
    """Same arithmetic as vllm.ir.ops.rms_norm's native impl (fp32 variance, cast to the
    weight's dtype, multiply, cast back): bit-exact. ``x`` is not modified."""
    x = padded_view(shape, dtype)[1] if strided else randn(*shape, dtype=dtype)
    weight = make_weight(weight_kind, shape[-1], dtype)
    before = x.clone()
    got = ref.rms_norm(x, weight, EPS)
    expected = VLLM_RMS_NORM(x, weight, EPS)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, expected)
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("weight_kind", ["same", "none", "fp32"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "row-strided"])
def test_fused_add_rms_norm_matches_vllm_exactly_in_place(dtype, shape, weight_kind, strided):
    """Same arithmetic as vllm.ir.ops.fused_add_rms_norm's native impl: bit-exact. The caller's
    x and residual (also row-strided views of wider buffers) receive the results in place."""
    if strided:
        xbuf, x = padded_view(shape, dtype)
        rbuf, residual = padded_view(shape, dtype)
    else:
        x, residual = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    weight = make_weight(weight_kind, shape[-1], dtype)
    want_x, want_residual = VLLM_FUSED_ADD_RMS_NORM(x.clone(), residual.clone(), weight, EPS)

    got = ref.rms_norm(x, weight, EPS, residual)
    assert got[0] is x and got[1] is residual  # the caller's own tensors, updated
    assert torch.equal(x, want_x)
    assert torch.equal(residual, want_residual)
    if strided:
        assert_padding_untouched(xbuf, shape[-1])
        assert_padding_untouched(rbuf, shape[-1])


def test_fused_add_rms_norm_keyword_residual():
    x, residual, weight = randn(3, 32), randn(3, 32), randn(32)
    want = VLLM_FUSED_ADD_RMS_NORM(x.clone(), residual.clone(), weight, EPS)
    out_x, out_r = ref.rms_norm(x, weight=weight, epsilon=EPS, residual=residual)
    assert torch.equal(out_x, want[0]) and torch.equal(out_r, want[1])


# --------------------------------------------------------------------------- rotary
MAX_POS = 96


def vllm_cos_sin_cache(rotary_dim: int, dtype: torch.dtype, base: float = 10000.0):
    """vLLM's own cache (RotaryEmbedding._compute_cos_sin_cache: real angles), in ``dtype``
    (vLLM matches the cache to the query's dtype before applying it)."""
    layer = SimpleNamespace(base=base, rotary_dim=rotary_dim, max_position_embeddings=MAX_POS)
    layer._compute_inv_freq = lambda b: RotaryEmbedding._compute_inv_freq(layer, b)
    return RotaryEmbedding._compute_cos_sin_cache(layer).to(dtype)


ROTARY_CASES = list(itertools.product(
    [True, False],                        # is_neox
    [64, 32],                             # rotary_dim (head_size 64: full, partial)
    ["flat", "heads", "qkv-strided"],     # query/key layout
))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("is_neox, rotary_dim, layout", ROTARY_CASES,
                         ids=[f"{'neox' if n else 'gptj'}-rot{r}-{lay}"
                              for n, r, lay in ROTARY_CASES])
@pytest.mark.parametrize("with_key", [True, False], ids=["key", "key=None"])
def test_rotary_embedding_matches_vllm_exactly_in_place(dtype, is_neox, rotary_dim, layout,
                                                        with_key):
    """Same arithmetic as RotaryEmbedding.forward_static (cos/sin cast to the query's dtype,
    neox halves or GPT-J pairs, features past rotary_dim passed through): bit-exact, applied
    in place to the caller's query and key."""
    tokens, q_heads, kv_heads, head_size = 9, 4, 2, 64
    cache = vllm_cos_sin_cache(rotary_dim, dtype)
    positions = torch.randint(0, MAX_POS, (tokens,))
    qkv = None
    if layout == "qkv-strided":  # q and k are row-strided slices of one qkv tensor
        width = (q_heads + 2 * kv_heads) * head_size
        qkv = randn(tokens, width, dtype=dtype)
        query = qkv[:, :q_heads * head_size]
        key = qkv[:, q_heads * head_size:(q_heads + kv_heads) * head_size]
        value_before = qkv[:, (q_heads + kv_heads) * head_size:].clone()
    elif layout == "heads":
        query = randn(tokens, q_heads, head_size, dtype=dtype)
        key = randn(tokens, kv_heads, head_size, dtype=dtype)
    else:
        query = randn(tokens, q_heads * head_size, dtype=dtype)
        key = randn(tokens, kv_heads * head_size, dtype=dtype)
    if not with_key:
        key = None
    want_q, want_k = RotaryEmbedding.forward_static(
        positions, query.clone(), None if key is None else key.clone(), head_size, rotary_dim,
        cache, is_neox)
    q_ptr = query.data_ptr()

    assert ref.rotary_embedding(positions, query, key, head_size, cache, is_neox) is None
    assert query.data_ptr() == q_ptr
    assert torch.equal(query, want_q)
    if key is None:
        assert want_k is None
    else:
        assert torch.equal(key, want_k)
    if qkv is not None:  # the value slice of the qkv tensor is untouched
        assert torch.equal(qkv[:, (q_heads + kv_heads) * head_size:], value_before)


def test_rotary_changes_only_the_rotary_features():
    tokens, heads, head_size, rotary_dim = 5, 2, 64, 16
    cache = vllm_cos_sin_cache(rotary_dim, torch.float32)
    query = randn(tokens, heads, head_size)
    before = query.clone()
    ref.rotary_embedding(torch.randint(1, MAX_POS, (tokens,)), query, None, head_size, cache,
                         True)
    assert torch.equal(query[..., rotary_dim:], before[..., rotary_dim:])
    assert not torch.equal(query[..., :rotary_dim], before[..., :rotary_dim])


def test_rotary_with_2d_positions():
    """Positions are flattened, as vLLM does (batch x seq positions)."""
    head_size = 32
    cache = vllm_cos_sin_cache(head_size, torch.bfloat16)
    positions = torch.randint(0, MAX_POS, (2, 3))
    query = randn(6, 3 * head_size, dtype=torch.bfloat16)
    key = randn(6, head_size, dtype=torch.bfloat16)
    want_q, want_k = RotaryEmbedding.forward_static(positions, query.clone(), key.clone(),
                                                    head_size, head_size, cache, False)
    ref.rotary_embedding(positions, query, key, head_size, cache, False)
    assert torch.equal(query, want_q) and torch.equal(key, want_k)


def test_attention_backend_defers_to_vllm():
    assert ref.attention_backend() is None
    assert ref.attention_backend(use_mla=True) is None


# --------------------------------------------------------------------------- through dispatch
def test_reference_through_the_dispatcher(monkeypatch):
    monkeypatch.setenv("VLLM_FL_PER_OP", "rms_norm=reference;silu_and_mul=impl:reference.torch")
    fl_dispatch.reset()
    try:
        assert fl_dispatch.ops.rms_norm is ref.rms_norm.fn  # single usable impl: the function
        assert fl_dispatch.ops.silu_and_mul is ref.silu_and_mul.fn
        x, residual, weight = randn(4, 64, dtype=torch.bfloat16), randn(
            4, 64, dtype=torch.bfloat16), randn(64, dtype=torch.bfloat16)
        want = VLLM_FUSED_ADD_RMS_NORM(x.clone(), residual.clone(), weight, EPS)
        fl_dispatch.ops.rms_norm(x, weight, EPS, residual)
        assert torch.equal(x, want[0]) and torch.equal(residual, want[1])
    finally:
        fl_dispatch.reset()
