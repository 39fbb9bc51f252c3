"""Exceptions raised by fl-dispatch, and the 'did you mean' helper they share."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


def closest(value: str, valid: Iterable[str]) -> str | None:
    """Return the valid spelling closest to ``value``, or None when none is close."""
    matches = difflib.get_close_matches(str(value), list(valid), n=1, cutoff=0.6)
    return matches[0] if matches else None


def suggestion(value: str, valid: Iterable[str]) -> str:
    """A message tail: the closest spelling if there is one, else the valid choices."""
    valid = sorted(set(valid))
    near = closest(value, valid)
    if near is not None:
        return f"did you mean {near!r}?"
    if not valid:
        return "nothing is valid here"
    return "valid: " + ", ".join(valid)


@dataclass(frozen=True)
class Problem:
    """One configuration problem: where it came from, which value, and why it is wrong."""

    source: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


class FlDispatchError(Exception):
    """Base class of every error fl-dispatch raises on purpose."""


class ConfigError(FlDispatchError, ValueError):
    """The configuration is invalid; ``problems`` lists every problem found.

    ``policy``, when given, is the policy resolved from the valid values only (each bad value
    left at the layer below it), so that callers such as ``fl-dispatch check`` can go on to
    check the names in it against the loaded backends and report those problems too.
    """

    def __init__(self, problems: list[Problem], policy: Any = None):
        self.problems = list(problems)
        self.policy = policy
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid fl-dispatch configuration:\n{lines}")

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuilt from the problems, not from the message (it crosses vLLM's processes)
        return (type(self), (self.problems, self.policy))


class RegistrationError(FlDispatchError, ValueError):
    """A backend tried to register an op or impl that breaks the rules."""


class PluginLoadError(FlDispatchError, RuntimeError):
    """A backend plugin failed to load (raised in strict mode only)."""


class NoImplementationError(FlDispatchError, RuntimeError):
    """No implementation of an op can run under the current policy."""
