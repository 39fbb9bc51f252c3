"""A vLLM general plugin used by ``bench/vllm_gpu.py`` only (loaded in every configuration,
stock included, through a throw-away ``*.dist-info`` the bench puts on ``PYTHONPATH``).

With ``FL_BENCH_WEIGHTS=spread`` it wraps vLLM's dummy loader: after vLLM has filled every
weight uniformly in ±1e-3 (its default: the logits come out nearly flat, so no rounding
difference inside the layers ever reaches a token or a log-probability), each floating
parameter is drawn again with the spread of a trained checkpoint: matrices normal with standard
deviation ``fan_in ** -0.5`` (fan-in = the last dimension: vLLM stores linear weights, the MoE
``w13``/``w2`` stacks and the MLA ``kv_b_proj`` as ``[..., out, in]``), norm weights ``1 +
N(0, 0.1)``, other vectors ``N(0, 0.02)``. The seed of each tensor is a hash of its name, so
every configuration, and every tensor-parallel rank, draws the same values. It runs inside
``load_weights``, before vLLM's ``process_weights_after_loading`` (which derives MLA's absorbed
matrices and repacks weights), so derived tensors stay consistent.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

_state: dict[str, bool] = {}


def register() -> None:
    """The ``vllm.general_plugins`` entry point."""
    if os.environ.get("FL_BENCH_WEIGHTS", "dummy") != "spread" or _state.get("done"):
        return
    from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader

    original = DummyModelLoader.load_weights

    def load_weights(self: Any, model: Any, model_config: Any) -> None:
        original(self, model, model_config)
        spread(model)

    DummyModelLoader.load_weights = load_weights  # type: ignore[method-assign]
    _state["done"] = True


def spread(model: Any) -> None:
    import torch

    count = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point() or p.device.type == "meta" or p.numel() == 0:
                continue
            seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1
            gen = torch.Generator(device=p.device).manual_seed(seed)
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
            elif "norm" in name:
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
            count += 1
    print(f"fl_bench_weights: redrew {count} parameter tensors (pid {os.getpid()})", flush=True)
