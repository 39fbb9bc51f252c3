"""Selection order with reasons, frozen entries, fallback, strict mode, threads, fork, debug.

Most tests build ``Dispatcher(policy, PluginSet([...]))`` from hand-made candidates, so only the
impls named here exist; tests of the process-global dispatcher pin their op order with
``VLLM_FL_PER_OP`` and call ``fl_dispatch.reset()`` before and after.
"""

from __future__ import annotations

import atexit
import inspect
import json
import os
import threading
import time
from collections.abc import Callable

import pytest

import fl_dispatch
from fl_dispatch import hookimpl
from fl_dispatch.core import dispatch as dispatch_mod
from fl_dispatch.core.config import resolve_policy
from fl_dispatch.core.discovery import Candidate, PluginSet
from fl_dispatch.core.dispatch import Dispatcher
from fl_dispatch.core.errors import NoImplementationError
from fl_dispatch.core.ops import BUILTIN_OPS


# --------------------------------------------------------------------------- helpers
class Kernel:
    """An rms_norm impl that records its calls and may fail (or run ``hook`` first)."""

    def __init__(self, tag: str, fail: Exception | None = None,
                 hook: Callable[[], None] | None = None):
        self.tag, self.fail, self.hook = tag, fail, hook
        self.calls = 0

        def rms_norm(x, weight, epsilon, residual=None):
            self.calls += 1
            if self.hook is not None:
                self.hook()
            if self.fail is not None:
                raise self.fail
            return (self.tag, x, weight, epsilon, residual)

        self.fn = rms_norm


def silu(tag: str):
    def silu_and_mul(x, out=None):
        return (tag, x)
    return silu_and_mul


def plugins(*regs: tuple[str, Callable, dict]) -> PluginSet:
    """One plugin registering ``(op, fn, kwargs)`` for each item."""

    class Plugin:
        @hookimpl
        def fl_dispatch_register_impls(self, registrar):
            for op, fn, kwargs in regs:
                registrar.register(op, fn, **kwargs)

    plugin_set = PluginSet([Candidate("test", "test plugin", lambda: Plugin())])
    assert plugin_set.errors == [], plugin_set.errors[0].traceback
    return plugin_set


def policy(**env: str):
    return resolve_policy(env=env, detect=lambda: None)


def rms(fn, impl_id: str, kind: str, **kwargs) -> tuple[str, Callable, dict]:
    if kind == "vendor":
        kwargs.setdefault("vendor", impl_id.split(".")[1])
    return ("rms_norm", fn, dict(impl_id=impl_id, kind=kind, **kwargs))


def standard(**env: str) -> Dispatcher:
    """flagos (150), two vendors (zeta 120, acme 100) and reference (50) for rms_norm, and a
    flagos + reference silu_and_mul."""
    regs = [
        rms(Kernel("ref").fn, "reference.torch", "reference"),
        rms(Kernel("acme").fn, "vendor.acme", "vendor"),
        rms(Kernel("flagos").fn, "default.flagos", "flagos"),
        rms(Kernel("zeta").fn, "vendor.zeta", "vendor", priority=120),
        ("silu_and_mul", silu("flagos"), dict(impl_id="default.flagos", kind="flagos")),
        ("silu_and_mul", silu("ref"), dict(impl_id="reference.torch", kind="reference")),
    ]
    return Dispatcher(policy(**env), plugins(*regs))


def order(d: Dispatcher, op: str = "rms_norm") -> list[str]:
    return [c.impl.impl_id for c in d.selection(op).candidates]


def usable(d: Dispatcher, op: str = "rms_norm") -> list[str]:
    return [i.impl_id for i in d.selection(op).usable]


def reasons(d: Dispatcher, op: str = "rms_norm") -> dict[str, str | None]:
    return {c["impl_id"]: c["reason"] for c in d.selection(op).as_dict()["candidates"]}


def messages(records, level: str | None = None) -> list[str]:
    return [r.getMessage() for r in records if level is None or r.levelname == level]


@pytest.fixture
def global_dispatch(test_plugins, monkeypatch):
    """The process-global dispatcher, fresh before and after the test."""
    fl_dispatch.reset()
    yield monkeypatch
    fl_dispatch.reset()


X, W, EPS = object(), object(), 1e-6


# --------------------------------------------------------------------------- selection order
def test_default_prefer_flagos_then_kinds_by_priority():
    d = standard()
    assert order(d) == ["default.flagos", "vendor.zeta", "vendor.acme", "reference.torch"]
    sel = d.selection("rms_norm")
    assert sel.chosen.impl_id == "default.flagos"
    assert sel.order_source == "prefer=flagos (default), then priority"
    r = reasons(d)
    assert r["default.flagos"] is None
    assert all(r[i] == "fallback: tried if 'default.flagos' fails"
               for i in ("vendor.zeta", "vendor.acme", "reference.torch"))


@pytest.mark.parametrize("prefer, expected", [
    ("vendor", ["vendor.zeta", "vendor.acme", "default.flagos", "reference.torch"]),
    ("reference", ["reference.torch", "default.flagos", "vendor.zeta", "vendor.acme"]),
    ("flagos", ["default.flagos", "vendor.zeta", "vendor.acme", "reference.torch"]),
])
def test_prefer_orders_kinds_but_excludes_nothing(prefer, expected):
    d = standard(VLLM_FL_PREFER=prefer)
    assert order(d) == expected == usable(d)
    assert d.selection("rms_norm").order_source == (
        f"prefer={prefer} (env:VLLM_FL_PREFER), then priority")


def test_priority_orders_within_a_kind_and_ties_break_by_impl_id():
    regs = [
        rms(Kernel("b").fn, "vendor.bbb", "vendor"),
        rms(Kernel("a").fn, "vendor.aaa", "vendor"),
        rms(Kernel("c").fn, "vendor.ccc", "vendor", priority=110),
        rms(Kernel("f1").fn, "default.flagos", "flagos"),
        rms(Kernel("f2").fn, "fast.flagos", "flagos", priority=160),
    ]
    d = Dispatcher(policy(VLLM_FL_PREFER="vendor"), plugins(*regs))
    assert order(d) == ["vendor.ccc", "vendor.aaa", "vendor.bbb", "fast.flagos",
                        "default.flagos"]


def test_unavailable_impls_are_listed_last_with_the_reason():
    regs = [
        rms(Kernel("ref").fn, "reference.torch", "reference"),
        rms(Kernel("cuda").fn, "vendor.cuda", "vendor", check=lambda: "no CUDA device"),
        rms(Kernel("flagos").fn, "default.flagos", "flagos"),
    ]
    d = Dispatcher(policy(VLLM_FL_PREFER="vendor"), plugins(*regs))
    assert order(d) == ["default.flagos", "reference.torch", "vendor.cuda"]
    cands = {c["impl_id"]: c for c in d.selection("rms_norm").as_dict()["candidates"]}
    assert cands["vendor.cuda"]["available"] is False
    assert cands["vendor.cuda"]["reason"] == "unavailable: no CUDA device"
    assert cands["default.flagos"]["available"] is True


@pytest.mark.parametrize("per_op, expected", [
    ("rms_norm=vendor:acme|reference", ["vendor.acme", "reference.torch"]),
    ("rms_norm=reference|vendor", ["reference.torch", "vendor.zeta", "vendor.acme"]),
    ("rms_norm=vendor|vendor:acme|flagos", ["vendor.zeta", "vendor.acme", "default.flagos"]),
    ("rms_norm=impl:vendor.acme", ["vendor.acme"]),
    ("rms_norm=impl:reference.torch|impl:vendor.zeta", ["reference.torch", "vendor.zeta"]),
])
def test_per_op_tokens_only_listed_are_tried(per_op, expected):
    d = standard(VLLM_FL_PER_OP=per_op)
    assert usable(d) == expected
    assert order(d)[:len(expected)] == expected
    listed = per_op.split("=", 1)[1]
    for impl_id, reason in reasons(d).items():
        if impl_id not in expected:
            assert reason == f"not in the op's order {listed!r} (env:VLLM_FL_PER_OP)"
    assert d.selection("rms_norm").order_source == "op_backends (env:VLLM_FL_PER_OP)"
    # ops without an explicit order still follow prefer
    assert usable(d, "silu_and_mul") == ["default.flagos", "reference.torch"]


def test_allow_vendors():
    d = standard(VLLM_FL_ALLOW_VENDORS="acme")
    assert usable(d) == ["default.flagos", "vendor.acme", "reference.torch"]
    assert reasons(d)["vendor.zeta"] == (
        "vendor 'zeta' not in allow_vendors (env:VLLM_FL_ALLOW_VENDORS)")


def test_deny_vendors_also_beats_an_explicit_op_order():
    d = standard(VLLM_FL_DENY_VENDORS="zeta", VLLM_FL_PER_OP="rms_norm=vendor:zeta|reference")
    assert usable(d) == ["reference.torch"]
    assert reasons(d)["vendor.zeta"] == (
        "vendor 'zeta' denied by deny_vendors (env:VLLM_FL_DENY_VENDORS)")


def test_flagos_blacklist_drops_only_that_ops_flagos_impl():
    d = standard(VLLM_FL_FLAGOS_BLACKLIST="rms_norm,mm")
    assert "default.flagos" not in usable(d)
    assert reasons(d)["default.flagos"] == (
        "op 'rms_norm' blacklisted by flagos_blacklist (env:VLLM_FL_FLAGOS_BLACKLIST)")
    assert usable(d, "silu_and_mul")[0] == "default.flagos"


def test_flagos_whitelist():
    d = standard(VLLM_FL_FLAGOS_WHITELIST="silu_and_mul")
    assert reasons(d)["default.flagos"] == (
        "op 'rms_norm' not in flagos_whitelist (env:VLLM_FL_FLAGOS_WHITELIST)")
    assert usable(d, "silu_and_mul")[0] == "default.flagos"


def test_flagos_whitelist_beats_the_platform_blacklist(monkeypatch, tmp_path):
    from fl_dispatch.core import config

    plat = tmp_path / "plat.yaml"
    plat.write_text("flagos_blacklist: [rms_norm]\n")
    monkeypatch.setattr(config, "platform_file", lambda name: plat)
    assert "default.flagos" not in usable(standard(VLLM_FL_PLATFORM="cuda"))
    d = standard(VLLM_FL_PLATFORM="cuda", VLLM_FL_FLAGOS_WHITELIST="rms_norm")
    assert usable(d)[0] == "default.flagos"


def test_explain_dict_reason_is_null_only_for_the_chosen():
    d = standard(VLLM_FL_DENY_VENDORS="acme")
    data = d.selection("rms_norm").as_dict()
    assert data["selected"] == "default.flagos"
    nulls = [c["impl_id"] for c in data["candidates"] if c["reason"] is None]
    assert nulls == ["default.flagos"]
    assert [c["impl_id"] for c in data["candidates"]] == [
        "default.flagos", "vendor.zeta", "reference.torch", "vendor.acme"]


def test_capability_checks_run_once():
    runs = []

    def check():
        runs.append(1)
        return None

    regs = [rms(Kernel("a").fn, "vendor.acme", "vendor", check=check),
            ("silu_and_mul", silu("a"), dict(impl_id="vendor.acme", kind="vendor",
                                              vendor="acme", check=check))]
    d = Dispatcher(policy(), plugins(*regs))
    for _ in range(3):
        d.entry("rms_norm")
        d.selection("rms_norm")
    # the check is per impl object; the cache is keyed by impl_id (one run per id)
    assert len(runs) == 1  # checks are pure: one run per (op, impl) and process
    d.entry("silu_and_mul")
    assert len(runs) == 2  # the same impl id of another op is checked on its own


def test_capability_of_one_op_does_not_decide_for_another_op_with_the_same_impl_id():
    """Regression: the cache was keyed by impl_id alone, so the first op checked decided for
    every op (``explain --op attention_backend`` and ``explain`` disagreed under
    TRITON_INTERPRET=1: flagos' attention choice needs a GPU, its kernels only Triton)."""
    regs = [rms(Kernel("a").fn, "vendor.acme", "vendor", check=lambda: None),
            ("silu_and_mul", silu("a"), dict(impl_id="vendor.acme", kind="vendor",
                                              vendor="acme", check=lambda: "needs a GPU"))]
    d = Dispatcher(policy(), plugins(*regs))
    assert d.selection("rms_norm").chosen.impl_id == "vendor.acme"
    acme = next(c for c in d.selection("silu_and_mul").candidates
                if c.impl.impl_id == "vendor.acme")
    assert not acme.available and "needs a GPU" in acme.excluded


# --------------------------------------------------------------------------- frozen entries
def test_single_usable_impl_entry_is_the_function():
    ref = Kernel("ref")
    regs = [rms(ref.fn, "reference.torch", "reference"),
            rms(Kernel("cuda").fn, "vendor.cuda", "vendor", check=lambda: "no device")]
    d = Dispatcher(policy(), plugins(*regs))
    entry = d.entry("rms_norm")
    assert entry is ref.fn
    assert d.entry("rms_norm") is entry
    assert entry(X, W, EPS) == ("ref", X, W, EPS, None)


def test_strict_mode_entry_is_the_chosen_function():
    flagos = Kernel("flagos")
    regs = [rms(Kernel("ref").fn, "reference.torch", "reference"),
            rms(flagos.fn, "default.flagos", "flagos")]
    d = Dispatcher(policy(VLLM_FL_STRICT="1"), plugins(*regs))
    assert d.entry("rms_norm") is flagos.fn


def test_fallback_entry_has_the_ops_signature():
    regs = [rms(Kernel("ref").fn, "reference.torch", "reference"),
            rms(Kernel("flagos").fn, "default.flagos", "flagos")]
    d = Dispatcher(policy(), plugins(*regs))
    entry = d.entry("rms_norm")
    spec = {op.name: op for op in BUILTIN_OPS}["rms_norm"]
    assert entry.__name__ == "rms_norm"
    assert entry.__doc__ == spec.doc
    got = [(p.name, p.kind, p.default) for p in inspect.signature(entry).parameters.values()]
    want = [(p.name, p.kind, p.default) for p in spec.signature.parameters.values()]
    assert got == want
    assert d.entry("rms_norm") is entry
    # defaults and keywords reach the impl unchanged
    assert entry(X, W, EPS) == ("flagos", X, W, EPS, None)
    assert entry(X, weight=W, epsilon=EPS, residual=7) == ("flagos", X, W, EPS, 7)


def test_no_usable_impl():
    regs = [rms(Kernel("cuda").fn, "vendor.cuda", "vendor", check=lambda: "no device")]
    d = Dispatcher(policy(), plugins(*regs))
    with pytest.raises(NoImplementationError, match="vendor.cuda: unavailable: no device"):
        d.entry("rms_norm")(X, W, EPS)
    with pytest.raises(NoImplementationError, match="none registered"):
        d.entry("gelu_and_mul")(X)
    with pytest.raises(KeyError, match="rms_nrm"):
        d.entry("rms_nrm")


# --------------------------------------------------------------------------- fallback
def test_fallback_logs_once_demotes_and_sticks(fl_log):
    broken = Kernel("flagos", fail=RuntimeError("kaboom: bad shape"))
    ref = Kernel("ref")
    regs = [rms(ref.fn, "reference.torch", "reference"),
            rms(broken.fn, "default.flagos", "flagos")]
    d = Dispatcher(policy(), plugins(*regs))
    entry = d.entry("rms_norm")  # held before the failure

    assert entry(X, W, EPS, residual=5) == ("ref", X, W, EPS, 5)  # result comes from Z
    assert (broken.calls, ref.calls) == (1, 1)
    failed = [m for m in messages(fl_log, "WARNING") if "failed for op" in m]
    assert failed == ["Implementation 'default.flagos' failed for op 'rms_norm': "
                      "RuntimeError: kaboom: bad shape"]
    assert len(messages(fl_log, "WARNING")) == 1  # one WARNING per failure, with the cause
    fallback = [m for m in messages(fl_log, "INFO") if "fallback to" in m]
    assert fallback == ["Op 'rms_norm' fallback to 'reference.torch' "
                        "(kind=reference, vendor=None)"]
    assert d.demoted() == {"rms_norm": ["default.flagos"]}

    count = len(fl_log)
    for _ in range(5):
        assert entry(X, W, EPS) == ("ref", X, W, EPS, None)
        assert d.entry("rms_norm")(X, W, EPS)[0] == "ref"
    assert broken.calls == 1  # X is never called again
    assert ref.calls == 11
    assert len(fl_log) == count  # and nothing more is logged


def test_fallback_through_several_failures():
    a = Kernel("a", fail=ValueError("a broke"))
    b = Kernel("b", fail=TypeError("b broke"))
    c = Kernel("c")
    regs = [rms(a.fn, "first.flagos", "flagos"), rms(b.fn, "vendor.bee", "vendor"),
            rms(c.fn, "reference.torch", "reference")]
    d = Dispatcher(policy(), plugins(*regs))
    assert d.entry("rms_norm")(X, W, EPS)[0] == "c"
    assert d.demoted() == {"rms_norm": ["first.flagos", "vendor.bee"]}
    assert d.entry("rms_norm")(X, W, EPS)[0] == "c"
    assert (a.calls, b.calls, c.calls) == (1, 1, 2)


def test_when_every_impl_fails_the_last_error_propagates():
    a = Kernel("a", fail=ValueError("a broke"))
    b = Kernel("b", fail=TypeError("b broke"))
    regs = [rms(a.fn, "first.flagos", "flagos"), rms(b.fn, "reference.torch", "reference")]
    d = Dispatcher(policy(), plugins(*regs))
    with pytest.raises(TypeError, match="b broke"):
        d.entry("rms_norm")(X, W, EPS)


def test_calls_after_every_impl_failed_raise_a_meaningful_error():
    a = Kernel("a", fail=ValueError("a broke"))
    b = Kernel("b", fail=TypeError("b broke"))
    regs = [rms(a.fn, "first.flagos", "flagos"), rms(b.fn, "reference.torch", "reference")]
    d = Dispatcher(policy(), plugins(*regs))
    with pytest.raises(TypeError):
        d.entry("rms_norm")(X, W, EPS)
    with pytest.raises((TypeError, NoImplementationError)):
        d.entry("rms_norm")(X, W, EPS)


def test_strict_mode_propagates_and_does_not_demote(fl_log):
    broken = Kernel("flagos", fail=RuntimeError("kaboom"))
    ref = Kernel("ref")
    regs = [rms(ref.fn, "reference.torch", "reference"),
            rms(broken.fn, "default.flagos", "flagos")]
    d = Dispatcher(policy(VLLM_FL_STRICT="1"), plugins(*regs))
    for n in (1, 2):
        with pytest.raises(RuntimeError, match="kaboom"):
            d.entry("rms_norm")(X, W, EPS)
        assert broken.calls == n
    assert ref.calls == 0
    assert d.demoted() == {}
    assert not [m for m in messages(fl_log) if "fallback" in m or "failed for op" in m]


def test_fallback_with_debug_counting(fl_log):
    broken = Kernel("flagos", fail=RuntimeError("kaboom"))
    ref = Kernel("ref")
    regs = [rms(ref.fn, "reference.torch", "reference"),
            rms(broken.fn, "default.flagos", "flagos")]
    d = Dispatcher(policy(VLLM_FL_DISPATCH_DEBUG="1"), plugins(*regs))
    atexit.unregister(d.log_counts)
    entry = d.entry("rms_norm")
    assert [entry(X, W, EPS)[0] for _ in range(3)] == ["ref"] * 3
    assert broken.calls == 1 and d.counts["rms_norm"] == 3


# --------------------------------------------------------------------------- threads
def test_thread_safe_first_use(monkeypatch):
    selections = []
    real_select = dispatch_mod.select_op

    def counting_select(*args, **kwargs):
        selections.append(args[0])
        time.sleep(0.02)  # widen the window in which a racing thread could select again
        return real_select(*args, **kwargs)

    monkeypatch.setattr(dispatch_mod, "select_op", counting_select)
    regs = [rms(Kernel("ref").fn, "reference.torch", "reference"),
            rms(Kernel("flagos").fn, "default.flagos", "flagos")]
    d = Dispatcher(policy(), plugins(*regs))
    start = threading.Barrier(16)
    entries, results = [], []

    def worker():
        start.wait()
        entry = d.entry("rms_norm")
        entries.append(entry)
        results.append(entry(X, W, EPS)[0])

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert selections == ["rms_norm"]
    assert len(entries) == 16 and all(e is entries[0] for e in entries)
    assert results == ["flagos"] * 16


def test_thread_safe_first_use_of_the_global(global_dispatch):
    import fl_test_flaky

    global_dispatch.setenv("VLLM_FL_PLUGIN_MODULES", "fl_test_flaky")
    global_dispatch.setenv("VLLM_FL_PER_OP", "rms_norm=impl:flaky.flagos|reference")
    before = fl_test_flaky.COUNTS["register"]
    start = threading.Barrier(12)
    entries = []

    def worker():
        start.wait()
        entries.append(fl_dispatch.get_op("rms_norm"))

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fl_test_flaky.COUNTS["register"] == before + 1  # one dispatcher, one plugin load
    assert all(e is entries[0] for e in entries)


def test_concurrent_first_failures_demote_only_the_failing_impl():
    inside = threading.Barrier(2, timeout=10)
    x = Kernel("x", fail=RuntimeError("x broke"), hook=inside.wait)
    z, last = Kernel("z"), Kernel("last")
    regs = [rms(x.fn, "default.flagos", "flagos"), rms(z.fn, "vendor.zed", "vendor"),
            rms(last.fn, "reference.torch", "reference")]
    d = Dispatcher(policy(), plugins(*regs))
    entry = d.entry("rms_norm")
    results: list[object] = []

    def worker():
        try:
            results.append(entry(X, W, EPS)[0])
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert x.calls == 2
    assert results == ["z", "z"]
    assert d.demoted() == {"rms_norm": ["default.flagos"]}


# --------------------------------------------------------------------------- global namespace
def test_ops_namespace_binds_the_entry(global_dispatch):
    import fl_test_good

    global_dispatch.setenv("VLLM_FL_PLUGIN_MODULES", "fl_test_good")
    global_dispatch.setenv("VLLM_FL_PER_OP", "rms_norm=vendor:acme;silu_and_mul=vendor:acme")
    assert "rms_norm" not in vars(fl_dispatch.ops)  # nothing bound before the first use
    entry = fl_dispatch.ops.rms_norm
    assert vars(fl_dispatch.ops)["rms_norm"] is entry  # later lookups: one attribute read
    assert entry is fl_test_good.rms_norm  # single usable impl: the function itself
    assert fl_dispatch.get_op("rms_norm") is entry
    assert fl_dispatch.ops.silu_and_mul("x") == ("acme", "x")
    assert "rotary_embedding" in dir(fl_dispatch.ops)
    with pytest.raises(AttributeError, match="rms_nrm"):
        fl_dispatch.ops.rms_nrm  # noqa: B018
    fl_dispatch.reset()
    assert not {"rms_norm", "silu_and_mul"} & set(vars(fl_dispatch.ops))  # reset unbinds ops
    assert dispatch_mod._dispatcher is None


# --------------------------------------------------------------------------- fork
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_child_starts_clean_after_fork(global_dispatch):
    import fl_test_flaky

    global_dispatch.setenv("VLLM_FL_PLUGIN_MODULES", "fl_test_flaky,fl_test_good")
    global_dispatch.setenv("VLLM_FL_PER_OP", "rms_norm=impl:flaky.flagos|vendor:acme")
    assert fl_dispatch.ops.rms_norm(X, W, EPS)[0] == "acme"
    parent = fl_dispatch.get_dispatcher()
    assert parent.demoted() == {"rms_norm": ["flaky.flagos"]}
    broken_before = fl_test_flaky.COUNTS["broken"]

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report through the pipe, never return into pytest
        status = 1
        try:
            report = {
                "dispatcher_cleared": dispatch_mod._dispatcher is None,
                "ops_cleared": "rms_norm" not in vars(fl_dispatch.ops),
            }
            result = fl_dispatch.ops.rms_norm(X, W, EPS)
            child = fl_dispatch.get_dispatcher()
            report.update(
                result=result[0],
                fresh=child is not parent,
                broken_calls=fl_test_flaky.COUNTS["broken"] - broken_before,
                demoted=child.demoted(),
            )
            os.write(write_fd, json.dumps(report).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0, data
    report = json.loads(data)
    assert report == {
        "dispatcher_cleared": True,
        "ops_cleared": True,
        "result": "acme",
        "fresh": True,
        "broken_calls": 1,  # the child selected afresh: the flaky impl was tried again
        "demoted": {"rms_norm": ["flaky.flagos"]},
    }
    # the parent keeps its dispatcher and its frozen entry
    assert fl_dispatch.get_dispatcher() is parent
    assert fl_test_flaky.COUNTS["broken"] == broken_before


# --------------------------------------------------------------------------- debug
def test_dispatch_debug_logs_the_choice_and_counts_calls(fl_log):
    ref = Kernel("ref")
    d = Dispatcher(policy(VLLM_FL_DISPATCH_DEBUG="1"),
                   plugins(rms(ref.fn, "reference.torch", "reference")))
    atexit.unregister(d.log_counts)
    entry = d.entry("rms_norm")
    for _ in range(3):
        entry(X, W, EPS)
    d.entry("rms_norm")(X, W, EPS)
    assert messages(fl_log, "INFO").count(
        "Op 'rms_norm' using 'reference.torch' (kind=reference, vendor=None)") == 1
    assert d.counts["rms_norm"] == 4 and ref.calls == 4
    d.log_counts()
    assert messages(fl_log)[-1] == f"call counts (pid {os.getpid()}): rms_norm=4"


def test_without_debug_nothing_is_logged_or_counted(fl_log):
    ref = Kernel("ref")
    d = Dispatcher(policy(), plugins(rms(ref.fn, "reference.torch", "reference")))
    d.entry("rms_norm")(X, W, EPS)
    assert d.entry("rms_norm") is ref.fn
    assert d.counts == {}
    assert fl_log == []


# --------------------------------------------------------------------------- plugin-defined ops
def two_impl_op(name: str, stub: Callable, first: Callable, second: Callable) -> Dispatcher:
    from fl_dispatch import OpSpec

    class Plugin:
        @hookimpl
        def fl_dispatch_define_ops(self):
            return [OpSpec(name, stub)]

        @hookimpl
        def fl_dispatch_register_impls(self, registrar):
            registrar.register(name, first, impl_id="first.flagos", kind="flagos")
            registrar.register(name, second, impl_id="reference.torch", kind="reference")

    plugin_set = PluginSet([Candidate("p", "test", lambda: Plugin())])
    assert plugin_set.errors == []
    return Dispatcher(policy(), plugin_set)


def test_fallback_guard_keeps_keyword_only_parameters():
    def _scaled(x, *, scale=1.0):
        raise NotImplementedError

    def first(x, *, scale=1.0):
        return ("first", x * scale)

    def second(x, *, scale=1.0):
        return ("second", x * scale)

    d = two_impl_op("scaled", _scaled, first, second)
    assert d.entry("scaled")(2, scale=3.0) == ("first", 6.0)
    assert d.demoted() == {}


def test_fallback_guard_with_a_parameter_named_fn():
    def _apply(fn, x):
        raise NotImplementedError

    def first(fn, x):
        return ("first", fn(x))

    def second(fn, x):
        return ("second", fn(x))

    d = two_impl_op("apply_fn", _apply, first, second)
    assert d.entry("apply_fn")(lambda v: v + 1, 1) == ("first", 2)
