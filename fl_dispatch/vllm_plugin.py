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
import multiprocessing
import os
import re
from typing import Any

from .config import env_flag
from .log import get_logger

log = get_logger()
_state: dict[str, Any] = {}


def process_rank() -> str | None:
    """This process's rank: ``RANK``, else the N of vLLM's ``VllmWorker-N`` process name."""
    if os.environ.get("RANK"):
        return os.environ["RANK"]
    name = multiprocessing.current_process().name
    match = re.search(r"(\d+)$", name)
    return match.group(1) if match and "Worker" in name else None


def process_identity() -> str:
    """``rank=R pid=P process=NAME`` for the current vLLM process."""
    name = multiprocessing.current_process().name
    return f"rank={process_rank() or '-'} pid={os.getpid()} process={name}"


def fingerprint() -> str:
    """A short hash of what decides the compiled graph and the kernels that run."""
    from .dispatch import get_dispatcher

    d = get_dispatcher()
    chosen = {op: (s.chosen.impl_id if s.chosen else None) for op, s in d.selections().items()}
    from .vllm_layers import TRACE

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
    from .dispatch import get_dispatcher, ops

    use_mla = bool(getattr(config.model_config, "use_mla", False))
    choice = ops.attention_backend(use_mla)
    impl = get_dispatcher().selection("attention_backend").chosen
    if choice is None:
        return None
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
    from .dispatch import add_creation_hook, get_dispatcher

    _state["registered"] = True
    add_creation_hook(_set_up_process)
    dispatcher = get_dispatcher()
    if not getattr(dispatcher, "_fl_announced", False):
        _set_up_process(dispatcher)


def _set_up_process(dispatcher: Any) -> None:
    """Everything one process needs, once per dispatcher (a forked child gets its own)."""
    from .vllm_layers import register_ir_providers, register_layers, set_tracing

    dispatcher._fl_announced = True
    policy = dispatcher.policy
    set_tracing(dispatcher)
    report = register_layers(policy.oot_allows, policy.strict.value)
    _state["oot_replaced"] = report.replaced
    register_ir_providers(policy.oot_allows)
    _patch_compile_hash()
    _patch_attention_backend()
    selection = dispatcher.selection_line()
    init_lines = dispatcher.plugins.process_init(policy)
    extras = "; ".join(f"{name}: {line}" for name, line in init_lines.items())
    log.info("fl-dispatch %s: %s | layers: %s%s", process_identity(), selection,
             ",".join(report.replaced) or "none", f" | {extras}" if extras else "")


def call_counts(worker: Any = None) -> dict[str, int]:
    """Per-op call counts of this process (non-empty with ``VLLM_FL_DISPATCH_DEBUG=1``).
    Usable as ``LLM.collective_rpc(call_counts)``, which passes the worker. Empty where
    nothing was dispatched (creates no dispatcher)."""
    from .dispatch import current_dispatcher

    d = current_dispatcher()
    return dict(d.counts) if d is not None else {}


def selection(worker: Any = None) -> dict[str, Any] | None:
    """This process's identity and chosen impl per op (for ``LLM.collective_rpc``); None
    where nothing was dispatched (creates no dispatcher)."""
    from .dispatch import current_dispatcher

    d = current_dispatcher()
    if d is None:
        return None
    return {"process": process_identity(),
            "selection": {op: {"impl_id": s.chosen.impl_id, "kind": s.chosen.kind,
                               "vendor": s.chosen.vendor} if s.chosen else None
                          for op, s in d.selections().items()},
            "demoted": d.demoted()}
