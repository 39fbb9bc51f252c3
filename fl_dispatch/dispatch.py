"""The dispatcher: selection computed once per op, frozen into a plain callable.

After the first use of an op, calling its entry costs what calling the chosen function costs:
with one usable impl (or in strict mode) the entry *is* that function; with fallbacks it is a
generated function of the op's own signature that calls the chosen impl inside ``try``. The
first failure of an impl logs one WARNING with the cause, demotes it for the process and
switches the entry to the next candidate; strict mode lets the exception propagate.

Two namespaces hold the frozen callables, bound when the process dispatcher is created:
``fl_dispatch.ops.<op>`` (the entry, guarded when there is a fallback) and
``fl_dispatch.fast.<op>`` (the bare current impl, for callers that guard the call themselves
with :func:`recover`, as the vLLM glue does: no extra frame at all).
"""

from __future__ import annotations

import atexit
import collections
import os
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

from .config import Policy, resolve_policy
from .discovery import PluginSet, load_plugins
from .errors import ConfigError, NoImplementationError, PluginLoadError, suggestion
from .impl import Impl
from .log import get_logger
from .opspec import OpSpec
from .selection import OpSelection, select_op

log = get_logger()


_IMPL, _FAIL = "_fl_dispatch_impl", "_fl_dispatch_on_failure"
"""Names of the guard's closure cells; op parameters may not use them (checked)."""


def _compile_guard(spec: OpSpec, fn: Callable[..., Any],
                   on_failure: Callable[..., Any]) -> Callable[..., Any]:
    """Build ``def <op>(<op's params>): try: return impl(...) except: on_failure(...)``.

    The impl is a closure cell, so a fallback swaps it without rebuilding the entry;
    ``on_failure(failed_impl, exc, args, kwargs)`` gets the impl that actually raised.
    """
    params = list(spec.signature.parameters.values())
    clash = {p.name for p in params} & {_IMPL, _FAIL, "_fl_f", "_fl_exc"}
    if clash:
        raise ValueError(f"op {spec.name!r}: parameter names {sorted(clash)} are reserved")
    defaults = {f"_d_{p.name}": p.default for p in params if p.default is not p.empty}
    sig: list[str] = []
    call: list[str] = []  # how the guard passes each parameter on to the impl
    packed: list[str] = []  # ... and to on_failure: a tuple of positionals, a dict of keywords
    kw_packed: list[str] = []
    for p in params:
        text = p.name if p.default is p.empty else f"{p.name}=_d_{p.name}"
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            sig.append(text)
            call.append(p.name)
            packed.append(p.name)
        elif p.kind is p.VAR_POSITIONAL:
            sig.append(f"*{p.name}")
            call.append(f"*{p.name}")
            packed.append(f"*{p.name}")
        elif p.kind is p.KEYWORD_ONLY:
            if not any(x.startswith("*") for x in sig):
                sig.append("*")
            sig.append(text)
            call.append(f"{p.name}={p.name}")
            kw_packed.append(f"{p.name!r}: {p.name}")
        else:
            sig.append(f"**{p.name}")
            call.append(f"**{p.name}")
            kw_packed.append(f"**{p.name}")
    positional_only = [i for i, p in enumerate(params) if p.kind is p.POSITIONAL_ONLY]
    if positional_only:
        sig.insert(positional_only[-1] + 1, "/")
    arg_tuple = "(" + "".join(f"{a}, " for a in packed) + ")"
    kw_dict = "{" + ", ".join(kw_packed) + "}"
    src = (
        f"def _factory({_IMPL}, {_FAIL}, {', '.join(defaults) or '_unused=None'}):\n"
        f"    def {spec.name}({', '.join(sig)}):\n"
        f"        _fl_f = {_IMPL}\n"
        f"        try:\n"
        f"            return _fl_f({', '.join(call)})\n"
        f"        except Exception as _fl_exc:\n"
        f"            return {_FAIL}(_fl_f, _fl_exc, {arg_tuple}, {kw_dict})\n"
        f"    return {spec.name}\n"
    )
    scope: dict[str, Any] = {}
    exec(compile(src, f"<fl_dispatch entry {spec.name}>", "exec"), scope)
    entry = scope["_factory"](fn, on_failure, **defaults)
    entry.__doc__ = spec.stub.__doc__
    return entry


_NO_CODE = (lambda: None).__code__


def _set_cell(entry: Callable[..., Any], name: str, value: Any) -> None:
    cell = entry.__closure__[entry.__code__.co_freevars.index(name)]  # type: ignore[index]
    cell.cell_contents = value


class _OpState:
    """The live fallback chain of one op."""

    def __init__(self, selection: OpSelection):
        self.selection = selection
        self.chain: list[Impl] = list(selection.usable)
        self.entry: Callable[..., Any] | None = None
        self.head: Callable[..., Any] | None = None  # the bare current impl (call-site guard)
        self.failures: list[str] = []

    @property
    def current(self) -> Impl:
        return self.chain[0]


class Dispatcher:
    """Owns the policy, the plugins and the frozen per-op entries of this process."""

    def __init__(self, policy: Policy, plugins: PluginSet):
        self.policy = policy
        self.plugins = plugins
        self.registry = plugins.registry
        problems = self.registry.policy_problems(policy)
        if problems:
            raise ConfigError(problems)
        for warning in policy.warnings:
            log.warning(warning)
        for record in plugins.errors:
            message = f"backend plugin {record.name!r} ({record.source}) failed: {record.error}"
            if policy.strict.value:
                raise PluginLoadError(f"{message}\n{record.traceback}")
            log.warning("%s; it is skipped (set VLLM_FL_LOG_LEVEL=DEBUG for the traceback)",
                        message)
            log.debug("%s", record.traceback)
        self._checked: dict[str, str | None] = {}
        self._states: dict[str, _OpState] = {}
        self._lock = threading.RLock()
        self.counts: collections.Counter[str] = collections.Counter()
        if policy.dispatch_debug.value:
            atexit.register(self.log_counts)

    # ----------------------------------------------------------------- selection
    def selection(self, op: str) -> OpSelection:
        """The frozen selection of ``op`` (computed on first use)."""
        return self._state(op).selection

    def selections(self) -> dict[str, OpSelection]:
        """Freeze every op and return the selections."""
        return {op: self.selection(op) for op in self.registry.ops}

    def _state(self, op: str) -> _OpState:
        state = self._states.get(op)
        if state is not None:
            return state
        with self._lock:
            state = self._states.get(op)
            if state is None:
                if op not in self.registry.ops:
                    raise KeyError(f"unknown op {op!r}; {suggestion(op, self.registry.ops)}")
                state = _OpState(select_op(op, self.policy, self.registry, checked=self._checked))
                chosen = state.selection.chosen
                if chosen is not None and self.policy.dispatch_debug.value:
                    log.info("Op '%s' using %s", op, chosen.describe())
                self._states[op] = state
            return state

    # ----------------------------------------------------------------- entries
    def entry(self, op: str) -> Callable[..., Any]:
        """The callable for ``op``: the chosen impl, guarded by fallback when there is one."""
        state = self._state(op)
        if state.entry is None:
            with self._lock:
                if state.entry is None:
                    self._build_entry(op, state)
        return state.entry  # type: ignore[return-value]

    def head(self, op: str) -> Callable[..., Any]:
        """The bare current impl of ``op``, for callers that guard the call themselves:
        ``f = head(op); try: f(...) except Exception as e: recover(op, f, e, args)``. It costs
        nothing beyond the impl; :meth:`recover` switches it on a failure."""
        self.entry(op)
        return self._states[op].head  # type: ignore[return-value]

    def _guarded(self, state: _OpState) -> bool:
        return len(state.selection.usable) > 1 and not self.policy.strict.value

    def _build_entry(self, op: str, state: _OpState) -> None:
        spec = self.registry.ops[op]
        if not state.chain:
            state.entry = state.head = self._no_impl(op, state.selection)
            return
        fn = state.current.fn
        state.head = self._counted(op, fn) if self.policy.dispatch_debug.value else fn
        if self._guarded(state):
            fn = _compile_guard(spec, fn, lambda failed, exc, args, kwargs:
                                self._fail(op, failed, exc, args, kwargs))
        state.entry = self._counted(op, fn) if self.policy.dispatch_debug.value else fn

    def _publish(self, op: str, state: _OpState, fn: Callable[..., Any]) -> None:
        """Make ``fn`` the impl that the guard, the head and ``fl_dispatch.fast`` call."""
        guard = getattr(state.entry, "__wrapped__", state.entry)
        if guard is not None and _IMPL in getattr(guard, "__code__", _NO_CODE).co_freevars:
            _set_cell(guard, _IMPL, fn)
        state.head = self._counted(op, fn) if self.policy.dispatch_debug.value else fn
        if op in fast.__dict__ and self is _dispatcher:
            setattr(fast, op, state.head)

    def recover(self, op: str, failed_fn: Callable[..., Any], exc: Exception,
                args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Any:
        """A call-site guard caught ``exc`` from ``failed_fn`` (a head of ``op``): fall back
        as the generated guard would, or re-raise in strict mode / with a single impl."""
        state = self._state(op)
        if not self._guarded(state):
            raise exc
        return self._fail(op, getattr(failed_fn, "__wrapped__", failed_fn), exc, args,
                          kwargs or {})

    def _counted(self, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        counts = self.counts

        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[op] += 1
            return fn(*args, **kwargs)

        counted.__wrapped__ = fn  # type: ignore[attr-defined]
        return counted

    @staticmethod
    def _no_impl(op: str, selection: OpSelection) -> Callable[..., Any]:
        reasons = "; ".join(f"{c.impl.impl_id}: {c.excluded}" for c in selection.candidates)
        message = f"no usable implementation of op {op!r} ({reasons or 'none registered'})"

        def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise NoImplementationError(message)

        return unavailable

    def _fail(self, op: str, failed_fn: Callable[..., Any], exc: Exception,
              args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``failed_fn`` raised ``exc``: demote it (once, even when several threads saw it
        fail), switch the entry to the next candidate and run that; when every candidate has
        failed, re-raise and make later calls raise NoImplementationError."""
        with self._lock:
            state = self._states[op]
            while True:
                failed = next((i for i in state.chain if i.fn is failed_fn), None)
                if failed is not None:
                    log.warning("Implementation '%s' failed for op '%s': %s: %s",
                                failed.impl_id, op, type(exc).__name__, exc)
                    state.chain.remove(failed)
                    state.failures.append(f"{failed.impl_id}: {type(exc).__name__}: {exc}")
                if not state.chain:
                    self._publish(op, state, self._exhausted(op, state))
                    raise exc
                nxt = state.current
                if failed is not None:
                    log.info("Op '%s' fallback to %s", op, nxt.describe())
                self._publish(op, state, nxt.fn)
                try:
                    return nxt.fn(*args, **kwargs)
                except Exception as again:
                    failed_fn, exc = nxt.fn, again

    @staticmethod
    def _exhausted(op: str, state: _OpState) -> Callable[..., Any]:
        message = (f"every implementation of op {op!r} failed in this process: "
                   + "; ".join(state.failures))

        def exhausted(*args: Any, **kwargs: Any) -> Any:
            raise NoImplementationError(message)

        return exhausted

    def demoted(self) -> dict[str, list[str]]:
        """Impl ids demoted so far, per op."""
        return {op: [i.impl_id for i in s.selection.usable if i not in s.chain]
                for op, s in self._states.items() if len(s.chain) < len(s.selection.usable)}

    def log_counts(self) -> None:
        counts = ", ".join(f"{op}={n}" for op, n in sorted(self.counts.items())) or "none"
        log.info("call counts (pid %d): %s", os.getpid(), counts)

    def selection_line(self) -> str:
        """``op -> impl_id`` for every op, one line."""
        parts = []
        for op, sel in self.selections().items():
            chosen = sel.chosen
            parts.append(f"{op}->{chosen.impl_id if chosen else 'NONE'}")
        return ", ".join(parts)


# --------------------------------------------------------------------------- process global
_lock = threading.Lock()
_dispatcher: Dispatcher | None = None


_creation_hooks: list[Callable[[Dispatcher], None]] = []


def add_creation_hook(hook: Callable[[Dispatcher], None]) -> None:
    """Call ``hook(dispatcher)`` whenever this process creates its dispatcher (also again
    in a forked child, which starts clean). Added once; never called twice per dispatcher."""
    if hook not in _creation_hooks:
        _creation_hooks.append(hook)


def get_dispatcher() -> Dispatcher:
    """The process's dispatcher, created on first use from the environment (thread-safe)."""
    global _dispatcher
    if _dispatcher is not None:
        return _dispatcher
    with _lock:
        if _dispatcher is not None:
            return _dispatcher
        policy = resolve_policy()
        log.setLevel(policy.log_level.value)
        created = Dispatcher(policy, load_plugins(policy.plugin_modules.value))
        _bind_all(created)
        _dispatcher = created
    for hook in list(_creation_hooks):
        hook(created)
    return created


def current_dispatcher() -> Dispatcher | None:
    """The process's dispatcher if one was created, else None (creates nothing)."""
    return _dispatcher


def reset() -> None:
    """Forget the dispatcher and every bound entry (after fork, or in tests)."""
    global _dispatcher, _lock
    _dispatcher = None
    _lock = threading.Lock()
    for name in _bound:
        ops.__dict__.pop(name, None)
        fast.__dict__.pop(name, None)
    _bound.clear()
    _install_getattr()


def _bind_all(d: Dispatcher) -> None:
    """Freeze every op of the new process dispatcher and bind its entry on ``ops`` and its
    bare head on ``fast`` as plain module attributes. The modules' ``__getattr__`` goes
    away: CPython specializes attribute reads only on modules without one (+17 ns a call
    otherwise). ``reset()`` puts it back."""
    for name in d.registry.ops:
        ops.__dict__[name] = d.entry(name)
        fast.__dict__[name] = d.head(name)
        _bound.add(name)
    for module in (ops, fast):
        module.__dict__.pop("__getattr__", None)


def _lookup(module: types.ModuleType) -> Callable[[str], Callable[..., Any]]:
    """The ``__getattr__`` of ``ops`` / ``fast`` until the dispatcher exists: create it
    (which binds every op), then answer from the bound attributes."""

    def first_lookup(name: str) -> Callable[..., Any]:
        if name.startswith("__"):
            raise AttributeError(name)
        d = get_dispatcher()
        if name not in module.__dict__:
            raise AttributeError(f"unknown op {name!r}; {suggestion(name, d.registry.ops)}")
        return module.__dict__[name]

    return first_lookup


def recover(op: str, failed_fn: Callable[..., Any], exc: Exception, args: tuple[Any, ...],
            kwargs: dict[str, Any] | None = None) -> Any:
    """Call-site fallback for ``fl_dispatch.fast`` callers (see :meth:`Dispatcher.head`)."""
    return get_dispatcher().recover(op, failed_fn, exc, args, kwargs)


def _install_getattr() -> None:
    ops.__getattr__ = _lookup(ops)  # type: ignore[attr-defined]
    fast.__getattr__ = _lookup(fast)  # type: ignore[attr-defined]


_bound: set[str] = set()
ops = types.ModuleType("fl_dispatch.ops", "The dispatched ops: ``fl_dispatch.ops.<op>(...)``.")
fast = types.ModuleType("fl_dispatch.fast", "Bare current impls for call-site guards: "
                        "``f = fast.<op>; try: f(...) except Exception as e: recover(...)``.")
_install_getattr()
sys.modules.setdefault("fl_dispatch.ops", ops)
sys.modules.setdefault("fl_dispatch.fast", fast)
os.register_at_fork(after_in_child=reset)


def get_op(name: str) -> Callable[..., Any]:
    """The frozen entry of op ``name`` (the same object as ``fl_dispatch.ops.<name>``)."""
    return get_dispatcher().entry(name)
