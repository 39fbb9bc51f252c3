"""Tile configs of the ``fused_experts`` kernels, per device and shape.

A config is a dict::

    {"BLOCK_SIZE_M": bm,                      # alignment block: shared by both GEMMs
     "gemm1": {"BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages",
               "W_EVICT"},
     "gemm2": {... same keys ...}}

Optional keys of either GEMM (absent = 0): ``TMA_W`` (the weight tiles by TMA, a host tensor
descriptor; sm_90+ or the interpreter, else ignored), ``HALF_M`` (a block whose upper half
holds only pads runs a tile of half the rows; aligned blocks of >= 32 only); of ``gemm2``:
``SORTED_C`` (GEMM1 writes the intermediate in block order and GEMM2 reads its A tiles by
TMA), ``FUSE_SUM``, ``PDL``, ``PDL_TRIGGER`` (decode; see :mod:`.moe_experts`).

``gemm1`` is the fused gate+up GEMM: a BLOCK_SIZE_N of 64 there computes 64 gate *and* 64
up columns (two accumulators), so it holds as many registers as vLLM's BLOCK_SIZE_N = 128.

Lookup (:func:`config`): an exact table for (device, E, N, K, k, dtype) keyed by the number
of tokens M, nearest M key wins (vLLM's rule); else :func:`heuristic`. ``bench/moe_experts.py
--sweep`` prints entries in the :data:`TABLES` format to paste here.

The H200 tables below start from vLLM's shipped H200 bf16 configs (``E=8,N=14336`` and
``E=128,N=768``, same M keys; gemm1's BLOCK_SIZE_N halved for the two accumulators) and
vLLM's default config for DeepSeek-V3 (no shipped bf16 file); they are placeholders until
the sweep on the H200 replaces them.
"""

from __future__ import annotations

import functools
from typing import Any

from .launcher import pow2

_KEYS = ("BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages", "W_EVICT")


def _g(bn: int, bk: int, group: int, warps: int, stages: int, evict: int = 0) -> dict:
    return dict(zip(_KEYS, (bn, bk, group, warps, stages, evict)))


def _vllm_row(bm: int, bn: int, bk: int, group: int, warps: int, stages: int,
              evict: int = 0) -> dict:
    """A vLLM config row as ours: gemm2 takes it as is, gemm1 halves BLOCK_SIZE_N."""
    return {"BLOCK_SIZE_M": bm, "gemm1": _g(max(16, bn // 2), bk, group, warps, stages, evict),
            "gemm2": _g(bn, bk, group, warps, stages, evict)}


# vLLM's H200 bf16 tables (fused_moe/configs/E=...,device_name=NVIDIA_H200.json):
# M -> (BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, GROUP_SIZE_M, num_warps, num_stages).
VLLM_H200: dict[tuple[int, int], dict[int, tuple[int, ...]]] = {
    (8, 14336): {
        1: (16, 128, 128, 16, 4, 5), 2: (32, 64, 128, 1, 4, 5), 4: (16, 64, 64, 1, 4, 5),
        8: (16, 128, 128, 1, 4, 5), 16: (16, 64, 256, 16, 4, 3), 24: (16, 128, 256, 16, 4, 2),
        32: (16, 128, 128, 16, 8, 3), 48: (32, 128, 128, 16, 4, 3),
        64: (32, 128, 128, 64, 4, 3), 96: (32, 128, 128, 64, 4, 3),
        128: (64, 128, 128, 1, 8, 4), 256: (128, 256, 64, 1, 8, 4),
        512: (128, 256, 64, 16, 8, 4), 1024: (128, 256, 64, 16, 8, 4),
        1536: (128, 256, 64, 16, 8, 4), 2048: (128, 256, 64, 32, 8, 4),
        3072: (128, 256, 64, 16, 8, 4), 4096: (128, 256, 64, 16, 8, 4)},
    (128, 768): {
        1: (16, 64, 64, 1, 4, 5), 2: (16, 64, 64, 1, 4, 4), 4: (16, 64, 128, 16, 4, 2),
        8: (16, 64, 128, 1, 4, 3), 16: (16, 64, 256, 1, 4, 2), 24: (16, 64, 128, 1, 4, 4),
        32: (16, 64, 128, 16, 4, 2), 48: (16, 128, 128, 16, 4, 3),
        64: (16, 256, 128, 1, 8, 2), 96: (16, 128, 128, 1, 4, 2),
        128: (16, 128, 128, 1, 4, 2), 256: (32, 256, 128, 16, 4, 2),
        512: (64, 128, 64, 1, 4, 3), 1024: (128, 256, 64, 16, 8, 4),
        1536: (128, 256, 64, 1, 8, 4), 2048: (128, 256, 64, 1, 8, 4),
        3072: (128, 256, 64, 1, 8, 4), 4096: (128, 256, 64, 16, 8, 4)},
}


def _vllm_default(M: int) -> tuple[int, ...]:
    """vLLM's bf16 default config (get_default_config) as (bm, bn, bk, group, warps, stages)."""
    if M <= 32:
        return (16, 64, 128, 1, 4, 4)
    if M <= 96:
        return (32, 64, 128, 1, 4, 4)
    if M <= 512:
        return (64, 128, 64, 1, 4, 3)
    return (128, 128, 64, 16, 8, 3)


def _from_vllm(table: dict[int, tuple[int, ...]], evict_upto: int) -> dict[int, dict]:
    return {m: _vllm_row(*row, evict=int(m <= evict_upto)) for m, row in table.items()}


_DEEPSEEK_M = (1, 2, 4, 8, 16, 32, 64, 96, 128, 256, 512, 1024, 2048, 4096)

TABLES: dict[tuple[str, int, int, int, int, str], dict[int, dict]] = {
    # (device, E, N, K, top_k, dtype) -> {M: config}
    ("NVIDIA_H200", 8, 14336, 4096, 2, "bfloat16"): _from_vllm(VLLM_H200[(8, 14336)], 64),
    ("NVIDIA_H200", 128, 768, 2048, 8, "bfloat16"): _from_vllm(VLLM_H200[(128, 768)], 16),
    ("NVIDIA_H200", 256, 2048, 7168, 8, "bfloat16"): {
        m: _vllm_row(*_vllm_default(m), evict=int(m <= 64)) for m in _DEEPSEEK_M},
}


def _overlay_measured() -> None:
    """Rows measured on the device (:mod:`.moe_tuned`) replace the vLLM-derived ones."""
    from .moe_tuned import MEASURED

    for key, rows in MEASURED.items():
        TABLES[key] = {**TABLES.get(key, {}), **rows}


_overlay_measured()


def device_key(device_name: str | None) -> str:
    """vLLM's normalisation: spaces -> '_', any H200 -> 'NVIDIA_H200'."""
    name = (device_name or "").replace(" ", "_")
    return "NVIDIA_H200" if "H200" in name else name


def heuristic(M: int, E: int, N: int, K: int, k: int, dtype: str) -> dict[str, Any]:
    """A config from the expected tokens per expert (``M*k/E``) when no table matches."""
    tpe = M * k / max(E, 1)
    if tpe <= 16:
        bm = 16
    elif tpe <= 48:
        bm = 32
    elif tpe <= 128:
        bm = 64
    else:
        bm = 128
    if bm <= 16:  # decode: weight streaming, long K tiles, evict the streamed weights
        g1 = _g(64, 128, 1, 4, 4, 1)
        g2 = _g(64, 128, 1, 4, 4, 1)
    elif bm <= 32:
        g1 = _g(64, 128, 8, 4, 3, 1)
        g2 = _g(128, 128, 8, 4, 3, 1)
    elif bm <= 64:
        g1 = _g(64, 64, 8, 4, 3)
        g2 = _g(128, 64, 8, 4, 3)
    else:  # prefill: 128 x 256 fp32 accumulators per program (vLLM's H200 prefill tiles)
        g1 = _g(128, 64, 16, 8, 4)
        g2 = _g(256, 64, 16, 8, 4)
    if dtype == "float32":  # twice the bytes per element: halve K tiles and stages
        for g in (g1, g2):
            g["BLOCK_SIZE_K"] = max(16, g["BLOCK_SIZE_K"] // 2)
            g["num_stages"] = min(g["num_stages"], 3)
    return {"BLOCK_SIZE_M": bm, "gemm1": g1, "gemm2": g2}


def _clamp(cfg: dict[str, Any], N: int, K: int) -> dict[str, Any]:
    """Tiles no larger than the (power-of-two rounded) dimensions, and >= 16 for tl.dot."""
    g1, g2 = dict(cfg["gemm1"]), dict(cfg["gemm2"])
    g1["BLOCK_SIZE_N"] = max(16, min(g1["BLOCK_SIZE_N"], pow2(N)))
    g1["BLOCK_SIZE_K"] = max(16, min(g1["BLOCK_SIZE_K"], pow2(K)))
    g2["BLOCK_SIZE_N"] = max(16, min(g2["BLOCK_SIZE_N"], pow2(K)))
    g2["BLOCK_SIZE_K"] = max(16, min(g2["BLOCK_SIZE_K"], pow2(N)))
    return {"BLOCK_SIZE_M": max(16, cfg["BLOCK_SIZE_M"]), "gemm1": g1, "gemm2": g2}


@functools.lru_cache(maxsize=4096)
def _config(M: int, E: int, N: int, K: int, k: int, dtype: str,
            device: str) -> tuple[tuple, ...]:
    table = TABLES.get((device, E, N, K, k, dtype))
    if table:
        cfg = table[min(table, key=lambda m: (abs(m - M), m))]
    else:
        cfg = heuristic(M, E, N, K, k, dtype)
    cfg = _clamp(cfg, N, K)
    return (("BLOCK_SIZE_M", cfg["BLOCK_SIZE_M"]),
            ("gemm1", tuple(cfg["gemm1"].items())), ("gemm2", tuple(cfg["gemm2"].items())))


def config(M: int, E: int, N: int, K: int, k: int, dtype: Any,
           device_name: str | None) -> dict[str, Any]:
    """The tile config for ``M`` tokens, ``E`` local experts, intermediate size ``N``
    (``w2.shape[2]``), hidden size ``K``, top-k ``k``, ``dtype`` (torch dtype or name) on
    ``device_name`` (``torch.cuda.get_device_name()``; None or "" off the GPU). A new dict."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    frozen = _config(int(M), int(E), int(N), int(K), int(k), name, device_key(device_name))
    bm, g1, g2 = frozen
    return {"BLOCK_SIZE_M": bm[1], "gemm1": dict(g1[1]), "gemm2": dict(g2[1])}
