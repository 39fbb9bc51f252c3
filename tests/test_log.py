"""The package logger reaches the user's logging configuration and prints each message once."""

from __future__ import annotations

import logging
import subprocess
import sys

from fl_dispatch.core.log import get_logger


def test_caplog_receives_records(caplog) -> None:
    caplog.set_level(logging.INFO, logger="fl_dispatch")
    get_logger().info("hello %s", "caplog")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("fl_dispatch", "hello caplog")]


def _stderr(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_one_line_per_message_without_logging_configured() -> None:
    err = _stderr("from fl_dispatch.core.log import get_logger; get_logger().warning('once')")
    assert err.count("once") == 1 and "fl_dispatch [WARNING] once" in err


def test_one_line_per_message_with_logging_configured() -> None:
    """The user's basicConfig prints it (our handler stands down): still once."""
    err = _stderr("import logging; logging.basicConfig(format='USER %(name)s %(message)s'); "
                  "from fl_dispatch.core.log import get_logger; get_logger().warning('once')")
    assert err.splitlines() == ["USER fl_dispatch once"]
