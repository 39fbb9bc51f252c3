"""The generated fallback guard: the dispatcher's one speed trick, in a room of its own.

THIS IS THE HOT PATH. An op with fallbacks is called through a function generated here, with
the op's own signature, that calls the current impl inside ``try``::

    def rms_norm(x, weight, epsilon, residual=_d_residual):
        _fl_f = _fl_dispatch_impl                      # a closure cell: one LOAD_DEREF
        try:
            return _fl_f(x, weight, epsilon, residual)
        except Exception as _fl_exc:                   # on_failure: a global of the entry
            return _fl_dispatch_on_failure(_fl_f, _fl_exc, (x, weight, epsilon, residual), {})

Why it is written this way (measured, ``bench/dispatch_overhead.py``, docs/performance.md):

- The op's own parameters, not ``*args, **kwargs``: packing and unpacking a tuple and a dict
  costs about 60-80 ns a call on CPython 3.11; named parameters cost nothing extra.
- The impl in a closure cell, not a global or an attribute: a cell read is the cheapest load
  there is, and :func:`make_guard`'s ``swap`` changes it without rebuilding the entry, so the
  callers that hold the entry keep it after a fallback.
- The impl is the only cell: ``on_failure`` (never swapped) is a global of the entry's own
  globals dict, read only when something raised. Every closure cell is copied into each call's
  frame (``COPY_FREE_VARS``): a second cell cost about 2-3 ns a call.
- A ``try`` block is free in CPython 3.11+ until something raises (zero-cost exceptions).
- The impl read into a local first, so ``on_failure`` learns which impl raised even when
  another thread swapped the cell in between.

What it still costs: one extra Python frame, about +21 ns a call over calling the impl on the
2-core development machine when its core is not shared (CPython 3.11, 2026-11-30,
docs/results/dispatch_overhead.txt; +23 ns with two cells), about twice that when it is (the
direct call doubles too). Any Python wrapper frame costs about +19 ns there, so there is
little left to take out in Python. The vLLM glue avoids the frame with the call-site guard
(``fl_dispatch.fast`` + ``recover``), at about +6 to +7 ns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_IMPL, _FAIL = "_fl_dispatch_impl", "_fl_dispatch_on_failure"
RESERVED = frozenset({_IMPL, _FAIL, "_fl_f", "_fl_exc"})
"""Names the generated code uses; an op's parameters may not (checked)."""

OnFailure = Callable[[Callable[..., Any], Exception, tuple[Any, ...], dict[str, Any]], Any]
"""``on_failure(failed_impl, exc, args, kwargs)``: called with the impl that raised."""


def make_guard(name: str, signature: Any, impl: Callable[..., Any], on_failure: OnFailure,
               doc: str | None = None) -> tuple[Callable[..., Any], Callable[[Callable], None]]:
    """Build the guarded entry of op ``name`` (parameters of ``signature``, an
    ``inspect.Signature``) around ``impl``; return ``(entry, swap)``, where ``swap(fn)`` makes
    the entry call ``fn`` from then on. Not on the hot path: runs once per op and process."""
    params = list(signature.parameters.values())
    clash = {p.name for p in params} & RESERVED
    if clash:
        raise ValueError(f"op {name!r}: parameter names {sorted(clash)} are reserved")
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
        f"def _factory({_IMPL}, {', '.join(defaults) or '_unused=None'}):\n"
        f"    def {name}({', '.join(sig)}):\n"
        f"        _fl_f = {_IMPL}\n"
        f"        try:\n"
        f"            return _fl_f({', '.join(call)})\n"
        f"        except Exception as _fl_exc:\n"
        f"            return {_FAIL}(_fl_f, _fl_exc, {arg_tuple}, {kw_dict})\n"
        f"    return {name}\n"
    )
    # on_failure is a global of the entry's own globals dict, not a second closure cell:
    # each cell costs a copy into every call's frame (COPY_FREE_VARS), about 2-3 ns.
    scope: dict[str, Any] = {_FAIL: on_failure}
    exec(compile(src, f"<fl_dispatch entry {name}>", "exec"), scope)
    entry = scope["_factory"](impl, **defaults)
    entry.__doc__ = doc
    cell = entry.__closure__[entry.__code__.co_freevars.index(_IMPL)]

    def swap(fn: Callable[..., Any]) -> None:
        cell.cell_contents = fn

    return entry, swap
