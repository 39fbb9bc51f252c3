"""Registration rules: every rejection names the plugin; nothing is half-applied."""

from __future__ import annotations

import pytest

from fl_dispatch.core.errors import RegistrationError
from fl_dispatch.core.impl import DEFAULT_PRIORITY, Impl
from fl_dispatch.core.ops import BUILTIN_OPS
from fl_dispatch.core.opspec import OpSpec
from fl_dispatch.core.registry import Registrar, Registry


def rms_norm(x, weight, epsilon, residual=None):
    return x


def silu_and_mul(x, out=None):
    return x


@pytest.fixture
def registry() -> Registry:
    return Registry(BUILTIN_OPS)


def register(registry: Registry, plugin: str = "acme_plugin", op: str = "rms_norm",
             fn=rms_norm, **kwargs) -> Registrar:
    registrar = Registrar(registry, plugin)
    kwargs.setdefault("impl_id", "vendor.acme")
    kwargs.setdefault("kind", "vendor")
    if kwargs["kind"] == "vendor":
        kwargs.setdefault("vendor", "acme")
    registrar.register(op, fn, **kwargs)
    return registrar


def test_builtin_ops(registry):
    assert list(registry.ops) == ["silu_and_mul", "gelu_and_mul", "rms_norm",
                                  "rotary_embedding", "rotary_embedding_out",
                                  "attention_backend", "topk_softmax", "grouped_topk",
                                  "moe_align_block_size", "moe_sum", "fused_experts",
                                  "flash_mla"]
    assert all(registry.impls[op] == [] for op in registry.ops)


def test_valid_registration_is_staged_then_committed(registry):
    registrar = register(registry)
    assert registry.impl("rms_norm", "vendor.acme") is None  # staged only
    registrar.commit()
    impl = registry.impl("rms_norm", "vendor.acme")
    assert isinstance(impl, Impl)
    assert (impl.op, impl.kind, impl.vendor, impl.plugin) == (
        "rms_norm", "vendor", "acme", "acme_plugin")
    assert impl.fn is rms_norm
    assert impl.priority == DEFAULT_PRIORITY["vendor"] == 100
    assert registry.impls["rms_norm"] == [impl]
    assert registry.vendors() == {"acme"}


@pytest.mark.parametrize("kind, priority", [("flagos", 150), ("vendor", 100),
                                            ("reference", 50)])
def test_default_priorities_from_the_spec(registry, kind, priority):
    registrar = register(registry, impl_id=f"{kind}.x", kind=kind)
    assert registrar.staged[0].priority == priority


def test_explicit_priority_is_kept(registry):
    registrar = register(registry, priority=125)
    assert registrar.staged[0].priority == 125


def test_unknown_op_names_plugin_and_suggests(registry):
    with pytest.raises(RegistrationError) as info:
        register(registry, op="rms_nrm")
    message = str(info.value)
    assert "'acme_plugin'" in message and "'rms_nrm'" in message
    assert "unknown op" in message and "did you mean 'rms_norm'" in message


def test_signature_mismatch_names_plugin(registry):
    def wrong(x, w, eps, residual=None):
        return x

    with pytest.raises(RegistrationError) as info:
        register(registry, fn=wrong)
    message = str(info.value)
    assert "'acme_plugin'" in message and "'rms_norm'" in message
    assert "signature" in message and "(x, w, eps, residual=None)" in message


@pytest.mark.parametrize("fn_src", [
    "def f(x, weight, epsilon, residual=0): pass",       # other default
    "def f(x, weight, epsilon): pass",                   # missing parameter
    "def f(x, weight, epsilon, residual=None, extra=1): pass",  # extra parameter
    "def f(x, weight, epsilon, *, residual=None): pass",  # keyword-only
    "def f(*args, **kwargs): pass",                      # catch-all
])
def test_every_kind_of_signature_difference_is_rejected(registry, fn_src):
    scope: dict = {}
    exec(fn_src, scope)
    with pytest.raises(RegistrationError, match="does not match"):
        register(registry, fn=scope["f"])


def test_unreadable_signature_is_rejected(registry):
    with pytest.raises(RegistrationError, match="cannot read its signature"):
        register(registry, fn=max)


def test_duplicate_impl_id_within_one_plugin(registry):
    registrar = register(registry)
    with pytest.raises(RegistrationError) as info:
        registrar.register("rms_norm", rms_norm, impl_id="vendor.acme", kind="vendor",
                           vendor="acme")
    assert "'acme_plugin'" in str(info.value) and "already has impl 'vendor.acme'" in str(
        info.value)


def test_duplicate_impl_id_across_plugins_names_both(registry):
    register(registry, plugin="first").commit()
    with pytest.raises(RegistrationError) as info:
        register(registry, plugin="second")
    message = str(info.value)
    assert "plugin 'second'" in message and "from plugin 'first'" in message


def test_same_impl_id_for_another_op_is_fine(registry):
    registrar = register(registry)
    registrar.register("silu_and_mul", silu_and_mul, impl_id="vendor.acme", kind="vendor",
                       vendor="acme")
    registrar.commit()
    assert registry.impl("silu_and_mul", "vendor.acme").fn is silu_and_mul


def test_vendor_impl_without_vendor(registry):
    with pytest.raises(RegistrationError) as info:
        register(registry, vendor=None)
    assert "'acme_plugin'" in str(info.value) and "must name its vendor" in str(info.value)
    with pytest.raises(RegistrationError, match="must name its vendor"):
        register(registry, vendor="")


def test_non_vendor_impl_with_vendor(registry):
    with pytest.raises(RegistrationError, match="only vendor impls name a vendor"):
        register(registry, impl_id="default.flagos", kind="flagos", vendor="acme")


def test_bad_vendor_name(registry):
    with pytest.raises(RegistrationError, match="lowercase word"):
        register(registry, vendor="ACME Corp")


def test_unknown_kind_suggests(registry):
    with pytest.raises(RegistrationError) as info:
        register(registry, kind="vndor", vendor=None)
    message = str(info.value)
    assert "'acme_plugin'" in message and "unknown kind 'vndor'" in message
    assert "did you mean 'vendor'" in message


@pytest.mark.parametrize("impl_id", ["cuda", "Vendor.Cuda", "vendor.", ".cuda", "vendor cuda",
                                     ""])
def test_bad_impl_id(registry, impl_id):
    with pytest.raises(RegistrationError, match="impl_id"):
        register(registry, impl_id=impl_id)


@pytest.mark.parametrize("priority", [True, "100", 1.5])
def test_bad_priority(registry, priority):
    with pytest.raises(RegistrationError, match="priority must be an int"):
        register(registry, priority=priority)


def test_not_callable(registry):
    with pytest.raises(RegistrationError, match="not callable"):
        register(registry, fn="rms_norm")
    with pytest.raises(RegistrationError, match="check .* is not callable"):
        register(registry, check="yes")


def test_define_op_rules(registry):
    with pytest.raises(RegistrationError, match="'p'.*'rms_norm', which exists"):
        registry.define_op(OpSpec("rms_norm", rms_norm), plugin="p")
    with pytest.raises(RegistrationError, match="not an OpSpec"):
        registry.define_op("scale", plugin="p")  # type: ignore[arg-type]
    registry.define_op(OpSpec("my_op", silu_and_mul), plugin="p")
    assert registry.impls["my_op"] == []


def test_capability_check_results():
    def boom():
        raise OSError("driver missing")

    def impl(check):
        return Impl("rms_norm", "vendor.x", rms_norm, "vendor", "x", 100, check, "p")

    assert impl(None).unavailable_reason() is None
    assert impl(lambda: None).unavailable_reason() is None
    assert impl(lambda: "no device").unavailable_reason() == "no device"
    reason = impl(boom).unavailable_reason()
    assert "OSError" in reason and "driver missing" in reason
    assert impl(None).describe() == "'vendor.x' (kind=vendor, vendor=x)"
