"""``flash_mla``'s Gluon kernel for Hopper (``backends/flagos/kernels_mla_gluon.py``).

Gluon has no CPU interpreter. On the CPU (CI): the kernel compiled for sm_90 by the installed
Triton and its ptxas (TMA loads, asynchronous wgmma, the shared memory that fits an H200's 227
KB); the heuristic's choice between it and the ``tl`` kernel; the errors of a config that asks
for it where it cannot run. On a Hopper GPU (``FL_FLAGOS_TEST_DEVICE=cuda``): against the fp32
reference with FlashMLA's tolerances (``test_mla_kernels.check``), with NaN in the cache slots
past each row's length (a kernel that lets them into ``P V`` fails), zero-length and
mid-page rows, shuffled tables, s_q 2 causal and not, bf16 and fp16, 1 to 16 splits, strided
q, a cache that is a view, the fallback to the ``tl`` kernel for strides TMA cannot take, and a
CUDA graph replayed with new lengths.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from test_mla_kernels import ON_GPU, _mla, check, make_case

DEEPSEEK = {"d": 576, "page": 64}
LENS = [0, 1, 63, 64, 65, 700, 4097, 130]
SMEM_H200 = 232448  # bytes of shared memory one block may use on an H100/H200


def _hopper() -> bool:
    return ON_GPU and torch.cuda.get_device_capability() == (9, 0)


def hopper_only(fn):
    """A GPU test of the kernel: runs on an sm_90 device (``FL_FLAGOS_TEST_DEVICE=cuda``)."""
    fn = pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")(fn)
    return pytest.mark.gpu(pytest.mark.usefixtures("triton_mode")(fn))


def _nan_past_lengths(kv: torch.Tensor, table: torch.Tensor, lens: list[int]) -> None:
    """NaN in every cache slot of a row's pages past its length (as FlashMLA's test)."""
    page = kv.shape[1]
    flat = kv.view(-1, kv.shape[-1])
    pos = torch.arange(table.shape[1] * page, device=kv.device)
    for i, n in enumerate(lens):
        p = pos[n:]
        flat[table[i].long()[p // page] * page + p % page] = float("nan")


def _gluon(splits: int):
    return _mla().MLAConfig(64, 64, 8, 2, splits, "gluon")


# ----------------------------------------------------------------------------- CPU: compile

@pytest.mark.parametrize("dtype,direct", [(torch.bfloat16, False), (torch.float16, True)])
def test_kernel_compiles_for_sm90(dtype, direct: bool) -> None:
    """The H200 launch (64 rows, 64 positions, two slots, 8 warps) compiles for sm_90: TMA tile
    loads and mbarrier waits, warpgroup MMAs issued asynchronously, within the shared memory
    of one block.

    In a fresh process without ``TRITON_INTERPRET``: in the two-worker CI run (2026-12-02) it
    failed after other tests of its worker had run, the compiler rejecting ``gl.max`` in a
    helper as called outside a Gluon jit function; alone, or after test_mla_kernels, or with
    ``TRITON_INTERPRET=1`` set from the start, it passed. Which earlier test leaves Triton in
    that state is not pinned down; a fresh process starts without it."""
    pytest.importorskip("triton.experimental.gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    code = (f"import torch, test_mla_gluon as t; "
            f"t.compile_and_check(torch.{str(dtype).split('.')[-1]}, {direct})")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=here,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def compile_and_check(dtype, direct: bool) -> None:
    """The body of test_kernel_compiles_for_sm90, run in its own process."""
    mla = _mla()
    from fl_dispatch_flagos import launcher
    from fl_dispatch_flagos.kernels_mla_gluon import mla_gluon_kernel

    kv = torch.zeros(4, 64, 1, 576, dtype=dtype)
    kvn, kvr = mla.gluon_descriptors(kv, 512, 64)
    ptr = "*bf16" if dtype == torch.bfloat16 else "*fp16"
    out = ptr if direct else "*fp32"
    compiled = launcher.compile_gluon_sm90(
        mla_gluon_kernel,
        {"q_ptr": ptr, "kvn_desc": kvn, "kvr_desc": kvr, "bt_ptr": "*i32", "len_ptr": "*i32",
         "o_ptr": out, "lse_ptr": "*fp32", "scale_log2": "fp32"},
        {"DV": 512, "DR": 64, "PAGE": 64, "BLOCK_H": 64, "BLOCK_N": 64, "STAGES": 2,
         "DIRECT": direct, "num_warps": 8},
        num_warps=8)
    ptx = compiled.asm["ptx"]
    # S = Q K^T before the loop and in it (512 + 64 channels, 16 a step), P V in it (64 steps)
    assert ptx.count("wgmma.mma_async") >= 2 * (512 // 16 + 64 // 16) + 64 // 16
    assert "wgmma.commit_group" in ptx and "wgmma.wait_group" in ptx
    assert "cp.async.bulk.tensor" in ptx and "mbarrier.try_wait" in ptx
    assert 72 * 1024 * 3 <= compiled.metadata.shared <= SMEM_H200


# ----------------------------------------------------------------------------- CPU: choice

def test_heuristic_picks_gluon_on_hopper_for_more_than_16_rows() -> None:
    """On Hopper, DeepSeek shapes with more than 16 query rows (h16 s_q 2, h128) take the
    Gluon kernel, 4 waves of programs; 16 rows (its 64-row MMA would pad 48) and shapes its
    tiles do not have (dv 256, fp32, pages of 16) keep the tl kernel, as does any other GPU."""
    mla = _mla()
    cfg = mla.mla_config(128, 32, 16384, 64, 576, 512, 2, 132, True)
    assert cfg == mla.MLAConfig(64, 64, 8, 2, 8, "gluon")  # 128 programs x 8 = 4 waves of 132 x2
    assert mla.mla_config(128, 128, 16384, 64, 576, 512, 2, 132, True) == \
        mla.MLAConfig(64, 64, 8, 2, 4, "gluon")
    for args in [(128, 16, 16384, 64, 576, 512, 2), (128, 32, 16384, 64, 320, 256, 2),
                 (128, 32, 16384, 64, 576, 512, 4), (128, 32, 16384, 16, 576, 512, 2)]:
        assert mla.mla_config(*args, 132, True).kernel == "tl", args
    assert mla.mla_config(128, 128, 16384, 64, 576, 512, 2, 132, False).kernel == "tl"


def test_config_table_entries_of_the_other_kernel_are_ignored(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A swept ``tl`` entry does not apply where the Gluon kernel is chosen, and a Gluon entry
    only applies there."""
    mla = _mla()
    key = (2, 32, 16384, 128)
    mla.mla_config.cache_clear()
    try:
        monkeypatch.setitem(mla.MLA_CONFIGS, key, mla.MLAConfig(32, 32, 4, 1, 2))
        assert mla.mla_config(128, 32, 16384, 64, 576, 512, 2, 132, True).kernel == "gluon"
        assert mla.mla_config(128, 32, 16384, 64, 576, 512, 2, 132) == (32, 32, 4, 1, 2, "tl")
        monkeypatch.setitem(mla.MLA_CONFIGS, key, mla.MLAConfig(64, 64, 8, 2, 2, "gluon"))
        mla.mla_config.cache_clear()
        assert mla.mla_config(128, 32, 16384, 64, 576, 512, 2, 132, True).num_splits == 2
        assert mla.mla_config(128, 32, 16384, 64, 576, 512, 2, 132).kernel == "tl"
    finally:
        mla.mla_config.cache_clear()


@pytest.mark.skipif(ON_GPU, reason="the CPU's reasons; the GPU tests run the kernel")
@pytest.mark.parametrize("config,match", [
    ((64, 64, 8, 2, 1, "gluon"), r"asks for the Gluon kernel: it runs on CUDA devices only"),
    ((64, 64, 8, 2, 1, "cuda"), r"config.kernel is 'cuda'; expected 'tl' or 'gluon'"),
])
def test_a_config_that_cannot_run_is_an_error(config, match: str) -> None:
    mla = _mla()
    q, kv, table, seqlens = make_case(2, 1, 16, 576, 64, [5, 70], torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match=match):
        mla.flash_mla(q, kv, table, seqlens, 512, 0.1, True, config=config)


@pytest.mark.parametrize("args,match", [
    ((320, 256, 64, 2), r"\(head_dim_v, d - head_dim_v\) is \(256, 64\); it needs \(512, 64\)"),
    ((576, 512, 64, 4), r"4 bytes; it needs bfloat16 or float16"),
    ((576, 512, 16, 2), r"page size is 16; it needs a multiple of 64"),
])
def test_shapes_the_tiles_do_not_have(args, match: str) -> None:
    import re

    assert _mla().gluon_shapes(*args) is not None
    assert re.search(match, _mla().gluon_shapes(*args))
    assert _mla().gluon_shapes(576, 512, 128, 2) is None


# ----------------------------------------------------------------------------- GPU

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s_q,h_q,causal", [(1, 128, True), (2, 16, True), (2, 16, False),
                                            (2, 64, True), (1, 20, True)])
@hopper_only
def test_matches_reference(dtype, s_q: int, h_q: int, causal: bool) -> None:
    """Rows of 0 to 4097 positions (mid-page ends, exact pages), 1, 3 and 16 splits (direct
    write, uneven splits, splits with no tile)."""
    q, kv, table, seqlens = make_case(len(LENS), s_q, h_q, extra_blocks=3, lens=LENS,
                                      dtype=dtype, seed=s_q * h_q, **DEEPSEEK)
    _nan_past_lengths(kv, table, LENS)
    for splits in (1, 3, 16):
        out, lse = check(q, kv, table, seqlens, 512, 0.07, causal, config=_gluon(splits))
        assert lse[0].eq(math.inf).all() and out[0].eq(0).all()  # the empty row


@pytest.mark.parametrize("splits", [1, 4])
@hopper_only
def test_strided_q_and_a_cache_view(splits: int) -> None:
    """q a view of wider channels; the cache a slice of a larger one (pages still back to
    back, the base moved by whole pages)."""
    lens = [3, 200, 1000]
    q, kv, table, seqlens = make_case(3, 2, 16, extra_blocks=5, lens=lens,
                                      dtype=torch.bfloat16, seed=9, q_pad=64, **DEEPSEEK)
    assert not q.is_contiguous()
    big = torch.cat([torch.full_like(kv[:2], float("nan")), kv])
    _nan_past_lengths(big[2:], table, lens)
    check(q, big[2:], table, seqlens, 512, 576 ** -0.5, True, config=_gluon(splits))


@hopper_only
def test_heuristic_runs_it_and_falls_back_for_strides_tma_cannot_take(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """h_q 128 on Hopper runs the Gluon kernel unasked; a cache whose pages are not back to
    back runs the tl kernel instead (same results); asked for explicitly, it is an error."""
    mla = _mla()
    calls = []
    real = mla._launch_gluon
    monkeypatch.setattr(mla, "_launch_gluon", lambda *a: calls.append(1) or real(*a))
    lens = [100, 3000]
    q, kv, table, seqlens = make_case(2, 1, 128, lens=lens, dtype=torch.bfloat16, seed=4,
                                      **DEEPSEEK)
    check(q, kv, table, seqlens, 512, 0.05, True)
    assert calls == [1]
    # pages padded apart (a cache with room for 65 positions a page, 64 used): no TMA view
    wide = torch.zeros(kv.shape[0], 65, 1, 576, dtype=kv.dtype, device=kv.device)
    wide[:, :64] = kv
    apart = wide[:, :64]
    check(q, apart, table, seqlens, 512, 0.05, True)
    assert calls == [1]
    with pytest.raises(ValueError, match="pages back to back"):
        mla.flash_mla(q, apart, table, seqlens, 512, 0.05, True, config=_gluon(2))


@hopper_only
def test_cuda_graph_replay_with_new_lengths() -> None:
    """Captured once (descriptors, grid and split count from shapes), replayed with new lengths
    and new queries in the same buffers."""
    mla = _mla()
    ref = check.__globals__["reference"]
    q, kv, table, seqlens = make_case(4, 2, 16, lens=[10, 500, 2000, 64], dtype=torch.bfloat16,
                                      seed=6, **DEEPSEEK)
    q = q.contiguous()
    cfg = _gluon(4)
    mla.flash_mla(q, kv, table, seqlens, 512, 0.06, True, config=cfg)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = mla.flash_mla(q, kv, table, seqlens, 512, 0.06, True, config=cfg)
    for lens in ([1, 64, 65, 2047], [0, 3, 1500, 900]):
        seqlens.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn_like(q, dtype=torch.float32).to(q.dtype))
        graph.replay()
        want_out, want_lse = ref(q, kv, table, seqlens, 512, 0.06, True)
        torch.testing.assert_close(out.float(), want_out.float(), atol=8e-4, rtol=2.01 / 128)
        torch.testing.assert_close(lse, want_lse, atol=1e-6, rtol=8.01 / 65536)
