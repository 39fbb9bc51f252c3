"""Layered configuration: user YAML (complete override), environment, platform YAML, defaults.

``resolve_policy`` reads everything once and returns a :class:`Policy` whose every value
remembers where it came from. All problems are collected and raised together as one
:class:`ConfigError`, each naming its source (file and key, or variable), the bad value and the
closest valid spelling. YAML is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

from .errors import ConfigError, Problem, suggestion
from .impl import KINDS

T = TypeVar("T")

PREFER_CHOICES = KINDS
PLATFORMS = ("cuda", "ascend")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TOKEN_FORMS = ("flagos", "reference", "vendor", "vendor:<name>", "impl:<impl_id>")
OOT_LAYERS = ("silu_and_mul", "gelu_and_mul", "rms_norm", "rotary_embedding", "fused_moe")
"""vLLM layers (CustomOp names) that the OOT white/blacklists may name."""

YAML_KEYS = (
    "prefer",
    "strict",
    "allow_vendors",
    "deny_vendors",
    "op_backends",
    "flagos_blacklist",
    "flagos_whitelist",
    "oot_blacklist",
    "oot_whitelist",
)
"""The keys a YAML policy file may hold."""

POLICY_ENV: dict[str, str] = {
    "VLLM_FL_PREFER": "prefer",
    "VLLM_FL_STRICT": "strict",
    "VLLM_FL_ALLOW_VENDORS": "allow_vendors",
    "VLLM_FL_DENY_VENDORS": "deny_vendors",
    "VLLM_FL_PER_OP": "op_backends",
    "VLLM_FL_OP_CONFIG": "op_backends",
    "VLLM_FL_FLAGOS_BLACKLIST": "flagos_blacklist",
    "VLLM_FL_FLAGOS_WHITELIST": "flagos_whitelist",
    "VLLM_FL_OOT_BLACKLIST": "oot_blacklist",
    "VLLM_FL_OOT_WHITELIST": "oot_whitelist",
}
"""Policy variables: ignored (with a warning) when ``VLLM_FL_CONFIG`` names a file."""

PROCESS_ENV = (
    "VLLM_FL_PREFER_ENABLED",
    "VLLM_FL_CONFIG",
    "VLLM_FL_PLATFORM",
    "USE_FLAGGEMS",
    "VLLM_FL_OOT_ENABLED",
    "VLLM_FL_LOG_LEVEL",
    "VLLM_FL_DISPATCH_DEBUG",
    "VLLM_FL_PLUGIN_MODULES",
    "FLAGGEMS_ENABLE_OPLIST_PATH",
)
"""Variables that always apply, also under ``VLLM_FL_CONFIG``."""

DEFAULT_OPLIST_PATH = "/tmp/flaggems_enable_oplist.txt"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Setting(Generic[T]):
    """A resolved value and its source: ``user_config:PATH``, ``env:VAR``,
    ``platform:FILE``, ``op_config:PATH`` or ``default``."""

    value: T
    source: str


OpOrder = dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class Policy:
    """The effective configuration of this process."""

    enabled: Setting[bool]
    platform: Setting[str | None]
    prefer: Setting[str]
    strict: Setting[bool]
    allow_vendors: Setting[tuple[str, ...] | None]
    deny_vendors: Setting[tuple[str, ...]]
    op_backends: Setting[OpOrder]
    flagos_blacklist: Setting[tuple[str, ...] | None]
    flagos_whitelist: Setting[tuple[str, ...] | None]
    oot_blacklist: Setting[tuple[str, ...] | None]
    oot_whitelist: Setting[tuple[str, ...] | None]
    use_flaggems: Setting[bool]
    oot_enabled: Setting[bool]
    log_level: Setting[str]
    dispatch_debug: Setting[bool]
    plugin_modules: Setting[tuple[str, ...]]
    flaggems_oplist_path: Setting[str]
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def settings(self) -> dict[str, Setting[Any]]:
        """Every setting by name (``warnings`` excluded)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "warnings"}

    def flagos_allows(self, name: str) -> bool:
        """Whether flagos may serve ``name`` (a dispatch op or a FlagGems aten op):
        a whitelist beats the blacklist."""
        if self.flagos_whitelist.value is not None:
            return name in self.flagos_whitelist.value
        return name not in (self.flagos_blacklist.value or ())

    def oot_allows(self, layer: str) -> bool:
        """Whether the vLLM layer ``layer`` is replaced: OOT enabled, whitelist beats blacklist."""
        if not self.oot_enabled.value:
            return False
        if self.oot_whitelist.value is not None:
            return layer in self.oot_whitelist.value
        return layer not in (self.oot_blacklist.value or ())

    def fingerprint_items(self) -> dict[str, Any]:
        """The values that decide the selection, for cache keys and explain."""
        return {k: s.value for k, s in self.settings().items()}


DEFAULTS: dict[str, Any] = {
    "prefer": "flagos",
    "strict": False,
    "allow_vendors": None,
    "deny_vendors": (),
    "op_backends": {},
    "flagos_blacklist": None,
    "flagos_whitelist": None,
    "oot_blacklist": None,
    "oot_whitelist": None,
}


# --------------------------------------------------------------------------- value parsers
class _Collector:
    """Collects problems so that every one of them is reported, not just the first."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, source: str, message: str) -> None:
        self.problems.append(Problem(source, message))


def _check_prefer(value: Any, where: str, out: _Collector) -> str | None:
    if isinstance(value, str) and value in PREFER_CHOICES:
        return value
    out.add(where, f"prefer={value!r} is not valid; {suggestion(str(value), PREFER_CHOICES)}")
    return None


def _check_token(token: Any, where: str, out: _Collector) -> str | None:
    """Syntax of one op-order token; names are checked later against the registry."""
    if not isinstance(token, str):
        out.add(where, f"op order token {token!r} must be a string")
        return None
    token = token.strip()
    if token in ("flagos", "reference", "vendor"):
        return token
    prefix, sep, rest = token.partition(":")
    if sep and prefix in ("vendor", "impl") and rest.strip():
        return f"{prefix}:{rest.strip()}"
    out.add(
        where,
        f"unknown op order token {token!r}; {suggestion(token, TOKEN_FORMS)} "
        f"(tokens: {', '.join(TOKEN_FORMS)})",
    )
    return None


def _check_order_map(value: Any, where: str, out: _Collector) -> OpOrder | None:
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
        checked = [_check_token(t, at, out) for t in tokens]
        if all(t is not None for t in checked):
            result[op] = tuple(t for t in checked if t is not None)
    return result


def _check_name_list(value: Any, where: str, out: _Collector) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, list):
        out.add(where, f"must be a list of names, got {value!r}")
        return None
    bad = [v for v in value if not isinstance(v, str) or not v.strip()]
    if bad:
        out.add(where, f"names must be non-empty strings, got {bad!r}")
        return None
    return tuple(v.strip() for v in value)


def _check_strict(value: Any, where: str, out: _Collector) -> bool | None:
    if isinstance(value, bool):
        return value
    out.add(where, f"strict={value!r} is not a boolean; use true or false")
    return None


_KEY_CHECKS: dict[str, Callable[[Any, str, _Collector], Any]] = {
    "prefer": _check_prefer,
    "strict": _check_strict,
    "allow_vendors": _check_name_list,
    "deny_vendors": lambda v, w, o: _check_name_list(v, w, o) or (),
    "op_backends": _check_order_map,
    "flagos_blacklist": _check_name_list,
    "flagos_whitelist": _check_name_list,
    "oot_blacklist": _check_name_list,
    "oot_whitelist": _check_name_list,
}


def load_yaml_policy(path: str | Path, label: str, out: _Collector) -> dict[str, Any]:
    """Read and check one YAML policy file; ``label`` names it in problems."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        out.add(label, f"config file {str(path)!r} does not exist")
        return {}
    except OSError as exc:
        out.add(label, f"config file {str(path)!r} cannot be read: {exc}")
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        out.add(label, f"does not parse as YAML: {exc}")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        out.add(label, f"must be a mapping of keys to values, got {type(data).__name__}")
        return {}
    result: dict[str, Any] = {}
    for key, value in data.items():
        if key not in YAML_KEYS:
            out.add(label, f"unknown key {key!r}; {suggestion(str(key), YAML_KEYS)}")
            continue
        before = len(out.problems)
        checked = _KEY_CHECKS[key](value, f"{label} key {key}", out)
        if len(out.problems) == before:
            result[key] = checked
    for kind in ("flagos", "oot"):
        wl, bl = f"{kind}_whitelist", f"{kind}_blacklist"
        if data.get(wl) is not None and data.get(bl) is not None:
            out.add(label, f"sets both {wl} and {bl}; the whitelist would hide the blacklist")
    return result


def parse_per_op(text: str, where: str, out: _Collector) -> OpOrder | None:
    """Parse ``op1=a|b|c;op2=x|y``."""
    result: dict[str, list[str]] = {}
    for item in text.split(";"):
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
    return _check_order_map(result, where, out)


def _env_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _env_bool(env: Mapping[str, str], var: str, default: bool, out: _Collector) -> Setting[bool]:
    raw = env.get(var, "").strip()
    if not raw:
        return Setting(default, "default")
    if raw.lower() in _TRUE:
        return Setting(True, f"env:{var}")
    if raw.lower() in _FALSE:
        return Setting(False, f"env:{var}")
    out.add(f"env:{var}", f"{raw!r} is not a boolean; use one of {', '.join(_TRUE + _FALSE)}")
    return Setting(default, "default")


def env_flag(var: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    """One boolean variable, parsed as every fl-dispatch boolean is (empty: ``default``);
    a value that is not a boolean raises ConfigError naming the variable."""
    out = _Collector()
    value = _env_bool(os.environ if env is None else env, var, default, out).value
    if out.problems:
        raise ConfigError(out.problems)
    return value


# --------------------------------------------------------------------------- platform
def platform_file(platform: str) -> Path:
    """The platform YAML shipped with the package (``config/<platform>.yaml``)."""
    return Path(str(resources.files("fl_dispatch_platforms").joinpath(f"{platform}.yaml")))


def detect_platform() -> str | None:
    """CUDA, then NPU; None on a machine with neither."""
    try:
        import torch
    except ImportError:
        return None
    if torch.cuda.is_available():
        return "cuda"
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        return "ascend"
    return None


# --------------------------------------------------------------------------- resolution
def resolve_policy(
    env: Mapping[str, str] | None = None,
    detect: Callable[[], str | None] = detect_platform,
) -> Policy:
    """Resolve the effective policy from ``env`` (default ``os.environ``) and the files."""
    env = os.environ if env is None else env
    out = _Collector()
    warnings: list[str] = []
    values: dict[str, Setting[Any]] = {}

    enabled = _env_bool(env, "VLLM_FL_PREFER_ENABLED", True, out)
    use_flaggems = _env_bool(env, "USE_FLAGGEMS", True, out)
    oot_enabled = _env_bool(env, "VLLM_FL_OOT_ENABLED", True, out)
    debug = _env_bool(env, "VLLM_FL_DISPATCH_DEBUG", False, out)

    raw_level = env.get("VLLM_FL_LOG_LEVEL", "").strip()
    log_level = Setting("INFO", "default")
    if raw_level:
        if raw_level.upper() in LOG_LEVELS:
            log_level = Setting(raw_level.upper(), "env:VLLM_FL_LOG_LEVEL")
        else:
            out.add("env:VLLM_FL_LOG_LEVEL", f"{raw_level!r} is not a log level; "
                    f"{suggestion(raw_level.upper(), LOG_LEVELS)}")
    raw_modules = env.get("VLLM_FL_PLUGIN_MODULES", "").strip()
    modules = Setting(_env_list(raw_modules), "env:VLLM_FL_PLUGIN_MODULES" if raw_modules
                      else "default")
    raw_oplist = env.get("FLAGGEMS_ENABLE_OPLIST_PATH", "").strip()
    oplist = Setting(raw_oplist or DEFAULT_OPLIST_PATH,
                     "env:FLAGGEMS_ENABLE_OPLIST_PATH" if raw_oplist else "default")

    raw_platform = env.get("VLLM_FL_PLATFORM", "").strip()
    if raw_platform:
        if raw_platform.lower() in PLATFORMS:
            platform = Setting(raw_platform.lower(), "env:VLLM_FL_PLATFORM")
        else:
            out.add("env:VLLM_FL_PLATFORM", f"unknown platform {raw_platform!r}; "
                    f"{suggestion(raw_platform.lower(), PLATFORMS)}")
            platform = Setting(None, "default")
    else:
        platform = Setting(detect(), "detected")

    user_path = env.get("VLLM_FL_CONFIG", "").strip()
    if user_path:
        source = f"user_config:{user_path}"
        layer = load_yaml_policy(user_path, f"VLLM_FL_CONFIG={user_path}", out)
        for key in YAML_KEYS:
            values[key] = Setting(layer[key], source) if key in layer else Setting(
                DEFAULTS[key], "default")
        for var in POLICY_ENV:
            if env.get(var, "").strip():
                warnings.append(f"{var} is set but ignored: VLLM_FL_CONFIG={user_path} is a "
                                f"complete override")
    else:
        plat_layer: dict[str, Any] = {}
        plat_source = ""
        if platform.value is not None:
            path = platform_file(platform.value)
            plat_source = f"platform:{path}"
            plat_layer = load_yaml_policy(path, str(path), out)
        for key in YAML_KEYS:
            if key in plat_layer:
                values[key] = Setting(plat_layer[key], plat_source)
            else:
                values[key] = Setting(DEFAULTS[key], "default")
        _apply_env(env, values, out)

    for kind in ("FLAGOS", "OOT"):
        wl, bl = f"VLLM_FL_{kind}_WHITELIST", f"VLLM_FL_{kind}_BLACKLIST"
        if env.get(wl, "").strip() and env.get(bl, "").strip() and not user_path:
            out.add(f"env:{wl}", f"{wl} and {bl} are both set; they are mutually exclusive "
                    f"(a whitelist ignores every blacklist): unset one")

    policy = Policy(
        enabled=enabled, platform=platform, use_flaggems=use_flaggems,
        oot_enabled=oot_enabled, log_level=log_level, dispatch_debug=debug,
        plugin_modules=modules, flaggems_oplist_path=oplist, warnings=tuple(warnings),
        **values,
    )
    if out.problems:
        raise ConfigError(out.problems, policy=policy)
    return policy


def _apply_env(env: Mapping[str, str], values: dict[str, Setting[Any]], out: _Collector) -> None:
    """Environment variables replace whole values (lists are never merged)."""
    raw = env.get("VLLM_FL_PREFER", "").strip()
    if raw:
        prefer = _check_prefer(raw, "env:VLLM_FL_PREFER", out)
        if prefer:
            values["prefer"] = Setting(prefer, "env:VLLM_FL_PREFER")
    strict = _env_bool(env, "VLLM_FL_STRICT", values["strict"].value, out)
    if strict.source != "default":
        values["strict"] = strict
    for var, key in (
        ("VLLM_FL_ALLOW_VENDORS", "allow_vendors"),
        ("VLLM_FL_DENY_VENDORS", "deny_vendors"),
        ("VLLM_FL_FLAGOS_BLACKLIST", "flagos_blacklist"),
        ("VLLM_FL_FLAGOS_WHITELIST", "flagos_whitelist"),
        ("VLLM_FL_OOT_BLACKLIST", "oot_blacklist"),
        ("VLLM_FL_OOT_WHITELIST", "oot_whitelist"),
    ):
        raw = env.get(var, "").strip()
        if raw:
            values[key] = Setting(_env_list(raw), f"env:{var}")
    op_config = env.get("VLLM_FL_OP_CONFIG", "").strip()
    if op_config:
        where = f"VLLM_FL_OP_CONFIG={op_config}"
        try:
            data = json.loads(Path(op_config).read_text(encoding="utf-8"))
        except FileNotFoundError:
            out.add(where, f"op config file {op_config!r} does not exist")
        except (OSError, ValueError) as exc:
            out.add(where, f"does not parse as JSON: {exc}")
        else:
            order = _check_order_map(data, where, out)
            if order is not None:
                values["op_backends"] = Setting(order, f"op_config:{op_config}")
    per_op = env.get("VLLM_FL_PER_OP", "").strip()
    if per_op:
        order = parse_per_op(per_op, "env:VLLM_FL_PER_OP", out)
        if order is not None:
            values["op_backends"] = Setting(order, "env:VLLM_FL_PER_OP")


def validate_against_registry(
    policy: Policy, impl_ids: Mapping[str, Any], vendors: set[str]
) -> list[Problem]:
    """Check the names in the policy against what the loaded backends define:
    op names in op orders (``impl_ids`` maps every op to its impl ids), ``vendor:<name>``,
    ``impl:<id>``, allowed and denied vendors, OOT layer names."""
    ops = impl_ids
    problems: list[Problem] = []
    orders = policy.op_backends
    for op, tokens in orders.value.items():
        where = f"{orders.source} op_backends.{op}"
        if op not in ops:
            problems.append(Problem(where, f"no backend defines op {op!r}; "
                                    f"{suggestion(op, ops)}"))
            continue
        for token in tokens:
            prefix, _, name = token.partition(":")
            if prefix == "vendor" and name and name not in vendors:
                problems.append(Problem(where, f"unknown vendor {name!r} in {token!r}; "
                                        f"{suggestion(name, vendors)}"))
            if prefix == "impl" and name not in impl_ids[op]:
                problems.append(Problem(where, f"no impl {name!r} of op {op!r}; "
                                        f"{suggestion(name, impl_ids[op])}"))
    for key in ("allow_vendors", "deny_vendors"):
        setting = getattr(policy, key)
        for name in setting.value or ():
            if name not in vendors:
                problems.append(Problem(f"{setting.source} {key}",
                                        f"unknown vendor {name!r}; {suggestion(name, vendors)}"))
    for key in ("oot_whitelist", "oot_blacklist"):
        setting = getattr(policy, key)
        for name in setting.value or ():
            if name not in OOT_LAYERS:
                problems.append(Problem(f"{setting.source} {key}",
                                        f"unknown vLLM layer {name!r}; "
                                        f"{suggestion(name, OOT_LAYERS)}"))
    return problems
