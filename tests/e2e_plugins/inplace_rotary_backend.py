"""A test backend that serves rotary_embedding (in place) but not rotary_embedding_out
(vendor 'inplace'): the compiled glue must then rotate copies with it."""

import fl_dispatch
from fl_dispatch.core import ops as ref


def rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox):
    ref.rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)


@fl_dispatch.hookimpl
def fl_dispatch_register_impls(registrar):
    registrar.register("rotary_embedding", rotary_embedding, impl_id="vendor.inplace",
                       kind="vendor", vendor="inplace")
