"""Find and load backend plugins, each on its own.

Sources, in order: the entry-point group ``fl_dispatch.backends``, then the modules named in
``VLLM_FL_PLUGIN_MODULES``. A plugin that fails to import, raises in a hook, or registers
something invalid is recorded with its name, source and the cause (with traceback) and
contributes nothing; the others still load. The caller decides whether that is fatal (strict).
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .errors import FlDispatchError
from .hookspecs import BackendInfo
from .ops import BUILTIN_OPS
from .opspec import OpSpec
from .registry import Registrar, Registry

ENTRY_POINT_GROUP = "fl_dispatch.backends"


@dataclass
class PluginRecord:
    """One plugin as found: where it came from, whether it loaded, what it registered."""

    name: str
    source: str
    obj: Any = None
    info: BackendInfo | None = None
    error: str | None = None
    traceback: str | None = None
    impl_ids: list[str] = field(default_factory=list)
    op_names: list[str] = field(default_factory=list)

    @property
    def loaded(self) -> bool:
        return self.error is None

    def unavailable_reason(self) -> str | None:
        """Why the backend cannot run here (from its own check), or None."""
        if self.error is not None:
            return f"failed to load: {self.error}"
        if self.info is None or self.info.check is None:
            return None
        try:
            return self.info.check()
        except Exception as exc:
            return f"capability check raised {type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Candidate:
    """A plugin to load: a name, a human-readable source, and how to get the object."""

    name: str
    source: str
    load: Callable[[], Any]


def entry_point_candidates() -> list[Candidate]:
    found = []
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        where = f"distribution {dist.name} {dist.version}" if dist is not None else "unknown"
        found.append(Candidate(ep.name, f"entry point {ep.name} = {ep.value} ({where})",
                               ep.load))
    return found


def _importer(module: str) -> Callable[[], Any]:
    def load() -> Any:
        return importlib.import_module(module)

    return load


def module_candidates(modules: Iterable[str]) -> list[Candidate]:
    return [Candidate(m, f"module {m} (VLLM_FL_PLUGIN_MODULES)", _importer(m))
            for m in modules]


def _describe(exc: BaseException) -> tuple[str, str]:
    return f"{type(exc).__name__}: {exc}", traceback.format_exc()


class PluginSet:
    """The loaded plugins, the plugin manager, and the registry they filled."""

    def __init__(self, candidates: Sequence[Candidate]):
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self.records: list[PluginRecord] = []
        self.registry = Registry(BUILTIN_OPS)
        loaded = [r for r in (self._load(c) for c in candidates) if r.loaded]
        for record in loaded:
            self._guard(record, self._define_ops)
        for record in loaded:
            if record.loaded:
                self._guard(record, self._register_impls)

    @property
    def errors(self) -> list[PluginRecord]:
        return [r for r in self.records if not r.loaded]

    def _load(self, cand: Candidate) -> PluginRecord:
        record = PluginRecord(cand.name, cand.source)
        self.records.append(record)
        try:
            obj = cand.load()
            if self.manager.is_registered(obj) or self.manager.has_plugin(cand.name):
                raise FlDispatchError(f"plugin {cand.name!r} is already loaded from another "
                                      f"source; remove the duplicate")
            self.manager.register(obj, name=cand.name)
            record.obj = obj
            info = self._call(record, "fl_dispatch_backend_info")
            if info is not None and not isinstance(info, BackendInfo):
                raise FlDispatchError(f"fl_dispatch_backend_info returned {info!r}, "
                                      f"not a BackendInfo")
            record.info = info
        except Exception as exc:
            record.error, record.traceback = _describe(exc)
            if record.obj is not None:
                self.manager.unregister(record.obj)
                record.obj = None
        return record

    def _call(self, record: PluginRecord, hook: str, **kwargs: Any) -> Any:
        """Call one plugin's implementation of ``hook`` (None when it has none)."""
        caller = getattr(self.manager.hook, hook)
        for impl in caller.get_hookimpls():
            if impl.plugin is record.obj:
                return impl.function(*(kwargs[arg] for arg in impl.argnames))
        return None

    def _guard(self, record: PluginRecord, step: Callable[[PluginRecord], None]) -> None:
        try:
            step(record)
        except Exception as exc:
            record.error, record.traceback = _describe(exc)
            self.manager.unregister(record.obj)

    def _define_ops(self, record: PluginRecord) -> None:
        ops: Sequence[OpSpec] = self._call(record, "fl_dispatch_define_ops") or ()
        staged = Registry()
        for op in ops:
            staged.define_op(op, plugin=record.name)
            if op.name in self.registry.ops:
                raise FlDispatchError(f"plugin {record.name!r} defines op {op.name!r}, "
                                      f"which is already defined")
        for op in ops:
            self.registry.define_op(op, plugin=record.name)
            record.op_names.append(op.name)

    def _register_impls(self, record: PluginRecord) -> None:
        registrar = Registrar(self.registry, record.name)
        self._call(record, "fl_dispatch_register_impls", registrar=registrar)
        registrar.commit()
        record.impl_ids = [f"{i.op}:{i.impl_id}" for i in registrar.staged]

    def process_init(self, policy: Any) -> dict[str, str]:
        """Run every loaded plugin's ``fl_dispatch_process_init``; errors become lines too."""
        lines: dict[str, str] = {}
        for record in self.records:
            if not record.loaded:
                continue
            try:
                line = self._call(record, "fl_dispatch_process_init", policy=policy)
            except Exception as exc:
                line = f"process init failed: {type(exc).__name__}: {exc}"
            if line:
                lines[record.name] = line
        return lines


def load_plugins(modules: Iterable[str] = ()) -> PluginSet:
    """Load the entry-point plugins, then ``modules``."""
    return PluginSet(entry_point_candidates() + module_candidates(modules))
