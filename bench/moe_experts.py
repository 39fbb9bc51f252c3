"""fused_experts on one GPU: correctness, tile sweep, and timing against FlagGems and vLLM.

Run from the repository root (no install, no network)::

    python bench/moe_experts.py --out results/moe            # check + compare (< 5 min)
    python bench/moe_experts.py --sweep --shapes qwen3 --out results/moe_sweep
    python bench/moe_experts.py --sweep --shapes mixtral,deepseek --tokens 1,64,4096 ...
    python bench/moe_experts.py --sweep --pdl-only --tokens 1,4,16 --skip-check --out ...
    python bench/moe_experts.py --sweep --tma --tokens 4096 --skip-check --out ...

1. Correctness: ours (and vLLM's and FlagGems', when they import) vs the PyTorch reference
   (``fl_dispatch/core/ops/moe.py``) for every shape at small M, plus CUDA-graph capture of
   ours at M in {1, 8, 64} and replay with new routing (vs an eager call).
2. ``--sweep``: for each shape and T, times tile-config candidates (coordinate descent: the
   alignment block BLOCK_SIZE_M, then gemm1's tiles with gemm2 fixed, then gemm2's; at decode
   with k > 1 also gemm2 with the sum fused, ``FUSED_G2``; at decode, T <= ``PDL_MAX_T``, on
   sm_90+, also the best unfused and the best fused gemm2 launched as PDL dependents of GEMM1,
   ``PDL_VARIANTS``) and writes the best as ``moe_configs.TABLES`` entries
   (``sweep_best.json`` + printed Python). A PDL candidate is timed only after it passed
   ``pdl_check`` (bit for bit the same config without PDL, eager and in a CUDA graph
   replayed with new routing); one that fails is logged and can never win. ``--pdl-only``
   skips the tile search: the table's config for each (shape, T) against its PDL variants.
3. Timing, ``triton.testing.do_bench_cudagraph`` median: ours; FlagGems'
   ``fused_experts_impl`` (a port of vLLM's Triton MoE) with its own configs and with
   vLLM's shipped H200 configs injected (``moe_configs.VLLM_H200``) when ``import flag_gems``
   works; vLLM's own Triton ``fused_experts`` (``vllm``: vLLM 0.25 on the GPU machine, see
   ``bench/gpu_vllm.sh``) with the tile configs it ships and picks itself (its default tiles
   where none ships, e.g. DeepSeek's E=256, N=2048) when ``import vllm`` works, else
   "vllm: not installed" and no such column. Reported: us, weight TB/s (bytes of the distinct
   experts actually hit / time), TFLOP/s, and ours / best other (an impl that failed the
   correctness check on that shape is left out of the best).

Alignment and sum: ``fl_dispatch_flagos.moe_routing`` (moe_align_block_size, moe_sum) when it
imports, else self-contained graph-safe PyTorch stand-ins (noted in the output and JSON; the
stand-in alignment is ~10 small kernels, so aligned-path times are then pessimistic).
One failure never aborts the run: it is recorded and the run goes on.
"""

from __future__ import annotations

import argparse
import enum
import functools
import importlib
import importlib.util
import inspect
import json
import math
import sys
import time
import traceback
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_env import ROOT, setup

setup()

import torch
import triton


def _import_flagos():
    """(moe_experts, moe_configs, routing-or-None, note)."""
    try:
        me = importlib.import_module("fl_dispatch_flagos.moe_experts")
        mc = importlib.import_module("fl_dispatch_flagos.moe_configs")
        pkg = "fl_dispatch_flagos"
        note = ""
    except ImportError as exc:  # the package __init__ imports fl_dispatch
        pkg = "_flagos_moe_standalone"
        mod = types.ModuleType(pkg)
        mod.__path__ = [str(ROOT / "backends" / "flagos")]
        sys.modules[pkg] = mod
        me = importlib.import_module(f"{pkg}.moe_experts")
        mc = importlib.import_module(f"{pkg}.moe_configs")
        note = f"fl_dispatch_flagos did not import ({exc}); loaded backends/flagos stand-alone"
    try:
        routing = importlib.import_module(f"{pkg}.moe_routing")
        routing.moe_align_block_size, routing.moe_sum  # noqa: B018
    except Exception as exc:
        routing = None
        note += f"{'; ' if note else ''}moe_routing unavailable ({type(exc).__name__}: {exc})"
    return me, mc, routing, note


def _load_reference():
    from fl_dispatch.core.ops import moe

    return moe


# ----------------------------------------------------------------------------- torch stand-ins

def torch_moe_sum(inp, out):
    torch.sum(inp, dim=1, out=out)


# ----------------------------------------------------------------------------- shapes

SHAPES = {  # name: (E, N (intermediate), K (hidden), top_k)
    "mixtral": (8, 14336, 4096, 2),
    "qwen3": (128, 768, 2048, 8),
    "deepseek": (256, 2048, 7168, 8),
}
TOKENS = (1, 16, 64, 256, 1024, 4096)
DTYPE = torch.bfloat16


def make_weights(E, N, K, device="cuda"):
    w1 = torch.randn(E, 2 * N, K, device=device, dtype=DTYPE).mul_(1.0 / math.sqrt(K))
    w2 = torch.randn(E, K, N, device=device, dtype=DTYPE).mul_(1.0 / math.sqrt(N))
    return w1, w2


def make_routing(T, E, k, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(T, E, device=device, generator=g)
    w, ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).float().contiguous()
    return w, ids.to(torch.int32).contiguous()


def make_x(T, K, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed + 1)
    return torch.randn(T, K, device=device, generator=g).to(DTYPE)


def traffic(T, E, N, K, k, ids):
    hit = int(torch.unique(ids).numel())
    wbytes = hit * 3 * N * K * 2
    flops = 6.0 * T * k * N * K
    return hit, wbytes, flops


def _sync():
    """torch.cuda.synchronize(), never raising (after a failed launch)."""
    try:
        torch.cuda.synchronize()
    except Exception:
        pass


def bench_graph(fn, rep=40):
    """Median ms under CUDA-graph replay; falls back to do_bench (noted) if capture fails."""
    fn()
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"), "graph"
    except Exception as exc:
        _sync()
        return triton.testing.do_bench(fn, rep=rep, return_mode="median"), \
            f"eager ({type(exc).__name__})"


# ----------------------------------------------------------------------------- FlagGems

def load_flaggems():
    try:
        import flag_gems
    except Exception as exc:
        return None, None, f"import flag_gems failed: {type(exc).__name__}: {exc}"
    fn = getattr(flag_gems, "fused_experts_impl", None)
    if fn is None:
        try:
            fn = importlib.import_module("flag_gems.fused.fused_moe").fused_experts_impl
        except Exception as exc:
            return None, None, f"no fused_experts_impl: {exc}"
    mod = sys.modules.get(fn.__module__)
    return fn, mod, f"flag_gems {getattr(flag_gems, '__version__', '?')} ({fn.__module__})"


def flaggems_call(fn, x, w1, w2, w, ids):
    params = inspect.signature(fn).parameters
    kw = {}
    if "inplace" in params:
        kw["inplace"] = False
    if "activation" in params:
        kw["activation"] = "silu"
    return fn(x, w1, w2, w, ids, **kw)


class InjectVllmConfigs:
    """Within the block FlagGems' config lookup returns vLLM's shipped H200 table for
    (E, N) (``moe_configs.VLLM_H200``) for bf16; patched at ``get_moe_configs``."""

    def __init__(self, mod, table):
        self.mod, self.table, self.orig = mod, table, None

    def available(self):
        return self.mod is not None and hasattr(self.mod, "get_moe_configs")

    def __enter__(self):
        self.orig = self.mod.get_moe_configs
        table, orig = self.table, self.orig

        def patched(E, N, dtype, *a, **kw):
            rows = table.get((E, N))
            if rows is not None and dtype is None:
                keys = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M",
                        "num_warps", "num_stages")
                return {m: dict(zip(keys, r)) for m, r in rows.items()}
            return orig(E, N, dtype, *a, **kw)

        self.mod.get_moe_configs = patched
        return self

    def __exit__(self, *exc):
        self.mod.get_moe_configs = self.orig


# ----------------------------------------------------------------------------- vLLM

# What is called, as read in vLLM 0.25.0's own sources (the 0.25.0 wheel's
# vllm/model_executor/layers/fused_moe/fused_moe.py, from ../shared/tools/vllm_gpu_bundle.sh;
# the installed CPU wheel, 0.32.0, has the same signature):
#
#   def fused_experts(hidden_states, w1, w2, topk_weights, topk_ids,
#                     activation: MoEActivation = MoEActivation.SILU,
#                     apply_router_weight_on_input: bool = False,
#                     global_num_experts: int = -1, expert_map: torch.Tensor | None = None,
#                     quant_config: FusedMoEQuantConfig | None = None) -> torch.Tensor
#
# It runs torch.ops.vllm.fused_experts (-> fused_experts_impl): quant_config None means
# FUSED_MOE_UNQUANTIZED_CONFIG (bf16 as given), the tiles come from try_get_optimal_moe_config
# (the shipped configs/E=..,N=..,device_name=NVIDIA_H200.json, else get_default_config), and the
# result is a new tensor: 0.25 has no ``inplace`` argument and never writes hidden_states.
# ``activation`` is an enum there, a string in older releases: it is built from the default's
# type. inplace=False is passed only where the parameter exists (older releases), so that our
# x is never overwritten between replays. Called by keyword; expert_map=None (no map).
VLLM_MODULE = "vllm.model_executor.layers.fused_moe.fused_moe"
VLLM_TENSORS = ("hidden_states", "w1", "w2", "topk_weights", "topk_ids")


def load_vllm():
    """(fused_experts, its fixed keyword arguments, note); (None, None, why) when vLLM is
    absent or its fused_experts would not take our call. Imports vLLM only when found."""
    if importlib.util.find_spec("vllm") is None:
        return None, None, "vllm: not installed"
    try:
        import vllm

        mod = importlib.import_module(VLLM_MODULE)
    except Exception as exc:
        return None, None, f"vllm: import failed: {type(exc).__name__}: {exc}"
    tag = f"vllm {getattr(vllm, '__version__', '?')}"
    fn = getattr(mod, "fused_experts", None)
    if fn is None:
        return None, None, f"{tag}: {VLLM_MODULE} has no fused_experts"
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        return None, None, f"{tag}: fused_experts has no readable signature ({exc})"
    params = sig.parameters
    missing = [n for n in (*VLLM_TENSORS, "activation") if n not in params]
    if missing:
        return None, None, f"{tag}: fused_experts{sig} lacks {', '.join(missing)}"
    default = params["activation"].default
    try:  # the enum of 0.25 (MoEActivation.SILU), else the string of older releases
        act = type(default)("silu") if isinstance(default, enum.Enum) else "silu"
    except ValueError as exc:
        return None, None, f"{tag}: fused_experts' activation has no 'silu' ({exc})"
    kw = {"activation": act}
    for name, value in (("expert_map", None), ("inplace", False)):
        if name in params:
            kw[name] = value
    try:  # a new required argument or a positional-only tensor fails here, not per call
        sig.bind(**dict.fromkeys(VLLM_TENSORS), **kw)
    except TypeError as exc:
        return None, None, f"{tag}: fused_experts{sig} does not take our call ({exc})"
    return fn, kw, f"{tag} ({VLLM_MODULE}.fused_experts, activation={act!r})"


def vllm_call(fn, kw, x, w1, w2, w, ids):
    return fn(hidden_states=x, w1=w1, w2=w2, topk_weights=w, topk_ids=ids, **kw)


# ----------------------------------------------------------------------------- phases

def _agree(got, want, orc):
    """(max |got - ref|, relative error vs the fp32 oracle, allclose to ref at 2e-2)."""
    err = (got.float() - want.float()).abs().max().item()
    rel = ((got.float() - orc).norm() / orc.norm()).item()
    return err, rel, torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def replay_with_new_routing(fn, x, w, ids, T, E, k, seed):
    """Capture ``fn(x, w, ids)`` in a CUDA graph, copy new routing and activations (``seed``)
    into those captured inputs, replay; returns ``(output, graph)`` (keep the graph while the
    output is used). ``x``, ``w``, ``ids`` then hold the new inputs, for the eager call to
    compare with."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x, w, ids)
    w_new, ids_new = make_routing(T, E, k, seed=seed)
    w.copy_(w_new)
    ids.copy_(ids_new)
    x.copy_(make_x(T, x.shape[1], seed=seed))
    graph.replay()
    torch.cuda.synchronize()
    return out, graph


def check(me, ref, shapes, log, others=()):
    """Ours and each of ``others`` ((label, fn(x, w1, w2, w, ids)) pairs) vs the reference at
    small M, the same tolerance for all; then ours under CUDA-graph replay."""
    rows = []
    for name in shapes:
        E, N, K, k = SHAPES[name]
        try:
            w1, w2 = make_weights(E, N, K)
        except Exception as exc:
            log(f"[check] {name}: weights failed: {exc}")
            rows.append({"shape": name, "error": repr(exc)})
            continue
        for T in (1, 5, 33):
            try:
                w, ids = make_routing(T, E, k, seed=T)
                x = make_x(T, K, seed=T)
                want = ref.fused_experts_reference(x, w1, w2, w, ids)
                orc = ref.fused_experts_oracle(x, w1, w2, w, ids)
            except Exception as exc:
                rows.append({"shape": name, "T": T, "error": repr(exc)})
                log(f"[check] {name} T={T}: reference ERROR {exc!r}\n{traceback.format_exc()}")
                continue
            # every impl on the same inputs, so that one failure leaves the others checked
            for label, fn in (("ours", me.fused_experts), *others):
                try:
                    err, rel, ok = _agree(fn(x, w1, w2, w, ids), want, orc)
                    row = {"shape": name, "T": T, "impl": label, "max_abs_vs_ref": err,
                           "rel_vs_oracle": rel, "ok": ok}
                    how = label
                    if label == "ours":
                        row["naive"] = me.use_naive_assignment(T, k, E, None)
                        how = "naive" if row["naive"] else "align"
                    rows.append(row)
                    log(f"[check] {name:8s} T={T:3d} {how:5s} max|{label}-ref|={err:.3e} "
                        f"rel({label},oracle)={rel:.2e} {'OK' if ok else 'FAIL'}")
                except Exception as exc:
                    rows.append({"shape": name, "T": T, "impl": label, "error": repr(exc)})
                    # the traceback for ours; one line for the others, as compare reports them
                    tb = f"\n{traceback.format_exc()}" if label == "ours" else ""
                    log(f"[check] {name} T={T} {label}: ERROR {exc!r}{tb}")
                    _sync()
        for T in (1, 8, 64):  # CUDA graph: capture once, replay with new routing
            try:
                w, ids = make_routing(T, E, k, seed=100 + T)
                x = make_x(T, K, seed=100 + T)
                me.fused_experts(x, w1, w2, w, ids)  # compile outside the capture
                out, _graph = replay_with_new_routing(
                    lambda x, w, ids: me.fused_experts(x, w1, w2, w, ids), x, w, ids, T, E, k,
                    seed=200 + T)
                eager = me.fused_experts(x, w1, w2, w, ids)
                same = torch.equal(out, eager)
                rows.append({"shape": name, "T": T, "graph_replay_equal": same})
                log(f"[graph] {name:8s} T={T:3d} replay with new routing == eager: {same}")
            except Exception as exc:
                rows.append({"shape": name, "T": T, "graph_error": repr(exc)})
                log(f"[graph] {name} T={T}: ERROR {exc!r}")
        w1 = w2 = None  # free before the next shape's weights
        torch.cuda.empty_cache()
    return rows


def _cands(bm, tpe_naive):
    """(gemm1 list, gemm2 list) of (BN, BK, GROUP, warps, stages, evict) for a BLOCK_SIZE_M."""
    if bm <= 32:
        g1 = [(32, 128, 1, 4, 4, 1), (32, 256, 1, 4, 3, 1), (64, 64, 1, 4, 5, 1),
              (64, 128, 1, 4, 4, 1), (64, 128, 1, 4, 5, 0), (64, 256, 1, 4, 3, 1),
              (128, 128, 1, 4, 3, 1), (128, 64, 1, 8, 4, 1), (64, 128, 16, 4, 4, 1)]
        g2 = [(64, 128, 1, 4, 4, 1), (64, 256, 1, 4, 3, 1), (128, 128, 1, 4, 4, 1),
              (128, 128, 1, 4, 5, 0), (128, 64, 1, 4, 5, 1), (256, 64, 1, 8, 4, 1),
              (32, 256, 1, 4, 3, 1), (64, 64, 1, 4, 5, 1), (128, 128, 16, 8, 3, 1)]
    else:
        g1 = [(64, 64, 8, 4, 4, 0), (64, 64, 8, 8, 4, 0), (128, 64, 8, 8, 3, 0),
              (128, 64, 16, 8, 4, 0), (128, 32, 16, 8, 5, 0), (64, 128, 8, 8, 3, 0),
              (128, 64, 1, 8, 4, 0), (32, 128, 8, 4, 3, 0)]
        g2 = [(128, 64, 8, 4, 4, 0), (128, 64, 8, 8, 4, 0), (256, 64, 16, 8, 4, 0),
              (256, 64, 16, 8, 3, 0), (256, 32, 16, 8, 5, 0), (128, 128, 8, 8, 3, 0),
              (256, 64, 1, 8, 4, 0), (64, 128, 8, 4, 4, 0)]
    return g1, g2


FUSED_G2 = [(16, 128, 1, 4, 4, 1), (16, 256, 1, 4, 3, 1), (32, 128, 1, 4, 4, 1),
            (32, 256, 1, 4, 3, 1), (32, 64, 1, 4, 5, 1), (64, 128, 1, 4, 4, 1),
            (64, 64, 1, 4, 5, 1), (16, 128, 1, 2, 4, 1), (32, 128, 1, 2, 4, 1),
            (16, 64, 1, 4, 6, 1)]
"""gemm2 candidates with FUSE_SUM (decode, k > 1): one program per token and columns block
loops over the k experts, so narrower column blocks keep enough programs in flight."""


def _g(t):
    return dict(zip(("BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps",
                     "num_stages", "W_EVICT"), t))


PDL_MAX_T = 16
"""PDL candidates are tried up to this many tokens (decode: GEMM2's start matters there)."""
PDL_KEYS = ("PDL", "PDL_TRIGGER")
PDL_VARIANTS = ({}, {"PDL_TRIGGER": 2}, {"PDL_TRIGGER": 0})
"""gemm2 keys added to ``{"PDL": 1}`` (see ``moe_experts``' docstring): GEMM1 triggers at its
start (default) / after its K loop / at its exit."""


def _without(cfg, keys):
    """``cfg`` with ``keys`` dropped from both GEMMs' parts."""
    return {**cfg, **{g: {k: v for k, v in cfg[g].items() if k not in keys}
                      for g in ("gemm1", "gemm2")}}


def _without_pdl(cfg):
    return _without(cfg, PDL_KEYS)


def timed_config(me, inputs, cfg, log, where, want=None):
    """ms of ``fused_experts(*inputs, config=cfg)`` under CUDA-graph replay (25 ms), or inf,
    logged with ``where``: when it raises, or, given ``want``, when its output differs from
    ``want`` (such a config can never win a sweep)."""
    x, w1, w2, w, ids = inputs
    try:
        if want is not None:
            got = me.fused_experts(x, w1, w2, w, ids, config=cfg)
            if not torch.equal(got, want):
                diff = (got.float() - want.float()).abs().max().item()
                log(f"{where}: DIFFERS from the table config (max |diff| {diff:.3e}) {cfg}")
                return float("inf")
        ms, _ = bench_graph(lambda: me.fused_experts(x, w1, w2, w, ids, config=cfg), rep=25)
        return ms
    except Exception as exc:
        log(f"{where} failed: {type(exc).__name__}: {str(exc)[:120]}")
        _sync()
        return float("inf")


def _pdl_variants(cfg):
    """The PDL candidates derived from ``cfg``: its gemm2 (PDL keys dropped) with ``{"PDL": 1}``
    and each of ``PDL_VARIANTS``."""
    g2 = _without_pdl(cfg)["gemm2"]
    return [{**cfg, "gemm2": {**g2, "PDL": 1, **v}} for v in PDL_VARIANTS]


def pdl_check(me, cfg, x, w1, w2, w, ids, T, E, k):
    """(ok, why): ``cfg`` (with PDL) gives exactly the bits of the same config without PDL,
    eagerly, and when captured in a CUDA graph and replayed after new routing, weights and
    activations were copied into the captured inputs (vs an eager PDL-free call on them).
    Never raises."""
    plain = _without_pdl(cfg)
    try:
        want = me.fused_experts(x, w1, w2, w, ids, config=plain)
        for _ in range(2):  # the slow (compiling) launch, then the cached launcher
            got = me.fused_experts(x, w1, w2, w, ids, config=cfg)
            if not torch.equal(got, want):
                diff = (got.float() - want.float()).abs().max().item()
                return False, f"eager result differs from PDL off (max |diff| {diff:.3e})"
        xg, wg, idsg = x.clone(), w.clone(), ids.clone()
        out, graph = replay_with_new_routing(
            lambda x, w, ids: me.fused_experts(x, w1, w2, w, ids, config=cfg), xg, wg, idsg,
            T, E, k, seed=300 + T)
        want = me.fused_experts(xg, w1, w2, wg, idsg, config=plain)
        if not torch.equal(out, want):
            diff = (out.float() - want.float()).abs().max().item()
            return False, f"graph replay with new routing differs (max |diff| {diff:.3e})"
        del graph
        return True, ""
    except Exception as exc:
        _sync()
        return False, f"{type(exc).__name__}: {str(exc)[:160]}"


def sweep_points(shapes, tokens, budget_s, log, tag):
    """``(name, (E, N, K, k), w1, w2, T, w, ids, x)`` for each shape and number of tokens, the
    inputs seeded as every sweep seeds them. Stops (logged) once ``budget_s`` seconds have
    passed; a shape's weights are freed before the next shape's are made."""
    t0 = time.time()
    for name in shapes:
        E, N, K, k = SHAPES[name]
        w1, w2 = make_weights(E, N, K)
        for T in tokens:
            if time.time() - t0 > budget_s:
                log(f"[{tag}] budget of {budget_s}s spent; stopping")
                return
            w, ids = make_routing(T, E, k, seed=T)
            yield name, (E, N, K, k), w1, w2, T, w, ids, make_x(T, K, seed=T)
        w1 = w2 = None
        torch.cuda.empty_cache()


def descend(cur, cur_ms, variants, timed):
    """One coordinate of a descent: ``(cfg, ms)``, the fastest of ``cur`` (``cur_ms``) and the
    ``(label, cfg)`` variants that differ from it, each timed by ``timed(cfg, label)``."""
    for label, cfg in variants:
        if cfg != cur:
            ms = timed(cfg, label)
            if ms < cur_ms:
                cur, cur_ms = cfg, ms
    return cur, cur_ms


def sweep(me, mc, shapes, tokens, budget_s, log, pdl_only=False):
    """Coordinate descent per (shape, T), see the module docstring; ``pdl_only``: only the
    table's config and its PDL variants."""
    best_all = {}
    pdl_ok = me.pdl_available(torch.device("cuda"))
    if not pdl_ok:
        log(f"[sweep] PDL unavailable on {torch.cuda.get_device_name()} "
            f"(sm {torch.cuda.get_device_capability()}, triton {triton.__version__}): "
            "no PDL candidates")
    for name, (E, N, K, k), w1, w2, T, w, ids, x in sweep_points(shapes, tokens, budget_s,
                                                                    log, "sweep"):
        tpe = T * k / E
        naive = me.use_naive_assignment(T, k, E, None)
        bms = [16] if naive else [b for b in (16, 32, 64, 128)
                                  if b <= max(16, 2 * 2 ** math.ceil(math.log2(max(tpe, 1))))]
        base = mc.config(T, E, N, K, k, DTYPE, torch.cuda.get_device_name())

        def timed(cfg, label="cfg", inputs=(x, w1, w2, w, ids), name=name, T=T):
            return timed_config(me, inputs, cfg, log, f"[sweep]   {name} T={T} {label}")

        def timed_pdl(cfg, x=x, w1=w1, w2=w2, w=w, ids=ids, name=name, T=T, k=k, E=E):
            """Checked first: a PDL config that fails the check is never timed."""
            ok, why = pdl_check(me, cfg, x, w1, w2, w, ids, T, E, k)
            if not ok:
                log(f"[sweep]   {name} T={T} PDL cfg FAILED the check: {why} "
                    f"{cfg['gemm2']}")
                return float("inf")
            ms = timed(cfg)
            keys = {key: cfg["gemm2"][key] for key in PDL_KEYS if key in cfg["gemm2"]}
            log(f"[sweep]   {name} T={T} PDL {keys} "
                f"fused={cfg['gemm2'].get('FUSE_SUM', 0)}: {ms * 1e3:.1f} us")
            return ms

        def pdl_best(cfgs, T=T):
            """(ms, cfg) of the best PDL variant of any of ``cfgs``, or None."""
            found = None
            if not (pdl_ok and T <= PDL_MAX_T):
                return None
            for cfg in cfgs:
                for cand in _pdl_variants(cfg):
                    ms = timed_pdl(cand)
                    if found is None or ms < found[0]:
                        found = (ms, cand)
            return found

        best = (timed(base), base)
        log(f"[sweep] {name} T={T}: table/heuristic {best[0] * 1e3:.1f} us")
        if base["gemm2"].get("PDL", 0):  # a table row with PDL: checked like the others
            ok, why = pdl_check(me, base, x, w1, w2, w, ids, T, E, k)
            if not ok:
                log(f"[sweep]   table config FAILED the PDL check: {why}")
                best = (float("inf"), base)
        if pdl_only:
            found = pdl_best([base])
            if found is not None and found[0] < best[0]:
                best = found
            bms = []
        for bm in bms:
            c1, c2 = _cands(bm, naive)
            cur = {"BLOCK_SIZE_M": bm, "gemm1": _g(c1[0]), "gemm2": _g(c2[0])}
            cur_ms = timed(cur)
            cur, cur_ms = descend(cur, cur_ms, [("cfg", {**cur, "gemm1": _g(c)}) for c in c1[1:]],
                                  timed)
            cur, cur_ms = descend(cur, cur_ms, [("cfg", {**cur, "gemm2": _g(c)}) for c in c2[1:]],
                                  timed)
            pdl_bases = [cur]
            if naive and k > 1:  # GEMM2 and the sum in one kernel (FUSE_SUM)
                fused_best = None
                for cand in FUSED_G2:
                    cfg = {**cur, "gemm2": {**_g(cand), "FUSE_SUM": 1}}
                    ms = timed(cfg)
                    if fused_best is None or ms < fused_best[0]:
                        fused_best = (ms, cfg)
                log(f"[sweep]   bm={bm}: fused sum best {fused_best[0] * 1e3:.1f} us "
                    f"{fused_best[1]['gemm2']} vs unfused {cur_ms * 1e3:.1f} us")
                pdl_bases.append(fused_best[1])
                if fused_best[0] < cur_ms:
                    cur_ms, cur = fused_best
            found = pdl_best(pdl_bases)  # GEMM2 as a PDL dependent (decode, sm_90+)
            if found is not None:
                log(f"[sweep]   bm={bm}: PDL best {found[0] * 1e3:.1f} us "
                    f"{found[1]['gemm2']} vs {cur_ms * 1e3:.1f} us without")
                if found[0] < cur_ms:
                    cur_ms, cur = found
            log(f"[sweep]   bm={bm}: best {cur_ms * 1e3:.1f} us {cur}")
            if cur_ms < best[0]:
                best = (cur_ms, cur)
        best_all.setdefault(name, {})[T] = {"us": best[0] * 1e3, "config": best[1]}
        log(f"[sweep] {name} T={T}: BEST {best[0] * 1e3:.1f} us {best[1]}")
    return best_all


PREFILL_KEYS = ("TMA_W", "SORTED_C", "HALF_M")
"""Tile keys of the prefill variants (``moe_experts``' docstring)."""
TMA_G1 = [(128, 64, 16, 8, 4), (128, 64, 8, 8, 4), (128, 64, 16, 8, 3), (128, 32, 16, 8, 6),
          (64, 64, 16, 4, 4), (64, 128, 8, 4, 3)]
TMA_G2 = [(256, 64, 16, 8, 4), (256, 64, 16, 8, 3), (256, 32, 16, 8, 6), (128, 64, 16, 8, 4),
          (128, 64, 8, 4, 4), (128, 128, 8, 4, 3)]
"""Prefill candidates, every TMA key on: (BN, BK, GROUP, warps, stages) of each GEMM."""


def _with(cfg, gemm, **keys):
    return {**cfg, gemm: {**cfg[gemm], **keys}}


def _tma_all(cfg):
    return _with(_with(cfg, "gemm1", TMA_W=1), "gemm2", TMA_W=1, SORTED_C=1)


def _half_all(cfg):
    return _with(_with(cfg, "gemm1", HALF_M=1), "gemm2", HALF_M=1)


CONFIRM_TOP = 4
CONFIRM_ROUNDS = 3
CONFIRM_REP_MS = 300


def confirm(tried, base, plain, x, w1, w2, w, ids, me, log, label):
    """(ms, cfg): the sweep's ``CONFIRM_TOP`` fastest distinct configs, the table's and the
    table's without the prefill keys, re-timed in ``CONFIRM_ROUNDS`` interleaved rounds of
    ``CONFIRM_REP_MS`` ms each; the lowest median wins. The sweep's single short timings
    (25 ms: 3 replays of an 8 ms call) moved by up to 15% between identical configs on the
    H200; a winner must win again side by side."""
    cands = []
    for _, _, cfg in sorted(tried, key=lambda t: t[0]):
        if cfg not in cands:
            cands.append(cfg)
        if len(cands) == CONFIRM_TOP:
            break
    for cfg in (base, plain):
        if cfg not in cands:
            cands.append(cfg)
    times: list[list[float]] = [[] for _ in cands]
    for _ in range(CONFIRM_ROUNDS):
        for i, cfg in enumerate(cands):
            ms, _ = bench_graph(lambda cfg=cfg: me.fused_experts(x, w1, w2, w, ids, config=cfg),
                                rep=CONFIRM_REP_MS)
            times[i].append(ms)
    best = None
    for cfg, ts in zip(cands, times):
        med = sorted(ts)[len(ts) // 2]
        tag = "table" if cfg == base else "no-TMA table" if cfg == plain else "candidate"
        log(f"[tma]   {label} confirm {tag}: median {med * 1e3:.1f} us "
            f"(rounds {', '.join(f'{t * 1e3:.1f}' for t in ts)}) {cfg}")
        if best is None or med < best[0]:
            best = (med, cfg)
    return best


def tma_sweep(me, mc, shapes, tokens, budget_s, log):
    """Prefill (aligned blocks of >= 64): the table config against the TMA keys (each alone,
    then all) and HALF_M (each GEMM, then both), then coordinate descent over
    ``TMA_G1``/``TMA_G2`` from the best of those, at the table's BLOCK_SIZE_M and at 128.
    Every variant's output is compared with the table config's: the keys change how tiles
    are loaded and how tall they are, not the arithmetic, so equal bits are expected (a
    mismatch is logged and the variant can never win)."""
    best_all = {}
    if not me.tma_available(torch.device("cuda")):
        log("[tma] TMA unavailable on this device: nothing to sweep")
        return best_all
    for name, (E, N, K, k), w1, w2, T, w, ids, x in sweep_points(shapes, tokens, budget_s,
                                                                    log, "tma"):
        base = mc.config(T, E, N, K, k, DTYPE, torch.cuda.get_device_name())
        want = me.fused_experts(x, w1, w2, w, ids, config=base)

        def timed(cfg, label, inputs=(x, w1, w2, w, ids), want=want, T=T, name=name):
            ms = timed_config(me, inputs, cfg, log, f"[tma]   {name} T={T} {label}", want)
            if ms != float("inf"):
                log(f"[tma]   {name} T={T} {label}: {ms * 1e3:.1f} us")
            return ms

        tried = []  # (ms, label, cfg) of every config that ran and matched

        def timed_kept(cfg, label, timed=timed, tried=tried):
            ms = timed(cfg, label)
            if ms != float("inf"):
                tried.append((ms, label, cfg))
            return ms

        plain = _without(base, PREFILL_KEYS)
        best = (timed_kept(base, "table"), base)
        if plain != base:
            ms = timed_kept(plain, "table without TMA_W/SORTED_C/HALF_M")
            if ms < best[0]:
                best = (ms, plain)
        tma = _tma_all(base)
        for label, cfg in (("gemm1 TMA_W", _with(base, "gemm1", TMA_W=1)),
                           ("gemm2 TMA_W", _with(base, "gemm2", TMA_W=1)),
                           ("TMA all", tma),
                           ("TMA all + gemm1 HALF_M", _with(tma, "gemm1", HALF_M=1)),
                           ("TMA all + gemm2 HALF_M", _with(tma, "gemm2", HALF_M=1)),
                           ("TMA all + HALF_M", _half_all(tma)),
                           ("HALF_M (no TMA)", _half_all(plain))):
            ms = timed_kept(cfg, label)
            if ms < best[0]:
                best = (ms, cfg)
        for bm in sorted({b for b in (base["BLOCK_SIZE_M"], 128) if b >= 64}, reverse=True):
            cur = best[1] if best[1]["BLOCK_SIZE_M"] == bm else _half_all(_tma_all(
                {"BLOCK_SIZE_M": bm, "gemm1": _g((*TMA_G1[0], 0)),
                 "gemm2": _g((*TMA_G2[0], 0))}))
            cur_ms = best[0] if cur is best[1] else timed_kept(cur, f"bm={bm} start")
            for gemm, cands in (("gemm1", TMA_G1), ("gemm2", TMA_G2)):
                cur, cur_ms = descend(
                    cur, cur_ms, [(f"bm={bm} {gemm} {c}", _with(cur, gemm, **_g((*c, 0))))
                                  for c in cands], timed_kept)
            if cur_ms < best[0]:
                best = (cur_ms, cur)
        best = confirm(tried, base, plain, x, w1, w2, w, ids, me, log, f"{name} T={T}")
        best_all.setdefault(name, {})[T] = {"us": best[0] * 1e3, "config": best[1]}
        log(f"[tma] {name} T={T}: BEST {best[0] * 1e3:.1f} us {best[1]}")
    return best_all


OTHERS = ("flaggems", "flaggems_vllm_cfg", "vllm")  # what "ours vs best other" compares to


def failed_checks(check_rows):
    """{(impl, shape)} of the other impls that failed or raised in ``check`` (ours is
    reported by the check itself): their times are kept but they are never "best"."""
    return {(r["impl"], r["shape"]) for r in check_rows or ()
            if r.get("impl", "ours") != "ours" and ("error" in r or not r.get("ok", True))}


def compare(me, mc, shapes, tokens, log, flaggems=(None, None, "disabled"), vllm=None,
            bad=frozenset()):
    """``flaggems``: what ``load_flaggems`` returned (fn, module, note); ``vllm``: fn(x, w1,
    w2, w, ids) calling vLLM's fused_experts, or None (not timed); ``bad``: ``failed_checks``
    of the check phase."""
    rows = []
    fg, fg_mod, fg_note = flaggems
    log(f"[compare] FlagGems: {fg_note}")
    inject = InjectVllmConfigs(fg_mod, mc.VLLM_H200)
    for name in shapes:
        E, N, K, k = SHAPES[name]
        try:
            w1, w2 = make_weights(E, N, K)
        except Exception as exc:
            log(f"[compare] {name}: weights failed: {exc}")
            continue
        for T in tokens:
            w, ids = make_routing(T, E, k, seed=T)
            x = make_x(T, K, seed=T)
            hit, wbytes, flops = traffic(T, E, N, K, k, ids)
            row = {"shape": name, "T": T, "experts_hit": hit, "weight_bytes": wbytes,
                   "flop": flops}
            a = (x, w1, w2, w, ids)
            impls = [("ours", lambda a=a: me.fused_experts(*a), None)]
            if fg is not None:
                impls.append(("flaggems", lambda a=a: flaggems_call(fg, *a), None))
                if inject.available() and (E, N) in mc.VLLM_H200:
                    impls.append(("flaggems_vllm_cfg", lambda a=a: flaggems_call(fg, *a),
                                  inject))
            if vllm is not None:
                impls.append(("vllm", lambda a=a: vllm(*a), None))
            for label, fn, ctx in impls:
                try:
                    if ctx is not None:
                        with ctx:
                            ms, mode = bench_graph(fn)
                    else:
                        ms, mode = bench_graph(fn)
                    row[label] = {"us": ms * 1e3, "TBps": wbytes / ms / 1e9,
                                  "TFLOPs": flops / ms / 1e9, "mode": mode}
                except Exception as exc:
                    row[label] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                    _sync()
                # FlagGems with vLLM's tiles is the same code: FlagGems' failure marks both
                if (label, name) in bad or (label == "flaggems_vllm_cfg"
                                            and ("flaggems", name) in bad):
                    row[label]["check_failed"] = True
            others = [row[c]["us"] for c in OTHERS
                      if "us" in row.get(c, {}) and not row[c].get("check_failed")]
            if "us" in row.get("ours", {}) and others:
                row["ours_speedup_vs_best_other"] = min(others) / row["ours"]["us"]
            rows.append(row)
            log(_fmt(row))
        w1 = w2 = None  # free before the next shape's weights
        torch.cuda.empty_cache()
    return rows, fg_note


def _fmt(row):
    parts = [f"{row['shape']:8s} T={row['T']:5d} hit={row['experts_hit']:3d}"]
    for label in ("ours", *OTHERS):
        r = row.get(label)
        if r is None:
            continue
        flag = " [check FAIL]" if r.get("check_failed") else ""
        if "us" in r:
            parts.append(f"{label} {r['us']:9.1f} us {r['TBps']:5.2f} TB/s "
                         f"{r['TFLOPs']:6.1f} TF" + ("" if r["mode"] == "graph" else " [eager]")
                         + flag)
        else:
            parts.append(f"{label} ERROR {r['error'][:60]}{flag}")
    if "ours_speedup_vs_best_other" in row:
        parts.append(f"ours x{row['ours_speedup_vs_best_other']:.2f}")
    return " | ".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_out/moe_experts")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--sweep", action="store_true", help="tile sweep instead of comparison")
    ap.add_argument("--budget-s", type=float, default=500.0, help="sweep time budget")
    ap.add_argument("--pdl-only", action="store_true",
                    help="sweep: only the table config vs its PDL variants (T <= 16, sm_90+)")
    ap.add_argument("--tma", action="store_true",
                    help="sweep: prefill variants (TMA_W, SORTED_C, HALF_M) vs the table (sm_90+)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--no-flaggems", action="store_true")
    ap.add_argument("--no-vllm", action="store_true", help="leave vLLM's fused_experts out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = [s for s in args.shapes.split(",") if s]
    tokens = [int(t) for t in args.tokens.split(",") if t]
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    t0 = time.time()
    me, mc, routing, note = _import_flagos()
    if routing is not None:
        me._align = routing.moe_align_block_size
        me._sum = routing.moe_sum
        align_note = "alignment/sum: fl_dispatch_flagos.moe_routing"
    else:
        me._align = _load_reference().moe_align_block_size
        me._sum = torch_moe_sum
        align_note = "alignment/sum: the PyTorch reference (moe_routing not importable)"
    dev = torch.cuda.get_device_name()
    log(f"device {dev}; torch {torch.__version__}; triton {triton.__version__}; {align_note}"
        + (f"; {note}" if note else ""))
    result = {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
              "align": align_note, "note": note}
    ref = _load_reference()
    torch.manual_seed(0)
    vllm, others, flaggems = None, [], (None, None, "disabled")
    if not args.sweep:  # the sweep tunes ours only: vLLM is neither imported nor checked
        vl_fn, vl_kw, vl_note = (None, None, "vllm: disabled") if args.no_vllm else load_vllm()
        log(f"[compare] {vl_note}")
        result["vllm"] = vl_note
        if vl_fn is not None:
            vllm = functools.partial(vllm_call, vl_fn, vl_kw)
            others.append(("vllm", vllm))
        if not args.no_flaggems:  # checked like the others, so that "best" is a correct impl
            flaggems = load_flaggems()
            if flaggems[0] is not None:
                others.append(("flaggems", functools.partial(flaggems_call, flaggems[0])))
    if not args.skip_check:
        try:
            result["check"] = check(me, ref, shapes, log, others)
        except Exception as exc:
            log(f"[check] aborted: {exc!r}")
    if args.sweep:
        if args.tma:
            best = tma_sweep(me, mc, shapes, tokens, args.budget_s, log)
        else:
            best = sweep(me, mc, shapes, tokens, args.budget_s, log, args.pdl_only)
        result["sweep"] = best
        (out / "sweep_best.json").write_text(json.dumps(best, indent=1, default=str))
        log("# paste into moe_configs.TABLES (device NVIDIA_H200, bf16):")
        for name, per_t in best.items():
            E, N, K, k = SHAPES[name]
            log(f'("NVIDIA_H200", {E}, {N}, {K}, {k}, "bfloat16"): {{')
            for T, r in sorted(per_t.items()):
                log(f"    {T}: {r['config']!r},  # {r['us']:.1f} us")
            log("},")
    else:
        rows, fg_note = compare(me, mc, shapes, tokens, log, flaggems, vllm,
                                failed_checks(result.get("check")))
        result["compare"] = rows
        result["flaggems"] = fg_note
    result["wall_s"] = time.time() - t0
    (out / ("sweep.json" if args.sweep else "results.json")).write_text(
        json.dumps(result, indent=1, default=str))
    (out / "log.txt").write_text("\n".join(lines) + "\n")
    log(f"done in {result['wall_s']:.0f} s -> {out}")


if __name__ == "__main__":
    main()
