"""Every list derived from the op definitions agrees with them (one op, one definition).

An op is its reference function (``fl_dispatch.core.ops``); the reference backend's impls, the
torch custom-op schemas and fake kernels, the names the OOT lists accept, the conformance cases
and the tolerances all come from it. These tests fail when one of them is restated elsewhere
and drifts.
"""

from __future__ import annotations

import re

import pytest
import torch

from fl_dispatch.core import torch_ops
from fl_dispatch.core.discovery import load_plugins
from fl_dispatch.core.ops import BUILTIN_OPS
from fl_dispatch.core.opspec import OpSpec, define_op
from fl_dispatch.core.registry import Registry
from fl_dispatch.testing.tolerances import DEFAULT_TOLERANCES, tolerance

SPECS = {op.name: op for op in BUILTIN_OPS}

BEFORE = {  # the hand-written schemas of torch_ops.py at e779850
    "silu_and_mul": "silu_and_mul(Tensor x) -> Tensor",
    "gelu_and_mul": "gelu_and_mul(Tensor x, str approximate) -> Tensor",
    "rms_norm": "rms_norm(Tensor x, Tensor? weight, float epsilon) -> Tensor",
    "fused_add_rms_norm": "fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, "
                          "Tensor? weight, float epsilon) -> ()",
    "rotary_embedding": "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!)? key, "
                        "SymInt head_size, Tensor cos_sin_cache, bool is_neox) -> ()",
}


def _normalize(schema: str) -> str:
    """Alias sets renamed in order of appearance (``a!``/``a0!`` -> ``#0!``)."""
    names: dict[str, str] = {}

    def rename(m: re.Match[str]) -> str:
        return "(" + names.setdefault(m.group(1), f"#{len(names)}") + "!)"

    return re.sub(r"\(([a-z][0-9]*)!\)", rename, schema)


def test_infer_schema_reproduces_the_five_hand_written_schemas() -> None:
    derived = {f.name: f.schema() for op in BUILTIN_OPS for f in op.torch_forms()}
    for name, schema in BEFORE.items():
        assert _normalize(derived[name]) == _normalize(schema), name


def test_every_op_with_tensors_has_a_custom_op_and_only_those() -> None:
    forms = {op.name: [f.name for f in op.torch_forms()] for op in BUILTIN_OPS}
    assert forms["rms_norm"] == ["rms_norm", "fused_add_rms_norm"]
    assert forms["attention_backend"] == []  # a choice, no tensors
    for name in ("topk_softmax", "grouped_topk", "moe_align_block_size", "moe_sum",
                 "fused_experts", "flash_mla"):
        assert forms[name] == [name]  # the op itself: its signature has a schema


def test_custom_ops_are_defined_from_the_definitions_with_working_fakes() -> None:
    defined = torch_ops.define(BUILTIN_OPS)
    assert set(defined) == {f.name for op in BUILTIN_OPS for f in op.torch_forms()}
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(3, 16)
    with FakeTensorMode() as mode:  # the Meta kernel: the reference run on fake tensors
        fx = mode.from_tensor(x)
        y = torch.ops.fl_dispatch.silu_and_mul(fx)
        n = torch.ops.fl_dispatch.rms_norm(fx, None, 1e-6)
        w, ids = torch.ops.fl_dispatch.grouped_topk(mode.from_tensor(torch.randn(5, 16)), 4, 2,
                                                    3, True, 1.0, None, 1)
    assert tuple(y.shape) == (3, 8) and tuple(n.shape) == (3, 16)
    assert (tuple(w.shape), w.dtype, tuple(ids.shape), ids.dtype) == (
        (5, 3), torch.float32, (5, 3), torch.int32)


def test_the_reference_backend_registers_exactly_the_definitions() -> None:
    registry = load_plugins().registry
    assert list(registry.ops)[:len(BUILTIN_OPS)] == list(SPECS)
    for name, spec in SPECS.items():
        impl = registry.impl(name, "reference.torch")
        assert impl is not None and impl.fn is spec.fn and impl.kind == "reference"
        assert impl.traceable is spec.traceable


def test_oot_layer_names_come_from_the_ops_and_each_is_served_by_the_glue() -> None:
    registry = Registry(BUILTIN_OPS)
    layers = set(registry.layers())
    assert layers == {"silu_and_mul", "gelu_and_mul", "rms_norm", "rotary_embedding",
                      "fused_moe", "mla_attention"}
    from fl_dispatch.vllm_glue import layers as glue_layers

    served = {spec.name for spec in glue_layers.LAYERS} | {"fused_moe", "mla_attention"}
    assert served == layers  # fused_moe: vllm_glue/moe.py; mla_attention: vllm_glue/mla.py


@pytest.mark.parametrize("spec", BUILTIN_OPS, ids=lambda s: s.name)
def test_every_op_has_cases_tolerances_or_a_checker(spec: OpSpec) -> None:
    if spec.checker is not None:  # ops without tensors are checked by a function
        assert spec.verify_cases is None and not spec.torch_forms()
        return
    assert spec.has_reference and spec.doc
    for dtype in DEFAULT_TOLERANCES:
        tolerance(spec, dtype)  # raises when a dtype has none
    quick = [c for dt in DEFAULT_TOLERANCES for c in spec.verify_cases(dt, "quick")]
    assert quick and all(c.op == spec.name for c in quick)
    from fl_dispatch.testing.inputs import Dims

    bench = spec.bench_cases(1, Dims(hidden=64, intermediate=64, moe_intermediate=32,
                                     kv_len=32, mla_heads=2), "bf16")
    assert bench and all(c.op == spec.name for c in bench)


def test_an_op_override_beats_the_table_and_a_missing_dtype_says_how_to_fix_it() -> None:
    def scaled(x: torch.Tensor) -> torch.Tensor:
        """x * 2."""
        return x * 2

    spec = define_op(tolerances={"bf16": (0.5, 0.25, "test")})(scaled)
    assert (tolerance(spec, torch.bfloat16).atol, tolerance(spec, "bf16").rtol) == (0.5, 0.25)
    assert tolerance(spec, "fp32") == DEFAULT_TOLERANCES["fp32"]
    with pytest.raises(KeyError, match=r"define_op\(tolerances="):
        tolerance(spec, "float64")


def test_mutates_must_name_parameters() -> None:
    def f(x: torch.Tensor) -> None:
        """nothing."""

    with pytest.raises(ValueError, match=r"mutates names \['y'\]"):
        OpSpec("f", f, mutates=("y",))
