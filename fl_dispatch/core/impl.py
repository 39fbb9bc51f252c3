"""Implementations: one backend's function for one op, with its kind, vendor and priority."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

KINDS: tuple[str, ...] = ("flagos", "vendor", "reference")
"""Kinds of implementation, in default preference order."""

DEFAULT_PRIORITY: dict[str, int] = {"flagos": 150, "vendor": 100, "reference": 50}
"""Priorities from the spec, spaced by 50 so others can slot in between."""

IMPL_ID_PATTERN = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")
"""``default.flagos``, ``vendor.cuda``, ``reference.torch``; further impls add a suffix."""

VENDOR_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")

Check = Callable[[], "str | None"]
"""A capability check: returns None when the impl can run here, else the reason it cannot."""


@dataclass(frozen=True)
class Impl:
    """One implementation of one op."""

    op: str
    impl_id: str
    fn: Callable[..., object]
    kind: str
    vendor: str | None
    priority: int
    check: Check | None
    plugin: str
    traceable: bool = False
    """Plain PyTorch that ``torch.compile`` may trace and fuse (the reference backend); other
    impls are called through an opaque custom op in compiled graphs."""

    def unavailable_reason(self) -> str | None:
        """Run the capability check; None when available, else why not (never raises)."""
        if self.check is None:
            return None
        try:
            return self.check()
        except Exception as exc:  # a broken check means unavailable, with the cause
            return f"capability check raised {type(exc).__name__}: {exc}"

    def describe(self) -> str:
        return f"'{self.impl_id}' (kind={self.kind}, vendor={self.vendor})"
