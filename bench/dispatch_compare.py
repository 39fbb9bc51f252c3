#!/usr/bin/env python
"""Dispatch overhead before/after a change, measured in one run on one machine.

Runs each tree's own ``bench/dispatch_overhead.py`` in a fresh subprocess, the trees
alternating (ABBA order, so slow drift of the machine's load hits them alike), for ``--rounds``
rounds, and compares, per case and way of calling, the overhead over a direct call (the
bench's "diff ns" columns: medians of paired per-round differences). Per tree the table gives
the min over processes of those medians (the least disturbed run), their median and max (the
spread); "difference" is after minus before, of the mins (and, in parentheses, the medians).

Each subprocess imports ``fl_dispatch`` from its tree: ``PYTHONPATH`` puts the tree first
(ahead of the editable install's finder, which ``sys.meta_path`` consults after the path),
and a folder of symbolic links gives the tree's backends the names that the install's
package-dir mapping gives them (``fl_dispatch_flagos`` -> ``backends/flagos``, ...; as
bench/_gpu_env.py does). Without the links, an old tree's dispatcher would load the installed
(new) backends through the ``fl_dispatch.backends`` entry points. A preflight in each tree's
environment checks where ``fl_dispatch`` and the backends resolve.

Typical use (the "before" tree a worktree of the commit before the change)::

    git worktree add /tmp/fl_before e779850
    .venv/bin/python bench/dispatch_compare.py --before /tmp/fl_before --after . --rounds 8
    git worktree remove /tmp/fl_before --force

More trees can be added with ``--tree LABEL=PATH`` (e.g. HEAD as committed, from
``git archive``); they are measured in the same rounds and compared against ``--before``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKEND_NAMES = {  # the package-dir mapping of pyproject.toml
    "fl_dispatch_reference": "backends/reference",
    "fl_dispatch_flagos": "backends/flagos",
    "fl_dispatch_cuda": "backends/cuda",
    "fl_dispatch_ascend": "backends/ascend",
    "fl_dispatch_platforms": "config",
}
WAYS = {"attr": "ops.<op>", "held": "get_op() held", "site": "fast.<op> call-site guard"}
ROW = re.compile(r"^\| (single|fallback|strict) \|")


def tree_env(tree: Path, shim_root: Path) -> dict[str, str]:
    """Environment in which ``import fl_dispatch`` (and its backends) resolve to ``tree``."""
    shim = shim_root / re.sub(r"[^A-Za-z0-9_.-]", "_", str(tree).strip("/"))
    shim.mkdir(parents=True, exist_ok=True)
    for name, rel in BACKEND_NAMES.items():
        if (tree / rel).is_dir() and not (shim / name).exists():
            (shim / name).symlink_to(tree / rel, target_is_directory=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VLLM_FL_") and k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(shim)])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def preflight(tree: Path, env: dict[str, str]) -> str:
    """Check that the tree's own ``fl_dispatch`` and backends are the ones imported."""
    code = ("import importlib, os, sys\n"
            "names = ['fl_dispatch'] + sys.argv[1:]\n"
            "for n in names:\n"
            "    m = importlib.import_module(n)\n"
            "    print(n, os.path.realpath(os.path.dirname(m.__file__)))\n")
    names = [n for n, rel in BACKEND_NAMES.items() if (tree / rel).is_dir()]
    out = subprocess.run([sys.executable, "-c", code, *names], env=env, cwd=tree,
                         capture_output=True, text=True, check=True).stdout
    real = os.path.realpath(tree)
    for line in out.splitlines():
        name, path = line.split(" ", 1)
        if not (path + os.sep).startswith(real + os.sep):
            raise SystemExit(f"{tree}: {name} resolves to {path}, outside the tree")
    return out


def describe(tree: Path) -> str:
    """Commit and cleanliness of a tree (read-only git; no lock taken)."""
    git = ["git", "--no-optional-locks", "-C", str(tree)]
    try:
        rev = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        top = subprocess.run(git + ["rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "not a git checkout"
    if os.path.realpath(top) != os.path.realpath(tree):
        return "not a git checkout (inside another repository)"
    dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.split("\n")
    dirty = [ln[3:] for ln in dirty if ln.strip()]
    return f"commit {rev}" + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")


def run_bench(tree: Path, env: dict[str, str], number: int, repeat: int
              ) -> dict[str, dict[str, float]]:
    """One fresh process of the tree's bench: ``{case: {"direct": ns, way: diff ns}}``."""
    cmd = [sys.executable, str(tree / "bench" / "dispatch_overhead.py"), "--number",
           str(number), "--repeat", str(repeat)]
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: bench failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, dict[str, float]] = {}
    for line in proc.stdout.splitlines():
        if not ROW.match(line):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        case, nums = cells[0], [float(c) for c in cells[2:]]
        row = {"direct": nums[0]}
        for i, way in enumerate(WAYS):  # (ns, diff ns) pairs after direct
            if 2 + 2 * i < len(nums):
                row[way] = nums[2 + 2 * i]
        result[case] = row
    if not result:
        raise SystemExit(f"{tree}: no table in the bench output:\n{proc.stdout[-3000:]}")
    return result


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f
                         if ln.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the tree before the change")
    parser.add_argument("--after", type=Path, default=ROOT, help="the tree after (default: this)")
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH",
                        help="a further tree measured in the same rounds")
    parser.add_argument("--rounds", type=int, default=8, help="processes per tree")
    parser.add_argument("--number", type=int, default=500_000, help="calls per bench round")
    parser.add_argument("--repeat", type=int, default=15, help="bench rounds per process")
    parser.add_argument("--contended", type=float, default=1.25,
                        help="a process whose direct call is over this factor of the fastest "
                             "process's counts as contended (left out when each tree has an "
                             "uncontended one)")
    parser.add_argument("--pause", type=float, default=1.0,
                        help="seconds between processes (keeps the machine's load down)")
    args = parser.parse_args(argv)

    trees: dict[str, Path] = {"before": args.before.resolve(), "after": args.after.resolve()}
    for item in args.tree:
        label, _, path = item.partition("=")
        trees[label] = Path(path).resolve()

    print(f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"cpu: {cpu_model()}; nproc: {usable}")
    print(f"python: {platform.python_implementation()} {platform.python_version()} "
          f"({sys.executable}); {platform.system()} {platform.release()}")
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"{args.rounds} processes per tree, alternating (ABBA); each: "
          f"bench/dispatch_overhead.py --number {args.number} --repeat {args.repeat}")
    loads: list[tuple[float, float, float]] = [os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="fl_dispatch_compare_") as tmp:
        envs = {}
        for label, tree in trees.items():
            envs[label] = tree_env(tree, Path(tmp))
            resolved = preflight(tree, envs[label])
            print(f"\n{label}: {tree} ({describe(tree)})")
            print("  " + resolved.strip().replace("\n", "\n  "))
        results: dict[str, list[dict[str, dict[str, float]]]] = {k: [] for k in trees}
        labels = list(trees)
        started = time.monotonic()
        for rnd in range(args.rounds):
            order = labels if rnd % 2 == 0 else labels[::-1]
            for label in order:
                results[label].append(run_bench(trees[label], envs[label], args.number,
                                                args.repeat))
                loads.append(os.getloadavg())
                time.sleep(args.pause)
            print(f"round {rnd + 1}/{args.rounds} done ({time.monotonic() - started:.0f} s; "
                  f"load {loads[-1][0]:.2f})", file=sys.stderr)

    one = [x[0] for x in loads]
    print(f"\nload average (1 min) over the run: {min(one):.2f}..{max(one):.2f} "
          f"(median {statistics.median(one):.2f}; sampled after each process); "
          f"5 min at the end {loads[-1][1]:.2f}")
    # A process that shared its core with other work shows it in every figure, the direct
    # call included (on 2 cores under load ~2x: 25 -> 50 ns): keep the processes whose direct
    # call (median over the cases) is within --contended of the fastest one's.
    def direct_ns(r: dict[str, dict[str, float]]) -> float:
        return statistics.median(row["direct"] for row in r.values())

    fastest = min(direct_ns(r) for rs in results.values() for r in rs)
    print(f"\nfastest process's direct call: {fastest:.1f} ns; a process counts as contended "
          f"when its direct call is over {args.contended:.2f}x that")
    kept: dict[str, list[dict[str, dict[str, float]]]] = {}
    for label, rs in results.items():
        quiet = [r for r in rs if direct_ns(r) <= args.contended * fastest]
        print(f"  {label}: {len(quiet)} of {len(rs)} processes uncontended (direct ns per "
              f"process: {', '.join(f'{direct_ns(r):.1f}' for r in rs)})")
        kept[label] = quiet
    if all(kept.values()):
        print("  the table uses the uncontended processes only")
        results = kept
    else:
        print("  some tree has no uncontended process: the table uses all processes")

    print("\nns over a direct call of the impl (the bench's diff columns; 'direct' rows: ns "
          "of the direct call itself). Per tree: min / median / max over its processes of each "
          "process's median. Difference: of the mins (of the medians)\n")
    others = [k for k in trees if k != "before"]
    head = "| case | way | before: min / med / max |"
    for k in others:
        head += f" {k}: min / med / max | {k} - before |"
    print(head)
    print("|---|---|" + "---:|" * (head.count("|") - 3))
    for case in results["before"][0]:
        for way in ["direct", *WAYS]:
            series = {k: [r[case][way] for r in results[k] if way in r.get(case, {})]
                      for k in trees}
            if not all(series.values()):
                continue
            fmt = ".1f" if way == "direct" else "+.1f"
            cells = []
            for k in trees:
                s = series[k]
                cells.append(" / ".join(f"{v:{fmt}}" for v in
                                        (min(s), statistics.median(s), max(s))))
                if k != "before":
                    b = series["before"]
                    cells.append(f"{min(s) - min(b):+.1f} "
                                 f"({statistics.median(s) - statistics.median(b):+.1f})")
            name = "direct" if way == "direct" else WAYS[way]
            print(f"| {case} | {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
