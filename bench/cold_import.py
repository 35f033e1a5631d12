"""Cold start: how long a fresh interpreter takes to import the dispatcher,
beside `import prefect` (what every cold start would pay if the dispatcher
imported it).

    python -m bench.cold_import [--runs 10]

Reports the median wall time of `python -c "import X"` over fresh processes,
and the cumulative import time of X itself from `python -X importtime`.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time

MODULES = ("dispatcher.aws_lambda", "dispatcher.http", "dispatcher.dispatch", "dispatcher.cli", "prefect")


def wall_seconds(module: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return time.perf_counter() - started


def importtime_seconds(module: str) -> float:
    """The cumulative microseconds `-X importtime` reports for the module itself."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True, check=True
    )
    cumulative = 0
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s?( *)(\S+)", line)
        if match and match.group(3) == module and not match.group(2):
            cumulative = max(cumulative, int(match.group(1)))
    return cumulative / 1e6


def measure(runs: int) -> list[tuple[str, float, float]]:
    rows = []
    for module in MODULES:
        wall_seconds(module)  # warm the file cache, as a reused Lambda image would be
        walls = [wall_seconds(module) for _ in range(runs)]
        own = statistics.median(importtime_seconds(module) for _ in range(min(runs, 5)))
        rows.append((module, statistics.median(walls), own))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    baseline = wall_seconds("sys")
    print(f"python {sys.version.split()[0]}; empty interpreter start {baseline:.3f} s")
    print("| module | median wall of `python -c 'import M'` (s) | import of M alone, -X importtime (s) |")
    print("|---|---|---|")
    for module, wall, own in measure(args.runs):
        print(f"| `{module}` | {wall:.3f} | {own:.3f} |")


if __name__ == "__main__":
    main()
