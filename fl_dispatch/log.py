"""The ``fl_dispatch`` logger: one handler on stderr, level from ``VLLM_FL_LOG_LEVEL``."""

from __future__ import annotations

import logging
import os

LOGGER_NAME = "fl_dispatch"
_FORMAT = "%(asctime)s fl_dispatch [%(levelname)s] %(message)s"


def get_logger() -> logging.Logger:
    """The package logger, configured on first use (idempotent)."""
    logger = logging.getLogger(LOGGER_NAME)
    if not getattr(logger, "_fl_configured", False):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
        level = os.environ.get("VLLM_FL_LOG_LEVEL", "").strip().upper()
        logger.setLevel(level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO")
        logger._fl_configured = True  # type: ignore[attr-defined]
    return logger
