"""The conformance kit: the inputs, tolerances and checks behind ``fl-dispatch verify``, for a
backend vendor's own tests and for ops that plugins define.

- :func:`backend_conformance`: a pytest test function running every impl a backend registers
  through verify's checks (``test_acme = backend_conformance("acme")``).
- :class:`Case`: one call of one op (what ``@op.cases`` and ``@op.bench`` return);
  :data:`DTYPES` maps the short dtype names to torch dtypes; :class:`Dims` are the model
  dimensions ``@op.bench`` receives.
- :func:`tolerance` / :data:`DEFAULT_TOLERANCES`: how close an impl must be, per op and dtype.
- :func:`verify_case` / :func:`check_choice`: the checks themselves, returning :class:`Row`.

Importing this package does not import pytest (only :func:`backend_conformance` does).
"""

from __future__ import annotations

from .checks import FAIL, NO_GEN, PASS, SKIP, Row, check_choice, verify_case
from .conformance import ConformanceItem, backend_conformance, conformance_items
from .inputs import DTYPES, Case, Dims
from .tolerances import DEFAULT_TOLERANCES, Tolerance, tolerance

__all__ = [
    "DEFAULT_TOLERANCES",
    "DTYPES",
    "FAIL",
    "NO_GEN",
    "PASS",
    "SKIP",
    "Case",
    "ConformanceItem",
    "Dims",
    "Row",
    "Tolerance",
    "backend_conformance",
    "check_choice",
    "conformance_items",
    "tolerance",
    "verify_case",
]
