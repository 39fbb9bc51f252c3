"""What the plugin costs vLLM: generation throughput with and without it, and start-up time.

1. Throughput: the tiny demo model (CPU build of vLLM here), greedy, a batch of prompts, timed
   ``--repeats`` times warm in one engine with the plugin on (reference backend) and in one
   with it off; the two engines alternate ``--rounds`` times. Target: the plugin costs <= 2%.
2. Start-up: the time ``fl_dispatch.vllm_glue.plugin.register()`` takes in a fresh process, after
   the vLLM imports vLLM's own start-up does anyway (layers, config). Target: <= 50 ms.

    .venv/bin/python bench/vllm_e2e.py [--rounds 2] [--repeats 5] [--eager]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fl_dispatch.tools.demo import run_generation
from fl_dispatch.tools.demo_model import build_model

STARTUP_PROBE = """
import time, json
t0 = time.perf_counter()
import vllm.model_executor.layers.activation, vllm.model_executor.layers.layernorm
import vllm.model_executor.layers.rotary_embedding, vllm.config, vllm.engine.arg_utils, vllm.ir
t1 = time.perf_counter()
from fl_dispatch.vllm_glue import plugin as vllm_plugin
vllm_plugin.register()
t2 = time.perf_counter()
print("PROBE " + json.dumps({"vllm_imports_s": t1 - t0, "register_s": t2 - t1}))
"""


def startup_cost(samples: int) -> list[dict[str, float]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_FL_")}
    env["VLLM_FL_LOG_LEVEL"] = "WARNING"
    out = []
    for _ in range(samples):
        proc = subprocess.run([sys.executable, "-c", STARTUP_PROBE], env=env, text=True,
                              capture_output=True, check=True)
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE "))
        out.append(json.loads(line[6:]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="engine pairs (on, off)")
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per engine")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: compiled)")
    parser.add_argument("--startup-samples", type=int, default=5)
    args = parser.parse_args()

    model = build_model("llama")
    prompts = [[(7 * i + j) % 500 + 1 for j in range(8 + i % 5)] for i in range(args.prompts)]
    request = {"model": str(model), "eager": args.eager, "max_tokens": args.max_tokens,
               "prompts": prompts, "repeats": args.repeats, "max_num_seqs": args.prompts}
    base = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_FL_")}
    configs = {"plugin on (reference)": {**base, "VLLM_FL_PREFER": "reference"},
               "plugin off": {**base, "VLLM_FL_PREFER_ENABLED": "0"}}
    times: dict[str, list[float]] = {name: [] for name in configs}
    tokens = args.prompts * args.max_tokens
    logs = Path(tempfile.mkdtemp(prefix="fl-bench-"))
    for r in range(args.rounds):
        for name, env in configs.items():
            result = run_generation(request, env, f"round {r + 1}: {name}",
                                    logs / f"{r}-{name.split()[1]}.log")
            times[name] += result["repeats_s"]
    mode = "eager" if args.eager else "compiled"
    print(f"\nthroughput: tiny llama, {args.prompts} prompts x {args.max_tokens} tokens, "
          f"{mode}, {args.rounds} engines x {args.repeats} warm runs each")
    print("| config | median s | tokens/s | runs |")
    print("|---|---:|---:|---:|")
    med = {}
    for name, ts in times.items():
        med[name] = statistics.median(ts)
        print(f"| {name} | {med[name]:.3f} | {tokens / med[name]:.0f} | {len(ts)} |")
    on, off = med["plugin on (reference)"], med["plugin off"]
    cost = (on / off - 1) * 100
    print(f"plugin cost: {cost:+.1f}% of generation time (target <= 2%): "
          f"{'met' if cost <= 2 else 'NOT met'}")

    probes = startup_cost(args.startup_samples)
    reg = statistics.median(p["register_s"] for p in probes) * 1000
    imp = statistics.median(p["vllm_imports_s"] for p in probes) * 1000
    print(f"\nstart-up: register() {reg:.1f} ms median of {len(probes)} fresh processes "
          f"(after {imp:.0f} ms of vLLM imports vLLM makes anyway); target <= 50 ms: "
          f"{'met' if reg <= 50 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
