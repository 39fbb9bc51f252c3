"""A test backend choosing vLLM's Triton attention backend (vendor 'attnpick')."""

import fl_dispatch


def attention_backend(use_mla=False):
    return None if use_mla else "TRITON_ATTN"


@fl_dispatch.hookimpl
def fl_dispatch_register_impls(registrar):
    registrar.register("attention_backend", attention_backend, impl_id="vendor.attnpick",
                       kind="vendor", vendor="attnpick")
