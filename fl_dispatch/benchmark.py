"""``fl-dispatch bench``: time every available impl of every tensor op, side by side, in one run.

GPU (CUDA): time per call under CUDA graph replay (``triton.testing.do_bench_cudagraph``,
median; without Triton, torch.cuda graphs and events). CPU and other devices: wall time per
call with ``time.perf_counter`` after a device synchronize, median. Bandwidth is the op's
minimal bytes moved (:mod:`fl_dispatch.opinputs`) over the time, also as a percentage of a
device-to-device copy of a large buffer measured in the same run. Results go to a table, a JSON
file, a PNG chart, and (``--write-config``) a YAML policy ordering each op's impls by speed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported when the command runs, never at CLI start-up
    import torch

    from .impl import Impl
    from .opinputs import Case, Dims
    from .registry import Registry

Timer = Callable[[Callable[[], object]], float]
"""Seconds per call of a function (median over repeats)."""

CPU_BUDGET_S = 1.0
"""On the host timer, stop repeating one measurement after this many seconds (3 calls min)."""


@dataclass
class Measurement:
    """One impl at one size of one op case; ``status`` is ok, skipped or error."""

    op: str
    case: str
    phase: str
    tokens: int
    impl: str
    kind: str
    bytes: int
    status: str = "ok"
    us: float | None = None
    gbs: float | None = None
    pct_copy: float | None = None
    ratio_to_best_other: float | None = None
    note: str = ""


@dataclass
class BenchResult:
    """Everything one run measured, plus the ranking per op."""

    device: dict[str, Any]
    dtype: str
    dims: dict[str, int]
    decode: list[int]
    prefill: list[int]
    timing: str
    measurements: list[Measurement] = field(default_factory=list)
    ranking: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    excluded: dict[str, list[str]] = field(default_factory=dict)
    unavailable: list[dict[str, str]] = field(default_factory=list)
    no_input_generator: list[str] = field(default_factory=list)
    date: str = ""

    @property
    def fastest(self) -> dict[str, str]:
        return {op: ranked[0]["impl"] for op, ranked in self.ranking.items() if ranked}

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": "fl-dispatch-bench/1", "date": self.date, "device": self.device,
            "dtype": self.dtype, "dims": self.dims, "decode": self.decode,
            "prefill": self.prefill, "timing": self.timing,
            "results": [asdict(m) for m in self.measurements],
            "fastest": self.fastest, "ranking": self.ranking, "excluded": self.excluded,
            "unavailable": self.unavailable, "no_input_generator": self.no_input_generator,
        }


# --------------------------------------------------------------------------- timers
def host_timer(device: torch.device, repeats: int) -> Timer:
    """Median wall time per call (perf_counter), synchronizing ``device`` around each call."""
    from .opinputs import synchronize

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


# --------------------------------------------------------------------------- measuring
def interpreted(impl: Impl, device: torch.device) -> bool:
    """Whether ``impl`` runs here only through the Triton interpreter (CPU, TRITON_INTERPRET=1,
    a flagos impl or one whose module imports triton)."""
    if device.type != "cpu" or os.environ.get("TRITON_INTERPRET", "") not in ("1", "true"):
        return False
    if impl.kind == "flagos":
        return True
    module = sys.modules.get(getattr(impl.fn, "__module__", "") or "")
    return module is not None and ("triton" in vars(module) or "triton" in module.__name__)


def _nonfinite(inputs: dict[str, Any]) -> list[str]:
    import torch

    return [n for n, v in inputs.items() if isinstance(v, torch.Tensor)
            and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def measure(case: Case, impl: Impl, device: torch.device, timer: Timer,
            phase: str, tokens: int) -> Measurement:
    """Time ``impl`` on fresh inputs of ``case``; errors become a Measurement, not a raise."""
    m = Measurement(case.op, case.label, phase, tokens, impl.impl_id, impl.kind,
                    case.bytes_moved)
    from .opinputs import synchronize

    try:
        inputs = case.build(device)
        synchronize(device)  # timers may run on another stream than the one that built them
    except Exception as exc:
        m.status, m.note = "error", f"building inputs raised {type(exc).__name__}: {exc}"
        return m

    def call() -> object:
        return impl.fn(**inputs)

    try:
        seconds = timer(call)
    except Exception as exc:
        m.status = "error"
        m.note = f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return m
    m.us = seconds * 1e6
    m.gbs = case.bytes_moved / seconds / 1e9
    bad = _nonfinite(inputs)
    if bad:  # in-place ops replayed many times must stay finite, or the timing is suspect
        m.note = f"non-finite values in {', '.join(bad)} after timing"
    return m


def _rank(measurements: list[Measurement]) -> tuple[dict[str, list[dict[str, Any]]],
                                                     dict[str, list[str]]]:
    """Per op: impls by the geometric mean, over every size and case each was timed at, of
    its time over the best time there (1.0 = fastest everywhere). Impls that raised at any
    size are left out of the ranking (listed in the second result)."""
    best: dict[tuple[str, int], float] = {}
    for m in measurements:
        if m.status == "ok":
            key = (m.case, m.tokens)
            best[key] = min(best.get(key, math.inf), m.us or math.inf)
    ratios: dict[str, dict[str, list[float]]] = {}
    failed: dict[str, set[str]] = {}
    for m in measurements:
        if m.status == "error":
            failed.setdefault(m.op, set()).add(m.impl)
        elif m.status == "ok":
            ratios.setdefault(m.op, {}).setdefault(m.impl, []).append(
                m.us / best[(m.case, m.tokens)])
    ranking: dict[str, list[dict[str, Any]]] = {}
    for op, per_impl in ratios.items():
        scores = [(math.exp(statistics.fmean(map(math.log, r))), impl, len(r))
                  for impl, r in per_impl.items() if impl not in failed.get(op, ())]
        ranking[op] = [{"impl": impl, "score": round(score, 4), "points": n}
                       for score, impl, n in sorted(scores)]
    return ranking, {op: sorted(ids) for op, ids in failed.items()}


def _set_ratios(measurements: list[Measurement], copy_bps: float) -> None:
    groups: dict[tuple[str, int], list[Measurement]] = {}
    for m in measurements:
        if m.status == "ok":
            groups.setdefault((m.case, m.tokens), []).append(m)
    for group in groups.values():
        for m in group:
            m.pct_copy = 100.0 * (m.gbs or 0.0) * 1e9 / copy_bps
            others = [o.us for o in group if o is not m and o.us]
            m.ratio_to_best_other = (m.us / min(others)) if others and m.us else None


def bench(registry: Registry, device: torch.device, dtype: str, dims: Dims,
          decode: Sequence[int], prefill: Sequence[int], ops: Sequence[str] | None = None,
          repeats: int | None = None, progress: bool = True) -> BenchResult:
    """Measure every available impl of ``ops`` (default: every op with an input generator) at
    each decode and prefill size."""
    from .opinputs import GENERATORS, NON_TENSOR_OPS, bench_cases

    repeats = repeats or (20 if device.type == "cpu" else 10)
    timer, timing = make_timer(device, repeats)
    result = BenchResult(device_info(device), dtype, asdict(dims), list(decode),
                         list(prefill), timing,
                         date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"))
    copy_bps, copy_size = copy_bandwidth(device, timer)
    result.device.update(copy_gbs=round(copy_bps / 1e9, 3), copy_buffer_bytes=copy_size)
    work: list[tuple[Case, Impl, str, int]] = []
    for op in ops if ops is not None else list(registry.ops):
        if op in NON_TENSOR_OPS:
            continue
        usable = []
        for impl in registry.impls.get(op, []):
            reason = impl.unavailable_reason()
            if reason is None:
                usable.append(impl)
            else:
                result.unavailable.append({"op": op, "impl": impl.impl_id, "reason": reason})
        if op not in GENERATORS:
            if usable:
                result.no_input_generator.append(op)
            continue
        sizes = [("decode", t) for t in decode] + [("prefill", t) for t in prefill]
        for phase, tokens in sizes:
            for case in bench_cases(op, tokens, dims, dtype):
                work += [(case, impl, phase, tokens) for impl in usable]
    l2 = result.device.get("l2_bytes") or 0
    bar = _progress(len(work), progress)
    for case, impl, phase, tokens in work:
        if bar is not None:
            bar.set_postfix_str(f"{case.label} T={tokens} {impl.impl_id}", refresh=False)
        if phase == "prefill" and interpreted(impl, device):
            m = Measurement(case.op, case.label, phase, tokens, impl.impl_id, impl.kind,
                            case.bytes_moved, status="skipped",
                            note="skipped: Triton interpreter on CPU (too slow at prefill)")
        else:
            m = measure(case, impl, device, timer, phase, tokens)
            if m.status == "ok" and l2 and case.bytes_moved < l2 and not m.note:
                m.note = "fits in L2: bandwidth not meaningful"
        result.measurements.append(m)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    first = {c: i for i, c in enumerate(dict.fromkeys(m.case for m in result.measurements))}
    result.measurements.sort(key=lambda m: first[m.case])  # stable: sizes, impls in order
    _set_ratios(result.measurements, copy_bps)
    result.ranking, result.excluded = _rank(result.measurements)
    return result


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="bench", unit="run", file=sys.stderr, disable=None)


# --------------------------------------------------------------------------- output
def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(result: BenchResult) -> str:
    """The results, one line per impl and size, grouped by op case and size."""
    header = ("op", "tokens", "impl", "us", "GB/s", "% copy", "vs best other", "note")
    rows = []
    for m in result.measurements:
        ratio = "-" if m.ratio_to_best_other is None else f"{m.ratio_to_best_other:.3g}x"
        us = _num(m.us, ".2f") if m.status == "ok" else m.status.upper()
        rows.append((m.case, str(m.tokens), m.impl, us, _num(m.gbs, ".1f"),
                     _num(m.pct_copy, ".0f"), ratio, m.note))
    widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(len(header))]
    right = {1, 3, 4, 5, 6}

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [fmt(header)]
    previous = None
    for m, row in zip(result.measurements, rows):
        if previous is not None and m.case != previous:
            lines.append("")
        previous = m.case
        lines.append(fmt(row))
    return "\n".join(lines)


def summary_lines(result: BenchResult) -> list[str]:
    dev = result.device
    lines = [f"device: {dev['name']} ({dev['type']}), copy bandwidth {dev['copy_gbs']:.1f} GB/s "
             f"(copy of {dev['copy_buffer_bytes'] >> 20} MiB, read + write)",
             f"dtype {result.dtype}; timing: {result.timing}",
             "us: time per call; GB/s: minimal bytes moved / time; % copy: of the copy "
             "bandwidth; vs best other: time / best other impl's time (< 1: faster)"]
    return lines


def ranking_lines(result: BenchResult) -> list[str]:
    lines = ["fastest per op (geometric mean of time / best time over the sizes timed):"]
    for op, ranked in result.ranking.items():
        order = ", ".join(f"{r['impl']} ({r['score']:.2f})" for r in ranked)
        lines.append(f"  {op:<18} {order}")
    for op, ids in result.excluded.items():
        lines.append(f"  {op:<18} left out (raised): {', '.join(ids)}")
    for op in result.no_input_generator:
        lines.append(f"  {op:<18} not timed: no input generator")
    return lines


def write_png(result: BenchResult, path: str | Path) -> None:
    """Time per call and bandwidth against tokens, one column per op case, one line per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(m.case for m in result.measurements))
    fig, axes = plt.subplots(2, max(1, len(cases)), figsize=(4.2 * max(1, len(cases)), 7),
                             squeeze=False)
    copy_gbs = result.device.get("copy_gbs")
    for col, case in enumerate(cases):
        top, bottom = axes[0][col], axes[1][col]
        points = [m for m in result.measurements if m.case == case and m.status == "ok"]
        for impl in dict.fromkeys(m.impl for m in points):
            mine = sorted((m for m in points if m.impl == impl), key=lambda m: m.tokens)
            tokens = [m.tokens for m in mine]
            top.plot(tokens, [m.us for m in mine], marker="o", label=impl)
            bottom.plot(tokens, [m.gbs for m in mine], marker="o", label=impl)
        if copy_gbs:
            bottom.axhline(copy_gbs, color="grey", linestyle="--", label="device copy")
        top.set_title(case)
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
        top.set_yscale("log")
        top.set_ylabel("us per call")
        bottom.set_ylabel("GB/s")
        bottom.set_xlabel("tokens")
        bottom.legend(fontsize="small")
    fig.suptitle(f"fl-dispatch bench: {result.device['name']}, {result.dtype}, "
                 f"{result.date}")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def op_order(ranked: Sequence[Impl]) -> list[str]:
    """Policy tokens for impls in speed order: ``impl:<id>`` each, the reference kind last
    (as the ``reference`` token, the fallback of last resort)."""
    tokens = [f"impl:{i.impl_id}" for i in ranked]
    if ranked and ranked[-1].kind == "reference" and len(ranked) > 1:
        tokens[-1] = "reference"
    elif not any(i.kind == "reference" for i in ranked):
        tokens.append("reference")
    return tokens


def write_config(result: BenchResult, registry: Registry, path: str | Path,
                 platform: str | None) -> dict[str, list[str]]:
    """Write a YAML policy ordering each benchmarked op's impls by speed, then validate it as
    ``VLLM_FL_CONFIG``. The detected platform file's other keys are carried over (the file
    replaces the whole policy, so they would otherwise be lost). Returns the op orders."""
    import yaml

    from .config import platform_file, resolve_policy
    from .errors import ConfigError

    orders = {}
    for op, ranked in result.ranking.items():
        impls = [registry.impl(op, r["impl"]) for r in ranked]
        orders[op] = op_order([i for i in impls if i is not None])
    carried: dict[str, Any] = {}
    carried_from = None
    if platform is not None:
        carried_from = platform_file(platform)
        carried = yaml.safe_load(carried_from.read_text(encoding="utf-8")) or {}
    data = {k: v for k, v in carried.items() if k != "op_backends"}
    data["op_backends"] = {**(carried.get("op_backends") or {}), **orders}
    dev = result.device
    header = [
        "# fl-dispatch policy written by `fl-dispatch bench --write-config`:",
        "# each op's impls in order of measured speed (fastest first), reference last.",
        f"# device: {dev['name']} ({dev['type']}); dtype {result.dtype}; date {result.date}",
        f"# tokens: decode {result.decode}, prefill {result.prefill}; {result.timing}",
        "# use: VLLM_FL_CONFIG=<this file> (it replaces the whole policy; check it with",
        "#      `fl-dispatch check <this file>`)",
    ]
    if carried_from is not None:
        header.append(f"# other keys carried over from the platform file {carried_from}")
    text = "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False)
    Path(path).write_text(text, encoding="utf-8")
    policy = resolve_policy({"VLLM_FL_CONFIG": str(path)}, detect=lambda: None)
    problems = registry.policy_problems(policy)
    if problems:
        raise ConfigError(problems)
    return orders


# --------------------------------------------------------------------------- command
def _split(values: Sequence[str] | None) -> list[str]:
    return [v.strip() for item in values or () for v in item.split(",") if v.strip()]


def parse_sizes(text: str, flag: str) -> list[int]:
    """``"1,16,64"`` as positive ints; ValueError naming ``flag`` and the bad item."""
    sizes = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(f"{flag}: {item!r} is not a positive token count "
                             f"(expected a comma-separated list like 1,16,64)")
        sizes.append(value)
    return sizes


def _fail(message: str) -> int:
    print(f"fl-dispatch bench: {message}", file=sys.stderr)
    return 2


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark; exit 0, or 2 on misuse or an invalid written config."""
    from .config import resolve_policy
    from .discovery import load_plugins
    from .errors import ConfigError, suggestion
    from .opinputs import GENERATORS, Dims, parse_dtype, resolve_device

    try:
        dtype = parse_dtype(args.dtype)
        device = resolve_device(args.device)
        decode = parse_sizes(args.decode, "--decode")
        prefill = parse_sizes(args.prefill, "--prefill")
        dims = Dims(args.hidden, args.intermediate, args.heads, args.kv_heads, args.head_size)
        for name, value in asdict(dims).items():
            if value <= 0:
                raise ValueError(f"--{name.replace('_', '-')}: {value} must be positive")
        if dims.head_size % 2:
            raise ValueError(f"--head-size: {dims.head_size} must be even (rotary pairs)")
        if args.repeats is not None and args.repeats <= 0:
            raise ValueError(f"--repeats: {args.repeats} must be positive")
    except ValueError as exc:
        return _fail(str(exc))
    if not decode and not prefill:
        return _fail("nothing to time: --decode and --prefill are both empty")
    policy = resolve_policy()
    plugins = load_plugins(policy.plugin_modules.value)
    registry = plugins.registry
    for record in plugins.errors:
        print(f"fl-dispatch bench: plugin {record.name!r} failed to load ({record.source}): "
              f"{record.error}", file=sys.stderr)
    ops = _split(args.op) or None
    for op in ops or ():
        if op not in registry.ops:
            return _fail(f"unknown op {op!r}; {suggestion(op, registry.ops)}")
    if ops is None:
        ops = [op for op in registry.ops if op in GENERATORS] + [
            op for op in registry.ops if op not in GENERATORS]
    result = bench(registry, device, dtype, dims, decode, prefill, ops, args.repeats)
    print("\n".join(summary_lines(result)))
    print()
    print(format_table(result))
    print()
    print("\n".join(ranking_lines(result)))
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=2) + "\n",
                                   encoding="utf-8")
        print(f"wrote {args.json}")
    if args.png:
        write_png(result, args.png)
        print(f"wrote {args.png}")
    if args.write_config:
        try:
            write_config(result, registry, args.write_config, policy.platform.value)
        except ConfigError as exc:
            return _fail(f"the written config {args.write_config} is not valid: {exc}")
        print(f"wrote {args.write_config} (valid as VLLM_FL_CONFIG)")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``bench`` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser(
        "bench", help="time every available impl of each op, side by side",
        description="Time every available impl of each tensor op at decode and prefill sizes "
                    "on this device (CUDA graph replay on a GPU), with bandwidth against the "
                    "device's copy bandwidth; write a table, JSON, a PNG chart and a policy.")
    p.add_argument("--op", action="append", metavar="OP",
                   help="only this op (repeat or comma-separate for several)")
    p.add_argument("--device", help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--dtype", default="bf16", help="fp32, fp16 or bf16 (default: bf16)")
    p.add_argument("--decode", default="1,16,64,256", metavar="T,T,...",
                   help="decode token counts (default: 1,16,64,256)")
    p.add_argument("--prefill", default="4096,16384", metavar="T,T,...",
                   help="prefill token counts (default: 4096,16384; '' for none)")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size (rms_norm)")
    p.add_argument("--intermediate", type=int, default=14336,
                   help="MLP intermediate size (silu/gelu_and_mul output width)")
    p.add_argument("--heads", type=int, default=32, help="query heads (rotary)")
    p.add_argument("--kv-heads", type=int, default=8, help="key heads (rotary)")
    p.add_argument("--head-size", type=int, default=128, help="head size (rotary, full)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per measurement (default: 20 on CPU, within ~1 s; "
                        "10 graph replays on CUDA)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--png", metavar="FILE", help="write a chart (PNG)")
    p.add_argument("--write-config", metavar="FILE",
                   help="write a YAML policy (VLLM_FL_CONFIG) ordering impls by speed")
    p.set_defaults(func=cmd_bench)
