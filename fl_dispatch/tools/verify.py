"""``fl-dispatch verify``: every available impl of every op against the reference impl.

The checks are the conformance kit's (:mod:`fl_dispatch.testing.checks`); this module is the
command: its options, the table and the exit status.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from fl_dispatch.testing.checks import FAIL, NO_GEN, PASS, SKIP, Row, verify
from fl_dispatch.testing.tolerances import DEFAULT_TOLERANCES

from .common import ToolError, add_op_and_device, fail, load, split


# --------------------------------------------------------------------------- output
def _fmt_err(err: float | None) -> str:
    return "-" if err is None else f"{err:.3g}"


def _fmt_tol(row: Row) -> str:
    return "-" if row.atol is None else f"{row.atol:g}+{row.rtol:g}*|ref|"


def format_table(rows: Sequence[Row]) -> str:
    """The pass/fail table, one line per row."""
    header = ("op", "impl", "case", "dtype", "max abs err", "tolerance", "status", "note")
    lines = [(r.op, r.impl, r.case, r.dtype, _fmt_err(r.max_err), _fmt_tol(r), r.status,
              r.note) for r in rows]
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) if lines
              else len(header[i]) for i in range(len(header) - 1)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1]

    return "\n".join([fmt(header)] + [fmt(line).rstrip() for line in lines])


def tolerance_lines() -> list[str]:
    lines = ["tolerances (elementwise: |impl - reference| <= atol + rtol * |reference|; "
             "an op may override its row):"]
    lines += [f"  {dt:<5} atol={t.atol:g}  rtol={t.rtol:g}  ({t.reason})"
              for dt, t in DEFAULT_TOLERANCES.items()]
    return lines


def summarize(rows: Sequence[Row]) -> dict[str, int]:
    counts = {s: 0 for s in (PASS, FAIL, SKIP, NO_GEN)}
    for r in rows:
        counts[r.status] += 1
    return {"passed": counts[PASS], "failed": counts[FAIL], "skipped": counts[SKIP],
            "no_input_generator": counts[NO_GEN]}


def failure_lines(rows: Sequence[Row]) -> list[str]:
    """One line per impl that failed: how many rows, which ops."""
    failed: dict[str, dict[str, int]] = {}
    for r in rows:
        if r.status == FAIL:
            per_op = failed.setdefault(r.impl, {})
            per_op[r.op] = per_op.get(r.op, 0) + 1
    lines = ["failures by impl:"] if failed else []
    for impl, per_op in failed.items():
        ops = ", ".join(f"{op} ({n})" for op, n in per_op.items())
        lines.append(f"  {impl}: {sum(per_op.values())} failed: {ops}")
    return lines


# --------------------------------------------------------------------------- command
def cmd_verify(args: argparse.Namespace) -> int:
    """Run the verification; exit 0 when nothing failed, 1 when something did, 2 on misuse."""
    from fl_dispatch.core.errors import suggestion
    from fl_dispatch.testing.inputs import parse_dtype, resolve_device

    try:
        dtypes = [parse_dtype(d) for d in split(args.dtype)] or list(DEFAULT_TOLERANCES)
        device = resolve_device(args.device)
        loaded = load(split(args.op))
    except (ValueError, ToolError) as exc:
        return fail("verify", str(exc))
    registry, ops, plugins = loaded.registry, loaded.ops, loaded.plugins
    if args.impl:
        ids = {i.impl_id for o in (ops or registry.ops) for i in registry.impls[o]}
        if args.impl not in ids:
            return fail("verify", f"no impl {args.impl!r}"
                        + (f" of op(s) {', '.join(ops)}" if ops else "")
                        + f"; {suggestion(args.impl, ids)}")
    size = "quick" if args.quick else ("small" if device.type == "cpu" else "full")
    rows = [Row("-", r.name, "load plugin", "-", FAIL, note=f"{r.source}: {r.error}")
            for r in plugins.errors]
    rows += verify(registry, device, dtypes, ops, args.impl, size,
                   progress=not args.json)
    summary = summarize(rows)
    ok = summary["failed"] == 0
    if args.json:
        print(json.dumps({
            "device": str(device), "size": size, "dtypes": dtypes,
            "tolerances": {d: {"atol": t.atol, "rtol": t.rtol, "reason": t.reason}
                           for d, t in DEFAULT_TOLERANCES.items()},
            "results": [r.as_dict() for r in rows], "summary": summary, "ok": ok,
        }, indent=2))
        return 0 if ok else 1
    print(f"fl-dispatch verify: device {device}, dtypes {' '.join(dtypes)}, sizes {size}")
    print("\n".join(tolerance_lines()))
    print()
    print(format_table(rows))
    print()
    for line in failure_lines(rows):
        print(line)
    print(f"summary: {summary['passed']} passed, {summary['failed']} failed, "
          f"{summary['skipped']} skipped, {summary['no_input_generator']} without input "
          f"cases -> {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def register(subparsers: Any) -> None:
    """Add the ``verify`` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser(
        "verify", help="check every available impl against the reference impl",
        description="Run every available impl of every tensor op on fresh random inputs "
                    "(several shapes, strided views, in-place and out= contracts) and compare "
                    "it with the reference impl. Exit 1 if anything fails.")
    add_op_and_device(p)
    p.add_argument("--impl", metavar="IMPL_ID", help="only this impl (e.g. vendor.cuda)")
    p.add_argument("--dtype", action="append", metavar="DTYPE",
                   help="fp32, fp16, bf16 (repeat or comma-separate; default: all three)")
    p.add_argument("--quick", action="store_true",
                   help="one small shape per op (for the Triton interpreter)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_verify)
