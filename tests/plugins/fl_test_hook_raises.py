"""A backend whose registration hook raises."""

from fl_dispatch import hookimpl


@hookimpl
def fl_dispatch_register_impls(registrar):
    raise RuntimeError("hook exploded on purpose")
