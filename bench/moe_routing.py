"""MoE routing benchmark: our Triton adapters vs the torch reference, vLLM 0.25 ``_moe_C``
and FlagGems, on one GPU. Run from the repository root (no install, no network)::

    python bench/moe_routing.py [--sweep] [--quick] [--out DIR]
    python bench/moe_routing.py --align-variants [--out DIR]
    (either: [--tokens 16,64,256] [--experts 128,256] [--ops moe_align,grouped_topk])

1. Correctness of every impl against ``fl_dispatch/core/ops/moe.py`` on the GPU,
   random inputs and injected ties (routing ids exactly, weights 1e-5 relative; align:
   ``num_tokens_post_pad``, used ``experts_ids``, per-block token sets).
2. ``--sweep``: times the launch-config candidates of each of our kernels and prints the best
   per size (write them back into ``backends/flagos/moe_routing.py``'s ``*_config``);
   for ``moe_align`` the ``fan`` path's (CHUNK routes per program, num_warps; each candidate
   checked against the reference first) and v1's ``align_config`` while ALIGN_PLAN uses v1.
3. Side-by-side device time, ``triton.testing.do_bench_cudagraph`` median (CUDA-graph
   replay: also proves our adapters are capturable), one table: op, shape, T, impl, us,
   ratio to the best OTHER impl. JSON to ``--out``.

4. ``--align-variants`` (alone): every ``moe_align_block_size`` implementation of ours
   (``mr.ALIGN_VARIANTS`` with a few launch choices) next to vLLM's and FlagGems', at
   T = 1..16384 for (E8, k2), (E128, k8), (E256, k8), block 64; each checked against the
   reference (``align_mismatch``) before it is timed; a table, the winners per shape and a
   replacement ``ALIGN_PLAN`` for ``backends/flagos/moe_routing.py``.

``--tokens``/``--experts``/``--ops`` narrow the sizes, the (E, k) shapes of topk_softmax and
moe_align, and the ops of the sweep and the timing table (the correctness pass stays whole;
``--skip-check`` skips it): a short run on the sizes in question.

vLLM's ops come from ``.gpu-ops/vllm_moe_C.so.xz`` when carried (0.25 schemas); FlagGems when
``import flag_gems`` works. Every impl is guarded: a failure prints and the run goes on.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import lzma
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _gpu_env import setup

setup()
ROOT = Path(__file__).resolve().parent.parent

import torch
import triton
from fl_dispatch_flagos import moe_routing as mr
from triton.testing import do_bench_cudagraph

from fl_dispatch.testing.inputs_moe import align_mismatch


def _load_reference():
    from fl_dispatch.core.ops import moe

    return moe


ref = _load_reference()
DEV = "cuda"
TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)
OPS = ("topk_softmax", "grouped_topk", "moe_align", "moe_sum")
TOPK_SHAPES = [(8, 2), (128, 8), (256, 8)]  # (E, k); --experts narrows it in place
GROUPED = (256, 8, 4, 8)  # E, groups, keep, k (sigmoid, bias)
ALIGN_BS = 64
SUM_H, SUM_K = 4096, 8
DEADLINE_S = 225.0
T0 = time.time()


def _late() -> bool:
    return time.time() - T0 > DEADLINE_S


# ----------------------------------------------------------------------------- other impls

def _load_vllm() -> Any:
    """torch.ops._moe_C: the library at ``$FL_DISPATCH_VLLM_MOE_C`` (e.g. an installed vLLM's
    ``_moe_C_stable_libtorch.abi3.so``), else from .gpu-ops/vllm_moe_C.so.xz; or the reason it
    is missing (str)."""
    given = os.environ.get("FL_DISPATCH_VLLM_MOE_C")
    packed = Path(ROOT) / ".gpu-ops" / "vllm_moe_C.so.xz"
    if given:
        try:
            torch.ops.load_library(given)
            return torch.ops._moe_C
        except Exception as exc:
            return f"FL_DISPATCH_VLLM_MOE_C={given}: {type(exc).__name__}: {exc}"
    if not packed.exists():
        return f"{packed} not carried and FL_DISPATCH_VLLM_MOE_C not set"
    try:
        out = Path(tempfile.gettempdir()) / "vllm_moe_C.so"
        if not out.exists():
            with lzma.open(packed) as src:
                out.write_bytes(src.read())
        torch.ops.load_library(str(out))
        return torch.ops._moe_C
    except Exception as exc:
        return f"load failed: {type(exc).__name__}: {exc}"


def _load_flaggems() -> Any:
    try:
        import flag_gems
    except Exception as exc:
        return f"import flag_gems failed: {type(exc).__name__}: {exc}"
    return flag_gems


def _find(mod: Any, *names: str) -> Callable | None:
    """First attribute path among ``names`` (dotted, from ``mod``) that resolves."""
    for name in names:
        obj = mod
        try:
            for part in name.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            try:
                obj = importlib.import_module(f"{mod.__name__}.{name.rsplit('.', 1)[0]}")
                obj = getattr(obj, name.rsplit(".", 1)[1])
            except Exception:
                continue
        if callable(obj):
            return obj
    return None


def build_impls() -> dict[str, dict[str, Callable]]:
    """impl -> {op: fn with OUR op signature}."""
    impls: dict[str, dict[str, Callable]] = {
        "flagos": {"topk_softmax": mr.topk_softmax, "grouped_topk": mr.grouped_topk,
                   "moe_align": mr.moe_align_block_size, "moe_sum": mr.moe_sum},
        "torch": {"topk_softmax": ref.topk_softmax, "grouped_topk": ref.grouped_topk,
                  "moe_align": ref.moe_align_block_size, "moe_sum": ref.moe_sum},
    }
    vllm = _load_vllm()
    if isinstance(vllm, str):
        print(f"vllm _moe_C: {vllm}")
    else:
        ops: dict[str, Callable] = {}

        def v_topk(w, i, t, g, renorm=False, bias=None):
            vllm.topk_softmax(w, i, t, g, renorm, bias)

        def v_grouped(s, ng, tg, k, renorm, rsf, bias, func=0):
            b = bias if bias is not None else torch.zeros(s.shape[1], device=s.device)
            return vllm.grouped_topk(s, ng, tg, k, renorm, rsf, b.to(s.dtype), func)

        def v_align(ids, e, bs, s, eids, n, emap=None):
            vllm.moe_align_block_size(ids, e, bs, s, eids, n, emap)

        def v_sum(x, out):
            vllm.moe_sum(x, out)

        for op, fn, attr in (("topk_softmax", v_topk, "topk_softmax"),
                             ("grouped_topk", v_grouped, "grouped_topk"),
                             ("moe_align", v_align, "moe_align_block_size"),
                             ("moe_sum", v_sum, "moe_sum")):
            if hasattr(vllm, attr):
                ops[op] = fn
            else:
                print(f"vllm _moe_C: no {attr}")
        impls["vllm"] = ops
    fg = _load_flaggems()
    if isinstance(fg, str):
        print(f"flaggems: {fg}")
    else:
        ops = {}
        f_topk = _find(fg, "topk_softmax", "ops.topk_softmax", "fused.topk_softmax")
        f_grouped = _find(fg, "grouped_topk", "ops.grouped_topk", "fused.grouped_topk")
        f_align = _find(fg, "fused.moe_align_block_size.moe_align_block_size_triton",
                        "moe_align_block_size_triton", "fused.moe_align_block_size_triton",
                        "ops.moe_align_block_size_triton")
        f_sum = _find(fg, "moe_sum", "fused.moe_sum", "ops.moe_sum",
                      "fused.moe_sum.moe_sum")
        print("flaggems:", {n: getattr(f, "__module__", "?") + "." + getattr(f, "__name__", "?")
                            if f else None for n, f in (("topk_softmax", f_topk),
                                                        ("grouped_topk", f_grouped),
                                                        ("moe_align", f_align),
                                                        ("moe_sum", f_sum))})
        if f_topk:
            ops["topk_softmax"] = (lambda w, i, t, g, renorm=False, bias=None:
                                   f_topk(w, i, t, g, renorm))  # no bias in FlagGems
        if f_grouped:
            ops["grouped_topk"] = (lambda s, ng, tg, k, renorm, rsf, bias, func=0:
                                   f_grouped(s, ng, tg, k, renorm, rsf, bias, func))
        if f_align:
            ops["moe_align"] = (lambda ids, e, bs, s, eids, n, emap=None:
                                f_align(ids, e, bs, s, eids, n))
        if f_sum:
            ops["moe_sum"] = f_sum
        impls["flaggems"] = ops
    return impls


# ----------------------------------------------------------------------------- inputs

def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def topk_inputs(t: int, e: int, k: int, ties: bool = False, seed: int = 0):
    g = torch.randn(t, e, device=DEV, generator=_gen(seed)).to(torch.bfloat16)
    if ties:
        g[:, : k + 2] = 3.0  # k+2 equal maxima on the low experts: 0..k-1 must win
        g[0] = 0.0
    return g


def align_inputs(t: int, e: int, k: int, seed: int = 0, skew: bool = False):
    if skew:
        return torch.full((t, k), 3, dtype=torch.int32, device=DEV)
    # distinct experts per token, as a router gives
    return torch.rand(t, e, device=DEV, generator=_gen(seed)).topk(k, -1).indices.to(
        torch.int32)


def align_buffers(ids: torch.Tensor, e: int, bs: int):
    size = ref.max_num_tokens_padded(ids.numel(), e, bs)
    return (torch.empty(size, dtype=torch.int32, device=DEV),
            torch.empty(-(-size // bs), dtype=torch.int32, device=DEV),
            torch.empty(1, dtype=torch.int32, device=DEV))


# ----------------------------------------------------------------------------- correctness

def _routing_out(t: int, k: int):
    return (torch.empty(t, k, dtype=torch.float32, device=DEV),
            torch.empty(t, k, dtype=torch.int32, device=DEV),
            torch.empty(t, k, dtype=torch.int32, device=DEV))


def _same_routing(name, got_w, got_i, want_w, want_i, sort_ids=False) -> str | None:
    gi, wi, gw, ww = got_i.long(), want_i.long(), got_w.float(), want_w.float()
    if sort_ids:  # impls that return unsorted ids (vLLM's grouped_topk C op)
        o1, o2 = gi.sort(-1).indices, wi.sort(-1).indices
        gi, gw, wi, ww = gi.gather(1, o1), gw.gather(1, o1), wi.gather(1, o2), ww.gather(1, o2)
    if not torch.equal(gi, wi):
        bad = (gi != wi).any(-1).nonzero()[:3].flatten().tolist()
        return f"{name}: ids differ in rows {bad}: {gi[bad].tolist()} vs {wi[bad].tolist()}"
    if not torch.allclose(gw, ww, rtol=1e-5, atol=1e-6):
        return f"{name}: weights differ, max abs {(gw - ww).abs().max().item():.3g}"
    return None


def check_all(impls) -> list[str]:
    problems: list[str] = []
    notes: list[str] = []

    def run(label, fn):
        try:
            msg = fn()
            if msg:
                problems.append(f"{label}: {msg}")
        except Exception as exc:
            problems.append(f"{label}: raised {type(exc).__name__}: {exc}")

    for impl, ops in impls.items():
        if impl == "torch":
            continue
        for t in (1, 7, 64, 1000, 16384):
            for e, k in TOPK_SHAPES:
                for ties in (False, True):
                    for bias_on in (False, True):
                        if "topk_softmax" not in ops or (impl == "flaggems" and bias_on):
                            continue

                        def topk_case(t=t, e=e, k=k, ties=ties, bias_on=bias_on, ops=ops):
                            g = topk_inputs(t, e, k, ties, seed=t + e)
                            bias = (torch.randn(e, device=DEV, generator=_gen(1)) * 0.05
                                    if bias_on else None)
                            want = _routing_out(t, k)
                            got = _routing_out(t, k)
                            ref.topk_softmax(*want, g, True, bias)
                            ops["topk_softmax"](*got, g, True, bias)
                            msg = _same_routing("topk_softmax", got[0], got[1], want[0],
                                                want[1])
                            if msg is None and not torch.equal(got[2], want[2]):
                                msg = "token_expert_indices differ"
                            return msg

                        run(f"{impl} topk_softmax E{e} k{k} T{t} ties={ties} "
                            f"bias={bias_on}", topk_case)
            if "grouped_topk" in ops:
                e, ng, tg, k = GROUPED
                for ties in (False, True):
                    def grouped_case(t=t, ties=ties, ops=ops, impl=impl, e=e, ng=ng, tg=tg, k=k):
                        s = topk_inputs(t, e, k, ties, seed=t)
                        bias = (torch.randn(e, device=DEV, generator=_gen(2)) * 0.05).to(
                            s.dtype)
                        want = ref.grouped_topk(s, ng, tg, k, True, 2.5, bias, 1)
                        got = ops["grouped_topk"](s, ng, tg, k, True, 2.5, bias, 1)
                        return _same_routing("grouped_topk", got[0], got[1], want[0],
                                             want[1], sort_ids=impl != "flagos")

                    run(f"{impl} grouped_topk T{t} ties={ties}", grouped_case)
            if "moe_align" in ops:
                for e, k in TOPK_SHAPES:
                    for skew in (False, True):
                        def align_case(t=t, e=e, k=k, skew=skew, ops=ops, impl=impl):
                            ids = align_inputs(t, e, k, seed=t, skew=skew)
                            want = align_buffers(ids, e, ALIGN_BS)
                            got = align_buffers(ids, e, ALIGN_BS)
                            ref.moe_align_block_size(ids, e, ALIGN_BS, *want)
                            ops["moe_align"](ids, e, ALIGN_BS, *got)
                            msg = align_mismatch(got, want, ALIGN_BS)
                            if msg is not None:
                                return msg
                            used = int(want[2].item()) // ALIGN_BS
                            if impl == "flagos" and not (
                                    got[0][used * ALIGN_BS:] == ids.numel()).all():
                                return "tail of sorted_token_ids not the pad value"
                            return None

                        run(f"{impl} moe_align E{e} k{k} T{t} skew={skew}", align_case)
            if "moe_sum" in ops and t <= 4096:
                def sum_case(t=t, ops=ops, impl=impl):
                    x = torch.randn(t, SUM_K, SUM_H, device=DEV, generator=_gen(3)).to(
                        torch.bfloat16)
                    want = torch.empty(t, SUM_H, dtype=torch.bfloat16, device=DEV)
                    got = torch.empty_like(want)
                    ref.moe_sum(x, want)
                    ops["moe_sum"](x, got)
                    if not torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2):
                        return f"max abs diff {(got.float() - want.float()).abs().max():.3g}"
                    exact = (got == want).float().mean().item()
                    if exact < 0.97:
                        notes.append(f"{impl} moe_sum T{t}: {exact:.3f} of outputs round "
                                     f"like the fp32-accumulating reference")
                    return None

                run(f"{impl} moe_sum T{t}", sum_case)
    for n in notes:
        print("note:", n)
    return problems


# ----------------------------------------------------------------------------- cases

def cases(impls, tokens, ops: frozenset[str] = frozenset(OPS),
          ) -> list[tuple[str, str, int, str, Callable]]:
    """(op, shape, T, impl, fn) for the timing table, the ops in ``ops``; inputs made once per
    (op, shape, T)."""
    out = []
    for e, k in TOPK_SHAPES if "topk_softmax" in ops else ():
        for t in tokens:
            g = topk_inputs(t, e, k, seed=t)
            o = _routing_out(t, k)
            for impl, fns in impls.items():
                if "topk_softmax" in fns:
                    fn = fns["topk_softmax"]
                    out.append(("topk_softmax", f"E{e} k{k}", t, impl,
                                lambda fn=fn, o=o, g=g: fn(*o, g, True, None)))
    e, ng, tg, k = GROUPED
    bias = (torch.randn(e, device=DEV, generator=_gen(2)) * 0.05).to(torch.bfloat16)
    for t in tokens if "grouped_topk" in ops else ():
        s = topk_inputs(t, e, k, seed=t)
        for impl, fns in impls.items():
            if "grouped_topk" in fns:
                fn = fns["grouped_topk"]
                out.append(("grouped_topk", f"E{e} g{ng}/{tg} k{k} sig", t, impl,
                            lambda fn=fn, s=s: fn(s, ng, tg, k, True, 2.5, bias, 1)))
    for e, k in TOPK_SHAPES if "moe_align" in ops else ():
        for t in tokens:
            ids = align_inputs(t, e, k, seed=t)
            bufs = align_buffers(ids, e, ALIGN_BS)
            for impl, fns in impls.items():
                if "moe_align" in fns:
                    fn = fns["moe_align"]
                    out.append(("moe_align", f"E{e} k{k} bs{ALIGN_BS}", t, impl,
                                lambda fn=fn, ids=ids, e=e, b=bufs: fn(ids, e, ALIGN_BS, *b)))
    for t in tokens if "moe_sum" in ops else ():
        x = torch.randn(t, SUM_K, SUM_H, device=DEV).to(torch.bfloat16)
        o = torch.empty(t, SUM_H, dtype=torch.bfloat16, device=DEV)
        for impl, fns in impls.items():
            if "moe_sum" in fns:
                fn = fns["moe_sum"]
                out.append(("moe_sum", f"k{SUM_K} H{SUM_H} bf16", t, impl,
                            lambda fn=fn, x=x, o=o: fn(x, o)))
    return out


def bench_us(fn: Callable, rep: int) -> float:
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1000.0


# ----------------------------------------------------------------------------- sweep

def sweep(tokens, rep: int, ops: frozenset[str] = frozenset(OPS)) -> list[dict]:
    """Time the launch-config candidates of our kernels (patching ``mr.*_config``) for the ops
    in ``ops``."""
    rows: list[dict] = []

    def run(op, shape, t, name, cands, call):
        orig = getattr(mr, name)
        best = None
        for cand in cands:
            setattr(mr, name, lambda *a, c=cand: c)
            try:
                us = bench_us(call, rep)
            except Exception as exc:
                print(f"  sweep {op} {shape} T{t} {cand}: {type(exc).__name__}: {exc}")
                continue
            finally:
                setattr(mr, name, orig)
            rows.append({"op": op, "shape": shape, "T": t, "config": list(cand), "us": us})
            if best is None or us < best[1]:
                best = (cand, us)
        default = orig(*call.cfg_args)
        print(f"sweep {op:13s} {shape:18s} T={t:6d} best {best} default {default}")

    def pow2(n):
        return 1 << max(n - 1, 0).bit_length()

    for e, k in TOPK_SHAPES if "topk_softmax" in ops else ():
        for t in tokens:
            if _late():
                return rows
            g = topk_inputs(t, e, k, seed=t)
            o = _routing_out(t, k)

            def call(o=o, g=g):
                mr.topk_softmax(*o, g, True, None)

            call.cfg_args = (t, e, k)
            be = pow2(e)
            cands = [(bt, w) for bt in (1, 2, 4, 8, 16, 32, 64, 128)
                     for w in (1, 2, 4, 8) if bt * be <= 8192 and bt <= pow2(t)
                     and bt * be >= 32 * w]
            run("topk_softmax", f"E{e} k{k}", t, "topk_softmax_config", cands, call)
    e, ng, tg, k = GROUPED
    bias = (torch.randn(e, device=DEV) * 0.05).to(torch.bfloat16)
    for t in tokens if "grouped_topk" in ops else ():
        if _late():
            return rows
        s = topk_inputs(t, e, k, seed=t)

        def gcall(s=s):  # the general kernel: the one grouped_topk_config configures
            mr.grouped_topk_variant(0)(s, ng, tg, k, True, 2.5, bias, 1)

        gcall.cfg_args = (t, e, ng)
        cands = [(bt, w) for bt in (1, 2, 4, 8, 16, 32) for w in (1, 2, 4, 8)
                 if bt <= pow2(t) and bt * 256 >= 32 * w]
        run("grouped_topk", f"E{e}", t, "grouped_topk_config", cands, gcall)
    for e, k in TOPK_SHAPES if "moe_align" in ops else ():
        for t in tokens:
            if _late():
                return rows
            ids = align_inputs(t, e, k, seed=t)
            bufs = align_buffers(ids, e, ALIGN_BS)

            def acall(ids=ids, e=e, b=bufs, v1=mr.moe_align_variant("v1")):
                v1(ids, e, ALIGN_BS, *b)  # align_config is v1's (--align-variants: v2)

            acall.cfg_args = (ids.numel(), e, ALIGN_BS)
            n = ids.numel()
            cands = []
            if n <= 8192:
                tile = max(16, pow2(n))
                cands += [(True, tile, w, 0) for w in (1, 2, 4, 8, 16) if tile >= 32 * w]
            if n >= 1024:
                cands += [(False, tile, w, sw) for tile in (256, 512, 1024, 2048, 4096)
                          for w in (2, 4, 8) for sw in (4, 8, 16) if tile < n]
            if any(row[1] == "v1" for row in mr.ALIGN_PLAN):  # else align_config is unused
                run("moe_align", f"E{e} k{k}", t, "align_config", cands, acall)
            if n > mr.FAN_MAX_NUMEL:
                continue
            fan = mr.moe_align_variant("fan")

            def fcall(ids=ids, e=e, b=bufs, fan=fan):
                fan(ids, e, ALIGN_BS, *b)

            fcall.cfg_args = (n, e, "fan")
            fan_cands = []
            for chunk in (16, 32, 64, 128):
                for w in (1, 2, 4, 8):
                    if chunk > max(16, pow2(n)) or -(-n // chunk) > 1024:
                        continue
                    orig = mr.align_v2_config
                    mr.align_v2_config = lambda *a, c=(chunk, w): c  # type: ignore[assignment]
                    try:
                        msg = _align_mismatch(fan, ids, e)
                    finally:
                        mr.align_v2_config = orig  # type: ignore[assignment]
                    if msg is None:
                        fan_cands.append((chunk, w))
                    else:
                        print(f"  sweep moe_align fan E{e} T{t} {(chunk, w)}: FAIL {msg}")
            run("moe_align fan", f"E{e} k{k}", t, "align_v2_config", fan_cands, fcall)
    for t in tokens if "moe_sum" in ops else ():
        if _late():
            return rows
        x = torch.randn(t, SUM_K, SUM_H, device=DEV).to(torch.bfloat16)
        o = torch.empty(t, SUM_H, dtype=torch.bfloat16, device=DEV)

        def scall(x=x, o=o):
            mr.moe_sum(x, o)

        scall.cfg_args = (t, SUM_H, SUM_K)
        cands = [(bt, bh, w) for bt in (1, 2, 4) for bh in (256, 512, 1024, 2048)
                 for w in (1, 2, 4, 8) if bt * bh >= 64 * w and bt * bh <= 4096]
        run("moe_sum", f"k{SUM_K} H{SUM_H}", t, "moe_sum_config", cands, scall)
    return rows


# ----------------------------------------------------------------------------- align variants

ALIGN_LABELS: tuple[tuple[str, int, int], ...] = (
    ("v1", 0, 0), ("one", 0, 0), ("one", 0, 1), ("one", 0, 8), ("one_cmp", 0, 0),
    ("one_cmp", 0, 1), ("one_cmp", 0, 2), ("two", 256, 0), ("two", 1024, 0), ("two", 2048, 0),
    ("two", 4096, 0), ("two", 8192, 0), ("two_cmp", 256, 0), ("two_cmp", 1024, 0),
    ("fan", 0, 0), ("fan", 16, 0), ("fan", 32, 0), ("fan", 64, 0), ("fan", 0, 2), ("fan", 0, 8),
)
"""(variant, block, num_warps) of ours timed by --align-variants (0: the variant's default)."""


def _label(variant: str, block: int, warps: int) -> str:
    return variant + (f":b{block}" if block else "") + (f":w{warps}" if warps else "")


def _align_applies(variant: str, block: int, warps: int, numel: int) -> bool:
    """Skip the combinations that cannot win (and would only cost bench time)."""
    if warps and warps < 4 and numel > 512:
        return False
    if variant == "one_cmp":
        return numel <= 4096
    if variant == "one":
        return numel <= 32768 and (warps < 8 or numel >= 1024)
    if variant in ("two", "two_cmp"):  # 2..256 programs
        return 256 <= numel and block <= max(1024, numel) and numel <= 256 * block
    if variant == "fan":  # 2..512 programs, all routes in each program's registers
        return (32 <= numel <= mr.FAN_MAX_NUMEL and block <= numel
                and numel <= 512 * (block or 64))
    return True


def _align_mismatch(fn: Callable, ids: torch.Tensor, e: int) -> str | None:
    """None when ``fn`` gives the reference's result as the contract fixes it (the kit's
    ``align_mismatch``: num_tokens_post_pad, used experts_ids, segments) and, for ours, the
    pad value in every slot after the used blocks."""
    want = align_buffers(ids, e, ALIGN_BS)
    got = align_buffers(ids, e, ALIGN_BS)
    got[0].fill_(-7)
    ref.moe_align_block_size(ids, e, ALIGN_BS, *want)
    fn(ids, e, ALIGN_BS, *got)
    msg = align_mismatch(got, want, ALIGN_BS)
    if msg is not None:
        return msg
    used = int(want[2].item()) // ALIGN_BS
    if fn.__module__ == mr.__name__ and not (got[0][used * ALIGN_BS:] == ids.numel()).all():
        return "tail of sorted_token_ids not the pad value"
    return None


def align_variants(impls, rep: int, deadline_s: float,
                   tokens: tuple[int, ...] = TOKENS) -> dict[str, Any]:
    """Time every align variant of ours and the other impls at ``tokens``; print the table,
    the winners and a suggested ALIGN_PLAN (over the sizes measured only)."""
    t_start = time.time()
    others = {impl: ops["moe_align"] for impl, ops in impls.items()
              if impl in ("vllm", "flaggems") and "moe_align" in ops}
    ours = {_label(*spec): (spec, mr.moe_align_variant(*spec)) for spec in ALIGN_LABELS}
    labels = list(ours) + list(others)
    table: dict[tuple[str, int], dict[str, float]] = {}
    problems: list[str] = []
    numels: dict[tuple[str, int], int] = {}
    for e, k in TOPK_SHAPES:
        shape = f"E{e} k{k}"
        for t in tokens:
            if time.time() - t_start > deadline_s:
                print(f"deadline: stopped before {shape} T{t}")
                break
            ids = align_inputs(t, e, k, seed=t)
            bufs = align_buffers(ids, e, ALIGN_BS)
            numels[(shape, t)] = ids.numel()
            row = table.setdefault((shape, t), {})
            cands: list[tuple[str, Callable]] = [
                (lab, fn) for lab, (spec, fn) in ours.items()
                if _align_applies(*spec, ids.numel())]
            cands += list(others.items())
            for lab, fn in cands:
                try:
                    msg = _align_mismatch(fn, ids, e)
                    if msg is None:
                        skew = torch.full_like(ids, 3)
                        msg = _align_mismatch(fn, skew, e)
                        msg = msg and f"skewed routing: {msg}"
                    if msg:
                        problems.append(f"{lab} {shape} T{t}: {msg}")
                        continue
                    row[lab] = bench_us(lambda fn=fn, ids=ids, e=e, b=bufs:
                                        fn(ids, e, ALIGN_BS, *b), rep)
                except Exception as exc:
                    problems.append(f"{lab} {shape} T{t}: {type(exc).__name__}: {exc}")
                    if os.environ.get("FL_BENCH_TRACE"):
                        traceback.print_exc()
    for p in problems:
        print("  FAIL", p)
    print(f"\nmoe_align variants, block {ALIGN_BS}, us (CUDA graph replay median); "
          f"* = fastest of ours, ratio = that / fastest other")
    head = f"{'shape':9s} {'T':>6s} " + " ".join(f"{lab:>10s}" for lab in labels)
    print(head + f" {'ratio':>6s}")
    winners: dict[tuple[str, int], tuple[str, float, float | None]] = {}
    for (shape, t), row in table.items():
        mine = {lab: us for lab, us in row.items() if lab in ours}
        theirs = {lab: us for lab, us in row.items() if lab in others}
        best = min(mine, key=mine.__getitem__) if mine else None
        other = min(theirs.values()) if theirs else None
        if best is not None:
            winners[(shape, t)] = (best, mine[best], other)
        cells = []
        for lab in labels:
            us = row.get(lab)
            cell = "-" if us is None else f"{us:.2f}" + ("*" if lab == best else "")
            cells.append(f"{cell:>10s}")
        ratio = f"{mine[best] / other:.2f}" if best and other else "-"
        print(f"{shape:9s} {t:6d} " + " ".join(cells) + f" {ratio:>6s}")
    print()
    for e, k in TOPK_SHAPES:
        shape = f"E{e} k{k}"
        parts = []
        for t in tokens:
            w = winners.get((shape, t))
            if w:
                rel = f" {w[1] / w[2]:.2f}x" if w[2] else ""
                parts.append(f"T{t} {w[0]} {w[1]:.2f}{rel}")
        print(f"winners {shape}: " + " | ".join(parts))
    plan = _suggest_plan(table, numels, ours)
    print("\nsuggested ALIGN_PLAN (backends/flagos/moe_routing.py; per measured numel, the "
          "variant with the lowest worst-case ratio to the best of ours):")
    print("ALIGN_PLAN: tuple[tuple[int, str, int, int], ...] = (")
    for row_ in plan:
        print(f"    ({'_INT32_MAX' if row_[0] is None else row_[0]}, {row_[1]!r}, {row_[2]}, "
              f"{row_[3]}),")
    print(")")
    print(f"align variants: {time.time() - t_start:.0f} s")
    return {"table": [{"shape": sh, "T": t, **row} for (sh, t), row in table.items()],
            "problems": problems, "plan": plan}


def _suggest_plan(table, numels, ours) -> list[tuple[int | None, str, int, int]]:
    """Per distinct numel (over the shapes), the label of ours minimising the worst ratio to
    the best of ours at each point with that numel (labels missing at a point: excluded);
    runs of one label merged, limits at the geometric mean between measured sizes."""
    by_numel: dict[int, list[dict[str, float]]] = {}
    for key, row in table.items():
        mine = {lab: us for lab, us in row.items() if lab in ours}
        if mine:
            by_numel.setdefault(numels[key], []).append(mine)
    picks: list[tuple[int, str]] = []
    for n in sorted(by_numel):
        rows = by_numel[n]
        common = set.intersection(*(set(r) for r in rows))
        if not common:
            continue
        worst = {lab: max(r[lab] / min(r.values()) for r in rows) for lab in common}
        picks.append((n, min(worst, key=worst.__getitem__)))
    plan: list[tuple[int | None, str, int, int]] = []
    for i, (n, lab) in enumerate(picks):
        if plan and plan[-1][1:] == ours[lab][0]:
            plan.pop()
        if i + 1 < len(picks):
            limit: int | None = int((n * picks[i + 1][0]) ** 0.5)
        else:
            limit = None
        plan.append((limit, *ours[lab][0]))
    if plan:
        plan[-1] = (None, *plan[-1][1:])
    return plan


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="time launch-config candidates")
    ap.add_argument("--quick", action="store_true", help="T in {1, 64, 16384}, shorter reps")
    ap.add_argument("--out", default=None, help="directory for moe_routing.json")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--align-variants", action="store_true",
                    help="only: time every moe_align variant of ours vs vLLM and FlagGems")
    ap.add_argument("--tokens", default=None, help="comma list of T (default: all/--quick)")
    ap.add_argument("--experts", default=None,
                    help="comma list of E: only those (E, k) shapes of topk_softmax/moe_align")
    ap.add_argument("--ops", default=",".join(OPS),
                    help="comma list of ops for --sweep and the timing table")
    args = ap.parse_args()
    tokens = (1, 64, 16384) if args.quick else TOKENS
    if args.tokens:
        tokens = tuple(int(t) for t in args.tokens.split(","))
    if args.experts:
        keep = {int(e) for e in args.experts.split(",")}
        TOPK_SHAPES[:] = [s for s in TOPK_SHAPES if s[0] in keep]
    ops = frozenset(args.ops.split(","))
    if not ops <= set(OPS):
        ap.error(f"--ops: unknown {sorted(ops - set(OPS))}; known {OPS}")
    rep = 10 if args.quick else 20
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    impls = build_impls()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(),
                              "torch": torch.__version__, "triton": triton.__version__,
                              "impls": {k: sorted(v) for k, v in impls.items()}}
    if args.align_variants:
        result["align_variants"] = align_variants(impls, 10, DEADLINE_S - 25, tokens)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            path = Path(args.out) / "moe_align_variants.json"
            path.write_text(json.dumps(result, indent=1))
            print(f"wrote {path}")
        print(f"total {time.time() - T0:.0f} s")
        return 0
    if not args.skip_check:
        t = time.time()
        problems = check_all(impls)
        print(f"correctness ({time.time() - t:.0f} s): "
              + ("all impls match the reference" if not problems else
                 f"{len(problems)} problem(s)"))
        for p in problems[:60]:
            print("  FAIL", p)
        result["problems"] = problems
    if args.sweep:
        result["sweep"] = sweep(tokens, rep, ops)
    rows: list[dict] = []
    for op, shape, t, impl, fn in cases(impls, tokens, ops):
        if _late():
            print(f"deadline: timing stopped before {op} {shape} T{t}")
            break
        try:
            us = bench_us(fn, rep)
        except Exception as exc:
            print(f"{impl} {op} {shape} T{t}: {type(exc).__name__}: {exc}")
            if os.environ.get("FL_BENCH_TRACE"):
                traceback.print_exc()
            continue
        rows.append({"op": op, "shape": shape, "T": t, "impl": impl, "us": us})
    print(f"\n{'op':13s} {'shape':22s} {'T':>6s} {'impl':9s} {'us':>9s} {'ratio':>7s}")
    for r in rows:
        others = [o["us"] for o in rows if (o["op"], o["shape"], o["T"]) ==
                  (r["op"], r["shape"], r["T"]) and o["impl"] != r["impl"]]
        r["ratio_to_best_other"] = r["us"] / min(others) if others else None
        ratio = f"{r['ratio_to_best_other']:.2f}" if others else "-"
        print(f"{r['op']:13s} {r['shape']:22s} {r['T']:6d} {r['impl']:9s} {r['us']:9.2f} "
              f"{ratio:>7s}")
    result["rows"] = rows
    result["wall_s"] = time.time() - T0
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        path = Path(args.out) / "moe_routing.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    print(f"total {time.time() - T0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
