"""Run every benchmark, one after another (never two at once), then redraw the chart.

    python -m bench.run_all            # full sizes (the worker comparisons take ~20 min)
    python -m bench.run_all --smoke    # every benchmark at its smoke size

Each benchmark prints its own markdown table; the comparison ones also write
bench/.out/<name>.json, from which bench/results.png is drawn. A benchmark that
fails is reported and the others still run; the exit code says whether all passed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.worker_env import REPO_ROOT

FULL = [
    ["bench.cold_import", "--runs", "10"],
    ["bench.lambda_package", "--runs", "10"],
    ["bench.scheduled_lateness"],
    ["bench.latency"],
    ["bench.throughput"],
    ["bench.scaling"],
    ["bench.api_calls"],
]
SMOKE = [
    ["bench.cold_import", "--runs", "2"],
    ["bench.lambda_package", "--runs", "1"],
    ["bench.scheduled_lateness", "--smoke"],
    ["bench.latency", "--smoke"],
    ["bench.throughput", "--smoke"],
    ["bench.scaling", "--smoke"],
    ["bench.api_calls", "--smoke"],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", help="comma-separated module names (e.g. latency,throughput)")
    args = parser.parse_args()
    plan = SMOKE if args.smoke else FULL
    if args.only:
        wanted = {f"bench.{name.removeprefix('bench.')}" for name in args.only.split(",")}
        plan = [step for step in plan if step[0] in wanted]
    failed = []
    if any(step[0] in ("bench.latency", "bench.throughput") for step in plan):
        plan = [*plan, ["bench.chart"]]  # drawn from what latency and throughput wrote
    for step in plan:
        print(f"\n## python -m {' '.join(step)}\n", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, "-m", *step], cwd=REPO_ROOT)
        print(f"\n({step[0]}: exit {code}, {time.monotonic() - started:.0f} s)", flush=True)
        if code != 0:
            failed.append(step[0])
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
