"""The ascend adapters (``backends/ascend``, ``vendor.ascend``) run on CPU against a behavioural
double of the torch_npu calls they make (``tests/doubles/torch_npu_double.py``, written from
torch_npu's documentation and vllm-ascend's calls).

* the double itself is proven against hand-computed examples of each documented contract
  (argument order, return tuples, dtypes, rstd's shape, in-place rotation) and its rejections;
* with the double installed, the registered ``vendor.ascend`` impls are available and every
  conformance case of their ops (fp32, fp16, bf16; size "small") PASSES, including the in-place
  contracts on strided views and the partial-rotary / 3-D layouts;
* rotary with ``key=None`` is served by the reference without reaching the kernel.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from doubles import torch_npu_double as npu_double
from doubles.torch_npu_double import KernelArgumentError

from fl_dispatch.core.discovery import load_plugins
from fl_dispatch.testing.checks import PASS, verify_case

torch_npu_double = npu_double.torch_npu_double
"""The fixture: the double installed for one test (``sys.modules['torch_npu']``, ``torch.npu``)."""

CPU = torch.device("cpu")
ASCEND = "vendor.ascend"
OPS = ("silu_and_mul", "rms_norm", "rotary_embedding")
DTYPES = ("fp32", "fp16", "bf16")
KERNEL_OF = {"silu_and_mul": "npu_swiglu", "rms_norm": "npu_rms_norm",
             "rotary_embedding": "_npu_rotary_embedding"}


@pytest.fixture(scope="module")
def registry():
    plugins = load_plugins()
    assert not plugins.errors, [(r.name, r.error) for r in plugins.errors]
    return plugins.registry


def _calls(name: str) -> list[dict]:
    return [args for n, args in npu_double.CALLS if n == name]


# ----------------------------------------------------------------------------- the double itself
def test_install_and_removal():
    had_npu = hasattr(torch, "npu")
    assert "torch_npu" not in sys.modules
    with npu_double.installed() as module:
        import torch_npu

        assert torch_npu is module and sys.modules["torch_npu"] is module
        assert torch.npu.is_available() is True
        assert {n for n in dir(module) if "npu" in n} == {
            "npu_swiglu", "npu_rms_norm", "npu_add_rms_norm", "_npu_rotary_embedding"}
    assert "torch_npu" not in sys.modules
    assert hasattr(torch, "npu") == had_npu


def test_swiglu_hand_computed(torch_npu_double):
    # silu(v) = v * sigmoid(v): silu(0) = 0, silu(1) = 0.7310586, silu(-2) = -0.2384058
    x = torch.tensor([[0.0, 1.0, -2.0, 3.0, 4.0, 5.0]])  # first half gated by the second
    y = torch_npu_double.npu_swiglu(x)  # dim defaults to -1
    assert y.shape == (1, 3) and y.dtype == torch.float32
    torch.testing.assert_close(y, torch.tensor([[0.0, 0.7310586 * 4.0, -0.2384058 * 5.0]]))
    # dim=0 splits rows; the output keeps the input dtype
    z = torch_npu_double.npu_swiglu(torch.tensor([[1.0], [2.0]], dtype=torch.bfloat16), dim=0)
    assert z.dtype == torch.bfloat16 and z.shape == (1, 1)
    assert float(z) == pytest.approx(0.7310586 * 2.0, rel=1e-2)
    with pytest.raises(KernelArgumentError, match="not even"):
        torch_npu_double.npu_swiglu(torch.ones(2, 3))
    with pytest.raises(KernelArgumentError, match="dtype"):
        torch_npu_double.npu_swiglu(torch.ones(2, 4, dtype=torch.float64))


def test_rms_norm_hand_computed(torch_npu_double):
    # row [3, 4]: mean of squares 12.5, rstd = 1/sqrt(12.5 + eps); gamma [1, 2]
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float16)
    g = torch.tensor([1.0, 2.0], dtype=torch.float16)
    out = torch_npu_double.npu_rms_norm(x, g, 1e-6)
    assert isinstance(out, tuple) and len(out) == 2
    y, rstd = out
    r = 1.0 / math.sqrt(12.5 + 1e-6)
    assert y.dtype == torch.float16 and rstd.dtype == torch.float32  # rstd: DT_FLOAT
    assert rstd.shape == (2, 1)  # shape_rstd * shape_gamma = shape_x
    assert rstd[0, 0].item() == pytest.approx(r, rel=1e-6)
    assert rstd[1, 0].item() == pytest.approx(1e3, rel=1e-4)  # 1/sqrt(eps)
    torch.testing.assert_close(y, torch.tensor([[3 * r, 8 * r], [0, 0]], dtype=torch.float16))
    # epsilon defaults to 1e-6; 3-D x with 1-D gamma -> rstd (4, 1, 1)
    _, r3 = torch_npu_double.npu_rms_norm(torch.ones(4, 1, 8), torch.ones(8))
    assert r3.shape == (4, 1, 1)
    assert r3.flatten()[0].item() == pytest.approx(1 / math.sqrt(1 + 1e-6), rel=1e-6)
    with pytest.raises(KernelArgumentError, match="gamma: dtype"):
        torch_npu_double.npu_rms_norm(x, g.float())
    with pytest.raises(KernelArgumentError, match="trailing"):
        torch_npu_double.npu_rms_norm(x, torch.ones(3, dtype=torch.float16))


def test_add_rms_norm_hand_computed(torch_npu_double):
    x1 = torch.tensor([[1.0, 1.0]], dtype=torch.bfloat16)
    x2 = torch.tensor([[2.0, 3.0]], dtype=torch.bfloat16)
    g = torch.tensor([1.0, 0.5], dtype=torch.bfloat16)
    out = torch_npu_double.npu_add_rms_norm(x1, x2, g, 1e-6)
    assert isinstance(out, tuple) and len(out) == 3  # (y, rstd, x)
    y, rstd, x = out
    # x = x1 + x2 = [3, 4]; rstd = 1/sqrt(12.5 + eps); y = [3 r, 4 r * 0.5]
    r = 1.0 / math.sqrt(12.5 + 1e-6)
    assert x.dtype == torch.bfloat16 and torch.equal(x, torch.tensor([[3.0, 4.0]]).bfloat16())
    assert rstd.dtype == torch.float32 and rstd.shape == (1, 1)
    assert rstd.item() == pytest.approx(r, rel=1e-6)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, torch.tensor([[3 * r, 2 * r]]).bfloat16())
    # the inputs are not modified (the outputs are new tensors)
    assert torch.equal(x1, torch.ones(1, 2, dtype=torch.bfloat16))
    with pytest.raises(KernelArgumentError, match="x2"):
        torch_npu_double.npu_add_rms_norm(x1, x2.float(), g)


def _cache(rows: list[tuple[float, ...]]) -> torch.Tensor:
    return torch.tensor(rows)


def test_rotary_hand_computed(torch_npu_double):
    # head_size 4; position 1 rotates by (90°, 0°): cos = [0, 1], sin = [1, 0]
    cache = _cache([(1.0, 1.0, 0.0, 0.0), (0.0, 1.0, 1.0, 0.0)])
    positions = torch.tensor([1, 0])
    q = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],   # 2 heads
                      [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    k = torch.tensor([[1.0, 2.0, 3.0, 4.0], [9.0, 9.0, 9.0, 9.0]])  # 1 head
    # neox: pairs (x[i], x[i + 2]); pair 0 by 90°: (a, b) -> (-b, a); pair 1 by 0°: unchanged
    q_neox, k_neox = q.clone(), k.clone()
    assert torch_npu_double._npu_rotary_embedding(positions, q_neox, k_neox, 4, cache,
                                                  True) is None
    assert torch.equal(q_neox[0], torch.tensor([-3.0, 2.0, 1.0, 4.0, -7.0, 6.0, 5.0, 8.0]))
    assert torch.equal(q_neox[1], q[1])  # position 0: identity
    assert torch.equal(k_neox, torch.tensor([[-3.0, 2.0, 1.0, 4.0], [9.0, 9.0, 9.0, 9.0]]))
    # GPT-J: pairs (x[2i], x[2i + 1]); pair 0 by 90°, pair 1 by 0°
    q_gptj, k_gptj = q.clone(), k.clone()
    torch_npu_double._npu_rotary_embedding(positions, q_gptj, k_gptj, 4, cache, False)
    assert torch.equal(q_gptj[0], torch.tensor([-2.0, 1.0, 3.0, 4.0, -6.0, 5.0, 7.0, 8.0]))
    assert torch.equal(k_gptj[0], torch.tensor([-2.0, 1.0, 3.0, 4.0]))
    # what the kernel does not take (vllm-ascend always passes dense 2-D rows, and head_size
    # equal to the cache width; the key is required)
    qkv = torch.zeros(2, 12)
    with pytest.raises(KernelArgumentError, match="contiguous"):
        torch_npu_double._npu_rotary_embedding(positions, qkv[:, :8], qkv[:, 8:], 4, cache,
                                               True)
    with pytest.raises(KernelArgumentError, match=r"num_tokens"):
        torch_npu_double._npu_rotary_embedding(positions, q.view(2, 2, 4), k, 4, cache, True)
    with pytest.raises(KernelArgumentError, match="cos_sin_cache"):
        torch_npu_double._npu_rotary_embedding(positions, q, k, 8, cache, True)
    with pytest.raises(KernelArgumentError, match="key"):
        torch_npu_double._npu_rotary_embedding(positions, q, None, 4, cache, True)


# ----------------------------------------------------------------------------- the adapters
def test_available_only_with_the_double(registry, monkeypatch):
    impls = [registry.impl(op, ASCEND) for op in OPS]
    assert all(i is not None for i in impls)
    assert "torch_npu" not in sys.modules
    assert "torch_npu is not importable" in impls[0].unavailable_reason()
    with npu_double.installed(monkeypatch):
        for impl in impls:
            assert impl.unavailable_reason() is None, impl.op
    monkeypatch.undo()
    assert "torch_npu" not in sys.modules


def _cases(registry, op: str) -> list:
    spec = registry.ops[op]
    return [c for dt in DTYPES for c in spec.verify_cases(dt, "small")]


@pytest.mark.parametrize("op", OPS)
def test_conformance_every_case_passes(torch_npu_double, registry, op):
    spec = registry.ops[op]
    impl = registry.impl(op, ASCEND)
    assert impl is not None and impl.unavailable_reason() is None
    cases = _cases(registry, op)
    assert {c.dtype for c in cases} == set(DTYPES)
    failing = []
    for case in cases:
        rows = verify_case(case, spec, spec.fn, [impl], CPU)
        assert len(rows) == 1
        failing += [(r.case, r.dtype, r.status, r.note) for r in rows if r.status != PASS]
    for row in failing:
        print("FAIL", *row)
    assert not failing, failing
    # the kernel really served the cases (nothing was quietly delegated)
    kernel_calls = _calls(KERNEL_OF[op])
    if op == "rms_norm":
        fused = _calls("npu_add_rms_norm")
        assert len(fused) == sum("no-residual" not in c.name for c in cases)
        kernel_calls += fused
    served = [c for c in cases if "key=None" not in c.name]
    assert len(kernel_calls) == len(served), (len(kernel_calls), len(served))


def test_the_kit_covers_in_place_contracts_on_strided_views(registry):
    """The cases above include strided in-place arguments (so their PASS proves them)."""
    names = {op: [c.name for c in _cases(registry, op)] for op in OPS}
    assert any("x:strided" in n and "out:strided" in n for n in names["silu_and_mul"])
    assert any("out:strided" in n and "x:contig" in n for n in names["silu_and_mul"])
    assert any("residual" in n and "strided" in n and "no-residual" not in n
               for n in names["rms_norm"])
    rope = names["rotary_embedding"]
    assert any(" qkv" in n and "key=None" not in n for n in rope)  # strided q/k of one buffer
    assert any(" 3d" in n and "key=None" not in n for n in rope)
    assert any("rot=32" in n and "hs=64" in n and "key=None" not in n for n in rope)  # partial
    # and their arguments really are views of larger buffers
    case = next(c for c in _cases(registry, "rms_norm")
                if c.name.startswith("T=7 ") and " residual " in c.name and " strided" in c.name)
    args = case.build(CPU)
    assert args["x"]._base is not None and not args["x"].is_contiguous()
    assert args["residual"]._base is not None and not args["residual"].is_contiguous()
    case = next(c for c in _cases(registry, "rotary_embedding")
                if c.name.startswith("T=7 ") and " qkv" in c.name and "key=None" not in c.name)
    args = case.build(CPU)
    assert not args["query"].is_contiguous() and not args["key"].is_contiguous()
    assert args["query"]._base is args["key"]._base


def test_rotary_in_place_on_a_strided_qkv_view(torch_npu_double, registry):
    """Direct check: q/k are column slices of one qkv buffer; the value columns and padding
    stay untouched and q/k hold the reference's rotation."""
    from fl_dispatch import reference

    fn = registry.impl("rotary_embedding", ASCEND).fn
    torch.manual_seed(0)
    qkv = torch.randn(5, 4 * 16 + 2 * 2 * 16)
    want = qkv.clone()
    positions = torch.tensor([0, 3, 1, 7, 2])
    cache = torch.randn(8, 8)  # partial rotary: rotary_dim 8 of head_size 16
    ref_q, ref_k = want[:, :64], want[:, 64:96]
    reference("rotary_embedding")(positions, ref_q, ref_k, 16, cache, True)
    q, k = qkv[:, :64], qkv[:, 64:96]
    assert fn(positions, q, k, 16, cache, True) is None
    torch.testing.assert_close(qkv, want)
    assert torch.equal(qkv[:, 96:], want[:, 96:])
    (call,) = _calls("_npu_rotary_embedding")
    assert call["head_size"] == 8 and call["query"].is_contiguous()


def test_rotary_key_none_delegates_to_the_reference(torch_npu_double, registry):
    from fl_dispatch import reference

    fn = registry.impl("rotary_embedding", ASCEND).fn
    torch.manual_seed(1)
    q = torch.randn(3, 2 * 8, dtype=torch.float16)
    want = q.clone()
    positions = torch.tensor([2, 0, 1])
    cache = torch.randn(4, 8)
    reference("rotary_embedding")(positions, want, None, 8, cache, False)
    assert fn(positions, q, None, 8, cache, False) is None  # no raise (a raise demotes)
    assert torch.equal(q, want)
    assert not _calls("_npu_rotary_embedding")  # the kernel was never reached
    assert npu_double.CALLS == []


def test_kernel_argument_order_as_documented(torch_npu_double, registry):
    """What reached the double: positional order and dtypes as the documentation states."""
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    residual = torch.randn(3, 8, dtype=torch.bfloat16)
    w = torch.randn(8, dtype=torch.bfloat16)
    registry.impl("rms_norm", ASCEND).fn(x.clone(), w, 1e-5)
    (call,) = _calls("npu_rms_norm")
    assert call["gamma"] is w and call["epsilon"] == 1e-5
    xs, rs = x.clone(), residual.clone()
    registry.impl("rms_norm", ASCEND).fn(xs, w, 1e-5, rs)
    (call,) = _calls("npu_add_rms_norm")
    assert call["gamma"] is w and call["epsilon"] == 1e-5
    assert call["x1"] is xs and call["x2"] is rs  # x1 = x, x2 = residual (summed, so any order
    # would add up; the order matters for which output is which: (y, rstd, x1 + x2))
    # the caller's residual receives x1 + x2 (the third output), x the normalized sum (first)
    assert torch.equal(rs, x + residual)
    y, _ = npu_double.npu_rms_norm(x + residual, w, 1e-5)
    assert torch.equal(xs, y)
    # weight=None: ones in x's dtype (the kernel wants gamma in the input dtype)
    registry.impl("rms_norm", ASCEND).fn(x.clone(), None, 1e-6)
    gamma = _calls("npu_rms_norm")[-1]["gamma"]
    assert gamma.dtype == torch.bfloat16 and torch.equal(gamma, torch.ones(8).bfloat16())
    out = registry.impl("silu_and_mul", ASCEND).fn(x)
    (call,) = _calls("npu_swiglu")
    assert call["dim"] == -1
    torch.testing.assert_close(out, (F.silu(x[:, :4].float()) * x[:, 4:].float()).bfloat16())


def test_rms_norm_weight_in_another_dtype_is_served_by_the_reference(torch_npu_double,
                                                                    registry):
    """The kernels take gamma only in the input's dtype (documented): a weight in another
    dtype (the op allows it) is delegated to the reference, never raised on."""
    from fl_dispatch import reference

    fn = registry.impl("rms_norm", ASCEND).fn
    torch.manual_seed(2)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    residual = torch.randn(4, 16, dtype=torch.bfloat16)
    w = torch.randn(16)  # fp32 weight, bf16 activations
    assert torch.equal(fn(x, w, 1e-6), reference("rms_norm")(x, w, 1e-6))
    xs, rs, xr, rr = x.clone(), residual.clone(), x.clone(), residual.clone()
    out = fn(xs, w, 1e-6, rs)
    reference("rms_norm")(xr, w, 1e-6, rr)
    assert out[0] is xs and out[1] is rs
    assert torch.equal(xs, xr) and torch.equal(rs, rr)
    assert npu_double.CALLS == []  # the kernels were never reached
