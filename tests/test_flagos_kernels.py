"""Our Triton kernels (the flagos backend) against the reference backend, on fresh inputs.

CPU (CI): the kernels run in Triton's interpreter. ``TRITON_INTERPRET=1`` is set by the
``triton_mode`` fixture (conftest.py) for each test of this module only: Triton reads the
variable when a kernel is decorated (our launcher decorates on first launch, per mode) and
when it is launched, never at import, so other test modules in the same process keep their
own environment.
GPU: ``FL_FLAGOS_TEST_DEVICE=cuda python -m pytest tests/test_flagos_kernels.py`` runs the same
tests compiled on CUDA tensors, plus the cached-launcher checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch
from fl_dispatch_flagos import capability, flaggems

import fl_dispatch.core.ops as ref
from fl_dispatch.testing.tolerances import tolerance

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("triton_mode")]

DEVICE = os.environ.get("FL_FLAGOS_TEST_DEVICE", "cpu")
ON_GPU = DEVICE != "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = 1e-6


def _ops():
    from fl_dispatch_flagos import ops  # after the fixture: the kernels load lazily anyway

    return ops


def _randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(dtype).to(DEVICE)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    tol = tolerance(None, dtype or want.dtype)
    atol, rtol = tol.atol, tol.rtol
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not got.isnan().any(), "NaN in the result: an element was not written"
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=atol, rtol=rtol)


def _poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan"))


# ----------------------------------------------------------------------------- activations

ACTS = [("silu", None), ("gelu", "none"), ("gelu", "tanh")]
ACT_SHAPES = [(1, 16), (3, 64), (5, 200), (2, 3, 96)]


def _act(ops_mod, name: str, approx: str | None, x, out=None):
    if name == "silu":
        return ops_mod.silu_and_mul(x, out) if out is not None else ops_mod.silu_and_mul(x)
    if out is not None:
        return ops_mod.gelu_and_mul(x, approx, out)
    return ops_mod.gelu_and_mul(x, approx)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=str)
@pytest.mark.parametrize("name,approx", ACTS)
def test_act_and_mul_new_tensor(name, approx, shape, dtype):
    x = _randn(*shape, dtype=dtype, scale=3.0)
    before = x.clone()
    got = _act(_ops(), name, approx, x)
    _close(got, _act(ref, name, approx, x))
    assert torch.equal(x, before), "the input changed"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,approx", ACTS)
def test_act_and_mul_strided_input_and_out(name, approx, dtype):
    rows, d = 4, 48
    wide = _randn(rows, 2 * d + 24, dtype=dtype, scale=3.0)
    x = wide[:, 8:8 + 2 * d]  # row-strided view
    want = _act(ref, name, approx, x)
    # out given, contiguous
    out = _poison(torch.empty(rows, d, dtype=dtype, device=DEVICE))
    assert _act(_ops(), name, approx, x, out) is out
    _close(out, want)
    # out given, a row-strided view of a larger buffer: the rest of the buffer stays
    obuf = _poison(torch.empty(rows, d + 16, dtype=dtype, device=DEVICE))
    out = obuf[:, 16:]
    assert _act(_ops(), name, approx, x, out) is out
    _close(out, want)
    assert obuf[:, :16].isnan().all()
    # out given with a non-unit last stride (transposed storage)
    out = _poison(torch.empty(d, rows, dtype=dtype, device=DEVICE)).t()
    assert _act(_ops(), name, approx, x, out) is out
    _close(out, want)
    # input with a non-unit last stride
    xt = x.t().contiguous().t()
    _close(_act(_ops(), name, approx, xt), want)


def test_act_and_mul_in_row_chunks(monkeypatch):
    """Batches beyond CUDA's grid-axis-1 limit launch in chunks of rows."""
    monkeypatch.setattr(_ops(), "_MAX_GRID_Y", 2)
    x = _randn(5, 64, dtype=torch.float32)
    _close(_ops().silu_and_mul(x), ref.silu_and_mul(x))


def test_act_and_mul_rejects_bad_arguments():
    x = _randn(2, 8, dtype=torch.float32)
    with pytest.raises(ValueError):
        _ops().gelu_and_mul(x, "exact")
    with pytest.raises(ValueError):
        _ops().silu_and_mul(_randn(2, 7, dtype=torch.float32))
    with pytest.raises(ValueError):
        _ops().silu_and_mul(x, torch.empty(3, 4, device=DEVICE))


# ----------------------------------------------------------------------------- rms_norm

NORM_SHAPES = [(1, 32), (4, 100), (3, 2, 64), (2, 9000)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("weight_kind", ["same", "none", "fp32"])
def test_rms_norm(shape, dtype, weight_kind):
    x = _randn(*shape, dtype=dtype, scale=2.0)
    n = shape[-1]
    weight = {"same": _randn(n, dtype=dtype), "none": None,
              "fp32": _randn(n, dtype=torch.float32)}[weight_kind]
    before = x.clone()
    got = _ops().rms_norm(x, weight, EPS)
    _close(got, ref.rms_norm(x, weight, EPS))
    assert torch.equal(x, before), "rms_norm without residual must not change x"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_views_and_weight_layouts(dtype):
    """The 2-D fast path: row-strided x (one row and several), a strided weight (general
    path), a weight of the wrong length (rejected); results are fresh row-major tensors."""
    n = 48
    buf = _randn(4, 2 * n + 8, dtype=dtype, scale=2.0)
    wbuf = _randn(2 * n, dtype=dtype)
    for x in (buf[:, 8:8 + n], buf[1:2, 8:8 + n], buf[:, :n].contiguous()):
        for weight in (wbuf[:n], wbuf[::2], None):
            before = buf.clone()
            got = _ops().rms_norm(x, weight, EPS)
            _close(got, ref.rms_norm(x, weight, EPS))
            assert got.is_contiguous() and got.shape == x.shape and got.dtype == x.dtype
            assert torch.equal(buf, before), "rms_norm without residual must not change x"
    with pytest.raises(ValueError):
        _ops().rms_norm(buf[:, :n], wbuf[:n - 1], EPS)
    with pytest.raises(ValueError):
        _ops().rms_norm(buf[:, :n], wbuf[:n - 1], EPS, buf[:, n:2 * n].clone())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [64, 200, 9000])
@pytest.mark.parametrize("with_weight", [True, False])
def test_fused_add_rms_norm_in_place_on_strided_views(dtype, n, with_weight):
    rows = 3
    xbuf = _randn(rows, n + 40, dtype=dtype, scale=2.0)
    rbuf = _randn(rows, 2 * n, dtype=dtype, scale=2.0)
    weight = _randn(n, dtype=dtype) if with_weight else None
    xbuf_ref, rbuf_ref = xbuf.clone(), rbuf.clone()
    x, residual = xbuf[:, 8:8 + n], rbuf[:, n:]
    rx, rr = _ops().rms_norm(x, weight, EPS, residual)
    assert rx is x and rr is residual
    ref.rms_norm(xbuf_ref[:, 8:8 + n], weight, EPS, rbuf_ref[:, n:])
    _close(rbuf, rbuf_ref)  # includes the untouched columns
    _close(xbuf, xbuf_ref)
    assert torch.equal(xbuf[:, :8], xbuf_ref[:, :8]) and torch.equal(rbuf[:, :n], rbuf_ref[:, :n])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_add_rms_norm_uncollapsible_views_and_mixed_residual(dtype):
    n = 32
    big = _randn(2, 3, 2 * n, dtype=dtype)
    x = big[:, :2, :n]  # leading dims do not collapse: the copy-and-write-back path
    residual = _randn(2, 2, n, dtype=torch.float32)  # residual in another dtype
    weight = _randn(n, dtype=dtype)
    big_ref, res_ref = big.clone(), residual.clone()
    _ops().rms_norm(x, weight, EPS, residual)
    ref.rms_norm(big_ref[:, :2, :n], weight, EPS, res_ref)
    _close(big, big_ref)
    _close(residual, res_ref, dtype)


# ----------------------------------------------------------------------------- rotary

def _cache(max_pos: int, rotary_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """A cos/sin cache from real angles (cos first half, sin second half)."""
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    ang = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=-1).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [16, 8], ids=["full", "partial"])
@pytest.mark.parametrize("cache_fp32", [True, False], ids=["cache32", "cachesame"])
def test_rotary_in_place_on_qkv_views(dtype, is_neox, rotary_dim, cache_fp32):
    tokens, hq, hk, d = 5, 4, 2, 16
    qkv = _randn(tokens, (hq + 2 * hk) * d, dtype=dtype, scale=2.0)
    cache = _cache(64, rotary_dim, torch.float32 if cache_fp32 else dtype)
    positions = torch.randint(0, 64, (tokens,)).to(DEVICE)
    qkv_ref = qkv.clone()
    q, k = qkv[:, :hq * d], qkv[:, hq * d:(hq + hk) * d]  # row-strided views
    assert _ops().rotary_embedding(positions, q, k, d, cache, is_neox) is None
    ref.rotary_embedding(positions, qkv_ref[:, :hq * d], qkv_ref[:, hq * d:(hq + hk) * d], d,
                         cache, is_neox)
    _close(qkv, qkv_ref)
    # the value part and the non-rotated features are bit-identical
    assert torch.equal(qkv[:, (hq + hk) * d:], qkv_ref[:, (hq + hk) * d:])
    heads = qkv.view(tokens, -1, d)[:, :hq + hk, rotary_dim:]
    assert torch.equal(heads, qkv_ref.view(tokens, -1, d)[:, :hq + hk, rotary_dim:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_rotary_key_none_and_3d_layouts(dtype, is_neox):
    tokens, hq, hk, d = 6, 3, 1, 32
    cache = _cache(40, 24, torch.float32)
    positions = torch.randint(0, 40, (2, 3)).to(DEVICE)  # flattened like the reference
    q = _randn(tokens, hq, d, dtype=dtype)
    q_ref = q.clone()
    _ops().rotary_embedding(positions, q, None, d, cache, is_neox)
    ref.rotary_embedding(positions, q_ref, None, d, cache, is_neox)
    _close(q, q_ref)
    # 3-D with strided heads, key with a non-unit feature stride (copy-and-write-back path)
    qbuf = _randn(tokens, hq, d + 8, dtype=dtype)
    kbuf = _randn(tokens, d, hk, dtype=dtype)
    q, k = qbuf[:, :, :d], kbuf.transpose(1, 2)
    qbuf_ref, kbuf_ref = qbuf.clone(), kbuf.clone()
    _ops().rotary_embedding(positions, q, k, d, cache, is_neox)
    ref.rotary_embedding(positions, qbuf_ref[:, :, :d], kbuf_ref.transpose(1, 2), d, cache,
                         is_neox)
    _close(qbuf, qbuf_ref)
    _close(kbuf, kbuf_ref)


def test_rotary_changes_the_rotated_features():
    """Guards the comparisons above: a kernel that wrote nothing would fail here."""
    tokens, d = 3, 16
    cache = _cache(16, d, torch.float32)
    positions = torch.tensor([3, 7, 11]).to(DEVICE)
    q = _randn(tokens, 2 * d, dtype=torch.float32)
    before = q.clone()
    _ops().rotary_embedding(positions, q, None, d, cache, True)
    assert (q - before).abs().max() > 0.1


# ----------------------------------------------------------------------------- launcher

def test_kernels_decorated_for_the_current_mode():
    ops = _ops()
    _ops().silu_and_mul(_randn(1, 8, dtype=torch.float32))
    jit = ops.ACT_KERNEL.jit()
    if ON_GPU:
        import triton

        assert isinstance(jit, triton.runtime.jit.JITFunction)
    else:
        from triton.runtime.interpreter import InterpretedFunction

        assert isinstance(jit, InterpretedFunction)


class _Spy:
    """Stands in for a TritonKernel: records (key, args) of each launch."""

    def __init__(self):
        self.calls: list[tuple[tuple, tuple]] = []

    def launch(self, key, grid, device, tensors, ptrs, rest, num_warps):
        assert list(ptrs) == [t.data_ptr() for t in tensors]
        self.calls.append((key, (*tensors, *rest, num_warps)))

    def cached(self, key):  # nothing cached: hot adapters fall back to launch
        return None


def _triton_specialization(args, nospec: tuple[int, ...]) -> tuple:
    """Triton's own specialization of each argument (what its kernel cache keys on)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    out = []
    for i, a in enumerate(args):
        if isinstance(a, bool) or a is None:
            out.append(("constexpr", a))
        else:
            spec = native_specialize_impl(BaseBackend, a, False, i not in nospec, True)
            out.append(tuple(spec))
    return tuple(out)


def test_launch_keys_are_at_least_as_fine_as_triton_specialization(monkeypatch):
    """Two launches with one key must have one Triton specialization, or the cached launcher
    would run a kernel compiled for other alignments/strides/dtypes."""
    try:
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no native specializer (Triton >= 3.5 has)")
    ops = _ops()
    spies = {name: _Spy() for name in ("ACT_KERNEL", "NORM_KERNEL", "ROTARY_KERNEL")}
    for name, spy in spies.items():
        monkeypatch.setattr(ops, name, spy)
    cpu = torch.device("cpu")
    for offset in (0, 1, 8):
        for dtype in (torch.float16, torch.float32):
            for n in (16, 17, 32):
                buf = torch.randn(4 * (2 * n + 9), dtype=dtype, device=cpu)
                x = buf[offset:offset + 3 * (2 * n + 1)].view(3, 2 * n + 1)[:, :2 * n]
                ops.silu_and_mul(x)
                ops.gelu_and_mul(x[:1], "tanh")
                ops.rms_norm(x[:, :n], None, EPS)
                ops.rms_norm(x[:, :n], torch.ones(n, dtype=dtype), EPS, x[:, n:])
                q = x[:, :n]
                ops.rotary_embedding(torch.arange(3), q, None, n, torch.randn(8, n // 2 * 2),
                                     True)
                ops.rotary_embedding(torch.arange(1), q[:1, :16], q[1:2, :16], 16,
                                     torch.randn(8, 8).to(dtype), False)
    nospec = {"ACT_KERNEL": (), "NORM_KERNEL": (4,), "ROTARY_KERNEL": ()}
    for name, spy in spies.items():
        assert spy.calls, name
        seen: dict[tuple, tuple] = {}
        for key, args in spy.calls:
            spec = _triton_specialization(args, nospec[name])
            assert seen.setdefault(key, spec) == spec, f"{name}: key {key} covers two kernels"


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="the cached launcher only exists for compiled kernels")
def test_cached_launcher_takes_the_fast_path_and_agrees():
    ops = _ops()
    x = _randn(7, 2 * 320, dtype=torch.bfloat16)
    first = ops.silu_and_mul(x)
    slow = ops.ACT_KERNEL.slow_launches
    for _ in range(3):
        again = ops.silu_and_mul(x)
        assert torch.equal(again, first)
    assert ops.ACT_KERNEL.slow_launches == slow, "later calls must bypass JITFunction.run"
    assert ops.ACT_KERNEL.cached_keys >= 1
    # a new specialization (misaligned view) takes the slow path once, and is right
    y = _randn(7, 2 * 320 + 1, dtype=torch.bfloat16)[:, 1:]
    _close(ops.silu_and_mul(y), ref.silu_and_mul(y))
    assert ops.ACT_KERNEL.slow_launches == slow + 1


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="the cached launcher only exists for compiled kernels")
def test_rms_norm_fast_path_takes_the_cached_launcher_and_agrees():
    """rms_norm's inline fast path (plain and fused) calls the cached launcher itself."""
    ops = _ops()
    x = _randn(5, 256, dtype=torch.bfloat16, scale=2.0)
    w = _randn(256, dtype=torch.bfloat16)
    first = ops.rms_norm(x, w, EPS)
    r0 = _randn(5, 256, dtype=torch.bfloat16)
    xf, rf = x.clone(), r0.clone()
    ops.rms_norm(xf, w, EPS, rf)
    slow = ops.NORM_KERNEL.slow_launches
    for _ in range(3):
        assert torch.equal(ops.rms_norm(x, w, EPS), first)
        xa, ra = x.clone(), r0.clone()
        ops.rms_norm(xa, w, EPS, ra)
        assert torch.equal(xa, xf) and torch.equal(ra, rf)
    assert ops.NORM_KERNEL.slow_launches == slow, "later calls must bypass JITFunction.run"
    _close(first, ref.rms_norm(x, w, EPS))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_ops_capture_in_a_cuda_graph():
    ops = _ops()
    x = _randn(16, 4096, dtype=torch.bfloat16)
    r = _randn(16, 4096, dtype=torch.bfloat16)
    w = _randn(4096, dtype=torch.bfloat16)
    ops.rms_norm(x.clone(), w, EPS, r.clone())  # compile outside the capture
    xs, rs = x.clone(), r.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.rms_norm(xs, w, EPS, rs)
    xs.copy_(x), rs.copy_(r)
    graph.replay()
    x_ref, r_ref = x.clone(), r.clone()
    ref.rms_norm(x_ref, w, EPS, r_ref)
    _close(xs, x_ref)
    _close(rs, r_ref)


# ----------------------------------------------------------------------------- capability

def test_capability_interpreter_makes_it_available(monkeypatch):
    monkeypatch.setattr(capability, "gpu_unavailable_reason", lambda: "no GPU here")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert capability.unavailable_reason() is None


def test_capability_without_interpreter_or_gpu_gives_the_reason(monkeypatch):
    monkeypatch.setattr(capability, "gpu_unavailable_reason", lambda: "no GPU here")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = capability.unavailable_reason()
    assert isinstance(reason, str) and "no GPU here" in reason and "TRITON_INTERPRET" in reason


def test_capability_on_this_machine(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = capability.unavailable_reason()
    if torch.cuda.is_available():
        assert reason is None
    else:
        assert isinstance(reason, str) and "TRITON_INTERPRET" in reason


def test_capability_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    reason = capability.unavailable_reason()
    assert isinstance(reason, str) and "triton" in reason


def test_registration_imports_no_kernels():
    code = (
        "import sys\n"
        "from fl_dispatch.core.ops import BUILTIN_OPS\n"
        "from fl_dispatch.core.registry import Registry, Registrar\n"
        "import fl_dispatch_flagos as plugin\n"
        "reg = Registry(BUILTIN_OPS); r = Registrar(reg, 'flagos')\n"
        "plugin.fl_dispatch_register_impls(r); r.commit()\n"
        "ids = sorted((i.op, i.impl_id, i.priority) for i in reg.all_impls())\n"
        "print(ids)\n"
        "bad = [m for m in sys.modules if m.startswith(('triton', 'flag_gems'))\n"
        "       or m.startswith('fl_dispatch_flagos.kernels')]\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    for op in ("silu_and_mul", "gelu_and_mul", "rms_norm", "rotary_embedding"):
        assert f"('{op}', 'default.flagos', 150)" in done.stdout
    assert "('rms_norm', 'default.flagos.flaggems', 140)" in done.stdout


# ----------------------------------------------------------------------------- FlagGems

def _policy(use=True, whitelist=None, blacklist=None, path="/tmp/x.txt"):
    s = types.SimpleNamespace
    return s(use_flaggems=s(value=use, source="env:USE_FLAGGEMS"),
             flagos_whitelist=s(value=whitelist, source="default"),
             flagos_blacklist=s(value=blacklist, source="default"),
             flaggems_oplist_path=s(value=path, source="default"))


class _FakeFlagGems(types.ModuleType):
    """What our code uses of flag_gems, with the reference's semantics (and FlagGems' habit of
    returning contiguous copies from the fused add + norm)."""

    __version__ = "0.0-fake"

    def __init__(self):
        super().__init__("flag_gems")
        self.calls: list[tuple] = []
        self._ops: list[str] = []

    def enable(self, unused=None):
        self.calls.append(("enable", list(unused)))
        self._ops = sorted({"add.Tensor", "mm", "rms_norm"} - set(unused))

    def only_enable(self, include=None):
        self.calls.append(("only_enable", list(include)))
        self._ops = sorted(include)

    def all_registered_ops(self):
        return self._ops

    @staticmethod
    def silu_and_mul(a, b):
        return torch.nn.functional.silu(a) * b

    @staticmethod
    def gelu_and_mul(a, b, approximate="none"):
        return torch.nn.functional.gelu(a, approximate=approximate) * b

    @staticmethod
    def rms_norm(x, shape, w, eps):
        return ref.rms_norm(x, w, eps)

    @staticmethod
    def fused_add_rms_norm(x, r, shape, w, eps):
        x, r = x.contiguous().clone(), r.contiguous().clone()
        return ref.rms_norm(x, w, eps, r)


@pytest.fixture
def fake_flag_gems(monkeypatch):
    fake = _FakeFlagGems()
    monkeypatch.setitem(sys.modules, "flag_gems", fake)
    flaggems._import.cache_clear()
    yield fake
    flaggems._import.cache_clear()


def test_flaggems_unavailable_reason_here():
    flaggems._import.cache_clear()
    try:
        import flag_gems  # noqa: F401
    except Exception:
        reason = flaggems.flaggems_unavailable_reason()
        assert isinstance(reason, str) and "flag_gems" in reason
        assert "FlagGems unavailable" in flaggems.enable_flaggems(_policy())
    else:
        assert flaggems.flaggems_unavailable_reason() is None
    finally:
        flaggems._import.cache_clear()


def test_enable_flaggems_off_by_policy(fake_flag_gems):
    line = flaggems.enable_flaggems(_policy(use=False))
    assert "off" in line and "USE_FLAGGEMS" in line and not fake_flag_gems.calls


def test_enable_flaggems_whitelist_and_record(fake_flag_gems, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    line = flaggems.enable_flaggems(
        _policy(whitelist=("rms_norm", "mm"), path=str(tmp_path / "ops.txt")))
    assert fake_flag_gems.calls == [("only_enable", ["rms_norm", "mm"])]
    record = tmp_path / "ops.rank3.txt"
    assert record.read_text().split() == ["mm", "rms_norm"]
    assert "only_enable" in line and "2 aten ops" in line and str(record) in line


def test_enable_flaggems_blacklist_pid_record(fake_flag_gems, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    flaggems.enable_flaggems(_policy(blacklist=("mm",), path=str(tmp_path / "ops.txt")))
    assert fake_flag_gems.calls == [("enable", ["mm"])]
    record = tmp_path / f"ops.pid{os.getpid()}.txt"
    assert record.read_text().split() == ["add.Tensor", "rms_norm"]


def test_flaggems_adapters_keep_the_contracts(fake_flag_gems):
    assert flaggems.flaggems_unavailable_reason() is None
    x = torch.randn(3, 16)
    out = torch.full((3, 8), float("nan"))
    assert flaggems.silu_and_mul(x, out) is out
    torch.testing.assert_close(out, ref.silu_and_mul(x))
    torch.testing.assert_close(flaggems.gelu_and_mul(x, "tanh"), ref.gelu_and_mul(x, "tanh"))
    torch.testing.assert_close(flaggems.rms_norm(x, None, EPS), ref.rms_norm(x, None, EPS))
    xbuf, rbuf = torch.randn(3, 24), torch.randn(3, 20)
    xb_ref, rb_ref = xbuf.clone(), rbuf.clone()
    w = torch.randn(16)
    rx, rr = flaggems.rms_norm(xbuf[:, 8:], w, EPS, rbuf[:, 4:])
    ref.rms_norm(xb_ref[:, 8:], w, EPS, rb_ref[:, 4:])
    torch.testing.assert_close(xbuf, xb_ref)
    torch.testing.assert_close(rbuf, rb_ref)


def test_interpreter_bf16_rounding_matches_torch():
    from fl_dispatch_flagos.interpreter_rounding import rtne_fp32_to_bf16_bits

    x = torch.cat([torch.randn(10000) * 100, torch.tensor([0.0, -0.0, float("inf"),
                                                          float("-inf"), 3.4e38, 1e-40])])
    bits = torch.from_numpy(rtne_fp32_to_bf16_bits(x.numpy()).astype("int16"))
    assert torch.equal(bits, x.to(torch.bfloat16).view(torch.int16))
    nan = rtne_fp32_to_bf16_bits(torch.tensor([float("nan")]).numpy())
    assert torch.from_numpy(nan.astype("int16")).view(torch.bfloat16).isnan().all()


@pytest.mark.skipif(ON_GPU, reason="about the CPU interpreter")
def test_interpreter_works_when_triton_was_imported_without_it():
    """In one pytest process other tests may import Triton (torch.compile, say) before ours
    set TRITON_INTERPRET; the kernels must still run in the interpreter then."""
    code = (
        "import os, torch, triton, triton.language\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import fl_dispatch_flagos.ops as ops, fl_dispatch.core.ops as ref\n"
        "x = torch.randn(3, 40); r = torch.randn(3, 40); w = torch.randn(40)\n"
        "torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))\n"
        "torch.testing.assert_close(ops.silu_and_mul(x), ref.silu_and_mul(x))\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("stream", [0, 1, 2])
def test_act_and_mul_streaming_variants(monkeypatch, stream):
    """The cache-hint variants used for tensors larger than L2 compute the same."""
    ops = _ops()
    monkeypatch.setattr(ops, "act_config", lambda rows, d, act, dev: (64, 2, stream, act))
    x = _randn(3, 2 * 100, dtype=torch.bfloat16, scale=3.0)
    _close(ops.silu_and_mul(x), ref.silu_and_mul(x))
    _close(ops.gelu_and_mul(x, "tanh"), ref.gelu_and_mul(x, "tanh"))


class _Launcher36:
    """The shape of Triton 3.4-3.6's CudaLauncher (its __call__ only adds scratch buffers)."""

    launch_cooperative_grid, launch_pdl = False, True
    global_scratch_size = profile_scratch_size = 0

    def __init__(self):
        self.calls: list[tuple] = []
        self.launch = lambda *args: self.calls.append(("c", args))

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        self.calls.append(("py", (gridX, gridY, gridZ, stream, function, *args)))


class _Launcher39(_Launcher36):
    """Triton >= 3.5 names the launch metadata and hooks, and passes annotations to C."""

    arg_annotations = ()

    def __call__(self, gridX, gridY, gridZ, stream, function, kernel_metadata,
                 launch_metadata, launch_enter_hook, launch_exit_hook, *args):
        self.calls.append(("py", (gridX, gridY, gridZ, stream, function, kernel_metadata,
                                  launch_metadata, launch_enter_hook, launch_exit_hook,
                                  *args)))


@pytest.mark.parametrize("cls,scratch,direct", [(_Launcher36, 0, True), (_Launcher39, 0, False),
                                                (_Launcher36, 64, False)])
def test_cached_launch_argument_layout(monkeypatch, cls, scratch, direct):
    from fl_dispatch_flagos import launcher as launcher_mod

    run = cls()
    run.global_scratch_size = scratch
    compiled = types.SimpleNamespace(run=run, function=1234, packed_metadata=("meta",))
    kern = launcher_mod.TritonKernel("unused", "unused")
    monkeypatch.setattr(launcher_mod, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(launcher_mod, "_hooks_active", lambda: False)
    monkeypatch.setattr(kern, "jit", lambda: {(2, 3, 1): lambda *a, **k: compiled})
    monkeypatch.setattr(launcher_mod, "_stream_getter", lambda: lambda dev: 77)
    kern.launch(("k",), (2, 3, 1), 0, ("t1", "t2"), (10, 20), (5, True), 4)  # slow: compiles
    assert kern.slow_launches == 1 and kern.cached_keys == 1 and not run.calls
    kern.launch(("k",), (2, 3, 1), 0, ("t1", "t2"), (10, 20), (5, True), 4)  # fast
    assert kern.slow_launches == 1
    kind, args = run.calls[-1]
    assert kind == ("c" if direct else "py")
    tail = (("meta",), None, None, None, 10, 20, 5, True)
    if direct:
        assert args == (2, 3, 1, 77, 1234, False, True, None, None) + tail
    else:
        assert args == (2, 3, 1, 77, 1234) + tail


@pytest.mark.parametrize("stream", [0, 1, 2])
@pytest.mark.parametrize("block_m", [1, 2])
def test_rms_norm_streaming_and_row_block_variants(monkeypatch, stream, block_m):
    """The norm configurations the sweep tries (cache hints, rows per program) compute the
    same, plain and fused."""
    ops = _ops()
    monkeypatch.setattr(ops, "norm_config",
                        lambda rows, n, res=False, dev=-1: (block_m, 128, True, 2, stream))
    x = _randn(5, 100, dtype=torch.bfloat16, scale=2.0)
    w = _randn(100, dtype=torch.bfloat16)
    _close(ops.rms_norm(x, w, EPS), ref.rms_norm(x, w, EPS))
    r = _randn(5, 100, dtype=torch.bfloat16)
    xa, ra, xb, rb = x.clone(), r.clone(), x.clone(), r.clone()
    ops.rms_norm(xa, w, EPS, ra)
    ref.rms_norm(xb, w, EPS, rb)
    _close(xa, xb)
    _close(ra, rb)


def test_tuned_configs_replace_the_defaults_per_device(monkeypatch):
    """ops.TUNED: per device and size class; rows below the first entry, other devices, CPU
    tensors and other row widths (norms) keep the defaults."""
    ops = _ops()
    table = {"gelu": ((1, (512, 4, 0, 1)), (1025, (4096, 16, 2, 3))),
             "rms_norm": ((5, (2, 16, 0)),), "fused_add_rms_norm": ((1, (1, 8, 2)),)}
    monkeypatch.setattr(ops, "TUNED", {"FakeGPU": table})
    monkeypatch.setattr(ops.torch.cuda, "get_device_name",
                        lambda dev=None: "NVIDIA FakeGPU" if dev == 0 else "Other")
    for fn in (ops._device_tuning, ops.act_config, ops.norm_config):
        fn.cache_clear()
    try:
        assert ops.act_config(16, 14336, 1, 0) == (512, 4, 0, 1)
        assert ops.act_config(1024, 14336, 1, 0) == (512, 4, 0, 1)
        assert ops.act_config(16384, 14336, 1, 0) == (4096, 16, 2, 3)
        assert ops.act_config(16384, 1000, 1, 0) == (1024, 8, 2, 3)  # clamped to the row
        default_gelu = ops.act_config(16384, 14336, 1, -1)
        assert default_gelu[3] == 1 and ops.act_config(16384, 14336, 1, 1) == default_gelu
        assert ops.act_config(16384, 14336, 0, 0)[3] == 0  # silu: no entry, default
        assert ops.norm_config(64, 4096, False, 0) == (2, 4096, True, 16, 0)
        assert ops.norm_config(4, 4096, False, 0) == ops.norm_config(4, 4096, False, -1)
        assert ops.norm_config(1, 4096, True, 0) == (1, 4096, True, 8, 2)
        assert ops.norm_config(64, 1024, False, 0) == ops.norm_config(64, 1024, False, -1)
    finally:
        for fn in (ops._device_tuning, ops.act_config, ops.norm_config):
            fn.cache_clear()
