"""fl-dispatch: pluggable operator backends for vLLM.

What a backend author needs (see docs/writing-a-backend.md): the hook markers
(:data:`hookimpl`), :class:`BackendInfo`, :class:`Registrar` and :class:`ImplTable`, the op
definition type (:class:`OpSpec`, :func:`define_op`) and the contract helpers
(:func:`write_out`, :func:`weight_or_ones`, :func:`copy_back`, :func:`write_contiguous`,
:func:`reference`,
:func:`check_args`, :func:`checked`). What a
caller needs: :data:`ops` (``fl_dispatch.ops.<op>(...)``), :func:`get_op`, :data:`fast` with
:func:`recover`, and the errors. The conformance kit is :mod:`fl_dispatch.testing`.

Layers: :mod:`fl_dispatch.core` (the runtime every vLLM process loads; imports neither vLLM nor
the tools), :mod:`fl_dispatch.vllm_glue` (the only code that imports vLLM),
:mod:`fl_dispatch.testing` (the conformance kit), :mod:`fl_dispatch.tools` (CLI, verify,
bench, demo).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

from . import fast, ops
from .core.dispatch import get_dispatcher, get_op, recover, reset
from .core.errors import (
    ConfigError,
    FlDispatchError,
    NoImplementationError,
    PluginLoadError,
    RegistrationError,
)
from .core.hookspecs import BackendInfo, hookimpl, hookspec
from .core.impl import DEFAULT_PRIORITY, KINDS, Impl
from .core.impltable import ImplTable
from .core.ops.attention import MLA_BACKEND
from .core.opspec import (
    GELU_APPROXIMATIONS,
    OpSpec,
    bad_approximate,
    copy_back,
    define_op,
    weight_or_ones,
    write_contiguous,
    write_out,
)
from .core.process import process_rank
from .core.registry import Registrar

__version__ = "0.2.0"


@functools.cache
def _builtin_specs() -> dict[str, OpSpec]:
    from .core.ops import BUILTIN_OPS

    return {spec.name: spec for spec in BUILTIN_OPS}


def _spec(op: str) -> OpSpec:
    """The definition of ``op``: a built-in op's, or a plugin's once the dispatcher exists."""
    spec = _builtin_specs().get(op)
    if spec is not None:
        return spec
    specs = get_dispatcher().registry.ops
    if op not in specs:
        from .core.errors import suggestion

        raise KeyError(f"unknown op {op!r}; {suggestion(op, specs)}")
    return specs[op]


def builtin_ops() -> tuple[OpSpec, ...]:
    """The ops fl-dispatch itself defines (each is its reference function)."""
    from .core.ops import BUILTIN_OPS

    return BUILTIN_OPS


def reference(op: str) -> Callable[..., Any]:
    """The reference function of ``op`` (a built-in op's definition, or a plugin's op once
    the dispatcher exists). An impl that cannot serve some arguments calls it for those
    instead of raising: a raise demotes the impl for the whole process."""
    return _spec(op).fn


def check_args(op: str, *args: Any, **kwargs: Any) -> None:
    """Raise the argument errors of ``op`` for these arguments (the op's arguments, as the
    impl received them): the ValueError its reference raises, naming the argument, its bad
    value and what is valid (the op's ``check_args=``, see :class:`OpSpec`). Returns None
    when they are valid, and for an op that declares no check. An impl calls it first, so
    that every impl rejects bad arguments alike, then checks only what its kernels add."""
    check = _spec(op).check_args
    if check is not None:
        check(*args, **kwargs)


_F = TypeVar("_F", bound=Callable[..., Any])


def checked(fn: _F) -> _F:
    """Decorator for an impl named after its op (its signature the op's): run the op's
    argument check (:func:`check_args`) before ``fn``. The impl then rejects bad arguments
    exactly as the reference does, and checks only what its kernels add. A built-in op's
    check is looked up once, here (an op without one gets ``fn`` back unwrapped); a plugin's
    op, defined only once the plugins load, is looked up on each call."""
    op = fn.__name__
    spec = _builtin_specs().get(op)
    check: Callable[..., None]
    if spec is None:
        check = functools.partial(check_args, op)
    elif spec.check_args is None:
        return fn
    else:
        check = spec.check_args

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        check(*args, **kwargs)
        return fn(*args, **kwargs)

    return cast(_F, run)


__all__ = [
    "DEFAULT_PRIORITY",
    "GELU_APPROXIMATIONS",
    "KINDS",
    "MLA_BACKEND",
    "BackendInfo",
    "ConfigError",
    "FlDispatchError",
    "Impl",
    "ImplTable",
    "NoImplementationError",
    "OpSpec",
    "PluginLoadError",
    "Registrar",
    "RegistrationError",
    "bad_approximate",
    "builtin_ops",
    "check_args",
    "checked",
    "copy_back",
    "define_op",
    "fast",
    "get_dispatcher",
    "get_op",
    "hookimpl",
    "hookspec",
    "ops",
    "process_rank",
    "recover",
    "reference",
    "reset",
    "weight_or_ones",
    "write_contiguous",
    "write_out",
]
