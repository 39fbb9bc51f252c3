"""A backend defining an op that ``fl-dispatch verify`` has no input generator for: it must be
listed as such (NO-GEN), never counted as a failure."""

from __future__ import annotations

from fl_dispatch import OpSpec, hookimpl


def _double(x):
    """2 * x."""
    raise NotImplementedError


def double(x):
    return 2 * x


@hookimpl
def fl_dispatch_define_ops():
    return [OpSpec("broken_double", _double)]


@hookimpl
def fl_dispatch_register_impls(registrar):
    registrar.register("broken_double", double, impl_id="brokenop.ref", kind="reference")
