"""The sm_90 PTX of our Triton kernels at a git revision against the working tree, no GPU.

Run from the repository root::

    python bench/ptx_diff.py d51d136                 # every case below
    python bench/ptx_diff.py HEAD --only fan,gemm2   # cases whose label contains a word

A refactor of a tuned kernel (device functions shared through ``JIT_HELPERS``, say) should
not change the code the GPU runs. Without a GPU that can still be checked: each case is
compiled for sm_90 by Triton's NVIDIA backend, from the revision's kernel module and from the
tree's, and the instruction mix of the two PTX texts is compared (opcode counts; register
numbers and labels are left out). Prints one row per case: instructions then and now, and the
opcodes whose counts moved. Exit status 1 when a case differs (``--tolerance`` allows that
many moved instructions per case), 2 when one does not compile.

Constexprs a revision's kernel does not have (keys added since, such as ``TMA_W``) are
dropped for it; they must be off in the case, so that both sides run the same path.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
import types
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLAGOS = ROOT / "backends" / "flagos"

_I32 = "*i32"
_ALIGN = {n: _I32 for n in ("ids_ptr", "sorted_ptr", "eids_ptr", "ntpp_ptr", "cursor_ptr",
                            "map_ptr", "counts_ptr")}
_GEMM = {"a_ptr": "*bf16", "a_half_ptr": "*bf16", "w_ptr": "*bf16", "c_ptr": "*bf16",
         "topk_w_ptr": "*fp32", "sorted_ids_ptr": _I32, "expert_ids_ptr": _I32,
         "ntpp_ptr": _I32, "topk_ids_ptr": _I32, "map_ptr": _I32}
_OFF = dict(TMA_W=False, SORTED_C=False, HALF_M=False)
_DOT = dict(EVEN_K=True, IEEE=False, UPCAST=False)

CASES = [  # (label, module, kernel, signature, constexprs, num_warps, num_stages)
    ("align small", "kernels_moe_align", "moe_align_small_kernel", _ALIGN,
     dict(HAS_MAP=True, BLOCK_N=1024, BLOCK_E=512, BLOCK_S=1024, BLOCK_B=1024), 4, None),
    ("align count", "kernels_moe_align", "moe_align_count_kernel", _ALIGN,
     dict(TILE=1024, BLOCK_E=256, BLOCK_S=1024), 4, None),
    ("align scan", "kernels_moe_align", "moe_align_scan_kernel", _ALIGN,
     dict(HAS_MAP=True, BLOCK_TILES=16, BLOCK_E=256, BLOCK_B=1024), 4, None),
    ("align scatter", "kernels_moe_align", "moe_align_scatter_kernel", _ALIGN,
     dict(TILE=1024), 4, None),
    ("align one_cmp", "kernels_moe_align", "moe_align_one_kernel", _ALIGN,
     dict(HAS_MAP=True, RANK=1, ONE_CHUNK=True, BLOCK_N=128, BLOCK_E=512, BLOCK_S=1024), 4,
     None),
    ("align one (atomics, chunks)", "kernels_moe_align", "moe_align_one_kernel", _ALIGN,
     dict(HAS_MAP=False, RANK=0, ONE_CHUNK=False, BLOCK_N=1024, BLOCK_E=512, BLOCK_S=1024),
     4, None),
    ("align place two_cmp", "kernels_moe_align", "moe_align_place_kernel", _ALIGN,
     dict(HAS_MAP=False, RANK=1, TILE=256, BLOCK_TILES=16, BLOCK_E=512, BLOCK_S=1024,
          CHUNK=64), 4, None),
    ("align place two", "kernels_moe_align", "moe_align_place_kernel", _ALIGN,
     dict(HAS_MAP=True, RANK=0, TILE=256, BLOCK_TILES=16, BLOCK_E=256, BLOCK_S=1024,
          CHUNK=64), 4, None),
    ("align fan", "kernels_moe_align", "moe_align_fan_kernel", _ALIGN,
     dict(HAS_MAP=True, BLOCK_N=512, BLOCK_E=256, CHUNK=16, PAD_ROWS=16, PAD_COLS=64,
          BLOCK_S=512, BLOCK_B=256), 4, None),
    ("gemm1 decode", "kernels_moe_gemm", "moe_gemm1_act_kernel", _GEMM,
     dict(**_DOT, **_OFF, NAIVE=True, MUL_W=False, ACT=0, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128,
          GROUP_M=1, W_EVICT=1, PDL_TRIGGER=0), 4, 4),
    ("gemm1 prefill", "kernels_moe_gemm", "moe_gemm1_act_kernel", _GEMM,
     dict(**_DOT, **_OFF, NAIVE=False, MUL_W=False, ACT=0, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
          GROUP_M=16, W_EVICT=0, PDL_TRIGGER=0), 8, 4),
    ("gemm2 decode PDL", "kernels_moe_gemm", "moe_gemm2_kernel", _GEMM,
     dict(**_DOT, **_OFF, NAIVE=True, MUL_W=True, HAS_MAP=False, BLOCK_M=16, BLOCK_N=64,
          BLOCK_K=64, GROUP_M=1, W_EVICT=1, CLEAN_M=64, CLEAN_N=256, PDL=True), 4, 5),
    ("gemm2 prefill map", "kernels_moe_gemm", "moe_gemm2_kernel", _GEMM,
     dict(**{**_DOT, "EVEN_K": False}, **_OFF, NAIVE=False, MUL_W=True, HAS_MAP=True, BLOCK_M=128,
          BLOCK_N=256, BLOCK_K=64, GROUP_M=16, W_EVICT=0, CLEAN_M=64, CLEAN_N=256,
          PDL=False), 8, 4),
    ("gemm2 fused sum", "kernels_moe_gemm", "moe_gemm2_sum_kernel", _GEMM,
     dict(**_DOT, MUL_W=True, TOP_K=8, BLOCK_N=32, BLOCK_K=128, W_EVICT=1, PDL=False), 2, 4),
]
"""What is compared: every alignment variant and the GEMM kernels at a decode and a prefill
tile (the pointer paths, which every revision has)."""


def _load(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _launcher() -> types.ModuleType:
    """The tree's launcher (``bind_helpers``) without importing the flagos package."""
    pkg = types.ModuleType("_ptx_flagos")
    pkg.__path__ = [str(FLAGOS)]
    sys.modules["_ptx_flagos"] = pkg
    return importlib.import_module("_ptx_flagos.launcher")


def compile_ptx(module: types.ModuleType, kernel: str, signature: dict, constexprs: dict,
                num_warps: int, num_stages: int | None) -> str:
    fn = getattr(module, kernel)
    params = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    dropped = sorted(k for k, v in constexprs.items() if k not in params and v)
    if dropped:
        raise ValueError(f"{kernel} has no {dropped}: a case must leave the keys a revision "
                         "lacks off")
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    ce = {k: v for k, v in constexprs.items() if k in params}
    return _launcher().compile_sm90(module, kernel, signature, ce, **options).asm["ptx"]


def opcodes(ptx: str) -> Counter:
    """Opcode counts of a PTX text: directives, labels, braces and comments left out; a
    predicate guard (``@%p3``) counts as the guarded opcode."""
    ops: Counter = Counter()
    for line in ptx.splitlines():
        line = line.strip()
        if not line or line.startswith(("//", ".", "{", "}")) or line.endswith(":"):
            continue
        line = re.sub(r"^@!?%p\d+\s+", "", line)
        ops[line.split()[0].rstrip(";")] += 1
    return ops


def _revision_modules(rev: str, tmp: Path) -> dict[str, types.ModuleType]:
    modules = {}
    for name in sorted({case[1] for case in CASES}):
        path = tmp / f"{name}.py"
        text = subprocess.run(["git", "show", f"{rev}:backends/flagos/{name}.py"], cwd=ROOT,
                              check=True, capture_output=True, text=True).stdout
        path.write_text(text)
        modules[name] = _load(path, f"_ptx_rev_{name}")
    return modules


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rev", help="git revision to compare the working tree with")
    ap.add_argument("--only", default="", help="comma-separated words; cases whose label "
                    "contains one of them")
    ap.add_argument("--tolerance", type=int, default=0,
                    help="moved instructions allowed per case before it counts as different")
    args = ap.parse_args(argv)
    words = [w for w in args.only.split(",") if w]
    cases = [c for c in CASES if not words or any(w in c[0] for w in words)]
    if not cases:
        ap.error(f"--only {args.only!r} matches no case; labels: "
                 + ", ".join(c[0] for c in CASES))
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        then = _revision_modules(args.rev, Path(tmp))
        now = {name: _load(FLAGOS / f"{name}.py", f"_ptx_now_{name}") for name in then}
        print(f"{'case':30s} {args.rev:>10s} {'tree':>7s}  moved opcodes")
        for label, mod, kernel, sig, ce, warps, stages in cases:
            try:
                a = opcodes(compile_ptx(then[mod], kernel, sig, ce, warps, stages))
                b = opcodes(compile_ptx(now[mod], kernel, sig, ce, warps, stages))
            except Exception as exc:  # reported per case, the rest go on
                print(f"{label:30s} does not compile: {type(exc).__name__}: {exc}"[:200])
                status = 2
                continue
            moved = {op: b[op] - a[op] for op in sorted(set(a) | set(b)) if b[op] != a[op]}
            shown = ", ".join(f"{op} {d:+d}" for op, d in moved.items()) or "none"
            print(f"{label:30s} {sum(a.values()):10d} {sum(b.values()):7d}  {shown}")
            if sum(abs(d) for d in moved.values()) > args.tolerance and status == 0:
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
