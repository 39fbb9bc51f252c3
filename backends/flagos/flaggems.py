"""FlagGems: its aten-level registration and its fused kernels as extra flagos impls.

``flag_gems`` is a GPU-only dependency: importing it fails without a GPU, and its kernels do not
run under ``TRITON_INTERPRET``. It is imported here only when needed (a call, the per-process
hook, a capability check where CUDA is not pristine), never when our package is imported; the
import error is kept as the reason.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_dispatch import (
    GELU_APPROXIMATIONS,
    ImplTable,
    bad_approximate,
    copy_back,
    process_rank,
    weight_or_ones,
    write_out,
)

if TYPE_CHECKING:
    import torch

IMPL_ID = "default.flagos.flaggems"
PRIORITY = 140
"""Below our own kernels (150): FlagGems' were not measured faster on the ops we cover."""


@functools.lru_cache(maxsize=1)
def _import() -> tuple[Any, str | None]:
    try:
        return importlib.import_module("flag_gems"), None
    except Exception as exc:  # ImportError, or a RuntimeError from a GPU-less machine
        return None, f"import flag_gems failed ({type(exc).__name__}: {exc})"


def flaggems_unavailable_reason() -> str | None:
    """None when ``flag_gems`` can serve here, else why not.

    Importing ``flag_gems`` queries the GPU (its NVIDIA heuristics read the device's
    properties at import), which initialises CUDA: in vLLM's front end that makes vLLM spawn
    its engine instead of forking it (18 s on an H200). So where CUDA is available but not yet
    initialised in this process and FlagGems is not imported yet, the check only looks for the
    installed package and the import waits for the first call (should it fail there, the impl
    is demoted with the error, logged once). Elsewhere (no GPU, or CUDA already up) it imports
    FlagGems once and its error is the reason."""
    if "flag_gems" not in sys.modules and _cuda_untouched():
        if importlib.util.find_spec("flag_gems") is None:
            return "flag_gems is not installed"
        return None
    return _import()[1]


def _cuda_untouched() -> bool:
    """CUDA is there, and nothing in this process has initialised it yet."""
    import torch

    return torch.cuda.is_available() and not torch.cuda.is_initialized()


def _flag_gems() -> Any:
    module, reason = _import()
    if module is None:
        raise RuntimeError(reason)
    return module


def oplist_path(base: str, rank: str | None = None) -> Path:
    """The per-process record file: ``base`` with ``.rank<R>`` (or ``.pid<P>``) before its
    suffix, so every vLLM worker writes its own (``/tmp/x.txt`` -> ``/tmp/x.rank0.txt``)."""
    if rank is None:
        rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK")
    tag = f"rank{rank}" if rank else f"pid{os.getpid()}"
    path = Path(base)
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


def _registered_ops(flag_gems: Any) -> list[str] | None:
    for name in ("all_registered_ops", "all_registered_keys"):
        fn = getattr(flag_gems, name, None)
        if fn is None:
            continue
        try:
            return sorted(str(op) for op in fn())
        except Exception:  # older FlagGems: no registrar recorded yet
            continue
    return None


def enable_flaggems(policy: Any) -> str:
    """Register FlagGems' aten ops as the policy says; one line describing what happened.

    Whitelist set: ``flag_gems.only_enable(include=whitelist)``; otherwise
    ``flag_gems.enable(unused=blacklist)``. The enabled ops are written, one per line, to the
    per-process file derived from ``policy.flaggems_oplist_path`` (see :func:`oplist_path`).
    Returns the reason instead when ``use_flaggems`` is off or FlagGems is unavailable."""
    if not policy.use_flaggems.value:
        return f"FlagGems aten registration off (use_flaggems=False from " \
               f"{policy.use_flaggems.source})"
    reason = flaggems_unavailable_reason()
    if reason is not None:
        return f"FlagGems unavailable: {reason}"
    flag_gems = _flag_gems()
    whitelist = policy.flagos_whitelist.value
    if whitelist is not None:
        flag_gems.only_enable(include=list(whitelist))
        how = f"only_enable(include={len(whitelist)} ops)"
    else:
        blacklist = list(policy.flagos_blacklist.value or ())
        flag_gems.enable(unused=blacklist)
        how = f"enable(unused={len(blacklist)} ops)"
    ops = _registered_ops(flag_gems)
    path = oplist_path(policy.flaggems_oplist_path.value, process_rank())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{op}\n" for op in ops) if ops is not None
                        else "# this FlagGems version does not list its registered ops\n")
        where = f"recorded in {path}"
    except OSError as exc:
        where = f"not recorded ({path}: {exc})"
    count = "?" if ops is None else str(len(ops))
    version = getattr(flag_gems, "__version__", "?")
    return f"FlagGems {version}: {how}, {count} aten ops enabled, {where}"


# ----------------------------------------------------------------------------- impls
impls = ImplTable(impl_id=IMPL_ID, kind="flagos", priority=PRIORITY,
                  check=lambda: flaggems_unavailable_reason())
"""FlagGems' kernels adapted to the ops' contracts (each decorated below)."""

# FlagGems' fused kernels, adapted to the ops' contracts (its fused add + norm works on
# contiguous copies, so the results are written back into the caller's views).

@impls.impl()
def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    d = x.shape[-1] // 2
    return write_out(_flag_gems().silu_and_mul(x[..., :d], x[..., d:]), out)


@impls.impl()
def gelu_and_mul(
    x: torch.Tensor, approximate: str = "none", out: torch.Tensor | None = None
) -> torch.Tensor:
    if approximate not in GELU_APPROXIMATIONS:
        raise bad_approximate(approximate)
    d = x.shape[-1] // 2
    return write_out(_flag_gems().gelu_and_mul(x[..., :d], x[..., d:], approximate), out)


@impls.impl()
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    epsilon: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    flag_gems = _flag_gems()
    n = x.shape[-1]
    w = weight_or_ones(weight, x)
    if residual is None:
        return flag_gems.rms_norm(x, [n], w, epsilon)
    xs, rs = flag_gems.fused_add_rms_norm(x, residual, [n], w, epsilon)
    copy_back(x, xs)
    copy_back(residual, rs)
    return x, residual


GAPS = {
    "rotary_embedding": "default.flagos.flaggems does not serve it: FlagGems' rotary "
                        "(flag_gems.fused.rotary_embedding) takes separate "
                        "cos/sin tensors gathered per token and rotates whole heads: serving "
                        "vLLM's cache + positions contract needs a gather and a copy per call, "
                        "slower than our kernel",
    "rotary_embedding_out": "default.flagos.flaggems does not serve it (as rotary_embedding)",
    # the MoE impls of flaggems_moe.py (FlagGems 5.0.2, src/flag_gems/fused/*.py)
    "topk_softmax": "default.flagos.flaggems (flag_gems.topk_softmax): no bias, topk > 32, "
                    "E > 1024 go to our Triton topk_softmax (default.flagos); FlagGems adds "
                    "+1e-8 to the softmax and renormalisation denominators (weights off by "
                    "~1e-8 relative)",
    "grouped_topk": "default.flagos.flaggems does not serve it: on the H200 (2026-11-30, "
                    "bench/moe_routing.py) FlagGems 5.0.2's grouped_topk chose other experts "
                    "than vLLM's _moe_C kernel and the reference in tie-free rows and its "
                    "weights differed by up to 1.2e-3, where vLLM's and ours agreed exactly",
    "moe_align_block_size": "default.flagos.flaggems (flag_gems.moe_align_block_size_triton):"
                            " expert_map applied after the kernel on the used blocks "
                            "(experts_ids = expert_map[experts_ids], as vLLM's wrapper); ids "
                            "outside [0, num_experts) are NOT skipped by FlagGems' kernel "
                            "(valid ids only, as vLLM's routers produce); num_experts >= "
                            "1024, no routes, or non-contiguous buffers go to our Triton "
                            "align",
    "moe_sum": "default.flagos.flaggems (flag_gems.moe_sum): autotuned, so its first call per "
               "(hidden, topk) benchmarks and must happen before CUDA-graph capture",
    "fused_experts": "default.flagos.flaggems (flag_gems.fused_experts_impl): silu only; "
                     "gelu/gelu_tanh, global_num_experts other than E (no map) or than the "
                     "map's length (with a map), and w1/w2 with a strided last dim go to our "
                     "Triton fused_experts (default.flagos)",
    "flash_mla": "default.flagos.flaggems does not serve it: flag_gems.flash_mla (v5.0.2 "
                 "fused/flash_mla.py) returns no lse (the op's contract returns one), "
                 "hard-codes softmax scale 1/sqrt(d), asserts causal but applies no causal "
                 "mask, runs one query row per batch entry (s_q > 1 is not served) and "
                 "divides by zero on zero-length rows; recovering lse would need a second "
                 "pass over the cache",
}
"""Built-in ops FlagGems has a kernel for but this backend does not serve, and why (shown by
``fl-dispatch plugins``)."""
