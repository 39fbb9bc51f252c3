"""Input cases of the ops: the conformance kit's inputs, used by ``fl-dispatch verify``,
``fl-dispatch bench``, ``bench/`` and the tests.

A :class:`Case` is one call of one op: a name, a dtype, a ``build(device)`` that allocates its
arguments (deterministically: a seeded generator), the contract on its return value, and the
bytes the call must move at the least. Views are real views: a "strided" argument is a slice of
a larger buffer whose other elements must stay untouched. An op declares which cases it has
(``@op.cases`` / ``@op.bench`` next to its definition); the builders here are shared, and a
plugin's op can use them or build its own :class:`Case` objects.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
"""The dtypes the tools test, by short name."""

_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
                  "bfloat16": "bf16"}

Returns = str | tuple[str, ...]
"""What a call must return: ``"new"`` (a fresh tensor aliasing no argument), ``"none"``, or
the names of the arguments the result must be (one name: that tensor; several: a tuple)."""

Size = str
"""``"quick"`` (one small shape per op), ``"small"`` (CPU), ``"full"`` (accelerators)."""
SIZES: tuple[Size, ...] = ("quick", "small", "full")


@dataclass(frozen=True)
class Case:
    """One call of one op: ``build(device)`` returns fresh keyword arguments.
    ``bytes_moved``: what the call must read and write at the least (for bandwidth);
    ``variant``: a short tag for benchmark tables when an op has several cases per size."""

    op: str
    name: str
    dtype: str
    build: Callable[[torch.device], dict[str, Any]]
    returns: Returns
    bytes_moved: int
    variant: str = ""
    canonical: Callable[[dict[str, Any]], None] | None = None
    """Rewrites, in place, what the op's contract leaves unspecified in the arguments after a
    call (the order of tokens inside one expert's blocks, say), so impls compare equal."""
    flops: int = 0
    """Floating-point operations of the call (GEMM-like ops), for TFLOP/s in bench tables."""

    @property
    def label(self) -> str:
        """``op`` or ``op+variant``."""
        return f"{self.op}+{self.variant}" if self.variant else self.op


@dataclass(frozen=True)
class Dims:
    """Model dimensions for benchmark cases."""

    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    head_size: int = 128
    experts: int = 8
    """MoE (Mixtral by default): experts, routes per token, expert intermediate size, groups
    of grouped_topk (experts // groups >= 2)."""
    topk: int = 2
    moe_intermediate: int = 14336
    expert_groups: int = 4
    mla_heads: int = 16
    """MLA decode: query heads (16 = DeepSeek with tensor parallel 8), mean cache length."""
    kv_len: int = 4096


# --------------------------------------------------------------------------- helpers
def parse_dtype(name: str) -> str:
    """The short name (fp32, fp16, bf16) of ``name``; raises ValueError naming the valid ones."""
    key = name.strip().lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)} "
                         f"(or {', '.join(_DTYPE_ALIASES)})")
    return key


def default_device() -> str:
    """``cuda`` when a CUDA device is present, else ``npu`` when one is, else ``cpu``."""
    if torch.cuda.is_available():
        return "cuda"
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        return "npu"
    return "cpu"


def resolve_device(name: str | None) -> torch.device:
    """``name`` (default: :func:`default_device`) as a usable device; ValueError if not."""
    name = name or default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"unknown device {name!r} ({exc}); valid: cpu, cuda, cuda:<n>, "
                         f"npu (where present)") from None
    if device.type != "cpu":
        module = getattr(torch, device.type, None)
        if module is None or not hasattr(module, "is_available") or not module.is_available():
            raise ValueError(f"device {name!r} is not available on this machine; "
                             f"valid here: {default_device()}")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (no-op on CPU)."""
    module = getattr(torch, device.type, None)
    if device.type != "cpu" and module is not None and hasattr(module, "synchronize"):
        module.synchronize(device)


def rope_cache(max_position: int, rotary_dim: int, dtype: torch.dtype,
               device: torch.device, base: float = 10000.0) -> torch.Tensor:
    """A ``[max_position, rotary_dim]`` cos/sin cache from real angles (cos first, then sin),
    computed in fp32 like vLLM's RotaryEmbedding, then cast to ``dtype``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32,
                                            device=device) / rotary_dim))
    t = torch.arange(max_position, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)


def quarter_turn_cache(max_position: int, rotary_dim: int, dtype: torch.dtype,
                       device: torch.device) -> torch.Tensor:
    """A cos/sin cache whose angles are whole quarter turns (``k * pi/2``, k varying with
    position and frequency), so cos and sin are exactly 0 or +-1 in every dtype: rotating in
    place any number of times stays exact. For benchmarks, which replay one in-place call
    thousands of times: with ``rope_cache`` in bf16, ``cos^2 + sin^2`` differs from 1 by a
    rounding error and the values grow or shrink geometrically until they overflow."""
    half = rotary_dim // 2
    k = torch.outer(torch.arange(max_position, device=device),
                    torch.arange(1, half + 1, device=device)) % 4
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=device)[k]
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=device)[k]
    return torch.cat((cos, sin), dim=-1).to(dtype)


class _Maker:
    """Deterministic tensors for one case (a seeded generator on the target device)."""

    def __init__(self, seed: int, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        try:
            self.gen = torch.Generator(device=device)
        except RuntimeError:  # a device without its own generator: draw on the CPU
            self.gen = torch.Generator()
        self.gen.manual_seed(seed)

    def randn(self, *shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        gen_device = self.gen.device
        t = torch.randn(shape, generator=self.gen, device=gen_device, dtype=torch.float32)
        return (t * scale + shift).to(device=self.device, dtype=self.dtype)

    def rows(self, n: int, width: int, pad: int, offset: int = 0) -> torch.Tensor:
        """A ``[n, width]`` row-strided view (columns ``offset:offset+width``) of a random
        ``[n, width + pad]`` buffer."""
        buf = self.randn(n, width + pad)
        return buf[:, offset:offset + width]

    def positions(self, n: int, high: int) -> torch.Tensor:
        gen_device = self.gen.device
        p = torch.randint(0, high, (n,), generator=self.gen, device=gen_device,
                          dtype=torch.int64)
        return p.to(self.device)


def _seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def _size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


# --------------------------------------------------------------------------- activations
def act_case(op: str, tokens: int, d: int, dtype: str, *, x_strided: bool = False,
             out: str = "none", approximate: str | None = None,
             batch: int | None = None) -> Case:
    """silu_and_mul / gelu_and_mul on ``[tokens, 2d]`` (``[batch, tokens, 2d]`` if batch).
    ``out``: "none", "contiguous" or "strided" (a row-strided view of a larger buffer)."""
    if out not in ("none", "contiguous", "strided"):
        raise ValueError(f"out={out!r}; valid: none, contiguous, strided")
    parts = [f"T={tokens}", f"d={d}"]
    if batch is not None:
        parts.insert(0, f"B={batch}")
    if approximate is not None:
        parts.append(f"approximate={approximate}")
    parts.append("x:strided" if x_strided else "x:contig")
    parts.append(f"out:{out}")
    name = " ".join(parts)
    torch_dtype = DTYPES[dtype]

    def build(device: torch.device) -> dict[str, Any]:
        m = _Maker(_seed(op, name, dtype), device, torch_dtype)
        lead = (batch, tokens) if batch is not None else (tokens,)
        if x_strided:
            x = m.rows(math.prod(lead), 2 * d, pad=24, offset=8).unflatten(0, lead)
        else:
            x = m.randn(*lead, 2 * d)
        target = None
        if out == "contiguous":
            target = m.randn(*lead, d, scale=100.0)  # garbage that no result resembles
        elif out == "strided":
            target = m.rows(math.prod(lead), d, pad=16, offset=8).unflatten(0, lead)
            target.mul_(100.0)
        kwargs: dict[str, Any] = {"x": x}
        if approximate is not None:
            kwargs["approximate"] = approximate
        kwargs["out"] = target
        return kwargs

    rows = tokens * (batch or 1)
    return Case(op, name, dtype, build, ("out",) if out != "none" else "new",
                rows * 3 * d * _size(dtype))


def _act_cases(op: str, shapes: Iterable[tuple[int, ...]], dtype: str,
               approximations: tuple[str | None, ...]) -> list[Case]:
    cases = []
    for i, (tokens, d) in enumerate(shapes):
        for approximate in approximations:
            for x_strided, out in ((False, "none"), (False, "contiguous"), (True, "none"),
                                   (True, "strided"), (False, "strided")):
                cases.append(act_case(op, tokens, d, dtype, x_strided=x_strided, out=out,
                                      approximate=approximate))
        if i == 0:
            cases.append(act_case(op, tokens, d, dtype, out="contiguous", batch=2,
                                  approximate=approximations[0]))
    return cases


# --------------------------------------------------------------------------- rms_norm
def rms_case(tokens: int, hidden: int, dtype: str, *, residual: bool, weight: bool = True,
             strided: bool = False, epsilon: float = 1e-6, weight_scale: float = 1.0) -> Case:
    """rms_norm on ``[tokens, hidden]``; ``residual`` selects the in-place fused add variant;
    ``strided``: x (and residual) are row-strided views of larger buffers. The weight is
    ``weight_scale * (1 + 0.5 * randn)``: benchmarks use a small scale, because replaying the
    residual variant adds ``x`` (normalized times weight) to ``residual`` on every call, and
    fp16 would overflow after some 10^4 calls with weights near 1."""
    name = (f"T={tokens} h={hidden} " + ("residual" if residual else "no-residual")
            + (" weight" if weight else " weight=None")
            + (" strided" if strided else " contig") + f" eps={epsilon:g}")
    torch_dtype = DTYPES[dtype]

    def build(device: torch.device) -> dict[str, Any]:
        m = _Maker(_seed("rms_norm", name, dtype), device, torch_dtype)
        x = m.rows(tokens, hidden, pad=40, offset=8) if strided else m.randn(tokens, hidden)
        res = None
        if residual:
            res = m.rows(tokens, hidden, pad=16) if strided else m.randn(tokens, hidden)
        w = m.randn(hidden, scale=0.5 * weight_scale, shift=weight_scale) if weight else None
        return {"x": x, "weight": w, "epsilon": epsilon, "residual": res}

    es = _size(dtype)
    moved = tokens * hidden * es * (4 if residual else 2) + (hidden * es if weight else 0)
    return Case("rms_norm", name, dtype, build, ("x", "residual") if residual else "new",
                moved, "residual" if residual else "")


def _rms_cases(shapes: Iterable[tuple[int, ...]], dtype: str) -> list[Case]:
    return [rms_case(t, h, dtype, residual=r, weight=w, strided=s)
            for t, h in shapes for r in (False, True) for w in (True, False)
            for s in (False, True)]


# --------------------------------------------------------------------------- rotary
def rope_case(tokens: int, heads: int, kv_heads: int, head_size: int, rotary_dim: int,
              dtype: str, *, is_neox: bool, layout: str = "qkv", key: bool = True,
              cache_dtype: str = "fp32", max_position: int = 4096,
              angles: str = "real", out: bool = False) -> Case:
    """rotary_embedding in place. ``layout``: "qkv" (query and key are row-strided column
    slices of one qkv buffer, as in vLLM), "2d" (``[T, heads*head_size]``) or "3d"
    (``[T, heads, head_size]``). ``cache_dtype``: "fp32" or "same" (the query's dtype).
    ``angles``: "real" (:func:`rope_cache`) or "quarter" (:func:`quarter_turn_cache`).
    ``out``: a case of rotary_embedding_out instead, whose ``query_out``/``key_out`` are
    filled with NaN (a feature left unwritten fails) and laid out as the inputs (row-strided
    slices of one buffer for "qkv")."""
    if angles not in ("real", "quarter"):
        raise ValueError(f"angles={angles!r}; valid: real, quarter")
    if layout not in ("qkv", "2d", "3d"):
        raise ValueError(f"layout={layout!r}; valid: qkv, 2d, 3d")
    if cache_dtype not in ("fp32", "same"):
        raise ValueError(f"cache_dtype={cache_dtype!r}; valid: fp32, same")
    if rotary_dim % 2 or not 0 < rotary_dim <= head_size:
        raise ValueError(f"rotary_dim={rotary_dim} must be even and in (0, {head_size}]")
    name = (f"T={tokens} heads={heads}/{kv_heads} hs={head_size} "
            f"rot={rotary_dim} {'neox' if is_neox else 'gptj'} {layout}"
            + ("" if key else " key=None") + f" cache:{cache_dtype}"
            + ("" if angles == "real" else " quarter-turns"))
    torch_dtype = DTYPES[dtype]
    cache_torch = torch.float32 if cache_dtype == "fp32" else torch_dtype

    def build(device: torch.device) -> dict[str, Any]:
        m = _Maker(_seed("rotary_embedding", name, dtype), device, torch_dtype)
        positions = m.positions(tokens, max_position)
        q_width, k_width = heads * head_size, kv_heads * head_size
        k = None
        if layout == "qkv":
            qkv = m.randn(tokens, q_width + 2 * k_width)
            q = qkv[:, :q_width]
            if key:
                k = qkv[:, q_width:q_width + k_width]
        else:
            shape_q = (tokens, heads, head_size) if layout == "3d" else (tokens, q_width)
            shape_k = (tokens, kv_heads, head_size) if layout == "3d" else (tokens, k_width)
            q = m.randn(*shape_q)
            if key:
                k = m.randn(*shape_k)
        make_cache = rope_cache if angles == "real" else quarter_turn_cache
        cache = make_cache(max_position, rotary_dim, cache_torch, device)
        args = {"positions": positions, "query": q, "key": k, "head_size": head_size,
                "cos_sin_cache": cache, "is_neox": is_neox}
        if out:
            args["query_out"], args["key_out"] = _nan_like(q, k, layout)
        return args

    es = _size(dtype)
    cache_es = 4 if cache_dtype == "fp32" else es
    heads_moved = heads + (kv_heads if key else 0)
    moved = (2 * tokens * heads_moved * (head_size if out else rotary_dim) * es
             + tokens * rotary_dim * cache_es + tokens * 8)
    op = "rotary_embedding_out" if out else "rotary_embedding"
    return Case(op, name, dtype, build, "none", moved)


def _nan_like(q: torch.Tensor, k: torch.Tensor | None, layout: str
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """NaN-filled outputs for q and k, laid out as they are ("qkv": slices of one buffer,
    with 8 more columns so that the rows are strided)."""
    if layout != "qkv":
        return (torch.full_like(q, float("nan")),
                None if k is None else torch.full_like(k, float("nan")))
    qw = q.shape[1]
    kw = 0 if k is None else k.shape[1]
    buf = torch.full((q.shape[0], qw + kw + 8), float("nan"), dtype=q.dtype, device=q.device)
    return buf[:, :qw], (None if k is None else buf[:, qw:qw + kw])


def _rope_cases(shapes: Iterable[tuple[int, ...]], dtype: str,
                max_position: int, out: bool) -> list[Case]:
    cases = []
    for i, (t, h, kv, hs) in enumerate(shapes):
        full, part = hs, hs // 2

        def case(rd: int, t: int = t, h: int = h, kv: int = kv, hs: int = hs,
                 **kw: Any) -> Case:
            return rope_case(t, h, kv, hs, rd, dtype, max_position=max_position, out=out,
                             **kw)

        for is_neox in (True, False):
            for rd in (full, part):
                cases.append(case(rd, is_neox=is_neox))
        cases += [
            case(full, is_neox=True, key=False),
            case(part, is_neox=False, key=False),
            case(full, is_neox=True, cache_dtype="same"),
            case(part, is_neox=True, layout="2d", cache_dtype="same"),
        ]
        if i == 0:
            cases += [
                case(full, is_neox=False, layout="3d"),
                case(part, is_neox=True, layout="3d", key=False),
            ]
    return cases


# --------------------------------------------------------------------------- case sets
_SHAPES: dict[Size, dict[str, list[tuple[int, ...]]]] = {
    "quick": {"act": [(3, 80)], "rms": [(3, 96)], "rope": [(3, 2, 1, 64)]},
    "small": {"act": [(1, 64), (7, 80), (5, 200)], "rms": [(1, 64), (7, 200)],
              "rope": [(1, 4, 2, 64), (7, 4, 2, 80)]},
    "full": {"act": [(1, 14336), (33, 14336), (4096, 14336), (7, 1000)],
             "rms": [(1, 4096), (33, 8192), (4096, 4096), (7, 1000)],
             "rope": [(1, 32, 8, 128), (33, 32, 8, 128), (4096, 32, 8, 128), (7, 16, 4, 64)]},
}
"""Shapes per size: "quick" (one small shape, for the Triton interpreter), "small" (CPU),
"full" (accelerators)."""


def shapes(size: Size, family: str) -> list[tuple[int, ...]]:
    """The shapes of ``family`` at ``size``; ValueError naming the valid sizes."""
    if size not in SIZES:
        raise ValueError(f"size={size!r}; valid: {', '.join(SIZES)}")
    return _SHAPES[size][family]


def act_cases(op: str, dtype: str, size: Size,
              approximations: tuple[str | None, ...]) -> list[Case]:
    """Conformance cases of a gated activation: every out/stride contract per shape."""
    return _act_cases(op, shapes(size, "act"), dtype, approximations)


def rms_cases(dtype: str, size: Size) -> list[Case]:
    """Conformance cases of rms_norm: with/without residual and weight, contiguous/strided."""
    return _rms_cases(shapes(size, "rms"), dtype)


def rope_cases(dtype: str, size: Size, out: bool = False) -> list[Case]:
    """Conformance cases of rotary_embedding (``out``: of rotary_embedding_out): neox/GPT-J,
    full/partial, key=None, layouts."""
    return _rope_cases(shapes(size, "rope"), dtype, 8192 if size == "full" else 512, out)


# --------------------------------------------------------------------------- copies
def _root(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


def replicate(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``kwargs`` that keeps every view a view: each buffer is cloned once and
    the views are re-made on the clone with the same sizes, strides and offsets."""
    clones: dict[int, torch.Tensor] = {}
    result: dict[str, Any] = {}
    for name, value in kwargs.items():
        if not isinstance(value, torch.Tensor):
            result[name] = value
            continue
        root = _root(value)
        key = root.untyped_storage().data_ptr()
        if key not in clones:
            clones[key] = root.clone(memory_format=torch.preserve_format)
        copy = clones[key]
        if value is root:
            result[name] = copy
        else:
            offset = value.storage_offset() - root.storage_offset()
            result[name] = copy.as_strided(value.size(), value.stride(), offset)
    return result


def buffers(kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Each distinct buffer behind the tensor arguments, named after the first argument that
    views it: ``{"buffer of query": qkv, ...}`` (only for arguments that are views)."""
    found: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value._base is not None:
            root = value._base
            key = root.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                found[f"buffer of {name}"] = root
    return found
