"""Timers for ``fl-dispatch bench``: CUDA-graph replay on a GPU, wall clock elsewhere; the
device's copy bandwidth (the reference for "% of copy") and its description."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

Timer = Callable[[Callable[[], object]], float]
"""Seconds per call of a function (median over repeats)."""

CPU_BUDGET_S = 1.0
"""On the host timer, stop repeating one measurement after this many seconds (3 calls min)."""


def host_timer(device: torch.device, repeats: int) -> Timer:
    """Median wall time per call (perf_counter), synchronizing ``device`` around each call."""
    from fl_dispatch.testing.inputs import synchronize

    def timer(fn: Callable[[], object]) -> float:
        fn()
        synchronize(device)
        times: list[float] = []
        deadline = time.perf_counter() + CPU_BUDGET_S
        while len(times) < repeats:
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
            if len(times) >= 3 and time.perf_counter() > deadline:
                break
        return statistics.median(times)

    return timer


def _torch_graph_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds per call: ``n`` calls captured in one CUDA graph, replayed ``repeats`` times
    between CUDA events, median."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the default stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    calls = max(1, min(1000, int(20.0 / estimate_ms)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times) / 1e3


def cuda_graph_timer(repeats: int) -> tuple[Timer, str]:
    """A timer under CUDA graph replay and its description."""
    try:
        from triton.testing import do_bench_cudagraph
    except ImportError:
        return (lambda fn: _torch_graph_time(fn, repeats),
                "CUDA graph replay (torch.cuda.CUDAGraph + events), median")

    def timer(fn: Callable[[], object]) -> float:
        # each call replays its graph 10 times; ceil(repeats / 10) calls, median of medians
        runs = [do_bench_cudagraph(fn, return_mode="median")
                for _ in range(max(1, math.ceil(repeats / 10)))]
        return statistics.median(runs) / 1e3

    return timer, "CUDA graph replay (triton.testing.do_bench_cudagraph), median"


def make_timer(device: torch.device, repeats: int) -> tuple[Timer, str]:
    """The timer for ``device`` and a description of it."""
    if device.type == "cuda":
        return cuda_graph_timer(repeats)
    return host_timer(device, repeats), "wall time per call (time.perf_counter), median"


def copy_bandwidth(device: torch.device, timer: Timer) -> tuple[float, int]:
    """Bytes per second of a device-to-device copy of a large buffer (read + write counted),
    and the buffer's size: the better of ``copy_`` (a memcpy) and an elementwise kernel
    (``mul(src, 1, out=dst)``), since on a GPU the memcpy path is not the fastest copy (on an
    H100: about 2.4 TB/s for the memcpy against 3.0 for a vectorized elementwise kernel)."""
    import torch

    size = (1 << 30) if device.type != "cpu" else (128 << 20)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        size = min(size, free // 4)
    src = torch.ones(size // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = min(timer(lambda: dst.copy_(src)), timer(lambda: torch.mul(src, 1, out=dst)))
    return 2 * src.numel() * 4 / seconds, src.numel() * 4


def device_info(device: torch.device) -> dict[str, Any]:
    """Name, type and (CUDA) L2 size of ``device``."""
    import platform

    import torch

    info: dict[str, Any] = {"type": device.type, "name": str(device), "l2_bytes": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["name"] = props.name
        info["l2_bytes"] = getattr(props, "L2_cache_size", None)
    elif device.type == "cpu":
        info["name"] = _cpu_name() or platform.processor() or platform.machine() or "cpu"
        info["threads"] = torch.get_num_threads()
    return info


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
