"""Layered configuration: user YAML (complete override), environment, platform YAML, defaults.

``resolve_policy`` reads everything once and returns a :class:`Policy` whose every value
remembers where it came from. All problems are collected and raised together as one
:class:`ConfigError`, each naming its source (file and key, or variable), the bad value and the
closest valid spelling. YAML is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

from .errors import ConfigError, Problem, suggestion
from .settings import (  # noqa: F401  (re-exported: the names callers use)
    BY_NAME,
    DEFAULTS,
    EXCLUSIVE,
    POLICY_ENV,
    PROCESS_ENV,
    SETTINGS,
    YAML_KEYS,
    Collector,
    OpOrder,
    OrderToken,
    parse_bool,
    parse_per_op,
)

T = TypeVar("T")
_Collector = Collector


@dataclass(frozen=True)
class Setting(Generic[T]):
    """A resolved value and its source: ``user_config:PATH``, ``env:VAR``,
    ``platform:FILE``, ``op_config:PATH`` or ``default``. A map merged from several layers
    (``op_backends``) names them all in ``source``, highest first, and each key's own layer
    in ``parts``."""

    value: T
    source: str
    parts: Mapping[str, str] | None = None

    def source_of(self, key: str) -> str:
        """The layer a key of a merged map came from (``source`` when not merged)."""
        return (self.parts or {}).get(key, self.source)


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


def load_yaml_policy(path: str | Path, label: str, out: Collector) -> dict[str, Any]:
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
        setting = BY_NAME.get(key)
        if setting is None or setting.yaml is None:
            out.add(label, f"unknown key {key!r}; {suggestion(str(key), YAML_KEYS)}")
            continue
        if value is None and setting.default is None:
            result[key] = None
            continue
        before = len(out.problems)
        checked = setting.yaml(value, f"{label} key {key}", out)
        if len(out.problems) == before:
            result[key] = checked
    for wl, bl in EXCLUSIVE:
        if data.get(wl) is not None and data.get(bl) is not None:
            out.add(label, f"sets both {wl} and {bl}; the whitelist would hide the blacklist")
    return result


def env_flag(var: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    """One boolean variable, parsed as every fl-dispatch boolean is (empty: ``default``);
    a value that is not a boolean raises ConfigError naming the variable."""
    raw = (os.environ if env is None else env).get(var, "").strip()
    if not raw:
        return default
    out = Collector()
    value = parse_bool(raw, f"env:{var}", out)
    if out.problems:
        raise ConfigError(out.problems)
    return bool(value)


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
def _parse_var(var: Any, raw: str, out: Collector) -> Setting[Any] | None:
    """The set value ``raw`` of variable ``var``, parsed; None when it is invalid (the problem
    is collected)."""
    before = len(out.problems)
    value = var.parse(raw, var.where(raw), out)
    return Setting(value, var.label(raw)) if len(out.problems) == before else None


def _from_env(env: Mapping[str, str], name: str, out: Collector) -> Setting[Any] | None:
    """The value of setting ``name`` from its variables (highest precedence first), or None
    when none is set (or the set one is invalid: the problem is collected)."""
    for var in BY_NAME[name].env:
        raw = env.get(var.name, "").strip()
        if raw:
            return _parse_var(var, raw, out)
    return None


def _env_layers(env: Mapping[str, str], name: str, out: Collector) -> list[Setting[Any]]:
    """Every set variable of setting ``name``, parsed, highest precedence first (an invalid
    one is left out: its problem is collected)."""
    layers = []
    for var in BY_NAME[name].env:
        raw = env.get(var.name, "").strip()
        setting = _parse_var(var, raw, out) if raw else None
        if setting is not None:
            layers.append(setting)
    return layers


def merge_maps(layers: list[Setting[Any]]) -> Setting[Any]:
    """Per-key layering of map settings (``op_backends``), highest precedence first: each key
    takes its value from the highest layer that names it, so ``VLLM_FL_PER_OP=rms_norm=x``
    changes rms_norm's order and leaves the platform file's other entries (its
    ``attention_backend``) in force. One layer: that layer's setting unchanged."""
    if len(layers) == 1:
        return layers[0]
    value: dict[str, Any] = {}
    parts: dict[str, str] = {}
    for layer in reversed(layers):
        for key, item in layer.value.items():
            value[key] = item
            parts[key] = layer.source
    return Setting(value, " + ".join(layer.source for layer in layers), parts)


def resolve_policy(
    env: Mapping[str, str] | None = None,
    detect: Callable[[], str | None] = detect_platform,
) -> Policy:
    """Resolve the effective policy from ``env`` (default ``os.environ``) and the files.

    Process settings come from their variables (else the default). Policy settings come
    from ``VLLM_FL_CONFIG``'s file alone when it is set, else from their variables, else the
    platform file, else the default. Every problem is collected and raised together."""
    env = os.environ if env is None else env
    out = Collector()
    warnings: list[str] = []
    values: dict[str, Setting[Any]] = {}
    for setting in SETTINGS:
        if not setting.policy:
            values[setting.name] = _from_env(env, setting.name, out) or Setting(
                setting.default, "default")
    if values["platform"].source == "default" and not env.get("VLLM_FL_PLATFORM", "").strip():
        values["platform"] = Setting(detect(), "detected")  # unset (not invalid): detect it

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
        platform = values["platform"].value
        if platform is not None:
            path = platform_file(platform)
            plat_source = f"platform:{path}"
            plat_layer = load_yaml_policy(path, str(path), out)
        for key in YAML_KEYS:  # environment, else platform file, else default
            per_key = BY_NAME[key].per_key
            if per_key:  # per op: each op from the highest layer naming it
                layers = _env_layers(env, key, out)
            else:  # whole: the highest variable set, else the platform file's
                found = _from_env(env, key, out)
                layers = [found] if found else []
            if key in plat_layer:
                layers.append(Setting(plat_layer[key], plat_source))
            values[key] = ((merge_maps(layers) if per_key else layers[0]) if layers
                           else Setting(DEFAULTS[key], "default"))
        for wl, bl in EXCLUSIVE:
            wl_var, bl_var = BY_NAME[wl].env[0].name, BY_NAME[bl].env[0].name
            if env.get(wl_var, "").strip() and env.get(bl_var, "").strip():
                out.add(f"env:{wl_var}", f"{wl_var} and {bl_var} are both set; they are "
                        f"mutually exclusive (a whitelist ignores every blacklist): unset one")

    policy = Policy(warnings=tuple(warnings), **values)
    if out.problems:
        raise ConfigError(out.problems, policy=policy)
    return policy


def validate_against_registry(
    policy: Policy, impl_ids: Mapping[str, Any], vendors: set[str],
    layers: Iterable[str] | None = None,
) -> list[Problem]:
    """Check the names in the policy against what the loaded backends define:
    op names in op orders (``impl_ids`` maps every op to its impl ids), ``vendor:<name>``,
    ``impl:<id>``, allowed and denied vendors, OOT layer names (``layers``: the vLLM layers
    the ops serve, ``OpSpec.layer``; default: the built-in ops')."""
    if layers is None:
        from .ops import BUILTIN_OPS

        layers = [op.layer for op in BUILTIN_OPS if op.layer]
    layer_names = sorted(set(layers))
    ops = impl_ids
    problems: list[Problem] = []
    orders = policy.op_backends
    for op, tokens in orders.value.items():
        where = f"{orders.source_of(op)} op_backends.{op}"
        if op not in ops:
            problems.append(Problem(where, f"no backend defines op {op!r}; "
                                    f"{suggestion(op, ops)}"))
            continue
        for token in tokens:
            name = token.name or ""
            if token.kind == "vendor" and name and name not in vendors:
                problems.append(Problem(where, f"unknown vendor {name!r} in {token!r}; "
                                        f"{suggestion(name, vendors)}"))
            if token.kind == "impl" and name not in impl_ids[op]:
                problems.append(Problem(where, f"no impl {name!r} of op {op!r}; "
                                        f"{suggestion(name, impl_ids[op])}"))
    for key, what, known in (("allow_vendors", "vendor", vendors),
                             ("deny_vendors", "vendor", vendors),
                             ("oot_whitelist", "vLLM layer", layer_names),
                             ("oot_blacklist", "vLLM layer", layer_names)):
        setting = getattr(policy, key)
        for name in setting.value or ():
            if name not in known:
                problems.append(Problem(f"{setting.source} {key}",
                                        f"unknown {what} {name!r}; {suggestion(name, known)}"))
    return problems
