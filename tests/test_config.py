"""The layered policy: user config > environment > platform file > defaults, and validation.

Every test resolves the policy from an explicit ``env`` dict with ``detect=lambda: None``, so
neither the real environment nor the machine's accelerators matter.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from fl_dispatch.core import config
from fl_dispatch.core.config import (
    POLICY_ENV,
    YAML_KEYS,
    Policy,
    platform_file,
    resolve_policy,
    validate_against_registry,
)
from fl_dispatch.core.discovery import load_plugins
from fl_dispatch.core.dispatch import Dispatcher
from fl_dispatch.core.errors import ConfigError, PluginLoadError

CUDA_YAML = platform_file("cuda")
ASCEND_YAML = platform_file("ascend")


def resolve(**env: str) -> Policy:
    return resolve_policy(env=env, detect=lambda: None)


def problems_of(**env: str) -> list[str]:
    """Resolve and return every problem as ``source: message`` (the resolution must fail)."""
    with pytest.raises(ConfigError) as info:
        resolve(**env)
    return [str(p) for p in info.value.problems]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def builtin_plugins():
    """The built-in backends, found through their entry points (vendors: cuda, ascend)."""
    return load_plugins()


def registry_problems(policy: Policy, plugins) -> list[str]:
    reg = plugins.registry
    found = validate_against_registry(
        policy, {op: [i.impl_id for i in impls] for op, impls in reg.impls.items()},
        reg.vendors())
    return [str(p) for p in found]


# --------------------------------------------------------------------------- layering
def test_defaults_when_nothing_is_set():
    policy = resolve()
    assert policy.platform.value is None and policy.platform.source == "detected"
    for key in YAML_KEYS:
        assert getattr(policy, key).source == "default", key
    assert policy.prefer.value == "flagos"
    assert policy.strict.value is False
    assert policy.op_backends.value == {}
    assert policy.deny_vendors.value == ()
    assert policy.allow_vendors.value is None
    assert policy.warnings == ()


@pytest.mark.parametrize("platform, path, prefer, denied, orders", [
    ("cuda", CUDA_YAML, "flagos", ("ascend",), {"attention_backend": ("reference",)}),
    ("ascend", ASCEND_YAML, "vendor", ("cuda",), None),
])
def test_platform_file_forced_by_variable(platform, path, prefer, denied, orders):
    policy = resolve(VLLM_FL_PLATFORM=platform)
    assert policy.platform.value == platform
    assert policy.platform.source == "env:VLLM_FL_PLATFORM"
    source = f"platform:{path}"
    assert policy.prefer.value == prefer and policy.prefer.source == source
    assert policy.strict.value is False and policy.strict.source == source
    assert policy.deny_vendors.value == denied and policy.deny_vendors.source == source
    assert "mm" in policy.flagos_blacklist.value
    assert policy.flagos_blacklist.source == source
    if orders is None:  # keys the file does not set keep the built-in default
        assert policy.op_backends.source == "default"
    else:
        assert policy.op_backends.value == orders and policy.op_backends.source == source
    assert policy.allow_vendors.source == "default"


def test_platform_file_from_detection():
    policy = resolve_policy(env={}, detect=lambda: "ascend")
    assert policy.platform.value == "ascend" and policy.platform.source == "detected"
    assert policy.prefer.source == f"platform:{ASCEND_YAML}"


def test_platform_variable_beats_detection():
    policy = resolve_policy(env={"VLLM_FL_PLATFORM": "cuda"}, detect=lambda: "ascend")
    assert policy.platform.value == "cuda"
    assert policy.prefer.source == f"platform:{CUDA_YAML}"


def test_env_overrides_one_item_and_keeps_the_rest_from_the_platform_file():
    """The spec's example: VLLM_FL_PREFER=vendor, the blacklist still comes from the file."""
    policy = resolve(VLLM_FL_PLATFORM="ascend", VLLM_FL_PREFER="reference")
    assert policy.prefer.value == "reference"
    assert policy.prefer.source == "env:VLLM_FL_PREFER"
    assert policy.flagos_blacklist.source == f"platform:{ASCEND_YAML}"
    assert "to_copy" in policy.flagos_blacklist.value


def test_env_list_replaces_the_file_list_whole():
    policy = resolve(VLLM_FL_PLATFORM="cuda",
                     VLLM_FL_FLAGOS_BLACKLIST="custom_op1, custom_op2",
                     VLLM_FL_DENY_VENDORS="cuda")
    assert policy.flagos_blacklist.value == ("custom_op1", "custom_op2")  # not merged with mm...
    assert policy.flagos_blacklist.source == "env:VLLM_FL_FLAGOS_BLACKLIST"
    assert policy.deny_vendors.value == ("cuda",)  # the file's 'ascend' is gone
    assert policy.deny_vendors.source == "env:VLLM_FL_DENY_VENDORS"


def test_env_strict_and_vendor_lists():
    policy = resolve(VLLM_FL_STRICT="1", VLLM_FL_ALLOW_VENDORS="cuda,ascend")
    assert policy.strict.value is True and policy.strict.source == "env:VLLM_FL_STRICT"
    assert policy.allow_vendors.value == ("cuda", "ascend")
    assert policy.allow_vendors.source == "env:VLLM_FL_ALLOW_VENDORS"
    assert resolve(VLLM_FL_STRICT="false").strict.value is False


def test_env_strict_zero_overrides_a_file_that_says_true(tmp_path, monkeypatch):
    plat = write(tmp_path, "plat.yaml", "strict: true\n")
    monkeypatch.setattr(config, "platform_file", lambda name: plat)
    assert resolve(VLLM_FL_PLATFORM="cuda").strict.value is True
    policy = resolve(VLLM_FL_PLATFORM="cuda", VLLM_FL_STRICT="0")
    assert policy.strict.value is False and policy.strict.source == "env:VLLM_FL_STRICT"


def test_per_op_variable():
    policy = resolve(VLLM_FL_PER_OP="rms_norm=vendor|flagos|reference;silu_and_mul=vendor:cuda")
    assert policy.op_backends.value == {
        "rms_norm": ("vendor", "flagos", "reference"),
        "silu_and_mul": ("vendor:cuda",),
    }
    assert policy.op_backends.source == "env:VLLM_FL_PER_OP"


def test_op_orders_layer_per_op_env_over_json_over_the_platform_file(tmp_path, monkeypatch):
    plat = write(tmp_path, "plat.yaml", """\
        op_backends:
          rms_norm: [reference]
          gelu_and_mul: [reference]
    """)
    monkeypatch.setattr(config, "platform_file", lambda name: plat)
    op_config = tmp_path / "ops.json"
    op_config.write_text(json.dumps({"rms_norm": ["flagos"], "silu_and_mul": ["vendor"]}))

    only_file = resolve(VLLM_FL_PLATFORM="cuda")
    assert only_file.op_backends.source == f"platform:{plat}"
    assert only_file.op_backends.source_of("rms_norm") == f"platform:{plat}"
    assert only_file.op_backends.value == {"rms_norm": ("reference",),
                                           "gelu_and_mul": ("reference",)}

    # each op from the highest layer naming it: the JSON's rms_norm and silu_and_mul, the
    # file's gelu_and_mul (kept: a per-op variable does not drop the file's other ops)
    with_json = resolve(VLLM_FL_PLATFORM="cuda", VLLM_FL_OP_CONFIG=str(op_config))
    assert with_json.op_backends.value == {"rms_norm": ("flagos",), "silu_and_mul": ("vendor",),
                                           "gelu_and_mul": ("reference",)}
    assert with_json.op_backends.source == f"op_config:{op_config} + platform:{plat}"
    assert with_json.op_backends.source_of("rms_norm") == f"op_config:{op_config}"
    assert with_json.op_backends.source_of("gelu_and_mul") == f"platform:{plat}"

    with_env = resolve(VLLM_FL_PLATFORM="cuda", VLLM_FL_OP_CONFIG=str(op_config),
                       VLLM_FL_PER_OP="rms_norm=vendor|reference")
    assert with_env.op_backends.value == {"rms_norm": ("vendor", "reference"),
                                          "silu_and_mul": ("vendor",),
                                          "gelu_and_mul": ("reference",)}
    assert with_env.op_backends.source == (f"env:VLLM_FL_PER_OP + op_config:{op_config} + "
                                           f"platform:{plat}")
    assert with_env.op_backends.source_of("rms_norm") == "env:VLLM_FL_PER_OP"
    assert with_env.op_backends.source_of("silu_and_mul") == f"op_config:{op_config}"


def test_a_per_op_variable_keeps_the_cuda_files_attention_rule():
    """The trap this fixes (H200, 2026-11-30): ``VLLM_FL_PER_OP=rms_norm=reference`` replaced
    the whole per-op map, so the shipped cuda.yaml's ``attention_backend: [reference]``
    (vLLM's own selector) was dropped and flagos' TRITON_ATTN was chosen instead, silently
    changing attention in a run meant to change one norm."""
    policy = resolve(VLLM_FL_PLATFORM="cuda", VLLM_FL_PER_OP="rms_norm=reference")
    assert policy.op_backends.value == {"rms_norm": ("reference",),
                                        "attention_backend": ("reference",)}
    assert policy.op_backends.source_of("attention_backend").startswith("platform:")
    # naming the op in the variable still overrides the file's entry
    forced = resolve(VLLM_FL_PLATFORM="cuda", VLLM_FL_PER_OP="attention_backend=flagos")
    assert forced.op_backends.value == {"attention_backend": ("flagos",)}
    assert forced.op_backends.source_of("attention_backend") == "env:VLLM_FL_PER_OP"


def test_user_config_is_a_complete_override(tmp_path):
    user = write(tmp_path, "mine.yaml", """\
        prefer: reference
        allow_vendors: [cuda]
        op_backends:
          rms_norm: [vendor, flagos]
    """)
    ignored = {
        "VLLM_FL_PREFER": "vendor",
        "VLLM_FL_STRICT": "1",
        "VLLM_FL_DENY_VENDORS": "cuda",
        "VLLM_FL_PER_OP": "rms_norm=reference",
        # both lists set would be an error, but under VLLM_FL_CONFIG they are ignored
        "VLLM_FL_FLAGOS_WHITELIST": "rms_norm",
        "VLLM_FL_FLAGOS_BLACKLIST": "mm",
    }
    policy = resolve(VLLM_FL_CONFIG=str(user), VLLM_FL_PLATFORM="cuda",
                     VLLM_FL_LOG_LEVEL="debug", **ignored)
    source = f"user_config:{user}"
    assert policy.prefer.value == "reference" and policy.prefer.source == source
    assert policy.allow_vendors.value == ("cuda",) and policy.allow_vendors.source == source
    assert policy.op_backends.value == {"rms_norm": ("vendor", "flagos")}
    assert policy.op_backends.source == source
    # keys the file omits take the built-in defaults, not the env and not the platform file
    assert policy.strict.value is False and policy.strict.source == "default"
    assert policy.deny_vendors.value == () and policy.deny_vendors.source == "default"
    assert policy.flagos_blacklist.value is None
    assert policy.flagos_blacklist.source == "default"
    assert policy.flagos_whitelist.source == "default"
    # one warning per ignored policy variable, each naming it
    assert len(policy.warnings) == len(ignored)
    for var in ignored:
        assert sum(var in w and "ignored" in w for w in policy.warnings) == 1, var
    # process variables still apply and are not warned about
    assert policy.log_level.value == "DEBUG"
    assert policy.log_level.source == "env:VLLM_FL_LOG_LEVEL"
    assert policy.platform.value == "cuda"
    assert not any("VLLM_FL_LOG_LEVEL" in w or "VLLM_FL_PLATFORM" in w
                   for w in policy.warnings)


def test_user_config_warns_about_op_config_too(tmp_path):
    user = write(tmp_path, "mine.yaml", "prefer: vendor\n")
    policy = resolve(VLLM_FL_CONFIG=str(user), VLLM_FL_OP_CONFIG=str(tmp_path / "nope.json"))
    assert policy.op_backends.source == "default"  # the missing JSON file is not even read
    assert [w for w in policy.warnings if "VLLM_FL_OP_CONFIG" in w]


def test_every_policy_variable_is_ignored_under_user_config(tmp_path):
    user = write(tmp_path, "empty.yaml", "")
    env = {var: "x" for var in POLICY_ENV}
    policy = resolve(VLLM_FL_CONFIG=str(user), **env)
    for key in YAML_KEYS:
        assert getattr(policy, key).source == "default", key
    assert len(policy.warnings) == len(POLICY_ENV)


# --------------------------------------------------------------------------- white/black lists
def test_flagos_whitelist_beats_the_file_blacklist():
    policy = resolve(VLLM_FL_PLATFORM="cuda", VLLM_FL_FLAGOS_WHITELIST="mm,rms_norm")
    assert "mm" in policy.flagos_blacklist.value  # still there, from the file...
    assert policy.flagos_allows("mm")  # ...but the whitelist wins
    assert policy.flagos_allows("rms_norm")
    assert not policy.flagos_allows("silu_and_mul")  # not whitelisted


def test_flagos_blacklist_alone():
    policy = resolve(VLLM_FL_PLATFORM="cuda")
    assert not policy.flagos_allows("mm")
    assert policy.flagos_allows("rms_norm")
    assert resolve().flagos_allows("mm")  # no list at all: everything allowed


def test_env_blacklist_replaces_the_file_blacklist():
    policy = resolve(VLLM_FL_PLATFORM="cuda", VLLM_FL_FLAGOS_BLACKLIST="rms_norm")
    assert policy.flagos_allows("mm")
    assert not policy.flagos_allows("rms_norm")


def test_oot_lists(tmp_path):
    user = write(tmp_path, "oot.yaml", "oot_blacklist: [fused_moe]\noot_whitelist: null\n")
    policy = resolve(VLLM_FL_CONFIG=str(user))
    assert not policy.oot_allows("fused_moe")
    assert policy.oot_allows("rms_norm")
    white = resolve(VLLM_FL_OOT_WHITELIST="rms_norm")
    assert white.oot_allows("rms_norm") and not white.oot_allows("silu_and_mul")
    off = resolve(VLLM_FL_OOT_ENABLED="0", VLLM_FL_OOT_WHITELIST="rms_norm")
    assert not off.oot_allows("rms_norm")


@pytest.mark.parametrize("kind", ["FLAGOS", "OOT"])
def test_whitelist_and_blacklist_variables_together_are_an_error(kind):
    wl, bl = f"VLLM_FL_{kind}_WHITELIST", f"VLLM_FL_{kind}_BLACKLIST"
    problems = problems_of(**{wl: "rms_norm", bl: "mm"})
    assert len(problems) == 1
    assert wl in problems[0] and bl in problems[0]


def test_whitelist_and_blacklist_in_one_yaml_are_an_error(tmp_path):
    user = write(tmp_path, "both.yaml", "flagos_whitelist: [a]\nflagos_blacklist: [b]\n")
    (problem,) = problems_of(VLLM_FL_CONFIG=str(user))
    assert str(user) in problem
    assert "flagos_whitelist" in problem and "flagos_blacklist" in problem


# --------------------------------------------------------------------------- bad input
def test_yaml_that_does_not_parse(tmp_path):
    bad = write(tmp_path, "bad.yaml", "prefer: [vendor\nstrict: false\n")
    (problem,) = problems_of(VLLM_FL_CONFIG=str(bad))
    assert "VLLM_FL_CONFIG" in problem and str(bad) in problem
    assert "does not parse as YAML" in problem


def test_yaml_that_is_not_a_mapping(tmp_path):
    bad = write(tmp_path, "list.yaml", "- prefer\n- vendor\n")
    (problem,) = problems_of(VLLM_FL_CONFIG=str(bad))
    assert str(bad) in problem
    assert "mapping" in problem and "list" in problem


def test_yaml_unknown_key_suggests_the_closest(tmp_path):
    bad = write(tmp_path, "typo.yaml", "prefr: vendor\n")
    (problem,) = problems_of(VLLM_FL_CONFIG=str(bad))
    assert str(bad) in problem
    assert "'prefr'" in problem and "did you mean 'prefer'" in problem


@pytest.mark.parametrize("key, value, shown", [
    ("allow_vendors", "cuda", "'cuda'"),
    ("deny_vendors", "{a: 1}", "{'a': 1}"),
    ("flagos_blacklist", "mm", "'mm'"),
    ("op_backends", "[rms_norm]", "['rms_norm']"),
    ("op_backends", "{rms_norm: vendor}", "'vendor'"),
    ("prefer", "3", "3"),
])
def test_yaml_wrong_type(tmp_path, key, value, shown):
    bad = write(tmp_path, "types.yaml", f"{key}: {value}\n")
    (problem,) = problems_of(VLLM_FL_CONFIG=str(bad))
    assert str(bad) in problem
    assert key in problem  # the source names file and key
    assert shown in problem  # and the bad value


def test_missing_user_config_is_an_error_not_skipped(tmp_path):
    missing = tmp_path / "does-not-exist.yaml"
    (problem,) = problems_of(VLLM_FL_CONFIG=str(missing))
    assert "VLLM_FL_CONFIG" in problem and str(missing) in problem
    assert "does not exist" in problem


def test_bad_prefer_in_yaml(tmp_path):
    bad = write(tmp_path, "prefer.yaml", "prefer: fastest\n")
    (problem,) = problems_of(VLLM_FL_CONFIG=str(bad))
    assert str(bad) in problem and "key prefer" in problem
    assert "'fastest'" in problem
    # no spelling is close to 'fastest': the valid choices are listed instead
    for choice in ("flagos", "vendor", "reference"):
        assert choice in problem


def test_bad_prefer_in_env_suggests_the_closest():
    (problem,) = problems_of(VLLM_FL_PREFER="vendr")
    assert problem.startswith("env:VLLM_FL_PREFER")
    assert "'vendr'" in problem and "did you mean 'vendor'" in problem


def test_strict_maybe_in_yaml(tmp_path):
    bad = write(tmp_path, "strict.yaml", "strict: maybe\n")
    (problem,) = problems_of(VLLM_FL_CONFIG=str(bad))
    assert str(bad) in problem and "key strict" in problem
    assert "'maybe'" in problem and "boolean" in problem


def test_strict_maybe_in_env():
    (problem,) = problems_of(VLLM_FL_STRICT="maybe")
    assert problem.startswith("env:VLLM_FL_STRICT")
    assert "'maybe'" in problem and "boolean" in problem


def test_unknown_token_in_yaml_suggests_the_closest(tmp_path):
    bad = write(tmp_path, "tokens.yaml", "op_backends:\n  rms_norm: [vendor, flagoss]\n")
    (problem,) = problems_of(VLLM_FL_CONFIG=str(bad))
    assert str(bad) in problem and "op_backends.rms_norm" in problem
    assert "'flagoss'" in problem and "did you mean 'flagos'" in problem


def test_unknown_token_in_per_op_suggests_the_closest():
    (problem,) = problems_of(VLLM_FL_PER_OP="rms_norm=flagoss|reference")
    assert problem.startswith("env:VLLM_FL_PER_OP")
    assert "'flagoss'" in problem and "did you mean 'flagos'" in problem


@pytest.mark.parametrize("text, expected", [
    ("rms_norm", "item 'rms_norm' is not of the form op=token|token"),
    ("rms_norm=flagos;silu_and_mul", "item 'silu_and_mul' is not of the form"),
    ("=flagos", "item '=flagos' is not of the form"),
    ("rms_norm=flagos;rms_norm=vendor", "op 'rms_norm' is given twice"),
    ("rms_norm=", "must be a non-empty list of tokens"),
])
def test_per_op_that_does_not_parse(text, expected):
    (problem,) = problems_of(VLLM_FL_PER_OP=text)
    assert problem.startswith("env:VLLM_FL_PER_OP")
    assert expected in problem


def test_op_config_missing_or_not_json(tmp_path):
    missing = tmp_path / "missing.json"
    (problem,) = problems_of(VLLM_FL_OP_CONFIG=str(missing))
    assert "VLLM_FL_OP_CONFIG" in problem and str(missing) in problem
    assert "does not exist" in problem
    bad = write(tmp_path, "bad.json", "{rms_norm: [flagos]")
    (problem,) = problems_of(VLLM_FL_OP_CONFIG=str(bad))
    assert "VLLM_FL_OP_CONFIG" in problem and str(bad) in problem and "JSON" in problem
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"rms_norm": ["flagoss"]}))
    (problem,) = problems_of(VLLM_FL_OP_CONFIG=str(typo))
    assert str(typo) in problem and "did you mean 'flagos'" in problem


@pytest.mark.parametrize("var, value, near", [
    ("VLLM_FL_PLATFORM", "cudaa", "cuda"),
    ("VLLM_FL_LOG_LEVEL", "WARN", "WARNING"),
])
def test_bad_process_variables(var, value, near):
    (problem,) = problems_of(**{var: value})
    assert problem.startswith(f"env:{var}")
    assert repr(value) in problem and f"did you mean {near!r}" in problem


@pytest.mark.parametrize("var", ["VLLM_FL_PREFER_ENABLED", "USE_FLAGGEMS",
                                 "VLLM_FL_OOT_ENABLED", "VLLM_FL_DISPATCH_DEBUG"])
def test_bad_boolean_variables(var):
    (problem,) = problems_of(**{var: "perhaps"})
    assert problem.startswith(f"env:{var}") and "'perhaps'" in problem


def test_every_problem_is_reported_at_once(tmp_path):
    bad = write(tmp_path, "many.yaml", """\
        prefr: vendor
        strict: maybe
        prefer: fastest
        op_backends:
          rms_norm: [flagoss]
    """)
    problems = problems_of(VLLM_FL_CONFIG=str(bad), VLLM_FL_LOG_LEVEL="loud")
    text = "\n".join(problems)
    assert len(problems) == 5, text
    for needle in ("'prefr'", "'maybe'", "'fastest'", "'flagoss'", "'loud'"):
        assert needle in text


def test_env_problems_are_collected_too():
    problems = problems_of(VLLM_FL_PREFER="fast", VLLM_FL_STRICT="maybe",
                           VLLM_FL_PER_OP="rms_norm=flagoss")
    sources = sorted(p.split(":")[1].split(" ")[0].split(".")[0] for p in problems)
    assert sources == ["VLLM_FL_PER_OP", "VLLM_FL_PREFER", "VLLM_FL_STRICT"]


# --------------------------------------------------------------------------- names vs registry
def test_unknown_vendor_names_the_known_vendors(builtin_plugins):
    policy = resolve(VLLM_FL_PER_OP="rms_norm=vendor:nvdia|reference")
    (problem,) = registry_problems(policy, builtin_plugins)
    assert "env:VLLM_FL_PER_OP" in problem and "rms_norm" in problem
    assert "'nvdia'" in problem
    assert "cuda" in problem and "ascend" in problem


def test_unknown_vendor_rejected_by_the_dispatcher(builtin_plugins, tmp_path):
    user = write(tmp_path, "v.yaml", "op_backends:\n  rms_norm: ['vendor:nvdia']\n")
    policy = resolve(VLLM_FL_CONFIG=str(user))
    with pytest.raises(ConfigError) as info:
        Dispatcher(policy, builtin_plugins)
    (problem,) = [str(p) for p in info.value.problems]
    assert f"user_config:{user}" in problem and "'nvdia'" in problem and "cuda" in problem


def test_unknown_vendor_in_vendor_lists(builtin_plugins):
    policy = resolve(VLLM_FL_ALLOW_VENDORS="cdua")
    (problem,) = registry_problems(policy, builtin_plugins)
    assert "env:VLLM_FL_ALLOW_VENDORS" in problem and "allow_vendors" in problem
    assert "'cdua'" in problem and "did you mean 'cuda'" in problem
    policy = resolve(VLLM_FL_DENY_VENDORS="ascnd")
    (problem,) = registry_problems(policy, builtin_plugins)
    assert "env:VLLM_FL_DENY_VENDORS" in problem and "did you mean 'ascend'" in problem


def test_op_order_for_an_op_nobody_defines(builtin_plugins):
    policy = resolve(VLLM_FL_PER_OP="rms_nrm=reference")
    (problem,) = registry_problems(policy, builtin_plugins)
    assert "env:VLLM_FL_PER_OP" in problem
    assert "'rms_nrm'" in problem and "did you mean 'rms_norm'" in problem


def test_pinned_impl_that_does_not_exist(builtin_plugins):
    policy = resolve(VLLM_FL_PER_OP="rms_norm=impl:reference.torhc")
    (problem,) = registry_problems(policy, builtin_plugins)
    assert "'reference.torhc'" in problem and "did you mean 'reference.torch'" in problem


def test_unknown_oot_layer(builtin_plugins):
    policy = resolve(VLLM_FL_OOT_BLACKLIST="fused_moee")
    (problem,) = registry_problems(policy, builtin_plugins)
    assert "env:VLLM_FL_OOT_BLACKLIST" in problem and "did you mean 'fused_moe'" in problem


def test_known_names_pass(builtin_plugins):
    policy = resolve(VLLM_FL_PER_OP="rms_norm=vendor:cuda|impl:reference.torch|flagos",
                     VLLM_FL_DENY_VENDORS="ascend", VLLM_FL_OOT_BLACKLIST="fused_moe")
    assert registry_problems(policy, builtin_plugins) == []


# --------------------------------------------------------------------------- plugin modules
def test_plugin_module_that_does_not_exist(test_plugins, fl_log):
    policy = resolve(VLLM_FL_PLUGIN_MODULES="fl_test_no_such_module, fl_test_good")
    assert policy.plugin_modules.value == ("fl_test_no_such_module", "fl_test_good")
    assert policy.plugin_modules.source == "env:VLLM_FL_PLUGIN_MODULES"
    plugins = load_plugins(policy.plugin_modules.value)
    (bad,) = plugins.errors
    assert bad.name == "fl_test_no_such_module"
    assert "VLLM_FL_PLUGIN_MODULES" in bad.source
    assert "ModuleNotFoundError" in bad.error and "fl_test_no_such_module" in bad.error
    assert bad.traceback and "Traceback" in bad.traceback
    # the others still load
    loaded = {r.name for r in plugins.records if r.loaded}
    assert {"reference", "fl_test_good"} <= loaded
    assert plugins.registry.impl("rms_norm", "vendor.acme") is not None
    # non-strict: one warning naming the plugin, its source and the cause
    Dispatcher(policy, plugins)
    warnings = [r.getMessage() for r in fl_log if r.levelname == "WARNING"]
    (line,) = [w for w in warnings if "fl_test_no_such_module" in w]
    assert "VLLM_FL_PLUGIN_MODULES" in line and "ModuleNotFoundError" in line
    # strict: the same problem is an error
    strict = resolve(VLLM_FL_PLUGIN_MODULES="fl_test_no_such_module", VLLM_FL_STRICT="1")
    with pytest.raises(PluginLoadError, match="fl_test_no_such_module"):
        Dispatcher(strict, load_plugins(strict.plugin_modules.value))


# --------------------------------------------------------------------------- shipped files
@pytest.mark.parametrize("path", [CUDA_YAML, ASCEND_YAML], ids=["cuda", "ascend"])
def test_shipped_platform_files_validate(path, builtin_plugins):
    assert path.is_file()
    out = config._Collector()
    layer = config.load_yaml_policy(path, str(path), out)
    assert out.problems == []
    assert layer  # it sets something
    policy = resolve(VLLM_FL_PLATFORM=path.stem)
    assert registry_problems(policy, builtin_plugins) == []
    # the same file used as a complete user config is valid too
    policy = resolve(VLLM_FL_CONFIG=str(path))
    assert registry_problems(policy, builtin_plugins) == []


def test_config_error_carries_the_valid_rest_of_the_policy(tmp_path):
    """``fl-dispatch check`` goes on from it to check names against the backends."""
    bad = write(tmp_path, "partial.yaml", """\
        strict: maybe
        prefer: vendor
        op_backends:
          rms_nrm: [reference]
    """)
    with pytest.raises(ConfigError) as info:
        resolve(VLLM_FL_CONFIG=str(bad))
    partial = info.value.policy
    assert isinstance(partial, Policy)
    assert partial.prefer.value == "vendor"
    assert partial.strict.value is False and partial.strict.source == "default"
    assert partial.op_backends.value == {"rms_nrm": ("reference",)}  # names checked later


def test_config_error_survives_pickling(tmp_path):
    """vLLM moves exceptions between its processes: the message must survive the trip."""
    import pickle

    with pytest.raises(ConfigError) as info:
        resolve(VLLM_FL_STRICT="maybe", VLLM_FL_PREFER="vendor")
    copy = pickle.loads(pickle.dumps(info.value))
    assert str(copy) == str(info.value)
    assert copy.problems == info.value.problems
    assert copy.policy == info.value.policy
