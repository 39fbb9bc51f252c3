"""The ``fl_dispatch`` logger: one line per message on stderr, unless logging is configured.

The logger propagates, so the user's logging configuration (``logging.basicConfig``, vLLM's,
pytest's ``caplog``) receives every record. Its own stderr handler writes only while the root
logger has no handler of its own, so a message is printed once either way.
"""

from __future__ import annotations

import logging
import os

LOGGER_NAME = "fl_dispatch"
_FORMAT = "%(asctime)s fl_dispatch [%(levelname)s] %(message)s"


def _root_unconfigured(record: logging.LogRecord) -> bool:
    return not logging.getLogger().handlers


def get_logger() -> logging.Logger:
    """The package logger, configured on first use (idempotent)."""
    logger = logging.getLogger(LOGGER_NAME)
    if not getattr(logger, "_fl_configured", False):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_root_unconfigured)
        logger.addHandler(handler)
        logger.propagate = True
        level = os.environ.get("VLLM_FL_LOG_LEVEL", "").strip().upper()
        logger.setLevel(level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO")
        logger._fl_configured = True  # type: ignore[attr-defined]
    return logger
