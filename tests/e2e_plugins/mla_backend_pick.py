"""A test backend (vendor 'mlapick') whose attention_backend chooses fl-dispatch's MLA backend
for MLA models where this process registered it (flagos makes that choice only with a GPU)."""

import fl_dispatch


def attention_backend(use_mla=False):
    return fl_dispatch.MLA_BACKEND if use_mla else None


@fl_dispatch.hookimpl
def fl_dispatch_register_impls(registrar):
    registrar.register("attention_backend", attention_backend, impl_id="vendor.mlapick",
                       kind="vendor", vendor="mlapick")
