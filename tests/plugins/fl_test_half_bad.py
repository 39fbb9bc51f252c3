"""A backend with one valid and one invalid registration: it must contribute nothing."""

from fl_dispatch import hookimpl


def silu_and_mul(x, out=None):
    return x


@hookimpl
def fl_dispatch_register_impls(registrar):
    registrar.register("silu_and_mul", silu_and_mul, impl_id="vendor.half", kind="vendor",
                       vendor="half")
    registrar.register("silu_and_mull", silu_and_mul, impl_id="vendor.half", kind="vendor",
                       vendor="half")
