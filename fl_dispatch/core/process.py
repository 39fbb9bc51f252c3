"""Who this process is: its rank and name, for the one selection line each process logs."""

from __future__ import annotations

import multiprocessing
import os
import re


def process_rank() -> str | None:
    """This process's rank, or None where it has none (yet).

    In order: ``RANK`` (torchrun and vLLM's multi-node launch), the rank of an initialized
    ``torch.distributed`` group (vLLM's in-process executor: with one GPU the model runs in
    the ``EngineCore`` process, which has no ``RANK`` and no worker name), then the N of
    vLLM's ``VllmWorker-N`` process name."""
    if os.environ.get("RANK"):
        return os.environ["RANK"]
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return str(dist.get_rank())
    except Exception:  # torch missing or a backend without a rank: no rank from there
        pass
    name = multiprocessing.current_process().name
    match = re.search(r"(\d+)$", name)
    return match.group(1) if match and "Worker" in name else None


def process_identity() -> str:
    """``rank=R pid=P process=NAME`` for the current process (``rank=-`` when it has none)."""
    name = multiprocessing.current_process().name
    return f"rank={process_rank() or '-'} pid={os.getpid()} process={name}"
