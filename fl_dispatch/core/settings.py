"""Every setting, one row each: YAML key, environment variable, parser, default, scope.

This table is the single place a setting is named. The policy resolution
(:mod:`.config`), its defaults, its checks, ``fl-dispatch explain`` and the README's variable
table (checked by a test) all follow it. Parsers collect problems instead of raising, so that
every bad value is reported at once, each with its source.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import Problem, suggestion
from .impl import KINDS

PLATFORMS = ("cuda", "ascend")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TOKEN_FORMS = ("flagos", "reference", "vendor", "vendor:<name>", "impl:<impl_id>")
DEFAULT_OPLIST_PATH = "/tmp/flaggems_enable_oplist.txt"
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


class Collector:
    """Collects problems so that every one of them is reported, not just the first."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, source: str, message: str) -> None:
        self.problems.append(Problem(source, message))


# --------------------------------------------------------------------------- op-order tokens
class OrderToken(str):
    """One token of an op order, parsed once: ``kind`` is flagos, reference, vendor or impl;
    ``name`` the vendor (``vendor:<name>``; None for any vendor) or the impl id. It is the
    token's text as well (``OrderToken("vendor:cuda") == "vendor:cuda"``)."""

    kind: str
    name: str | None

    def __new__(cls, text: str) -> OrderToken:
        text = text.strip()
        if text in ("flagos", "reference", "vendor"):
            kind, name = text, None
        else:
            prefix, sep, rest = text.partition(":")
            if not (sep and prefix in ("vendor", "impl") and rest.strip()):
                raise ValueError(f"unknown op order token {text!r}; "
                                 f"{suggestion(text, TOKEN_FORMS)} "
                                 f"(tokens: {', '.join(TOKEN_FORMS)})")
            kind, name = prefix, rest.strip()
            text = f"{prefix}:{name}"
        token = super().__new__(cls, text)
        token.kind, token.name = kind, name
        return token

    def matches(self, impl: Any) -> bool:
        """Whether this token selects ``impl`` (an :class:`~.impl.Impl`)."""
        if self.kind == "impl":
            return bool(impl.impl_id == self.name)
        if self.kind == "vendor":
            return bool(impl.kind == "vendor" and (self.name is None or impl.vendor == self.name))
        return bool(impl.kind == self.kind)


OpOrder = dict[str, tuple[OrderToken, ...]]


# --------------------------------------------------------------------------- value parsers
# Each takes (value, where, out) and returns the parsed value, or None after adding a problem.
Parser = Callable[[Any, str, Collector], Any]


def parse_bool(value: Any, where: str, out: Collector) -> bool | None:
    """An environment boolean: 1/true/yes/on or 0/false/no/off, any case."""
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    out.add(where, f"{value!r} is not a boolean; use one of {', '.join(TRUE + FALSE)}")
    return None


def parse_yaml_bool(value: Any, where: str, out: Collector) -> bool | None:
    """A YAML boolean (``true``/``false``)."""
    if isinstance(value, bool):
        return value
    key = where.rpartition(" key ")[2] or "value"
    out.add(where, f"{key}={value!r} is not a boolean; use true or false")
    return None


def _choice(choices: tuple[str, ...], bad: str, fold: Callable[[str], str] = str) -> Parser:
    """One of ``choices`` (after ``fold``); ``bad`` formats the problem (``{value!r}``)."""

    def parse(value: Any, where: str, out: Collector) -> str | None:
        if isinstance(value, str) and fold(value.strip()) in choices:
            return fold(value.strip())
        text = value.strip() if isinstance(value, str) else value
        out.add(where, f"{bad.format(value=text)}; {suggestion(fold(str(text)), choices)}")
        return None

    return parse


def parse_name_list(value: Any, where: str, out: Collector) -> tuple[str, ...] | None:
    """A YAML list of names, or a comma-separated string (environment)."""
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if not isinstance(value, list):
        out.add(where, f"must be a list of names, got {value!r}")
        return None
    bad = [v for v in value if not isinstance(v, str) or not v.strip()]
    if bad:
        out.add(where, f"names must be non-empty strings, got {bad!r}")
        return None
    return tuple(v.strip() for v in value)


def parse_yaml_name_list(value: Any, where: str, out: Collector) -> tuple[str, ...] | None:
    """A YAML list of names (a bare string is refused: ``[a, b]``, not ``a``)."""
    if isinstance(value, str):
        out.add(where, f"must be a list of names, got {value!r}")
        return None
    return parse_name_list(value, where, out)


def parse_order_map(value: Any, where: str, out: Collector) -> OpOrder | None:
    """``{op: [token, ...]}``; every token parsed into an :class:`OrderToken`."""
    if not isinstance(value, Mapping):
        out.add(where, f"op_backends must map op names to lists of tokens, got {value!r}")
        return None
    result: OpOrder = {}
    for op, tokens in value.items():
        at = f"{where}.{op}"
        if not isinstance(op, str) or not op:
            out.add(where, f"op name {op!r} must be a non-empty string")
            continue
        if isinstance(tokens, str) or not isinstance(tokens, list) or not tokens:
            out.add(at, f"must be a non-empty list of tokens, got {tokens!r}")
            continue
        parsed: list[OrderToken] = []
        for token in tokens:
            if not isinstance(token, str):
                out.add(at, f"op order token {token!r} must be a string")
                continue
            try:
                parsed.append(OrderToken(token))
            except ValueError as exc:
                out.add(at, str(exc))
        if len(parsed) == len(tokens):
            result[op] = tuple(parsed)
    return result


def parse_per_op(text: Any, where: str, out: Collector) -> OpOrder | None:
    """``op1=a|b|c;op2=x|y`` (``VLLM_FL_PER_OP``)."""
    result: dict[str, list[str]] = {}
    for item in str(text).split(";"):
        if not item.strip():
            continue
        op, sep, tokens = item.partition("=")
        op = op.strip()
        if not sep or not op:
            out.add(where, f"item {item.strip()!r} is not of the form op=token|token")
            return None
        if op in result:
            out.add(where, f"op {op!r} is given twice")
            return None
        result[op] = [t for t in tokens.split("|") if t.strip()]
    return parse_order_map(result, where, out)


def parse_op_config_file(path: Any, where: str, out: Collector) -> OpOrder | None:
    """A JSON file holding the per-op map (``VLLM_FL_OP_CONFIG``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        out.add(where, f"op config file {path!r} does not exist")
        return None
    except (OSError, ValueError) as exc:
        out.add(where, f"does not parse as JSON: {exc}")
        return None
    return parse_order_map(data, where, out)


def parse_text(value: Any, where: str, out: Collector) -> str | None:
    return str(value).strip()


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class EnvVar:
    """An environment variable setting a value; ``source`` labels where values come from
    (``env`` gives ``env:NAME``; ``op_config`` gives ``op_config:<value>``)."""

    name: str
    parse: Parser
    source: str = "env"

    def label(self, raw: str) -> str:
        return f"env:{self.name}" if self.source == "env" else f"{self.source}:{raw}"

    def where(self, raw: str) -> str:
        return f"env:{self.name}" if self.source == "env" else f"{self.name}={raw}"


@dataclass(frozen=True)
class SettingDef:
    """One setting. ``yaml``: it is a key of policy files (then it is also a *policy* setting:
    ``VLLM_FL_CONFIG`` replaces it whole and its variables are ignored, with a warning);
    ``env``: its variables, highest precedence first; ``default``; ``doc``: one line;
    ``per_key``: a map layered key by key (each key from the highest layer naming it: its
    variables, then the platform file) instead of replaced whole."""

    name: str
    default: Any
    doc: str
    yaml: Parser | None = None
    env: tuple[EnvVar, ...] = ()
    per_key: bool = False

    @property
    def policy(self) -> bool:
        return self.yaml is not None


SETTINGS: tuple[SettingDef, ...] = (
    SettingDef("enabled", True, "false: the vLLM plugin does nothing at all",
               env=(EnvVar("VLLM_FL_PREFER_ENABLED", parse_bool),)),
    SettingDef("platform", None, "force cuda or ascend (platform file); default: detected",
               env=(EnvVar("VLLM_FL_PLATFORM",
                           _choice(PLATFORMS, "unknown platform {value!r}", str.lower)),)),
    SettingDef("prefer", "flagos", "flagos, vendor or reference: kind order for ops without "
               "an explicit order", yaml=_choice(KINDS, "prefer={value!r} is not valid"),
               env=(EnvVar("VLLM_FL_PREFER", _choice(KINDS, "prefer={value!r} is not valid")),)),
    SettingDef("strict", False, "true: a failing impl raises; false: log once and fall back",
               yaml=parse_yaml_bool, env=(EnvVar("VLLM_FL_STRICT", parse_bool),)),
    SettingDef("allow_vendors", None, "only these vendors (comma-separated)",
               yaml=parse_yaml_name_list, env=(EnvVar("VLLM_FL_ALLOW_VENDORS", parse_name_list),)),
    SettingDef("deny_vendors", (), "never these vendors (comma-separated)",
               yaml=parse_yaml_name_list, env=(EnvVar("VLLM_FL_DENY_VENDORS", parse_name_list),)),
    SettingDef("op_backends", {}, "per-op order of tokens; only listed tokens are tried; "
               "layered per op (the variables' ops over the platform file's)",
               yaml=parse_order_map, per_key=True,
               env=(EnvVar("VLLM_FL_PER_OP", parse_per_op),
                    EnvVar("VLLM_FL_OP_CONFIG", parse_op_config_file, source="op_config"))),
    SettingDef("flagos_blacklist", None, "dispatch ops and FlagGems aten ops flagos must not "
               "serve", yaml=parse_yaml_name_list,
               env=(EnvVar("VLLM_FL_FLAGOS_BLACKLIST", parse_name_list),)),
    SettingDef("flagos_whitelist", None, "only these dispatch ops and FlagGems aten ops for "
               "flagos", yaml=parse_yaml_name_list,
               env=(EnvVar("VLLM_FL_FLAGOS_WHITELIST", parse_name_list),)),
    SettingDef("oot_blacklist", None, "vLLM layers fl-dispatch must not replace",
               yaml=parse_yaml_name_list, env=(EnvVar("VLLM_FL_OOT_BLACKLIST", parse_name_list),)),
    SettingDef("oot_whitelist", None, "only these vLLM layers are replaced",
               yaml=parse_yaml_name_list, env=(EnvVar("VLLM_FL_OOT_WHITELIST", parse_name_list),)),
    SettingDef("use_flaggems", True, "enable FlagGems' aten-level registration where it "
               "imports", env=(EnvVar("USE_FLAGGEMS", parse_bool),)),
    SettingDef("oot_enabled", True, "false: replace no vLLM layer",
               env=(EnvVar("VLLM_FL_OOT_ENABLED", parse_bool),)),
    SettingDef("log_level", "INFO", "DEBUG, INFO, WARNING or ERROR",
               env=(EnvVar("VLLM_FL_LOG_LEVEL",
                           _choice(LOG_LEVELS, "{value!r} is not a log level", str.upper)),)),
    SettingDef("dispatch_debug", False, "true: log the chosen impl per op and the call "
               "counts at exit", env=(EnvVar("VLLM_FL_DISPATCH_DEBUG", parse_bool),)),
    SettingDef("plugin_modules", (), "extra backend modules, comma-separated, loaded after "
               "entry points", env=(EnvVar("VLLM_FL_PLUGIN_MODULES", parse_name_list),)),
    SettingDef("flaggems_oplist_path", DEFAULT_OPLIST_PATH, "where each rank records the "
               "aten ops FlagGems enabled", env=(EnvVar("FLAGGEMS_ENABLE_OPLIST_PATH",
                                                        parse_text),)),
)
"""Every setting. ``VLLM_FL_CONFIG`` (the path of a complete YAML policy) is the one variable
that is not a setting of its own: it selects where the policy settings come from."""

EXCLUSIVE: tuple[tuple[str, str], ...] = (("flagos_whitelist", "flagos_blacklist"),
                                          ("oot_whitelist", "oot_blacklist"))
"""Settings that may not both be set in one layer (a whitelist would hide the blacklist)."""

BY_NAME: dict[str, SettingDef] = {s.name: s for s in SETTINGS}
YAML_KEYS: tuple[str, ...] = tuple(s.name for s in SETTINGS if s.policy)
"""The keys a YAML policy file may hold."""
POLICY_ENV: dict[str, str] = {v.name: s.name for s in SETTINGS if s.policy for v in s.env}
"""Policy variables: ignored (with a warning) when ``VLLM_FL_CONFIG`` names a file."""
PROCESS_ENV: tuple[str, ...] = ("VLLM_FL_CONFIG",) + tuple(
    v.name for s in SETTINGS if not s.policy for v in s.env)
"""Variables that always apply, also under ``VLLM_FL_CONFIG``."""
ENV_VARS: tuple[str, ...] = ("VLLM_FL_CONFIG",) + tuple(v.name for s in SETTINGS for v in s.env)
"""Every variable fl-dispatch reads."""
DEFAULTS: dict[str, Any] = {s.name: s.default for s in SETTINGS}
