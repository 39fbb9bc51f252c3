"""The conformance kit in a vendor's own pytest suite: every impl a backend registers, through
the checks of ``fl-dispatch verify``, one pytest test per (op, impl, case, dtype)::

    # tests/test_conformance.py of the vendor's package
    from fl_dispatch.testing import backend_conformance

    test_acme = backend_conformance("acme")

The plugins are found as fl-dispatch finds them (the entry points of ``fl_dispatch.backends``)
plus ``modules`` (as ``VLLM_FL_PLUGIN_MODULES`` would name them, for a backend not installed).
The outcomes: a case that conforms passes; one that does not fails with the row's note (what
is off, by how much, against which tolerance); an impl whose capability check says it cannot
run here is skipped with that reason (the only skip); a plugin that fails to load, an op with
no input cases or no reference to compare against, each is one failing test with the cause.

pytest is imported only when :func:`backend_conformance` is called.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .checks import PASS, Row, check_choice, comparison_reference, verify_case

if TYPE_CHECKING:
    from fl_dispatch.core.discovery import PluginSet


@dataclass(frozen=True)
class ConformanceItem:
    """One test of :func:`backend_conformance`: what it runs (``run`` returns the rows), or
    why it is skipped (``skip``) or fails (``error``) without running anything."""

    op: str
    impl_id: str
    case: str
    dtype: str
    run: Callable[[], list[Row]] | None = None
    skip: str | None = None
    error: str | None = None

    @property
    def id(self) -> str:
        """The pytest id: ``op|impl|case|dtype``."""
        return "|".join((self.op, self.impl_id, self.case, self.dtype))


def _load(modules: Sequence[str]) -> PluginSet:
    """The entry-point plugins plus ``modules`` (a module an entry point already names is
    loaded once)."""
    from importlib import metadata

    from fl_dispatch.core.discovery import (
        ENTRY_POINT_GROUP,
        PluginSet,
        entry_point_candidates,
        module_candidates,
    )

    installed = {ep.value.split(":")[0].strip()
                 for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    extra = [m for m in dict.fromkeys(modules) if m not in installed]
    return PluginSet(entry_point_candidates() + module_candidates(extra))


def conformance_items(plugin: str, *, modules: Sequence[str] = (), size: str = "small",
                      dtypes: Sequence[str] = ("fp32", "fp16", "bf16"),
                      device: str | None = None) -> list[ConformanceItem]:
    """The tests of :func:`backend_conformance`, without pytest. ``plugin`` is the plugin's
    name (its entry point's or module's name) or its ``BackendInfo`` name."""
    from .inputs import SIZES, parse_dtype, resolve_device

    def fail(error: str, op: str = "-", impl_id: str = plugin) -> ConformanceItem:
        return ConformanceItem(op, impl_id, "-", "-", error=error)

    if isinstance(modules, str):
        modules = [m.strip() for m in modules.split(",") if m.strip()]
    if size not in SIZES:
        return [fail(f"size={size!r}; valid: {', '.join(SIZES)}")]
    try:
        names = [parse_dtype(d) for d in dtypes]
        dev = resolve_device(device)
    except ValueError as exc:
        return [fail(str(exc))]
    plugins = _load(modules)
    errors = [r for r in plugins.records
              if not r.loaded and (r.name == plugin or r.name in modules)]
    if errors:
        return [fail(f"plugin {r.name!r} failed to load ({r.source}): {r.error}", "load plugin",
                     r.name) for r in errors]
    records = [r for r in plugins.records
               if r.loaded and plugin in (r.name, r.info.name if r.info else None)]
    if not records:
        found = ", ".join(f"{r.name}" + (f" ({r.info.name})" if r.info else "")
                          for r in plugins.records) or "none"
        return [fail(f"no plugin named {plugin!r}; found: {found} (install it, or name its "
                     f"module in modules=)", "find plugin")]
    registry = plugins.registry
    owners = {r.name for r in records}
    items: list[ConformanceItem] = []
    for op, spec in registry.ops.items():
        for impl in registry.impls[op]:
            if impl.plugin not in owners:
                continue
            reason = impl.unavailable_reason()
            if reason is not None:
                items.append(ConformanceItem(op, impl.impl_id, "-", "-",
                                             skip=f"{impl.impl_id} unavailable: {reason}"))
                continue
            if spec.checker is not None:
                items.append(ConformanceItem(op, impl.impl_id, "checker", "-",
                                             run=_bind(check_choice, spec, impl)))
                continue
            if spec.verify_cases is None:
                items.append(fail(f"op {op!r} declares no input cases, so {impl.impl_id} "
                                  f"cannot be verified (@op.cases next to the op's "
                                  f"definition)", op, impl.impl_id))
                continue
            ref = comparison_reference(registry, op)
            if ref is None:
                items.append(fail(f"op {op!r} has no reference to compare {impl.impl_id} "
                                  f"with (no available reference impl, and its definition "
                                  f"raises NotImplementedError)", op, impl.impl_id))
                continue
            for dtype in names:
                for case in spec.verify_cases(dtype, size):
                    items.append(ConformanceItem(op, impl.impl_id, case.name, dtype,
                                                 run=_bind(verify_case, case, spec, ref,
                                                           [impl], dev)))
    if not items:
        items.append(fail(f"plugin {plugin!r} registers no impls", "-"))
    return items


def _bind(fn: Callable[..., list[Row]], *args: Any) -> Callable[[], list[Row]]:
    return lambda: fn(*args)


def describe(row: Row) -> str:
    """One failing row as a line: where, what, by how much, against which tolerance."""
    where = f"{row.op} {row.impl} [{row.case}] {row.dtype}"
    err = "" if row.max_err is None else f"; max abs err {row.max_err:.3g}"
    tol = "" if row.atol is None else f", tolerance {row.atol:g}+{row.rtol:g}*|ref|"
    return f"{where}: {row.status}: {row.note or 'no detail'}{err}{tol}"


def run_item(item: ConformanceItem) -> list[Row]:
    """Run one item outside pytest; the rows it produced (a skip or an error is one row)."""
    from .checks import FAIL, SKIP

    if item.skip is not None:
        return [Row(item.op, item.impl_id, item.case, item.dtype, SKIP, note=item.skip)]
    if item.error is not None or item.run is None:
        return [Row(item.op, item.impl_id, item.case, item.dtype, FAIL, note=item.error or "")]
    return item.run()


def backend_conformance(plugin: str, *, modules: Sequence[str] = (), size: str = "small",
                        dtypes: Sequence[str] = ("fp32", "fp16", "bf16"),
                        device: str | None = None) -> Callable[..., None]:
    """A pytest test function, parametrized over (op, impl_id, case, dtype), that runs every
    impl ``plugin`` registers through ``fl-dispatch verify``'s checks.

    :param plugin: the plugin's name (entry point or module name) or its BackendInfo name.
    :param modules: backend modules to load besides the entry points (as
        ``VLLM_FL_PLUGIN_MODULES`` would), for a backend that is not installed.
    :param size: ``quick``, ``small`` (default) or ``full`` (the ops' case sets).
    :param dtypes: short names: ``fp32``, ``fp16``, ``bf16``.
    :param device: torch device of the inputs (default: cuda, else npu, else cpu).

    Assign the result to a ``test_*`` name in a test module::

        test_acme = backend_conformance("acme", modules=("acme_fl_backend",))
    """
    import pytest

    items = conformance_items(plugin, modules=modules, size=size, dtypes=dtypes,
                              device=device)

    @pytest.mark.parametrize("conformance", items, ids=[i.id for i in items])
    def test_conformance(conformance: ConformanceItem) -> None:
        if conformance.skip is not None:
            pytest.skip(conformance.skip)
        if conformance.error is not None:
            pytest.fail(conformance.error, pytrace=False)
        bad = [r for r in run_item(conformance) if r.status != PASS]
        if bad:
            pytest.fail("\n".join(describe(r) for r in bad), pytrace=False)

    test_conformance.__name__ = test_conformance.__qualname__ = (
        f"test_{plugin.replace('.', '_').replace('-', '_')}_conformance")
    test_conformance.__doc__ = f"Conformance of every impl plugin {plugin!r} registers."
    return test_conformance
