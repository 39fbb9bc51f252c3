"""Ops. An op *is* its reference function: the signature, the docstring contract and the body.

Built-in ops are defined in :mod:`fl_dispatch.core.ops` with :func:`define_op`::

    @define_op(mutates=("out",), layer="silu_and_mul")
    def silu_and_mul(x: Tensor, out: Tensor | None = None) -> Tensor:
        \"\"\"silu(x[..., :d]) * x[..., d:] ...\"\"\"
        ...

Everything else derives from that definition: the signature check of every impl (at
registration), the reference backend's impl, the torch custom-op schema and its fake kernel
(:mod:`.torch_ops`, through :meth:`OpSpec.torch_forms`), the names the OOT lists accept
(``layer``), the argument errors every impl raises alike (``check_args=``, exposed to backends
as :func:`fl_dispatch.check_args`), and, through the conformance kit, the op's input cases and
tolerances (``@op.cases``, ``tolerances=``). A plugin defines its own ops the same way and
returns them from ``fl_dispatch_define_ops``.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is only needed for the annotations
    import torch

    from fl_dispatch.testing.inputs import Case, Dims

VerifyCases = Callable[[str, str], "list[Case]"]
"""``(dtype, size) -> cases``: the conformance cases of an op (size: quick, small, full)."""
BenchCases = Callable[[int, "Dims", str], "list[Case]"]
"""``(tokens, dims, dtype) -> cases``: what ``fl-dispatch bench`` times at ``tokens``."""
Checker = Callable[[Callable[..., Any]], "list[str]"]
"""For ops that take no tensors: ``check(impl_fn) -> problems`` (empty when it conforms)."""


@dataclass(frozen=True)
class TorchForm:
    """One ``torch.ops.fl_dispatch.<name>`` custom op serving an op.

    ``fn(op, *args)`` computes the custom op with ``op`` (the dispatched entry when it runs,
    the reference on meta tensors for the fake kernel); its parameters after ``op`` give the
    schema (``torch.library.infer_schema``); ``mutates`` names the arguments it writes."""

    name: str
    fn: Callable[..., Any]
    mutates: tuple[str, ...] = ()

    def prototype(self) -> Callable[..., Any]:
        """A function whose signature is ``fn``'s without ``op`` (annotations resolved), as
        ``infer_schema`` reads it."""
        return _prototype(self.fn, drop_first=True)

    def schema(self) -> str:
        from torch.library import infer_schema

        return infer_schema(self.prototype(), op_name=self.name, mutates_args=self.mutates)


def _prototype(fn: Callable[..., Any], drop_first: bool) -> Callable[..., Any]:
    hints = typing.get_type_hints(fn)
    params = list(inspect.signature(fn).parameters.values())[1 if drop_first else 0:]
    params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in params]

    def prototype(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    ret = hints.get("return", inspect.signature(fn).return_annotation)
    prototype.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        params, return_annotation=None if ret is type(None) else ret)
    return prototype


class OpSpec:
    """An op: its name, its reference function ``fn`` and what derives from them.

    :param name: the op's name (``fl_dispatch.ops.<name>``).
    :param fn: the reference: its signature is the op's (every impl must match it exactly),
        its docstring the contract, its body the semantics (plain PyTorch). A plugin may give
        a stub that raises ``NotImplementedError`` (then the op has no reference to verify
        against).
    :param mutates: the arguments the op writes in place.
    :param traceable: ``fn`` is plain PyTorch that ``torch.compile`` may trace and fuse.
    :param layer: the vLLM layer (OOT-list name) this op serves, if any.
    :param tolerances: per-dtype ``(atol, rtol, reason)`` overriding the kit's table.
    :param checker: for ops without tensors: how the kit checks an impl.
    :param fake: the fake (meta) kernel of the op's own torch custom op, when running ``fn``
        on meta tensors does not work.
    :param check_args: the op's argument check: a function with the op's signature that
        raises ValueError (naming the argument, its bad value and what is valid) for arguments
        no impl accepts and returns None otherwise. The reference calls it; impls call it
        through :func:`fl_dispatch.check_args` and keep only their own, stricter checks (limits
        of a kernel) next to it. Checks only what needs no host synchronisation (shapes,
        dtypes, scalars), so that impls stay graph-safe.
    """

    def __init__(self, name: str, fn: Callable[..., Any], mutates: Sequence[str] = (), *,
                 traceable: bool = True, layer: str | None = None,
                 tolerances: Mapping[str, tuple[float, float, str]] | None = None,
                 checker: Checker | None = None,
                 fake: Callable[..., Any] | None = None,
                 check_args: Callable[..., None] | None = None) -> None:
        self.name = name
        self.fn = fn
        self.mutates = tuple(mutates)
        self.traceable = traceable
        self.layer = layer
        self.tolerances = dict(tolerances or {})
        self.checker = checker
        self.fake = fake
        self.check_args = check_args
        self.verify_cases: VerifyCases | None = None
        self.bench_cases: BenchCases | None = None
        self._forms: list[TorchForm] | None = None
        unknown = set(self.mutates) - set(self.signature.parameters)
        if unknown:
            raise ValueError(f"op {name!r}: mutates names {sorted(unknown)}, which are not "
                             f"parameters of {fn.__qualname__}{self.signature}")
        if check_args is not None:
            mismatch = self.signature_mismatch(check_args)
            if mismatch:
                raise ValueError(f"op {name!r}: check_args {check_args.__qualname__}: {mismatch}")

    def __repr__(self) -> str:
        return f"OpSpec({self.name!r}{self.signature})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the reference."""
        return self.fn(*args, **kwargs)

    @property
    def doc(self) -> str:
        """The contract (the reference's docstring)."""
        return inspect.getdoc(self.fn) or ""

    @property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.fn)

    @property
    def has_reference(self) -> bool:
        """Whether ``fn`` computes the op (a plugin's stub raises NotImplementedError)."""
        code = getattr(self.fn, "__code__", None)
        return code is None or "NotImplementedError" not in code.co_names

    def signature_mismatch(self, fn: Callable[..., object]) -> str | None:
        """Why ``fn``'s signature differs from this op's, or None when it matches."""
        try:
            got = inspect.signature(fn)
        except (TypeError, ValueError) as exc:
            return f"cannot read its signature ({exc})"
        want = [(p.name, p.kind, p.default) for p in self.signature.parameters.values()]
        have = [(p.name, p.kind, p.default) for p in got.parameters.values()]
        if want == have:
            return None
        return f"signature {got} does not match the op's {self.signature}"

    # ------------------------------------------------------------------ derived parts
    def cases(self, verify: VerifyCases) -> VerifyCases:
        """Decorator: the op's conformance cases, ``(dtype, size) -> [Case]``."""
        self.verify_cases = verify
        return verify

    def bench(self, bench: BenchCases) -> BenchCases:
        """Decorator: the op's benchmark cases, ``(tokens, dims, dtype) -> [Case]``."""
        self.bench_cases = bench
        return bench

    def torch_op(self, name: str | None = None, mutates: Sequence[str] = ()
                 ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: a custom op ``torch.ops.fl_dispatch.<name>`` serving this op, for
        signatures torch's schemas cannot express (an ``out=`` returned, a union return).
        Without any, the op itself becomes one custom op when its signature allows."""

        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            if self._forms is None:
                self._forms = []
            self._forms.append(TorchForm(name or fn.__name__, fn, tuple(mutates)))
            return fn

        return add

    def torch_forms(self) -> tuple[TorchForm, ...]:
        """The custom ops serving this op: the declared ones, else the op itself when its
        signature has a schema and takes a tensor (``()`` otherwise)."""
        if self._forms is not None:
            return tuple(self._forms)
        try:
            from torch.library import infer_schema

            proto = _prototype(self.fn, drop_first=False)
            infer_schema(proto, mutates_args=self.mutates)
        except Exception:  # not expressible as a schema: no custom op for this one
            return ()
        params = list(inspect.signature(proto).parameters.values())
        if not any("Tensor" in str(p.annotation) for p in params):
            return ()
        return (TorchForm(self.name, _form_of(proto), self.mutates),)


def _form_of(proto: Callable[..., Any]) -> Callable[..., Any]:
    """``form(op, *args) = op(*args)`` with ``proto``'s parameters after ``op``."""

    def form(op: Callable[..., Any], *args: Any) -> Any:
        return op(*args)

    sig = inspect.signature(proto)
    first = inspect.Parameter("op", inspect.Parameter.POSITIONAL_ONLY)
    form.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[first, *sig.parameters.values()])
    form.__annotations__ = {}
    return form


def define_op(*, mutates: Sequence[str] = (), traceable: bool = True, layer: str | None = None,
              tolerances: Mapping[str, tuple[float, float, str]] | None = None,
              checker: Checker | None = None,
              fake: Callable[..., Any] | None = None,
              check_args: Callable[..., None] | None = None
              ) -> Callable[[Callable[..., Any]], OpSpec]:
    """Decorator: the function is the op's reference; returns the :class:`OpSpec` (the
    keywords are :class:`OpSpec`'s)."""

    def define(fn: Callable[..., Any]) -> OpSpec:
        return OpSpec(fn.__name__, fn, mutates, traceable=traceable, layer=layer,
                      tolerances=tolerances, checker=checker, fake=fake,
                      check_args=check_args)

    return define


# --------------------------------------------------------------------------- contract helpers
GELU_APPROXIMATIONS = ("none", "tanh")
"""Valid values of gelu_and_mul's ``approximate``."""


def bad_approximate(value: object) -> ValueError:
    """The error every gelu_and_mul impl raises for an ``approximate`` it does not know."""
    return ValueError(f"gelu_and_mul: approximate must be 'none' or 'tanh', got {value!r}")


def write_out(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The ``out`` contract of the activation ops: without ``out`` return ``result``; with it,
    copy ``result`` into ``out`` (which may be a strided view) and return ``out``."""
    if out is None:
        return result
    out.copy_(result)
    return out


def weight_or_ones(weight: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``weight``, or ones of ``like``'s last dimension and dtype for a kernel that needs a
    weight when the op says ``weight=None`` (no multiply)."""
    if weight is not None:
        return weight
    import torch

    return torch.ones(like.shape[-1], dtype=like.dtype, device=like.device)


def write_contiguous(kernel: Callable[..., None], *outs: torch.Tensor) -> None:
    """``kernel(*targets)`` for a kernel that writes contiguous outputs: each of ``outs``
    itself when contiguous, else a contiguous stand-in whose values are copied into it
    afterwards (the outputs of an in-place op may be strided views)."""
    import torch

    targets = [t if t.is_contiguous() else torch.empty(t.shape, dtype=t.dtype, device=t.device)
               for t in outs]
    kernel(*targets)
    for t, target in zip(outs, targets):
        if target is not t:
            t.copy_(target)


def copy_back(target: torch.Tensor, computed: torch.Tensor) -> None:
    """Write ``computed`` into the caller's ``target`` unless it already is that memory
    (a kernel that needed a contiguous copy of a strided in-place argument)."""
    if computed.data_ptr() != target.data_ptr() or computed.stride() != target.stride():
        target.copy_(computed)
