"""Kernel benchmark: flagos Triton kernels vs vLLM's CUDA ops, FlagGems, torch.compile, eager.

Run on the GPU machine from the repository root, with ``.gpu-ops`` carried
(``bash ../shared/tools/vllm_cuda_ops.sh .gpu-ops`` here first)::

    python bench/kernels.py [--sweep] [--out DIR] [--quick] [--host]

bf16, Llama-3-8B sizes (hidden 4096, MLP 14336, 32 query and 8 KV heads of 128, neox rotary
in place on q/k views of a fused qkv buffer, cos/sin cache from real angles). Every impl is
first checked against the eager reference on fresh inputs; timings use other inputs (in-place
ops repeated on one buffer drift). Device time: ``triton.testing.do_bench_cudagraph`` median
(CUDA graph replay, no launch gaps). Host time: eager calls in a loop, wall clock per call.
``--sweep`` times launch configurations of our kernels instead (for tuning ``ops.*_config``;
by default gelu_and_mul in both erf forms, silu_and_mul, rms_norm and the fused add + norm at
1-16384 tokens, each next to vLLM's op timed in the same run, with percent of copy bandwidth,
a summary line per op and size, and a ready ``TUNED`` entry for ``backends/flagos/ops.py``;
``--sweep --plan`` prints its size and time estimate only; ``sweep.partial.txt`` under
``--out`` keeps the lines of a run that is cut short); ``--host`` only the host-time table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _gpu_env import setup

VLLM_LIB = setup()

import torch
import triton
from fl_dispatch_flagos import flaggems
from fl_dispatch_flagos import ops as flagos
from fl_dispatch_flagos.launcher import pow2
from triton.testing import do_bench, do_bench_cudagraph

import fl_dispatch.core.ops as ref
from fl_dispatch.testing.tolerances import tolerance

HIDDEN, INTER, HQ, HK, HEAD = 4096, 14336, 32, 8, 128
EPS = 1e-6
DECODE = (1, 16, 64, 256)
PREFILL = (4096, 16384)
MAX_POS = 32768
DT = torch.bfloat16
DEV = "cuda"


# ----------------------------------------------------------------------------- impls

def _impls() -> dict[str, Any]:
    """name -> namespace with the four op functions, or the reason it is missing (a str)."""
    impls: dict[str, Any] = {"flagos": flagos}
    try:
        import fl_dispatch_cuda.ops as cuda_ops

        reason = cuda_ops.load_vllm_ops()
        impls["vllm_cuda"] = cuda_ops if reason is None else reason
    except Exception as exc:
        impls["vllm_cuda"] = f"{type(exc).__name__}: {exc}"
    reason = flaggems.flaggems_unavailable_reason()
    impls["flaggems"] = flaggems if reason is None else reason
    compiled = {name: torch.compile(getattr(ref, name), dynamic=True)
                for name in ("silu_and_mul", "gelu_and_mul", "rms_norm", "rotary_embedding")}
    impls["torch_compile"] = SimpleNamespace(**compiled)
    impls["eager"] = ref
    return impls


def serves(impl: Any, op: str) -> bool:
    """Whether ``impl`` (a namespace of op functions) has the function a case of ``op`` calls.
    FlagGems has no rotary impl here (fl_dispatch_flagos.flaggems.GAPS says why): its rows are
    left out instead of raising (which once cost the whole host-time table)."""
    fn = {"fused_add_rms_norm": "rms_norm", "rotary_neox": "rotary_embedding"}.get(op, op)
    return hasattr(impl, fn)


# ----------------------------------------------------------------------------- cases

def rope_cache(dtype: torch.dtype = DT) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, HEAD, 2, dtype=torch.float32, device=DEV) / HEAD))
    ang = torch.arange(MAX_POS, dtype=torch.float32, device=DEV)[:, None] * inv[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=-1).to(dtype)


@dataclass
class Case:
    """One op at one size: fresh inputs, the call, the bytes it must move."""

    op: str
    tokens: int

    def inputs(self) -> dict[str, Any]:
        t = self.tokens
        g = torch.Generator(device=DEV).manual_seed(t * 7 + len(self.op))
        rn = lambda *s: torch.randn(*s, device=DEV, dtype=torch.float32, generator=g).to(DT)
        if self.op in ("silu_and_mul", "gelu_and_mul"):
            return {"x": rn(t, 2 * INTER) * 2}
        if self.op == "rms_norm":
            return {"x": rn(t, HIDDEN) * 2, "w": rn(HIDDEN)}
        if self.op == "fused_add_rms_norm":
            return {"x": rn(t, HIDDEN), "r": rn(t, HIDDEN), "w": rn(HIDDEN)}
        if self.op == "rotary_neox":
            qkv = rn(t, (HQ + 2 * HK) * HEAD)
            pos = torch.randint(0, MAX_POS, (t,), device=DEV, generator=g)
            return self._views({"qkv": qkv, "pos": pos, "cache": CACHE})
        raise ValueError(self.op)

    @staticmethod
    def _views(a: dict[str, Any]) -> dict[str, Any]:
        """q and k: row-strided views of the fused qkv buffer, made once (not per call)."""
        a["q"] = a["qkv"][:, :HQ * HEAD]
        a["k"] = a["qkv"][:, HQ * HEAD:(HQ + HK) * HEAD]
        return a

    def clone(self, a: dict[str, Any]) -> dict[str, Any]:
        b = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
        return self._views(b) if self.op == "rotary_neox" else b

    def call(self, impl: Any, a: dict[str, Any]) -> Any:
        if self.op == "silu_and_mul":
            return impl.silu_and_mul(a["x"])
        if self.op == "gelu_and_mul":
            return impl.gelu_and_mul(a["x"], "none")
        if self.op == "rms_norm":
            return impl.rms_norm(a["x"], a["w"], EPS)
        if self.op == "fused_add_rms_norm":
            return impl.rms_norm(a["x"], a["w"], EPS, a["r"])
        impl.rotary_embedding(a["pos"], a["q"], a["k"], HEAD, a["cache"], True)
        return None

    def outputs(self, a: dict[str, Any], result: Any) -> list[torch.Tensor]:
        if self.op == "fused_add_rms_norm":
            return [a["x"], a["r"]]
        if self.op == "rotary_neox":
            return [a["qkv"]]
        return [result]

    @property
    def bytes(self) -> int:
        t, e = self.tokens, 2
        if self.op in ("silu_and_mul", "gelu_and_mul"):
            return t * 3 * INTER * e
        if self.op == "rms_norm":
            return 2 * t * HIDDEN * e + HIDDEN * e
        if self.op == "fused_add_rms_norm":
            return 4 * t * HIDDEN * e + HIDDEN * e
        return 2 * t * (HQ + HK) * HEAD * e + t * (8 + HEAD * e)


OPS = ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "gelu_and_mul", "rotary_neox")


# ----------------------------------------------------------------------------- measuring

def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth, bytes/s (read + write counted): the better
    of ``copy_`` (a memcpy) and an elementwise kernel (``mul(a, 1, out=b)``), as
    ``fl-dispatch bench`` measures it (on an H100 the memcpy reached 2.44 TB/s, the
    elementwise copy 3.0)."""
    a = torch.empty(2**29, dtype=torch.bfloat16, device=DEV).normal_()
    b = torch.empty_like(a)
    ms = min(do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median"),
             do_bench(lambda: torch.mul(a, 1, out=b), warmup=50, rep=300,
                      return_mode="median"))
    return 2 * 2**30 / (ms * 1e-3)


def device_us(case: Case, impl: Any, rep: int = 30) -> float:
    a = case.inputs()
    fn = lambda: case.call(impl, a)
    fn(), fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3


def host_us(fn: Callable[[], Any], n: int = 400, rounds: int = 7) -> float:
    """Median over ``rounds`` of the wall time per call of ``n`` eager calls."""
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        per_call.append((time.perf_counter() - t0) / n * 1e6)
    return sorted(per_call)[rounds // 2]


def check(case: Case, impl: Any) -> tuple[bool, float, float]:
    """Run ``impl`` and the eager reference on identical fresh inputs.

    Returns (ok, max abs error, relative error ||got - want|| / ||want||); ok: finite and the
    relative error under bf16's unit roundoff (2^-8); see also the ``allclose`` column."""
    a = case.inputs()
    b = case.clone(a)
    got = case.outputs(a, case.call(impl, a))
    want = case.outputs(b, case.call(ref, b))
    err, num, den, finite = 0.0, 0.0, 0.0, True
    for g_, w_ in zip(got, want):
        diff = g_.float() - w_.float()
        err = max(err, diff.abs().max().item())
        num += diff.pow(2).sum().item()
        den += w_.float().pow(2).sum().item()
        finite = finite and bool(torch.isfinite(g_).all())
    rel = (num / den) ** 0.5 if den else 0.0
    return finite and rel <= 2**-8, err, rel


def allclose(case: Case, impl: Any) -> bool:
    """Whether ``impl`` meets the flagos tolerance table element-wise (tests' criterion)."""
    a = case.inputs()
    b = case.clone(a)
    got = case.outputs(a, case.call(impl, a))
    want = case.outputs(b, case.call(ref, b))
    tol = tolerance(None, DT)
    atol, rtol = tol.atol, tol.rtol
    return all(torch.allclose(g_.float(), w_.float(), atol=atol, rtol=rtol)
               for g_, w_ in zip(got, want))


# ----------------------------------------------------------------------------- sweep

SWEEP_OPS = ("gelu_and_mul", "silu_and_mul", "rms_norm", "fused_add_rms_norm")
"""The ops ``--sweep`` tunes unless ``--ops`` says otherwise (``rotary_neox`` also works)."""
SWEEP_SIZES = (1, 16, 64, 256, 4096, 16384)
ACT_CODE = {"silu_and_mul": 0, "gelu_and_mul": 1}
TUNED_KIND = {"silu_and_mul": "silu", "gelu_and_mul": "gelu", "rms_norm": "rms_norm",
              "fused_add_rms_norm": "fused_add_rms_norm"}


def _act_variant(block: int, warps: int, stream: int, act: int) -> tuple[str, dict, tuple]:
    """A fixed act_and_mul config; ``act`` 1 (libdevice erf) or 3 (fast erfc) for gelu."""
    form = {0: "", 1: "lib:", 3: "fast:"}[act]

    def cfg(rows: int, d: int, act_in: int = 0, dev: int = -1,
            _c: tuple = (block, warps, stream, act)) -> tuple[int, int, int, int]:
        return _c[:3] + ((_c[3] if act_in in (1, 3) else act_in),)

    return f"{form}{block},{warps},s{stream}", {"act_config": cfg}, (block, warps, stream, act)


def _norm_variant(block_m: int, warps: int, stream: int) -> tuple[str, dict, tuple]:
    def cfg(rows: int, n_cols: int, residual: bool = False, dev: int = -1) -> tuple:
        return block_m, pow2(n_cols), True, warps, stream

    return f"{block_m},{warps},s{stream}", {"norm_config": cfg}, (block_m, warps, stream)


def _sweep_variants(op: str, tokens: int) -> list[tuple[str, dict[str, Any], tuple]]:
    """[(label, module attributes of ops to override, the config as a TUNED entry)] for
    ``op`` at ``tokens``: decode sizes (inputs in L2) without cache hints, prefill sizes with
    and without them; gelu in both erf forms."""
    if op in ACT_CODE:
        if tokens <= 64:
            pairs, streams = ((256, 2), (512, 2), (512, 4), (1024, 4), (1024, 8), (2048, 8)), (0,)
        elif tokens <= 1024:
            pairs, streams = ((512, 4), (1024, 4), (1024, 8), (2048, 4), (2048, 8),
                              (4096, 8)), (0,)
        else:
            pairs, streams = ((1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8),
                              (4096, 16), (8192, 16)), (0, 2)
        forms = (1, 3) if op == "gelu_and_mul" else (0,)
        return [_act_variant(b, w, st, a) for a in forms for b, w in pairs for st in streams]
    if op in ("rms_norm", "fused_add_rms_norm"):
        if tokens == 1:
            trip, streams = ((1, 4), (1, 8), (1, 16), (1, 32)), (0,)
        elif tokens <= 64:
            trip, streams = ((1, 4), (1, 8), (1, 16), (1, 32), (2, 16)), (0,)
        elif tokens <= 1024:
            trip, streams = ((1, 4), (1, 8), (1, 16), (2, 8), (2, 16), (4, 16)), (0,)
        else:
            trip, streams = ((1, 2), (1, 4), (1, 8), (1, 16), (2, 8), (2, 16), (4, 16)), (0, 2)
        return [_norm_variant(m, w, st) for m, w in trip for st in streams]
    if op == "rotary_neox":
        return [(f"{bh},{w}", {"rotary_config": (lambda *a, _c=(64, bh, w): _c)}, (bh, w))
                for bh, w in ((1, 1), (2, 1), (4, 2), (8, 4), (16, 4), (16, 8), (32, 4),
                              (32, 8), (32, 16))]
    raise ValueError(f"--sweep: no variants for {op!r}")


def _default_entry(op: str, tokens: int) -> tuple | None:
    """The config ops.py picks now for ``op`` at ``tokens`` (as a TUNED entry)."""
    dev = torch.cuda.current_device()
    if op in ACT_CODE:
        return tuple(flagos.act_config(tokens, INTER, ACT_CODE[op], dev))
    if op in ("rms_norm", "fused_add_rms_norm"):
        m, _, _, w, st = flagos.norm_config(tokens, HIDDEN, op == "fused_add_rms_norm", dev)
        return (m, w, st)
    return None


def _with(attrs: dict[str, Any], fn: Callable[[], Any]) -> Any:
    saved = {k: getattr(flagos, k) for k in attrs}
    for k, v in attrs.items():
        setattr(flagos, k, v)
    try:
        return fn()
    finally:
        for k, v in saved.items():
            setattr(flagos, k, v)


def sweep_plan(ops: tuple[str, ...], sizes: tuple[int, ...], vllm: bool) -> tuple[int, float]:
    """(timings, estimated seconds) of a sweep: each variant is checked and timed once; per
    op and size also vLLM twice (before and after), the default unless it is a variant, and
    the best variant once more. About 0.45 s per timing (do_bench_cudagraph's 10 x 30 ms plus
    capture) and 0.6 s per compiled variant."""
    timings, compiles = 0, set()
    for op in ops:
        for tokens in sizes:
            variants = _sweep_variants(op, tokens)
            timings += len(variants) + 2 + (2 if vllm else 0)
            compiles |= {(op, label) for label, _, _ in variants}
    return timings, timings * 0.45 + len(compiles) * 0.6


def sweep(out: list[str], sizes: tuple[int, ...], ops: tuple[str, ...] | None = None,
          vllm: Any = None, rep: int = 30, log: Callable[[str], None] = print
          ) -> dict[str, Any]:
    """Device time of each launch configuration next to vLLM's op (``vllm``, when loaded),
    timed in the same run; percent of the measured copy bandwidth; a summary per op and size
    and the TUNED entries (ops.py) that the results give."""
    ops = ops or SWEEP_OPS
    n, est = sweep_plan(ops, sizes, vllm is not None)

    def emit(line: str) -> None:
        out.append(line)
        log(line)

    emit(f"sweep plan: {len(ops)} ops x {len(sizes)} sizes, {n} timings, estimated "
         f"{est / 60:.1f} min")
    peak = copy_bandwidth()
    emit(f"measured device copy bandwidth {peak / 1e12:.3f} TB/s (read + write; best of "
         f"copy_ and an elementwise kernel)")
    t_start = time.perf_counter()
    results: dict[str, Any] = {"peak_Bps": peak}
    summary: list[str] = []
    tuned: dict[str, list[tuple[int, tuple]]] = {}
    for op in ops:
        for tokens in sizes:
            case = Case(op, tokens)
            timed = lambda impl: round(device_us(case, impl, rep), 2)
            pct = lambda us: 100 * case.bytes / (us * 1e-6) / peak
            v_before = timed(vllm) if vllm is not None else None
            row: dict[str, Any] = {}
            entries: dict[str, tuple] = {}
            for label, attrs, entry in _sweep_variants(op, tokens):
                entries[label] = entry
                try:
                    ok = _with(attrs, lambda: check(case, flagos)[0])
                    row[label] = _with(attrs, lambda: timed(flagos)) if ok else "WRONG"
                except Exception as exc:
                    row[label] = f"ERR {type(exc).__name__}: {str(exc)[:80]}"
            times = {k: v for k, v in row.items() if isinstance(v, float)}
            dflt_entry = _default_entry(op, tokens)
            dflt_label = next((k for k, e in entries.items() if e == dflt_entry), None)
            dflt = times.get(dflt_label) if dflt_label else timed(flagos)
            best = min(times, key=times.__getitem__) if times else None
            best_re = _with(_sweep_variants_by_label(op, tokens)[best],
                            lambda: timed(flagos)) if best else None
            v_after = timed(vllm) if vllm is not None else None
            v_us = min(v_before, v_after) if v_before and v_after else None
            forms = {}
            if op == "gelu_and_mul":
                by_label = _sweep_variants_by_label(op, tokens)
                for form in ("lib:", "fast:"):
                    ft = {k: v for k, v in times.items() if k.startswith(form)}
                    if ft:
                        k = min(ft, key=ft.__getitem__)
                        forms[form[:-1]] = (k, ft[k])
                        emit(f"agree {op} T={tokens} {form[:-1]}: "
                             + _with(by_label[k], lambda: _agreement(case, vllm)))
            # the entry for TUNED: the best when it beats the default by 1 %, else the default
            best_us = best_re if best_re is not None else times.get(best) if best else None
            keep = best_us is None or dflt is None or best_us > 0.99 * dflt
            choice = dflt_entry if keep else entries[best]
            choice_us = dflt if keep else best_us
            if choice is not None and op in TUNED_KIND:
                tuned.setdefault(TUNED_KIND[op], []).append((tokens, choice))
            line = (f"sweep {op:19s} T={tokens:6d} vLLM {v_before}/{v_after} us | default "
                    f"{dflt_entry} {dflt} us | best {best} {times.get(best)} us "
                    f"(re-timed {best_re}) | " + " ".join(f"{k}:{v}" for k, v in row.items()))
            emit(line)
            ratio = f"{v_us / choice_us:.3f}" if v_us and choice_us else "-"
            s_line = (f"summary {op:19s} T={tokens:6d} choice {choice} "
                      f"{'(default)' if keep else '(best)'} {choice_us} us "
                      f"{pct(choice_us) if choice_us else 0:.1f}% of copy | vLLM {v_us} us "
                      f"{pct(v_us) if v_us else 0:.1f}% | x vLLM {ratio}")
            if forms:
                s_line += " | " + " ".join(f"best {f} {k} {us} us ({pct(us):.1f}%)"
                                           for f, (k, us) in forms.items())
            summary.append(s_line)
            log(s_line)
            results[f"{op}/{tokens}"] = {
                "default": dflt_entry, "default_us": dflt, "best": best, "best_entry":
                entries.get(best), "best_us": times.get(best), "best_retimed_us": best_re,
                "choice": choice, "choice_us": choice_us, "vllm_us": [v_before, v_after],
                "pct_copy": pct(choice_us) if choice_us else None, "forms": forms, "all": row}
            torch.cuda.empty_cache()
    emit(f"sweep took {time.perf_counter() - t_start:.0f} s")
    out.extend(summary)
    log("\n".join(summary))
    name = torch.cuda.get_device_name()
    key = "H200" if "H200" in name else name
    lines = [f"# backends/flagos/ops.py TUNED entry from this sweep ({name}); "
             "rows below a size's log-midpoint with the next smaller size use the smaller one",
             f"TUNED[{key!r}] = {{"]
    for kind, entries_ in tuned.items():
        cut = _min_rows([t for t, _ in entries_])
        lines.append(f"    {kind!r}: ("
                     + ", ".join(f"({m}, {c})" for m, (_, c) in zip(cut, entries_)) + ",),")
    lines.append("}")
    for line in lines:
        emit(line)
    results["tuned"] = {k: [(m, c) for m, (_, c) in zip(_min_rows([t for t, _ in v]), v)]
                        for k, v in tuned.items()}
    return results


def _agreement(case: Case, vllm: Any) -> str:
    """How our result agrees with the eager reference and with vLLM's op on one input: the
    tolerance table, max abs error, fraction of bit-identical elements."""
    a = case.inputs()
    got = case.outputs(a, case.call(flagos, case.clone(a)))[0]
    parts = []
    for name, impl in (("eager", ref), ("vLLM", vllm)):
        if impl is None:
            continue
        want = case.outputs(a, case.call(impl, case.clone(a)))[0]
        tol = tolerance(None, DT)
        close = torch.allclose(got.float(), want.float(), atol=tol.atol, rtol=tol.rtol)
        diff = (got.float() - want.float()).abs().max().item()
        same = (got == want).float().mean().item()
        parts.append(f"vs {name}: allclose {'yes' if close else 'NO'}, max abs {diff:.3g}, "
                     f"bit-identical {100 * same:.3f}%")
    return "; ".join(parts)


def _min_rows(sizes: list[int]) -> list[int]:
    """TUNED ``min_rows`` of each swept size: 1 for the smallest, else just above the
    geometric midpoint with the next smaller size (1, 16, 64, 256, 4096, 16384 -> 1, 5, 33,
    129, 1025, 8193)."""
    return [1] + [int((a * b) ** 0.5) + 1 for a, b in zip(sizes, sizes[1:])]


def _sweep_variants_by_label(op: str, tokens: int) -> dict[str, dict[str, Any]]:
    return {label: attrs for label, attrs, _ in _sweep_variants(op, tokens)}


# ----------------------------------------------------------------------------- main

def host_table(impls: dict[str, Any], out: list[str], rounds: int = 9,
               n: int = 300) -> dict[str, Any]:
    """Eager host time per call (no graph), one token: our adapters, vLLM's adapters, raw
    ``torch.ops._C`` calls (with and without allocating the output), Triton's own launch path
    of the same kernel (``kernel[grid](...)``), our adapter without the launch, our cached
    launch alone, torch.compile, eager. Round-robin over the entries, median of ``rounds``
    rounds of ``n`` calls each, so that drifts of the host hit every entry alike."""
    res: dict[str, Any] = {}
    spin = time.perf_counter() + 2.0
    while time.perf_counter() < spin:  # let the host clock up before anything is timed
        pass
    for op in ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_neox"):
        case = Case(op, 1)
        entries: list[tuple[str, Callable[[], Any], Any]] = []
        for name, impl in impls.items():
            if not isinstance(impl, str) and serves(impl, op):
                a = case.inputs()
                entries.append((name, (lambda impl=impl, a=a: case.call(impl, a)), None))
        a = case.inputs()
        if not isinstance(impls.get("vllm_cuda"), str):
            entries += [(name, fn, None) for name, fn in _raw_vllm(op, a).items()]
        entries.append(("triton_run", _triton_run(op, case, a), None))
        entries.append(("flagos_cached_launch_only", _launch_only(op, case, a), None))
        entries.append(("flagos_wrapper_no_launch", lambda a=a: case.call(flagos, a),
                        _kernel(op)))
        if op == "rms_norm":
            x = a["x"]
            entries += [("alloc torch.empty(shape, dtype=, device=)",
                         lambda x=x: torch.empty(x.shape, dtype=x.dtype, device=x.device), None),
                        ("alloc torch.empty_like(x)", lambda x=x: torch.empty_like(x), None),
                        ("alloc x.new_empty(x.shape)", lambda x=x: x.new_empty(x.shape), None)]
        samples: dict[str, list[float]] = {name: [] for name, _, _ in entries}
        for name, fn, _ in entries:
            for _ in range(100):
                fn() if name != "flagos_wrapper_no_launch" else None
        for _ in range(rounds):
            for name, fn, no_launch in entries:
                if no_launch is not None:
                    _no_launch(no_launch)
                try:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(n):
                        fn()
                    torch.cuda.synchronize()
                    samples[name].append((time.perf_counter() - t0) / n * 1e6)
                except Exception as exc:
                    samples[name].append(float("nan"))
                    res[f"{name}/{op} error"] = f"{type(exc).__name__}: {exc}"
                finally:
                    if no_launch is not None:
                        _restore(no_launch)
        for name, vals in samples.items():
            res[f"{name}/{op}"] = sorted(vals)[len(vals) // 2]
    res["torch.empty(1, 4096)"] = host_us(
        lambda: torch.empty(1, HIDDEN, dtype=DT, device=DEV))
    res.update(_launch_parts())
    for k, v in res.items():
        line = f"host {k:44s} {v:8.2f} us/call" if isinstance(v, float) else f"host {k} {v}"
        print(line, flush=True)
        out.append(line)
    return res


def _raw_vllm(op: str, a: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """vLLM's ops called straight through ``torch.ops._C``: output preallocated, and (for the
    ops that return a new tensor) also allocating it per call as any caller must."""
    c = torch.ops._C
    x = a.get("x")
    if op == "rms_norm":
        o = torch.empty_like(x)
        return {"vllm_C_raw": lambda: c.rms_norm(o, x, a["w"], EPS),
                "vllm_C_raw+alloc": lambda: c.rms_norm(torch.empty_like(x), x, a["w"], EPS)}
    if op == "fused_add_rms_norm":
        return {"vllm_C_raw": lambda: c.fused_add_rms_norm(x, a["r"], a["w"], EPS)}
    if op == "silu_and_mul":
        o = torch.empty(x.shape[0], INTER, dtype=DT, device=DEV)
        return {"vllm_C_raw": lambda: c.silu_and_mul(o, x),
                "vllm_C_raw+alloc": lambda: c.silu_and_mul(
                    torch.empty(x.shape[0], INTER, dtype=DT, device=DEV), x)}
    return {"vllm_C_raw": lambda: c.rotary_embedding(a["pos"], a["q"], a["k"], HEAD,
                                                     a["cache"], True)}


_NOOP_ENTRY = (lambda *args: None, lambda dev: 0, ())
"""A cached-launcher entry (``TritonKernel.cached``) whose launch and stream do nothing."""


def _no_launch(kern: Any) -> None:
    """Launches of ``kern`` do nothing: its ``launch``, and the cached entries that hot
    adapters call themselves (rms_norm) are no-ops; the adapter's own work still runs."""
    kern.launch = lambda *args: None
    kern.cached = lambda key: _NOOP_ENTRY


def _capture(kern: Any, captured: list[tuple]) -> None:
    """Launches of ``kern`` append their ``launch`` arguments to ``captured`` instead (the
    hot adapters' inline cached path reports a miss, so they call ``launch``)."""
    kern.launch = lambda *args: captured.append(args)
    kern.cached = lambda key: None


def _restore(kern: Any) -> None:
    del kern.launch
    kern.cached = kern._fast.get


def _kernel(op: str) -> Any:
    kernels = {"silu_and_mul": flagos.ACT_KERNEL, "rotary_neox": flagos.ROTARY_KERNEL}
    return kernels.get(op, flagos.NORM_KERNEL)


def _launch_only(op: str, case: Case, a: dict[str, Any]) -> Callable[[], Any]:
    """``TritonKernel.launch`` alone, on the cached (fast) path."""
    kern = _kernel(op)
    captured: list[tuple] = []
    _capture(kern, captured)
    try:
        case.call(flagos, a)
    finally:
        _restore(kern)
    args = captured[0]
    kern.launch(*args)
    return lambda: kern.launch(*args)


def _launch_parts() -> dict[str, Any]:
    """Where the cached launch's host time goes (fused rms_norm, one token)."""
    import inspect

    case = Case("fused_add_rms_norm", 1)
    a = case.inputs()
    kern = flagos.NORM_KERNEL
    captured: list[tuple] = []
    _capture(kern, captured)
    try:
        case.call(flagos, a)
    finally:
        _restore(kern)
    key, grid, dev, tensors, ptrs, rest, warps = captured[0]
    fast, stream_of, head = kern.cached(key)
    function = head[0]
    stream = stream_of(dev)
    out: dict[str, Any] = {}
    out["launch part: our cached launch call"] = host_us(
        lambda: fast(grid[0], grid[1], grid[2], stream, *head, *ptrs, *rest))
    compiled = kern.jit()[grid](*tensors, *rest, num_warps=warps)
    launcher, meta = compiled.run, compiled.packed_metadata
    out["launch part: Triton's CompiledKernel.run(...)"] = host_us(
        lambda: launcher(grid[0], grid[1], grid[2], stream, function, meta, None, None, None,
                         *ptrs, *rest))
    out["launch part: same with tensors (data_ptr + driver check)"] = host_us(
        lambda: launcher(grid[0], grid[1], grid[2], stream, function, meta, None, None, None,
                         *tensors, *rest))
    out["launch part: stream getter"] = host_us(lambda: stream_of(dev))
    out["launch part: dict lookup of the key"] = host_us(lambda: kern.cached(key))
    out["launcher"] = f"{type(launcher).__module__}.{type(launcher).__qualname__}, cached " \
                      f"call {getattr(fast, '__qualname__', fast)}"
    try:
        out["launcher __call__ source"] = inspect.getsource(type(launcher).__call__)[:1500]
    except Exception as exc:
        out["launcher __call__ source"] = repr(exc)
    return out


def _triton_run(op: str, case: Case, a: dict[str, Any]) -> Callable[[], Any]:
    """The same flagos kernel launched through ``kernel[grid](...)`` (Triton's own path)."""
    calls: list[tuple] = []
    kern = _kernel(op)
    _capture(kern, calls)
    try:
        case.call(flagos, a)
    finally:
        _restore(kern)
    jit = kern.jit()
    _, g, _, tensors, _, rest, w = calls[0]
    args = (*tensors, *rest)
    return lambda: jit[g](*args, num_warps=w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="tune launch configs instead")
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    parser.add_argument("--host", action="store_true", help="only the host-time table")
    parser.add_argument("--ops", default="", help="--sweep: only these ops (comma-separated)")
    parser.add_argument("--sizes", default="", help="--sweep: these token counts (comma-sep.)")
    parser.add_argument("--rep", type=int, default=30,
                        help="--sweep: do_bench_cudagraph's rep (ms of replay per timing)")
    parser.add_argument("--plan", action="store_true",
                        help="--sweep: print the number of timings and the estimate only")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    global CACHE
    CACHE = rope_cache()
    lines: list[str] = []
    head = (f"device {torch.cuda.get_device_name()} | torch {torch.__version__} | triton "
            f"{triton.__version__} | vLLM _C {VLLM_LIB}")
    print(head, flush=True)
    lines.append(head)
    if args.sweep:
        sizes = SWEEP_SIZES if not args.quick else (1, 16384)
        if args.sizes:
            sizes = tuple(int(t) for t in args.sizes.split(","))
        ops = tuple(o for o in args.ops.split(",") if o) or SWEEP_OPS
        if args.plan:
            n, est = sweep_plan(ops, sizes, True)
            print(f"sweep plan: {n} timings, estimated {est / 60:.1f} min")
            return
        vllm = _impls().get("vllm_cuda")
        if isinstance(vllm, str):
            print(f"vLLM's ops unavailable: {vllm}", flush=True)
        os.makedirs(args.out, exist_ok=True)
        partial = open(os.path.join(args.out, "sweep.partial.txt"), "w")  # survives a timeout

        def log(line: str) -> None:
            print(line, flush=True)
            partial.write(line + "\n")
            partial.flush()

        with partial:
            res = sweep(lines, sizes, ops, None if isinstance(vllm, str) else vllm,
                        args.rep, log)
        _write(args.out, "sweep", lines, res)
        return
    if args.host:
        impls = _impls()
        res = {"host": host_table(impls, lines),
               "fast_path_keys": {k.name: k.cached_keys for k in flagos.KERNELS}}
        _write(args.out, "kernels_host", lines, res)
        return
    peak = copy_bandwidth()
    lines.append(f"measured device copy bandwidth {peak / 1e12:.3f} TB/s (read + write)")
    print(lines[-1], flush=True)
    impls = _impls()
    for name, impl in impls.items():
        if isinstance(impl, str):
            lines.append(f"impl {name}: unavailable: {impl}")
            print(lines[-1], flush=True)
    sizes = (1, 64, 16384) if args.quick else DECODE + PREFILL
    results: dict[str, Any] = {"peak_Bps": peak, "rows": []}
    table = [f"{'impl':14s} {'op':19s} {'tokens':>6s} {'us':>9s} {'GB/s':>8s} {'%copy':>6s} "
             f"{'x vLLM':>7s}  check vs eager reference"]
    for op in OPS:
        for tokens in sizes:
            case = Case(op, tokens)
            times: dict[str, float] = {}
            for name, impl in impls.items():
                if isinstance(impl, str) or not serves(impl, op):
                    continue
                row = {"impl": name, "op": op, "tokens": tokens}
                try:
                    ok, err, rel = check(case, impl)
                    close = allclose(case, impl)
                    us = device_us(case, impl)
                    times[name] = us
                    row.update(us=us, ok=ok, max_err=err, rel_err=rel, allclose=close)
                except Exception as exc:
                    row.update(error=f"{type(exc).__name__}: {exc}")
                    traceback.print_exc()
                results["rows"].append(row)
            base = times.get("vllm_cuda")
            for name, us in times.items():
                bw = case.bytes / (us * 1e-6)
                row = next(r for r in results["rows"] if r["impl"] == name and r["op"] == op
                           and r["tokens"] == tokens)
                speed = f"{base / us:7.2f}" if base else "      -"
                line = (f"{name:14s} {op:19s} {tokens:6d} {us:9.2f} {bw / 1e9:8.0f} "
                        f"{100 * bw / peak:6.1f} {speed}  "
                        f"{'ok' if row['ok'] else 'WRONG'} rel {row['rel_err']:.1e} max "
                        f"{row['max_err']:.3g} allclose {'yes' if row['allclose'] else 'no'}")
                table.append(line)
                print(line, flush=True)
            torch.cuda.empty_cache()
    lines += table
    results["host"] = host_table(impls, lines)
    results["fast_path_keys"] = {k.name: k.cached_keys for k in flagos.KERNELS}
    lines.append(f"flagos cached launcher keys: {results['fast_path_keys']}")
    _write(args.out, "kernels", lines, results)


def _write(out_dir: str, stem: str, lines: list[str], data: Any) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)
    print("\n".join(lines[-60:]))


CACHE: torch.Tensor
if __name__ == "__main__":
    main()
