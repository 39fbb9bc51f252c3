"""The ACME backend checked by fl-dispatch's conformance kit: every impl it registers, on
every input case of its op, in fp32, fp16 and bf16, against the reference, with the same
checks as ``fl-dispatch verify`` (values within tolerance, strided views, the ``out``
contract). An impl whose capability check fails here is skipped with the reason."""

import sys
from pathlib import Path

from fl_dispatch.testing import backend_conformance

# From a checkout without `pip install -e .`, import the package from here (installed, its
# entry point finds it and modules= below changes nothing).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

test_acme = backend_conformance("acme", modules=("acme_fl_backend",))
