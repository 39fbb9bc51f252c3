"""``flash_mla`` (MLA decode over a paged latent KV cache): the reference, then our Triton kernels.

CPU (CI): the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` set by the
``triton_mode`` fixture of conftest.py for this module only). GPU:
``FL_FLAGOS_TEST_DEVICE=cuda python -m pytest tests/test_mla_kernels.py`` compiles them.

Ground truth: ``fl_dispatch/core/ops/mla.py`` (fp32), itself checked first against
hand-computed attention and an independent per-row dense implementation (FlashMLA's test
style: ``tril(diagonal=s_k - s_q)`` causal mask). The reference module is torch-only and loaded
from its file, so these tests do not depend on the rest of ``fl_dispatch`` importing.

Tolerances (FlashMLA ``tests/test_flash_mla_dense_decoding.py`` / ``kernelkit`` method): an
element passes when its absolute error < ``abs_tol`` *or* its relative error < ``rel_tol``;
the whole tensor must also have ``cos_diff = 1 - 2<x,y>/(|x|^2+|y|^2) < 5e-6``, and
``+-inf``/NaN positions must coincide exactly (``lse = +inf`` for queries that see nothing).
bf16 out: 8e-4 / 2.01/128 (two bf16 ulps: the output is rounded once, P is rounded to bf16
before P@V as on tensor cores); fp16 out: 8e-4 / 2.01/1024 (same, with fp16's 10-bit
mantissa); lse: 1e-6 / 8.01/65536 (lse is computed in fp32 from the same fp32 scores, only
the summation order differs). fp32: 2e-5 / 1e-5 (only summation order differs). Inputs as in
FlashMLA: q ~ N(0, 1), cache ~ N(0, 1) / 10.
"""

from __future__ import annotations

import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("triton_mode")]

ROOT = Path(__file__).resolve().parent.parent
DEVICE = os.environ.get("FL_FLAGOS_TEST_DEVICE", "cpu")
ON_GPU = DEVICE != "cpu"


def _load_reference():
    from fl_dispatch.core.ops.mla import flash_mla_reference

    return flash_mla_reference


reference = _load_reference()


def _mla():
    """Our adapter. ``fl_dispatch_flagos/__init__`` imports fl_dispatch (plugin glue); when that
    does not import (mid-refactor), the package is registered bare: ``mla`` needs only its
    siblings."""
    try:
        import fl_dispatch_flagos  # noqa: F401
    except ImportError:
        pkg = types.ModuleType("fl_dispatch_flagos")
        pkg.__path__ = [str(ROOT / "backends" / "flagos")]
        sys.modules["fl_dispatch_flagos"] = pkg
    from fl_dispatch_flagos import mla

    return mla


TOL = {  # dtype -> (out abs, out rel); lse: (1e-6, 8.01/65536) except fp32
    torch.bfloat16: (8e-4, 2.01 / 128),
    torch.float16: (8e-4, 2.01 / 1024),
    torch.float32: (2e-5, 1e-5),
}


def assert_flashmla_close(name: str, got: torch.Tensor, want: torch.Tensor, abs_tol: float,
                          rel_tol: float, cos_tol: float | None = 5e-6) -> None:
    """FlashMLA's ``check_is_allclose``: inf/NaN positions equal, abs OR rel per element,
    cosine difference over the tensor."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, (name, got.shape, want.shape)
    for what, f in (("nan", torch.isnan), ("+inf", lambda t: t == math.inf),
                    ("-inf", lambda t: t == -math.inf)):
        assert torch.equal(f(got), f(want)), f"{name}: {what} positions differ"
    finite = torch.isfinite(want)
    g, w = got[finite], want[finite]
    err = (g - w).abs()
    ok = (err < abs_tol) | (err / (w.abs() + 1e-6) < rel_tol)
    if not ok.all():
        i = int((~ok).nonzero()[0])
        raise AssertionError(f"{name}: {int((~ok).sum())} elements out of tolerance, e.g. "
                             f"got {g[i].item()} want {w[i].item()}")
    if cos_tol is not None and g.numel():
        denom = (g * g + w * w).sum().item()
        cos_diff = 1 - 2 * (g * w).sum().item() / max(denom, 1e-12)
        assert cos_diff < cos_tol, f"{name}: cos_diff {cos_diff}"


def make_case(b: int, s_q: int, h_q: int, d: int, page: int, lens: list[int], dtype,
              extra_blocks: int = 0, seed: int = 0, q_pad: int = 0):
    """Random inputs with a shuffled (non-contiguous) block table; ``q_pad`` > 0 makes q a
    strided view (channels of a wider tensor)."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max(-(-n // page) for n in lens))
    num_blocks = b * max_blocks + extra_blocks
    qw = torch.randn(b, s_q, h_q, d + q_pad, generator=gen)
    q = qw.to(dtype)  # sliced on the device below: a strided view there too
    kv = (torch.randn(num_blocks, page, 1, d, generator=gen) / 10).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)[: b * max_blocks]
    table = perm.view(b, max_blocks).to(torch.int32)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    dev = torch.device(DEVICE)
    return q.to(dev)[..., :d], kv.to(dev), table.to(dev), seqlens.to(dev)


def check(q, kv, table, seqlens, dv, scale, causal, config=None):
    """Our kernels (with ``config``, else the heuristic's) vs the reference."""
    mla = _mla()
    out, lse = mla.flash_mla(q, kv, table, seqlens, dv, scale, causal, config=config)
    want_out, want_lse = reference(q, kv, table, seqlens, dv, scale, causal)
    b, s_q, h_q, _ = q.shape
    assert out.dtype == q.dtype and out.shape == (b, s_q, h_q, dv)
    assert lse.dtype == torch.float32 and lse.shape == (b, h_q, s_q)
    abs_tol, rel_tol = TOL[q.dtype]
    assert_flashmla_close("out", out, want_out.float(), abs_tol, rel_tol)
    lse_tol = (2e-6, 1e-6) if q.dtype == torch.float32 else (1e-6, 8.01 / 65536)
    assert_flashmla_close("lse", lse, want_lse, *lse_tol, cos_tol=None)
    return out, lse


# ----------------------------------------------------------------------------- the reference

def test_reference_hand_computed() -> None:
    """d = dv = 2, one position per block, the table maps position 0 -> block 1, 1 -> block 0.
    Row 0 (len 2): scores ln2 and 0 -> softmax (2/3, 1/3), lse = ln 3. Row 1: len 0."""
    kv = torch.tensor([[[[0.0, 3.0]]], [[[math.log(2), 6.0]]]])  # [2 blocks, 1, 1, 2]
    q = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2).expand(2, 1, 1, 2).contiguous()
    table = torch.tensor([[1, 0], [0, 1]], dtype=torch.int32)
    seqlens = torch.tensor([2, 0], dtype=torch.int32)
    out, lse = reference(q, kv, table, seqlens, 2, 1.0, True)
    # keys k0 = (ln2, 6), k1 = (0, 3); q.k0 = ln2, q.k1 = 0
    want = torch.tensor([2 / 3 * math.log(2), 2 / 3 * 6 + 1 / 3 * 3])
    torch.testing.assert_close(out[0, 0, 0], want)
    torch.testing.assert_close(lse[0, 0, 0], torch.tensor(math.log(3.0)))
    assert torch.equal(out[1], torch.zeros(1, 1, 2)) and lse[1].item() == math.inf
    # scale is honoured: scale 2 -> scores 2 ln2, 0 -> weights 4/5, 1/5, lse ln 5
    out, lse = reference(q, kv, table, seqlens, 1, 2.0, True)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([4 / 5 * math.log(2)]))
    torch.testing.assert_close(lse[0, 0, 0], torch.tensor(math.log(5.0)))


def test_reference_causal_hand_computed() -> None:
    """s_q = 2 over a row of length 2: query 0 sees position 0 only, query 1 both; causal False:
    both see both. With a row of length 1, causal query 0 sees nothing (out 0, lse +inf)."""
    kv = torch.tensor([[[[math.log(2), 6.0]]], [[[0.0, 3.0]]]])
    q = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2).expand(1, 2, 1, 2).contiguous()
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    out, lse = reference(q, kv, table, torch.tensor([2], dtype=torch.int32), 2, 1.0, True)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([math.log(2), 6.0]))
    torch.testing.assert_close(lse[0, 0, 0], torch.tensor(math.log(2.0)))
    torch.testing.assert_close(lse[0, 0, 1], torch.tensor(math.log(3.0)))
    out, lse = reference(q, kv, table, torch.tensor([2], dtype=torch.int32), 2, 1.0, False)
    torch.testing.assert_close(lse[0, 0], torch.tensor([math.log(3.0)] * 2))
    out, lse = reference(q, kv, table, torch.tensor([1], dtype=torch.int32), 2, 1.0, True)
    assert lse[0, 0, 0].item() == math.inf and torch.equal(out[0, 0], torch.zeros(1, 2))
    torch.testing.assert_close(lse[0, 0, 1], torch.tensor(math.log(2.0)))


def _dense_rows(q, kv, table, seqlens, dv, scale, causal):
    """Independent ground truth: per row, gather with a Python loop, FlashMLA-style mask."""
    b, s_q, h_q, d = q.shape
    page = kv.shape[1]
    outs, lses = torch.zeros(b, s_q, h_q, dv), torch.full((b, h_q, s_q), math.inf)
    for i in range(b):
        n = int(seqlens[i])
        keys = torch.stack([kv[int(table[i, t // page]), t % page, 0].float()
                            for t in range(n)]) if n else torch.zeros(0, d)
        s = torch.einsum("shd,nd->hsn", q[i].float(), keys) * scale
        if causal:
            s = s.masked_fill(~torch.ones(s_q, n, dtype=torch.bool).tril(n - s_q), -math.inf)
        lse = s.logsumexp(-1)
        p = torch.softmax(s, -1).nan_to_num(0.0)
        outs[i] = torch.einsum("hsn,nv->shv", p, keys[:, :dv])
        lses[i] = lse.masked_fill(lse == -math.inf, math.inf)
    return outs, lses


@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_dense_rows(causal: bool) -> None:
    q, kv, table, seqlens = make_case(3, 2, 2, 24, 4, [0, 1, 11], torch.float32, extra_blocks=2)
    out, lse = reference(q.cpu(), kv.cpu(), table.cpu(), seqlens.cpu(), 16, 0.3, causal)
    want_out, want_lse = _dense_rows(q.cpu(), kv.cpu(), table.cpu(), seqlens.cpu(), 16, 0.3,
                                     causal)
    torch.testing.assert_close(out, want_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-6, rtol=1e-5)


def test_reference_low_precision_output_dtype() -> None:
    q, kv, table, seqlens = make_case(1, 1, 2, 24, 4, [5], torch.bfloat16)
    out, lse = reference(q.cpu(), kv.cpu(), table.cpu(), seqlens.cpu(), 16, 0.2, True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


# ----------------------------------------------------------------------------- the kernels

LENS = [0, 70, 129]  # empty row, a row ending mid-block, one just past two blocks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("s_q,causal", [(1, True), (2, True), (2, False)])
def test_deepseek_shapes(dtype, s_q: int, causal: bool) -> None:
    """d 576 / dv 512 / page 64, three query heads (masked rows), heuristic config (here one
    split per row: direct write) and a forced 3-way split (combine kernel)."""
    mla = _mla()
    q, kv, table, seqlens = make_case(3, s_q, 3, extra_blocks=3, lens=LENS, dtype=dtype,
                                      d=576, page=64, seed=s_q)
    scale = 576 ** -0.5
    check(q, kv, table, seqlens, 512, scale, causal)
    check(q, kv, table, seqlens, 512, scale, causal, config=mla.MLAConfig(16, 32, 4, 1, 3))


@pytest.mark.parametrize("block_n,splits", [(16, 4), (32, 2), (64, 1)])
def test_small_head_dim_pages_and_splits(block_n: int, splits: int) -> None:
    """d 96 / dv 64, pages of 16 (a 32- or 64-position tile is clamped to the page: one page
    per tile); splits with more splits than tiles (empty splits), a custom scale."""
    mla = _mla()
    q, kv, table, seqlens = make_case(4, 2, 4, 96, 16, [0, 1, 37, 100], torch.bfloat16,
                                      extra_blocks=5, seed=block_n)
    for causal in (True, False):
        check(q, kv, table, seqlens, 64, 0.37, causal,
              config=mla.MLAConfig(16, block_n, 4, 1, splits))


@pytest.mark.parametrize("splits", [1, 2])
def test_tiles_spanning_pages(splits: int) -> None:
    """Pages of 24 positions: 16-position tiles straddle pages, so each position looks up its
    own page (``TILE_IN_PAGE`` false); causal and not, s_q 2, direct and split."""
    mla = _mla()
    q, kv, table, seqlens = make_case(3, 2, 4, 96, 24, [0, 30, 77], torch.bfloat16,
                                      extra_blocks=2, seed=11)
    for causal in (True, False):
        check(q, kv, table, seqlens, 64, 0.2, causal,
              config=mla.MLAConfig(16, 16, 4, 1, splits))


def test_many_query_rows_span_head_blocks() -> None:
    """s_q * h_q = 40 rows over three 16-row programs per batch row (two of 32, one of 64
    with 24 rows masked); causal."""
    mla = _mla()
    q, kv, table, seqlens = make_case(2, 2, 20, 96, 16, [3, 50], torch.bfloat16, seed=5)
    check(q, kv, table, seqlens, 64, 0.1, True, config=mla.MLAConfig(16, 16, 4, 1, 2))
    check(q, kv, table, seqlens, 64, 0.1, True, config=mla.MLAConfig(32, 32, 4, 1, 1))
    check(q, kv, table, seqlens, 64, 0.1, True, config=mla.MLAConfig(64, 16, 4, 1, 2))


def test_fp32_exact_strided_q_and_no_rope() -> None:
    """fp32 agrees with the reference to summation order; q a strided view; d == dv (no rope
    part); lengths 1 and s_q - 1 (causal: query 0 sees nothing)."""
    q, kv, table, seqlens = make_case(3, 2, 2, 64, 16, [1, 1, 40], torch.float32, q_pad=32,
                                      seed=7)
    assert not q.is_contiguous()
    out, lse = check(q, kv, table, seqlens, 64, 0.25, True)
    assert lse[0, :, 0].eq(math.inf).all() and out[0, 0].eq(0).all()


def test_lengths_beyond_the_table_are_clamped() -> None:
    """A length the table cannot address reads only what the table holds (as the reference)."""
    q, kv, table, seqlens = make_case(2, 1, 2, 96, 16, [20, 32], torch.float32, seed=3)
    seqlens = torch.tensor([20, 10_000], dtype=torch.int32, device=seqlens.device)
    check(q, kv, table, seqlens, 64, 0.2, False)


def test_config_from_shapes_only() -> None:
    """The launch config (split count included) is a function of shapes: graph-capturable."""
    mla = _mla()
    small = mla.mla_config(128, 16, 4096, 64, 576, 512, 2, 132)
    assert small.block_h == 16 and small.num_splits > 1
    big = mla.mla_config(128, 128, 4096, 64, 576, 512, 2, 132)
    assert big.block_h == 64
    assert mla.mla_config(4, 16, 64, 64, 576, 512, 2, 132).num_splits == 1


def test_config_table_entries_win(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``MLA_CONFIGS`` entry (keyed by dtype bytes and the power-of-two buckets of rows,
    capacity and batch) replaces the heuristic for every shape in its buckets; ``config=``
    takes a plain 5-tuple too."""
    mla = _mla()
    key = (2, 16, 4096, 128)
    mla.mla_config.cache_clear()
    try:
        heuristic = mla.mla_config(128, 16, 4096, 64, 576, 512, 2, 132)
        monkeypatch.setitem(mla.MLA_CONFIGS, key, mla.MLAConfig(16, 32, 8, 1, 4))
        mla.mla_config.cache_clear()
        assert heuristic != mla.MLAConfig(16, 32, 8, 1, 4)
        assert mla.mla_config(128, 16, 4096, 64, 576, 512, 2, 132) == mla.MLAConfig(16, 32, 8, 1, 4)
        assert mla.mla_config(100, 15, 3000, 64, 576, 512, 2, 132) == mla.MLAConfig(16, 32, 8, 1, 4)
        assert mla.mla_config(128, 16, 8192, 64, 576, 512, 2, 132) != mla.MLAConfig(16, 32, 8, 1, 4)
    finally:
        mla.mla_config.cache_clear()
    # the H200 sweep's entry for h16 s_q2 at 4k-class capacities: 8 splits
    assert mla.mla_config(128, 32, 10_000, 64, 576, 512, 2, 132) == mla.MLAConfig(32, 64, 4, 2, 8)
    q, kv, table, seqlens = make_case(2, 1, 16, 96, 16, [5, 40], torch.float32, seed=2)
    check(q, kv, table, seqlens, 64, 0.3, True, config=(16, 16, 4, 1, 2))


# ----------------------------------------------------------------------------- bad input

def _good():
    q, kv, table, seqlens = make_case(2, 1, 2, 96, 16, [5, 9], torch.bfloat16)
    return {"q": q, "kv_cache": kv, "block_table": table, "cache_seqlens": seqlens,
            "head_dim_v": 64, "softmax_scale": 0.1}


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(kv_cache=a["kv_cache"][..., :80]), r"kv_cache.shape\[-1\] is 80"),
    (lambda a: a.update(head_dim_v=97), r"head_dim_v is 97.*\[1, d=96\]"),
    (lambda a: a.update(head_dim_v=0), r"head_dim_v is 0"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()),
     r"cache_seqlens.dtype is torch.int64; expected torch.int32"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]),
     r"cache_seqlens.shape is \(1,\); expected \(2,\)"),
    (lambda a: a.update(kv_cache=a["kv_cache"].expand(-1, -1, 2, -1)),
     r"h_kv\) is 2.*expected 1"),
    (lambda a: a.update(kv_cache=a["kv_cache"].half()),
     r"kv_cache.dtype is torch.float16; expected q's dtype torch.bfloat16"),
    (lambda a: a.update(q=a["q"].int(), kv_cache=a["kv_cache"].int()), r"q.dtype is torch.int32"),
    (lambda a: a.update(block_table=a["block_table"].long()),
     r"block_table.dtype is torch.int64; expected torch.int32"),
    (lambda a: a.update(block_table=a["block_table"][:1]), r"block_table.shape is \(1, 1\)"),
    (lambda a: a.update(block_table=a["block_table"][:, :0]), r"block_table.shape\[1\] is 0"),
    (lambda a: a.update(max_seqlen_k=17),
     r"block_table.shape\[1\] is 1; rows of up to max_seqlen_k=17 positions need >= 2"),
    (lambda a: a.update(q=a["q"][0]), r"q.shape is \(1, 2, 96\)"),
])
def test_bad_input(change, match: str) -> None:
    mla = _mla()
    args = _good()
    change(args)
    with pytest.raises(ValueError, match=match):
        mla.flash_mla(**args)


def test_good_input_with_static_bound() -> None:
    mla = _mla()
    out, lse = mla.flash_mla(**_good(), max_seqlen_k=16)
    assert out.shape == (2, 1, 2, 64) and lse.shape == (2, 2, 1)
