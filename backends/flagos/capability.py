"""Can our Triton kernels run here? The capability check of every ``default.flagos`` impl."""

from __future__ import annotations

import functools
import os

_TRUE = ("1", "true", "on", "yes")


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # Triton before knobs: the variable itself
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


@functools.lru_cache(maxsize=1)
def gpu_unavailable_reason() -> str | None:
    """None when a Triton GPU driver (or ``torch.cuda``) is there, else why not.

    Cached: the hardware does not change during a process."""
    try:
        import torch

        if torch.cuda.is_available():
            return None
    except ImportError:
        pass
    try:
        from triton.runtime import driver

        driver.active.get_current_target()
        return None
    except Exception as exc:  # no driver: RuntimeError, or a backend's own error
        return f"no GPU for Triton ({type(exc).__name__}: {exc})"


def unavailable_reason() -> str | None:
    """None when our Triton kernels can run here, else the reason they cannot.

    Needs Triton importable, and either ``TRITON_INTERPRET=1`` (CPU interpreter, slow: for
    correctness checks) or a Triton GPU driver. Imports Triton, never our kernels."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if interpreter_enabled():
        return None
    reason = gpu_unavailable_reason()
    if reason is None:
        return None
    return f"{reason}; set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter"
