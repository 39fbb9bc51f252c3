"""End to end: vLLM (CPU build) generating with a tiny local model through fl-dispatch.

Each generation runs in a fresh process (``fl_dispatch.tools.demo_run``), with the engine core and
the worker in further processes of their own, as vLLM starts them. Runs are cached per module
so that each configuration starts vLLM once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from fl_dispatch.tools.demo import run_generation
from fl_dispatch.tools.demo_model import BASE_CONFIG, build_model

pytestmark = pytest.mark.vllm

LAYERS = BASE_CONFIG["num_hidden_layers"]
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [42, 17, 256, 99], [300, 301, 302]]
MAX_TOKENS = 12
PLUGINS = str(Path(__file__).parent / "e2e_plugins")
_runs: dict[str, dict] = {}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_model("llama", root=tmp_path_factory.mktemp("models"))


def run_env() -> dict[str, str]:
    """The environment of a vLLM run: this one without fl-dispatch's, the interpreter's and
    FlagGems' variables, with debug logging and the test plugins (``e2e_plugins``) importable.
    The e2e test modules (this one, ``test_vllm_moe``, ``test_vllm_mla``) add their own."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VLLM_FL_", "TRITON_INTERPRET", "USE_FLAGGEMS"))}
    env.update(VLLM_ALLOW_INSECURE_SERIALIZATION="1", VLLM_FL_DISPATCH_DEBUG="1",
               PYTHONPATH=os.pathsep.join([PLUGINS, env.get("PYTHONPATH", "")]))
    return env


def generate(name: str, model: Path, tmp_path_factory, *, eager: bool = True, tp: int = 1,
             **env_extra: str) -> dict:
    """Run (once per name) a generation with ``env_extra`` on top of a clean environment."""
    if name not in _runs:
        env = run_env()
        if tp > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % (os.cpu_count() or 1))
                                                        for i in range(tp))
        env.update(env_extra)
        request = {"model": str(model), "eager": eager, "max_tokens": MAX_TOKENS,
                   "prompts": PROMPTS, "tensor_parallel_size": tp}
        log = tmp_path_factory.mktemp("logs") / f"{name}.log"
        _runs[name] = run_generation(request, env, name, log, quiet=True)
    return _runs[name]


def stock(model, tmp):
    """vLLM without fl-dispatch loaded at all (vLLM's own plugin allow-list excludes it)."""
    return generate("stock", model, tmp, VLLM_PLUGINS="not_fl_dispatch")


def selection_lines(result: dict) -> list[str]:
    return [line for line in Path(result["log"]).read_text().splitlines()
            if re.search(r"fl_dispatch \[INFO\] fl-dispatch rank=", line)]


def deltas(result: dict, worker: int = 0) -> dict[str, int]:
    before, after = result["counts_before"][worker], result["counts"][worker]
    return {op: after.get(op, 0) - before.get(op, 0) for op in after}


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
def test_reference_backend_matches_stock_vllm(model, tmp_path_factory, eager):
    on = generate(f"reference-{eager}", model, tmp_path_factory, eager=eager,
                  VLLM_FL_PREFER="reference", VLLM_FL_PLUGIN_MODULES="perturb_backend")
    off = generate(f"off-{eager}", model, tmp_path_factory, eager=eager,
                   VLLM_FL_PREFER_ENABLED="0")
    assert on["tokens"] == off["tokens"]
    assert all(len(t) == MAX_TOKENS for t in on["tokens"])
    # every op ran the reference in the worker (the loaded perturb backend was not selected)
    (sel,) = on["selection"]
    assert sel["selection"]["rms_norm"]["impl_id"] == "reference.torch"
    assert "VllmWorker" in sel["process"]


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
def test_dispatch_happens_in_the_worker_per_generated_token(model, tmp_path_factory, eager):
    """Each generated token is one forward step: per step, silu_and_mul and rotary run once
    per layer (compiled: its out-of-place form) and rms_norm twice per layer plus the final
    norm."""
    on = generate(f"reference-{eager}", model, tmp_path_factory, eager=eager,
                  VLLM_FL_PREFER="reference", VLLM_FL_PLUGIN_MODULES="perturb_backend")
    d = deltas(on)
    steps = d["silu_and_mul"] // LAYERS
    assert steps >= MAX_TOKENS  # at least one forward per generated token
    assert steps <= MAX_TOKENS + 2  # and not a per-call trickle from elsewhere
    assert d["silu_and_mul"] == steps * LAYERS
    # compiled graphs rotate out of place (the reference serves rotary_embedding_out too)
    rotary = "rotary_embedding" if eager else "rotary_embedding_out"
    assert d[rotary] == steps * LAYERS
    assert d.get("rotary_embedding" if not eager else "rotary_embedding_out", 0) == 0
    assert d["rms_norm"] == steps * (2 * LAYERS + 1)


def test_selected_perturbing_backend_changes_tokens(model, tmp_path_factory):
    off = generate("off-True", model, tmp_path_factory, VLLM_FL_PREFER_ENABLED="0")
    bad = generate("perturb", model, tmp_path_factory, VLLM_FL_PLUGIN_MODULES="perturb_backend",
                   VLLM_FL_PER_OP="rms_norm=vendor:perturb|reference")
    (sel,) = bad["selection"]
    assert sel["selection"]["rms_norm"]["impl_id"] == "vendor.perturb"
    assert deltas(bad)["rms_norm"] > 0
    assert bad["tokens"] != off["tokens"]


def test_disabled_plugin_is_stock_vllm(model, tmp_path_factory):
    off = generate("off-True", model, tmp_path_factory, VLLM_FL_PREFER_ENABLED="0")
    base = stock(model, tmp_path_factory)
    assert off["tokens"] == base["tokens"]
    assert selection_lines(off) == []
    assert "fl_dispatch" not in Path(off["log"]).read_text()
    assert off["counts"] in (None, [{}])  # nothing was dispatched in the worker
    assert off["selection"] in (None, [None])


def test_each_process_logs_its_selection(model, tmp_path_factory):
    on = generate("reference-True", model, tmp_path_factory, VLLM_FL_PREFER="reference",
                  VLLM_FL_PLUGIN_MODULES="perturb_backend")
    lines = selection_lines(on)
    processes = {re.search(r"process=([^\s:]+)", line).group(1) for line in lines}
    assert {"MainProcess", "EngineCore", "VllmWorker-0"} <= processes
    worker = next(line for line in lines if "VllmWorker-0" in line)
    assert "rank=0" in worker and "rms_norm->reference.torch" in worker
    # the backends' per-process set-up runs where the model is built, not in the front end
    front = next(line for line in lines if "process=MainProcess" in line)
    assert front.endswith("| backend set-up: when this process builds the model"), front
    built = [line for line in lines if "(builds the model)" in line]
    assert [re.search(r"process=([^\s:]+)", line).group(1) for line in built] == [
        "VllmWorker-0"], lines
    assert "| flagos: FlagGems" in built[0], built[0]


def test_tensor_parallel_workers_each_log_their_selection(model, tmp_path_factory):
    tp = generate("tp2", model, tmp_path_factory, tp=2, VLLM_FL_PREFER="reference")
    single = generate("reference-True", model, tmp_path_factory, VLLM_FL_PREFER="reference",
                      VLLM_FL_PLUGIN_MODULES="perturb_backend")
    assert tp["tokens"] == single["tokens"]
    workers = [line for line in selection_lines(tp) if "VllmWorker" in line]
    # each worker: its selection at plugin load, then its backends' set-up as it builds the
    # model (one line each)
    built = [line for line in workers if "(builds the model)" in line]
    ranks = sorted(re.search(r"rank=(\d+)", line).group(1) for line in built)
    assert ranks == ["0", "1"]
    pids = {re.search(r"pid=(\d+)", line).group(1) for line in built}
    assert len(pids) == 2
    assert sorted(re.search(r"rank=(\d+)", line).group(1) for line in workers) == [
        "0", "0", "1", "1"]
    assert len(tp["selection"]) == 2 and all(deltas(tp, w)["rms_norm"] > 0 for w in (0, 1))


def test_flagos_triton_kernels_run_in_vllm_under_the_interpreter(model, tmp_path_factory):
    """CPU machines run our Triton kernels with TRITON_INTERPRET=1; fp32 kernels that round
    once may differ from the reference in the last bit, so greedy tokens are compared on the
    first half, where such a difference has not had time to flip a choice."""
    fl = generate("flagos-interpret", model, tmp_path_factory, TRITON_INTERPRET="1",
                  VLLM_FL_PREFER="flagos")
    ref = generate("reference-True", model, tmp_path_factory, VLLM_FL_PREFER="reference",
                   VLLM_FL_PLUGIN_MODULES="perturb_backend")
    (sel,) = fl["selection"]
    for op in ("silu_and_mul", "rms_norm", "rotary_embedding"):
        assert sel["selection"][op]["impl_id"] == "default.flagos", op
        assert deltas(fl)[op] > 0, op
    assert sel["demoted"] == {}  # nothing fell back to the reference
    half = MAX_TOKENS // 2
    assert [t[:half] for t in fl["tokens"]] == [t[:half] for t in ref["tokens"]]


def test_tiny_moe_model_matches_stock_vllm(tmp_path_factory):
    """Qwen2-MoE: the shared expert's SiluAndMul, the norms and rotary go through
    fl-dispatch; vLLM's fused MoE experts stay vLLM's own."""
    moe = build_model("qwen2_moe", root=tmp_path_factory.mktemp("moe"))
    on = generate("moe-on", moe, tmp_path_factory, VLLM_FL_PREFER="reference")
    off = generate("moe-off", moe, tmp_path_factory, VLLM_FL_PREFER_ENABLED="0")
    assert on["tokens"] == off["tokens"]
    d = deltas(on)
    assert d["silu_and_mul"] > 0 and d["rms_norm"] > 0 and d["rotary_embedding"] > 0


def test_compiled_reference_without_counting_is_traced_and_matches_stock(model, tmp_path_factory):
    """Production mode (no call counting): the compiler traces the plain-PyTorch reference
    and fuses it like vLLM's native code; the tokens stay stock vLLM's."""
    traced = generate("reference-traced", model, tmp_path_factory, eager=False,
                      VLLM_FL_PREFER="reference", VLLM_FL_DISPATCH_DEBUG="0")
    off = generate("off-False", model, tmp_path_factory, eager=False,
                   VLLM_FL_PREFER_ENABLED="0")
    assert traced["tokens"] == off["tokens"]
    (sel,) = traced["selection"]
    assert sel["selection"]["rms_norm"]["impl_id"] == "reference.torch"
