"""The GPU bench scripts import on a CPU machine and skip what an impl does not serve.

Regression: bench/kernels.py called ``fl_dispatch_flagos.flaggems.rotary_embedding`` on a GPU
host where FlagGems imports; FlagGems has no rotary impl (its GAPS say why), every rotary row
raised and the host-time table was never printed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_kernels_bench_skips_ops_an_impl_does_not_serve() -> None:
    kernels = _load("kernels")
    from fl_dispatch_flagos import flaggems
    from fl_dispatch_flagos import ops as flagos

    assert not hasattr(flaggems, "rotary_embedding")
    assert not kernels.serves(flaggems, "rotary_neox")
    assert kernels.serves(flaggems, "fused_add_rms_norm") and kernels.serves(flagos,
                                                                            "rotary_neox")
