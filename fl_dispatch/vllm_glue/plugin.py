"""The vLLM general plugin (entry point ``vllm.general_plugins``): runs in every vLLM process.

``register()`` is idempotent and cheap: it resolves the policy, loads the backend plugins
(kernels stay unimported until first use), freezes the selection, defines the opaque torch
ops, replaces the admitted vLLM layers, mixes the selection's fingerprint into vLLM's compile
cache key, applies the ``attention_backend`` op, runs each backend's per-process set-up
(FlagGems) and logs one line saying what will run. ``VLLM_FL_PREFER_ENABLED=false`` makes it
do nothing at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from fl_dispatch.core.config import env_flag
from fl_dispatch.core.log import get_logger
from fl_dispatch.core.ops.attention import MLA_BACKEND
from fl_dispatch.core.process import process_identity, process_rank

log = get_logger()
_state: dict[str, Any] = {}


def fingerprint() -> str:
    """A short hash of what decides the compiled graph and the kernels that run."""
    from fl_dispatch.core.dispatch import get_dispatcher

    from .layers import TRACE

    d = get_dispatcher()
    chosen = {op: (s.chosen.impl_id if s.chosen else None) for op, s in d.selections().items()}

    data = {"selection": chosen, "oot": sorted(_state.get("oot_replaced", [])),
            "traced": sorted(op for op, traced in TRACE.items() if traced),
            "version": __import__("fl_dispatch").__version__}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _patch_compile_hash() -> None:
    """Mix ``fingerprint()`` into ``VllmConfig.compute_hash`` (the compile cache key)."""
    from vllm.config import VllmConfig

    original = VllmConfig.compute_hash
    if getattr(original, "_fl_dispatch", False):
        return

    def compute_hash(self, *args: Any, **kwargs: Any) -> str:
        base = original(self, *args, **kwargs)
        mixed = hashlib.sha256(f"{base}:fl_dispatch:{fingerprint()}".encode()).hexdigest()
        return mixed[:len(base)]

    compute_hash._fl_dispatch = True  # type: ignore[attr-defined]
    compute_hash.__wrapped__ = original  # type: ignore[attr-defined]
    VllmConfig.compute_hash = compute_hash  # type: ignore[method-assign]


def _patch_attention_backend() -> None:
    """Apply the ``attention_backend`` op through vLLM's own ``attention_config.backend``."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_fl_dispatch", False):
        return

    def create_engine_config(self, *args: Any, **kwargs: Any):
        config = original(self, *args, **kwargs)
        apply_attention_backend(config)
        return config

    create_engine_config._fl_dispatch = True  # type: ignore[attr-defined]
    create_engine_config.__wrapped__ = original  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]


def apply_attention_backend(config: Any) -> str | None:
    """Set ``config.attention_config.backend`` from the op unless the user chose one."""
    from fl_dispatch.core.dispatch import get_dispatcher, ops

    use_mla = bool(getattr(config.model_config, "use_mla", False))
    choice = ops.attention_backend(use_mla)
    impl = get_dispatcher().selection("attention_backend").chosen
    if choice is None:
        return None
    if choice == MLA_BACKEND:  # fl-dispatch's own MLA backend: the slot this process holds
        from .mla import registered_backend

        resolved = registered_backend()
        if resolved is None:
            log.info("attention backend: fl-dispatch's MLA backend is not registered in this "
                     "process (layer mla_attention off, or the slot taken): TRITON_MLA")
        choice = resolved or "TRITON_MLA"
    user = config.attention_config.backend
    if user is not None:
        name = getattr(user, "name", user)
        if name != choice:
            log.info("attention backend: the user's explicit %s wins over %s chosen by '%s'",
                     name, choice, impl.impl_id if impl else "?")
        return str(name)
    from vllm.config.attention import AttentionConfig

    try:
        config.attention_config.backend = AttentionConfig.validate_backend_before(choice)
    except Exception as exc:
        raise ValueError(f"attention_backend impl '{impl.impl_id if impl else '?'}' returned "
                         f"{choice!r}, which vLLM rejects: {exc}") from exc
    log.info("attention backend: %s (chosen by '%s')", choice, impl.impl_id if impl else "?")
    return choice


def register() -> None:
    """The ``vllm.general_plugins`` entry point."""
    if _state.get("registered") or not env_flag("VLLM_FL_PREFER_ENABLED", True):
        return
    from fl_dispatch.core.dispatch import add_creation_hook, get_dispatcher

    _state["registered"] = True
    add_creation_hook(_set_up_process)
    dispatcher = get_dispatcher()
    if not getattr(dispatcher, "_fl_announced", False):
        _set_up_process(dispatcher)


def _set_up_process(dispatcher: Any) -> None:
    """Everything one process needs, once per dispatcher (a forked child gets its own)."""
    from .layers import register_ir_providers, register_layers, set_tracing

    dispatcher._fl_announced = True
    policy = dispatcher.policy
    set_tracing(dispatcher)
    report = register_layers(policy.oot_allows, policy.strict.value,
                             dispatcher.registry.ops.values())
    from .mla import register_mla
    from .moe import register_moe

    report.replaced += register_moe(dispatcher, policy.oot_allows, policy.strict.value)
    report.replaced += register_mla(dispatcher, policy.oot_allows, policy.strict.value)
    _state["oot_replaced"] = report.replaced
    register_ir_providers(policy.oot_allows)
    _patch_compile_hash()
    _patch_attention_backend()
    summary = f"{dispatcher.selection_line()} | layers: {','.join(report.replaced) or 'none'}"
    _state["ranked"] = process_rank() is not None
    if report.replaced:
        # The backends' per-process set-up (FlagGems' aten registration, whose import queries
        # the GPU) waits until this process builds the model (the replaced layers announce
        # it): vLLM's front end builds none, and CUDA initialised there makes vLLM spawn its
        # engine instead of forking it (18 s on an H200). Without replaced layers: now.
        _state["summary"] = summary
        _state["init_pending"] = (os.getpid(), dispatcher)
        log.info("fl-dispatch %s: %s | backend set-up: when this process builds the model",
                 process_identity(), summary)
        return
    _state["summary"] = summary + _backend_set_up(dispatcher)
    log.info("fl-dispatch %s: %s", process_identity(), _state["summary"])


def _backend_set_up(dispatcher: Any) -> str:
    """Every backend's ``fl_dispatch_process_init``; their lines, for the selection line."""
    lines = dispatcher.plugins.process_init(dispatcher.policy)
    extras = "; ".join(f"{name}: {line}" for name, line in lines.items())
    return f" | {extras}" if extras else ""


def announce_model_process() -> None:
    """Called when a replaced layer is built (the model is being built in this process): run
    the backends' per-process set-up deferred by ``_set_up_process`` and log the line with its
    result, once; or, when the start-up line could not name a rank (vLLM 0.25's
    ``EngineCore`` with one GPU builds the model in-process, before anything sets ``RANK``),
    log the line again, once, now that ``torch.distributed`` knows it. Costs two dict lookups
    afterwards."""
    pending = _state.get("init_pending")
    if pending is not None:
        from fl_dispatch.core.dispatch import get_dispatcher

        get_dispatcher()  # in a forked child: creates its own, whose set-up re-arms the pending
        pending = _state.pop("init_pending", None)
        if pending is not None and pending[0] == os.getpid():  # not a parent's, inherited
            _state["summary"] = _state.get("summary", "") + _backend_set_up(pending[1])
            _state["ranked"] = True
            log.info("fl-dispatch %s (builds the model): %s", process_identity(),
                     _state["summary"])
            return
    if _state.get("ranked", True):
        return
    _state["ranked"] = True
    if process_rank() is not None:
        log.info("fl-dispatch %s (builds the model): %s", process_identity(),
                 _state.get("summary", ""))


def call_counts(worker: Any = None) -> dict[str, int]:
    """Per-op call counts of this process (non-empty with ``VLLM_FL_DISPATCH_DEBUG=1``).
    Usable as ``LLM.collective_rpc(call_counts)``, which passes the worker. Empty where
    nothing was dispatched (creates no dispatcher)."""
    from fl_dispatch.core.dispatch import current_dispatcher

    d = current_dispatcher()
    return dict(d.counts) if d is not None else {}


def selection(worker: Any = None) -> dict[str, Any] | None:
    """This process's identity and chosen impl per op (for ``LLM.collective_rpc``); None
    where nothing was dispatched (creates no dispatcher)."""
    from fl_dispatch.core.dispatch import current_dispatcher

    d = current_dispatcher()
    if d is None:
        return None
    return {"process": process_identity(),
            "selection": {op: {"impl_id": s.chosen.impl_id, "kind": s.chosen.kind,
                               "vendor": s.chosen.vendor} if s.chosen else None
                          for op, s in d.selections().items()},
            "demoted": d.demoted()}
