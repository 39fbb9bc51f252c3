"""Tiny random-weight models built locally with transformers (nothing is downloaded)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"config": "LlamaConfig", "model": "LlamaForCausalLM", "extra": {}},
    "qwen2": {"config": "Qwen2Config", "model": "Qwen2ForCausalLM", "extra": {}},
    "qwen2_moe": {
        "config": "Qwen2MoeConfig",
        "model": "Qwen2MoeForCausalLM",
        "extra": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 128, "decoder_sparse_step": 1},
    },
}
"""Model families the demo can build: transformers config and model class names."""

BASE_CONFIG: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
}


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/fl-dispatch`` (default ``~/.cache/fl-dispatch``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fl-dispatch"


def build_model(family: str, root: Path | None = None, seed: int = 0) -> Path:
    """Build (once) a tiny model of ``family`` with random weights; return its directory."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; valid: {', '.join(FAMILIES)}")
    spec = FAMILIES[family]
    config = {**BASE_CONFIG, **spec["extra"]}
    key = hashlib.sha256(json.dumps([family, config, seed], sort_keys=True).encode()).hexdigest()
    target = (root or cache_root() / "models") / f"tiny-{family}-{key[:10]}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch
    import transformers

    cfg = getattr(transformers, spec["config"])(**config, torch_dtype="float32")
    torch.manual_seed(seed)
    model = getattr(transformers, spec["model"])(cfg)
    with torch.no_grad():  # random init is small; widen it so greedy tokens are not all ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(target)
    return target
