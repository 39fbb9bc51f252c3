"""The registry of ops and implementations, and the per-plugin registrar handed to backends.

Registration is checked here, once: an unknown op, a mismatched signature, a duplicate
impl_id, a vendor impl without a vendor, an unknown kind are rejected with the plugin's name.
A plugin's registrations are staged and committed together, so a plugin with one invalid
registration contributes nothing (never half-applied).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .config import Policy, validate_against_registry
from .errors import Problem, RegistrationError, suggestion
from .impl import DEFAULT_PRIORITY, IMPL_ID_PATTERN, KINDS, VENDOR_PATTERN, Check, Impl
from .opspec import OpSpec


class Registry:
    """All known ops and the implementations registered for them."""

    def __init__(self, ops: Iterable[OpSpec] = ()):
        self.ops: dict[str, OpSpec] = {}
        self.impls: dict[str, list[Impl]] = {}
        self._ids: dict[tuple[str, str], Impl] = {}
        for op in ops:
            self.define_op(op, plugin="fl_dispatch")

    def define_op(self, op: OpSpec, plugin: str) -> None:
        """Add an op; its name must be new."""
        if not isinstance(op, OpSpec):
            raise RegistrationError(f"plugin {plugin!r} defined {op!r}, which is not an OpSpec")
        if op.name in self.ops:
            raise RegistrationError(f"plugin {plugin!r} defines op {op.name!r}, which exists")
        self.ops[op.name] = op
        self.impls[op.name] = []

    def add(self, impl: Impl) -> None:
        """Commit one validated impl."""
        self.impls[impl.op].append(impl)
        self._ids[(impl.op, impl.impl_id)] = impl

    def impl(self, op: str, impl_id: str) -> Impl | None:
        """The impl ``impl_id`` of ``op`` (impl ids are unique per op), or None."""
        return self._ids.get((op, impl_id))

    def all_impls(self) -> list[Impl]:
        return [impl for impls in self.impls.values() for impl in impls]

    def vendors(self) -> set[str]:
        """Vendor names of every registered vendor impl, available or not."""
        return {i.vendor for i in self.all_impls() if i.vendor is not None}

    def policy_problems(self, policy: Policy) -> list[Problem]:
        """Names in ``policy`` (ops, vendors, impl ids, layers) that nothing here defines."""
        impl_ids = {op: [i.impl_id for i in impls] for op, impls in self.impls.items()}
        return validate_against_registry(policy, impl_ids, self.vendors(), self.layers())

    def layers(self) -> list[str]:
        """The vLLM layers (OOT-list names) that the defined ops serve."""
        return sorted({op.layer for op in self.ops.values() if op.layer})


class Registrar:
    """Handed to one plugin's ``fl_dispatch_register_impls``; stages its registrations."""

    def __init__(self, registry: Registry, plugin: str):
        self._registry = registry
        self.plugin = plugin
        self.staged: list[Impl] = []

    def register(
        self,
        op: str,
        fn: Callable[..., object],
        *,
        impl_id: str,
        kind: str,
        vendor: str | None = None,
        priority: int | None = None,
        check: Check | None = None,
        traceable: bool = False,
    ) -> None:
        """Register ``fn`` as implementation ``impl_id`` of ``op``.

        ``kind`` is flagos, vendor or reference; a vendor impl names its ``vendor``.
        ``priority`` defaults to the kind's (flagos 150, vendor 100, reference 50).
        ``check`` returns None when the impl can run on this machine, else the reason.
        ``traceable=True`` declares ``fn`` plain PyTorch that ``torch.compile`` may trace and
        fuse instead of calling it as an opaque op (only for code the compiler handles).
        """
        where = f"plugin {self.plugin!r} registering {impl_id!r} for op {op!r}"
        spec = self._registry.ops.get(op)
        if spec is None:
            raise RegistrationError(
                f"{where}: unknown op; {suggestion(op, self._registry.ops)}"
            )
        if kind not in KINDS:
            raise RegistrationError(f"{where}: unknown kind {kind!r}; {suggestion(kind, KINDS)}")
        if not isinstance(impl_id, str) or not IMPL_ID_PATTERN.match(impl_id):
            raise RegistrationError(
                f"{where}: impl_id must be dotted lowercase words like 'vendor.cuda'"
            )
        if kind == "vendor":
            if not vendor:
                raise RegistrationError(f"{where}: a vendor impl must name its vendor")
            if not VENDOR_PATTERN.match(vendor):
                raise RegistrationError(f"{where}: vendor {vendor!r} must be a lowercase word")
        elif vendor is not None:
            raise RegistrationError(f"{where}: only vendor impls name a vendor (got {vendor!r})")
        if not callable(fn):
            raise RegistrationError(f"{where}: {fn!r} is not callable")
        if check is not None and not callable(check):
            raise RegistrationError(f"{where}: check {check!r} is not callable")
        if priority is None:
            priority = DEFAULT_PRIORITY[kind]
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise RegistrationError(f"{where}: priority must be an int, got {priority!r}")
        mismatch = spec.signature_mismatch(fn)
        if mismatch:
            raise RegistrationError(f"{where}: {mismatch}")
        taken = self._registry.impl(op, impl_id) or next(
            (i for i in self.staged if i.op == op and i.impl_id == impl_id), None
        )
        if taken is not None:
            raise RegistrationError(
                f"{where}: op {op!r} already has impl {impl_id!r} from plugin {taken.plugin!r}"
            )
        self.staged.append(
            Impl(op, impl_id, fn, kind, vendor, priority, check, plugin=self.plugin,
                 traceable=bool(traceable))
        )

    def commit(self) -> None:
        for impl in self.staged:
            self._registry.add(impl)
