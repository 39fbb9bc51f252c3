"""Does this Triton's automatic warp specialization run on this GPU? One bf16 GEMM, side by side.

    python3 bench/triton_ws_probe.py [--size 8192] [--timeout-s 60] [--out DIR]

A plain TMA-descriptor GEMM (``C = A @ W^T``, tiles 128 x 256 x 64, 4 stages) is timed with its
K loop as a plain ``tl.range`` (8 warps) and as ``tl.range(..., warp_specialize=True)`` (4 warps
per consumer warpgroup: on Hopper, Triton's pass adds a producer warpgroup that issues the TMA
copies, 12 warps in all), and ``torch.matmul`` beside them. Each Triton variant runs in a child
process under a timeout, because a warp-specialised kernel that deadlocks never returns: the
table then says so instead of the bench hanging.

Why it exists: a warp-specialised kernel is what ``flash_mla`` at h_q 128 (FlashMLA overlaps
its two MMAs and the softmax across warpgroups) and the prefill grouped GEMMs of
``fused_experts`` need next. With Triton 3.6 on an H200 (2026-12-01,
``docs/performance.md``) the warp-specialised kernel compiled (setmaxnreg, 12 warps, wgmma)
and then never finished; so did ``fused_experts`` with its GEMMs built the same way. Re-run
this on a new Triton before building on the pass again.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BM, BN, BK, STAGES = 128, 256, 64, 4
VARIANTS = {"plain": (False, 8), "warp_specialize": (True, 4)}
"""name -> (warp_specialize, num_warps)."""


def _child(variant: str, size: int) -> None:
    """Compile, run, check against torch and time ``variant``; prints ``us maxdiff``."""
    import torch
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def gemm(a_desc, w_desc, c_ptr, K, stride_cm, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WS: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for kk in tl.range(0, tl.cdiv(K, BLOCK_K), warp_specialize=WS):
            a = a_desc.load([pid_m * BLOCK_M, kk * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, kk * BLOCK_K])
            acc = tl.dot(a, tl.trans(w), acc)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(tl.bfloat16))

    ws, warps = VARIANTS[variant]
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(size, size, device="cuda", dtype=torch.bfloat16)
    a_desc = TensorDescriptor(a, [size, size], [size, 1], [BM, BK])
    w_desc = TensorDescriptor(w, [size, size], [size, 1], [BN, BK])

    def run() -> None:
        gemm[(size // BM, size // BN)](a_desc, w_desc, c, size, size, BM, BN, BK, ws,
                                       num_warps=warps, num_stages=STAGES)

    print(f"{_time(run):.1f} {(c.float() - (a @ w.T).float()).abs().max().item():.3g}",
          flush=True)


def _time(fn, reps: int = 20) -> float:
    """Mean µs of ``fn`` over ``reps`` calls after one warm-up (wall clock, synchronised)."""
    import torch

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e6


def run_variant(cmd: list[str], timeout_s: float) -> tuple[float | None, str]:
    """(µs or None, result) of one child: ``ok (max |diff| vs torch D)``, ``HANGS (killed after N
    s)`` or ``error: <last line of its output>``."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"HANGS (killed after {timeout_s:g} s)"
    lines = (done.stdout + done.stderr).strip().splitlines() or [f"exit {done.returncode}"]
    if done.returncode != 0:
        return None, f"error: {lines[-1][:160]}"
    us, diff = lines[-1].split()
    return float(us), f"ok (max |diff| vs torch {diff})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=8192, help="M = N = K (a multiple of 256)")
    ap.add_argument("--timeout-s", type=float, default=60.0, help="per variant, compile included")
    ap.add_argument("--out", default="", help="also write the table to OUT/triton_ws_probe.txt")
    ap.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.size % BN:
        ap.error(f"--size is {args.size}; expected a multiple of {BN}")
    if args.child:
        _child(args.child, args.size)
        return 0

    import torch
    import triton

    flop = 2 * args.size ** 3
    a = torch.randn(args.size, args.size, device="cuda", dtype=torch.bfloat16)
    rows: list[tuple[str, float | None, str]] = [
        ("torch.matmul", _time(lambda: a @ a.T), "ok (reference)")]
    for name in VARIANTS:
        us, result = run_variant([sys.executable, __file__, "--child", name,
                                  "--size", str(args.size)], args.timeout_s)
        rows.append((f"triton {name}", us, result))
    best = min(us for _, us, _ in rows if us is not None)
    lines = [f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
             f"{triton.__version__}; bf16 {args.size}^3, tiles {BM}x{BN}x{BK}, {STAGES} stages",
             f"{'impl':<26} {'µs':>9} {'TFLOP/s':>8} {'x best':>7}  result"]
    for name, us, result in rows:
        if us is None:
            lines.append(f"{name:<26} {'-':>9} {'-':>8} {'-':>7}  {result}")
        else:
            lines.append(f"{name:<26} {us:9.1f} {flop / us / 1e6:8.0f} {best / us:7.2f}  {result}")
    print("\n".join(lines))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "triton_ws_probe.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
