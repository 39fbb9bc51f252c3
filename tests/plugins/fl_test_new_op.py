"""A backend that defines a new op ('scale_by') and implements it."""

from fl_dispatch import OpSpec, hookimpl


def _scale_by(x, factor: float = 2.0):
    """x * factor."""
    raise NotImplementedError


def scale_by(x, factor: float = 2.0):
    return x * factor


@hookimpl
def fl_dispatch_define_ops():
    return [OpSpec("scale_by", _scale_by)]


@hookimpl
def fl_dispatch_register_impls(registrar):
    registrar.register("scale_by", scale_by, impl_id="newop.ref", kind="reference")
