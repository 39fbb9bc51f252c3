"""The CUDA device's compute capability, read without initialising CUDA in this process.

vLLM forks its engine process only while CUDA is uninitialised in the parent; once anything
initialises it (``torch.cuda.get_device_capability`` does), vLLM logs "We must use the `spawn`
multiprocessing start method ... Reasons: CUDA is initialized" and spawns instead, which
re-imports torch and vLLM in the child: about 18 s more start-up per engine on the H200
(2026-11-30, ``docs/performance.md``). Our availability checks run in vLLM's front-end
process too (the plugin resolves the selection in every process), so they read the
capability from NVML, as vLLM's own platform code does, and use torch only where CUDA is
already initialised or NVML cannot answer.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

NVML_LIBRARY = "libnvidia-ml.so.1"


def open_nvml() -> ctypes.CDLL:
    """The NVML library (OSError where the driver does not ship it)."""
    return ctypes.CDLL(NVML_LIBRARY)


def nvml_capability(index: int = 0) -> tuple[int, int] | None:
    """(major, minor) of visible CUDA device ``index`` from NVML (``CUDA_VISIBLE_DEVICES``
    applied, UUIDs included, through torch's own NVML index mapping); None when NVML is absent
    or fails."""
    try:
        nvml = open_nvml()
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        physical = torch.cuda._get_nvml_device_index(index)  # no CUDA init for an int index
        handle = ctypes.c_void_p()
        if nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(physical), ctypes.byref(handle)):
            return None
        major, minor = ctypes.c_int(), ctypes.c_int()
        if nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major),
                                                   ctypes.byref(minor)):
            return None
        return major.value, minor.value
    except Exception:  # a private torch helper moved, or a device index NVML does not know
        return None
    finally:
        nvml.nvmlShutdown()


def device_capability(index: int = 0,
                      nvml: Callable[[int], tuple[int, int] | None] = nvml_capability,
                      ) -> tuple[int, int]:
    """(major, minor) of visible CUDA device ``index``: torch's answer where CUDA is already
    initialised, else NVML's, else torch's (which initialises CUDA: correct, only slower to
    start)."""
    if not torch.cuda.is_initialized():
        found = nvml(index)
        if found is not None:
            return found
    major, minor = torch.cuda.get_device_capability(index)
    return major, minor
