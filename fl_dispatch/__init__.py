"""fl-dispatch: pluggable operator backends for vLLM.

What a backend author needs (see docs/writing-a-backend.md): the hook markers
(:data:`hookimpl`), :class:`BackendInfo`, :class:`Registrar` and :class:`ImplTable`, the op
definition type (:class:`OpSpec`, :func:`define_op`) and the contract helpers
(:func:`write_out`, :func:`weight_or_ones`, :func:`copy_back`, :func:`reference`). What a
caller needs: :data:`ops` (``fl_dispatch.ops.<op>(...)``), :func:`get_op`, :data:`fast` with
:func:`recover`, and the errors. The conformance kit is :mod:`fl_dispatch.testing`.

Layers: :mod:`fl_dispatch.core` (the runtime every vLLM process loads; imports neither vLLM nor
the tools), :mod:`fl_dispatch.vllm_glue` (the only code that imports vLLM),
:mod:`fl_dispatch.testing` (the conformance kit), :mod:`fl_dispatch.tools` (CLI, verify,
bench, demo).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
from .core.opspec import (
    GELU_APPROXIMATIONS,
    OpSpec,
    bad_approximate,
    copy_back,
    define_op,
    weight_or_ones,
    write_out,
)
from .core.registry import Registrar

__version__ = "0.2.0"


def reference(op: str) -> Callable[..., Any]:
    """The reference function of ``op`` (a built-in op's definition, or a plugin's op once
    the dispatcher exists). An impl that cannot serve some arguments calls it for those
    instead of raising: a raise demotes the impl for the whole process."""
    from .core.ops import BUILTIN_OPS

    for spec in BUILTIN_OPS:
        if spec.name == op:
            return spec.fn
    specs = get_dispatcher().registry.ops
    if op not in specs:
        from .core.errors import suggestion

        raise KeyError(f"unknown op {op!r}; {suggestion(op, specs)}")
    return specs[op].fn


__all__ = [
    "DEFAULT_PRIORITY",
    "GELU_APPROXIMATIONS",
    "KINDS",
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
    "copy_back",
    "define_op",
    "fast",
    "get_dispatcher",
    "get_op",
    "hookimpl",
    "hookspec",
    "ops",
    "recover",
    "reference",
    "reset",
    "weight_or_ones",
    "write_out",
]
