"""Triton kernels: ``moe_align_block_size`` (v1: one-CTA and three-kernel paths; v2: one-CTA
and two-kernel paths, see "align, v2"; fan: one launch of independent programs for decode
sizes, see "align, fan") and ``moe_sum``.

Plain functions, decorated by :mod:`.launcher` on first use. No host synchronisation: every
size the host needs is known from shapes; the data-dependent results (segment offsets, the
number of used blocks) stay on the device, so the launches can be captured in a CUDA graph.

Alignment contract (see the adapter ``moe_routing.moe_align_block_size``): route ``i`` (flat
index into ``topk_ids``) with expert ``e`` in ``[0, E)`` lands in expert ``e``'s segment,
which starts at ``sum_{e' < e} cdiv(count_e', bs) * bs``; every other slot of
``sorted_token_ids`` holds the pad value ``numel``; ``experts_ids[b]`` is the expert of block
``b`` (mapped through ``expert_map``) for the used blocks, 0 after them.

Expert ids of the blocks without a search or a barrier: with ``end[e]`` the block where
expert ``e``'s segment ends (exclusive), the expert of block ``b`` is the number of experts
with ``end[e] <= b`` (empty experts included: they end where their predecessor does). Per
chunk of BLOCK_B blocks that is an inclusive cumsum of a ``tl.histogram`` of
``clamp(end - b0, 0, BLOCK_B - 1)``, minus the experts clamped down into the last bin.
Rank of a route inside its segment: ``atomic_add`` on a per-expert cursor (one CTA), or on a
per-(tile, expert) cursor (large path: no global hot spot, each cursor is private to the
tile that owns it); order within an expert is therefore unspecified, as in vLLM.
"""

from __future__ import annotations

import triton.language as tl

_sum = tl.standard._sum_combine
"""Combiner for ``tl.reduce``/``tl.associative_scan`` (see kernels_norm: ``tl.sum`` and
``tl.cumsum`` are jit functions bound to the mode active when Triton was imported; the
interpreter recognises this combiner and reduces with numpy, while a custom one runs element
by element there: the routing tests took over ten times longer with one)."""


def _experts_of(ids_ptr, offs, numel, n_experts, skip):
    """``(e, v)`` of the routes at ``offs``: ``v`` where the route exists (``< numel``) and
    its id is an expert in ``[0, n_experts)``, ``e`` that expert (int32), ``skip`` elsewhere."""
    m = offs < numel
    raw = tl.load(ids_ptr + offs, mask=m, other=-1)
    v = m & (raw >= 0) & (raw < n_experts)
    return tl.where(v, raw, skip).to(tl.int32), v


def _segments(counts, block_size):
    """``(padded, starts, total)`` of per-expert route counts: each count rounded up to a
    multiple of ``block_size``, their exclusive cumsum (the segments' first slots) and sum
    (``num_tokens_post_pad``)."""
    padded = (counts + block_size - 1) // block_size * block_size
    return padded, tl.associative_scan(padded, 0, _sum) - padded, tl.reduce(padded, 0, _sum)


def _rank(o, e, v):
    """Per route (flat index ``o``, expert ``e``), the number of routes of the same expert
    with a smaller flat index among these: its rank by comparison (a square mask, no atomics),
    so the order inside an expert is the flat order. ``v`` (or None: the skipped routes have
    an expert of their own) masks the skipped routes out of the count."""
    earlier = (o[None, :] < o[:, None]) & (e[:, None] == e[None, :])
    if v is not None:
        earlier = earlier & v[None, :]
    return tl.reduce(earlier.to(tl.int32), 1, _sum)


def _place(sorted_ptr, eids_ptr, map_ptr, o, e, v, p, block_size, HAS_MAP: tl.constexpr):
    """The valid (``v``) routes ``o`` into slots ``p``; a route in the first slot of a block
    writes the block's expert ``e`` (through ``expert_map`` when HAS_MAP) to ``experts_ids``
    (v2: segments start at multiples of the block size)."""
    tl.store(sorted_ptr + p, o, mask=v)
    head = v & (p % block_size == 0)
    if HAS_MAP:
        e_out = tl.load(map_ptr + e, mask=head, other=0).to(tl.int32)
    else:
        e_out = e
    tl.store(eids_ptr + p // block_size, e_out, mask=head)


def _block_experts(eids_ptr, map_ptr, starts, padded, emask, total, block_size, eids_len,
                   HAS_MAP: tl.constexpr, BLOCK_B: tl.constexpr):
    """v1: ``experts_ids`` of every block by histograms of the segments' ends (module doc);
    0 for the unused blocks."""
    end_blk = tl.where(emask, (starts + padded) // block_size, 2**30)
    used = total // block_size
    bcols = tl.arange(0, BLOCK_B)
    for b0 in range(0, eids_len, BLOCK_B):
        v = tl.minimum(tl.maximum(end_blk - b0, 0), BLOCK_B - 1)
        over = tl.reduce((end_blk - b0 >= BLOCK_B).to(tl.int32), 0, _sum)
        hist = tl.histogram(v, BLOCK_B)
        e_of_b = tl.associative_scan(hist, 0, _sum) - tl.where(bcols == BLOCK_B - 1, over, 0)
        bo = b0 + bcols
        inuse = bo < used
        if HAS_MAP:
            e_of_b = tl.load(map_ptr + e_of_b, mask=inuse, other=0)
        tl.store(eids_ptr + bo, tl.where(inuse, e_of_b, 0).to(tl.int32), mask=bo < eids_len)


def _fill(ptr, value, lo, n, lower, upper, BLOCK: tl.constexpr):
    """``ptr[i] = value`` for ``i`` in ``[lo, lo + n)`` with ``lower <= i < upper`` (``lo``
    None: 0, and ``n`` is ``upper``; ``lower`` None: no lower bound)."""
    fill = tl.full([BLOCK], 0, tl.int32) + value
    for i0 in range(0, n, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        if lo is None:
            mask = i < upper
        else:
            mask = (i < n) & (lo + i < upper)
            i = lo + i
        if lower is not None:
            mask = mask & (i >= lower)
        tl.store(ptr + i, fill, mask=mask)


JIT_HELPERS = ("_experts_of", "_segments", "_rank", "_place", "_block_experts", "_fill")
"""Device functions of these kernels: :mod:`.launcher` decorates them with the kernel that
calls them, for the same mode (compiler or interpreter)."""


def moe_align_small_kernel(
    ids_ptr, sorted_ptr, eids_ptr, ntpp_ptr, cursor_ptr, map_ptr,
    numel, n_experts, block_size, sorted_len, eids_len,
    HAS_MAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """The whole op in one program (numel <= BLOCK_N): histogram, padded exclusive cumsum,
    pad fill, atomic scatter, expert ids of the blocks. ``cursor_ptr``: int32
    scratch of at least E entries (no initial value needed). BLOCK_E > E (bin E collects the
    skipped routes)."""
    offs = tl.arange(0, BLOCK_N)
    ex, valid = _experts_of(ids_ptr, offs, numel, n_experts, n_experts)
    ecols = tl.arange(0, BLOCK_E)
    emask = ecols < n_experts
    counts = tl.where(emask, tl.histogram(ex, BLOCK_E), 0)
    padded, starts, total = _segments(counts, block_size)
    tl.store(ntpp_ptr, total)
    _fill(sorted_ptr, numel, None, sorted_len, None, sorted_len, BLOCK_S)
    tl.store(cursor_ptr + ecols, starts, mask=emask)
    tl.debug_barrier()  # pad fill and cursors before the scatter (other threads' slots)
    pos = tl.atomic_add(cursor_ptr + ex, 1, mask=valid)
    tl.store(sorted_ptr + pos, offs, mask=valid)
    # experts_ids[b] = #experts whose segment ends at or before block b (see module doc)
    _block_experts(eids_ptr, map_ptr, starts, padded, emask, total, block_size, eids_len,
                   HAS_MAP, BLOCK_B)


def moe_align_count_kernel(
    ids_ptr, counts_ptr, sorted_ptr,
    numel, n_experts, sorted_len, fill_per_prog,
    TILE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Large path, step 1 (grid: tiles of TILE routes): the tile's expert histogram into
    ``counts[pid, :E]``; this program's share of the pad fill of ``sorted_token_ids``."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
    ex, _ = _experts_of(ids_ptr, offs, numel, n_experts, n_experts)
    ecols = tl.arange(0, BLOCK_E)
    counts = tl.histogram(ex, BLOCK_E)
    tl.store(counts_ptr + pid.to(tl.int64) * n_experts + ecols, counts,
             mask=ecols < n_experts)
    _fill(sorted_ptr, numel, pid.to(tl.int64) * fill_per_prog, fill_per_prog, None, sorted_len,
          BLOCK_S)


def moe_align_scan_kernel(
    counts_ptr, eids_ptr, ntpp_ptr, map_ptr,
    n_tiles, n_experts, block_size, eids_len,
    HAS_MAP: tl.constexpr, BLOCK_TILES: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Large path, step 2 (one program): per-expert totals over the tiles, padded segment
    starts, ``num_tokens_post_pad``; ``counts[tile, e]`` is overwritten in place with the
    first slot of tile ``tile``'s routes of expert ``e`` (the scatter's cursors); block
    ``experts_ids`` (see the module doc)."""
    ecols = tl.arange(0, BLOCK_E)
    emask = ecols < n_experts
    trows = tl.arange(0, BLOCK_TILES)
    totals = tl.full([BLOCK_E], 0, tl.int32)
    for t0 in range(0, n_tiles, BLOCK_TILES):
        t = t0 + trows
        m = (t < n_tiles)[:, None] & emask[None, :]
        c = tl.load(counts_ptr + t.to(tl.int64)[:, None] * n_experts + ecols[None, :],
                    mask=m, other=0)
        totals += tl.reduce(c, 0, _sum)
    padded, starts, total = _segments(totals, block_size)
    tl.store(ntpp_ptr, total)
    tl.debug_barrier()  # every thread's totals loads before any cursor is written in place
    running = starts
    for t0 in range(0, n_tiles, BLOCK_TILES):
        t = t0 + trows
        m = (t < n_tiles)[:, None] & emask[None, :]
        ptrs = counts_ptr + t.to(tl.int64)[:, None] * n_experts + ecols[None, :]
        c = tl.load(ptrs, mask=m, other=0)
        incl = tl.associative_scan(c, 0, _sum)
        tl.debug_barrier()
        tl.store(ptrs, running[None, :] + incl - c, mask=m)
        running += tl.reduce(c, 0, _sum)
    _block_experts(eids_ptr, map_ptr, starts, padded, emask, total, block_size, eids_len,
                   HAS_MAP, BLOCK_B)


def moe_align_scatter_kernel(
    ids_ptr, cursor_ptr, sorted_ptr,
    numel, n_experts,
    TILE: tl.constexpr,
):
    """Large path, step 3 (grid: the tiles of step 1): each route takes the next slot of its
    (tile, expert) cursor and writes its flat index there."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
    ex, valid = _experts_of(ids_ptr, offs, numel, n_experts, 0)
    pos = tl.atomic_add(cursor_ptr + pid.to(tl.int64) * n_experts + ex, 1, mask=valid)
    tl.store(sorted_ptr + pos, offs.to(tl.int32), mask=valid)



# ----------------------------------------------------------------------------- align, v2
# Expert ids of the blocks (v2): every used block holds the route of rank j*bs of its expert
# (segments start at multiples of bs and hold cdiv(count, bs) blocks), so the route whose slot
# ``pos`` has ``pos % bs == 0`` writes ``experts_ids[pos // bs]`` itself: no per-block search,
# no histogram over blocks; the blocks from ``num_tokens_post_pad / bs`` on are zeroed (no
# route writes them, so that fill needs no ordering against the scatter).


def moe_align_one_kernel(
    ids_ptr, sorted_ptr, eids_ptr, ntpp_ptr, cursor_ptr, map_ptr,
    numel, n_experts, block_size, sorted_len, eids_len,
    HAS_MAP: tl.constexpr, RANK: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """v2, the whole op in one program, one launch; routes in chunks of BLOCK_N (ONE_CHUNK:
    numel <= BLOCK_N, the routes stay in registers between the two phases). Phase 1: expert
    histogram, padded exclusive cumsum (``tl.associative_scan``), ``num_tokens_post_pad``,
    pad/zero fills. Phase 2, rank of a route inside its expert:
    RANK 0: ``atomic_add`` (relaxed, CTA scope) on per-expert cursors in ``cursor_ptr``
    (int32 scratch, >= E entries, no initial value needed);
    RANK 1: no atomics, no scratch: the expert's start plus the routes of that expert in the
    earlier chunks (``tl.gather`` of a running histogram) plus the rank inside the chunk by
    comparison (a BLOCK_N x BLOCK_N mask). BLOCK_E > E (bin E collects the skipped routes)."""
    ecols = tl.arange(0, BLOCK_E)
    emask = ecols < n_experts
    if ONE_CHUNK:
        offs = tl.arange(0, BLOCK_N)
        ex, valid = _experts_of(ids_ptr, offs, numel, n_experts, n_experts)
        counts = tl.histogram(ex, BLOCK_E)
    else:
        counts = tl.full([BLOCK_E], 0, tl.int32)
        for c0 in range(0, numel, BLOCK_N):
            e, _ = _experts_of(ids_ptr, c0 + tl.arange(0, BLOCK_N), numel, n_experts,
                               n_experts)
            counts += tl.histogram(e, BLOCK_E)
    counts = tl.where(emask, counts, 0)
    padded, starts, total = _segments(counts, block_size)
    tl.store(ntpp_ptr, total)
    _fill(sorted_ptr, numel, None, sorted_len, None, sorted_len, BLOCK_S)
    _fill(eids_ptr, 0, None, eids_len, total // block_size, eids_len, BLOCK_S)
    if RANK == 0:
        tl.store(cursor_ptr + ecols, starts, mask=emask)
    tl.debug_barrier()  # pad fill (and cursors) before the scatter (other threads' slots)
    if ONE_CHUNK:
        if RANK == 0:
            pos = tl.atomic_add(cursor_ptr + ex, 1, mask=valid, sem="relaxed", scope="cta")
        else:
            pos = tl.gather(starts, ex, 0) + _rank(offs, ex, None)
        _place(sorted_ptr, eids_ptr, map_ptr, offs, ex, valid, pos, block_size, HAS_MAP)
    else:
        running = starts
        for c0 in range(0, numel, BLOCK_N):
            o = c0 + tl.arange(0, BLOCK_N)
            e, v = _experts_of(ids_ptr, o, numel, n_experts, n_experts)
            if RANK == 0:
                p = tl.atomic_add(cursor_ptr + e, 1, mask=v, sem="relaxed", scope="cta")
            else:
                p = tl.gather(running, e, 0) + _rank(o, e, None)
                running += tl.histogram(e, BLOCK_E)
            _place(sorted_ptr, eids_ptr, map_ptr, o, e, v, p, block_size, HAS_MAP)


def moe_align_place_kernel(
    ids_ptr, counts_ptr, cursor_ptr, sorted_ptr, eids_ptr, ntpp_ptr, map_ptr,
    numel, n_tiles, n_experts, block_size, eids_len, eids_per_prog,
    HAS_MAP: tl.constexpr, RANK: tl.constexpr, TILE: tl.constexpr,
    BLOCK_TILES: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """v2 large path, step 2 of 2 (step 1: ``moe_align_count_kernel``, same TILE and grid).
    Program ``pid`` reads every tile's counts, recomputes the per-expert totals and padded
    starts (no single-program scan step, no extra launch) and the routes of each expert in
    the tiles before its own; its tile's routes take slots from private cursors
    (``cursor[pid, e]``, relaxed CTA-scope atomics: no cross-program hot spot). Program 0
    writes ``num_tokens_post_pad``; each zeroes its share of the unused blocks.
    RANK 0: BLOCK_E >= E (no bin for the skipped routes: they are masked); RANK 1 (no atomics:
    no same-address serialisation when few experts take many routes): the tile in chunks of
    CHUNK routes, ranked by comparison as ``moe_align_one_kernel``'s RANK 1, BLOCK_E > E."""
    pid = tl.program_id(0)
    ecols = tl.arange(0, BLOCK_E)
    emask = ecols < n_experts
    trows = tl.arange(0, BLOCK_TILES)
    totals = tl.full([BLOCK_E], 0, tl.int32)
    before = tl.full([BLOCK_E], 0, tl.int32)
    for t0 in range(0, n_tiles, BLOCK_TILES):
        t = t0 + trows
        m = (t < n_tiles)[:, None] & emask[None, :]
        c = tl.load(counts_ptr + t.to(tl.int64)[:, None] * n_experts + ecols[None, :],
                    mask=m, other=0)
        totals += tl.reduce(c, 0, _sum)
        before += tl.reduce(tl.where((t < pid)[:, None], c, 0), 0, _sum)
    padded, starts, total = _segments(totals, block_size)
    tl.store(ntpp_ptr, total, mask=pid == 0)
    _fill(eids_ptr, 0, pid * eids_per_prog, eids_per_prog, total // block_size, eids_len,
          BLOCK_S)
    if RANK == 0:
        cur = cursor_ptr + pid.to(tl.int64) * n_experts
        tl.store(cur + ecols, starts + before, mask=emask)
        tl.debug_barrier()  # this program's cursors before its atomics
        offs = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
        ex, valid = _experts_of(ids_ptr, offs, numel, n_experts, 0)
        pos = tl.atomic_add(cur + ex, 1, mask=valid, sem="relaxed", scope="cta")
        _place(sorted_ptr, eids_ptr, map_ptr, offs.to(tl.int32), ex, valid, pos, block_size,
               HAS_MAP)
    else:
        running = starts + before
        for c0 in range(0, TILE, CHUNK):
            o = pid.to(tl.int64) * TILE + c0 + tl.arange(0, CHUNK)
            e, v = _experts_of(ids_ptr, o, numel, n_experts, n_experts)
            p = tl.gather(running, e, 0) + _rank(o, e, None)
            running += tl.histogram(e, BLOCK_E)
            _place(sorted_ptr, eids_ptr, map_ptr, o.to(tl.int32), e, v, p, block_size,
                   HAS_MAP)


# ----------------------------------------------------------------------------- align, fan
# One launch of P independent programs, each redoing the (cheap) expert histogram of all
# routes, so that the stores (the pad fill above all: numel + E*(bs-1) slots) come from P SMs
# instead of one, with no scratch, no atomics, no barrier and no inter-program dependency.
# The slots of ``sorted_token_ids`` split into three disjoint kinds, each written by exactly
# one program: route slots ``[start_e, start_e + count_e)`` (by the route's own program, see
# below), in-segment pads ``[start_e + count_e, start_e + padded_e)`` (by the owner of expert
# e: experts_per_prog consecutive experts per program) and the tail ``[total, sorted_len)``
# (fixed ranges of slots_per_prog slots, masked to the tail: no ordering against the rest).


def moe_align_fan_kernel(
    ids_ptr, sorted_ptr, eids_ptr, ntpp_ptr, map_ptr,
    numel, n_experts, block_size, sorted_len, eids_len,
    experts_per_prog, slots_per_prog, blocks_per_prog,
    HAS_MAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr, PAD_ROWS: tl.constexpr, PAD_COLS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Fan path (grid: ``cdiv(numel, CHUNK)`` programs, numel <= BLOCK_N; see "align, fan").
    Program ``pid``: histogram of all routes and of the routes before its chunk
    ``[pid*CHUNK, +CHUNK)``, padded exclusive cumsum; its chunk's routes at ``start_e +
    (routes of e before the chunk) + (rank inside the chunk by comparison, a CHUNK x CHUNK
    mask)``: a deterministic, stable order (flat index order inside each expert); the route of
    rank ``j*bs`` writes its block's expert id (as v2); the in-segment pads of its experts in
    [PAD_ROWS experts, PAD_COLS slots] tiles; its share of the tail pads and of the zeroed
    unused blocks. Program 0 writes ``num_tokens_post_pad``. BLOCK_E >= E: the skipped routes
    are masked out of the histograms (``tl.histogram``'s mask), not binned."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    ex, valid = _experts_of(ids_ptr, offs, numel, n_experts, 0)
    r_lo = pid * CHUNK
    counts = tl.histogram(ex, BLOCK_E, mask=valid)
    before = tl.histogram(ex, BLOCK_E, mask=valid & (offs < r_lo))
    padded, starts, total = _segments(counts, block_size)
    tl.store(ntpp_ptr, total, mask=pid == 0)
    # this program's routes
    o = r_lo + tl.arange(0, CHUNK)
    e, v = _experts_of(ids_ptr, o, numel, n_experts, 0)
    p = tl.gather(starts + before, e, 0) + _rank(o, e, v)
    _place(sorted_ptr, eids_ptr, map_ptr, o, e, v, p, block_size, HAS_MAP)
    # the in-segment pads of this program's experts: [start + count, next multiple of bs)
    # (segments start at multiples of bs)
    fill_end = starts + counts
    e_lo = pid * experts_per_prog
    prow = tl.arange(0, PAD_ROWS)
    pcol = tl.arange(0, PAD_COLS)
    pad2 = tl.full([PAD_ROWS, PAD_COLS], 0, tl.int32) + numel
    for r0 in range(0, experts_per_prog, PAD_ROWS):
        rows = e_lo + r0 + prow
        rm = (r0 + prow < experts_per_prog) & (rows < n_experts)
        fe = tl.gather(fill_end, tl.where(rm, rows, 0), 0)
        se = (fe + block_size - 1) // block_size * block_size
        for j0 in range(0, block_size - 1, PAD_COLS):
            slot = fe[:, None] + j0 + pcol[None, :]
            tl.store(sorted_ptr + slot, pad2, mask=rm[:, None] & (slot < se[:, None]))
    # this program's share of the tail and of the unused blocks
    _fill(sorted_ptr, numel, pid * slots_per_prog, slots_per_prog, total, sorted_len, BLOCK_S)
    _fill(eids_ptr, 0, pid * blocks_per_prog, blocks_per_prog, total // block_size, eids_len,
          BLOCK_B)


def moe_sum_kernel(
    in_ptr, out_ptr,
    n_rows, hidden, stride_it, stride_ik, stride_ot, n_hblocks,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program pid -> rows block pid // n_hblocks, columns block pid % n_hblocks:
    out[t, h] = sum_j in[t, j, h], fp32 accumulation, one rounding. Last dims unit-stride."""
    pid = tl.program_id(0)
    rows = (pid // n_hblocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = (pid % n_hblocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < n_rows)[:, None] & (cols < hidden)[None, :]
    rows64 = rows.to(tl.int64)
    src = in_ptr + rows64[:, None] * stride_it + cols[None, :]
    acc = tl.full([BLOCK_T, BLOCK_H], 0.0, tl.float32)
    for j in tl.static_range(K):
        acc += tl.load(src + j * stride_ik, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows64[:, None] * stride_ot + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)
