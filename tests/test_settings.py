"""The settings table is the one place a setting is named: the policy, its defaults, the YAML
keys, the policy/process split and the README's variable table follow it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from fl_dispatch.core import config, settings
from fl_dispatch.core.settings import OrderToken

README = Path(__file__).resolve().parents[1] / "README.md"


def test_policy_fields_are_the_settings() -> None:
    fields = [f.name for f in dataclasses.fields(config.Policy) if f.name != "warnings"]
    assert sorted(fields) == sorted(s.name for s in settings.SETTINGS)


def test_resolved_defaults_are_the_tables() -> None:
    policy = config.resolve_policy(env={}, detect=lambda: None)
    for s in settings.SETTINGS:
        if s.name == "platform":
            assert policy.platform.source == "detected"
            continue
        assert getattr(policy, s.name).value == s.default, s.name
        assert getattr(policy, s.name).source == "default", s.name


def test_every_variable_is_in_the_readme_table_and_back() -> None:
    text = README.read_text(encoding="utf-8")
    table = set(re.findall(r"^\| `([A-Z_]+)`(?: / `([A-Z_]+)`)? \|", text, re.M))
    in_readme = {v for pair in table for v in pair if v}
    assert in_readme == set(settings.ENV_VARS)


def test_yaml_keys_are_exactly_the_policy_settings() -> None:
    assert set(config.YAML_KEYS) == {s.name for s in settings.SETTINGS if s.yaml is not None}
    assert set(config.POLICY_ENV.values()) <= set(config.YAML_KEYS)
    assert "VLLM_FL_CONFIG" in config.PROCESS_ENV


@pytest.mark.parametrize("text,kind,name", [
    ("flagos", "flagos", None), ("reference", "reference", None), ("vendor", "vendor", None),
    ("vendor:cuda", "vendor", "cuda"), (" impl:default.flagos ", "impl", "default.flagos")])
def test_order_tokens_are_parsed_once_into_typed_values(text, kind, name) -> None:
    token = OrderToken(text)
    assert (token.kind, token.name) == (kind, name) and token == text.strip()


def test_a_bad_token_names_the_forms() -> None:
    with pytest.raises(ValueError, match=r"did you mean 'flagos'.*impl:<impl_id>"):
        OrderToken("flagoss")
