"""fl-dispatch: pluggable operator backends for vLLM.

Backends implement the hooks in :mod:`fl_dispatch.hookspecs`; the core picks one impl per op
from the layered policy and freezes it. Call ops through ``fl_dispatch.ops.<name>(...)``.
"""

from __future__ import annotations

from .dispatch import get_dispatcher, get_op, ops, reset
from .errors import ConfigError, FlDispatchError, NoImplementationError, RegistrationError
from .hookspecs import BackendInfo, hookimpl, hookspec
from .impl import DEFAULT_PRIORITY, KINDS, Impl
from .opspec import OpSpec

__version__ = "0.1.0"

__all__ = [
    "BackendInfo",
    "ConfigError",
    "DEFAULT_PRIORITY",
    "FlDispatchError",
    "Impl",
    "KINDS",
    "NoImplementationError",
    "OpSpec",
    "RegistrationError",
    "get_dispatcher",
    "get_op",
    "hookimpl",
    "hookspec",
    "ops",
    "reset",
]
