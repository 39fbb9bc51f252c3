"""Write measured launch choices into the flagos tuning tables, in place.

    python3 bench/apply_tuning.py [--kernels DIR/sweep.json] [--align DIR/moe_align_variants.json]

``--kernels``: the ``tuned`` entry of ``bench/kernels.py --sweep`` becomes ``TUNED`` in
``backends/flagos/ops.py`` (keyed by the device the sweep ran on). ``--align``: the suggested
plan of ``bench/moe_routing.py --align-variants`` becomes ``ALIGN_PLAN`` in
``backends/flagos/moe_routing.py``, unless a variant it names failed a correctness check
anywhere in that run (then the table is left as it is, and the reason printed). Prints what it
changed; exit status 0 even when it changed nothing (the GPU run goes on with the old tables).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "backends/flagos/ops.py"
ROUTING = ROOT / "backends/flagos/moe_routing.py"


def apply_kernels(path: Path, device: str) -> str:
    data = json.loads(path.read_text())
    tuned = data.get("tuned")
    if not tuned:
        return f"{path}: no 'tuned' entry: TUNED unchanged"
    body = "".join(f"        {kind!r}: (\n" + "".join(f"            ({m}, {tuple(c)!r}),\n"
                                                 for m, c in rows) + "        ),\n"
                   for kind, rows in tuned.items())
    text = OPS.read_text()
    pat = re.compile(r"^(TUNED: dict\[[^\n]*\] = )\{.*?^\}$|^(TUNED: dict\[[^\n]*\] = )\{\}$",
                     re.S | re.M)
    m = pat.search(text)
    if m is None:
        return f"{OPS}: no TUNED assignment found: unchanged"
    head = m.group(1) or m.group(2)
    new = f"{head}{{\n    {device!r}: {{  # bench/kernels.py --sweep\n{body}    }},\n}}"
    OPS.write_text(text[:m.start()] + new + text[m.end():])
    return f"TUNED[{device!r}] <- {path} ({', '.join(tuned)})"


def apply_align(path: Path) -> str:
    data = json.loads(path.read_text())
    data = data.get("align_variants", data)  # the bench nests its result under this key
    plan, problems = data.get("plan"), data.get("problems", [])
    if not plan:
        return f"{path}: no plan: ALIGN_PLAN unchanged"
    used = {row[1] for row in plan}
    # problem lines start with the label "variant[:bBLOCK][:wWARPS]"
    bad = [p for p in problems if p.split()[0].split(":")[0] in used]
    if bad:
        return f"ALIGN_PLAN unchanged: the plan's variants failed checks: {bad[:3]}"
    rows = "".join(f"    ({'_INT32_MAX' if r[0] is None else r[0]}, {r[1]!r}, {r[2]}, {r[3]}),\n"
                   for r in plan)
    text = ROUTING.read_text()
    pat = re.compile(r"^(ALIGN_PLAN: tuple\[[^\n]*\] = \()\n.*?^\)$", re.S | re.M)
    m = pat.search(text)
    if m is None:
        return f"{ROUTING}: no ALIGN_PLAN assignment found: unchanged"
    ROUTING.write_text(text[:m.start()] + m.group(1) + "\n" + rows + ")" + text[m.end():])
    return f"ALIGN_PLAN <- {path}: {plan}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", type=Path)
    ap.add_argument("--align", type=Path)
    ap.add_argument("--device", default="H200", help="TUNED key (a device-name substring)")
    args = ap.parse_args()
    for path, fn in ((args.kernels, lambda p: apply_kernels(p, args.device)),
                     (args.align, apply_align)):
        if path is None:
            continue
        if not path.exists():
            print(f"{path}: missing: unchanged")
            continue
        print(fn(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
