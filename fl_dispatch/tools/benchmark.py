"""``fl-dispatch bench``: time every available impl of every tensor op, side by side, in one run.

GPU (CUDA): time per call under CUDA graph replay (``triton.testing.do_bench_cudagraph``,
median; without Triton, torch.cuda graphs and events). CPU and other devices: wall time per
call with ``time.perf_counter`` after a device synchronize, median. Bandwidth is the op's
minimal bytes moved (:mod:`fl_dispatch.testing.inputs`) over the time, also as a percentage of a
device-to-device copy of a large buffer measured in the same run. Results go to a table, a JSON
file, a PNG chart, and (``--write-config``) a YAML policy ordering each op's impls by speed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .bench_measure import bench
from .bench_report import format_table, ranking_lines, summary_lines, write_config, write_png
from .common import ToolError, add_op_and_device, fail, load, split


# --------------------------------------------------------------------------- command
def parse_sizes(text: str, flag: str) -> list[int]:
    """``"1,16,64"`` as positive ints; ValueError naming ``flag`` and the bad item."""
    sizes = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(f"{flag}: {item!r} is not a positive token count "
                             f"(expected a comma-separated list like 1,16,64)")
        sizes.append(value)
    return sizes


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark; exit 0, or 2 on misuse or an invalid written config."""
    from fl_dispatch.core.errors import ConfigError
    from fl_dispatch.testing.inputs import Dims, parse_dtype, resolve_device

    try:
        dtype = parse_dtype(args.dtype)
        device = resolve_device(args.device)
        decode = parse_sizes(args.decode, "--decode")
        prefill = parse_sizes(args.prefill, "--prefill")
        dims = Dims(args.hidden, args.intermediate, args.heads, args.kv_heads, args.head_size,
                    args.experts, args.topk, args.moe_intermediate, args.expert_groups,
                    args.mla_heads, args.kv_len)
        for name, value in asdict(dims).items():
            if value <= 0:
                raise ValueError(f"--{name.replace('_', '-')}: {value} must be positive")
        if dims.head_size % 2:
            raise ValueError(f"--head-size: {dims.head_size} must be even (rotary pairs)")
        if dims.topk > dims.experts:
            raise ValueError(f"--topk: {dims.topk} exceeds --experts {dims.experts}")
        if dims.experts % dims.expert_groups or dims.experts // dims.expert_groups < 2:
            raise ValueError(f"--expert-groups: {dims.expert_groups} must divide --experts "
                             f"{dims.experts} into groups of at least 2")
        if args.repeats is not None and args.repeats <= 0:
            raise ValueError(f"--repeats: {args.repeats} must be positive")
        if args.time_limit_s is not None and args.time_limit_s <= 0:
            raise ValueError(f"--time-limit-s: {args.time_limit_s:g} must be positive")
        if not decode and not prefill:
            raise ValueError("nothing to time: --decode and --prefill are both empty")
        loaded = load(split(args.op))
    except (ValueError, ToolError) as exc:
        return fail("bench", str(exc))
    policy, registry = loaded.policy, loaded.registry
    for record in loaded.plugins.errors:
        print(f"fl-dispatch bench: plugin {record.name!r} failed to load ({record.source}): "
              f"{record.error}", file=sys.stderr)
    ops = loaded.ops
    if ops is None:  # ops with benchmark cases first
        specs = registry.ops.values()
        ops = [s.name for s in specs if s.bench_cases] + [s.name for s in specs
                                                          if not s.bench_cases]
    result = bench(registry, device, dtype, dims, decode, prefill, ops, args.repeats,
                   time_limit_s=args.time_limit_s)
    print("\n".join(summary_lines(result)))
    print()
    print(format_table(result))
    print()
    print("\n".join(ranking_lines(result)))
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=2) + "\n",
                                   encoding="utf-8")
        print(f"wrote {args.json}")
    if args.png:
        write_png(result, args.png)
        print(f"wrote {args.png}")
    if args.write_config:
        try:
            write_config(result, registry, args.write_config, policy.platform.value)
        except ConfigError as exc:
            return fail("bench", f"the written config {args.write_config} is not valid: {exc}")
        print(f"wrote {args.write_config} (valid as VLLM_FL_CONFIG)")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``bench`` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser(
        "bench", help="time every available impl of each op, side by side",
        description="Time every available impl of each tensor op at decode and prefill sizes "
                    "on this device (CUDA graph replay on a GPU), with bandwidth against the "
                    "device's copy bandwidth; write a table, JSON, a PNG chart and a policy.")
    add_op_and_device(p)
    p.add_argument("--dtype", default="bf16", help="fp32, fp16 or bf16 (default: bf16)")
    p.add_argument("--decode", default="1,16,64,256", metavar="T,T,...",
                   help="decode token counts (default: 1,16,64,256)")
    p.add_argument("--prefill", default="4096,16384", metavar="T,T,...",
                   help="prefill token counts (default: 4096,16384; '' for none)")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size (rms_norm)")
    p.add_argument("--intermediate", type=int, default=14336,
                   help="MLP intermediate size (silu/gelu_and_mul output width)")
    p.add_argument("--heads", type=int, default=32, help="query heads (rotary)")
    p.add_argument("--kv-heads", type=int, default=8, help="key heads (rotary)")
    p.add_argument("--head-size", type=int, default=128, help="head size (rotary, full)")
    p.add_argument("--experts", type=int, default=8, help="MoE experts (default: Mixtral's 8)")
    p.add_argument("--topk", type=int, default=2, help="MoE routes per token")
    p.add_argument("--moe-intermediate", type=int, default=14336,
                   help="intermediate size of one expert (fused_experts)")
    p.add_argument("--expert-groups", type=int, default=4,
                   help="expert groups of grouped_topk (half of them kept)")
    p.add_argument("--mla-heads", type=int, default=16,
                   help="flash_mla query heads (16: DeepSeek with tensor parallel 8)")
    p.add_argument("--kv-len", type=int, default=4096,
                   help="flash_mla mean cache length (tokens: the decode batch)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per measurement (default: 20 on CPU, within ~1 s; "
                        "10 graph replays on CUDA)")
    p.add_argument("--time-limit-s", type=float, default=None, metavar="S",
                   help="start no measurement after S seconds (scarce GPU time): the rest "
                        "are reported as not run, and the ranking and --write-config rest on "
                        "what was measured")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--png", metavar="FILE", help="write a chart (PNG)")
    p.add_argument("--write-config", metavar="FILE",
                   help="write a YAML policy (VLLM_FL_CONFIG) ordering impls by speed")
    p.set_defaults(func=cmd_bench)
