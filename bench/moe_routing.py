"""MoE routing benchmark: our Triton adapters vs the torch reference, vLLM 0.25 ``_moe_C``
and FlagGems, on one GPU. Run from the repository root (no install, no network)::

    python bench/moe_routing.py [--sweep] [--quick] [--out DIR]

1. Correctness of every impl against ``fl_dispatch/core/ops/moe.py`` on the GPU,
   random inputs and injected ties (routing ids exactly, weights 1e-5 relative; align:
   ``num_tokens_post_pad``, used ``experts_ids``, per-block token sets).
2. ``--sweep``: times the launch-config candidates of each of our kernels and prints the best
   per size (write them back into ``backends/flagos/moe_routing.py``'s ``*_config``).
3. Side-by-side device time, ``triton.testing.do_bench_cudagraph`` median (CUDA-graph
   replay: also proves our adapters are capturable), one table: op, shape, T, impl, us,
   ratio to the best OTHER impl. JSON to ``--out``.

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

from fl_dispatch.testing.inputs_moe import align_canonical


def _load_reference():
    from fl_dispatch.core.ops import moe

    return moe


ref = _load_reference()
DEV = "cuda"
TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)
TOPK_SHAPES = ((8, 2), (128, 8), (256, 8))  # (E, k)
GROUPED = (256, 8, 4, 8)  # E, groups, keep, k (sigmoid, bias)
ALIGN_BS = 64
SUM_H, SUM_K = 4096, 8
DEADLINE_S = 225.0
T0 = time.time()


def _late() -> bool:
    return time.time() - T0 > DEADLINE_S


# ----------------------------------------------------------------------------- other impls

def _load_vllm() -> Any:
    """torch.ops._moe_C from .gpu-ops/vllm_moe_C.so.xz, or the reason it is missing (str)."""
    packed = Path(ROOT) / ".gpu-ops" / "vllm_moe_C.so.xz"
    if not packed.exists():
        return f"{packed} not carried"
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
                            if not torch.equal(got[2], want[2]):
                                return f"num_tokens_post_pad {got[2].item()} vs " \
                                       f"{want[2].item()}"
                            used = int(want[2].item()) // ALIGN_BS
                            if not torch.equal(got[1][:used], want[1][:used]):
                                return "experts_ids differ"
                            # the kit's canonical form: each expert segment sorted
                            ga = {"block_size": ALIGN_BS, "sorted_token_ids": got[0].clone(),
                                  "experts_ids": got[1].clone(), "num_tokens_post_pad": got[2]}
                            wa = {"block_size": ALIGN_BS, "sorted_token_ids": want[0].clone(),
                                  "experts_ids": want[1].clone(),
                                  "num_tokens_post_pad": want[2]}
                            align_canonical(ga)
                            align_canonical(wa)
                            n = used * ALIGN_BS
                            if not torch.equal(ga["sorted_token_ids"][:n],
                                               wa["sorted_token_ids"][:n]):
                                return "per-expert token sets differ"
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

def cases(impls, tokens) -> list[tuple[str, str, int, str, Callable]]:
    """(op, shape, T, impl, fn) for the timing table; inputs made once per (op, shape, T)."""
    out = []
    for e, k in TOPK_SHAPES:
        for t in tokens:
            g = topk_inputs(t, e, k, seed=t)
            o = _routing_out(t, k)
            for impl, ops in impls.items():
                if "topk_softmax" in ops:
                    fn = ops["topk_softmax"]
                    out.append(("topk_softmax", f"E{e} k{k}", t, impl,
                                lambda fn=fn, o=o, g=g: fn(*o, g, True, None)))
    e, ng, tg, k = GROUPED
    bias = (torch.randn(e, device=DEV, generator=_gen(2)) * 0.05).to(torch.bfloat16)
    for t in tokens:
        s = topk_inputs(t, e, k, seed=t)
        for impl, ops in impls.items():
            if "grouped_topk" in ops:
                fn = ops["grouped_topk"]
                out.append(("grouped_topk", f"E{e} g{ng}/{tg} k{k} sig", t, impl,
                            lambda fn=fn, s=s: fn(s, ng, tg, k, True, 2.5, bias, 1)))
    for e, k in TOPK_SHAPES:
        for t in tokens:
            ids = align_inputs(t, e, k, seed=t)
            bufs = align_buffers(ids, e, ALIGN_BS)
            for impl, ops in impls.items():
                if "moe_align" in ops:
                    fn = ops["moe_align"]
                    out.append(("moe_align", f"E{e} k{k} bs{ALIGN_BS}", t, impl,
                                lambda fn=fn, ids=ids, e=e, b=bufs: fn(ids, e, ALIGN_BS, *b)))
    for t in tokens:
        x = torch.randn(t, SUM_K, SUM_H, device=DEV).to(torch.bfloat16)
        o = torch.empty(t, SUM_H, dtype=torch.bfloat16, device=DEV)
        for impl, ops in impls.items():
            if "moe_sum" in ops:
                fn = ops["moe_sum"]
                out.append(("moe_sum", f"k{SUM_K} H{SUM_H} bf16", t, impl,
                            lambda fn=fn, x=x, o=o: fn(x, o)))
    return out


def bench_us(fn: Callable, rep: int) -> float:
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1000.0


# ----------------------------------------------------------------------------- sweep

def sweep(tokens, rep: int) -> list[dict]:
    """Time the launch-config candidates of our kernels (patching ``mr.*_config``)."""
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

    for e, k in TOPK_SHAPES:
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
    for t in tokens:
        if _late():
            return rows
        s = topk_inputs(t, e, k, seed=t)

        def gcall(s=s):
            mr.grouped_topk(s, ng, tg, k, True, 2.5, bias, 1)

        gcall.cfg_args = (t, e, ng)
        cands = [(bt, w) for bt in (1, 2, 4, 8, 16, 32) for w in (1, 2, 4, 8)
                 if bt <= pow2(t) and bt * 256 >= 32 * w]
        run("grouped_topk", f"E{e}", t, "grouped_topk_config", cands, gcall)
    for e, k in TOPK_SHAPES:
        for t in tokens:
            if _late():
                return rows
            ids = align_inputs(t, e, k, seed=t)
            bufs = align_buffers(ids, e, ALIGN_BS)

            def acall(ids=ids, e=e, b=bufs):
                mr.moe_align_block_size(ids, e, ALIGN_BS, *b)

            acall.cfg_args = (ids.numel(), e, ALIGN_BS)
            n = ids.numel()
            cands = []
            if n <= 8192:
                tile = max(16, pow2(n))
                cands += [(True, tile, w, 0) for w in (1, 2, 4, 8, 16) if tile >= 32 * w]
            if n >= 1024:
                cands += [(False, tile, w, sw) for tile in (256, 512, 1024, 2048, 4096)
                          for w in (2, 4, 8) for sw in (4, 8, 16) if tile < n]
            run("moe_align", f"E{e} k{k}", t, "align_config", cands, acall)
    for t in tokens:
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


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="time launch-config candidates")
    ap.add_argument("--quick", action="store_true", help="T in {1, 64, 16384}, shorter reps")
    ap.add_argument("--out", default=None, help="directory for moe_routing.json")
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args()
    tokens = (1, 64, 16384) if args.quick else TOKENS
    rep = 10 if args.quick else 20
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    impls = build_impls()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(),
                              "torch": torch.__version__, "triton": triton.__version__,
                              "impls": {k: sorted(v) for k, v in impls.items()}}
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
        result["sweep"] = sweep(tokens, rep)
    rows: list[dict] = []
    for op, shape, t, impl, fn in cases(impls, tokens):
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
