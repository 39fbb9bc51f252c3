"""A flagos rms_norm that always fails, counting its calls and the plugin's registrations
(used through the process-global dispatcher: fork and first-use tests)."""

from fl_dispatch import hookimpl

COUNTS = {"register": 0, "broken": 0}


def rms_norm(x, weight, epsilon, residual=None):
    COUNTS["broken"] += 1
    raise RuntimeError("flaky kernel failed")


@hookimpl
def fl_dispatch_register_impls(registrar):
    COUNTS["register"] += 1
    registrar.register("rms_norm", rms_norm, impl_id="flaky.flagos", kind="flagos")
