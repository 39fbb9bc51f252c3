"""Make the repository importable on the GPU machine without installing it.

The backends are importable as ``fl_dispatch_flagos``/``fl_dispatch_cuda``/... only through
the package-dir mapping of an install. Here a temporary folder of symbolic links gives them
those names, and vLLM's compiled ops are unpacked from ``.gpu-ops/vllm_C.so.xz`` (carried with
the call) for ``backends/cuda`` (``FL_DISPATCH_VLLM_C``).
"""

from __future__ import annotations

import importlib.util
import lzma
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "fl_dispatch_flagos": "backends/flagos",
    "fl_dispatch_cuda": "backends/cuda",
    "fl_dispatch_reference": "backends/reference",
}


def setup() -> str | None:
    """Put the repository and the backend names on ``sys.path``; unpack vLLM's ops.

    Returns the path of vLLM's ``_C`` library, or None when it was not carried."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    shim = Path(tempfile.gettempdir()) / "fl_dispatch_shim"
    shim.mkdir(exist_ok=True)
    for name, rel in PACKAGES.items():
        if importlib.util.find_spec(name) is not None:
            continue
        link = shim / name
        if not link.exists():
            link.symlink_to(ROOT / rel, target_is_directory=True)
        if str(shim) not in sys.path:
            sys.path.insert(0, str(shim))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(shim)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                  if p])
    return _vllm_library()


def _vllm_library() -> str | None:
    path = os.environ.get("FL_DISPATCH_VLLM_C")
    if path:
        return path
    packed = ROOT / ".gpu-ops" / "vllm_C.so.xz"
    if not packed.exists():
        return None
    out = Path(tempfile.gettempdir()) / "vllm_C.so"
    if not out.exists():
        with lzma.open(packed) as src:
            out.write_bytes(src.read())
    os.environ["FL_DISPATCH_VLLM_C"] = str(out)
    return str(out)
