"""Reporting for ``fl-dispatch bench``: the table, the ranking, a PNG chart, and a policy file
ordering each op's impls by measured speed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fl_dispatch.core.impl import Impl
    from fl_dispatch.core.registry import Registry

    from .bench_measure import BenchResult


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(result: BenchResult) -> str:
    """The results, one line per impl and size, grouped by op case and size."""
    header = ("op", "tokens", "impl", "us", "GB/s", "TFLOP/s", "% copy", "vs best other",
              "note")
    rows = []
    for m in result.measurements:
        ratio = "-" if m.ratio_to_best_other is None else f"{m.ratio_to_best_other:.3g}x"
        us = _num(m.us, ".2f") if m.status == "ok" else m.status.upper()
        rows.append((m.case, str(m.tokens), m.impl, us, _num(m.gbs, ".1f"),
                     _num(m.tflops, ".1f"), _num(m.pct_copy, ".0f"), ratio, m.note))
    widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(len(header))]
    right = {1, 3, 4, 5, 6, 7}

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [fmt(header)]
    previous = None
    for m, row in zip(result.measurements, rows):
        if previous is not None and m.case != previous:
            lines.append("")
        previous = m.case
        lines.append(fmt(row))
    return "\n".join(lines)


def summary_lines(result: BenchResult) -> list[str]:
    dev = result.device
    lines = [f"device: {dev['name']} ({dev['type']}), copy bandwidth {dev['copy_gbs']:.1f} GB/s "
             f"(copy of {dev['copy_buffer_bytes'] >> 20} MiB, read + write)",
             f"dtype {result.dtype}; timing: {result.timing}",
             "us: time per call; GB/s: minimal bytes moved / time; % copy: of the copy "
             "bandwidth; vs best other: time / best other impl's time (< 1: faster)"]
    return lines


def ranking_lines(result: BenchResult) -> list[str]:
    lines = ["fastest per op (geometric mean of time / best time over the sizes timed):"]
    for op, ranked in result.ranking.items():
        order = ", ".join(f"{r['impl']} ({r['score']:.2f})" for r in ranked)
        lines.append(f"  {op:<18} {order}")
    for op, ids in result.excluded.items():
        lines.append(f"  {op:<18} left out (raised): {', '.join(ids)}")
    for op in result.no_input_generator:
        lines.append(f"  {op:<18} not timed: no input generator")
    cut = [m for m in result.measurements if m.note.startswith("not run: --time-limit-s")]
    if cut:
        ops = ", ".join(dict.fromkeys(m.op for m in cut))
        lines.append(f"  time limit reached: {len(cut)} of {len(result.measurements)} runs not "
                     f"made ({ops}); the ranking of those ops rests on the sizes timed")
    return lines


def write_png(result: BenchResult, path: str | Path) -> None:
    """Time per call and bandwidth against tokens, one column per op case, one line per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(m.case for m in result.measurements))
    fig, axes = plt.subplots(2, max(1, len(cases)), figsize=(4.2 * max(1, len(cases)), 7),
                             squeeze=False)
    copy_gbs = result.device.get("copy_gbs")
    for col, case in enumerate(cases):
        top, bottom = axes[0][col], axes[1][col]
        points = [m for m in result.measurements if m.case == case and m.status == "ok"]
        for impl in dict.fromkeys(m.impl for m in points):
            mine = sorted((m for m in points if m.impl == impl), key=lambda m: m.tokens)
            tokens = [m.tokens for m in mine]
            top.plot(tokens, [m.us for m in mine], marker="o", label=impl)
            bottom.plot(tokens, [m.gbs for m in mine], marker="o", label=impl)
        if copy_gbs:
            bottom.axhline(copy_gbs, color="grey", linestyle="--", label="device copy")
        top.set_title(case)
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
        top.set_yscale("log")
        top.set_ylabel("us per call")
        bottom.set_ylabel("GB/s")
        bottom.set_xlabel("tokens")
        bottom.legend(fontsize="small")
    fig.suptitle(f"fl-dispatch bench: {result.device['name']}, {result.dtype}, "
                 f"{result.date}")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def op_order(ranked: Sequence[Impl]) -> list[str]:
    """Policy tokens for impls in speed order: ``impl:<id>`` each, the reference kind last
    (as the ``reference`` token, the fallback of last resort)."""
    tokens = [f"impl:{i.impl_id}" for i in ranked]
    if ranked and ranked[-1].kind == "reference" and len(ranked) > 1:
        tokens[-1] = "reference"
    elif not any(i.kind == "reference" for i in ranked):
        tokens.append("reference")
    return tokens


def write_config(result: BenchResult, registry: Registry, path: str | Path,
                 platform: str | None) -> dict[str, list[str]]:
    """Write a YAML policy ordering each benchmarked op's impls by speed, then validate it as
    ``VLLM_FL_CONFIG``. The detected platform file's other keys are carried over (the file
    replaces the whole policy, so they would otherwise be lost). Returns the op orders."""
    import yaml

    from fl_dispatch.core.config import platform_file, resolve_policy
    from fl_dispatch.core.errors import ConfigError

    orders = {}
    for op, ranked in result.ranking.items():
        impls = [registry.impl(op, r["impl"]) for r in ranked]
        orders[op] = op_order([i for i in impls if i is not None])
    carried: dict[str, Any] = {}
    carried_from = None
    if platform is not None:
        carried_from = platform_file(platform)
        carried = yaml.safe_load(carried_from.read_text(encoding="utf-8")) or {}
    data = {k: v for k, v in carried.items() if k != "op_backends"}
    data["op_backends"] = {**(carried.get("op_backends") or {}), **orders}
    dev = result.device
    header = [
        "# fl-dispatch policy written by `fl-dispatch bench --write-config`:",
        "# each op's impls in order of measured speed (fastest first), reference last.",
        f"# device: {dev['name']} ({dev['type']}); dtype {result.dtype}; date {result.date}",
        f"# tokens: decode {result.decode}, prefill {result.prefill}; {result.timing}",
        "# use: VLLM_FL_CONFIG=<this file> (it replaces the whole policy; check it with",
        "#      `fl-dispatch check <this file>`)",
    ]
    if carried_from is not None:
        header.append(f"# other keys carried over from the platform file {carried_from}")
    text = "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False)
    Path(path).write_text(text, encoding="utf-8")
    policy = resolve_policy({"VLLM_FL_CONFIG": str(path)}, detect=lambda: None)
    problems = registry.policy_problems(policy)
    if problems:
        raise ConfigError(problems)
    return orders
