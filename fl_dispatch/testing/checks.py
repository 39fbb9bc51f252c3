"""The conformance checks: one impl's call against the reference's, every contract of the op.

Each case (:mod:`fl_dispatch.testing.inputs`) is built once; the reference and every impl under
test run on their own copy (views stay views). After the call, every argument, every buffer
behind a view argument (so writes outside a view are caught) and the return value are compared
with the reference's within the op's tolerance (:mod:`fl_dispatch.testing.tolerances`), and the
return contract is checked: ``out`` returned, the caller's ``(x, residual)`` returned, a new
tensor aliasing no input, or None. ``fl-dispatch verify``, the pytest helper
(:func:`fl_dispatch.testing.backend_conformance`) and the project's own tests all run these.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .tolerances import tolerance

if TYPE_CHECKING:
    import torch

    from fl_dispatch.core.impl import Impl
    from fl_dispatch.core.opspec import OpSpec
    from fl_dispatch.core.registry import Registry

    from .inputs import Case

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
    if case.returns == "new" and isinstance(ref_result, tuple):  # several new tensors
        if not isinstance(result, (tuple, list)) or len(result) != len(ref_result):
            return math.inf, [f"returned {type(result).__name__}, expected a tuple of "
                              f"{len(ref_result)} new tensors"]
        max_err, problems = 0.0, []
        owners = _storages(args)
        for i, (got, want) in enumerate(zip(result, ref_result)):
            if isinstance(got, torch.Tensor) and \
                    got.untyped_storage().data_ptr() in owners:
                problems.append(f"result {i} aliases argument "
                                f"{owners[got.untyped_storage().data_ptr()]!r}")
            err, problem = _compare(f"result {i}", got, want, atol, rtol)
            max_err = max(max_err, err)
            if problem:
                problems.append(problem)
        return max_err, problems
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

    from .inputs import buffers

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
def reference_impl(impls: Sequence[Impl]) -> Impl | None:
    """The impl to compare against: ``reference.torch``, else any reference-kind impl."""
    refs = [i for i in impls if i.kind == "reference"]
    return next((i for i in refs if i.impl_id == "reference.torch"), refs[0] if refs else None)


def comparison_reference(registry: Registry, op: str) -> Any:
    """What ``op``'s impls are compared with: the available reference impl's function, else
    the op's own definition when it computes (a plugin's stub does not); None when neither."""
    ref_impl = reference_impl(registry.impls[op])
    if ref_impl is not None and ref_impl.unavailable_reason() is None:
        return ref_impl.fn
    spec = registry.ops[op]
    return spec.fn if spec.has_reference else None


def _describe(exc: BaseException) -> str:
    return f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def verify_case(case: Case, spec: OpSpec | None, ref: Any, impls: Sequence[Impl],
                device: torch.device) -> list[Row]:
    """Run ``ref`` (a function) and each impl on fresh copies of ``case``'s inputs; one Row
    per impl."""
    from .inputs import replicate

    tol = tolerance(spec, case.dtype)
    atol, rtol = tol.atol, tol.rtol

    def row(impl: Impl, status: str, err: float | None = None, note: str = "") -> Row:
        return Row(case.op, impl.impl_id, case.name, case.dtype, status, err, atol, rtol, note)

    try:
        pristine = case.build(device)
    except Exception as exc:  # not verified is not passed
        return [row(i, FAIL, note=f"building inputs {_describe(exc)}") for i in impls]
    ref_args = replicate(pristine)
    try:
        ref_result = ref(**ref_args)
    except Exception as exc:
        note = f"reference {_describe(exc)}"
        return [row(i, FAIL if getattr(i, "fn", None) is ref else SKIP, note=note)
                for i in impls]
    if case.canonical is not None:
        case.canonical(ref_args)
    rows = []
    for impl in impls:
        args = replicate(pristine)
        try:
            result = impl.fn(**args)
            if case.canonical is not None:
                case.canonical(args)
        except Exception as exc:
            rows.append(row(impl, FAIL, note=_describe(exc)))
            continue
        err, problems = check_call(case, ref_args, ref_result, args, result, atol, rtol)
        rows.append(row(impl, FAIL if problems else PASS, err, "; ".join(problems[:3])))
    return rows


def check_choice(spec: OpSpec, impl: Impl) -> list[Row]:
    """An op without tensors (``spec.checker``): run its check on ``impl``."""
    assert spec.checker is not None
    try:
        problems = spec.checker(impl.fn)
    except Exception as exc:
        return [Row(spec.name, impl.impl_id, "checker", "-", FAIL, note=_describe(exc))]
    return [Row(spec.name, impl.impl_id, "checker", "-", FAIL if problems else PASS,
                note="; ".join(problems))]


def verify_work(registry: Registry, dtypes: Sequence[str], ops: Iterable[str] | None = None,
                impl_id: str | None = None, size: str = "small"
                ) -> tuple[list[Row], list[tuple[Case, OpSpec, Any, list[Impl]]]]:
    """What :func:`verify` will run: rows decided without running anything (unavailable,
    no input cases, no reference, checkers), and the ``(case, spec, reference, impls)`` to run."""
    rows: list[Row] = []
    work: list[tuple[Case, OpSpec, Any, list[Impl]]] = []
    for op in (list(ops) if ops is not None else list(registry.ops)):
        spec = registry.ops[op]
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
        if spec.checker is not None:
            for impl in usable:
                rows += check_choice(spec, impl)
            continue
        if spec.verify_cases is None:
            rows += [Row(op, i.impl_id, "-", "-", NO_GEN, note="the op declares no input cases "
                         "(@op.cases next to its definition)") for i in usable]
            continue
        ref = comparison_reference(registry, op)
        if ref is None:
            rows += [Row(op, i.impl_id, "-", "-", SKIP, note="no available reference impl")
                     for i in usable]
            continue
        if not usable:
            continue
        for dtype in dtypes:
            work += [(case, spec, ref, usable) for case in spec.verify_cases(dtype, size)]
    return rows, work


def verify(registry: Registry, device: torch.device, dtypes: Sequence[str],
           ops: Iterable[str] | None = None, impl_id: str | None = None,
           size: str = "small", progress: bool = False) -> list[Row]:
    """Verify every available impl (or only ``impl_id``) of ``ops`` (default: all) on
    ``device`` in each of ``dtypes``; one :class:`Row` per impl, case and dtype."""
    rows, work = verify_work(registry, dtypes, ops, impl_id, size)
    for case, spec, ref, usable in _progress(work, progress):
        rows += verify_case(case, spec, ref, usable, device)
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
    import sys

    return tqdm(items, desc="verify", unit="case", file=sys.stderr, disable=None)
