"""One Llama-3-8B decoder layer built on each backend's ops, timed under CUDA graph replay.

    python bench/decoder_layer.py [--out DIR]      (GPU machine, repository root, .gpu-ops carried)

fused add + rms_norm -> QKV matmul -> rotary (neox, in place on q/k views) -> attention
(``scaled_dot_product_attention``, causal, GQA, over the batch's own tokens) -> output matmul ->
fused add + rms_norm -> gate/up matmul -> silu_and_mul -> down matmul. The matmuls and the
attention are the same for every build; only the four dispatched ops differ (flagos Triton
kernels vs vLLM's CUDA ops). bf16, 1, 64 and 4096 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _gpu_env import setup

VLLM_LIB = setup()

import torch
import torch.nn.functional as F
from fl_dispatch_flagos import ops as flagos
from triton.testing import do_bench_cudagraph

import fl_dispatch.core.ops as ref

HIDDEN, INTER, HQ, HK, HEAD = 4096, 14336, 32, 8, 128
EPS = 1e-6
DT = torch.bfloat16
DEV = "cuda"


class Layer:
    """Weights of one layer (random, scaled so activations stay O(1))."""

    def __init__(self, seed: int = 0):
        g = torch.Generator(device=DEV).manual_seed(seed)

        def w(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, device=DEV, generator=g) / shape[-1] ** 0.5).to(DT)

        self.w_qkv = w((HQ + 2 * HK) * HEAD, HIDDEN)
        self.w_o = w(HIDDEN, HQ * HEAD)
        self.w_gu = w(2 * INTER, HIDDEN)
        self.w_down = w(HIDDEN, INTER)
        self.norm1 = (1 + 0.1 * torch.randn(HIDDEN, device=DEV, generator=g)).to(DT)
        self.norm2 = (1 + 0.1 * torch.randn(HIDDEN, device=DEV, generator=g)).to(DT)
        inv = 1.0 / (10000 ** (torch.arange(0, HEAD, 2, device=DEV, dtype=torch.float32) / HEAD))
        ang = torch.arange(32768, device=DEV, dtype=torch.float32)[:, None] * inv[None, :]
        self.cache = torch.cat([ang.cos(), ang.sin()], -1).to(DT)

    def forward(self, ops: Any, x: torch.Tensor, residual: torch.Tensor,
                positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = x.shape[0]
        h, residual = ops.rms_norm(x, self.norm1, EPS, residual)
        qkv = h @ self.w_qkv.t()
        q = qkv[:, :HQ * HEAD]
        k = qkv[:, HQ * HEAD:(HQ + HK) * HEAD]
        v = qkv[:, (HQ + HK) * HEAD:]
        ops.rotary_embedding(positions, q, k, HEAD, self.cache, True)
        attn = F.scaled_dot_product_attention(
            q.view(t, HQ, HEAD).transpose(0, 1), k.view(t, HK, HEAD).transpose(0, 1),
            v.view(t, HK, HEAD).transpose(0, 1), is_causal=t > 1, enable_gqa=True)
        o = attn.transpose(0, 1).reshape(t, HQ * HEAD) @ self.w_o.t()
        h2, residual = ops.rms_norm(o, self.norm2, EPS, residual)
        a = ops.silu_and_mul(h2 @ self.w_gu.t())
        return a @ self.w_down.t(), residual


def inputs(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, device=DEV, generator=g).to(DT)
    r = torch.randn(tokens, HIDDEN, device=DEV, generator=g).to(DT)
    pos = torch.arange(tokens, device=DEV) + 100
    return x, r, pos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    builds: dict[str, Any] = {"flagos": flagos}
    import fl_dispatch_cuda.ops as cuda_ops

    reason = cuda_ops.load_vllm_ops()
    if reason is None:
        builds["vllm_cuda"] = cuda_ops
    else:
        print(f"vllm_cuda build unavailable: {reason}")
    builds["eager_reference"] = ref
    layer = Layer()
    lines = [f"device {torch.cuda.get_device_name()} | torch {torch.__version__}"]
    results: dict[str, Any] = {}
    for tokens in (1, 64, 4096):
        outs = {}
        for name, ops in builds.items():
            x, r, pos = inputs(tokens, 1)
            outs[name] = layer.forward(ops, x, r, pos)[0].float()
        base = outs["eager_reference"]
        times: dict[str, float] = {}
        for name, ops in builds.items():
            x, r, pos = inputs(tokens, 2)
            fn = lambda: layer.forward(ops, x, r, pos)
            fn(), fn()
            torch.cuda.synchronize()
            times[name] = do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
            rel = ((outs[name] - base).norm() / base.norm()).item()
            results[f"{name}/{tokens}"] = {"us": times[name], "rel_err_vs_reference": rel}
        for name, us in times.items():
            speed = times.get("vllm_cuda", float("nan")) / us
            rel = results[f"{name}/{tokens}"]["rel_err_vs_reference"]
            line = (f"decoder_layer {name:16s} tokens {tokens:5d} {us:10.2f} us  "
                    f"x vLLM-CUDA build {speed:5.3f}  rel err vs reference {rel:.2e}")
            print(line, flush=True)
            lines.append(line)
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decoder_layer.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "decoder_layer.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
