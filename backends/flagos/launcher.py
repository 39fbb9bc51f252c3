"""A cached Triton launcher: the compiled kernel's launcher is called directly once known.

``JITFunction.run`` binds the arguments, specializes every one of them and hashes the result
on every call (about 11 µs of host time on an H100 host). Our op adapters know exactly what a
kernel specializes on, so they hand in a ``key`` that determines it; after the first launch
with a key (the slow path, through Triton's own ``run``, which compiles when needed), later
launches with that key call ``CompiledKernel.run`` straight away.

The key must be at least as fine as Triton's specialization: for every tensor argument its
dtype and whether its address is 16-byte aligned; for every specialized integer its value
(or at least: == 1, divisible by 16, fits in int32); every constexpr; ``num_warps``.

The kernels are plain Python functions decorated here, on first use, so that the choice
between the compiler and the CPU interpreter (``TRITON_INTERPRET``) is made when a kernel first
runs, not when a module is imported. The device functions a kernel calls are plain functions
too, listed in their module's ``JIT_HELPERS`` and decorated with the kernel, for the same mode
(:func:`bind_helpers`). The interpreter always takes the slow path.

Programmatic dependent launch (``launch_pdl=True``, sm_90+): Triton's launch option of that
name, a ``CUDAOptions`` field, so part of Triton's own compile/cache key; the compiled
launcher carries it (``CudaLauncher.launch_pdl``) and the fast path passes it on. Our ``key``
must distinguish it too (the caller puts it, or a constexpr that implies it, in the key). The
interpreter has no launch attributes: there the option is dropped.
"""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Callable, Sequence
from typing import Any

from .capability import interpreter_enabled
from .interpreter_rounding import interpreter_rounds_to_nearest

_LAUNCHER_PARAMS = 9
"""Leading arguments of ``CompiledKernel.run`` before the kernel's own arguments: gridX,
gridY, gridZ, stream, function, packed metadata, launch metadata, enter hook, exit hook
(Triton 3.x; some versions name the first five and take the rest through ``*args``)."""


def _hooks_active() -> bool:
    """Whether a Triton launch hook (a profiler, say) is installed: then never bypass run."""
    try:
        from triton import knobs

        hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    except (ImportError, AttributeError):
        from triton.compiler import CompiledKernel

        hooks = (getattr(CompiledKernel, "launch_enter_hook", None),
                 getattr(CompiledKernel, "launch_exit_hook", None))
    for hook in hooks:
        calls = getattr(hook, "calls", None)  # Triton >= 3.5: a HookChain, maybe empty
        if (calls if calls is not None else hook is not None):
            return True
    return False


def _stream_getter() -> Callable[[int], int]:
    """The fastest way to read the current raw CUDA stream of a device."""
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw
    from triton.runtime import driver

    return driver.active.get_current_stream


def _c_launch_args(run: Any, fixed: int) -> tuple[Callable[..., Any], tuple] | None:
    """The C launch function under a Triton 3.4-3.6 ``CudaLauncher`` and the arguments its
    ``__call__`` would insert after ``function``, when that ``__call__`` adds nothing else
    (no scratch memory to allocate); None for any other launcher (then ``__call__`` is used).

    That ``__call__`` takes ``(gridX, gridY, gridZ, stream, function, *args)`` and calls
    ``launch(gridX, gridY, gridZ, stream, function, cooperative, pdl, global_scratch,
    profile_scratch, *args)``; calling ``launch`` directly saves about 1.2 µs per launch (H100
    host). Later Triton versions pass annotations too and are recognised by them: not here."""
    c_launch = getattr(run, "launch", None)
    needed = ("launch_cooperative_grid", "launch_pdl", "global_scratch_size",
              "profile_scratch_size")
    if c_launch is None or fixed != 5 or not all(hasattr(run, a) for a in needed):
        return None
    if hasattr(run, "arg_annotations") or getattr(run, "gsan_enabled", False):
        return None
    if run.global_scratch_size or run.profile_scratch_size:
        return None
    return c_launch, (run.launch_cooperative_grid, run.launch_pdl, None, None)


def _direct_launcher(compiled: Any) -> tuple[Callable[..., Any], Any, tuple] | None:
    """``(launch, function, head)`` of a compiled kernel: a launch is
    ``launch(gx, gy, gz, stream, function, *head, *kernel_args)``. None when this Triton's
    ``CompiledKernel`` does not expose its launcher the way we call it."""
    try:
        run = compiled.run
        function = compiled.function
        metadata = compiled.packed_metadata
        params = list(inspect.signature(run).parameters.values())
    except (AttributeError, TypeError, ValueError):
        return None
    fixed = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    varargs = [p for p in params if p.kind == p.VAR_POSITIONAL]
    if not 5 <= len(fixed) <= _LAUNCHER_PARAMS or len(varargs) != 1 or function is None:
        return None
    hooks = (metadata, None, None, None)  # packed metadata, launch metadata, enter/exit hooks
    direct = _c_launch_args(run, len(fixed))
    if direct is not None:
        return direct[0], function, direct[1] + hooks
    return run, function, hooks


def _rebind(fn: Any, namespace: dict[str, Any]) -> Any:
    """A copy of function ``fn`` whose globals are ``namespace`` (same code, name, module,
    defaults and annotations: Triton reads constexprs from the annotations and the source
    from the code's file and line)."""
    new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__,
                             fn.__closure__)
    for attr in ("__kwdefaults__", "__annotations__", "__qualname__", "__module__", "__doc__"):
        setattr(new, attr, getattr(fn, attr))
    return new


def bind_helpers(fn: Any, module: Any, decorate: Callable[[Any], Any]) -> Any:
    """``fn`` (a kernel, a plain function of ``module``) rebound to a private copy of the
    module's namespace in which every device function named in ``module.JIT_HELPERS`` is
    decorated with ``decorate`` (``triton.jit``, or ``JITFunction`` to compile without the
    interpreter). The helpers stay plain functions in the module itself, so the kernel and
    the helpers it calls are always decorated together, for one mode: the interpreter cannot
    call a helper decorated for the compiler, nor the compiler one of the interpreter's. A
    module without ``JIT_HELPERS``: ``fn`` itself."""
    names = getattr(module, "JIT_HELPERS", ())
    if not names:
        return fn
    namespace = dict(vars(module))
    for name in names:  # helpers see the namespace too: one helper may call another
        namespace[name] = decorate(_rebind(getattr(module, name), namespace))
    return _rebind(fn, namespace)


def compile_sm90(module: Any, name: str, signature: dict[str, str],
                 constexprs: dict[str, Any], **options: Any) -> Any:
    """Kernel ``name`` of kernel module ``module`` compiled for sm_90 by Triton's NVIDIA backend
    and its bundled ptxas, without a GPU (the tests and ``bench/ptx_diff.py`` read its
    ``asm["ptx"]``). ``signature``: parameter -> Triton type (``*bf16``, ``i32``,
    ``tensordesc<bf16[128, 64]>``; unnamed ones are ``i32``); ``constexprs``: values;
    ``options``: ``num_warps``, ``num_stages``. The kernel and its ``JIT_HELPERS`` are
    compiled from their source whatever mode is active: Triton's own jit functions the
    kernels reference (``tl.standard._sum_combine``) are the interpreter's when
    ``triton.language`` was first imported under ``TRITON_INTERPRET=1``, so those are
    recompiled too, in a copy of the module's namespace."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    copy = types.ModuleType(module.__name__)
    copy.__dict__.update({k: JITFunction(v.fn) if isinstance(v, InterpretedFunction) else v
                          for k, v in vars(module).items()})
    # JITFunction, not triton.jit: that returns the interpreter's wrapper under TRITON_INTERPRET
    jf = JITFunction(bind_helpers(getattr(copy, name), copy, JITFunction))
    sig = {n: "constexpr" if n in constexprs else signature.get(n, "i32") for n in jf.arg_names}
    return triton.compile(ASTSource(jf, sig, constexprs=dict(constexprs)),
                          target=GPUTarget("cuda", 90, 32), options=options)



def compile_gluon_sm90(kernel: Any, signature: dict[str, Any], constexprs: dict[str, Any],
                       **options: Any) -> Any:
    """A Gluon kernel (a ``gluon.jit`` function: Gluon has no interpreter, so it is the same
    object in either mode) compiled for sm_90 without a GPU, as :func:`compile_sm90`. A
    ``signature`` value may be a host ``TensorDescriptor`` instead of a type string: its type
    (dtype, block shape, shared layout) is read from it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    sig = {}
    for n in kernel.arg_names:
        value = "constexpr" if n in constexprs else signature.get(n, "i32")
        sig[n] = value if isinstance(value, str) else mangle_type(value)
    return triton.compile(GluonASTSource(kernel, sig, constexprs=dict(constexprs)),
                          target=GPUTarget("cuda", 90, 32), options=options)

def pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``): Triton block sizes."""
    return 1 << max(n - 1, 0).bit_length()


class TritonKernel:
    """One Triton kernel (a plain function in ``module``), launched through a key cache."""

    def __init__(self, module: str, name: str, do_not_specialize: tuple[str, ...] = ()):
        self.module = module
        self.name = name
        self.do_not_specialize = do_not_specialize
        self._decorated: dict[bool, Any] = {}
        self._fast: dict[tuple, tuple[Callable[..., Any], Callable[[int], int], tuple]] = {}
        self.cached = self._fast.get
        """``cached(key)``: None before the first launch with ``key`` (and always under the
        interpreter), else ``(run, stream, head)``, a launch being
        ``run(gx, gy, gz, stream(device), *head, *ptrs, *rest)``. Hot adapters call it
        themselves and fall back to :meth:`launch` (same key, same arguments) on None."""
        self._stream: Callable[[int], int] | None = None
        self.slow_launches = 0
        """Launches that went through Triton's own ``run`` (first of a key, interpreter)."""

    def jit(self) -> Any:
        """The kernel decorated for the current mode (compiler or interpreter)."""
        interpret = interpreter_enabled()
        fn = self._decorated.get(interpret)
        if fn is None:
            import triton

            module = importlib.import_module(self.module)
            raw = bind_helpers(getattr(module, self.name), module, triton.jit)
            fn = self._decorated[interpret] = triton.jit(
                raw, do_not_specialize=list(self.do_not_specialize))
        return fn

    def launch(self, key: tuple | None, grid: tuple[int, int, int], device: int,
               tensors: Sequence[Any], ptrs: Sequence[int], rest: Sequence[Any],
               num_warps: int, num_stages: int | None = None,
               launch_pdl: bool = False) -> None:
        """Launch on ``grid``. The kernel's parameters are ``tensors`` (its pointer parameters,
        first) then ``rest`` (scalars and constexprs, in order); ``ptrs`` are the tensors'
        ``data_ptr()``. The fast path passes those integers: Triton's launcher then neither
        calls ``data_ptr`` nor checks each address with the driver (``cuPointerGetAttribute``).
        ``device`` is the CUDA index of the tensors (the current device). ``num_stages``
        (software pipelining of the kernel's loops; None: Triton's default) must be part of
        ``key`` when it varies. ``launch_pdl``: launch as a programmatic dependent of the
        previous kernel in the stream (the kernel must ``gdc_wait()`` before it reads what
        that kernel writes); it too must be implied by ``key``. Ignored by the interpreter.
        ``key`` None: always Triton's own run (arguments the fast path cannot pass, such as
        tensor descriptors)."""
        fast = self._fast.get(key) if key is not None else None
        if fast is not None:
            run, stream, head = fast
            run(grid[0], grid[1], grid[2], stream(device), *head, *ptrs, *rest)
            return
        self._launch_slow(key, grid, (*tensors, *rest), num_warps, num_stages, launch_pdl)

    def _launch_slow(self, key: tuple | None, grid: tuple[int, int, int], args: Sequence[Any],
                     num_warps: int, num_stages: int | None = None,
                     launch_pdl: bool = False) -> None:
        self.slow_launches += 1
        options: dict[str, int] = {"num_warps": num_warps}
        if num_stages is not None:
            options["num_stages"] = num_stages
        if interpreter_enabled():
            with interpreter_rounds_to_nearest():
                self.jit()[grid](*args, **options)
            return
        if launch_pdl:  # only when asked: the option-less compile/cache key stays as it was
            options["launch_pdl"] = True
        compiled = self.jit()[grid](*args, **options)
        if key is None or _hooks_active():
            return
        direct = _direct_launcher(compiled)
        if direct is not None:
            if self._stream is None:
                self._stream = _stream_getter()
            run, function, head = direct
            self._fast[key] = (run, self._stream, (function, *head))

    def clear(self) -> None:
        """Forget the cached launchers (the next launch of each key takes the slow path)."""
        self._fast.clear()

    @property
    def cached_keys(self) -> int:
        return len(self._fast)
