"""Does a sweep's time depend on how many runs are scheduled in the future?

A sweep must touch only the runs that are due (within the prefetch window):
its cost should not grow with a pool's backlog of future runs. One `ecs:push`
pool on moto; first 10 runs scheduled a day ahead, then 10,000. At each size,
`--repeats` times: create `--due` runs due now, then time one in-process
`Dispatcher.sweep` of the pool (claims and launches the due runs). Afterwards
the future runs are checked to be all still SCHEDULED with no pid.

The future runs are made by the server from a finite deployment schedule
(`RRULE:FREQ=SECONDLY;COUNT=n` + `POST /deployments/{id}/schedule`, see
bench.worker_env.schedule_runs): 10,000 in seconds, where `create_flow_run`
manages ~5 runs/s on this SQLite server (it answers 503, database locked, past
4 concurrent requests). The due runs are made with `create_flow_run`.

    python -m bench.scaling [--small 10] [--large 10000] [--due 5] [--repeats 5]
    python -m bench.scaling --smoke     # 10 vs 200 future runs, 2 due, 2 repeats
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from bench.worker_env import Stack, bench_stack, command_line, machine_header, make_push_pool, schedule_runs, write_json
from dispatcher.dispatch import Dispatcher
from dispatcher.prefect_client import PrefectClient
from dispatcher.settings import Settings


async def create_future_runs(api_url: str, deployment_id: Any, count: int, offset: int) -> float:
    """`count` runs one second apart, starting a day (+ `offset` s) from now."""
    first = datetime.now(timezone.utc) + timedelta(days=1, seconds=offset)
    return await schedule_runs(api_url, deployment_id, count, first)


async def timed_sweeps(api_url: str, pool: str, deployment_id: Any, due: int, repeats: int) -> tuple[list[float], int]:
    times: list[float] = []
    submitted = 0
    settings = Settings(api_url=api_url)
    async with PrefectClient(settings) as client:
        for _ in range(repeats):
            for _ in range(due):
                await client.create_flow_run_from_deployment(deployment_id)
            started = time.monotonic()
            summary = await Dispatcher(client, settings).sweep([pool])
            times.append(time.monotonic() - started)
            submitted += summary.submitted
    return times, submitted


async def count_runs(api_url: str, deployment_id: Any, state: str) -> int:
    async with PrefectClient(Settings(api_url=api_url)) as client:
        body = {"deployments": {"id": {"any_": [str(deployment_id)]}}, "flow_runs": {"state": {"type": {"any_": [state]}}}}
        return (await client.request("POST", "flow_runs/count", json=body)).json()


def run(stack: Stack, small: int, large: int, due: int, repeats: int) -> dict[str, Any]:
    pool, deployment, _ = asyncio.run(make_push_pool(stack, "scaling"))
    results: dict[str, Any] = {"sizes": {}}
    # One warm-up sweep (boto3 clients, task definition registered), not measured.
    asyncio.run(timed_sweeps(stack.api_url, pool.name, deployment.id, 1, 1))
    have = 0
    for size in (small, large):
        create_seconds = asyncio.run(create_future_runs(stack.api_url, deployment.id, size - have, offset=have + 60))
        have = size
        times, submitted = asyncio.run(timed_sweeps(stack.api_url, pool.name, deployment.id, due, repeats))
        results["sizes"][str(size)] = {
            "future_runs": size, "created": size if size == small else size - small, "create_seconds": create_seconds,
            "sweep_seconds": times, "median": statistics.median(times), "submitted": submitted,
            "expected": due * repeats,
        }
    results["future_still_scheduled"] = asyncio.run(count_runs(stack.api_url, deployment.id, "SCHEDULED"))
    results["pending"] = asyncio.run(count_runs(stack.api_url, deployment.id, "PENDING"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--large", type=int, default=10_000)
    parser.add_argument("--due", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="10 vs 200 future runs, 2 due, 2 repeats (for CI)")
    args = parser.parse_args()
    if args.smoke:
        args.small, args.large, args.due, args.repeats = 10, 200, 2, 2
    with bench_stack() as stack:
        results = run(stack, args.small, args.large, args.due, args.repeats)
    print(machine_header(command_line()))
    print(f"one sweep of an ecs:push pool with {args.due} runs due, beside N runs scheduled a day ahead "
          f"({args.repeats} sweeps each)\n")
    print("| future runs in the pool | sweeps | median sweep (s) | max sweep (s) | due runs submitted | creating them |")
    print("|---|---|---|---|---|---|")
    for size in results["sizes"].values():
        print(f"| {size['future_runs']:,} | {len(size['sweep_seconds'])} | {size['median']:.3f} "
              f"| {max(size['sweep_seconds']):.3f} | {size['submitted']} of {size['expected']} "
              f"| {size['created']:,} in {size['create_seconds']:.1f} s "
              f"({size['created'] / size['create_seconds']:.0f}/s) |")
    small, large = (results["sizes"][str(s)] for s in (args.small, args.large))
    results["ratio"] = large["median"] / small["median"]
    print(f"\nratio {args.large:,} / {args.small:,}: {results['ratio']:.2f}× (target ≤ 1.2×); "
          f"future runs still SCHEDULED: {results['future_still_scheduled']:,} of {args.large:,}; "
          f"PENDING: {results['pending']} (the due runs and the warm-up)")
    write_json("scaling", {"command": command_line(), "smoke": args.smoke, **vars(args), **results})


if __name__ == "__main__":
    main()
