"""The hooks a backend plugin implements. This module is the whole plugin interface.

A backend is a module (or object) with functions marked ``@fl_dispatch.hookimpl`` and named
after the specs below; it is found through the entry-point group ``fl_dispatch.backends`` or
the variable ``VLLM_FL_PLUGIN_MODULES``. Every hook is optional.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pluggy

from .impl import Check

if TYPE_CHECKING:
    from .config import Policy
    from .opspec import OpSpec
    from .registry import Registrar

PROJECT = "fl_dispatch"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class BackendInfo:
    """What a backend says about itself: a name, one line of description, a capability check,
    and ``gaps``: per op, what it does not cover (arguments it delegates, an op it leaves to
    others) and why; ``fl-dispatch plugins`` and ``explain`` show them."""

    name: str
    description: str = ""
    check: Check | None = None
    gaps: Mapping[str, str] = field(default_factory=dict)


@hookspec
def fl_dispatch_backend_info() -> BackendInfo:
    """Describe this backend (shown by ``fl-dispatch plugins``). Must be cheap: no kernels."""


@hookspec
def fl_dispatch_define_ops() -> Sequence[OpSpec]:
    """Define new ops (beyond the core's) that this or other backends implement."""


@hookspec
def fl_dispatch_register_impls(registrar: Registrar) -> None:
    """Register implementations with ``registrar.register(...)`` (or an
    :class:`~fl_dispatch.ImplTable`'s ``register_all``). Import no kernels here: register
    functions that import them on first call, and check availability in ``check``.

    The rule for impls: an impl that cannot serve some arguments (a layout, a dtype, an
    optional argument its kernel lacks) serves them by **delegating** (to the op's reference,
    ``fl_dispatch.reference(op)``, or another path of its own), never by raising: a raise is
    taken as a broken impl and demotes it for the rest of the process, for every call."""


@hookspec
def fl_dispatch_process_init(policy: Policy) -> str | None:
    """Per-process set-up (FlagGems' aten registration, say), run once in each vLLM process
    that builds the model: when its first replaced layer is built (the device is up), or at
    plugin load where fl-dispatch replaces no layer. vLLM's front end builds no model and does
    not run it, so it may initialise the device (which there would make vLLM spawn, not fork,
    its engine). Return one line describing the state, or None."""
