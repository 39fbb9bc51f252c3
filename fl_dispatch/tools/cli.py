"""The ``fl-dispatch`` command line: plugins, explain, check (and the tools built on them)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from fl_dispatch.core.config import Policy
from fl_dispatch.core.discovery import PluginSet, load_plugins
from fl_dispatch.core.errors import ConfigError, Problem

from .common import ToolError, fail, load


def _registry_problems(policy: Policy, plugins: PluginSet,
                       with_plugin_errors: bool = True) -> list[Problem]:
    """Names in the policy that the loaded backends do not define (and plugin load errors)."""
    problems = plugins.registry.policy_problems(policy)
    for record in plugins.errors if with_plugin_errors else ():
        problems.append(Problem(record.source, f"plugin {record.name!r} failed to load: "
                                               f"{record.error}"))
    return problems


# --------------------------------------------------------------------------- plugins
def cmd_plugins(args: argparse.Namespace) -> int:
    plugins = load().plugins
    rows = []
    for r in plugins.records:
        reason = r.unavailable_reason()
        rows.append({
            "name": r.name,
            "source": r.source,
            "description": r.info.description if r.info else "",
            "loaded": r.loaded,
            "available": reason is None,
            "reason": reason,
            "impls": r.impl_ids,
            "ops_defined": r.op_names,
            "gaps": dict(r.info.gaps) if r.info else {},
            "error": r.error,
            "traceback": r.traceback,
        })
    if args.json:
        print(json.dumps({"plugins": rows}, indent=2))
        return 0
    for row in rows:
        state = "available" if row["available"] else f"unavailable: {row['reason']}"
        if not row["loaded"]:
            state = f"LOAD ERROR: {row['error']}"
        print(f"{row['name']:<12} {state}")
        print(f"{'':<12} source: {row['source']}")
        if row["description"]:
            print(f"{'':<12} {row['description']}")
        if row["impls"]:
            print(f"{'':<12} impls: {', '.join(row['impls'])}")
        for op, gap in row["gaps"].items():
            print(f"{'':<12} does not cover, {op}: {gap}")
    return 0


# --------------------------------------------------------------------------- explain
def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def explain_data(policy: Policy, plugins: PluginSet, op: str | None = None) -> dict[str, Any]:
    """The ``explain --json`` object."""
    from fl_dispatch.core.selection import select_op

    config = {k: {"value": _jsonable(s.value), "source": s.source}
              for k, s in policy.settings().items() if k != "platform"}
    reg = plugins.registry
    names = [op] if op else list(reg.ops)
    checked: dict[tuple[str, str], str | None] = {}
    ops = {n: select_op(n, policy, reg, checked=checked).as_dict() for n in names}
    for name, sel in ops.items():  # what each backend says it does not cover of this op
        sel["gaps"] = {r.name: r.info.gaps[name] for r in plugins.records
                       if r.loaded and r.info is not None and name in r.info.gaps}
    return {
        "platform": {"value": policy.platform.value, "source": policy.platform.source},
        "config": config,
        "warnings": list(policy.warnings),
        "plugin_errors": [{"name": r.name, "source": r.source, "error": r.error}
                          for r in plugins.errors],
        "ops": ops,
    }


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        loaded = load([args.op] if args.op else None)
    except ToolError as exc:
        return fail("explain", str(exc))
    policy, plugins = loaded.policy, loaded.plugins
    problems = _registry_problems(policy, plugins, with_plugin_errors=False)
    data = explain_data(policy, plugins, args.op)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _print_explain(data)
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    return 2 if problems else 0


def _print_explain(data: dict[str, Any]) -> None:
    plat = data["platform"]
    print(f"platform: {plat['value'] or 'none (CPU only)'}   [{plat['source']}]")
    print("config:")
    for key, s in data["config"].items():
        print(f"  {key:<22} {json.dumps(s['value']):<40} [{s['source']}]")
    for w in data["warnings"]:
        print(f"warning: {w}")
    for e in data["plugin_errors"]:
        print(f"plugin error: {e['name']} ({e['source']}): {e['error']}")
    for op, sel in data["ops"].items():
        print(f"\nop {op}: selected {sel['selected'] or 'NOTHING'}   "
              f"(order: {sel['order_source']})")
        for c in sel["candidates"]:
            mark = "->" if c["impl_id"] == sel["selected"] else "  "
            vendor = f"vendor={c['vendor']}" if c["vendor"] else ""
            print(f"  {mark} {c['impl_id']:<22} {c['kind']:<9} {vendor:<14} "
                  f"prio={c['priority']:<4} {c['reason'] or 'chosen'}")
        for plugin, gap in sel.get("gaps", {}).items():
            print(f"     gap ({plugin}): {gap}")


# --------------------------------------------------------------------------- check
def cmd_check(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    what = "effective configuration"
    if args.file:
        env["VLLM_FL_CONFIG"] = args.file
        what = args.file
    try:
        loaded = load(env=env)
        policy, plugins = loaded.policy, loaded.plugins
    except ConfigError as exc:
        problems = list(exc.problems)
        if exc.policy is not None:  # the valid rest: check its names against the backends
            partial: Policy = exc.policy
            problems += _registry_problems(partial,
                                           load_plugins(partial.plugin_modules.value))
    else:
        problems = _registry_problems(policy, plugins)
    if problems:
        print(f"{what}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        return 2
    print(f"{what}: valid")
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-dispatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list backend plugins, availability and load errors")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("explain", help="effective policy with sources, and every candidate")
    p.add_argument("--json", action="store_true")
    p.add_argument("--op", help="only this op")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("check", help="validate a YAML config (or the effective configuration)")
    p.add_argument("file", nargs="?", help="YAML policy file (default: the environment's)")
    p.set_defaults(func=cmd_check)
    from . import benchmark, demo, verify  # each imports torch/vllm lazily

    verify.register(sub)
    benchmark.register(sub)
    demo.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"fl-dispatch: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
