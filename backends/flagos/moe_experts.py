"""``fused_experts`` on our Triton kernels (:mod:`.kernels_moe_gemm`).

Pipeline (at most 4 launches, 2 at decode):

1. routes -> expert-aligned blocks: the dispatched ``moe_align_block_size`` (:func:`_align`),
   or, like vLLM at decode sizes (``expert_map is None and M*k*4 <= global_num_experts``),
   no alignment at all: one block per route, the block's expert read from ``topk_ids``;
2. GEMM1 + ``act(gate) * up`` in one kernel into ``[M*k, N]``;
3. GEMM2 times the router weight into ``[M, k, K]`` (straight into the output when k == 1);
4. the dispatched ``moe_sum`` over k (:func:`_sum`), skipped when k == 1.

At decode (the naive assignment) with k > 1, a tile config with ``FUSE_SUM`` in its gemm2
part does 3 and 4 in one kernel (:func:`_gemm2_sum`): bit for bit the same result as our
kernels' pair, one launch fewer (fp16 and bf16; in fp32 the key is ignored: there the
compiler fuses the weight product and the sum into one FMA, which the pair rounds between).
The dispatched ``moe_sum`` is then not called, so a policy that gives ``moe_sum`` to another
backend changes only the aligned (larger) sizes.

CUDA-graph safe: no host synchronisation; every buffer's size follows from the shapes only
(the grids cover the worst case and surplus programs exit after one load). Routes whose id is
outside ``[0, global_num_experts)``, maps to -1 in ``expert_map``, or (without a map) is
``>= E`` contribute zeros: their GEMM2 rows are written with zeros by the kernel, never left
uninitialised. Deterministic (no atomics).

The sum over k is whatever the dispatched ``moe_sum`` does; the torch stand-ins (tests, bench)
accumulate in fp32 and round once.

Programmatic dependent launch (gemm2 config keys, read only where :func:`pdl_available`):

* ``PDL`` (0/1, default 0): GEMM2 (either kernel) is launched as a PDL dependent of GEMM1: its
  programs start while GEMM1's last wave runs, do what does not depend on GEMM1's output, then
  wait for it (``kernels_moe_gemm`` module docstring: why that is safe, and bit for bit the
  same result). GEMM1 is never a PDL dependent itself (the safety argument needs that).
  Measured on the H200 with GEMM1 triggering at its start: Qwen3-30B-A3B 2.3% faster at 1 and
  4 tokens (its table rows have it); DeepSeek-V3 and Mixtral 4-24% slower. An L2
  prefetch of ``w2`` before the wait was tried and lost every time on the H200 (2026-12-01,
  ``bench/moe_experts.py --sweep --pdl-only``, docs/results/h200-moe-pdl-sweep.txt): removed.
* ``PDL_TRIGGER`` (default 1): where GEMM1 lets the dependents launch: 1 at its start, 2 after
  its K loop, 0 at its exit (no explicit trigger).

Off CUDA, under the interpreter, on ROCm or below sm_90 the keys are ignored: the kernels are
launched as without them. ``moe_sum`` (another backend's kernel) is launched normally.

Prefill keys (the aligned path; measured on the H200, 2026-12-01, ``bench/moe_experts.py
--sweep --tma``; the table's prefill rows use them):

* ``TMA_W`` (either GEMM): the weight tiles arrive by TMA from a host tensor descriptor of the
  weights viewed as ``[E * rows, K]`` (:func:`_tma_2d`; where a descriptor cannot address
  them, the pointer loads run). 3-7% faster at 4096 tokens for all three shapes.
* ``SORTED_C`` (gemm2): GEMM1 writes the intermediate in aligned-block order (pad rows too,
  ``[blocks * BLOCK_SIZE_M, N]`` instead of ``[M*k, N]``) and GEMM2 reads its A tiles by TMA
  instead of gathering routes.
* ``HALF_M`` (either GEMM, blocks of >= 32): a block whose upper half holds no valid route
  (the last block of an expert, at prefill, most often) runs a tile of half the rows: 8-9%
  faster at 1024 tokens for Qwen3-30B-A3B and Mixtral, where the last block is most of each
  expert's work.

A launch with a descriptor goes through Triton's own ``run`` (our cached launcher passes
pointers only), which binds and specializes every argument on the host each time: host time
only, nothing on the GPU and nothing under a CUDA graph. Under
the interpreter the descriptors are emulated, so CI runs the TMA code too; the arithmetic is
that of the pointer path, bit for bit (tested: on the H200 compiled, in CI interpreted).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from fl_dispatch import check_args

from .capability import interpreter_enabled
from .launcher import TritonKernel
from .moe_configs import config as _tile_config

_PKG = __package__ or "fl_dispatch_flagos"
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
"""Activation codes of the GEMM1 epilogue (``kernels_moe_gemm.ACT_*``; not imported here:
registering must not import Triton)."""
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CLEAN_M = 64
"""Routes per "clean" program of GEMM2 (zeros for routes no aligned block holds)."""


GEMM1_KERNEL = TritonKernel(f"{_PKG}.kernels_moe_gemm", "moe_gemm1_act_kernel",
                             do_not_specialize=("EM", "num_valid"))
GEMM2_KERNEL = TritonKernel(f"{_PKG}.kernels_moe_gemm", "moe_gemm2_kernel",
                             do_not_specialize=("EM", "num_valid", "num_clean"))
GEMM2_SUM_KERNEL = TritonKernel(f"{_PKG}.kernels_moe_gemm", "moe_gemm2_sum_kernel")
KERNELS = (GEMM1_KERNEL, GEMM2_KERNEL, GEMM2_SUM_KERNEL)


# ----------------------------------------------------------------------------- dispatched ops

def _align(topk_ids: torch.Tensor, num_experts: int, block_size: int,
           sorted_token_ids: torch.Tensor, experts_ids: torch.Tensor,
           num_tokens_post_pad: torch.Tensor, expert_map: torch.Tensor | None) -> None:
    """vLLM's ``moe_align_block_size`` into the given buffers, through the dispatcher (so a
    policy can pick another backend's alignment)."""
    from fl_dispatch import ops

    ops.moe_align_block_size(topk_ids, num_experts, block_size, sorted_token_ids,
                             experts_ids, num_tokens_post_pad, expert_map)


def _sum(inp: torch.Tensor, out: torch.Tensor) -> None:
    """``out[t] = sum_j inp[t, j]`` through the dispatched ``moe_sum``."""
    from fl_dispatch import ops

    ops.moe_sum(inp, out)


# ----------------------------------------------------------------------------- helpers

@functools.lru_cache(maxsize=16)
def _device_name(index: int) -> str:
    try:
        return torch.cuda.get_device_name(index)
    except Exception:  # no CUDA (interpreter)
        return ""


def _hopper(index: int) -> bool:
    """CUDA (not ROCm) device ``index`` is of compute capability >= 9.0 (Hopper and later)."""
    if torch.version.hip is not None:
        return False
    try:
        major, _ = torch.cuda.get_device_capability(index)
    except Exception:  # no CUDA
        return False
    return major >= 9


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=16)
def _pdl_device(index: int) -> bool:
    """Device ``index`` is sm_90+ (:func:`_hopper`) and this Triton has ``launch_pdl`` and the
    ``gdc_*`` builtins."""
    if not _hopper(index):
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except Exception:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def pdl_available(device: torch.device) -> bool:
    """Whether GEMM2 may be launched as a PDL dependent on ``device``: compiled kernels (not
    the interpreter) on a CUDA device of compute capability >= 9.0 (Hopper), with a Triton
    that knows the launch option."""
    if device.type != "cuda" or interpreter_enabled():
        return False
    return _pdl_device(_cuda_index(device))


@functools.lru_cache(maxsize=16)
def _tma_device(index: int) -> bool:
    """Device ``index`` is sm_90+ (:func:`_hopper`: TMA) and this Triton has host tensor
    descriptors."""
    if not _hopper(index):
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except Exception:  # a Triton without descriptors
        return False
    return True


def tma_available(device: torch.device) -> bool:
    """Whether the TMA variants (tile keys ``TMA_W``, ``SORTED_C``) run on ``device``: a CUDA
    device of compute capability >= 9.0, or Triton's CPU interpreter (which emulates the
    descriptors, so CI tests them)."""
    if interpreter_enabled():
        return True
    if device.type != "cuda":
        return False
    return _tma_device(_cuda_index(device))


def _tma_2d(t: torch.Tensor, rows: int, block: tuple[int, int]) -> Any | None:
    """A host tensor descriptor of ``t`` viewed as ``[rows, t.shape[-1]]`` (leading dims
    folded), block ``block``; None where TMA cannot address it (the leading dims do not fold
    into one stride, a row stride or base address not a multiple of 16 bytes)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    elem = t.element_size()
    row_stride = t.stride(-2)
    if t.stride(-1) != 1 or t.data_ptr() % 16 or (row_stride * elem) % 16:
        return None
    if t.dim() == 3 and t.stride(0) != t.shape[1] * row_stride:
        return None
    return TensorDescriptor(t, [rows, t.shape[-1]], [row_stride, 1], list(block))


def aligned_buffer_sizes(numel: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """(len(sorted_token_ids), len(experts_ids)) as vLLM sizes them: ``numel + E*(bm-1)``,
    capped at ``numel*bm`` when ``numel < E``."""
    max_pad = numel + num_experts * (block_m - 1)
    if numel < num_experts:
        max_pad = min(max_pad, numel * block_m)
    return max_pad, -(-max_pad // block_m)


def use_naive_assignment(M: int, k: int, global_num_experts: int,
                         expert_map: torch.Tensor | None) -> bool:
    """vLLM's decode shortcut (``_prepare_expert_assignment``): one block per route."""
    return expert_map is None and M * k * 4 <= global_num_experts


def _bad(arg: str, value: Any, valid: str) -> ValueError:
    return ValueError(f"fused_experts: {arg} is {value}; expected {valid}")


def _validate(hidden_states, w1, w2, topk_weights, topk_ids, activation,
              apply_router_weight_on_input, global_num_experts, expert_map) -> int:
    """Checks the arguments (the op's checks, then what the kernels add); returns the
    resolved ``global_num_experts``."""
    check_args("fused_experts", hidden_states, w1, w2, topk_weights, topk_ids, activation,
               apply_router_weight_on_input, global_num_experts, expert_map)
    if hidden_states.dtype not in DTYPES:
        raise _bad("hidden_states.dtype", hidden_states.dtype, "float32, float16 or bfloat16")
    E = w1.shape[0]
    if E == 0 or w1.shape[1] == 0:
        raise _bad("w1.shape", tuple(w1.shape), "[E, 2N, K] with E >= 1 and 2N > 0")
    for name, w in (("w1", w1), ("w2", w2)):
        if w.dtype != hidden_states.dtype:
            raise _bad(f"{name}.dtype", w.dtype, f"hidden_states.dtype ({hidden_states.dtype})")
        if w.stride(-1) != 1:
            raise _bad(f"{name}.stride()", tuple(w.stride()), "unit stride in the last dimension")
        if w.device != hidden_states.device:
            raise _bad(f"{name}.device", w.device, f"hidden_states.device ({hidden_states.device})")
    if topk_ids.shape[1] == 0:
        raise _bad("topk_ids.shape", tuple(topk_ids.shape), "[M, k] with k >= 1")
    if not topk_weights.dtype.is_floating_point:
        raise _bad("topk_weights.dtype", topk_weights.dtype, "a floating dtype (float32)")
    if expert_map is not None:
        if not isinstance(expert_map, torch.Tensor) or expert_map.dim() != 1 \
                or expert_map.dtype not in (torch.int32, torch.int64):
            raise _bad("expert_map", _describe(expert_map),
                       "a 1-D int32/int64 tensor [global_num_experts]")
        if global_num_experts == -1:
            global_num_experts = expert_map.numel()
        if expert_map.numel() != global_num_experts:
            raise _bad("expert_map.numel()", expert_map.numel(),
                       f"global_num_experts = {global_num_experts}")
    elif global_num_experts == -1:
        global_num_experts = E
    if not isinstance(global_num_experts, int) or global_num_experts < 1:
        raise _bad("global_num_experts", global_num_experts, "-1 or a positive int")
    if expert_map is None and global_num_experts < E:
        raise _bad("global_num_experts", global_num_experts,
                   f"-1 or >= the number of local experts E = {E} when expert_map is None")
    return global_num_experts


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dim()}-D {t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


# ----------------------------------------------------------------------------- the op

def fused_experts(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str = "silu",
                  apply_router_weight_on_input: bool = False, global_num_experts: int = -1,
                  expert_map: torch.Tensor | None = None, *,
                  config: dict[str, Any] | None = None) -> torch.Tensor:
    """vLLM's ``fused_experts`` (unquantized): a new ``[M, K]`` tensor in hidden_states'
    dtype. ``config`` (keyword only, for sweeps and tests) overrides the tile config of
    :func:`.moe_configs.config`."""
    global_num_experts = _validate(hidden_states, w1, w2, topk_weights, topk_ids, activation,
                                   apply_router_weight_on_input, global_num_experts,
                                   expert_map)
    M, K = hidden_states.shape
    E, two_n, _ = w1.shape
    N = two_n // 2
    k = topk_ids.shape[1]
    dtype = hidden_states.dtype
    device = hidden_states.device
    out = torch.empty((M, K), dtype=dtype, device=device)
    if M == 0:
        return out
    x = hidden_states if hidden_states.stride(1) == 1 else hidden_states.contiguous()
    tw = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.float()
    tw = tw if tw.is_contiguous() else tw.contiguous()
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    if expert_map is not None and not expert_map.is_contiguous():
        expert_map = expert_map.contiguous()
    dev = _cuda_index(device) if device.type == "cuda" else 0
    cfg = config or _tile_config(M, E, N, K, k, dtype,
                                 _device_name(dev) if device.type == "cuda" else "")
    bm = cfg["BLOCK_SIZE_M"]
    numel = M * k

    naive = use_naive_assignment(M, k, global_num_experts, expert_map)
    if naive:
        sorted_ids = ids  # unused by the kernels
        expert_ids = ids.view(-1)
        ntpp = ids  # unused
        em = numel * bm
    else:
        length, blocks = aligned_buffer_sizes(numel, global_num_experts, bm)
        sorted_ids = torch.empty((length,), dtype=torch.int32, device=device)
        expert_ids = torch.empty((blocks,), dtype=torch.int32, device=device)
        ntpp = torch.empty((1,), dtype=torch.int32, device=device)
        _align(ids, global_num_experts, bm, sorted_ids, expert_ids, ntpp, expert_map)
        em = min(length, numel * bm)
    num_pid_m = -(-em // bm)

    ieee = dtype == torch.float32
    upcast = dtype == torch.bfloat16 and interpreter_enabled()  # its bf16 tl.dot is wrong

    g1 = cfg["gemm1"]
    g2 = cfg["gemm2"]
    bn1, bk1 = g1["BLOCK_SIZE_N"], g1["BLOCK_SIZE_K"]
    bn2, bk2 = g2["BLOCK_SIZE_N"], g2["BLOCK_SIZE_K"]
    # TMA variants (prefill tiles): descriptors where the device and the layouts allow them
    tma = (g1.get("TMA_W", 0) or g2.get("TMA_W", 0) or g2.get("SORTED_C", 0)) \
        and tma_available(device)
    w1_desc = _tma_2d(w1, E * two_n, (bn1, bk1)) if tma and g1.get("TMA_W", 0) else None
    w2_desc = _tma_2d(w2, E * K, (bn2, bk2)) if tma and g2.get("TMA_W", 0) else None
    sorted_c = bool(tma and g2.get("SORTED_C", 0) and not naive
                    and (N * hidden_states.element_size()) % 16 == 0)
    cache2 = torch.empty((num_pid_m * bm if sorted_c else numel, N), dtype=dtype,
                         device=device)
    a2_desc = _tma_2d(cache2, cache2.shape[0], (bm, bk2)) if sorted_c else None
    sorted_c = a2_desc is not None
    # half-height tiles for blocks whose upper half is padding (aligned blocks of >= 32)
    half1 = bool(g1.get("HALF_M", 0)) and not naive and bm >= 32
    half2 = bool(g2.get("HALF_M", 0)) and not naive and bm >= 32
    a2_half = _tma_2d(cache2, cache2.shape[0], (bm // 2, bk2)) if sorted_c and half2 else None
    # PDL only where it exists (never under the interpreter); then GEMM1 triggers its launch
    pdl = bool(g2.get("PDL", 0)) and pdl_available(device)
    trigger = int(g2.get("PDL_TRIGGER", 1)) if pdl else 0
    args1 = (N, K, em, numel, k, E, x.stride(0), w1.stride(0), w1.stride(1), cache2.stride(0),
             naive, bool(apply_router_weight_on_input), ACTIVATIONS[activation], bm, bn1, bk1,
             g1["GROUP_SIZE_M"], K % bk1 == 0, ieee, int(g1.get("W_EVICT", 0)), upcast,
             trigger, w1_desc is not None, sorted_c, half1)
    t1 = (x, w1 if w1_desc is None else w1_desc, cache2, tw, sorted_ids, expert_ids, ntpp)
    p1 = tuple(t.data_ptr() for t in (x, w1, cache2, tw, sorted_ids, expert_ids, ntpp))
    # a descriptor is a launch argument our cached launcher does not pass: Triton's own run
    key1 = None if w1_desc is not None else (
        tuple(t.dtype for t in t1), tuple(p & 15 for p in p1), dev,
        g1["num_warps"], g1["num_stages"], *args1[:2], *args1[4:])
    GEMM1_KERNEL.launch(key1, (num_pid_m * -(-N // bn1), 1, 1), dev, t1, p1, args1,
                        g1["num_warps"], g1["num_stages"])

    # fp32: the compiler contracts the fused kernel's weight product and its sum into an
    # FMA (no rounding between them: no cast to the dtype stops it), 1 ulp off the pair
    if naive and k > 1 and g2.get("FUSE_SUM", 0) and dtype != torch.float32:
        _gemm2_sum(cache2, w2, out, tw, ids, K, N, E, k, not apply_router_weight_on_input,
                   g2, ieee, upcast, dev, pdl)
        return out
    cache3 = out.view(M, 1, K) if k == 1 else torch.empty((M, k, K), dtype=dtype,
                                                           device=device)
    c3 = cache3.view(numel, K)
    num_clean = 0 if naive else -(-numel // CLEAN_M)
    has_map = expert_map is not None
    emap = expert_map if has_map else ids
    clean_n = min(256, max(16, 1 << max(K - 1, 0).bit_length()))
    args2 = (K, N, em, numel, E, global_num_experts, num_clean, cache2.stride(0),
             w2.stride(0), w2.stride(1), c3.stride(0), naive,
             not apply_router_weight_on_input, has_map, bm, bn2, bk2, g2["GROUP_SIZE_M"],
             N % bk2 == 0, ieee, int(g2.get("W_EVICT", 0)), upcast, CLEAN_M, clean_n, pdl,
             w2_desc is not None, sorted_c, half2)
    a2 = cache2 if a2_desc is None else a2_desc
    t2 = (a2, a2 if a2_half is None else a2_half, w2 if w2_desc is None else w2_desc, c3, tw,
          sorted_ids, expert_ids, ntpp, ids, emap)
    p2 = tuple(t.data_ptr() for t in (cache2, cache2, w2, c3, tw, sorted_ids, expert_ids, ntpp,
                                      ids, emap))
    key2 = None if w2_desc is not None or sorted_c else (
        tuple(t.dtype for t in t2), tuple(p & 15 for p in p2), dev,
        g2["num_warps"], g2["num_stages"], *args2[:2], *args2[4:6], *args2[7:])
    GEMM2_KERNEL.launch(key2, (num_clean + num_pid_m * -(-K // bn2), 1, 1), dev, t2,
                        p2, args2, g2["num_warps"], g2["num_stages"], pdl)
    if k > 1:
        _sum(cache3, out)
    return out


def _gemm2_sum(cache2: torch.Tensor, w2: torch.Tensor, out: torch.Tensor, tw: torch.Tensor,
               ids: torch.Tensor, K: int, N: int, E: int, k: int, mul_w: bool,
               g2: dict[str, Any], ieee: bool, upcast: bool, dev: int,
               pdl: bool = False) -> None:
    """Decode GEMM2 with the sum over k fused (``FUSE_SUM``): ``out`` written directly, no
    ``[M, k, K]`` buffer and no ``moe_sum`` launch; bit for bit the unfused pair (see
    ``kernels_moe_gemm.moe_gemm2_sum_kernel``). Only on the naive assignment, where every
    route's expert is read from ``topk_ids`` (no ``expert_map``). ``pdl``: launched as a PDL
    dependent of GEMM1 (the caller checked :func:`pdl_available`)."""
    bn, bk = g2["BLOCK_SIZE_N"], g2["BLOCK_SIZE_K"]
    args = (K, N, E, cache2.stride(0), w2.stride(0), w2.stride(1), out.stride(0), k, mul_w,
            bn, bk, N % bk == 0, ieee, int(g2.get("W_EVICT", 0)), upcast, pdl)
    t = (cache2, w2, out, tw, ids)
    p = tuple(x.data_ptr() for x in t)
    key = (tuple(x.dtype for x in t), tuple(q & 15 for q in p), dev, g2["num_warps"],
           g2["num_stages"], *args)
    GEMM2_SUM_KERNEL.launch(key, (out.shape[0] * -(-K // bn), 1, 1), dev, t, p, args,
                            g2["num_warps"], g2["num_stages"], pdl)


# ----------------------------------------------------------------------------- registration
def _fused_experts_op(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      activation: str = "silu", apply_router_weight_on_input: bool = False,
                      global_num_experts: int = -1, expert_map: torch.Tensor | None = None,
                      ) -> torch.Tensor:
    """The op's exact signature (no ``config``): what the dispatcher calls."""
    return fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, activation,
                         apply_router_weight_on_input, global_num_experts, expert_map)


def _register() -> None:
    from .ops import impls

    impls.add("fused_experts", _fused_experts_op)


_register()
