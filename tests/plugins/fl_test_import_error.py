"""A backend whose import fails (a missing dependency)."""

import fl_test_dependency_that_is_not_installed  # noqa: F401
