"""Finding and loading backend plugins, each on its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fl_dispatch
from fl_dispatch import BackendInfo, hookimpl
from fl_dispatch.core.config import resolve_policy
from fl_dispatch.core.discovery import (
    ENTRY_POINT_GROUP,
    Candidate,
    PluginSet,
    entry_point_candidates,
    load_plugins,
    module_candidates,
)
from fl_dispatch.core.dispatch import Dispatcher
from fl_dispatch.core.ops import BUILTIN_OPS
from fl_dispatch.core.opspec import OpSpec

BUILTIN_BACKENDS = {"reference", "flagos", "cuda", "ascend"}


def obj_candidate(name: str, obj) -> Candidate:
    return Candidate(name, f"test object {name}", lambda: obj)


def modules(*names: str) -> PluginSet:
    return PluginSet(module_candidates(names))


def policy(**env: str):
    return resolve_policy(env=env, detect=lambda: None)


# --------------------------------------------------------------------------- entry points
def test_builtin_backends_are_found_through_entry_points():
    cands = {c.name: c for c in entry_point_candidates()}
    assert BUILTIN_BACKENDS <= set(cands)
    for name in BUILTIN_BACKENDS:
        assert cands[name].source.startswith(f"entry point {name} = fl_dispatch_{name} ")
        assert "distribution fl-dispatch" in cands[name].source


def test_builtin_backends_load_and_register():
    plugins = load_plugins()
    records = {r.name: r for r in plugins.records}
    assert BUILTIN_BACKENDS <= set(records)
    assert plugins.errors == []
    reg = plugins.registry
    for op in BUILTIN_OPS:
        impl = reg.impl(op.name, "reference.torch")
        assert impl is not None and impl.kind == "reference" and impl.plugin == "reference"
        assert impl.unavailable_reason() is None  # reference always runs
    assert {"cuda", "ascend"} <= reg.vendors()
    assert records["reference"].info.name == "reference"
    assert records["reference"].unavailable_reason() is None
    assert "rms_norm:reference.torch" in records["reference"].impl_ids


def test_the_core_imports_no_backend_by_name():
    """Built-in backends are found the way a third-party one is: no import in the core."""
    core = Path(fl_dispatch.__file__).parent
    backends = {f"fl_dispatch_{n}" for n in BUILTIN_BACKENDS} | {"backends"}
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in backends, f"{path.name} imports {name}"


def test_entry_point_group_name():
    assert ENTRY_POINT_GROUP == "fl_dispatch.backends"


# --------------------------------------------------------------------------- VLLM_FL_PLUGIN_MODULES
def test_plugin_module_registers(test_plugins):
    plugins = modules("fl_test_good")
    (record,) = plugins.records
    assert record.loaded and record.name == "fl_test_good"
    assert record.source == "module fl_test_good (VLLM_FL_PLUGIN_MODULES)"
    assert record.info == BackendInfo("acme", "test vendor backend")
    assert record.impl_ids == ["silu_and_mul:vendor.acme", "rms_norm:vendor.acme"]
    assert plugins.registry.vendors() == {"acme"}


def test_plugin_modules_come_after_entry_points(test_plugins):
    plugins = load_plugins(["fl_test_good"])
    names = [r.name for r in plugins.records]
    assert names[-1] == "fl_test_good"
    assert BUILTIN_BACKENDS <= set(names[:-1])


def test_global_dispatcher_loads_plugin_modules_from_env(test_plugins, monkeypatch):
    monkeypatch.setenv("VLLM_FL_PLUGIN_MODULES", "fl_test_good")
    monkeypatch.setenv("VLLM_FL_PER_OP", "silu_and_mul=vendor:acme")
    fl_dispatch.reset()
    try:
        dispatcher = fl_dispatch.get_dispatcher()
        assert dispatcher.registry.impl("rms_norm", "vendor.acme") is not None
        assert fl_dispatch.ops.silu_and_mul("x") == ("acme", "x")
    finally:
        fl_dispatch.reset()


def test_plugin_that_fails_to_import_is_reported_and_others_load(test_plugins):
    plugins = modules("fl_test_import_error", "fl_test_good")
    bad, good = plugins.records
    assert plugins.errors == [bad]
    assert bad.name == "fl_test_import_error"
    assert bad.source == "module fl_test_import_error (VLLM_FL_PLUGIN_MODULES)"
    assert bad.error.startswith("ModuleNotFoundError")
    assert "fl_test_dependency_that_is_not_installed" in bad.error
    assert "fl_test_import_error.py" in bad.traceback
    assert bad.unavailable_reason().startswith("failed to load: ModuleNotFoundError")
    assert good.loaded
    assert plugins.registry.impl("rms_norm", "vendor.acme") is not None


def test_plugin_that_raises_in_a_hook_is_reported_and_others_load(test_plugins):
    plugins = modules("fl_test_hook_raises", "fl_test_good")
    bad, good = plugins.records
    assert bad.error == "RuntimeError: hook exploded on purpose"
    assert "fl_test_hook_raises.py" in bad.traceback
    assert plugins.manager.get_plugin("fl_test_hook_raises") is None  # unregistered
    assert good.loaded and good.impl_ids


def test_plugin_with_one_invalid_registration_contributes_nothing(test_plugins):
    plugins = modules("fl_test_half_bad")
    (record,) = plugins.records
    assert not record.loaded
    assert record.error.startswith("RegistrationError")
    assert "'fl_test_half_bad'" in record.error
    assert "'silu_and_mull'" in record.error and "did you mean 'silu_and_mul'" in record.error
    # the valid first registration was not applied
    assert plugins.registry.impl("silu_and_mul", "vendor.half") is None
    assert plugins.registry.all_impls() == []
    assert record.impl_ids == []


def test_plugin_defining_a_new_op(test_plugins):
    plugins = modules("fl_test_new_op")
    (record,) = plugins.records
    assert record.loaded and record.op_names == ["scale_by"]
    assert "scale_by" in plugins.registry.ops
    dispatcher = Dispatcher(policy(), plugins)
    entry = dispatcher.entry("scale_by")
    assert entry(3) == 6 and entry(3, factor=3.0) == 9
    import fl_test_new_op

    assert entry is fl_test_new_op.scale_by  # one usable impl: the entry is the function


def test_op_defined_by_one_plugin_implemented_by_another():
    """All plugins define their ops before any registers impls, so order does not matter."""

    def _triple(x):
        raise NotImplementedError

    def triple(x):
        return 3 * x

    class Implementer:
        @hookimpl
        def fl_dispatch_register_impls(self, registrar):
            registrar.register("triple", triple, impl_id="other.triple", kind="reference")

    class Definer:
        @hookimpl
        def fl_dispatch_define_ops(self):
            return [OpSpec("triple", _triple)]

    plugins = PluginSet([obj_candidate("implementer", Implementer()),
                         obj_candidate("definer", Definer())])
    assert plugins.errors == []
    assert plugins.registry.impl("triple", "other.triple").fn is triple


def test_defining_an_existing_op_is_rejected():
    class Redefiner:
        @hookimpl
        def fl_dispatch_define_ops(self):
            return [OpSpec("fresh_op", lambda x: x), OpSpec("rms_norm", lambda x: x)]

    plugins = PluginSet([obj_candidate("redefiner", Redefiner())])
    (record,) = plugins.errors
    assert "'redefiner'" in record.error and "'rms_norm'" in record.error
    assert "fresh_op" not in plugins.registry.ops  # nothing half-applied
    assert record.op_names == []


def test_backend_info_must_be_a_backend_info():
    class Liar:
        @hookimpl
        def fl_dispatch_backend_info(self):
            return {"name": "liar"}

    (record,) = PluginSet([obj_candidate("liar", Liar())]).errors
    assert "not a BackendInfo" in record.error


def test_backend_info_check_is_reported_without_raising():
    def check():
        raise RuntimeError("probe crashed")

    class Probe:
        @hookimpl
        def fl_dispatch_backend_info(self):
            return BackendInfo("probe", "", check)

    (record,) = PluginSet([obj_candidate("probe", Probe())]).records
    assert record.loaded
    assert "RuntimeError" in record.unavailable_reason()
    assert "probe crashed" in record.unavailable_reason()


def test_loader_that_raises_is_reported():
    def load():
        raise ImportError("cannot import name 'kernel'")

    plugins = PluginSet([Candidate("broken", "entry point broken = x", load)])
    (record,) = plugins.errors
    assert (record.name, record.source) == ("broken", "entry point broken = x")
    assert record.error == "ImportError: cannot import name 'kernel'"


def test_same_plugin_twice_is_reported(test_plugins):
    plugins = modules("fl_test_good", "fl_test_good")
    first, second = plugins.records
    assert first.loaded and not second.loaded
    assert "already loaded" in second.error
    assert len(plugins.registry.impls["rms_norm"]) == 1


def test_process_init_lines():
    seen = []

    class Ok:
        @hookimpl
        def fl_dispatch_process_init(self, policy):
            seen.append(policy)
            return "ok ready"

    class Quiet:
        @hookimpl
        def fl_dispatch_process_init(self, policy):
            return None

    class Boom:
        @hookimpl
        def fl_dispatch_process_init(self, policy):
            raise ValueError("no device")

    plugins = PluginSet([obj_candidate("ok", Ok()), obj_candidate("quiet", Quiet()),
                         obj_candidate("boom", Boom())])
    pol = policy()
    lines = plugins.process_init(pol)
    assert seen == [pol]
    assert lines == {"ok": "ok ready", "boom": "process init failed: ValueError: no device"}


def test_broken_plugin_is_skipped_unless_strict(test_plugins, fl_log):
    plugins = modules("fl_test_hook_raises", "fl_test_good")
    Dispatcher(policy(), plugins)
    (warning,) = [r.getMessage() for r in fl_log if r.levelname == "WARNING"]
    assert "'fl_test_hook_raises'" in warning
    assert "module fl_test_hook_raises (VLLM_FL_PLUGIN_MODULES)" in warning
    assert "RuntimeError: hook exploded on purpose" in warning

    from fl_dispatch.core.errors import PluginLoadError

    with pytest.raises(PluginLoadError) as info:
        Dispatcher(policy(VLLM_FL_STRICT="1"), modules("fl_test_hook_raises"))
    assert "hook exploded on purpose" in str(info.value)
    assert "Traceback" in str(info.value)
