"""The dispatched ops as torch.library custom ops (namespace ``fl_dispatch``), derived from the
op definitions.

``torch.compile`` sees each as one opaque op. Everything comes from the op's definition
(:meth:`OpSpec.torch_forms`): the schema is ``torch.library.infer_schema`` of the form's
signature; the real kernel runs the form with the dispatched entry (``fl_dispatch.ops.<op>``,
fallback included); the fake (Meta) kernel runs the same form with the op's reference on meta
tensors (or the op's own ``fake``). So the compiled graph is the same whichever backend is
selected, and no policy work happens per call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from fl_dispatch import ops

from .opspec import OpSpec, TorchForm

NAMESPACE = "fl_dispatch"
_lib: torch.library.Library | None = None
DEFINED: dict[str, str] = {}
"""``torch.ops.fl_dispatch.<name>`` -> its schema, for every custom op defined here."""


def _real(spec: OpSpec, form: TorchForm) -> Callable[..., Any]:
    fn, name = form.fn, spec.name

    def real(*args: Any) -> Any:
        return fn(getattr(ops, name), *args)

    return real


def _fake(spec: OpSpec, form: TorchForm) -> Callable[..., Any]:
    fn, reference = form.fn, spec.fake or spec.fn

    def fake(*args: Any) -> Any:
        return fn(reference, *args)

    return fake


def define(specs: Iterable[OpSpec]) -> dict[str, str]:
    """Define the custom ops of ``specs`` once per process (idempotent; later calls add the
    ops not yet defined). Returns the name -> schema of every op defined so far."""
    global _lib
    if _lib is None:
        _lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    for spec in specs:
        for form in spec.torch_forms():
            if form.name in DEFINED:
                continue
            schema = form.schema()
            _lib.define(schema)
            _lib.impl(form.name, _real(spec, form), "CompositeExplicitAutograd")
            # A Meta kernel serves FakeTensor tracing like a registered fake, without the
            # source-location lookup register_fake does (~30 ms per op with vLLM imported).
            _lib.impl(form.name, _fake(spec, form), "Meta")
            DEFINED[form.name] = schema
    return dict(DEFINED)
