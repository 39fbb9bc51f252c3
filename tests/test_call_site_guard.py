"""``fl_dispatch.fast`` + ``recover``: the zero-extra-frame path the vLLM glue uses, with
the same fallback semantics as the generated guard of ``fl_dispatch.ops``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import fl_dispatch
from fl_dispatch.core import dispatch
from fl_dispatch.core import ops as reference

PLUGINS = str(Path(__file__).parent / "e2e_plugins")


@pytest.fixture
def flaky(monkeypatch):
    monkeypatch.syspath_prepend(PLUGINS)
    import flaky_backend

    flaky_backend.CALLS["rms_norm"] = 0
    monkeypatch.setenv("VLLM_FL_PLUGIN_MODULES", "flaky_backend")
    monkeypatch.setenv("VLLM_FL_PER_OP", "rms_norm=vendor:flaky|reference")
    fl_dispatch.reset()
    yield flaky_backend
    fl_dispatch.reset()


def call_site(x, w, eps):
    """What fl_dispatch.core.torch_ops / vllm_layers do."""
    f = dispatch.fast.rms_norm
    try:
        return f(x, w, eps)
    except Exception as exc:
        return dispatch.recover("rms_norm", f, exc, (x, w, eps))


def test_fast_is_the_bare_impl_even_with_a_fallback_chain(flaky):
    assert dispatch.fast.rms_norm is flaky.rms_norm
    assert fl_dispatch.ops.rms_norm is not flaky.rms_norm  # the generated guard


def test_call_site_failure_falls_back_once_and_switches_fast(flaky, caplog):
    x, w = torch.randn(3, 16), torch.randn(16)
    caplog.set_level(logging.DEBUG, logger="fl_dispatch")  # the package logger propagates
    first = call_site(x, w, 1e-6)
    second = call_site(x, w, 1e-6)
    expected = reference.rms_norm(x, w, 1e-6)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert flaky.CALLS["rms_norm"] == 1  # demoted after its first failure
    assert dispatch.fast.rms_norm is reference.rms_norm.fn
    logged = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert logged == [
        ("WARNING", "Implementation 'vendor.flaky' failed for op 'rms_norm': "
                    "RuntimeError: flaky kernel: unsupported shape"),
        ("INFO", "Op 'rms_norm' fallback to 'reference.torch' (kind=reference, vendor=None)"),
    ]
    # the generated guard of fl_dispatch.ops follows the same switch
    assert torch.equal(fl_dispatch.ops.rms_norm(x, w, 1e-6), expected)
    assert flaky.CALLS["rms_norm"] == 1
    assert fl_dispatch.get_dispatcher().demoted() == {"rms_norm": ["vendor.flaky"]}


def test_guard_failure_also_switches_fast(flaky):
    x, w = torch.randn(2, 8), torch.randn(8)
    fl_dispatch.ops.rms_norm(x, w, 1e-6)
    assert flaky.CALLS["rms_norm"] == 1
    assert dispatch.fast.rms_norm is reference.rms_norm.fn


def test_strict_mode_call_site_propagates(flaky, monkeypatch):
    monkeypatch.setenv("VLLM_FL_STRICT", "1")
    fl_dispatch.reset()
    x, w = torch.randn(2, 8), torch.randn(8)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="flaky kernel"):
            call_site(x, w, 1e-6)
    assert flaky.CALLS["rms_norm"] == 2
    assert fl_dispatch.get_dispatcher().demoted() == {}


def test_single_impl_call_site_propagates_without_demotion(flaky, monkeypatch):
    monkeypatch.setenv("VLLM_FL_PER_OP", "rms_norm=vendor:flaky")
    fl_dispatch.reset()
    x, w = torch.randn(2, 8), torch.randn(8)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="flaky kernel"):
            call_site(x, w, 1e-6)
    assert dispatch.fast.rms_norm is flaky.rms_norm


def test_torch_custom_op_falls_back(flaky):
    from fl_dispatch.core import torch_ops
    from fl_dispatch.core.ops import BUILTIN_OPS
    torch_ops.define(BUILTIN_OPS)
    x, w = torch.randn(4, 32), torch.randn(32)
    out = torch.ops.fl_dispatch.rms_norm(x, w, 1e-5)
    assert torch.equal(out, reference.rms_norm(x, w, 1e-5))
    r = torch.randn(4, 32)
    xs, rs = x.clone(), r.clone()
    torch.ops.fl_dispatch.fused_add_rms_norm(xs, rs, w, 1e-5)
    ex, er = reference.rms_norm(x.clone(), w, 1e-5, r.clone())
    assert torch.equal(xs, ex) and torch.equal(rs, er)
    assert flaky.CALLS["rms_norm"] == 1
