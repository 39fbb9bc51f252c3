"""A well-behaved third-party backend: vendor 'acme' implements silu_and_mul and rms_norm."""

from fl_dispatch import BackendInfo, hookimpl

CALLS: dict[str, int] = {"silu_and_mul": 0, "rms_norm": 0}


def silu_and_mul(x, out=None):
    CALLS["silu_and_mul"] += 1
    return ("acme", x)


def rms_norm(x, weight, epsilon, residual=None):
    CALLS["rms_norm"] += 1
    return ("acme", x)


@hookimpl
def fl_dispatch_backend_info():
    return BackendInfo("acme", "test vendor backend")


@hookimpl
def fl_dispatch_register_impls(registrar):
    registrar.register("silu_and_mul", silu_and_mul, impl_id="vendor.acme", kind="vendor",
                       vendor="acme")
    registrar.register("rms_norm", rms_norm, impl_id="vendor.acme", kind="vendor",
                       vendor="acme")
