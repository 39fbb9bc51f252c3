"""Selection: per op, every impl in the order it would be tried, with why it is (not) chosen.

Pure: a function of the policy and the registry (plus each impl's capability check, run once).
The dispatcher freezes its result; ``fl-dispatch explain`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Policy
from .impl import KINDS, Impl
from .registry import Registry


@dataclass(frozen=True)
class RankedImpl:
    """An impl and, when it cannot be used, why not (None: usable)."""

    impl: Impl
    available: bool
    excluded: str | None

    def as_dict(self, chosen: bool, first_usable: str | None) -> dict[str, object]:
        reason = self.excluded
        if reason is None and not chosen:
            reason = f"fallback: tried if {first_usable!r} fails"
        return {
            "impl_id": self.impl.impl_id,
            "kind": self.impl.kind,
            "vendor": self.impl.vendor,
            "priority": self.impl.priority,
            "available": self.available,
            "reason": reason,
        }


@dataclass(frozen=True)
class OpSelection:
    """The ordered candidates of one op; ``usable`` is the fallback chain, first is chosen."""

    op: str
    candidates: tuple[RankedImpl, ...]
    order_source: str

    @property
    def usable(self) -> tuple[Impl, ...]:
        return tuple(c.impl for c in self.candidates if c.excluded is None)

    @property
    def chosen(self) -> Impl | None:
        usable = self.usable
        return usable[0] if usable else None

    def as_dict(self) -> dict[str, object]:
        chosen = self.chosen
        first = chosen.impl_id if chosen else None
        return {
            "selected": first,
            "order_source": self.order_source,
            "candidates": [c.as_dict(c.impl is chosen, first) for c in self.candidates],
        }


def _policy_exclusion(policy: Policy, impl: Impl) -> str | None:
    """Why the policy's filters drop ``impl``, or None."""
    if impl.kind == "vendor":
        deny = policy.deny_vendors
        if impl.vendor in deny.value:
            return f"vendor {impl.vendor!r} denied by deny_vendors ({deny.source})"
        allow = policy.allow_vendors
        if allow.value is not None and impl.vendor not in allow.value:
            return f"vendor {impl.vendor!r} not in allow_vendors ({allow.source})"
    if impl.kind == "flagos" and not policy.flagos_allows(impl.op):
        wl = policy.flagos_whitelist
        if wl.value is not None:
            return f"op {impl.op!r} not in flagos_whitelist ({wl.source})"
        return f"op {impl.op!r} blacklisted by flagos_blacklist ({policy.flagos_blacklist.source})"
    return None


def select_op(op: str, policy: Policy, registry: Registry,
              demoted: frozenset[str] = frozenset(),
              checked: dict[tuple[str, str], str | None] | None = None) -> OpSelection:
    """Order ``op``'s impls and say why each is or is not usable. ``checked`` caches the
    capability checks (they are pure, so each runs once per process), keyed by
    ``(op, impl_id)``: impl ids are unique per op only, and one backend's impls of different
    ops may have different checks."""
    checked = {} if checked is None else checked
    impls = registry.impls.get(op, [])
    by_priority = sorted(impls, key=lambda i: (-i.priority, i.impl_id))
    tokens = policy.op_backends.value.get(op)
    ranked: list[tuple[Impl, str | None]] = []
    if tokens is not None:
        source = f"op_backends ({policy.op_backends.source_of(op)})"
        placed: set[str] = set()
        for token in tokens:
            for impl in by_priority:
                if impl.impl_id not in placed and token.matches(impl):
                    placed.add(impl.impl_id)
                    ranked.append((impl, None))
        listed = "|".join(tokens)
        ranked += [(i, f"not in the op's order {listed!r} ({policy.op_backends.source_of(op)})")
                   for i in by_priority if i.impl_id not in placed]
    else:
        prefer = policy.prefer.value
        source = f"prefer={prefer} ({policy.prefer.source}), then priority"
        kind_rank = {k: (0 if k == prefer else 1 + KINDS.index(k)) for k in KINDS}
        ranked = [(i, None) for i in sorted(by_priority, key=lambda i: kind_rank[i.kind])]
    candidates = []
    for impl, reason in ranked:
        key = (op, impl.impl_id)
        if key not in checked:
            checked[key] = impl.unavailable_reason()
        unavailable = checked[key]
        if reason is None:
            reason = _policy_exclusion(policy, impl)
        if reason is None and unavailable is not None:
            reason = f"unavailable: {unavailable}"
        if reason is None and impl.impl_id in demoted:
            reason = "demoted: it failed earlier in this process"
        candidates.append(RankedImpl(impl, unavailable is None, reason))
    # usable impls first (in order), then the rest, so the list reads in trial order
    candidates.sort(key=lambda c: c.excluded is not None)
    return OpSelection(op, tuple(candidates), source)


def select_all(policy: Policy, registry: Registry,
               checked: dict[tuple[str, str], str | None] | None = None
               ) -> dict[str, OpSelection]:
    checked = {} if checked is None else checked
    return {op: select_op(op, policy, registry, checked=checked) for op in registry.ops}
