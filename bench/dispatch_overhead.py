#!/usr/bin/env python
"""Dispatch overhead on CPU: nanoseconds per call of the chosen function called directly vs
through the dispatch entry, after the first use has frozen the selection.

Cases (both through the process-global dispatcher, built from the environment as in vLLM):

* ``single``: one usable impl (``VLLM_FL_PER_OP=rms_norm=impl:bench.fast``), so the entry
  *is* the chosen function;
* ``fallback``: a fallback chain in non-strict mode
  (``rms_norm=impl:bench.fast|impl:bench.spare``), so the entry is the generated guard
  ``def rms_norm(...): try: return fn(...) except Exception: ...``;
* ``strict``: the same chain with ``VLLM_FL_STRICT=1`` (the entry is the function again).

Ways of calling: ``direct`` (the impl function itself), ``ops.rms_norm(...)`` (attribute lookup
on ``fl_dispatch.ops`` plus the call), ``get_op()`` held (the entry fetched once) and, where the
dispatcher has them, the call-site guard of the vLLM glue (``f = fl_dispatch.fast.rms_norm``,
``try: f(...) except Exception as e: recover(...)``, inline: no frame of its own). The impl
is a trivial Python function that returns its first argument, so no kernel time hides the
dispatch cost. Each figure is the median over ``--repeat`` rounds of ``--number`` calls; the
difference columns are medians of per-round differences (direct and dispatched timed in the
same round). Target from the design notes: <= 30 ns median difference.

``--recompute`` adds a simulated dispatcher that recomputes the candidates on every call
(``select_op`` with its capability checks, then the call): the trap of the previous FL
dispatch, which measured about 7.5 us per call.

``--lookup`` adds the cost of ``obj.f(...)`` on a plain module, a module with ``__getattr__`` and
an object whose class has ``__getattr__`` (CPython does not specialize the latter two).

Run: ``.venv/bin/python bench/dispatch_overhead.py [--recompute] [--lookup]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import timeit
import types
from collections.abc import Callable

import fl_dispatch
from fl_dispatch import hookimpl

OP = "rms_norm"
PLUGIN = "fl_bench_plugin"
TARGET_NS = 30.0


def fast(x, weight, epsilon, residual=None):
    """The chosen impl: trivial, so only the dispatch cost is measured."""
    return x


def spare(x, weight, epsilon, residual=None):
    """The fallback impl (never called: ``fast`` does not fail)."""
    return x


# call-site guards: ``f = fast.<op>; try: f(...) except Exception: recover(...)``; public
# names since the layered package, fl_dispatch.dispatch's before it (so this script also runs
# against an older tree: bench/dispatch_compare.py)
CALL_SITE: tuple[object, object] | None
try:
    from fl_dispatch import fast as _fast_ns
    from fl_dispatch import recover as _recover

    CALL_SITE = (_fast_ns, _recover)
except ImportError:
    try:
        from fl_dispatch.dispatch import fast as _fast_ns  # type: ignore[no-redef]
        from fl_dispatch.dispatch import recover as _recover  # type: ignore[no-redef]

        CALL_SITE = (_fast_ns, _recover)
    except ImportError:  # a dispatcher without them
        CALL_SITE = None
CALL_SITE_STMT = f"""\
f = fast_ns.{OP}
try:
    f(x, w, eps)
except Exception as exc:
    recover("{OP}", f, exc, (x, w, eps))"""


def install_plugin() -> None:
    """A backend module registering ``bench.fast`` and ``bench.spare`` for rms_norm, made
    importable under ``PLUGIN`` so ``VLLM_FL_PLUGIN_MODULES`` loads it the ordinary way."""
    module = types.ModuleType(PLUGIN)

    @hookimpl
    def fl_dispatch_register_impls(registrar):
        registrar.register(OP, fast, impl_id="bench.fast", kind="flagos")
        registrar.register(OP, spare, impl_id="bench.spare", kind="reference")

    module.fl_dispatch_register_impls = fl_dispatch_register_impls
    sys.modules[PLUGIN] = module


CASES: dict[str, dict[str, str]] = {
    "single": {"VLLM_FL_PER_OP": f"{OP}=impl:bench.fast"},
    "fallback": {"VLLM_FL_PER_OP": f"{OP}=impl:bench.fast|impl:bench.spare"},
    "strict": {"VLLM_FL_PER_OP": f"{OP}=impl:bench.fast|impl:bench.spare",
               "VLLM_FL_STRICT": "1"},
}


def configure(case: str) -> None:
    for var in [v for v in os.environ if v.startswith("VLLM_FL_")]:
        del os.environ[var]
    os.environ["VLLM_FL_PLUGIN_MODULES"] = PLUGIN
    os.environ["VLLM_FL_LOG_LEVEL"] = "WARNING"
    os.environ.update(CASES[case])
    fl_dispatch.reset()


def measure(stmts: dict[str, str], names: dict[str, object], number: int,
            repeat: int) -> dict[str, list[float]]:
    """ns per call for each statement, one list entry per round (rounds interleave the
    statements, so drift on a busy machine hits them alike)."""
    timers = {k: timeit.Timer(s, globals=names) for k, s in stmts.items()}
    for t in timers.values():  # warm up
        t.timeit(number // 10 or 1)
    rounds: dict[str, list[float]] = {k: [] for k in stmts}
    for _ in range(repeat):
        for key, timer in timers.items():
            rounds[key].append(timer.timeit(number) / number * 1e9)
    return rounds


def median_diff(a: list[float], b: list[float]) -> float:
    return statistics.median(y - x for x, y in zip(a, b))


def recompute_dispatcher(cache_checks: bool) -> Callable[..., object]:
    """A dispatcher that selects on every call (what the old FL dispatch did); with
    ``cache_checks`` the capability checks run once and only the ordering is recomputed."""
    try:
        from fl_dispatch.core.selection import select_op
    except ImportError:  # before the layered package
        from fl_dispatch.selection import select_op  # type: ignore[no-redef]

    dispatcher = fl_dispatch.get_dispatcher()
    policy, registry = dispatcher.policy, dispatcher.registry
    checked: dict[str, str | None] = {}

    def dispatch_every_call(*args):
        cache = checked if cache_checks else None
        return select_op(OP, policy, registry, checked=cache).chosen.fn(*args)

    return dispatch_every_call


def lookup_costs(number: int, repeat: int) -> dict[str, float]:
    """ns over a direct call for ``obj.f(...)`` on a plain module, a module with a PEP 562
    ``__getattr__`` and an instance of a class with ``__getattr__`` (specialization check)."""

    def missing(name):
        raise AttributeError(name)

    class WithGetattr:
        def __getattr__(self, name):
            raise AttributeError(name)

    plain, hooked, inst = types.ModuleType("plain"), types.ModuleType("hooked"), WithGetattr()
    plain.f = hooked.f = fast
    hooked.__getattr__ = missing
    inst.__dict__["f"] = fast
    names = {"fn": fast, "plain": plain, "hooked": hooked, "inst": inst, "x": 1, "w": 2,
             "eps": 3}
    r = measure({"direct": "fn(x, w, eps)", "module": "plain.f(x, w, eps)",
                 "module + __getattr__": "hooked.f(x, w, eps)",
                 "class with __getattr__": "inst.f(x, w, eps)"}, names, number, repeat)
    return {k: median_diff(r["direct"], v) for k, v in r.items() if k != "direct"}


def machine() -> list[str]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                         model)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"cpu: {model}; nproc: {usable} (os.cpu_count {os.cpu_count()})",
        f"python: {platform.python_implementation()} {platform.python_version()}; "
        f"{platform.system()} {platform.release()}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=500_000, help="calls per round")
    parser.add_argument("--repeat", type=int, default=9, help="rounds (median taken)")
    parser.add_argument("--recompute", action="store_true",
                        help="also time a simulated recompute-on-every-call dispatcher")
    parser.add_argument("--lookup", action="store_true",
                        help="also time attribute lookups on modules/objects with and "
                             "without __getattr__ (why ops.<op> costs what it costs)")
    args = parser.parse_args(argv)

    install_plugin()
    x, w, eps = object(), object(), 1e-6
    rows = []
    for case in CASES:
        configure(case)
        entry = fl_dispatch.get_op(OP)  # first use: selection made and frozen here
        kind = "the function itself" if entry is fast else f"generated guard {entry.__name__}()"
        names = {"fn": fast, "ops": fl_dispatch.ops, "entry": entry, "x": x, "w": w,
                 "eps": eps}
        stmts = {"direct": "fn(x, w, eps)", "attr": f"ops.{OP}(x, w, eps)",
                 "held": "entry(x, w, eps)"}
        if CALL_SITE is not None:  # the vLLM glue's pattern (fl_dispatch/vllm_glue/layers.py)
            names.update(fast_ns=CALL_SITE[0], recover=CALL_SITE[1])
            stmts["site"] = CALL_SITE_STMT
        r = measure(stmts, names, args.number, args.repeat)
        row = [case, kind, statistics.median(r["direct"])]
        for key in stmts:
            if key != "direct":
                row += [statistics.median(r[key]), median_diff(r["direct"], r[key])]
        rows.append(row)

    print("\n".join(machine()))
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"{args.repeat} rounds x {args.number} calls; trivial impl; ns per call (median)\n")
    head = f"| case | entry | direct ns | ops.{OP} ns | diff ns | get_op() held ns | diff ns |"
    if CALL_SITE is not None:
        head += f" fast.{OP} call-site guard ns | diff ns |"
    print(head)
    print("|---|---|" + "---:|" * (head.count("|") - 3))
    for case, kind, *nums in rows:
        cells = [f"{nums[0]:.1f}"] + [f"{v:.1f}" if i % 2 == 0 else f"{v:+.1f}"
                                      for i, v in enumerate(nums[1:])]
        print(f"| {case} | {kind} | " + " | ".join(cells) + " |")
    worst = max(max(r[4::2]) for r in rows)
    verdict = "met" if worst <= TARGET_NS else "NOT met"
    print(f"\ntarget: <= {TARGET_NS:.0f} ns median difference; worst here {worst:+.1f} ns: "
          f"{verdict}")

    if args.recompute:
        configure("fallback")
        number = max(args.number // 100, 1000)
        r = measure({"direct": "fn(x, w, eps)", "order": "order(x, w, eps)",
                     "checks": "checks(x, w, eps)"},
                    {"fn": fast, "order": recompute_dispatcher(True),
                     "checks": recompute_dispatcher(False), "x": x, "w": w, "eps": eps},
                    number, args.repeat)
        direct = statistics.median(r["direct"])
        n_impls = len(fl_dispatch.get_dispatcher().registry.impls[OP])
        print(f"\nsimulated recompute-candidates-on-every-call dispatcher (fallback case, "
              f"{n_impls} impls of {OP} registered, {number} calls/round; direct call "
              f"{direct:.1f} ns):")
        for key, what in (("order", "ordering only (capability checks cached)"),
                          ("checks", "ordering + capability checks every call")):
            ns = statistics.median(r[key])
            print(f"  {what}: {ns:.0f} ns per call = {ns / direct:.0f}x a direct call")
    if args.lookup:
        print("\nattribute lookup + call, ns over a direct call (median of paired rounds):")
        for what, ns in lookup_costs(args.number, args.repeat).items():
            print(f"  {what}: {ns:+.1f}")
    fl_dispatch.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
