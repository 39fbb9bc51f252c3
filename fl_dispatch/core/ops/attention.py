"""Which attention backend vLLM uses (an op without tensors: a choice, not a kernel)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..opspec import define_op

MLA_BACKEND = "fl_dispatch:mla"
"""The answer that asks for fl-dispatch's own MLA attention backend (vLLM's, with decode
through the dispatched ``flash_mla``): the vLLM glue resolves it to the backend slot it
registered in this process, or to ``TRITON_MLA`` where it did not register one (the
``mla_attention`` layer switched off, or the slot taken), with a log line."""


def _check_backend_name(fn: Callable[..., Any]) -> list[str]:
    """The kit's check: ``fn(use_mla=...)`` returns None or a backend name, for both values."""
    problems = []
    for use_mla in (False, True):
        result = fn(use_mla=use_mla)
        if result is not None and not isinstance(result, str):
            problems.append(f"use_mla={use_mla}: returned {result!r}; expected None or a str")
    return problems


@define_op(checker=_check_backend_name)
def attention_backend(use_mla: bool = False) -> str | None:
    """The attention backend vLLM should use: a name of ``vllm``'s ``AttentionBackendEnum``
    (for example ``'FLASH_ATTN'``), a class path, or ``MLA_BACKEND`` (fl-dispatch's own MLA
    backend); None leaves vLLM's own choice (the reference's answer)."""
    return None
