"""A test backend whose rms_norm always raises (vendor 'flaky'); it counts its calls."""

import fl_dispatch

CALLS = {"rms_norm": 0}


def rms_norm(x, weight, epsilon, residual=None):
    CALLS["rms_norm"] += 1
    raise RuntimeError("flaky kernel: unsupported shape")


@fl_dispatch.hookimpl
def fl_dispatch_register_impls(registrar):
    registrar.register("rms_norm", rms_norm, impl_id="vendor.flaky", kind="vendor",
                       vendor="flaky")
