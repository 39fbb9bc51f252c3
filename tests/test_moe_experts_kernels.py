"""``fused_experts`` on our Triton kernels (flagos backend) against the PyTorch reference.

CPU (CI): the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` set per test by the
``triton_mode`` fixture of ``conftest.py``). The dispatched alignment and sum
(``moe_experts._align``/``_sum``) are monkeypatched with graph-safe PyTorch versions (the
op's reference for the alignment): the real ones are another backend's business.

Tolerances: the kernels and the reference round at the same points (GEMM1 result, act, act*up,
weighted GEMM2 result, the sum), so differences come from fp32 summation order inside the
GEMMs; one of those can flip a rounding of an intermediate, which then moves the result by
about one ulp of the intermediate times the downstream weights. Hence the per-dtype tolerances
the flagos backend uses elsewhere (fp16 1e-3/2e-3, bf16 1e-2/1.6e-2) on outputs of magnitude
~1 (inputs scaled so); fp32 atol 1e-4 (rtol 1e-5) for the K-long fp32 reductions summed in a
different order.

Programmatic dependent launch (gemm2 key ``PDL``) exists for compiled kernels on sm_90+ only:
here the tests check that the keys change nothing under the interpreter, the launcher's
option handling, and that the kernels compile for sm_90 with Triton's bundled ptxas (no GPU
needed); on an H100/H200 ``FL_FLAGOS_TEST_DEVICE=cuda python -m pytest -k pdl
tests/test_moe_experts_kernels.py`` checks PDL bit for bit against PDL off, eagerly and under
CUDA-graph replay with new routing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("triton_mode")]

ROOT = Path(__file__).resolve().parent.parent


def _flagos_modules():
    """(moe_experts, moe_configs) through ``fl_dispatch_flagos``; when that
    package cannot be imported (its ``__init__`` imports ``fl_dispatch``), the same files as
    a stand-alone package that skips the ``__init__`` (the adapter needs no fl_dispatch)."""
    try:
        from fl_dispatch_flagos import moe_configs, moe_experts

        return moe_experts, moe_configs
    except ImportError:
        import importlib
        import sys
        import types

        name = "_flagos_moe_standalone"
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(ROOT / "backends" / "flagos")]
            sys.modules[name] = pkg
        return tuple(importlib.import_module(f"{name}.{m}")
                     for m in ("moe_experts", "moe_configs"))


moe_experts, moe_configs = _flagos_modules()

TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-3, 2e-3),
              torch.bfloat16: (1e-2, 1.6e-2)}
"""(atol, rtol): the flagos backend's per-dtype tolerances (fp32 atol 1e-4, see above)."""
DEVICE = os.environ.get("FL_FLAGOS_TEST_DEVICE", "cpu")
ON_GPU = DEVICE != "cpu"


def _load_reference():
    from fl_dispatch.core.ops import moe

    return moe


REF = _load_reference()


# ----------------------------------------------------------------------------- torch stand-ins
# The dispatched alignment is replaced by the op's PyTorch reference (graph-safe; stable order
# within an expert), the dispatched sum by a PyTorch sum.
torch_moe_align_block_size = REF.moe_align_block_size


def torch_moe_sum(inp, out):
    out.copy_(inp.float().sum(dim=1).to(out.dtype))


@pytest.fixture(autouse=True)
def torch_standins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moe_experts, "_align", torch_moe_align_block_size)
    monkeypatch.setattr(moe_experts, "_sum", torch_moe_sum)


# ----------------------------------------------------------------------------- inputs

def _inputs(M, K, N, E, k, dtype, *, seed=0, ids=None, global_e=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w1 = (torch.randn(E, 2 * N, K, generator=g) / K ** 0.5).to(dtype)
    w2 = (torch.randn(E, K, N, generator=g) / N ** 0.5).to(dtype)
    if ids is None:
        ge = global_e or E
        scores = torch.rand(M, ge, generator=g)
        ids = scores.topk(k, dim=1).indices.to(torch.int32)
    w = torch.rand(M, ids.shape[1], generator=g) + 0.5
    return [t.to(DEVICE) for t in (x, w1, w2, w, ids)]


def _close(got, want, dtype):
    atol, rtol = TOLERANCES[dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not got.isnan().any(), "NaN: an output element was not written"
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=atol, rtol=rtol)


def _run(x, w1, w2, w, ids, **kw):
    got = moe_experts.fused_experts(x, w1, w2, w, ids, **kw)
    kw.pop("config", None)
    want = REF.fused_experts_reference(x, w1, w2, w, ids, **kw)
    _close(got, want, x.dtype)
    return got, want


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- main matrix

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,E,k,N", [(1, 8, 2, 48), (2, 16, 2, 96), (7, 4, 1, 48),
                                     (7, 16, 6, 48), (64, 8, 2, 96)])
def test_fused_experts_matches_reference(M, E, k, N, dtype):
    x, w1, w2, w, ids = _inputs(M, 64, N, E, k, dtype, seed=M * 100 + E)
    _run(x, w1, w2, w, ids)


@pytest.mark.parametrize("k", [1, 2, 6])
@pytest.mark.parametrize("E", [4, 8, 16])
@pytest.mark.parametrize("M", [1, 2, 7, 64])
def test_grid_E_k_M_bf16(M, E, k):
    """Every E x k x M combination (bf16, N = 96 not a power of two, K = 48 not a multiple
    of the K tile): naive assignment where vLLM uses it (M*k*4 <= E), alignment elsewhere."""
    x, w1, w2, w, ids = _inputs(M, 48, 96, E, min(k, E), torch.bfloat16, seed=M + 10 * E + k)
    _run(x, w1, w2, w, ids)


def _tiles(bm, bn1, bk1, g1, bn2, bk2, g2):
    return {"BLOCK_SIZE_M": bm,
            "gemm1": dict(BLOCK_SIZE_N=bn1, BLOCK_SIZE_K=bk1, GROUP_SIZE_M=g1, num_warps=4,
                          num_stages=2, W_EVICT=1),
            "gemm2": dict(BLOCK_SIZE_N=bn2, BLOCK_SIZE_K=bk2, GROUP_SIZE_M=g2, num_warps=4,
                          num_stages=2, W_EVICT=0)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tiles", [_tiles(16, 32, 16, 4, 16, 32, 2),
                                   _tiles(32, 16, 32, 1, 32, 16, 8),
                                   _tiles(64, 32, 32, 2, 64, 16, 1)], ids=["t16", "t32", "t64"])
def test_small_tiles_partial_blocks(tiles, dtype):
    """Tiles smaller than the problem: partial N tiles (N = 48 with BLOCK_N 32), several K
    iterations with a ragged last one (K = 80), grouped program order, many blocks/expert."""
    x, w1, w2, w, ids = _inputs(64, 80, 48, 8, 6, dtype, seed=41)
    _run(x, w1, w2, w, ids, config=tiles)
    x, w1, w2, w, ids = _inputs(2, 80, 48, 64, 2, dtype, seed=43)  # naive path, 2 blocks
    _run(x, w1, w2, w, ids, config=tiles)


def test_large_batch():
    """M = 1000, E = 16, k = 2: ~125 routes per expert, BLOCK_SIZE_M 64 or 128 tiles."""
    x, w1, w2, w, ids = _inputs(1000, 64, 96, 16, 2, torch.bfloat16, seed=47)
    _run(x, w1, w2, w, ids)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("M", [1, 7])
def test_activations(activation, M):
    x, w1, w2, w, ids = _inputs(M, 32, 48, 8, 2, torch.bfloat16, seed=3)
    _run(x, w1, w2, w, ids, activation=activation)


def test_larger_batch_prefill_tiles():
    """M = 200, E = 4: many tokens per expert, BLOCK_SIZE_M 64 from the heuristic, several
    blocks per expert and a K (hidden) that is not a multiple of the K tile."""
    x, w1, w2, w, ids = _inputs(200, 80, 48, 4, 2, torch.bfloat16, seed=5)
    cfg = moe_configs.config(200, 4, 48, 80, 2, torch.bfloat16, "")
    assert cfg["BLOCK_SIZE_M"] == 64
    _run(x, w1, w2, w, ids)


def test_apply_router_weight_on_input():
    x, w1, w2, w, ids = _inputs(7, 32, 48, 8, 1, torch.bfloat16, seed=7)
    got, _ = _run(x, w1, w2, w, ids, apply_router_weight_on_input=True)
    plain = REF.fused_experts_reference(x, w1, w2, w, ids)
    assert not torch.allclose(got.float(), plain.float(), atol=1e-2)  # the flag matters


@pytest.mark.parametrize("M", [1, 7])
def test_naive_and_aligned_paths(M, monkeypatch):
    """M=1, E=16, k=2: 1*2*4 <= 16, vLLM's naive assignment (no alignment call); M=7 aligns."""
    calls = []
    monkeypatch.setattr(moe_experts, "_align",
                        lambda *a: (calls.append(1), torch_moe_align_block_size(*a)))
    x, w1, w2, w, ids = _inputs(M, 32, 48, 16, 2, torch.float32, seed=9)
    _run(x, w1, w2, w, ids)
    assert bool(calls) == (M == 7)
    assert moe_experts.use_naive_assignment(M, 2, 16, None) == (M == 1)


def test_expert_map_non_local_experts():
    """Expert parallelism: 16 global experts, 6 local (in a shuffled order), the rest -1."""
    E_g, E = 16, 6
    x, w1, w2, w, ids = _inputs(9, 32, 48, E, 2, torch.bfloat16, seed=11, global_e=E_g)
    emap = torch.full((E_g,), -1, dtype=torch.int32)
    for local, glob in enumerate([3, 0, 9, 15, 4, 7]):
        emap[glob] = local
    emap = emap.to(DEVICE)
    got, want = _run(x, w1, w2, w, ids, expert_map=emap, global_num_experts=E_g)
    # a token whose experts are all non-local gets exactly zero
    ids_all_remote = torch.tensor([[1, 2]] * 3, dtype=torch.int32, device=DEVICE)
    got2 = moe_experts.fused_experts(x[:3], w1, w2, w[:3], ids_all_remote, expert_map=emap)
    assert torch.equal(got2, torch.zeros_like(got2))


def test_global_num_experts_larger_without_map():
    """global_num_experts != E without a map: ids >= E (and >= global) contribute zeros."""
    x, w1, w2, w, ids = _inputs(5, 32, 48, 8, 2, torch.float32, seed=13)
    ids[0, 1] = 9   # >= E, < global
    ids[1, 0] = 40  # >= global
    ids[2, 0] = -1  # negative (padding rows)
    for M in (5, 1):  # aligned path, then naive (1*2*4 <= 12)
        _run(x[:M], w1, w2, w[:M], ids[:M], global_num_experts=12)


def test_repeated_ids_one_expert_and_idle_experts():
    x, w1, w2, w, _ = _inputs(20, 32, 48, 8, 2, torch.bfloat16, seed=17)
    same = torch.full((20, 2), 5, dtype=torch.int32, device=DEVICE)  # all routes on expert 5
    _run(x, w1, w2, w, same)
    rep = torch.tensor([[1, 1], [2, 2]] * 10, dtype=torch.int64, device=DEVICE)  # int64 ids
    _run(x, w1, w2, w, rep)


def test_k1_writes_output_directly(monkeypatch):
    monkeypatch.setattr(moe_experts, "_sum", lambda *a: pytest.fail("moe_sum called for k=1"))
    x, w1, w2, w, ids = _inputs(6, 32, 48, 4, 1, torch.float16, seed=19)
    _run(x, w1, w2, w, ids)


def _sequential_sum(inp, out):
    """Our ``moe_sum`` kernel's order: fp32, j = 0..k-1, one rounding."""
    acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    for j in range(inp.shape[1]):
        acc += inp[:, j].float()
    out.copy_(acc.to(out.dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,E,k,K,bn,bk", [(1, 16, 2, 48, 16, 32), (2, 64, 6, 80, 32, 32),
                                           (1, 64, 8, 64, 64, 64)])
def test_fused_sum_is_bit_for_bit_the_unfused_pair(M, E, k, K, bn, bk, dtype, monkeypatch):
    """FUSE_SUM at decode (naive assignment): GEMM2 and the sum over k in one kernel give
    exactly GEMM2 then our moe_sum's order, ids outside [0, E) adding zero included (K = 80
    and 48 with a 32-wide N tile: a ragged last tile; N = 48 with a 32-wide K tile: a ragged
    reduction), and the dispatched moe_sum is not called. fp32: FUSE_SUM is ignored (the
    compiler contracts the fused kernel's weight product and sum into an FMA, which skips
    the rounding the unfused pair does: 1 ulp apart on the H200), so the pair runs."""
    x, w1, w2, w, ids = _inputs(M, K, 48, E, k, dtype, seed=31 + M + k)
    ids[0, 1] = -1
    if k > 2:
        ids[-1, 2] = E + 3  # >= E with global_num_experts = E + 8
    assert moe_experts.use_naive_assignment(M, k, E + 8, None)
    tiles = _tiles(16, 32, 32, 1, bn, bk, 1)
    monkeypatch.setattr(moe_experts, "_sum", _sequential_sum)
    unfused = moe_experts.fused_experts(x, w1, w2, w, ids, global_num_experts=E + 8,
                                        config=tiles)
    tiles["gemm2"]["FUSE_SUM"] = 1
    spy = _LaunchSpy(moe_experts.GEMM2_SUM_KERNEL, monkeypatch)
    if dtype != torch.float32:
        monkeypatch.setattr(moe_experts, "_sum", lambda *a: pytest.fail("moe_sum called"))
    fused = moe_experts.fused_experts(x, w1, w2, w, ids, global_num_experts=E + 8,
                                      config=tiles)
    assert len(spy.calls) == (0 if dtype == torch.float32 else 1)
    assert torch.equal(fused, unfused)
    want = REF.fused_experts_reference(x, w1, w2, w, ids, global_num_experts=E + 8)
    _close(fused, want, dtype)


def test_fused_sum_ignored_off_the_naive_path(monkeypatch):
    """FUSE_SUM only applies to the naive assignment: aligned sizes still sum through the
    dispatched moe_sum."""
    calls = []
    monkeypatch.setattr(moe_experts, "_sum", lambda i, o: (calls.append(1), torch_moe_sum(i, o)))
    x, w1, w2, w, ids = _inputs(7, 32, 48, 8, 2, torch.bfloat16, seed=37)
    tiles = _tiles(16, 32, 32, 1, 32, 32, 1)
    tiles["gemm2"]["FUSE_SUM"] = 1
    _run(x, w1, w2, w, ids, config=tiles)
    assert calls == [1]


# ----------------------------------------------------------------------------- TMA variants
# gemm keys TMA_W (weights by tensor descriptor) and SORTED_C (the intermediate in block order,
# GEMM2's A tile by descriptor): the interpreter emulates the descriptors, so CI runs them;
# on an H100/H200 FL_FLAGOS_TEST_DEVICE=cuda runs them compiled (real TMA).

TMA_VARIANTS = {"weights": ({"TMA_W": 1}, {"TMA_W": 1}),
                "sorted": ({}, {"SORTED_C": 1}),
                "all": ({"TMA_W": 1}, {"TMA_W": 1, "SORTED_C": 1})}


def _tma_tiles(variant, bm=16, bn1=32, bk1=32, bn2=32, bk2=32):
    tiles = _tiles(bm, bn1, bk1, 2, bn2, bk2, 1)
    g1, g2 = TMA_VARIANTS[variant]
    return {**tiles, "gemm1": {**tiles["gemm1"], **g1}, "gemm2": {**tiles["gemm2"], **g2}}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(TMA_VARIANTS))
def test_tma_variants_are_bit_for_bit_the_pointer_path(variant, dtype):
    """The TMA keys change how tiles reach the GEMMs, not the arithmetic: exactly the pointer
    path's bits. K = 80 and N = 48 with 32-wide tiles: ragged last K and N tiles (the
    descriptors zero-fill past the edge; a gate tile past N reads up rows, an up tile past 2N
    the next expert's, never stored); 64 tokens, k = 6, E = 8: several blocks per expert
    and pad slots in most blocks.

    Except fp32 under the interpreter: its ``tl.dot`` is numpy's fp32 matmul, whose BLAS sums
    in an order that depends on the operands' memory layout and the CPU (the emulated
    descriptor hands over a copy, the pointer path a gathered view): there, 1e-5 relative
    (1e-5 absolute for sums that cancel; a wrong tile is off by whole units). Compiled, bit
    for bit at every dtype."""
    x, w1, w2, w, ids = _inputs(64, 80, 48, 8, 6, dtype, seed=51)
    plain = moe_experts.fused_experts(x, w1, w2, w, ids, config=_tiles(16, 32, 32, 2, 32, 32, 1))
    got, _ = _run(x, w1, w2, w, ids, config=_tma_tiles(variant))
    if dtype == torch.float32 and not ON_GPU:
        torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, plain)


@pytest.mark.parametrize("case", ["expert_map", "gelu_router_on_input", "bm32"])
def test_tma_variants_edge_cases(case):
    """All TMA keys on, with: non-local experts (their blocks: GEMM1 exits, GEMM2 writes
    zeros without reading the intermediate); top-1 with the router weight on the input and
    gelu; BLOCK_SIZE_M 32 with a 64-wide GEMM2 K tile over N = 48 (one ragged K tile)."""
    kw: dict = {}
    if case == "expert_map":
        E_g, E = 16, 6
        x, w1, w2, w, ids = _inputs(40, 48, 48, E, 2, torch.bfloat16, seed=53, global_e=E_g)
        emap = torch.full((E_g,), -1, dtype=torch.int32)
        for local, glob in enumerate([3, 0, 9, 15, 4, 7]):
            emap[glob] = local
        kw = dict(expert_map=emap.to(DEVICE), global_num_experts=E_g)
        tiles = _tma_tiles("all")
    elif case == "gelu_router_on_input":
        x, w1, w2, w, ids = _inputs(30, 48, 48, 4, 1, torch.float16, seed=55)
        kw = dict(activation="gelu", apply_router_weight_on_input=True)
        tiles = _tma_tiles("all")
    else:
        x, w1, w2, w, ids = _inputs(50, 64, 48, 4, 2, torch.bfloat16, seed=57)
        tiles = _tma_tiles("all", bm=32, bn2=64, bk2=64)
    got, _ = _run(x, w1, w2, w, ids, config=tiles, **kw)
    plain = {**tiles, "gemm1": {**tiles["gemm1"], "TMA_W": 0},
             "gemm2": {**tiles["gemm2"], "TMA_W": 0, "SORTED_C": 0}}
    assert torch.equal(got, moe_experts.fused_experts(x, w1, w2, w, ids, config=plain, **kw))


def test_tma_falls_back_where_a_descriptor_cannot_address_the_weights():
    """A w1 whose experts do not fold into one row stride (a slice of a wider stack) and a
    hidden size whose rows are not a multiple of 16 bytes (K = 36 in bf16: 72 bytes) get no
    descriptor: the pointer path runs, still right."""
    x, w1, w2, w, ids = _inputs(20, 48, 48, 4, 2, torch.bfloat16, seed=59)
    wide = torch.zeros(4, 2 * 48 + 16, 48, dtype=w1.dtype, device=w1.device)
    wide[:, :96] = w1
    sliced = wide[:, :96]
    assert moe_experts._tma_2d(sliced, 4 * 96, (32, 32)) is None
    assert moe_experts._tma_2d(w1, 4 * 96, (32, 32)) is not None
    _run(x, sliced, w2, w, ids, config=_tma_tiles("all"))
    x, w1, w2, w, ids = _inputs(20, 36, 48, 4, 2, torch.bfloat16, seed=61)
    assert moe_experts._tma_2d(w1, 4 * 96, (32, 32)) is None
    _run(x, w1, w2, w, ids, config=_tma_tiles("all"))


# ----------------------------------------------------------------------------- HALF_M
# gemm key HALF_M: a block whose upper half holds no valid route runs a half-height tile.

def _half(tiles, on=1):
    return {**tiles, "gemm1": {**tiles["gemm1"], "HALF_M": on},
            "gemm2": {**tiles["gemm2"], "HALF_M": on}}


def _shuffled_blocks_align(bm_seen):
    """The reference alignment, then each block's slots reversed: pads first. The contract
    leaves the order inside an expert's blocks open, so HALF_M must not assume that the
    valid routes come first."""
    def align(ids, E, bm, sorted_ids, expert_ids, ntpp, emap):
        torch_moe_align_block_size(ids, E, bm, sorted_ids, expert_ids, ntpp, emap)
        n = sorted_ids.numel() // bm * bm
        sorted_ids[:n].copy_(sorted_ids[:n].view(-1, bm).flip(1).reshape(-1))
        bm_seen.append(bm)
    return align


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["pointers", "all"])
@pytest.mark.parametrize("order", ["reference", "pads_first"])
def test_half_m_is_bit_for_bit_the_full_tile(variant, order, dtype, monkeypatch):
    """HALF_M on both GEMMs (BLOCK_SIZE_M 32: half tiles of 16 rows): exactly the bits of the
    full tiles, whether a block's upper half is padding (the half tile) or not. 40 tokens,
    k = 2, E = 6 with skewed routing: experts with 1-16 routes in their last block (half
    tiles) and with 17-31 (full tiles). With pads first in every block (the alignment
    contract leaves the order open) no upper half is pads-only: full tiles everywhere, and
    no route is lost (a kernel that looked at the middle slot only would drop some)."""
    seen: list = []
    if order == "pads_first":
        monkeypatch.setattr(moe_experts, "_align", _shuffled_blocks_align(seen))
    x, w1, w2, w, _ = _inputs(40, 48, 48, 6, 2, dtype, seed=63)
    counts = [3, 16, 17, 20, 24]  # routes per expert 0..4 (80 routes), expert 5 idle
    flat = torch.cat([torch.full((c,), e, dtype=torch.int32) for e, c in enumerate(counts)])
    ids = flat[torch.randperm(80, generator=torch.Generator().manual_seed(5))].view(40, 2)
    ids = torch.sort(ids, dim=1).values.to(DEVICE)
    ids[:, 1] = torch.where(ids[:, 0] == ids[:, 1], 5, ids[:, 1])  # no repeated expert
    tiles = _tiles(32, 32, 32, 2, 32, 32, 1) if variant == "pointers" else \
        _tma_tiles("all", bm=32)
    full = moe_experts.fused_experts(x, w1, w2, w, ids, config=tiles)
    rows: list = []
    if not ON_GPU:
        _record_tile_rows(monkeypatch, rows)
    got, _ = _run(x, w1, w2, w, ids, config=_half(tiles))
    if ON_GPU:  # the MMA's per-row sums do not depend on the tile's height
        assert torch.equal(got, full)
    else:  # numpy's matmul (the interpreter's tl.dot) may block fp32 sums by shape
        _close(got, full, dtype)
        # an expert whose last block holds 1-16 routes: a pads-only upper half, so a half
        # tile in each GEMM's 2 column blocks (48 columns, 32-wide), with the reference
        # order; never with pads first
        counts = torch.bincount(ids.flatten().cpu(), minlength=6)
        half_blocks = int(((counts % 32 >= 1) & (counts % 32 <= 16)).sum())
        assert half_blocks >= 3
        halves = sum(1 for _, r in rows if r == 16)
        assert halves == (0 if order == "pads_first" else half_blocks * 2 * 2), rows
    assert order == "reference" or seen


def _record_tile_rows(monkeypatch, rows):
    """Interpreter only: fresh GEMM kernels whose tile helpers record (helper, ROWS) per
    call, then run the real helper. The interpreter runs a helper's source in the kernel
    module's namespace (``launcher.bind_helpers``), so what the spies use lives there."""
    km = _package_module("kernels_moe_gemm")
    launcher = _package_module("launcher")
    monkeypatch.setattr(km, "_spy_rows", rows, raising=False)
    monkeypatch.setattr(km, "_spy_real1", km._gemm1_tile, raising=False)
    monkeypatch.setattr(km, "_spy_real2", km._gemm2_tile, raising=False)

    def spy1(*args):
        _spy_rows.append(("gemm1", int(args[16])))  # noqa: F821 (ROWS)
        return _spy_real1(*args)  # noqa: F821

    def spy2(*args):
        _spy_rows.append(("gemm2", int(args[15])))  # noqa: F821
        return _spy_real2(*args)  # noqa: F821

    monkeypatch.setattr(km, "_gemm1_tile", spy1)
    monkeypatch.setattr(km, "_gemm2_tile", spy2)
    for attr in ("GEMM1_KERNEL", "GEMM2_KERNEL"):
        old = getattr(moe_experts, attr)
        monkeypatch.setattr(moe_experts, attr, launcher.TritonKernel(
            old.module, old.name, old.do_not_specialize))


def test_half_m_reaches_the_kernels_only_on_aligned_blocks_of_32_and_more(monkeypatch):
    """The adapter passes HALF_M to both kernels for aligned blocks of >= 32 rows (a half
    tile needs 16 rows for tl.dot); never on the naive (one route per block) decode path
    or with BLOCK_SIZE_M 16."""
    spies = [_LaunchSpy(kern, monkeypatch) for kern in moe_experts.KERNELS[:2]]
    x, w1, w2, w, ids = _inputs(20, 48, 48, 4, 2, torch.bfloat16, seed=65)
    for bm in (32, 16):
        moe_experts.fused_experts(x, w1, w2, w, ids, config=_half(_tiles(bm, 32, 32, 1, 32,
                                                                         32, 1)))
    x, w1, w2, w, ids = _inputs(1, 48, 48, 16, 2, torch.bfloat16, seed=65)  # naive
    moe_experts.fused_experts(x, w1, w2, w, ids, config=_half(_tiles(32, 32, 32, 1, 32, 32, 1)))
    for spy in spies:
        assert [rest["HALF_M"] for rest, _ in spy.calls] == [True, False, False]


def test_explicit_config_override():
    x, w1, w2, w, ids = _inputs(7, 64, 96, 4, 2, torch.bfloat16, seed=21)
    cfg = {"BLOCK_SIZE_M": 32,
           "gemm1": dict(BLOCK_SIZE_N=32, BLOCK_SIZE_K=32, GROUP_SIZE_M=2, num_warps=4,
                         num_stages=2, W_EVICT=1),
           "gemm2": dict(BLOCK_SIZE_N=32, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=4,
                         num_stages=2, W_EVICT=0)}
    _run(x, w1, w2, w, ids, config=cfg)


def test_zero_tokens():
    x, w1, w2, w, ids = _inputs(1, 32, 48, 4, 2, torch.float32)
    out = moe_experts.fused_experts(x[:0], w1, w2, w[:0], ids[:0])
    assert out.shape == (0, 32)


# ----------------------------------------------------------------------------- reference

def test_reference_vs_oracle():
    x, w1, w2, w, ids = _inputs(9, 64, 96, 8, 2, torch.bfloat16, seed=23)
    ref = REF.fused_experts_reference(x, w1, w2, w, ids)
    orc = REF.fused_experts_oracle(x, w1, w2, w, ids)
    assert orc.dtype == torch.float32
    rel = (ref.float() - orc).norm() / orc.norm()
    assert rel < 1e-2, rel
    x32, w132, w232 = x.float(), w1.float(), w2.float()
    torch.testing.assert_close(REF.fused_experts_reference(x32, w132, w232, w, ids),
                               REF.fused_experts_oracle(x32, w132, w232, w, ids))


def test_reference_naive_loop():
    """The reference against a literal per-token, per-route loop (fp32)."""
    x, w1, w2, w, ids = _inputs(5, 32, 48, 4, 2, torch.float32, seed=29)
    want = torch.zeros(5, 32, device=x.device)
    for t in range(5):
        for j in range(2):
            e = int(ids[t, j])
            h = w1[e] @ x[t]
            a = torch.nn.functional.silu(h[:48]) * h[48:]
            want[t] += w[t, j] * (w2[e] @ a)
    torch.testing.assert_close(REF.fused_experts_oracle(x, w1, w2, w, ids), want,
                               atol=1e-5, rtol=1e-5)


def _vllm_cpu_fused_moe():
    try:
        import vllm._custom_ops as ops

        return torch.ops._C.cpu_fused_moe, ops.cpu_prepack_moe_weight
    except Exception as exc:
        pytest.skip(f"vLLM's CPU fused MoE is not usable here: {type(exc).__name__}: {exc}")


@pytest.mark.skipif(ON_GPU, reason="vLLM's CPU op")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_reference_vs_vllm_cpu_fused_moe(dtype, activation):
    """The reference against vLLM's own CPU kernel (torch.ops._C.cpu_fused_moe, isa "vec").
    It needs the weights prepacked (cpu_prepack_moe_weight, as CPUUnquantizedExperts does)
    and N a multiple of 32 (its output tile): N = 96. fp16 is not compared (the CPU op
    converts through its own paths). Its rounding points differ (it keeps more in fp32), so
    the comparison uses a bf16 tolerance of a few ulps relative to the output scale."""
    fused, prepack = _vllm_cpu_fused_moe()
    M, K, N, E, k = 7, 64, 96, 8, 2
    x, w1, w2, w, ids = _inputs(M, K, N, E, k, dtype, seed=31)
    out = torch.empty(M, K, dtype=dtype)
    fused(out, x, prepack(w1, "vec"), prepack(w2, "vec"), None, None, w, ids, False,
          activation, "vec")
    want = REF.fused_experts_reference(x, w1, w2, w, ids, activation=activation)
    atol, rtol = (1e-4, 1e-4) if dtype == torch.float32 else (3e-2, 3e-2)
    torch.testing.assert_close(out, want, atol=atol, rtol=rtol)
    # skip_weighted=True (apply_router_weight_on_input, k = 1, vLLM's modular path: prepare()
    # multiplies hidden_states by the weight first): the op computes the unweighted MoE of
    # its input, and OVERWRITES topk_weights with ones in place (seen here), so give it a copy.
    ids1, w1r = ids[:, :1].contiguous(), w[:, :1].contiguous()
    scratch = w1r.clone()
    out1 = torch.empty(M, K, dtype=dtype)
    fused(out1, (x.float() * w1r).to(dtype), prepack(w1, "vec"), prepack(w2, "vec"), None,
          None, scratch, ids1, True, activation, "vec")
    assert torch.equal(scratch, torch.ones_like(scratch))
    want1 = REF.fused_experts_reference(x, w1, w2, w1r, ids1, activation=activation,
                                        apply_router_weight_on_input=True)
    torch.testing.assert_close(out1, want1, atol=atol * 3, rtol=rtol * 3)


# ----------------------------------------------------------------------------- alignment

def test_torch_align_contract():
    ids = torch.tensor([[0, 3], [3, 1], [0, 3], [7, 1]], dtype=torch.int32)
    length, blocks = moe_experts.aligned_buffer_sizes(ids.numel(), 4, 4)
    s = torch.empty(length, dtype=torch.int32)
    b = torch.empty(blocks, dtype=torch.int32)
    n = torch.empty(1, dtype=torch.int32)
    torch_moe_align_block_size(ids, 4, 4, s, b, n)
    assert int(n) == 12  # experts 0, 1, 3 each one block of 4; id 7 skipped
    assert s[:12].tolist() == [0, 4, 8, 8, 3, 7, 8, 8, 1, 2, 5, 8]
    assert b[:3].tolist() == [0, 1, 3]


# ----------------------------------------------------------------------------- bad inputs

def _good():
    return _inputs(3, 32, 48, 4, 2, torch.float32)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(activation="relu"), r"activation 'relu'.*silu, gelu, gelu_tanh"),
    (lambda a: a.update(hidden_states=a["hidden_states"].view(-1)), r"hidden_states"),
    (lambda a: a.update(hidden_states=a["hidden_states"].double()), r"hidden_states.dtype"),
    (lambda a: a.update(w1=a["w1"][:, :, :16]), r"w1.shape.*K = hidden_states"),
    (lambda a: a.update(w1=a["w1"][:, :95]), r"w1.shape.*2N even"),
    (lambda a: a.update(w1=a["w1"][0]), r"w1.shape"),
    (lambda a: a.update(w2=a["w2"][:, :, :40]), r"w2.shape.*\(4, 32, 48\)"),
    (lambda a: a.update(w2=a["w2"][:3]), r"w2.shape"),
    (lambda a: a.update(w1=a["w1"].half()), r"w1.dtype"),
    (lambda a: a.update(w2=a["w2"].transpose(1, 2).contiguous().transpose(1, 2)),
     r"w2.stride"),
    (lambda a: a.update(topk_ids=a["topk_ids"][:2]), r"topk_ids.shape"),
    (lambda a: a.update(topk_ids=a["topk_ids"].float()), r"topk_ids.dtype"),
    (lambda a: a.update(topk_ids=a["topk_ids"].to(torch.int16)), r"topk_ids.dtype"),
    (lambda a: a.update(topk_weights=a["topk_weights"][:, :1]), r"topk_weights.shape"),
    (lambda a: a.update(topk_weights=a["topk_weights"].int()), r"topk_weights.dtype"),
    (lambda a: a.update(apply_router_weight_on_input=True), r"apply_router_weight_on_input"),
    (lambda a: a.update(expert_map=torch.zeros(4, 2, dtype=torch.int32)), r"expert_map"),
    (lambda a: a.update(expert_map=torch.zeros(4)), r"expert_map"),
    (lambda a: a.update(expert_map=torch.zeros(6, dtype=torch.int32), global_num_experts=8),
     r"expert_map.numel\(\) is 6.*global_num_experts = 8"),
    (lambda a: a.update(global_num_experts=2), r"global_num_experts is 2"),
    (lambda a: a.update(global_num_experts=0), r"global_num_experts is 0"),
])
def test_bad_inputs(mutate, match):
    x, w1, w2, w, ids = _good()
    args = dict(hidden_states=x, w1=w1, w2=w2, topk_weights=w, topk_ids=ids)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        moe_experts.fused_experts(**args)


def test_reference_rejects_bad_activation():
    x, w1, w2, w, ids = _good()
    with pytest.raises(ValueError, match="relu.*silu, gelu, gelu_tanh"):
        REF.fused_experts_reference(x, w1, w2, w, ids, activation="relu")


# ----------------------------------------------------------------------------- configs

def test_configs_table_and_heuristic():
    from fl_dispatch_flagos.kernels_moe_gemm import ACT_GELU, ACT_GELU_TANH, ACT_SILU
    from fl_dispatch_flagos.moe_tuned import MEASURED

    assert moe_experts.ACTIVATIONS == {"silu": ACT_SILU, "gelu": ACT_GELU,
                                       "gelu_tanh": ACT_GELU_TANH}
    c = moe_configs.config(1, 8, 14336, 4096, 2, torch.bfloat16, "NVIDIA H200")
    # the rows measured on the H200 (moe_tuned.py) win over the vLLM-derived ones
    assert c == MEASURED[("NVIDIA_H200", 8, 14336, 4096, 2, "bfloat16")][1]
    c = moe_configs.config(2, 8, 14336, 4096, 2, torch.bfloat16, "NVIDIA H200")
    assert c["BLOCK_SIZE_M"] == 32 and c["gemm1"]["BLOCK_SIZE_N"] == 32  # vLLM's M=2 row,
    # BLOCK_N halved: GEMM1 keeps two accumulators (gate and up)
    c = moe_configs.config(5000, 256, 2048, 7168, 8, "bfloat16", "NVIDIA H200 NVL")
    assert c["BLOCK_SIZE_M"] == 128
    h = moe_configs.config(3, 4, 48, 32, 2, torch.float32, None)
    assert h["gemm1"]["BLOCK_SIZE_N"] == 64 and h["gemm1"]["BLOCK_SIZE_K"] == 32
    for g in ("gemm1", "gemm2"):
        assert set(h[g]) == set(moe_configs._KEYS)


# ----------------------------------------------------------------------------- PDL
# Programmatic dependent launch of GEMM2 (gemm2 keys PDL, PDL_TRIGGER): compiled kernels on
# sm_90+ only. On the CPU the keys must change nothing (the interpreter cannot run
# griddepcontrol); the compile test checks the PTX both ways; the GPU tests check bit-for-bit
# equality with PDL off, eager and under CUDA-graph replay.

def _package_module(name):
    import importlib

    return importlib.import_module(f"{moe_experts.__package__}.{name}")


def _pdl(g2, **keys):
    return {**g2, "PDL": 1, **keys}


def _named_rest(kernel, tensors, rest):
    """{parameter name: value} of a launch's non-tensor arguments."""
    import importlib
    import inspect

    fn = getattr(importlib.import_module(kernel.module), kernel.name)
    names = list(inspect.signature(fn).parameters)[len(tensors):]
    return dict(zip(names, rest, strict=True))


class _LaunchSpy:
    """Wraps a TritonKernel's launch: records ({parameter name: value} of the non-tensor
    arguments, launch_pdl) and launches."""

    def __init__(self, kernel, monkeypatch):
        self.calls = []
        real = kernel.launch

        def launch(key, grid, device, tensors, ptrs, rest, num_warps, num_stages=None,
                   launch_pdl=False):
            self.calls.append((_named_rest(kernel, tensors, rest), launch_pdl))
            real(key, grid, device, tensors, ptrs, rest, num_warps, num_stages, launch_pdl)

        monkeypatch.setattr(kernel, "launch", launch)


def test_pdl_refused_under_the_interpreter_and_off_cuda(monkeypatch):
    """pdl_available: never for CPU tensors, never under the interpreter (even on a device
    that has it), never on ROCm or below sm_90."""
    # Triton imported before the variable is set: a first import under TRITON_INTERPRET=1
    # would bind triton.language's library functions to the interpreter for the whole process,
    # and every later compile (the GPU tests after this one) would fail
    import triton  # noqa: F401

    assert not moe_experts.pdl_available(torch.device("cpu"))
    monkeypatch.setattr(moe_experts, "_pdl_device", lambda index: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not moe_experts.pdl_available(torch.device("cuda", 0))


@pytest.mark.parametrize("cap,hip,want", [((8, 0), None, False), ((8, 9), None, False),
                                          ((9, 0), None, True), ((10, 0), None, True),
                                          ((9, 4), "6.2", False)])
def test_pdl_device_gate(monkeypatch, cap, hip, want):
    """sm_90+ on CUDA, with a Triton that has the launch option (3.6 and 3.9 have)."""
    from triton.backends.nvidia.compiler import CUDAOptions

    has_option = "launch_pdl" in CUDAOptions.__dataclass_fields__
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap)
    monkeypatch.setattr(torch.version, "hip", hip)
    moe_experts._pdl_device.cache_clear()
    try:
        assert moe_experts._pdl_device(0) == (want and has_option)
    finally:
        moe_experts._pdl_device.cache_clear()


@pytest.mark.skipif(ON_GPU, reason="the interpreter's behaviour")
@pytest.mark.parametrize("M,E,k,fuse", [(1, 16, 2, 0), (1, 16, 2, 1), (2, 64, 6, 1),
                                        (7, 8, 2, 0)])
def test_pdl_keys_change_nothing_under_the_interpreter(M, E, k, fuse, monkeypatch):
    """A PDL config under the interpreter: the kernels get PDL False, trigger 0 and no
    launch_pdl (exactly the PDL-free launch), and the result is bit for bit the PDL-free
    config's (the naive path, fused or not, and the aligned one)."""
    x, w1, w2, w, ids = _inputs(M, 48, 52, E, k, torch.bfloat16, seed=61 + M + k)
    tiles = _tiles(16, 32, 32, 1, 32, 32, 1)
    tiles["gemm2"]["FUSE_SUM"] = fuse
    plain = moe_experts.fused_experts(x, w1, w2, w, ids, config=tiles)
    spies = [_LaunchSpy(kern, monkeypatch) for kern in moe_experts.KERNELS]
    for keys in ({}, {"PDL_TRIGGER": 2}, {"PDL_TRIGGER": 0}):
        cfg = {**tiles, "gemm2": _pdl(tiles["gemm2"], **keys)}
        assert torch.equal(moe_experts.fused_experts(x, w1, w2, w, ids, config=cfg), plain)
    calls = [c for spy in spies for c in spy.calls]
    assert len(calls) == 6
    assert all(launch_pdl is False for _, launch_pdl in calls)
    for rest, _ in spies[1].calls + spies[2].calls:
        assert rest["PDL"] is False
    for rest, _ in spies[0].calls:
        assert rest["PDL_TRIGGER"] == 0


def test_pdl_zero_launches_as_before(monkeypatch):
    """PDL 0 (or absent): the launches carry trigger 0, PDL False and no launch_pdl,
    whatever PDL_TRIGGER says, and the result is the same bits."""
    x, w1, w2, w, ids = _inputs(1, 48, 52, 16, 2, torch.float16, seed=67)
    tiles = _tiles(16, 32, 32, 1, 32, 32, 1)
    plain = moe_experts.fused_experts(x, w1, w2, w, ids, config=tiles)
    spies = [_LaunchSpy(kern, monkeypatch) for kern in moe_experts.KERNELS]
    cfg = {**tiles, "gemm2": {**tiles["gemm2"], "PDL": 0, "PDL_TRIGGER": 1}}
    assert torch.equal(moe_experts.fused_experts(x, w1, w2, w, ids, config=cfg), plain)
    (g1_rest, g1_pdl), = spies[0].calls
    (g2_rest, g2_pdl), = spies[1].calls
    assert g1_rest["PDL_TRIGGER"] == 0 and g2_rest["PDL"] is False
    assert not g1_pdl and not g2_pdl


def test_launcher_passes_launch_pdl_only_when_asked(monkeypatch):
    """The slow path passes launch_pdl=True to Triton only when asked (the PDL-free compile
    key is untouched) and never under the interpreter; the launches then take the cached
    path as before."""
    import types

    launcher_mod = _package_module("launcher")
    seen = []

    class _Run:  # a Triton 3.9-style launcher: called through __call__
        arg_annotations = ()
        global_scratch_size = profile_scratch_size = 0

        def __call__(self, gridX, gridY, gridZ, stream, function, kernel_metadata,
                     launch_metadata, launch_enter_hook, launch_exit_hook, *args):
            seen.append(("fast", (gridX, gridY, gridZ, stream, function)))

    compiled = types.SimpleNamespace(run=_Run(), function=99, packed_metadata=("m",))

    def jit_grid(*args, **options):
        seen.append(("slow", options))
        return compiled

    kern = launcher_mod.TritonKernel("unused", "unused")
    monkeypatch.setattr(kern, "jit", lambda: {(4, 1, 1): jit_grid})
    monkeypatch.setattr(launcher_mod, "_hooks_active", lambda: False)
    monkeypatch.setattr(launcher_mod, "_stream_getter", lambda: lambda dev: 5)
    monkeypatch.setattr(launcher_mod, "interpreter_enabled", lambda: False)
    kern.launch(("a", False), (4, 1, 1), 0, ("t",), (1,), (3,), 4, 2)
    kern.launch(("b", True), (4, 1, 1), 0, ("t",), (1,), (3,), 4, 2, True)
    kern.launch(("b", True), (4, 1, 1), 0, ("t",), (1,), (3,), 4, 2, True)
    assert seen[0] == ("slow", {"num_warps": 4, "num_stages": 2})
    assert seen[1] == ("slow", {"num_warps": 4, "num_stages": 2, "launch_pdl": True})
    assert seen[2] == ("fast", (4, 1, 1, 5, 99)) and kern.slow_launches == 2
    monkeypatch.setattr(launcher_mod, "interpreter_enabled", lambda: True)
    monkeypatch.setattr(launcher_mod, "interpreter_rounds_to_nearest",
                        __import__("contextlib").nullcontext)
    kern.launch(("c", True), (4, 1, 1), 0, ("t",), (1,), (3,), 4, None, True)
    assert seen[3] == ("slow", {"num_warps": 4})


_PTRS2 = {"a_ptr": "*bf16", "a_half_ptr": "*bf16", "w_ptr": "*bf16", "c_ptr": "*bf16",
          "topk_w_ptr": "*fp32",
          "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32", "ntpp_ptr": "*i32",
          "topk_ids_ptr": "*i32", "map_ptr": "*i32"}


@pytest.mark.parametrize("pdl", [False, True])
def test_pdl_kernels_compile_for_sm90(pdl, compile_sm90):
    """The three kernels compile for sm_90 (Triton's own backend and ptxas, no GPU needed)
    with PDL on and off: on, both GEMM2s' PTX has griddepcontrol.wait and their metadata
    launch_pdl; GEMM1 has launch_dependents; off, none of them (the PDL-free kernels are the
    plain ones)."""
    km = _package_module("kernels_moe_gemm")
    common = dict(MUL_W=True, BLOCK_K=64, EVEN_K=True, IEEE=False, W_EVICT=1, UPCAST=False)
    no_tma = dict(TMA_W=False, SORTED_C=False, HALF_M=pdl)  # HALF_M compiled both ways
    g2 = compile_sm90(km, "moe_gemm2_kernel", _PTRS2,
                       dict(common, NAIVE=True, HAS_MAP=False, BLOCK_M=16, BLOCK_N=64,
                            GROUP_M=1, CLEAN_M=64, CLEAN_N=256, PDL=pdl, **no_tma),
                       num_warps=4, num_stages=4, launch_pdl=pdl)
    g2s = compile_sm90(km, "moe_gemm2_sum_kernel", _PTRS2,
                        dict(common, TOP_K=4, BLOCK_N=32, PDL=pdl),
                        num_warps=2, num_stages=4, launch_pdl=pdl)
    g1 = compile_sm90(km, "moe_gemm1_act_kernel", _PTRS2,
                       dict(common, NAIVE=True, MUL_W=False, ACT=0, BLOCK_M=16, BLOCK_N=32,
                            GROUP_M=1, PDL_TRIGGER=int(pdl), **no_tma),
                       num_warps=4, num_stages=4)
    for k in (g2, g2s):
        assert ("griddepcontrol.wait" in k.asm["ptx"]) == pdl
        assert bool(k.metadata.launch_pdl) == pdl
    assert ("griddepcontrol.launch_dependents" in g1.asm["ptx"]) == pdl


def test_prefill_kernels_compile_for_sm90_with_tma(compile_sm90):
    """The prefill variants (TMA_W, SORTED_C, HALF_M) compile for sm_90: the weights and,
    with SORTED_C, GEMM2's A tiles arrive by TMA (``cp.async.bulk.tensor``) and the tiles,
    full and half height, run on wgmma; without the keys there is no TMA load."""
    km = _package_module("kernels_moe_gemm")
    prefill = dict(MUL_W=False, EVEN_K=True, IEEE=False, UPCAST=False, NAIVE=False,
                   BLOCK_M=128, BLOCK_K=64, GROUP_M=16, W_EVICT=0)
    desc = "tensordesc<bf16[{}, 64]>"
    g1 = compile_sm90(km, "moe_gemm1_act_kernel", {**_PTRS2, "w_ptr": desc.format(128)},
                      dict(prefill, ACT=0, BLOCK_N=128, PDL_TRIGGER=0, TMA_W=True,
                           SORTED_C=True, HALF_M=True), num_warps=8, num_stages=4)
    g2 = compile_sm90(km, "moe_gemm2_kernel",
                      {**_PTRS2, "a_ptr": desc.format(128), "a_half_ptr": desc.format(64),
                       "w_ptr": desc.format(256)},
                      dict(prefill, MUL_W=True, HAS_MAP=False, BLOCK_N=256, CLEAN_M=64,
                           CLEAN_N=256, PDL=False, TMA_W=True, SORTED_C=True, HALF_M=True),
                      num_warps=8, num_stages=4)
    plain = compile_sm90(km, "moe_gemm1_act_kernel", _PTRS2,
                         dict(prefill, ACT=0, BLOCK_N=128, PDL_TRIGGER=0, TMA_W=False,
                              SORTED_C=False, HALF_M=False), num_warps=8, num_stages=4)
    for k in (g1, g2):
        assert "cp.async.bulk.tensor" in k.asm["ptx"]
        assert "wgmma.mma_async" in k.asm["ptx"]
    assert "cp.async.bulk.tensor" not in plain.asm["ptx"]


def _gpu_pdl_or_skip():
    if not ON_GPU:
        pytest.skip("PDL needs compiled kernels on a GPU (FL_FLAGOS_TEST_DEVICE=cuda)")
    if not moe_experts.pdl_available(torch.device(DEVICE)):
        pytest.skip(f"no PDL on {torch.cuda.get_device_name()} (needs sm_90+) or this Triton")


_PDL_VARIANTS = [{}, {"PDL_TRIGGER": 2}, {"PDL_TRIGGER": 0}]


_BF16, _FP32 = torch.bfloat16, torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("M,E,k,K,N,fuse,dtype", [
    (1, 16, 2, 80, 52, 0, _BF16), (1, 16, 2, 80, 52, 1, _BF16),  # N = 52: ragged GEMM2 K loop
    (1, 16, 2, 80, 52, 0, _FP32), (1, 16, 2, 80, 52, 1, _FP32),  # fp32: IEEE dots
    (2, 64, 6, 48, 48, 1, _BF16), (1, 8, 1, 64, 96, 0, _BF16),   # k = 1: GEMM2 -> output
    (7, 8, 2, 80, 52, 0, _BF16),                                  # aligned path, clean
    (4, 128, 8, 2048, 768, 0, _BF16), (4, 128, 8, 2048, 768, 1, _BF16)])  # Qwen3-like
def test_pdl_bit_for_bit_eager(M, E, k, K, N, fuse, dtype, monkeypatch):
    """GPU: every PDL variant (GEMM1's trigger at its start / after its K loop / at its exit)
    gives exactly the PDL-free bits, and GEMM2 was launched as a PDL dependent."""
    _gpu_pdl_or_skip()
    x, w1, w2, w, ids = _inputs(M, K, N, E, k, dtype, seed=71 + M + N)
    tiles = _tiles(16, 32, 64, 1, 32, 64, 1)
    tiles["gemm2"]["FUSE_SUM"] = fuse
    plain = moe_experts.fused_experts(x, w1, w2, w, ids, config=tiles)
    if K <= 128:  # the Qwen3-like reduction (2048) needs the tolerances of the GPU benches
        _close(plain, REF.fused_experts_reference(x, w1, w2, w, ids), dtype)
    fused = fuse and k > 1 and M * k * 4 <= E and dtype != torch.float32  # fp32: unfused
    spy = _LaunchSpy(moe_experts.GEMM2_SUM_KERNEL if fused else moe_experts.GEMM2_KERNEL,
                     monkeypatch)
    for keys in _PDL_VARIANTS:
        cfg = {**tiles, "gemm2": _pdl(tiles["gemm2"], **keys)}
        for _ in range(3):  # first launch (slow path, compiles), then the cached launcher
            got = moe_experts.fused_experts(x, w1, w2, w, ids, config=cfg)
            assert torch.equal(got, plain), (keys, (got.float() - plain.float()).abs().max())
    assert spy.calls and all(launch_pdl for _, launch_pdl in spy.calls)


@pytest.mark.gpu
@pytest.mark.parametrize("M,E,k,K,N,fuse", [(1, 128, 8, 2048, 768, 0),
                                            (1, 128, 8, 2048, 768, 1),
                                            (4, 128, 8, 2048, 768, 1),
                                            (1, 16, 2, 80, 52, 0), (7, 8, 2, 80, 52, 0)])
def test_pdl_cuda_graph_replay_with_new_routing(M, E, k, K, N, fuse):
    """GPU: captured with PDL (programmatic edges in the graph), replayed after new routing,
    weights and activations were copied in: exactly the PDL-free eager result; replayed
    twice more, still the same (no race on the reuse of the graph's buffers)."""
    _gpu_pdl_or_skip()
    x, w1, w2, w, ids = _inputs(M, K, N, E, k, torch.bfloat16, seed=81 + M)
    tiles = _tiles(16, 32, 64, 1, 32, 64, 1)
    tiles["gemm2"]["FUSE_SUM"] = fuse
    cfg = {**tiles, "gemm2": _pdl(tiles["gemm2"])}
    moe_experts.fused_experts(x, w1, w2, w, ids, config=cfg)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_experts.fused_experts(x, w1, w2, w, ids, config=cfg)
    x2, _, _, w_2, ids2 = _inputs(M, K, N, E, k, torch.bfloat16, seed=91 + M)
    x.copy_(x2)
    w.copy_(w_2)
    ids.copy_(ids2)
    graph.replay()
    torch.cuda.synchronize()
    want = moe_experts.fused_experts(x, w1, w2, w, ids, config=tiles)
    assert torch.equal(out, want)
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@pytest.mark.parametrize("M,E,k,fuse", [(1, 128, 8, 0), (1, 128, 8, 1), (4, 128, 8, 0),
                                        (7, 8, 2, 0)])
def test_pdl_launch_arguments(M, E, k, fuse, monkeypatch):
    """What the adapter hands the launcher when PDL is available (faked; nothing runs):
    GEMM1 gets the trigger, GEMM2 (fused or not) PDL and launch_pdl; the launch keys differ
    from the PDL-free ones."""
    launches = {}

    def recorder(name):
        def launch(key, grid, device, tensors, ptrs, rest, num_warps, num_stages=None,
                   launch_pdl=False):
            named = _named_rest(getattr(moe_experts, name), tensors, rest)
            launches.setdefault(name, []).append((key, grid, named, num_warps, launch_pdl))
        return launch

    for name in ("GEMM1_KERNEL", "GEMM2_KERNEL", "GEMM2_SUM_KERNEL"):
        monkeypatch.setattr(getattr(moe_experts, name), "launch", recorder(name))
    monkeypatch.setattr(moe_experts, "_sum", lambda *a: None)
    K, N = 2048, 768
    x = torch.zeros(M, K, dtype=torch.bfloat16, device=DEVICE)
    # expanded (stride 0 over experts): the launches need shapes and strides, not memory
    w1 = torch.zeros(1, 2 * N, K, dtype=torch.bfloat16, device=DEVICE).expand(E, -1, -1)
    w2 = torch.zeros(1, K, N, dtype=torch.bfloat16, device=DEVICE).expand(E, -1, -1)
    w = torch.ones(M, k, device=DEVICE)
    ids = torch.arange(M * k, dtype=torch.int32, device=DEVICE).view(M, k) % E
    tiles = _tiles(16, 32, 64, 1, 64, 64, 1)
    tiles["gemm2"]["FUSE_SUM"] = fuse
    moe_experts.fused_experts(x, w1, w2, w, ids, config=tiles)
    monkeypatch.setattr(moe_experts, "pdl_available", lambda device: True)
    moe_experts.fused_experts(x, w1, w2, w, ids, config=tiles)  # no PDL key: as before
    cfg = {**tiles, "gemm2": _pdl(tiles["gemm2"], PDL_TRIGGER=2)}
    moe_experts.fused_experts(x, w1, w2, w, ids, config=cfg)
    fused = fuse and moe_experts.use_naive_assignment(M, k, E, None)
    g2 = launches["GEMM2_SUM_KERNEL" if fused else "GEMM2_KERNEL"]
    g1 = launches["GEMM1_KERNEL"]
    assert len(g1) == len(g2) == 3
    assert g1[0][:4] == g1[1][:4] and g2[0][:4] == g2[1][:4]  # PDL absent: unchanged
    assert g1[2][2]["PDL_TRIGGER"] == 2 and g1[2][0] != g1[0][0] and not g1[2][4]  # no PDL
    key, grid, rest, _, launch_pdl = g2[2]
    assert launch_pdl and key != g2[0][0] and grid == g2[0][1]
    assert rest["PDL"] is True
    assert g2[0][2]["PDL"] is False and not g2[0][4]
