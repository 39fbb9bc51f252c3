"""Tile configs measured on an H200 (bf16) by ``bench/moe_experts.py --sweep``.

Written from the sweep's ``sweep_best.json`` (2026-11-30, one NVIDIA H200, torch 2.11 +
CUDA 13, Triton 3.6, CUDA-graph replay median; ``python3 bench/moe_experts.py --sweep
--budget-s 230``), with rows from a second sweep of the same day (``--tokens 1,4`` for all three
shapes, ``--tokens 1024,256`` for DeepSeek-V3; the fused-sum GEMM2 ``FUSE_SUM`` was a candidate at
decode and won for DeepSeek-V3 at 1 and 4 tokens only) and, for Qwen3-30B-A3B at 1 and 4 tokens,
GEMM2 as a PDL dependent (``PDL``; 2026-12-01, ``python3 bench/moe_experts.py --sweep --pdl-only
--skip-check --shapes qwen3,deepseek,mixtral --tokens 1,4``: 4-24% slower for the other two);
the prefill rows (Mixtral 256, 1024 and 4096; Qwen3-30B-A3B and DeepSeek-V3 1024 and 4096) from the
prefill sweep of 2026-12-01 (``python3 bench/moe_experts.py --sweep --tma --skip-check --tokens
4096,1024``: the tile keys ``TMA_W``, ``SORTED_C`` and ``HALF_M``, each winner re-timed side by
side with the table's config in 3 rounds of 300 ms); the time each config measured is in the
comment. Every shape has rows at M = 1, 4, 16, 64,
256, 1024 and 4096; other M take the nearest. Re-run the sweep and regenerate on another
device.
"""

from __future__ import annotations

from typing import Any

MEASURED: dict[tuple[str, int, int, int, int, str], dict[int, dict[str, Any]]] = {
    ('NVIDIA_H200', 8, 14336, 4096, 2, 'bfloat16'): {  # mixtral
        1: {'BLOCK_SIZE_M': 16, 'gemm1': {'BLOCK_SIZE_N': 64, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 16, 'num_warps': 4, 'num_stages': 4, 'W_EVICT': 1}, 'gemm2': {'BLOCK_SIZE_N': 32, 'BLOCK_SIZE_K': 256, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 3, 'W_EVICT': 1}},  # 172.0 us
        4: {'BLOCK_SIZE_M': 16, 'gemm1': {'BLOCK_SIZE_N': 64, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 5, 'W_EVICT': 0}, 'gemm2': {'BLOCK_SIZE_N': 128, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 16, 'num_warps': 8, 'num_stages': 3, 'W_EVICT': 1}},  # 406.0 us (second sweep)
        16: {'BLOCK_SIZE_M': 16, 'gemm1': {'BLOCK_SIZE_N': 32, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 4, 'W_EVICT': 1}, 'gemm2': {'BLOCK_SIZE_N': 64, 'BLOCK_SIZE_K': 256, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 3, 'W_EVICT': 1}},  # 634.6 us
        64: {'BLOCK_SIZE_M': 32, 'gemm1': {'BLOCK_SIZE_N': 64, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 64, 'num_warps': 4, 'num_stages': 3, 'W_EVICT': 1}, 'gemm2': {'BLOCK_SIZE_N': 128, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 64, 'num_warps': 4, 'num_stages': 3, 'W_EVICT': 1}},  # 645.2 us
        256: {'BLOCK_SIZE_M': 128, 'gemm1': {'BLOCK_SIZE_N': 128, 'BLOCK_SIZE_K': 64, 'GROUP_SIZE_M': 1, 'num_warps': 8, 'num_stages': 4, 'W_EVICT': 0, 'TMA_W': 1, 'HALF_M': 1}, 'gemm2': {'BLOCK_SIZE_N': 256, 'BLOCK_SIZE_K': 64, 'GROUP_SIZE_M': 1, 'num_warps': 8, 'num_stages': 4, 'W_EVICT': 0, 'TMA_W': 1, 'SORTED_C': 1, 'HALF_M': 1}},  # 742.8 us (TMA sweep, short timings; table then 771.3)
        1024: {'BLOCK_SIZE_M': 128, 'gemm1': {'BLOCK_SIZE_N': 128, 'BLOCK_SIZE_K': 32, 'GROUP_SIZE_M': 16, 'num_warps': 8, 'num_stages': 6, 'W_EVICT': 0, 'TMA_W': 1, 'HALF_M': 1}, 'gemm2': {'BLOCK_SIZE_N': 256, 'BLOCK_SIZE_K': 64, 'GROUP_SIZE_M': 16, 'num_warps': 8, 'num_stages': 4, 'W_EVICT': 0, 'TMA_W': 1, 'SORTED_C': 1}},  # 1645.9 us (TMA sweep, confirmed; pointer loads 1816.1 side by side)
        4096: {'BLOCK_SIZE_M': 128, 'gemm1': {'BLOCK_SIZE_N': 128, 'BLOCK_SIZE_K': 64, 'GROUP_SIZE_M': 16, 'num_warps': 8, 'num_stages': 4, 'W_EVICT': 0, 'TMA_W': 1, 'HALF_M': 1}, 'gemm2': {'BLOCK_SIZE_N': 256, 'BLOCK_SIZE_K': 64, 'GROUP_SIZE_M': 16, 'num_warps': 8, 'num_stages': 4, 'W_EVICT': 0, 'TMA_W': 1, 'SORTED_C': 1}},  # 5340.6 us (TMA sweep, confirmed; pointer loads 5789.5 side by side)
    },
    ('NVIDIA_H200', 128, 768, 2048, 8, 'bfloat16'): {  # qwen3
        1: {'BLOCK_SIZE_M': 16, 'gemm1': {'BLOCK_SIZE_N': 32, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 4, 'W_EVICT': 1}, 'gemm2': {'BLOCK_SIZE_N': 64, 'BLOCK_SIZE_K': 64, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 5, 'W_EVICT': 1, 'PDL': 1}},  # 25.6 us (PDL sweep; without PDL 26.2)
        4: {'BLOCK_SIZE_M': 16, 'gemm1': {'BLOCK_SIZE_N': 32, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 16, 'num_warps': 4, 'num_stages': 2, 'W_EVICT': 1}, 'gemm2': {'BLOCK_SIZE_N': 64, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 16, 'num_warps': 4, 'num_stages': 2, 'W_EVICT': 1, 'PDL': 1}},  # 70.5 us (PDL sweep; without PDL 72.2)
        16: {'BLOCK_SIZE_M': 16, 'gemm1': {'BLOCK_SIZE_N': 32, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 4, 'W_EVICT': 1}, 'gemm2': {'BLOCK_SIZE_N': 64, 'BLOCK_SIZE_K': 64, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 5, 'W_EVICT': 1}},  # 196.4 us
        64: {'BLOCK_SIZE_M': 16, 'gemm1': {'BLOCK_SIZE_N': 32, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 4, 'W_EVICT': 1}, 'gemm2': {'BLOCK_SIZE_N': 128, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 16, 'num_warps': 8, 'num_stages': 3, 'W_EVICT': 1}},  # 285.5 us
        256: {'BLOCK_SIZE_M': 32, 'gemm1': {'BLOCK_SIZE_N': 64, 'BLOCK_SIZE_K': 64, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 5, 'W_EVICT': 1}, 'gemm2': {'BLOCK_SIZE_N': 256, 'BLOCK_SIZE_K': 64, 'GROUP_SIZE_M': 1, 'num_warps': 8, 'num_stages': 4, 'W_EVICT': 1}},  # 313.7 us
        1024: {'BLOCK_SIZE_M': 128, 'gemm1': {'BLOCK_SIZE_N': 128, 'BLOCK_SIZE_K': 64, 'GROUP_SIZE_M': 1, 'num_warps': 8, 'num_stages': 4, 'W_EVICT': 0, 'TMA_W': 1, 'HALF_M': 1}, 'gemm2': {'BLOCK_SIZE_N': 256, 'BLOCK_SIZE_K': 64, 'GROUP_SIZE_M': 1, 'num_warps': 8, 'num_stages': 4, 'W_EVICT': 0, 'TMA_W': 1, 'SORTED_C': 1, 'HALF_M': 1}},  # 367.9 us (TMA sweep, confirmed; pointer loads 397.8 side by side)
        4096: {'BLOCK_SIZE_M': 128, 'gemm1': {'BLOCK_SIZE_N': 128, 'BLOCK_SIZE_K': 64, 'GROUP_SIZE_M': 16, 'num_warps': 8, 'num_stages': 4, 'W_EVICT': 0, 'TMA_W': 1, 'HALF_M': 1}, 'gemm2': {'BLOCK_SIZE_N': 256, 'BLOCK_SIZE_K': 64, 'GROUP_SIZE_M': 16, 'num_warps': 8, 'num_stages': 4, 'W_EVICT': 0, 'TMA_W': 1, 'SORTED_C': 1, 'HALF_M': 1}},  # 801.0 us (TMA sweep, confirmed; pointer loads 896.7 side by side)
    },
    ("NVIDIA_H200", 256, 2048, 7168, 8, "bfloat16"): {  # deepseek (sweep --shapes deepseek --tokens 1,16,64,4096)
        1: {'BLOCK_SIZE_M': 16, 'gemm1': {'BLOCK_SIZE_N': 64, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 16, 'num_warps': 4, 'num_stages': 4, 'W_EVICT': 1}, 'gemm2': {'BLOCK_SIZE_N': 32, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 1, 'num_warps': 2, 'num_stages': 4, 'W_EVICT': 1, 'FUSE_SUM': 1}},  # 168.0 us (second sweep; unfused 169.0)
        4: {'BLOCK_SIZE_M': 16, 'gemm1': {'BLOCK_SIZE_N': 64, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 16, 'num_warps': 4, 'num_stages': 4, 'W_EVICT': 1}, 'gemm2': {'BLOCK_SIZE_N': 32, 'BLOCK_SIZE_K': 64, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 5, 'W_EVICT': 1, 'FUSE_SUM': 1}},  # 616.9 us (second sweep; unfused 623.6)
        16: {'BLOCK_SIZE_M': 16, 'gemm1': {'BLOCK_SIZE_N': 32, 'BLOCK_SIZE_K': 256, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 3, 'W_EVICT': 1}, 'gemm2': {'BLOCK_SIZE_N': 64, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 4, 'W_EVICT': 1}},  # 1825.9 us
        64: {'BLOCK_SIZE_M': 16, 'gemm1': {'BLOCK_SIZE_N': 32, 'BLOCK_SIZE_K': 256, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 3, 'W_EVICT': 1}, 'gemm2': {'BLOCK_SIZE_N': 128, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 4, 'W_EVICT': 1}},  # 4330.7 us
        256: {'BLOCK_SIZE_M': 16, 'gemm1': {'BLOCK_SIZE_N': 128, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 3, 'W_EVICT': 1}, 'gemm2': {'BLOCK_SIZE_N': 128, 'BLOCK_SIZE_K': 128, 'GROUP_SIZE_M': 1, 'num_warps': 4, 'num_stages': 4, 'W_EVICT': 1}},  # 4954.0 us (second sweep)
        1024: {'BLOCK_SIZE_M': 64, 'gemm1': {'BLOCK_SIZE_N': 128, 'BLOCK_SIZE_K': 64, 'GROUP_SIZE_M': 1, 'num_warps': 8, 'num_stages': 4, 'W_EVICT': 0, 'TMA_W': 1}, 'gemm2': {'BLOCK_SIZE_N': 128, 'BLOCK_SIZE_K': 64, 'GROUP_SIZE_M': 8, 'num_warps': 8, 'num_stages': 4, 'W_EVICT': 0, 'TMA_W': 1, 'SORTED_C': 1}},  # 5580.2 us (TMA sweep, confirmed; pointer loads 5609.4 side by side)
        4096: {'BLOCK_SIZE_M': 128, 'gemm1': {'BLOCK_SIZE_N': 128, 'BLOCK_SIZE_K': 64, 'GROUP_SIZE_M': 16, 'num_warps': 8, 'num_stages': 4, 'W_EVICT': 0, 'TMA_W': 1}, 'gemm2': {'BLOCK_SIZE_N': 256, 'BLOCK_SIZE_K': 64, 'GROUP_SIZE_M': 16, 'num_warps': 8, 'num_stages': 4, 'W_EVICT': 0, 'TMA_W': 1, 'SORTED_C': 1}},  # 8667.3 us (TMA sweep, confirmed; pointer loads 9198.5 side by side)
    },
}
