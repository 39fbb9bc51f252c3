"""Probe: kernel variants for two near-miss targets, timed side by side on one GPU.

    python3 bench/probe_norm_topk.py norm  [--out DIR]   # needs .gpu-ops/vllm_C.so.xz
    python3 bench/probe_norm_topk.py topk  [--out DIR]   # needs .gpu-ops/vllm_moe_C.so.xz

``norm``: ``rms_norm`` at 4096 and 16384 tokens of hidden 4096 (bf16): our kernel as shipped,
vLLM's ``_C.rms_norm``, ``copy_`` (the bandwidth reference), and persistent variants
(programs = SMs x P, each looping over rows with a stride; the weight loaded once per
program; PREFETCH: the next row is loaded before this row is reduced and stored).

``grouped_topk``: DeepSeek-V3 routing (E 256, 8 groups keeping 4, top-8, sigmoid, a bias) at
1, 16, 64 and 256 tokens: ours as shipped, vLLM's ``_moe_C.grouped_topk`` and a variant whose
top-K stage is one flat reduction over all experts per round (the kept groups as a bitmask,
the scores loaded a second time in a flat layout, issued at the start).

Every variant is checked bit for bit against our shipped kernel before it is timed.
CUDA-graph replay median (``triton.testing.do_bench_cudagraph``), 3 interleaved rounds.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _gpu_env import setup

VLLM_C = setup()

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

DEV = "cuda"


# ----------------------------------------------------------------------------- rms_norm

@triton.jit
def _norm_store(s, r, w_ptr, out_ptr, stride_out, cols, cmask, wf, n_cols, eps,
                STREAM: tl.constexpr):
    """Row ``r`` of the output from its fp32 values ``s``: the shipped kernel's rounding."""
    w_ty = w_ptr.dtype.element_ty
    rstd = tl.math.rsqrt(tl.sum(s * s, 0) / n_cols + eps)
    y = ((s * rstd).to(w_ty).to(tl.float32) * wf).to(w_ty)
    if STREAM == 2:
        tl.store(out_ptr + r * stride_out + cols, y, mask=cmask, cache_modifier=".cs")
    else:
        tl.store(out_ptr + r * stride_out + cols, y, mask=cmask)


@triton.jit
def norm_persist(x_ptr, w_ptr, out_ptr, n_rows, n_cols, stride_x, stride_out, eps,
                 BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr, STREAM: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    wf = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if PREFETCH:
        nxt = tl.load(x_ptr + pid * stride_x + cols, mask=cols < n_cols * (pid < n_rows),
                      other=0.0, eviction_policy="evict_first")
        for r in range(pid, n_rows, nprog):
            s = nxt.to(tl.float32)
            rn = r + nprog
            nxt = tl.load(x_ptr + rn * stride_x + cols, mask=cols < n_cols * (rn < n_rows),
                          other=0.0, eviction_policy="evict_first")
            _norm_store(s, r, w_ptr, out_ptr, stride_out, cols, cmask, wf, n_cols, eps, STREAM)
    else:
        for r in range(pid, n_rows, nprog):
            s = tl.load(x_ptr + r * stride_x + cols, mask=cmask, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            _norm_store(s, r, w_ptr, out_ptr, stride_out, cols, cmask, wf, n_cols, eps, STREAM)


def _time(fns: dict, rounds: int = 3, rep: int = 200) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(do_bench_cudagraph(fn, rep=rep) * 1000.0)
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


def probe_norm(out: list[str]) -> None:
    from fl_dispatch_flagos import ops as flagos
    vllm = None
    if VLLM_C:
        torch.ops.load_library(VLLM_C)
        vllm = torch.ops._C
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    hidden, eps = 4096, 1e-6
    for tokens in (4096, 16384):
        x = torch.randn(tokens, hidden, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(hidden, device=DEV, dtype=torch.bfloat16)
        dst = torch.empty_like(x)
        want = flagos.rms_norm(x, w, eps)
        fns = {"ours (shipped)": lambda: flagos.rms_norm(x, w, eps), "copy_": lambda: dst.copy_(x)}
        if vllm is not None:
            fns["vllm _C"] = lambda: vllm.rms_norm(dst, x, w, eps)
        for p in (2, 4, 8, 16):
            for warps in (4, 8):
                for pre in (0, 1):
                    for st in (0, 2):
                        grid = (min(tokens, sms * p),)
                        o = torch.empty_like(x)

                        def fn(o=o, grid=grid, warps=warps, pre=pre, st=st):
                            norm_persist[grid](x, w, o, tokens, hidden, hidden, hidden, eps,
                                               BLOCK_N=hidden, PREFETCH=pre, STREAM=st,
                                               num_warps=warps)
                        fn()
                        torch.cuda.synchronize()
                        if not torch.equal(o, want):
                            out.append(f"T={tokens} persist P{p} w{warps} pre{pre} s{st}: "
                                       f"MISMATCH max {(o.float() - want.float()).abs().max()}")
                            continue
                        fns[f"persist P{p} w{warps} pre{pre} s{st}"] = fn
        times = _time(fns)
        nbytes = 2 * x.numel() * x.element_size()
        copy_bw = nbytes / times["copy_"] / 1e6
        for k, t in sorted(times.items(), key=lambda kv: kv[1]):
            bw = nbytes / t / 1e6
            out.append(f"rms_norm T={tokens:6d} {k:28s} {t:8.2f} us {bw:6.3f} TB/s "
                       f"{100 * bw / copy_bw:6.1f}% of copy")
        out.append("")


# ----------------------------------------------------------------------------- grouped_topk

@triton.jit
def gtopk_flat(s_ptr, bias_ptr, w_ptr, ids_ptr, n_rows, stride_s, scaling,
               G: tl.constexpr, EPG: tl.constexpr, K: tl.constexpr,
               TOPK_GROUP: tl.constexpr, RENORM: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_K: tl.constexpr, REREAD: tl.constexpr):
    """Sigmoid scoring with a bias (the DeepSeek-V3 case); G, EPG powers of two."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    fl = tl.arange(0, G * EPG)
    xf = tl.load(s_ptr + rows64[:, None] * stride_s + fl[None, :], mask=row_mask[:, None],
                 other=0.0).to(tl.float32)
    bf = tl.load(bias_ptr + fl).to(tl.float32)
    g = tl.arange(0, G)
    e = tl.arange(0, EPG)
    expert = g[:, None] * EPG + e[None, :]
    x = tl.load(s_ptr + rows64[:, None, None] * stride_s + expert[None, :, :],
                mask=row_mask[:, None, None], other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + expert).to(tl.float32)
    f = 1.0 / (1.0 + tl.exp(-x))
    s = f + b[None, :, :]
    neg_inf = float("-inf")
    s_m = tl.where(row_mask[:, None, None], s, neg_inf)
    m1 = tl.max(s_m, 2)
    first = tl.min(tl.where(s_m == m1[:, :, None], e[None, None, :], EPG), 2)
    m2 = tl.max(tl.where(e[None, None, :] == first[:, :, None], neg_inf, s_m), 2)
    gscore = m1 + m2
    finite = (gscore == gscore) & (gscore != float("inf")) & (gscore != neg_inf)
    any_finite = tl.max(finite.to(tl.int32), 1) > 0
    taken_g = tl.full([BLOCK_T, G], -2147483648, tl.int64) << 32
    gbits = (gscore + 0.0).to(tl.int32, bitcast=True)
    gbits = gbits ^ ((gbits >> 31) & 0x7FFFFFFF)
    gkey = (gbits.to(tl.int64) << 32) | (G - g)[None, :].to(tl.int64)
    kept = tl.zeros([BLOCK_T], tl.int32)
    for _ in tl.static_range(TOPK_GROUP):
        best = tl.max(gkey, 1)
        gi = G - (best - ((best >> 32) << 32)).to(tl.int32)
        kept = kept | (1 << gi)
        gkey = tl.where(g[None, :] == gi[:, None], taken_g, gkey)
    keep_f = ((kept[:, None] >> (fl // EPG)[None, :]) & 1) != 0
    ff = 1.0 / (1.0 + tl.exp(-xf))
    sf = ff + bf[None, :]
    taken = tl.full([BLOCK_T, G * EPG], -2147483648, tl.int64) << 32
    big = G * EPG
    bits = (sf + 0.0).to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = (bits.to(tl.int64) << 32) | (big - fl)[None, :].to(tl.int64)
    key = tl.where(row_mask[:, None] & keep_f, key, taken)
    kcols = tl.arange(0, BLOCK_K)
    out_w = tl.full([BLOCK_T, BLOCK_K], 0.0, tl.float32)
    out_i = tl.full([BLOCK_T, BLOCK_K], 0, tl.int32)
    for j in tl.static_range(K):
        best = tl.max(key, 1)
        idx = big - (best - ((best >> 32) << 32)).to(tl.int32)
        hit = fl[None, :] == idx[:, None]
        if not REREAD:
            wj = tl.max(tl.where(hit, ff, 0.0), 1)  # sigmoid > 0: the one hit is the max
            out_w = tl.where(kcols[None, :] == j, wj[:, None], out_w)
        key = tl.where(hit, taken, key)
        out_i = tl.where(kcols[None, :] == j, idx[:, None], out_i)
    kmask = row_mask[:, None] & (kcols < K)[None, :]
    if REREAD:
        xk = tl.load(s_ptr + rows64[:, None] * stride_s + out_i, mask=kmask,
                     other=0.0).to(tl.float32)
        out_w = tl.where(kmask, 1.0 / (1.0 + tl.exp(-xk)), 0.0)
    if RENORM:
        out_w = out_w / (tl.sum(out_w, 1)[:, None] + 1e-20) * scaling
    else:
        out_w = out_w * scaling
    out_w = tl.where(any_finite[:, None], out_w, 1.0 / K)
    out_i = tl.where(any_finite[:, None], out_i, kcols[None, :])
    offs = rows64[:, None] * K + kcols[None, :]
    tl.store(w_ptr + offs, out_w, mask=kmask)
    tl.store(ids_ptr + offs, out_i, mask=kmask)


def probe_topk(out: list[str]) -> None:
    from fl_dispatch_flagos import moe_routing as mr
    from moe_routing import _load_vllm

    vllm = _load_vllm()
    if isinstance(vllm, str):  # the reason it is missing
        print(f"vllm _moe_C: {vllm}")
        vllm = None
    e, ng, tg, k = 256, 8, 4, 8
    bias = (torch.randn(e, device=DEV) * 0.05).to(torch.bfloat16)
    for t in (1, 16, 64, 256):
        gen = torch.Generator(device=DEV).manual_seed(t)
        s = torch.randn(t, e, device=DEV, generator=gen).to(torch.bfloat16)
        ties = s.clone()
        ties[:, : k + 2] = 3.0  # checked too: equal maxima on the low experts
        ties[0] = 0.0
        want_w, want_i = mr.grouped_topk(s, ng, tg, k, True, 2.5, bias, 1)
        fns = {"ours (shipped)": lambda s=s: mr.grouped_topk(s, ng, tg, k, True, 2.5, bias, 1)}
        if vllm is not None:
            fns["vllm _moe_C"] = lambda s=s: vllm.grouped_topk(s, ng, tg, k, True, 2.5,
                                                               bias.to(s.dtype), 1)
        for bt in (1, 2):
            for warps in (1, 2, 4):
                for reread in (0, 1):
                    if bt > t or bt * e < 32 * warps:
                        continue
                    w_o = torch.empty(t, k, device=DEV, dtype=torch.float32)
                    i_o = torch.empty(t, k, device=DEV, dtype=torch.int32)

                    def fn(s=s, w_o=w_o, i_o=i_o, bt=bt, warps=warps, reread=reread, t=t):
                        gtopk_flat[(triton.cdiv(t, bt),)](
                            s, bias, w_o, i_o, t, s.stride(0), 2.5, G=ng, EPG=e // ng, K=k,
                            TOPK_GROUP=tg, RENORM=True, BLOCK_T=bt, BLOCK_K=k, REREAD=reread,
                            num_warps=warps)
                    label = f"flat bt{bt} w{warps} reread{reread}"
                    fn(s=ties)
                    torch.cuda.synchronize()
                    tw, ti = mr.grouped_topk(ties, ng, tg, k, True, 2.5, bias, 1)
                    same = torch.equal(i_o, ti) and torch.equal(w_o, tw)
                    fn()
                    torch.cuda.synchronize()
                    if not (same and torch.equal(i_o, want_i) and torch.equal(w_o, want_w)):
                        out.append(f"T={t} {label}: MISMATCH")
                        continue
                    fns[label] = fn
        times = _time(fns, rounds=3, rep=100)
        others = [v for kk, v in times.items() if kk.startswith("vllm")]
        for kk, v in sorted(times.items(), key=lambda kv: kv[1]):
            ratio = f" x{others[0] / v:5.3f} vs vLLM" if others else ""
            out.append(f"grouped_topk T={t:5d} {kk:26s} {v:7.3f} us{ratio}")
        out.append("")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("norm", "topk"))
    p.add_argument("--out", default="")
    a = p.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    out: list[str] = []
    (probe_norm if a.what == "norm" else probe_topk)(out)
    text = "\n".join(out)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"probe-{a.what}.txt"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
