"""``fl-dispatch verify``: every available impl of every tensor op against the reference impl.

Each case (:mod:`fl_dispatch.opinputs`) is built once per dtype; the reference and every impl
under test run on their own copy (views stay views). After the call, every argument, every
buffer behind a view argument (so writes outside a view are caught) and the return value are
compared with the reference's, and the return contract is checked: ``out`` returned, the
caller's ``(x, residual)`` returned, a new tensor aliasing no input, or None.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported when the command runs, never at CLI start-up
    import torch

    from .impl import Impl
    from .opinputs import Case
    from .registry import Registry

TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (1e-4, 1e-4),
    "fp16": (1e-2, 1e-2),
    "bf16": (2e-2, 2e-2),
}
"""``(atol, rtol)`` per dtype; an element passes when
``|impl - reference| <= atol + rtol * |reference|`` (``torch.isclose``). Looser than
``torch.testing``'s defaults on purpose: fused kernels round once where PyTorch rounds after
each step, and reduce in another order; one or two units in the last place must pass."""

PASS, FAIL, SKIP, NO_GEN = "PASS", "FAIL", "SKIP", "NO-GEN"


@dataclass
class Row:
    """One line of the report: one impl on one case in one dtype (or why it was not run)."""

    op: str
    impl: str
    case: str
    dtype: str
    status: str
    max_err: float | None = None
    atol: float | None = None
    rtol: float | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.max_err is not None and not math.isfinite(self.max_err):
            data["max_err"] = str(self.max_err)  # NaN/inf are not JSON
        return data


# --------------------------------------------------------------------------- comparison
def _same_view(a: Any, b: torch.Tensor) -> bool:
    import torch

    return (isinstance(a, torch.Tensor) and a.device == b.device
            and a.data_ptr() == b.data_ptr() and a.shape == b.shape
            and a.stride() == b.stride() and a.dtype == b.dtype)


def _compare(name: str, got: Any, want: torch.Tensor, atol: float,
             rtol: float) -> tuple[float, str | None]:
    """Max abs error of ``got`` against ``want`` and, when they differ, what is wrong."""
    import torch

    if not isinstance(got, torch.Tensor):
        return math.inf, f"{name}: got {type(got).__name__}, expected a tensor"
    if got.shape != want.shape:
        return math.inf, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if got.dtype != want.dtype:
        return math.inf, f"{name}: dtype {got.dtype}, expected {want.dtype}"
    if got.numel() == 0 or torch.equal(got, want):  # the common case, and cheap
        return 0.0, None
    if not want.is_floating_point():
        return math.inf, f"{name}: changed (an input the op must not modify)"
    g, w = got.detach().float(), want.detach().float()
    close = torch.isclose(g, w, rtol=rtol, atol=atol, equal_nan=True)
    err = (g - w).abs()
    err = torch.where(close & err.isnan(), torch.zeros_like(err), err)
    max_err = float(err.max())
    bad = int((~close).sum())
    if bad == 0:
        return max_err, None
    return max_err, (f"{name}: {bad} of {got.numel()} elements off "
                     f"(max abs err {max_err:.3g})")


def _storages(kwargs: dict[str, Any]) -> dict[int, str]:
    import torch

    return {v.untyped_storage().data_ptr(): k for k, v in kwargs.items()
            if isinstance(v, torch.Tensor)}


def _check_return(case: Case, result: Any, ref_result: Any, args: dict[str, Any],
                  atol: float, rtol: float) -> tuple[float, list[str]]:
    """The return contract of ``case`` and, for a new tensor, its values."""
    import torch

    if case.returns == "none":
        return 0.0, ([] if result is None else [f"returned {type(result).__name__}, "
                                                f"expected None"])
    if case.returns == "new":
        if not isinstance(result, torch.Tensor):
            return math.inf, [f"returned {type(result).__name__}, expected a new tensor"]
        owner = _storages(args).get(result.untyped_storage().data_ptr())
        problems = [] if owner is None else [f"result aliases argument {owner!r}; "
                                             f"expected a new tensor"]
        err, problem = _compare("result", result, ref_result, atol, rtol)
        return err, problems + ([problem] if problem else [])
    names = case.returns
    if len(names) == 1:
        if _same_view(result, args[names[0]]):
            return 0.0, []
        what = "a new tensor" if isinstance(result, torch.Tensor) else type(result).__name__
        return 0.0, [f"returned {what}, expected the caller's {names[0]!r} tensor"]
    if not isinstance(result, (tuple, list)) or len(result) != len(names):
        return 0.0, [f"returned {type(result).__name__}, expected the caller's "
                     f"({', '.join(names)})"]
    return 0.0, [f"returned item {i} is not the caller's {n!r} tensor"
                 for i, (r, n) in enumerate(zip(result, names)) if not _same_view(r, args[n])]


def check_call(case: Case, ref_args: dict[str, Any], ref_result: Any, args: dict[str, Any],
               result: Any, atol: float, rtol: float) -> tuple[float, list[str]]:
    """Compare one impl's call with the reference's: return contract, every argument, every
    buffer behind a view. Returns the max abs error and the problems found."""
    import torch

    from .opinputs import buffers

    max_err, problems = _check_return(case, result, ref_result, args, atol, rtol)
    pairs = [(n, v, ref_args[n]) for n, v in args.items() if isinstance(v, torch.Tensor)]
    ref_buffers = buffers(ref_args)
    pairs += [(n, v, ref_buffers[n]) for n, v in buffers(args).items() if n in ref_buffers]
    for name, got, want in pairs:
        err, problem = _compare(name, got, want, atol, rtol)
        max_err = math.nan if math.isnan(err) or math.isnan(max_err) else max(max_err, err)
        if problem:
            problems.append(problem)
    for name, value in ref_args.items():  # a None argument must stay None (key=None)
        if value is None and args.get(name) is not None:
            problems.append(f"argument {name!r} was None and is now set")
    return max_err, problems


# --------------------------------------------------------------------------- running
def _reference(impls: Sequence[Impl]) -> Impl | None:
    refs = [i for i in impls if i.kind == "reference"]
    return next((i for i in refs if i.impl_id == "reference.torch"), refs[0] if refs else None)


def _describe(exc: BaseException) -> str:
    return f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _verify_case(case: Case, ref: Impl, impls: Sequence[Impl],
                 device: torch.device) -> list[Row]:
    from .opinputs import replicate

    atol, rtol = TOLERANCES[case.dtype]

    def row(impl: Impl, status: str, err: float | None = None, note: str = "") -> Row:
        return Row(case.op, impl.impl_id, case.name, case.dtype, status, err, atol, rtol, note)

    try:
        pristine = case.build(device)
    except Exception as exc:  # not verified is not passed
        return [row(i, FAIL, note=f"building inputs {_describe(exc)}") for i in impls]
    ref_args = replicate(pristine)
    try:
        ref_result = ref.fn(**ref_args)
    except Exception as exc:
        note = f"reference {_describe(exc)}"
        return [row(i, FAIL if i is ref else SKIP, note=note) for i in impls]
    rows = []
    for impl in impls:
        args = replicate(pristine)
        try:
            result = impl.fn(**args)
        except Exception as exc:
            rows.append(row(impl, FAIL, note=_describe(exc)))
            continue
        err, problems = check_call(case, ref_args, ref_result, args, result, atol, rtol)
        rows.append(row(impl, FAIL if problems else PASS, err, "; ".join(problems[:3])))
    return rows


def _check_attention_backend(impl: Impl) -> list[Row]:
    """attention_backend is not a tensor op: it must return None or a backend name."""
    rows = []
    for use_mla in (False, True):
        case = f"use_mla={use_mla}"
        try:
            result = impl.fn(use_mla=use_mla)
        except Exception as exc:
            rows.append(Row(impl.op, impl.impl_id, case, "-", FAIL, note=_describe(exc)))
            continue
        ok = result is None or isinstance(result, str)
        note = f"returned {result!r}" if ok else f"returned {result!r}; expected None or a str"
        rows.append(Row(impl.op, impl.impl_id, case, "-", PASS if ok else FAIL, note=note))
    return rows


NON_TENSOR_CHECKS: dict[str, Callable[[Impl], list[Row]]] = {
    "attention_backend": _check_attention_backend,
}
"""Ops that take no tensors (``opinputs.NON_TENSOR_OPS``), checked by a function instead of
against the reference."""


def verify(registry: Registry, device: torch.device, dtypes: Sequence[str],
           ops: Iterable[str] | None = None, impl_id: str | None = None,
           size: str = "small", progress: bool = False) -> list[Row]:
    """Verify every available impl (or only ``impl_id``) of ``ops`` (default: all) on
    ``device`` in each of ``dtypes``; one :class:`Row` per impl, case and dtype."""
    from .opinputs import GENERATORS, verify_cases

    rows: list[Row] = []
    work: list[tuple[Case, Impl, list[Impl]]] = []
    for op in (list(ops) if ops is not None else list(registry.ops)):
        impls = [i for i in registry.impls.get(op, []) if impl_id in (None, i.impl_id)]
        if not impls:
            continue
        usable = []
        for impl in impls:
            reason = impl.unavailable_reason()
            if reason is None:
                usable.append(impl)
            else:
                rows.append(Row(op, impl.impl_id, "-", "-", SKIP, note=f"unavailable: {reason}"))
        if op in NON_TENSOR_CHECKS:
            for impl in usable:
                rows += NON_TENSOR_CHECKS[op](impl)
            continue
        if op not in GENERATORS:
            rows += [Row(op, i.impl_id, "-", "-", NO_GEN, note="no input generator for this "
                         "op (defined outside fl-dispatch's built-in ops)") for i in usable]
            continue
        ref = _reference(registry.impls[op])
        if ref is None or ref.unavailable_reason() is not None:
            rows += [Row(op, i.impl_id, "-", "-", SKIP, note="no available reference impl")
                     for i in usable]
            continue
        if not usable:
            continue
        for dtype in dtypes:
            work += [(case, ref, usable) for case in verify_cases(op, dtype, size)]
    for case, ref, usable in _progress(work, progress):
        rows += _verify_case(case, ref, usable, device)
    order = {op: i for i, op in enumerate(registry.ops)}
    rows.sort(key=lambda r: (order.get(r.op, len(order)), r.impl))  # stable: cases in order
    return rows


def _progress(items: list[Any], enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="verify", unit="case", file=sys.stderr, disable=None)


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
    lines = ["tolerances (elementwise: |impl - reference| <= atol + rtol * |reference|):"]
    lines += [f"  {dt:<5} atol={a:g}  rtol={r:g}" for dt, (a, r) in TOLERANCES.items()]
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
def _split(values: Sequence[str] | None) -> list[str]:
    return [v.strip() for item in values or () for v in item.split(",") if v.strip()]


def _fail(message: str) -> int:
    print(f"fl-dispatch verify: {message}", file=sys.stderr)
    return 2


def cmd_verify(args: argparse.Namespace) -> int:
    """Run the verification; exit 0 when nothing failed, 1 when something did, 2 on misuse."""
    from .config import resolve_policy
    from .discovery import load_plugins
    from .errors import suggestion
    from .opinputs import parse_dtype, resolve_device

    try:
        dtypes = [parse_dtype(d) for d in _split(args.dtype)] or list(TOLERANCES)
        device = resolve_device(args.device)
    except ValueError as exc:
        return _fail(str(exc))
    policy = resolve_policy()
    plugins = load_plugins(policy.plugin_modules.value)
    registry = plugins.registry
    ops = _split(args.op) or None
    for op in ops or ():
        if op not in registry.ops:
            return _fail(f"unknown op {op!r}; {suggestion(op, registry.ops)}")
    if args.impl:
        ids = {i.impl_id for o in (ops or registry.ops) for i in registry.impls[o]}
        if args.impl not in ids:
            return _fail(f"no impl {args.impl!r}"
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
            "tolerances": {d: {"atol": a, "rtol": r} for d, (a, r) in TOLERANCES.items()},
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
          f"{summary['skipped']} skipped, {summary['no_input_generator']} without an input "
          f"generator -> {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def register(subparsers: Any) -> None:
    """Add the ``verify`` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser(
        "verify", help="check every available impl against the reference impl",
        description="Run every available impl of every tensor op on fresh random inputs "
                    "(several shapes, strided views, in-place and out= contracts) and compare "
                    "it with the reference impl. Exit 1 if anything fails.")
    p.add_argument("--op", action="append", metavar="OP",
                   help="only this op (repeat or comma-separate for several)")
    p.add_argument("--impl", metavar="IMPL_ID", help="only this impl (e.g. vendor.cuda)")
    p.add_argument("--device", help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--dtype", action="append", metavar="DTYPE",
                   help="fp32, fp16, bf16 (repeat or comma-separate; default: all three)")
    p.add_argument("--quick", action="store_true",
                   help="one small shape per op (for the Triton interpreter)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_verify)
