"""The whole MoE layer in one CUDA graph vs the sum of its pieces, on one GPU.

Target (MoE issue): "The whole MoE layer (routing, alignment, experts, sum) in one graph: no
more than the sum of the per-op bests plus 2 us." Run from the repository root (no install, no
network), after ``source bench/gpu_stage.sh`` with ``.whl`` and ``.gpu-ops/vllm_moe_C.so.xz``
carried::

    python3 bench/moe_layer.py --out $OUT/layer            # all shapes, T 1..4096
    python3 bench/moe_layer.py --quick --shapes qwen3        # T in {1, 64, 4096}, shorter reps
    TRITON_INTERPRET=1 python bench/moe_layer.py --device cpu --tiny   # CPU smoke test

Shapes (bf16): ``mixtral`` E8 top-2, hidden 4096, intermediate 14336, softmax routing
(renormalized, as vLLM's Mixtral); ``qwen3`` (Qwen3-30B-A3B) E128 top-8, hidden 2048,
intermediate 768, softmax + renormalize; ``deepseek`` (DeepSeek-V3) E256 top-8, 8 groups
keeping 4, sigmoid scoring with a nonzero correction bias, renormalized, routed_scaling_factor
2.5, hidden 7168, intermediate 2048. Inputs: hidden states x, a random gate (router logits =
x @ gate.T, computed once, outside the layer), w1 [E, 2N, K], w2 [E, K, N].

The layer = routing op (``topk_softmax`` / ``grouped_topk``) -> ``fused_experts`` (inside:
``moe_align_block_size`` unless vLLM's decode shortcut applies (M*k*4 <= E: no alignment), GEMM1
+ act, GEMM2, ``moe_sum``), with flagos's impls (``moe_experts._align``/``_sum`` pointed at
``fl_dispatch_flagos.moe_routing``, as ``bench/moe_experts.py`` does: no dispatcher policy in
the way).

1. Correctness first, at T = 1 (decode shortcut) and 33 (aligned path): the whole layer vs the
   reference composition (``fl_dispatch.core.ops.moe`` routing -> ``fused_experts_reference``)
   with the kit's bf16 ``fused_experts`` tolerance (``fl_dispatch.testing.tolerances``); the
   same for the composition of each other impl's routing/alignment/sum with our GEMMs. Before
   each timed (shape, T), every impl's pieces are checked against the reference (routing ids
   as sets, weights; alignment up to the order inside an expert segment; sum): an impl that
   fails a piece is recorded and left out of the "best" for it.
2. Timing, ``triton.testing.do_bench_cudagraph`` median (10 replays of an unrolled graph;
   the half-range of the 10 is kept as the noise, ``+-``), fixed inputs, no L2 flush:
   (a) ``whole``: routing -> fused_experts captured in one graph (flagos everywhere);
   (b) pieces, each captured alone: ``routing`` (each impl), ``align`` (each impl, on the
   routing's ids, the block size fused_experts uses), ``sum`` (each impl, [T, k, hidden]),
   ``experts`` (our fused_experts on precomputed routing: align + GEMMs + sum);
   ``gemm`` is DERIVED: experts - align(flagos) - sum(flagos);
   (c) ``sum flagos`` = routing(flagos) + experts; ``sum best`` = the fastest correct impl of
   routing + align + sum (flagos, vLLM 0.25 ``_moe_C``, FlagGems) + gemm; and
   ``whole best``: the layer composed of those fastest impls, captured in one graph.
   Table: shape, T, whole, sum of pieces, overhead (whole - sum), target met (overhead <= 2
   us), for "flagos" (whole flagos vs sum flagos) and "best" (whole best vs sum best), plus
   ``ours-vs-best`` (whole flagos - sum best: the issue's target for our layer).
3. ``--out DIR``: ``moe_layer.txt`` (everything printed) and ``moe_layer.json``.

vLLM's ops load from ``$FL_DISPATCH_VLLM_MOE_C`` or ``.gpu-ops/vllm_moe_C.so.xz``, FlagGems
from ``import flag_gems`` (the loaders of ``bench/moe_routing.py``). One failure never aborts
the run (recorded, the run goes on); a deadline (``DEADLINE_S``, 220 s) stops it cleanly and
still writes the outputs.

GPU time (H200), estimated: about 1.5-3.5 min for the full run (weights: ~25 GB for DeepSeek,
Triton compiles ~20-60 s the first time, checks ~15 s, then ~12 measurements per (shape, T) at
~0.1-0.5 s each x 18 points); ``--quick`` about 1-1.5 min. A run that reaches the deadline
prints where it stopped: run the rest with ``--shapes``/``--tokens``.

CPU (``--device cpu``, Triton's interpreter: ``TRITON_INTERPRET=1`` is set when missing):
the correctness part on tiny shapes (``--tiny``: E 8/16, hidden 64, intermediate 32); timings
there are host wall-clock medians of the interpreter, labelled so, and mean nothing for the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import torch

DEADLINE_S = 220.0
TARGET_US = 2.0
T0 = time.time()
TOKENS = (1, 16, 64, 256, 1024, 4096)
QUICK_TOKENS = (1, 64, 4096)
CHECK_TOKENS = (1, 33)
DTYPE = torch.bfloat16
PIECES = ("routing", "align", "sum")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    E: int
    k: int
    K: int  # hidden
    N: int  # intermediate
    groups: int = 0  # grouped_topk (sigmoid, bias) when > 0
    keep: int = 0
    rsf: float = 1.0
    renormalize: bool = True

    @property
    def grouped(self) -> bool:
        return self.groups > 0

    @property
    def routing_op(self) -> str:
        return "grouped_topk" if self.grouped else "topk_softmax"


SHAPES = {
    "mixtral": Shape("mixtral", 8, 2, 4096, 14336),
    "qwen3": Shape("qwen3", 128, 8, 2048, 768),
    "deepseek": Shape("deepseek", 256, 8, 7168, 2048, groups=8, keep=4, rsf=2.5),
}
TINY = {
    "mixtral": Shape("mixtral", 8, 2, 64, 32),
    "qwen3": Shape("qwen3", 16, 4, 64, 32),
    "deepseek": Shape("deepseek", 16, 4, 64, 32, groups=4, keep=2, rsf=2.5),
}


class Run:
    """The run's state: device, log, deadline, results."""

    def __init__(self, device: str, deadline_s: float, rep: int) -> None:
        self.device = device
        self.gpu = device == "cuda"
        self.deadline_s = deadline_s
        self.rep = rep
        self.lines: list[str] = []
        self.problems: list[str] = []
        self.deadline_hit: str | None = None

    def log(self, msg: str = "") -> None:
        print(msg, flush=True)
        self.lines.append(msg)

    def problem(self, msg: str) -> None:
        self.problems.append(msg)
        self.log(f"  PROBLEM {msg}")

    def late(self, where: str) -> bool:
        if time.time() - T0 > self.deadline_s:
            if self.deadline_hit is None:
                self.deadline_hit = where
                self.log(f"deadline ({self.deadline_s:.0f} s): stopped before {where}")
            return True
        return False

    def sync(self) -> None:
        if self.gpu:
            try:
                torch.cuda.synchronize()
            except Exception:
                pass


# ----------------------------------------------------------------------------- modules, impls

def import_flagos() -> tuple[Any, Any, Any]:
    """(moe_experts, moe_configs, moe_routing) of the flagos backend."""
    me = importlib.import_module("fl_dispatch_flagos.moe_experts")
    mc = importlib.import_module("fl_dispatch_flagos.moe_configs")
    mr = importlib.import_module("fl_dispatch_flagos.moe_routing")
    return me, mc, mr


def build_impls(run: Run, mr: Any, others: bool) -> dict[str, dict[str, Callable]]:
    """impl -> {topk_softmax, grouped_topk, moe_align, moe_sum: fn with OUR op signature}:
    flagos, plus (GPU, ``others``) vLLM's ``_moe_C`` and FlagGems through
    ``bench/moe_routing.py``'s loaders (the torch reference is not an impl here)."""
    impls: dict[str, dict[str, Callable]] = {
        "flagos": {"topk_softmax": mr.topk_softmax, "grouped_topk": mr.grouped_topk,
                   "moe_align": mr.moe_align_block_size, "moe_sum": mr.moe_sum}}
    if not others:
        return impls
    try:
        routing_bench = importlib.import_module("moe_routing")
        for name, ops in routing_bench.build_impls().items():
            if name not in ("flagos", "torch"):
                impls[name] = ops
    except Exception as exc:
        run.problem(f"loading vLLM/FlagGems through bench/moe_routing.py: "
                    f"{type(exc).__name__}: {exc}")
    return impls


@contextmanager
def experts_using(me: Any, align: Callable, msum: Callable) -> Iterator[None]:
    """Within the block our fused_experts aligns with ``align`` and sums with ``msum``."""
    old = me._align, me._sum
    me._align, me._sum = align, msum
    try:
        yield
    finally:
        me._align, me._sum = old


# ----------------------------------------------------------------------------- inputs

class Inputs:
    """x [T, K], router logits [T, E] (x @ gate.T, bf16), correction bias (grouped)."""

    def __init__(self, shape: Shape, T: int, gate: torch.Tensor, bias: torch.Tensor | None,
                 device: str, seed: int) -> None:
        g = torch.Generator(device=device).manual_seed(seed)
        self.x = torch.randn(T, shape.K, device=device, generator=g).to(DTYPE)
        self.logits = (self.x @ gate.t()).contiguous()
        self.bias = bias


def make_weights(shape: Shape, device: str, seed: int = 0):
    """(w1 [E, 2N, K], w2 [E, K, N], gate [E, K], bias [E] or None), bf16, unit-scale
    outputs (1/sqrt(fan-in)); the bias is nonzero (DeepSeek's e_score_correction_bias)."""
    g = torch.Generator(device=device).manual_seed(seed)
    E, N, K = shape.E, shape.N, shape.K
    w1 = torch.randn(E, 2 * N, K, device=device, dtype=DTYPE, generator=g).mul_(
        1.0 / math.sqrt(K))
    w2 = torch.randn(E, K, N, device=device, dtype=DTYPE, generator=g).mul_(1.0 / math.sqrt(N))
    gate = torch.randn(E, K, device=device, dtype=DTYPE, generator=g).mul_(1.0 / math.sqrt(K))
    bias = None
    if shape.grouped:
        bias = (torch.randn(E, device=device, generator=g) * 0.05).to(DTYPE)
    return w1, w2, gate, bias


def route(ops: dict[str, Callable], shape: Shape, inp: Inputs
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32 [T, k], ids int32 [T, k]) from the impl's routing op; the outputs are
    allocated inside (as vLLM's router does), so a captured call includes nothing else."""
    logits = inp.logits
    if shape.grouped:
        return ops["grouped_topk"](logits, shape.groups, shape.keep, shape.k,
                                   shape.renormalize, shape.rsf, inp.bias, 1)
    T = logits.shape[0]
    w = torch.empty(T, shape.k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, shape.k, dtype=torch.int32, device=logits.device)
    tei = torch.empty(T, shape.k, dtype=torch.int32, device=logits.device)
    ops["topk_softmax"](w, ids, tei, logits, shape.renormalize, None)
    return w, ids


def reference_layer(ref: Any, shape: Shape, inp: Inputs, w1, w2):
    """The reference composition: the op definitions' routing -> fused_experts_reference."""
    w, ids = route({"topk_softmax": ref.topk_softmax, "grouped_topk": ref.grouped_topk},
                   shape, inp)
    return w, ids, ref.fused_experts_reference(inp.x, w1, w2, w, ids)


# ----------------------------------------------------------------------------- timing

def measure(run: Run, fn: Callable[[], Any]) -> dict[str, Any]:
    """GPU: do_bench_cudagraph median in us (+ half-range of its 10 replays as ``noise``).
    CPU: median host wall clock of a few calls after a warm one (``wall`` = True)."""
    fn()
    if run.gpu:
        torch.cuda.synchronize()
        from triton.testing import do_bench_cudagraph

        times = do_bench_cudagraph(fn, rep=run.rep, return_mode="all")
        if not isinstance(times, list):
            times = [float(times)]
        us = [t * 1000.0 for t in times]
        return {"us": statistics.median(us), "noise": (max(us) - min(us)) / 2, "wall": False}
    walls = []
    for _ in range(2):
        t = time.perf_counter()
        fn()
        walls.append((time.perf_counter() - t) * 1e6)
    return {"us": statistics.median(walls), "noise": (max(walls) - min(walls)) / 2,
            "wall": True}


# ----------------------------------------------------------------------------- checks

def _close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> bool:
    return bool(torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol))


def routing_mismatch(got: tuple[torch.Tensor, torch.Tensor],
                     want: tuple[torch.Tensor, torch.Tensor], atol: float,
                     rtol: float) -> str | None:
    """None when the routes agree as sets per token (ids, and the weights at them); other
    impls may order a token's k routes differently (vLLM's grouped_topk), which the layer
    does not see."""
    gw, gi = got
    ww, wi = want
    go, wo = gi.long().sort(-1), wi.long().sort(-1)
    if not torch.equal(go.values, wo.values):
        bad = (go.values != wo.values).any(-1).nonzero()[:3].flatten().tolist()
        return f"ids differ in rows {bad}"
    gws, wws = gw.float().gather(1, go.indices), ww.float().gather(1, wo.indices)
    if not _close(gws, wws, atol, rtol):
        return f"weights differ, max abs {(gws - wws).abs().max().item():.3g}"
    return None


def align_mismatch(ref: Any, fn: Callable, ids: torch.Tensor, E: int, bs: int,
                   buffers: Callable) -> str | None:
    """None when ``fn``'s alignment equals the reference's as the contract fixes it (the
    kit's ``align_mismatch``: num_tokens_post_pad, used experts_ids, segments)."""
    from fl_dispatch.testing.inputs_moe import align_mismatch as differs

    want, got = buffers(), buffers()
    ref.moe_align_block_size(ids, E, bs, *want)
    fn(ids, E, bs, *got)
    return differs(got, want, bs)


class Tols:
    def __init__(self, ref: Any) -> None:
        from fl_dispatch.testing.tolerances import tolerance

        self.experts = tolerance(ref.fused_experts, "bf16")
        op = ref.grouped_topk  # same table for both routing ops
        self.routing = tolerance(op, "fp32")
        self.sum = tolerance(ref.moe_sum, "bf16")


def check_layer(run: Run, ref: Any, me: Any, impls: dict[str, dict[str, Callable]],
                shape: Shape, w1, w2, gate, bias, tols: Tols) -> list[dict[str, Any]]:
    """Whole layer (routing -> fused_experts) of each impl composition vs the reference
    composition at CHECK_TOKENS."""
    rows: list[dict[str, Any]] = []
    for T in CHECK_TOKENS:
        inp = Inputs(shape, T, gate, bias, run.device, seed=1000 + T)
        try:
            rw, rids, want = reference_layer(ref, shape, inp, w1, w2)
            oracle = ref.fused_experts_oracle(inp.x, w1, w2, rw, rids)
        except Exception as exc:
            run.problem(f"check {shape.name} T{T}: reference raised {type(exc).__name__}: "
                        f"{exc}")
            continue
        for impl, ops in impls.items():
            if shape.routing_op not in ops or "moe_align" not in ops or "moe_sum" not in ops:
                continue
            row: dict[str, Any] = {"shape": shape.name, "T": T, "impl": impl}
            try:
                with experts_using(me, ops["moe_align"], ops["moe_sum"]):
                    w, ids = route(ops, shape, inp)
                    got = me.fused_experts(inp.x, w1, w2, w, ids)
                run.sync()
                err = (got.float() - want.float()).abs().max().item()
                rel = ((got.float() - oracle).norm() / oracle.norm().clamp_min(1e-30)).item()
                rmsg = routing_mismatch((w, ids), (rw, rids), tols.routing.atol,
                                        tols.routing.rtol)
                ok = _close(got, want, tols.experts.atol, tols.experts.rtol) and rmsg is None
                row.update(ok=ok, max_abs_vs_ref=err, rel_vs_oracle=rel, routing=rmsg or "same",
                           naive=bool(me.use_naive_assignment(T, shape.k, shape.E, None)))
                run.log(f"[check] {shape.name:8s} T={T:3d} {impl:8s} "
                        f"{'decode-shortcut' if row['naive'] else 'aligned':15s} "
                        f"max|layer-ref|={err:.3e} rel(layer,oracle)={rel:.2e} "
                        f"routing {row['routing']} -> {'OK' if ok else 'FAIL'}")
                if not ok:
                    run.problem(f"check {shape.name} T{T} {impl}: whole layer differs from the "
                                f"reference composition (max abs {err:.3g}, routing "
                                f"{row['routing']})")
            except Exception as exc:
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
                run.problem(f"check {shape.name} T{T} {impl}: raised {type(exc).__name__}: "
                            f"{exc}")
                if os.environ.get("FL_BENCH_TRACE"):
                    traceback.print_exc()
                run.sync()
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- one point

def bench_point(run: Run, ref: Any, me: Any, mc: Any, impls: dict[str, dict[str, Callable]],
                shape: Shape, T: int, w1, w2, gate, bias, tols: Tols) -> dict[str, Any]:
    """Every measurement of one (shape, T); failures recorded in the row."""
    dev = run.device
    inp = Inputs(shape, T, gate, bias, dev, seed=T)
    flag = impls["flagos"]
    naive = bool(me.use_naive_assignment(T, shape.k, shape.E, None))
    devname = torch.cuda.get_device_name() if run.gpu else ""
    bm = mc.config(T, shape.E, shape.N, shape.K, shape.k, DTYPE, devname)["BLOCK_SIZE_M"]
    row: dict[str, Any] = {"shape": shape.name, "T": T, "naive": naive, "block_m": bm,
                           "wall": not run.gpu,
                           "pieces": {p: {} for p in PIECES}, "excluded": {}, "errors": {}}
    label = f"{shape.name} T{T}"

    def timed(key: str, fn: Callable[[], Any]) -> float | None:
        if run.late(f"{label} {key}"):
            return None
        try:
            m = measure(run, fn)
        except Exception as exc:
            row["errors"][key] = f"{type(exc).__name__}: {str(exc)[:300]}"
            run.problem(f"{label} {key}: {type(exc).__name__}: {str(exc)[:200]}")
            if os.environ.get("FL_BENCH_TRACE"):
                traceback.print_exc()
            run.sync()
            return None
        row.setdefault("noise", {})[key] = m["noise"]
        return m["us"]

    # reference pieces for the per-piece checks
    with torch.no_grad():
        rw, rids = route({"topk_softmax": ref.topk_softmax, "grouped_topk": ref.grouped_topk},
                         shape, inp)
    # flagos routing: the ids every align/experts piece runs on
    fw, fids = route(flag, shape, inp)
    length, blocks = me.aligned_buffer_sizes(T * shape.k, shape.E, bm)

    def align_buffers():
        return (torch.empty(length, dtype=torch.int32, device=dev),
                torch.empty(blocks, dtype=torch.int32, device=dev),
                torch.empty(1, dtype=torch.int32, device=dev))

    g = torch.Generator(device=dev).manual_seed(7 + T)
    sum_in = torch.randn(T, shape.k, shape.K, device=dev, generator=g).to(DTYPE)
    sum_out = torch.empty(T, shape.K, dtype=DTYPE, device=dev)
    sum_want = torch.empty_like(sum_out)
    ref.moe_sum(sum_in, sum_want)
    abufs = align_buffers()

    # per-piece checks, then per-piece timings, for each impl
    for impl, ops in impls.items():
        checks: list[tuple[str, str, Callable[[], str | None]]] = []
        if shape.routing_op in ops:
            def routing_check(ops: dict[str, Callable] = ops) -> str | None:
                return routing_mismatch(route(ops, shape, inp), (rw, rids), tols.routing.atol,
                                        tols.routing.rtol)

            checks.append(("routing", shape.routing_op, routing_check))
        if "moe_align" in ops and not naive:
            checks.append(("align", "moe_align", functools.partial(
                align_mismatch, ref, ops["moe_align"], fids, shape.E, bm, align_buffers)))
        if "moe_sum" in ops:
            def sum_check(ops: dict[str, Callable] = ops) -> str | None:
                out = torch.empty_like(sum_out)
                ops["moe_sum"](sum_in, out)
                if _close(out, sum_want, tols.sum.atol, tols.sum.rtol):
                    return None
                return f"max abs {(out.float() - sum_want.float()).abs().max().item():.3g}"

            checks.append(("sum", "moe_sum", sum_check))
        for piece, op, check in checks:
            try:
                msg = check()
            except Exception as exc:
                msg = f"raised {type(exc).__name__}: {str(exc)[:200]}"
                run.sync()
            if msg:
                row["excluded"].setdefault(piece, {})[impl] = msg
                run.problem(f"{label} {impl} {op}: {msg} (left out of the best)")
                if impl != "flagos":
                    continue
            if piece == "routing":
                us = timed(f"routing:{impl}", functools.partial(route, ops, shape, inp))
            elif piece == "align":
                us = timed(f"align:{impl}", functools.partial(
                    ops["moe_align"], fids, shape.E, bm, *abufs))
            else:
                us = timed(f"sum:{impl}", functools.partial(ops["moe_sum"], sum_in, sum_out))
            if us is not None:
                row["pieces"][piece][impl] = us

    # our experts on precomputed (flagos) routing, and the whole layer, flagos everywhere
    with experts_using(me, flag["moe_align"], flag["moe_sum"]):
        row["experts"] = timed("experts:flagos",
                               lambda: me.fused_experts(inp.x, w1, w2, fw, fids))
        whole_out = None
        try:
            whole_out = me.fused_experts(inp.x, w1, w2, *route(flag, shape, inp))
        except Exception as exc:
            row["errors"]["whole:flagos eager"] = f"{type(exc).__name__}: {exc}"
        row["whole"] = timed("whole:flagos", lambda: me.fused_experts(
            inp.x, w1, w2, *route(flag, shape, inp)))

    # the best (fastest correct) impl of each piece, and the layer composed of them
    best: dict[str, str] = {}
    for piece in PIECES:
        ok = {i: us for i, us in row["pieces"][piece].items()
              if i not in row["excluded"].get(piece, {})}
        if ok:
            best[piece] = min(ok, key=ok.__getitem__)
    row["best_impl"] = best
    if naive:
        best["align"] = "flagos"  # not run by the layer
    if set(best.values()) <= {"flagos"}:
        row["whole_best"] = row["whole"]
        row["whole_best_same_as_flagos"] = True
    elif all(p in best for p in PIECES):
        r_ops = impls[best["routing"]]
        a_fn = impls[best["align"]]["moe_align"]
        s_fn = impls[best["sum"]]["moe_sum"]
        with experts_using(me, a_fn, s_fn):
            try:  # the mixed composition vs our layer on the same inputs
                got = me.fused_experts(inp.x, w1, w2, *route(r_ops, shape, inp))
                if whole_out is not None and not _close(got, whole_out, tols.experts.atol,
                                                        tols.experts.rtol):
                    err = (got.float() - whole_out.float()).abs().max().item()
                    run.problem(f"{label} whole best {best}: differs from the flagos layer "
                                f"(max abs {err:.3g})")
                    row["errors"]["whole:best check"] = f"max abs {err:.3g}"
            except Exception as exc:
                row["errors"]["whole:best eager"] = f"{type(exc).__name__}: {exc}"
            row["whole_best"] = timed("whole:best", lambda: me.fused_experts(
                inp.x, w1, w2, *route(r_ops, shape, inp)))
    summarize(row)
    return row


def summarize(row: dict[str, Any]) -> None:
    """Derived numbers: gemm, sums, overheads, targets (None where a piece is missing)."""
    p = row["pieces"]
    fl = {piece: p[piece].get("flagos") for piece in PIECES}
    if row["naive"]:
        fl["align"] = 0.0
    best = {piece: (0.0 if piece == "align" and row["naive"]
                    else p[piece].get(row["best_impl"].get(piece, ""))) for piece in PIECES}
    exp = row.get("experts")
    gemm = None
    if exp is not None and fl["align"] is not None and fl["sum"] is not None:
        gemm = exp - fl["align"] - fl["sum"]
    row["gemm_derived"] = gemm
    row["sum_flagos"] = (fl["routing"] + exp) if fl["routing"] is not None and exp is not None \
        else None
    parts = [best["routing"], best["align"], best["sum"], gemm]
    row["sum_best"] = sum(parts) if all(v is not None for v in parts) else None  # type: ignore
    noise = row.get("noise", {})
    for tag, whole_key, sum_key in (("flagos", "whole", "sum_flagos"),
                                    ("best", "whole_best", "sum_best")):
        whole, total = row.get(whole_key), row.get(sum_key)
        over = whole - total if whole is not None and total is not None else None
        row[f"overhead_{tag}"] = over
        row[f"met_{tag}"] = None if over is None or row["wall"] else over <= TARGET_US
    whole, sb = row.get("whole"), row.get("sum_best")
    over = whole - sb if whole is not None and sb is not None else None
    row["overhead_ours_vs_best"] = over
    row["met_ours_vs_best"] = None if over is None or row["wall"] else over <= TARGET_US
    keys = ("whole:flagos", "routing:flagos", "experts:flagos")
    row["noise_total"] = sum(noise[k] for k in keys) if all(k in noise for k in keys) else None


# ----------------------------------------------------------------------------- report

def _f(v: Any, width: int = 9, digits: int = 2) -> str:
    return f"{'-':>{width}s}" if v is None else f"{v:{width}.{digits}f}"


def _met(met: bool | None, yes: str, no: str) -> str:
    return "-" if met is None else (yes if met else no)


def report(run: Run, rows: list[dict[str, Any]], unit: str) -> None:
    run.log(f"\nWhole MoE layer vs the sum of its pieces ({unit}); target: whole <= sum of "
            f"the per-op bests + {TARGET_US:g} us")
    run.log("  flagos: whole layer (flagos everywhere) vs routing(flagos) + experts(flagos)")
    run.log("  best:   whole layer of the fastest correct impl per piece vs routing + align + "
            "gemm + sum, each the fastest (gemm = experts - align - sum, flagos, derived)")
    run.log("  ours-vs-best: whole(flagos) - sum of the per-op bests (the issue's target for "
            "our layer); +- = half-ranges of the 10 replays of whole, routing and experts, summed")
    head = (f"{'shape':9s} {'T':>5s} {'config':7s} {'whole':>9s} {'sum':>9s} "
            f"{'overhead':>9s} {'met':>4s}  {'+-':>6s}  pieces")
    run.log(head)
    for r in rows:
        for tag, whole_key, sum_key in (("flagos", "whole", "sum_flagos"),
                                        ("best", "whole_best", "sum_best")):
            over = r.get(f"overhead_{tag}")
            met = _met(r[f"met_{tag}"], "yes", "NO")
            if tag == "flagos":
                pieces = (f"routing {_f(r['pieces']['routing'].get('flagos'), 0)} + experts "
                          f"{_f(r.get('experts'), 0)} (align "
                          f"{'none' if r['naive'] else _f(r['pieces']['align'].get('flagos'), 0)}"
                          f", sum {_f(r['pieces']['sum'].get('flagos'), 0)}, gemm "
                          f"{_f(r.get('gemm_derived'), 0)})")
                noise = _f(r.get("noise_total"), 6)
            else:
                bi = r.get("best_impl", {})
                cells = []
                for piece in PIECES:
                    if piece == "align" and r["naive"]:
                        continue
                    impl = bi.get(piece)
                    cells.append(f"{piece} {impl or '?'} "
                                 f"{_f(r['pieces'][piece].get(impl or ''), 0)}")
                pieces = ", ".join(cells) + (" (same graph as flagos)"
                                             if r.get("whole_best_same_as_flagos") else "")
                noise = ""
            run.log(f"{r['shape'] if tag == 'flagos' else '':9s} "
                    f"{(str(r['T']) if tag == 'flagos' else ''):>5s} {tag:7s} "
                    f"{_f(r.get(whole_key))} {_f(r.get(sum_key))} {_f(over)} {met:>4s}  "
                    f"{noise:>6s}  {pieces}")
        ob = r.get("overhead_ours_vs_best")
        run.log(f"{'':15s} ours-vs-best {_f(ob)} {_met(r['met_ours_vs_best'], 'met', 'MISSED')}")
    run.log(f"\nPieces alone ({unit}; routing/align/sum per impl; * = fastest correct, "
            f"x = failed its check)")
    for r in rows:
        cells = []
        for piece in PIECES:
            for impl, us in r["pieces"][piece].items():
                mark = "x" if impl in r["excluded"].get(piece, {}) else (
                    "*" if r["best_impl"].get(piece) == impl else "")
                cells.append(f"{piece}:{impl} {us:.2f}{mark}")
            cells += [f"{piece}:{impl} failed-check" for impl in r["excluded"].get(piece, {})
                      if impl not in r["pieces"][piece]]
        cells.append(f"experts {_f(r.get('experts'), 0)}")
        run.log(f"{r['shape']:9s} {r['T']:5d}  " + "  ".join(cells))
        for key, err in r["errors"].items():
            run.log(f"{'':16s}error {key}: {err}")


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="of " + ",".join(SHAPES))
    ap.add_argument("--tokens", default=None, help="comma-separated T (default 1..4096)")
    ap.add_argument("--out", default=None, help="directory for moe_layer.txt/.json")
    ap.add_argument("--quick", action="store_true",
                    help=f"T in {QUICK_TOKENS} (unless --tokens), shorter reps")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--no-others", action="store_true", help="flagos only (no vLLM/FlagGems)")
    ap.add_argument("--deadline-s", type=float, default=DEADLINE_S)
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    tokens = [int(t) for t in args.tokens.split(",") if t] if args.tokens else \
        list(QUICK_TOKENS if args.quick else TOKENS)
    table = TINY if args.tiny else SHAPES
    run = Run(args.device, args.deadline_s, 10 if args.quick else 20)
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    result: dict[str, Any] = {"device": args.device, "shapes": {}, "tokens": tokens,
                              "target_us": TARGET_US}
    try:
        if run.gpu:  # on CPU the installed package serves (and nothing is unpacked)
            from _gpu_env import setup

            setup()
        elif str(BENCH.parent) not in sys.path:
            sys.path.insert(0, str(BENCH.parent))
        import triton

        me, mc, mr = import_flagos()
        ref = importlib.import_module("fl_dispatch.core.ops.moe")
        tols = Tols(ref)
        if run.gpu:
            result["device"] = torch.cuda.get_device_name()
            unit = "us, CUDA-graph replay median (do_bench_cudagraph)"
        else:
            unit = ("us of HOST WALL CLOCK in Triton's CPU interpreter: NOT device time, "
                    "meaningless for the target")
        result.update(torch=torch.__version__, triton=triton.__version__, timing=unit,
                      tolerances={"experts_bf16": dataclasses.asdict(tols.experts),
                                  "routing": dataclasses.asdict(tols.routing)})
        run.log(f"device {result['device']}; torch {torch.__version__}; triton "
                f"{triton.__version__}; timing: {unit}")
        impls = build_impls(run, mr, run.gpu and not args.no_others)
        result["impls"] = {k: sorted(v) for k, v in impls.items()}
        run.log(f"impls: {result['impls']}")
        for name in [s for s in args.shapes.split(",") if s]:
            if name not in table:
                run.problem(f"unknown shape {name!r} (known: {', '.join(table)})")
                continue
            shape = table[name]
            result["shapes"][name] = dataclasses.asdict(shape)
            if run.late(f"shape {name}"):
                break
            try:
                w1, w2, gate, bias = make_weights(shape, run.device)
            except Exception as exc:
                run.problem(f"{name}: weights failed: {type(exc).__name__}: {exc}")
                continue
            if not args.skip_check:
                checks += check_layer(run, ref, me, impls, shape, w1, w2, gate, bias, tols)
            for T in tokens:
                if run.late(f"{name} T{T}"):
                    break
                try:
                    row = bench_point(run, ref, me, mc, impls, shape, T, w1, w2, gate, bias,
                                      tols)
                except Exception as exc:
                    run.problem(f"{name} T{T}: {type(exc).__name__}: {exc}")
                    if os.environ.get("FL_BENCH_TRACE"):
                        traceback.print_exc()
                    run.sync()
                    continue
                rows.append(row)
                run.log(f"[time] {name:8s} T={T:5d} whole {_f(row.get('whole'))} sum flagos "
                        f"{_f(row.get('sum_flagos'))} sum best {_f(row.get('sum_best'))} "
                        f"({time.time() - T0:.0f} s)")
            del w1, w2, gate, bias
            if run.gpu:
                torch.cuda.empty_cache()
        report(run, rows, unit)
    except Exception as exc:
        run.problem(f"aborted: {type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        checked = [c for c in checks if "ok" in c]
        result.update(check=checks, rows=rows, problems=run.problems,
                      deadline_hit=run.deadline_hit, wall_s=time.time() - T0,
                      check_all_ok=bool(checked) and all(c["ok"] for c in checked))
        run.log(f"\ncheck: {sum(c.get('ok', False) for c in checks)}/{len(checks)} layer "
                f"compositions match the reference; {len(run.problems)} problem(s); "
                f"total {result['wall_s']:.0f} s")
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "moe_layer.json").write_text(json.dumps(result, indent=1, default=str))
            (out / "moe_layer.txt").write_text("\n".join(run.lines) + "\n")
            print(f"wrote {out / 'moe_layer.txt'} and {out / 'moe_layer.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
