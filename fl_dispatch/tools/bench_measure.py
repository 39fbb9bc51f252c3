"""Measuring for ``fl-dispatch bench``: every available impl of each op on the op's benchmark
cases, side by side in one run, and the ranking per op."""

from __future__ import annotations

import datetime as _dt
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .bench_timing import Timer, copy_bandwidth, device_info, make_timer

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from fl_dispatch.core.impl import Impl
    from fl_dispatch.core.registry import Registry
    from fl_dispatch.testing.inputs import Case, Dims


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
    tflops: float | None = None
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
    from fl_dispatch.testing.inputs import synchronize

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
    if case.flops:
        m.tflops = case.flops / seconds / 1e12
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
          repeats: int | None = None, progress: bool = True,
          time_limit_s: float | None = None) -> BenchResult:
    """Measure every available impl of ``ops`` (default: every op with an input generator) at
    each decode and prefill size. With ``time_limit_s``, no measurement starts after that
    many seconds: the rest are recorded as skipped (the ranking and the policy then rest on
    what was measured; the summary says so)."""
    repeats = repeats or (20 if device.type == "cpu" else 10)
    timer, timing = make_timer(device, repeats)
    result = BenchResult(device_info(device), dtype, asdict(dims), list(decode),
                         list(prefill), timing,
                         date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"))
    copy_bps, copy_size = copy_bandwidth(device, timer)
    result.device.update(copy_gbs=round(copy_bps / 1e9, 3), copy_buffer_bytes=copy_size)
    work: list[tuple[Case, Impl, str, int]] = []
    for op in ops if ops is not None else list(registry.ops):
        spec = registry.ops[op]
        if spec.checker is not None:  # a choice, not a kernel: nothing to time
            continue
        usable = []
        for impl in registry.impls.get(op, []):
            reason = impl.unavailable_reason()
            if reason is None:
                usable.append(impl)
            else:
                result.unavailable.append({"op": op, "impl": impl.impl_id, "reason": reason})
        if spec.bench_cases is None:
            if usable:
                result.no_input_generator.append(op)
            continue
        sizes = [("decode", t) for t in decode] + [("prefill", t) for t in prefill]
        for phase, tokens in sizes:
            for case in spec.bench_cases(tokens, dims, dtype):
                work += [(case, impl, phase, tokens) for impl in usable]
    l2 = result.device.get("l2_bytes") or 0
    bar = _progress(len(work), progress)
    lines = (progress and bar is None) or bool(getattr(bar, "disable", False))
    start = time.perf_counter()
    for i, (case, impl, phase, tokens) in enumerate(work):
        if bar is not None:
            bar.set_postfix_str(f"{case.label} T={tokens} {impl.impl_id}", refresh=False)
        elapsed = time.perf_counter() - start
        if time_limit_s is not None and i and elapsed > time_limit_s:
            m = Measurement(case.op, case.label, phase, tokens, impl.impl_id, impl.kind,
                            case.bytes_moved, status="skipped",
                            note=f"not run: --time-limit-s {time_limit_s:g} reached")
        elif phase == "prefill" and interpreted(impl, device):
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
        if lines:  # no terminal (a log file on a remote GPU): one flushed line per run
            timed = f"{m.us:.2f} us" if m.us else m.status
            print(f"bench [{i + 1}/{len(work)}] {elapsed:6.1f} s  {case.label} T={tokens} "
                  f"{impl.impl_id}: {timed}", file=sys.stderr, flush=True)
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
