"""Kernel benchmark: flagos Triton kernels vs vLLM's CUDA ops, FlagGems, torch.compile, eager.

Run on the GPU machine from the repository root, with ``.gpu-ops`` carried
(``bash ../shared/tools/vllm_cuda_ops.sh .gpu-ops`` here first)::

    python bench/kernels.py [--sweep] [--out DIR] [--quick] [--host]

bf16, Llama-3-8B sizes (hidden 4096, MLP 14336, 32 query and 8 KV heads of 128, neox rotary
in place on q/k views of a fused qkv buffer, cos/sin cache from real angles). Every impl is
first checked against the eager reference on fresh inputs; timings use other inputs (in-place
ops repeated on one buffer drift). Device time: ``triton.testing.do_bench_cudagraph`` median
(CUDA graph replay, no launch gaps). Host time: eager calls in a loop, wall clock per call.
``--sweep`` times launch configurations of our kernels instead (for tuning ``ops.*_config``);
``--host`` only the host-time table.
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
    """Measured device-to-device copy bandwidth, bytes/s (read + write counted)."""
    a = torch.empty(2**29, dtype=torch.bfloat16, device=DEV).normal_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * 2**30 / (ms * 1e-3)


def device_us(case: Case, impl: Any) -> float:
    a = case.inputs()
    fn = lambda: case.call(impl, a)
    fn(), fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3


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

def _sweep_variants() -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """op -> [(label, module attributes of ops to override)]."""
    act = [(f"{b},{w},s{st}", {"act_config": (lambda *a, _c=(b, w, st): _c)})
           for b, w in ((256, 2), (512, 2), (512, 4), (1024, 4), (1024, 8), (2048, 4),
                        (2048, 8), (4096, 8), (4096, 16)) for st in (0, 1, 2)]
    norm = [(f"{m},{w}", {"norm_config": (lambda *a, _c=(m, 4096, True, w): _c)})
            for m, w in ((1, 4), (1, 8), (1, 16), (2, 8), (2, 16), (4, 16))]
    rope = [(f"{bh},{w}", {"rotary_config": (lambda *a, _c=(64, bh, w): _c)})
            for bh, w in ((1, 1), (2, 1), (4, 2), (8, 4), (16, 4), (16, 8), (32, 4), (32, 8),
                          (32, 16))]
    return {"silu_and_mul": act, "gelu_and_mul": act, "rms_norm": norm,
            "rotary_embedding": rope}


def sweep(out: list[str], sizes: tuple[int, ...], ops: tuple[str, ...] | None = None,
          vllm: Any = None) -> dict[str, Any]:
    """Device time of each launch configuration; ``vllm`` (vLLM's ops, when loaded) is timed
    on the same case for reference."""
    results: dict[str, Any] = {}
    for op, variants in _sweep_variants().items():
        if ops and op not in ops:
            continue
        for tokens in sizes:
            case = Case(op, tokens)
            row = {}
            for label, attrs in variants:
                saved = {k: getattr(flagos, k) for k in attrs}
                for k, v in attrs.items():
                    setattr(flagos, k, v)
                try:
                    ok = check(case, flagos)[0]
                    row[label] = round(device_us(case, flagos), 2) if ok else "WRONG"
                except Exception as exc:
                    row[label] = f"ERR {type(exc).__name__}"
                finally:
                    for k, v in saved.items():
                        setattr(flagos, k, v)
            times = {k: v for k, v in row.items() if isinstance(v, float)}
            best = min(times, key=times.get) if times else None
            dflt = round(device_us(case, flagos), 2)
            ref_us = round(device_us(case, vllm), 2) if vllm is not None else None
            line = (f"sweep {op:19s} T={tokens:6d} default {dflt} us, best {best} "
                    f"{times.get(best)} us, vLLM {ref_us} us | "
                    + " ".join(f"{k}:{v}" for k, v in row.items()))
            print(line, flush=True)
            out.append(line)
            results[f"{op}/{tokens}"] = {"default_us": dflt, "best": best, "all": row,
                                         "vllm_us": ref_us}
            torch.cuda.empty_cache()
    return results


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
        sizes = (1, 16, 64, 256, 4096, 16384) if not args.quick else (1, 16384)
        if args.sizes:
            sizes = tuple(int(t) for t in args.sizes.split(","))
        vllm = _impls().get("vllm_cuda")
        res = sweep(lines, sizes, tuple(o for o in args.ops.split(",") if o),
                    None if isinstance(vllm, str) else vllm)
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
