"""The dispatched ops: ``fl_dispatch.ops.<op>(...)`` calls the impl chosen for this process.

Each op becomes a plain attribute of this module when the process's dispatcher is created (on
the first lookup of any op): the chosen impl itself, or, when the op has fallbacks, the
generated guard around it (``fl_dispatch.core._guard``). Until then a module ``__getattr__``
creates the dispatcher; it is then removed, because CPython specializes attribute reads only on
modules without one (+17 ns a call otherwise; docs/performance.md).
"""
