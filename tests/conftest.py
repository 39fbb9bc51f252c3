"""Shared fixtures: a clean fl-dispatch environment for every test, test plugins, log capture."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

PLUGINS_DIR = Path(__file__).parent / "plugins"
"""Small backend plugin modules the tests load through ``VLLM_FL_PLUGIN_MODULES``."""

_POLICY_VARS = ("USE_FLAGGEMS", "FLAGGEMS_ENABLE_OPLIST_PATH")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the real environment's VLLM_FL_* (or FlagGems) variables."""
    for var in list(os.environ):
        if var.startswith("VLLM_FL_") or var in _POLICY_VARS:
            monkeypatch.delenv(var)


@pytest.fixture
def triton_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's interpreter on the CPU, its compiler on a GPU (``FL_FLAGOS_TEST_DEVICE`` names
    the kernel tests' device), for the tests of a kernel module alone: such a module uses it
    with ``pytestmark = pytest.mark.usefixtures("triton_mode")``."""
    if os.environ.get("FL_FLAGOS_TEST_DEVICE", "cpu") != "cpu":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def compile_sm90():
    """``compile(module, name, signature, constexprs, **options)``: kernel ``name`` of a flagos
    kernel module compiled for sm_90 by Triton's NVIDIA backend and its bundled ptxas (the
    PTX is assembled, not only emitted), no GPU needed; the module's ``JIT_HELPERS`` bound as
    the launcher binds them. ``signature``: parameter -> Triton type (``*bf16``, ``i32``,
    ``tensordesc<bf16[128, 64]>``; unnamed parameters are ``i32``); ``constexprs``: values
    (``launcher.compile_sm90``). Catches what only the compiler rejects: CI runs the kernels
    in the interpreter."""
    pytest.importorskip("triton.backends.nvidia.compiler")

    def compile_(module, name, signature, constexprs, **options):
        import importlib

        launcher = importlib.import_module(f"{module.__package__}.launcher")
        return launcher.compile_sm90(module, name, signature, constexprs, **options)

    return compile_


@pytest.fixture
def test_plugins(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put tests/plugins on sys.path (for VLLM_FL_PLUGIN_MODULES=fl_test_...)."""
    monkeypatch.syspath_prepend(str(PLUGINS_DIR))
    return PLUGINS_DIR


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def fl_log():
    """Records of the ``fl_dispatch`` logger alone, at DEBUG (caplog sees them too: the
    logger propagates)."""
    from fl_dispatch.core.log import get_logger

    logger = get_logger()
    handler = _ListHandler()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
