"""A test backend whose rms_norm visibly perturbs the output (vendor 'perturb')."""

import fl_dispatch
from fl_dispatch.core import ops as ref


def rms_norm(x, weight, epsilon, residual=None):
    out = ref.rms_norm(x, weight, epsilon, residual)
    if residual is None:
        return out.mul_(-1.0)
    out[0].mul_(-1.0)
    return out


@fl_dispatch.hookimpl
def fl_dispatch_register_impls(registrar):
    registrar.register("rms_norm", rms_norm, impl_id="vendor.perturb", kind="vendor",
                       vendor="perturb")
