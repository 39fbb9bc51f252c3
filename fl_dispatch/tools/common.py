"""What every command starts with: the policy, the plugins, the ops it was asked about."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fl_dispatch.core.config import Policy, resolve_policy
from fl_dispatch.core.discovery import PluginSet, load_plugins
from fl_dispatch.core.errors import suggestion


class ToolError(Exception):
    """Misuse of a command (an unknown op, a bad option): printed, exit status 2."""


@dataclass
class Loaded:
    """The effective policy, the loaded plugins, and the ops a command works on."""

    policy: Policy
    plugins: PluginSet
    ops: list[str] | None

    @property
    def registry(self):
        return self.plugins.registry


def split(values: Sequence[str] | None) -> list[str]:
    """``--op a,b --op c`` -> ``[a, b, c]``."""
    return [v.strip() for item in values or () for v in item.split(",") if v.strip()]


def load(ops: Iterable[str] | None = None, env: Mapping[str, str] | None = None) -> Loaded:
    """Resolve the policy (ConfigError on a bad one), load the plugins, and check that every
    op in ``ops`` exists (ToolError with the closest spelling)."""
    policy = resolve_policy(env)
    plugins = load_plugins(policy.plugin_modules.value)
    wanted = list(ops) if ops else None
    for op in wanted or ():
        if op not in plugins.registry.ops:
            raise ToolError(f"unknown op {op!r}; {suggestion(op, plugins.registry.ops)}")
    return Loaded(policy, plugins, wanted)


def fail(command: str, message: str) -> int:
    """Print ``fl-dispatch <command>: <message>`` to stderr; the exit status of misuse (2)."""
    print(f"fl-dispatch {command}: {message}", file=sys.stderr)
    return 2


def add_op_and_device(parser: Any) -> None:
    """The options every op-running command takes: ``--op`` (see :func:`split`), ``--device``."""
    parser.add_argument("--op", action="append", metavar="OP",
                        help="only this op (repeat or comma-separate for several)")
    parser.add_argument("--device", help="torch device (default: cuda if present, else cpu)")
