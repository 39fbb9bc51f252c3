"""The cuda backend reads the device's capability without initialising CUDA (vLLM forks its
engine only while CUDA is uninitialised in the front end; otherwise it spawns, about 18 s more
start-up per engine on the H200), and the whole plugin registers on a GPU machine without
initialising CUDA."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from fl_dispatch_cuda import device


class FakeNVML:
    """``libnvidia-ml.so.1`` through ctypes: two devices, SM 9.0 and SM 8.0."""

    CAPS = {0: (9, 0), 1: (8, 0)}

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def nvmlInit_v2(self) -> int:
        self.calls.append(("init",))
        return 0

    def nvmlShutdown(self) -> int:
        self.calls.append(("shutdown",))
        return 0

    def nvmlDeviceGetHandleByIndex_v2(self, index, handle_ref) -> int:
        self.calls.append(("handle", index.value))
        if index.value not in self.CAPS:
            return 2  # NVML_ERROR_INVALID_ARGUMENT
        handle_ref._obj.value = 100 + index.value
        return 0

    def nvmlDeviceGetCudaComputeCapability(self, handle, major_ref, minor_ref) -> int:
        major_ref._obj.value, minor_ref._obj.value = self.CAPS[handle.value - 100]
        return 0


@pytest.fixture
def fake_nvml(monkeypatch):
    nvml = FakeNVML()
    monkeypatch.setattr(device, "open_nvml", lambda: nvml)
    return nvml


@pytest.mark.parametrize("visible, expected", [(None, (9, 0)), ("1", (8, 0)), ("1,0", (8, 0)),
                                               ("0,1", (9, 0))])
def test_nvml_capability_follows_cuda_visible_devices(fake_nvml, monkeypatch, visible,
                                                      expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert device.nvml_capability(0) == expected
    assert fake_nvml.calls[0] == ("init",) and fake_nvml.calls[-1] == ("shutdown",)
    assert not torch.cuda.is_initialized()


def test_nvml_capability_is_none_when_nvml_fails(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert device.nvml_capability(5) is None  # not visible: torch's mapping raises
    monkeypatch.setattr(device, "open_nvml", lambda: ctypes.CDLL("libno-such-nvml.so.1"))
    assert device.nvml_capability(0) is None  # no NVML library at all


def test_device_capability_prefers_nvml_until_cuda_is_initialised(monkeypatch):
    asked = []

    def torch_capability(index=0):
        asked.append(index)
        return (8, 6)

    monkeypatch.setattr(torch.cuda, "get_device_capability", torch_capability)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert device.device_capability(0, nvml=lambda i: (9, 0)) == (9, 0)
    assert asked == []  # torch (which would initialise CUDA) not asked
    assert device.device_capability(0, nvml=lambda i: None) == (8, 6)  # NVML cannot answer
    assert asked == [0]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert device.device_capability(1, nvml=lambda i: pytest.fail("NVML asked")) == (8, 6)
    assert asked == [0, 1]


@pytest.mark.vllm
@pytest.mark.parametrize("prefer", ["flagos", "vendor", "reference"])
def test_registering_the_plugin_on_a_gpu_machine_does_not_initialise_cuda(prefer):
    """The front-end process of vLLM runs ``register()`` (the selection, every impl's check):
    on a GPU machine (faked: CUDA available, NVML says SM 9.0) nothing may initialise CUDA."""
    code = textwrap.dedent("""
        import traceback, torch
        import fl_dispatch_cuda.device as dev
        class NVML:
            def __getattr__(self, name):
                def call(*args):
                    if name == "nvmlDeviceGetCudaComputeCapability":
                        args[1]._obj.value, args[2]._obj.value = 9, 0
                    return 0
                return call
        dev.open_nvml = NVML
        inits = []
        def lazy_init():
            inits.append("".join(traceback.format_stack(limit=8)))
            raise RuntimeError("CUDA initialised")
        torch.cuda.is_available = lambda: True
        torch.cuda.device_count = lambda: 1
        torch.cuda._lazy_init = lazy_init
        from fl_dispatch.vllm_glue import plugin
        plugin.register()
        print("INITS", len(inits))
        print("\\n".join(inits))
    """)
    env = {**os.environ, "VLLM_FL_PLATFORM": "cuda", "VLLM_FL_PREFER": prefer}
    env.pop("VLLM_FL_CONFIG", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "INITS 0" in proc.stdout, proc.stdout[-3000:]
