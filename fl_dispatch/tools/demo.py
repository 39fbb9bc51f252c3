"""``fl-dispatch demo``: vLLM generating with a tiny local model through fl-dispatch.

Runs the prompts twice, each in a fresh process: with the plugin (showing the selection, the
per-op call counts of the worker, the tokens and the time) and with the plugin off (stock
vLLM), then compares the tokens. With the reference backend they must match exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .demo_model import FAMILIES, build_model, cache_root, run_options
from .demo_run import RESULT_MARK

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [42, 17, 256, 99], [300, 301, 302], [5, 400, 5, 400, 5]]


class Progress:
    """A one-line elapsed-time indicator on stderr while a child process runs."""

    FRAMES = "|/-\\"

    def __init__(self, label: str, quiet: bool = False):
        self.label = label
        self.quiet = quiet
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self.tty = sys.stderr.isatty()

    def _spin(self) -> None:
        start, i = time.monotonic(), 0
        while not self._stop.wait(0.2 if self.tty else 10.0):
            elapsed = time.monotonic() - start
            if self.tty:
                sys.stderr.write(f"\r{self.FRAMES[i % 4]} {self.label} ... {elapsed:5.1f} s")
            else:
                sys.stderr.write(f"  {self.label} ... {elapsed:.0f} s\n")
            sys.stderr.flush()
            i += 1

    def __enter__(self) -> Progress:
        if not self.quiet:
            sys.stderr.write(f"{self.label} ...\n" if not self.tty else "")
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if not self.quiet and self._thread.is_alive():
            self._thread.join()
        if self.tty and not self.quiet:
            sys.stderr.write("\r" + " " * (len(self.label) + 20) + "\r")


def run_generation(request: dict[str, Any], env: dict[str, str], label: str,
                   log_path: Path, quiet: bool = False, timeout: float = 900) -> dict[str, Any]:
    """Run ``demo_run`` in a child process; return its result (raise with the log tail)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fl_dispatch.tools.demo_run", json.dumps(request)]
    with open(log_path, "w") as log, Progress(label, quiet):
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                              timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
            result["log"] = str(log_path)
            return result
    tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-40:])
    raise RuntimeError(f"{label} failed (exit {proc.returncode}); log {log_path}:\n{tail}")


def child_env(args: argparse.Namespace, plugin: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with our functions
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if not plugin:
        env["VLLM_FL_PREFER_ENABLED"] = "0"
        return env
    env["VLLM_FL_PREFER_ENABLED"] = "1"
    env["VLLM_FL_DISPATCH_DEBUG"] = "1"
    if args.per_op:
        env["VLLM_FL_PER_OP"] = args.per_op
    if args.prefer:
        env["VLLM_FL_PREFER"] = args.prefer
    if args.interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def _print_selection(result: dict[str, Any]) -> bool:
    """Print the worker's selection; return whether every op ran the reference backend."""
    all_reference = True
    for worker, (sel, counts) in enumerate(zip(result.get("selection") or [],
                                               result.get("counts") or [])):
        print(f"\nselection in worker {worker} ({sel['process']}):")
        print(f"  {'op':<20} {'impl':<24} {'kind':<10} {'calls':>7}")
        for op, chosen in sel["selection"].items():
            impl = chosen["impl_id"] if chosen else "NONE"
            kind = chosen["kind"] if chosen else "-"
            all_reference &= kind == "reference"
            print(f"  {op:<20} {impl:<24} {kind:<10} {counts.get(op, 0):>7}")
        if sel.get("demoted"):
            print(f"  demoted after a failure: {sel['demoted']}")
    return all_reference


def cmd_demo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    model = build_model(args.family)
    built = time.perf_counter() - t0
    import vllm

    mode = "eager" if args.eager else "compiled (torch.compile)"
    print(f"fl-dispatch demo: tiny {args.family} model, vLLM {vllm.__version__}, {mode} mode")
    print(f"model: {model} (ready in {built:.1f} s)")
    request = {"model": str(model), "eager": args.eager, "max_tokens": args.max_tokens,
               "prompts": PROMPTS[: args.prompts], "tensor_parallel_size": args.tp,
               **run_options(args.family)}
    logs = cache_root() / "logs"
    on = run_generation(request, child_env(args, True), "starting vLLM with fl-dispatch",
                        logs / "demo-plugin-on.log")
    all_reference = _print_selection(on)
    n_tokens = sum(len(t) for t in on["tokens"])
    print("\ngenerated token ids (plugin on):")
    for i, toks in enumerate(on["tokens"]):
        print(f"  prompt {i}: {toks}")
    print(f"time: start-up {on['startup_s']:.1f} s, generation {on['generate_s']:.2f} s "
          f"({n_tokens} tokens, {n_tokens / max(on['generate_s'], 1e-9):.0f} tokens/s)")
    if args.no_compare:
        return 0
    off = run_generation(request, child_env(args, False), "starting stock vLLM (plugin off)",
                         logs / "demo-plugin-off.log")
    same = sum(a == b for a, b in zip(on["tokens"], off["tokens"]))
    print(f"\nplugin off (stock vLLM): start-up {off['startup_s']:.1f} s, "
          f"generation {off['generate_s']:.2f} s")
    print(f"tokens identical to stock vLLM: {same}/{len(on['tokens'])} prompts")
    if all_reference and same != len(on["tokens"]):
        print("ERROR: with the reference backend the tokens must match stock vLLM exactly")
        return 1
    if not all_reference and same != len(on["tokens"]):
        print("(non-reference kernels round differently; greedy tokens may diverge late)")
    return 0


def register(sub: Any) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser("demo", help="vLLM generating with a tiny local model through fl-dispatch")
    p.add_argument("--family", choices=sorted(FAMILIES), default="llama",
                   help="tiny model family to build (default llama)")
    p.add_argument("--per-op", help="per-op backend order, as VLLM_FL_PER_OP "
                   "(e.g. 'rms_norm=flagos|reference')")
    p.add_argument("--prefer", choices=["flagos", "vendor", "reference"],
                   help="preferred backend kind, as VLLM_FL_PREFER")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--eager", action="store_true", help="no torch.compile, no graphs")
    mode.add_argument("--compiled", dest="eager", action="store_false",
                      help="vLLM's default compiled mode (default)")
    p.add_argument("--interpret", action="store_true",
                   help="run the flagos Triton kernels on CPU under TRITON_INTERPRET=1")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompts", type=int, default=len(PROMPTS), choices=range(1, 5))
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--no-compare", action="store_true", help="skip the plugin-off run")
    p.set_defaults(func=cmd_demo)
