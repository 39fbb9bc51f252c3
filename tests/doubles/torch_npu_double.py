"""A behavioural double of the ``torch_npu`` calls ``backends/ascend/ops.py`` makes, on CPU.

Written from torch_npu's / CANN's documentation and from how vllm-ascend calls the kernels
(the source of every function is cited next to it); the math is plain PyTorch, rounded the way
the documented kernel (or its documented golden) rounds. Each function also REJECTS what the
documentation says the kernel does not take (dtypes, shapes, layouts), so an adapter that relies
on something undocumented fails here instead of on an Ascend host.

* ``npu_swiglu(input, dim=-1) -> Tensor``
* ``npu_rms_norm(self, gamma, epsilon=1e-6) -> (y, rstd)``
* ``npu_add_rms_norm(x1, x2, gamma, epsilon=1e-6) -> (y, rstd, x)``
* ``_npu_rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)`` in place

While installed (:func:`installed`, or the :func:`torch_npu_double` pytest fixture),
``sys.modules["torch_npu"]`` is this module's fake and ``torch.npu.is_available()`` is True.
Every call is recorded in :data:`CALLS` (name, the arguments as received).
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

CALLS: list[tuple[str, dict[str, Any]]] = []
"""(name, arguments) of every call of the double, in order; cleared on each install."""

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
"""The dtypes every one of these kernels documents ("float16, bfloat16, float32")."""


class KernelArgumentError(RuntimeError):
    """What the double raises where the documented kernel rejects its arguments."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise KernelArgumentError(message)


def _float_input(name: str, t: torch.Tensor) -> None:
    _require(isinstance(t, torch.Tensor), f"{name} must be a Tensor, got {type(t).__name__}")
    _require(t.dtype in _FLOATS, f"{name}: dtype {t.dtype} not supported "
                                 f"(float16, bfloat16, float32)")


# ----------------------------------------------------------------------------- npu_swiglu
# Source: Ascend PyTorch training migration guide, "SwiGlu" operator page
#   https://www.hiascend.com/document/detail/zh/canncommercial/700/foundmodeldev/foundmodeltrain/PT_LMTMOG_000109.html
#   https://www.hiascend.com/document/detail/zh/Pytorch/60RC3/ptmoddevg/trainingmigrguide/performance_tuning_0057.html
#   torch_npu.npu_swiglu(Tensor self, int dim=-1) -> (Tensor); REG_OP(SwiGlu): INPUT x "T",
#   OUTPUT y "T" (T: bf16, fp16, fp32), ATTR dim = -1; x 1-8 dims. The documented equivalent:
#   ``a, b = torch.chunk(x, 2, dim); silu(a) * b`` (silu of the FIRST half).
#   Rounding: computed in fp32, rounded once to the input dtype (y has x's dtype T).
def npu_swiglu(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
    CALLS.append(("npu_swiglu", {"input": input, "dim": dim}))
    _float_input("self", input)
    _require(1 <= input.dim() <= 8, f"self: {input.dim()} dims, supported 1-8")
    _require(input.shape[dim] % 2 == 0,
             f"self: size {input.shape[dim]} along dim {dim} is not even")
    a, b = torch.chunk(input.float(), 2, dim=dim)
    return (F.silu(a) * b).to(input.dtype)


# ----------------------------------------------------------------------------- npu_rms_norm
# Source: torch_npu API reference, "(beta) torch_npu.npu_rms_norm"
#   https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000860.html
#   torch_npu.npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor):
#   output 1 is RmsNorm(x) = x / Rms(x) * g, output 2 the reciprocal of Rms(x) (rstd);
#   gamma's dtype must be self's ("数据类型需要和self保持一致"), its shape self's trailing dims.
#   The operator IR (https://www.hiascend.com/document/detail/zh/Pytorch/60RC3/ptmoddevg/
#   trainingmigrguide/performance_tuning_0024.html): OUTPUT y in x's dtype, OUTPUT rstd DT_FLOAT.
#   rstd's shape (aclnnRmsNorm, https://www.hiascend.com/document/detail/zh/canncommercial/80RC2/
#   apiref/appdevgapi/context/aclnnRmsNorm.md): shape_rstd * shape_gamma = shape_x, e.g.
#   x (4,1,4096), gamma (4096,) -> rstd (4,1,1).
#   Rounding as op-plugin's golden (test/test_custom_ops/test_npu_add_rms_norm.py, repo
#   Ascend/op-plugin): x in fp32, x * rstd * gamma in fp32, one cast to x's dtype.
def _check_gamma(x: torch.Tensor, gamma: torch.Tensor) -> int:
    _float_input("gamma", gamma)
    _require(gamma.dtype == x.dtype, f"gamma: dtype {gamma.dtype}, must be the input's "
                                     f"{x.dtype}")
    n = gamma.dim()
    _require(1 <= n <= x.dim() and tuple(x.shape[x.dim() - n:]) == tuple(gamma.shape),
             f"gamma: shape {tuple(gamma.shape)} is not the trailing dims of "
             f"{tuple(x.shape)}")
    return n


def _rms(s: torch.Tensor, gamma: torch.Tensor, n: int, epsilon: float,
         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) of the fp32 ``s`` normalized over its last ``n`` dims."""
    dims = tuple(range(s.dim() - n, s.dim()))
    rstd = torch.rsqrt(s.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return (s * rstd * gamma.float()).to(dtype), rstd


def npu_rms_norm(self: torch.Tensor, gamma: torch.Tensor,
                 epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    CALLS.append(("npu_rms_norm", {"self": self, "gamma": gamma, "epsilon": epsilon}))
    _float_input("self", self)
    _require(1 <= self.dim() <= 8, f"self: {self.dim()} dims, supported 1-8")
    n = _check_gamma(self, gamma)
    return _rms(self.float(), gamma, n, epsilon, self.dtype)


# ----------------------------------------------------------------------------- npu_add_rms_norm
# Source: torch_npu's own test of the op, repo Ascend/op-plugin,
#   test/test_custom_ops/test_npu_add_rms_norm.py (https://gitcode.com/Ascend/op-plugin/blob/
#   26.0.0/test/test_custom_ops/test_npu_add_rms_norm.py):
#   ``y, rstd, x = torch_npu.npu_add_rms_norm(x1, x2, gamma, epsilon)`` -- the return order is
#   (y, rstd, x) with x = x1 + x2; its golden adds in the input dtype, normalizes that sum in
#   fp32 and casts y (and x) to the input dtype once.
#   CANN aclnnAddRmsNorm (https://www.hiascend.com/document/detail/zh/CANNCommunityEdition/
#   850alpha002/API/aolapi/context/aclnnAddRmsNorm.md): outputs yOut, rstdOut (FLOAT), xOut;
#   x2's shape and dtype must be x1's; gamma's dtype x1's, its shape x1's trailing dims; 1-8 dims.
#   vllm-ascend calls it the same way: ``x, _, residual = torch_npu.npu_add_rms_norm(x, residual,
#   self.weight, self.variance_epsilon)`` (vllm_ascend/ops/layernorm.py).
def npu_add_rms_norm(x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor,
                     epsilon: float = 1e-6
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    CALLS.append(("npu_add_rms_norm", {"x1": x1, "x2": x2, "gamma": gamma,
                                       "epsilon": epsilon}))
    _float_input("x1", x1)
    _float_input("x2", x2)
    _require(1 <= x1.dim() <= 8, f"x1: {x1.dim()} dims, supported 1-8")
    _require(x2.shape == x1.shape and x2.dtype == x1.dtype,
             f"x2: {tuple(x2.shape)} {x2.dtype} must match x1's {tuple(x1.shape)} {x1.dtype}")
    n = _check_gamma(x1, gamma)
    x = x1 + x2  # in the input dtype (torch rounds the exact sum once, as the kernel's Add)
    y, rstd = _rms(x.float(), gamma, n, epsilon, x1.dtype)
    return y, rstd, x


# ----------------------------------------------------------------------------- rotary
# Source: vllm-ascend's calls (repo vllm-project/vllm-ascend, vllm_ascend/ops/rotary_embedding.py
#   at dde6c59^, i.e. before #13631 replaced it; and vllm_ascend/_310p/ops/rotary_embedding.py):
#     query = query.contiguous().view(query.shape[0], -1)      # "TODO: Remove the contiguous"
#     key = key.contiguous().view(key.shape[0], -1)
#     torch_npu._npu_rotary_embedding(positions, query, key, head_size, cos_sin_cache,
#                                     is_neox_style)            # in place; returns nothing used
#   and, for partial rotary (rotary_dim < head_size), it slices the rotary part, makes it a
#   contiguous [T, heads * rotary_dim] and passes head_size=rotary_dim ("only the rotary part is
#   processed here, the dimension should be rotary_dim"); the cache is cast to query's dtype.
#   torch_npu's own test (repo Ascend/op-plugin, test/test_custom_ops/test_atb_rope.py): 2-D
#   fp16 query/key [T, heads * head_dim], cache [max_pos, head_dim] (cos half, sin half, fp32 in
#   that test), head_size = head_dim = the cache width; the golden rotates in query's dtype with
#   cos/sin cast to it, in place. So: 2-D, contiguous, head_size == cos_sin_cache.shape[-1].
def _npu_rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                          head_size: int, cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    CALLS.append(("_npu_rotary_embedding", {
        "positions": positions, "query": query, "key": key, "head_size": head_size,
        "cos_sin_cache": cos_sin_cache, "is_neox": is_neox}))
    _require(isinstance(key, torch.Tensor), "key is required (a Tensor)")
    _require(not positions.is_floating_point() and positions.dim() == 1,
             f"positions: a 1-D integer tensor, got {positions.dim()}-D {positions.dtype}")
    _require(cos_sin_cache.dim() == 2 and cos_sin_cache.shape[-1] == head_size,
             f"cos_sin_cache: must be [max_position, head_size={head_size}] (the kernel rotates "
             f"whole heads), got {tuple(cos_sin_cache.shape)}")
    num_tokens = positions.shape[0]
    for name, t in (("query", query), ("key", key)):
        _float_input(name, t)
        _require(t.dim() == 2 and t.shape[0] == num_tokens,
                 f"{name}: must be [num_tokens={num_tokens}, heads * head_size], "
                 f"got {tuple(t.shape)}")
        # the kernel reads and writes dense rows: a strided view would be garbled
        _require(t.is_contiguous(), f"{name}: must be contiguous, stride {t.stride()}")
        _require(t.shape[1] % head_size == 0,
                 f"{name}: width {t.shape[1]} is not a multiple of head_size {head_size}")
    _require(key.dtype == query.dtype, f"key dtype {key.dtype} != query dtype {query.dtype}")
    _require(cos_sin_cache.dtype in (query.dtype, torch.float32),
             f"cos_sin_cache: dtype {cos_sin_cache.dtype}")
    cos, sin = cos_sin_cache.index_select(0, positions.long()).chunk(2, dim=-1)
    cos = cos.unsqueeze(-2).to(query.dtype)
    sin = sin.unsqueeze(-2).to(query.dtype)
    for t in (query, key):
        x = t.view(num_tokens, -1, head_size)
        if is_neox:
            x1, x2 = torch.chunk(x, 2, dim=-1)
            rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = x[..., ::2], x[..., 1::2]
            rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        x.copy_(rotated)


# ----------------------------------------------------------------------------- installing
def make_module() -> types.ModuleType:
    """A fresh fake ``torch_npu`` module holding exactly the four calls."""
    module = types.ModuleType("torch_npu")
    module.__doc__ = "Behavioural double of torch_npu (tests/doubles/torch_npu_double.py)."
    module.__file__ = __file__
    for fn in (npu_swiglu, npu_rms_norm, npu_add_rms_norm, _npu_rotary_embedding):
        setattr(module, fn.__name__, fn)
    module.CALLS = CALLS  # type: ignore[attr-defined]
    return module


def make_torch_npu_namespace() -> types.SimpleNamespace:
    """The fake ``torch.npu``: an NPU is "present"."""
    return types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1,
                                 synchronize=lambda device=None: None)


@contextlib.contextmanager
def installed(monkeypatch: pytest.MonkeyPatch | None = None) -> Iterator[types.ModuleType]:
    """Install the double (``sys.modules['torch_npu']``, ``torch.npu``) for the block; both
    are restored after it (through ``monkeypatch`` when given)."""
    own = monkeypatch is None
    mp = pytest.MonkeyPatch() if own else monkeypatch
    module = make_module()
    CALLS.clear()
    try:
        mp.setitem(sys.modules, "torch_npu", module)
        mp.setattr(torch, "npu", make_torch_npu_namespace(), raising=False)
        yield module
    finally:
        CALLS.clear()
        if own:
            mp.undo()


@pytest.fixture
def torch_npu_double(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """pytest fixture: the double installed for one test (removed after it)."""
    with installed(monkeypatch) as module:
        yield module
