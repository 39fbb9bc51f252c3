"""A backend's impls, registered next to their functions (the way vendors should write them)::

    impls = ImplTable(impl_id="vendor.acme", kind="vendor", vendor="acme",
                      check=unavailable_reason)

    @impls.impl()                       # the op is the function's name
    def silu_and_mul(x, out=None): ...

    @hookimpl
    def fl_dispatch_register_impls(registrar: Registrar) -> None:
        impls.register_all(registrar)

Every entry is checked when ``register_all`` hands it to the registrar (op exists, signature
matches the op's, ids unique), with the plugin's name in the error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .impl import Check
    from .registry import Registrar


@dataclass
class _Entry:
    op: str
    fn: Callable[..., Any]
    options: dict[str, Any] = field(default_factory=dict)


class ImplTable:
    """Default registration options for a backend's impls, and the impls decorated with
    :meth:`impl`, in order."""

    def __init__(self, *, impl_id: str, kind: str, vendor: str | None = None,
                 priority: int | None = None, check: Check | None = None,
                 traceable: bool = False) -> None:
        self.defaults: dict[str, Any] = {"impl_id": impl_id, "kind": kind, "vendor": vendor,
                                         "priority": priority, "check": check,
                                         "traceable": traceable}
        self.entries: list[_Entry] = []

    def impl(self, op: str | None = None, **options: Any
             ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: the function implements ``op`` (default: the function's name);
        ``options`` override the table's defaults for this impl (``impl_id``, ``priority``,
        ``check``, ``traceable``)."""
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise TypeError(f"ImplTable.impl: unknown option(s) {sorted(unknown)}; "
                            f"valid: {', '.join(self.defaults)}")

        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.entries.append(_Entry(op or fn.__name__, fn, options))
            return fn

        return add

    def add(self, op: str, fn: Callable[..., Any], **options: Any) -> None:
        """Add ``fn`` as an impl of ``op`` without decorating it (a function defined
        elsewhere, say an op's reference)."""
        self.impl(op, **options)(fn)

    @property
    def ops(self) -> list[str]:
        """The ops this table implements, in order."""
        return [e.op for e in self.entries]

    def register_all(self, registrar: Registrar) -> None:
        """Register every entry (call this from ``fl_dispatch_register_impls``)."""
        for entry in self.entries:
            opts = {**self.defaults, **entry.options}
            registrar.register(entry.op, entry.fn, **opts)
