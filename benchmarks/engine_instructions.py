"""Engine overhead in CPU instructions: this tree against another, load-independent.

Timings on a shared machine move by tens of percent between runs of the same tree; an
instruction count does not. This runs ``engine_overhead.py``'s workload (FedAvg, 100
trivial clients, 100 float32 parameters, one thread worker) under ``valgrind
--tool=callgrind`` and reports instructions per client-round: the fedhive run minus the
plain loop, each taken as the difference between a short and a longer run, so imports and
start-up cancel out. Instructions are not seconds (cache misses, lock waits and system
calls weigh differently), so this complements the timed benchmark; it does not replace it.

Run (valgrind from Debian's package; several minutes per tree)::

    git worktree add ../fedhive-before 7230b94
    .venv/bin/python benchmarks/engine_instructions.py --baseline ../fedhive-before
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKLOAD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("eo", {script!r})
eo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eo)
eo.run_fedhive(2, 100, 1)  # imports and first-run costs, in both measurements
if sys.argv[1] == "fedhive":
    eo.run_fedhive(int(sys.argv[2]), 100, 1)
else:
    eo.run_plain(int(sys.argv[2]), 100)
"""
CLIENTS = 100


def instructions(tree: Path, mode: str, rounds: int) -> int:
    """Instructions of one run of the workload with ``tree``'s fedhive on the path."""
    code = WORKLOAD.format(script=str(HERE / "engine_overhead.py"))
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    valgrind = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    out = subprocess.run(
        [*valgrind, sys.executable, "-c", code, mode, str(rounds)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    match = re.search(r"Collected : (\d+)", out.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{out.stderr[-2000:]}")
    return int(match.group(1))


def per_client_round(tree: Path, mode: str, low: int, high: int) -> float:
    span = instructions(tree, mode, high) - instructions(tree, mode, low)
    return span / ((high - low) * CLIENTS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout")
    parser.add_argument("--rounds", type=int, nargs=2, default=[2, 7], metavar=("LOW", "HIGH"))
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    low, high = args.rounds
    this = HERE.parent
    plain = per_client_round(this, "plain", low, high)
    rows = []
    for name, tree in (("baseline", args.baseline.resolve()), ("this tree", this)):
        total = per_client_round(tree, "fedhive", low, high)
        rows.append((name, total, total - plain))
    print(f"instructions per client-round ({CLIENTS} clients, rounds {high} - {low})\n")
    print(f"{'tree':<10}  {'fedhive':>10}  {'overhead':>10}  ratio")
    for name, total, overhead in rows:
        print(f"{name:<10}  {total:>10,.0f}  {overhead:>10,.0f}  {overhead / rows[0][2]:.3f}")
    print(f"{'plain loop':<10}  {plain:>10,.0f}")
    script = "benchmarks/engine_instructions.py"
    print(f"\nReproduce: .venv/bin/python {script} --baseline {args.baseline}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
