"""Contract helpers shared by every backend (fl_dispatch.core.opspec)."""

from __future__ import annotations

import fl_dispatch_cuda.ops as cuda_ops
import fl_dispatch_flagos.flaggems as flaggems
import fl_dispatch_flagos.ops as flagos_ops
import pytest
import torch

import fl_dispatch.core.ops as reference
from fl_dispatch.core.opspec import write_out


@pytest.mark.parametrize("impl", [reference.gelu_and_mul, flagos_ops.gelu_and_mul,
                                  cuda_ops.gelu_and_mul, flaggems.gelu_and_mul],
                         ids=["reference", "flagos", "cuda", "flaggems"])
def test_every_gelu_impl_rejects_an_unknown_approximation_alike(impl):
    # each checks before touching its kernel library, so this runs on any machine
    with pytest.raises(ValueError, match=r"^gelu_and_mul: approximate must be 'none' or "
                                         r"'tanh', got 'exact'$"):
        impl(torch.randn(2, 8), "exact")


def test_write_out_returns_result_or_fills_a_strided_out():
    result = torch.randn(3, 4)
    assert write_out(result, None) is result
    buffer = torch.zeros(3, 8)
    out = buffer[:, ::2]
    assert write_out(result, out) is out
    assert torch.equal(buffer[:, ::2], result) and torch.equal(buffer[:, 1::2], torch.zeros(3, 4))
