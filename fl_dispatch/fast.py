"""The bare current impl of each op, for callers that guard the call themselves::

    f = fl_dispatch.fast.rms_norm
    try:
        out = f(x, weight, eps)
    except Exception as exc:
        out = fl_dispatch.recover("rms_norm", f, exc, (x, weight, eps))

No extra frame at all (the vLLM glue calls ops this way); :func:`fl_dispatch.recover` falls
back exactly as the guarded ``fl_dispatch.ops.<op>`` would. Bound like :mod:`fl_dispatch.ops`.
"""
