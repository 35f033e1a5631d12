"""How fast are 1,000 runs that are due at once started?

On one embedded Prefect server and one moto (ECS tasks frozen RUNNING):

The runs are made by the server from a finite deployment schedule (bench.worker_env.schedule_runs),
one second apart and all in the past, so all are due at once and no event announces them.

- pushpool: the runs are due in an `ecs:push` pool; ONE sweep (`Dispatcher.sweep`,
  what `pushpool dispatch --once` does before its reconcile pass) runs in a fresh
  subprocess. Reported: the subprocess's wall time (interpreter start and imports
  included) and the sweep's own time, and the subprocess's peak RSS (its own
  VmHWM, read at the end: not `wait4`'s ru_maxrss, which Linux carries across
  exec, so it reports this harness's RSS — moto and all — from the moment
  before the child's exec). Once per PUSHPOOL_MAX_CONCURRENCY value.
- Prefect's ECS worker at its defaults: the runs are created while the `ecs`
  worker pool is paused, with the worker already running and warmed up; the
  clock starts when the pool is resumed and stops when every run has an
  infrastructure_pid (polled every 0.5 s). The worker's steady rate (first pid →
  last pid) is reported too, since its first poll can be up to 15 s away.

    python -m bench.throughput [--runs 1000] [--concurrency 8,32] [--no-worker]
    python -m bench.throughput --smoke      # 10 runs, the worker polling every 2 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any, Optional

from bench.worker_env import (
    REPO_ROOT,
    Stack,
    bench_stack,
    command_line,
    create_runs,
    due_start,
    machine_header,
    make_push_pool,
    make_worker_pool,
    run_ids,
    running_worker,
    schedule_runs,
    wait_for_pids,
    worker_python,
    worker_versions,
    write_json,
)
from dispatcher.prefect_client import PrefectClient
from dispatcher.settings import Settings


def peak_rss_mb() -> Optional[float]:
    """This process's peak resident set since its exec (Linux's VmHWM), in MiB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def child_sweep(pool: str) -> None:
    """In the fresh subprocess: one sweep of `pool`, its summary as JSON on stdout."""
    from dispatcher.dispatch import Dispatcher
    from dispatcher.settings import Settings as S

    async def sweep() -> dict[str, Any]:
        settings = S.from_env()
        async with PrefectClient(settings) as client:
            started = time.monotonic()
            summary = await Dispatcher(client, settings).sweep([pool])
            return {"sweep_seconds": time.monotonic() - started, "submitted": summary.submitted,
                    "crashed": summary.crashed, "skipped": summary.skipped, "runs": len(summary.runs),
                    "reasons": sorted({r.reason for r in summary.runs if r.reason})[:5]}

    print(json.dumps({**asyncio.run(sweep()), "peak_rss_mb": peak_rss_mb()}))


def run_sweep_subprocess(stack: Stack, pool: str, concurrency: int) -> dict[str, Any]:
    env = stack.base_env()
    env["PUSHPOOL_MAX_CONCURRENCY"] = str(concurrency)
    env["PUSHPOOL_LOG_LEVEL"] = "WARNING"
    out_path = stack.home / f"sweep-{pool}.out"
    with open(out_path, "wb") as out:
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "bench.throughput", "--child-sweep", pool],
                                   env=env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status = os.waitpid(process.pid, 0)
        wall = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    text = out_path.read_text()
    if process.returncode != 0:
        raise RuntimeError(f"the sweep subprocess exited with {process.returncode}:\n{text[-3000:]}")
    summary = json.loads(text.strip().splitlines()[-1])
    return {**summary, "wall_seconds": wall}


def bench_pushpool(stack: Stack, runs: int, concurrency: int) -> dict[str, Any]:
    pool, deployment, _ = asyncio.run(make_push_pool(stack, f"tp-push-c{concurrency}"))
    create_seconds = asyncio.run(schedule_runs(stack.api_url, deployment.id, runs, due_start(runs)))
    ids = asyncio.run(run_ids(stack.api_url, deployment.id))
    result = run_sweep_subprocess(stack, pool.name, concurrency)
    seen = asyncio.run(wait_for_pids(stack.api_url, ids, timeout=10))
    result.update(with_pid=len(seen), runs_created=len(ids), create_seconds=create_seconds,
                  runs_per_second=len(seen) / result["wall_seconds"] if seen else 0.0)
    return result


async def set_paused(api_url: str, pool: str, paused: bool) -> None:
    async with PrefectClient(Settings(api_url=api_url)) as client:
        await client.request("PATCH", f"work_pools/{pool}", json={"is_paused": paused})


def bench_worker(stack: Stack, runs: int, query_seconds: Optional[float], timeout: float) -> dict[str, Any]:
    pool, deployment, _ = asyncio.run(make_worker_pool(stack, "tp-worker"))
    extra = {"PREFECT_WORKER_QUERY_SECONDS": str(query_seconds)} if query_seconds else {}
    log_path = stack.home / "tp-worker.log"
    with running_worker(stack, pool.name, log_path, extra) as process:
        [warm], _ = asyncio.run(create_runs(stack.api_url, deployment.id, 1))
        if len(asyncio.run(wait_for_pids(stack.api_url, [warm], timeout=120))) != 1:
            raise RuntimeError(f"the worker never submitted the warm-up run:\n{log_path.read_text()[-3000:]}")
        asyncio.run(set_paused(stack.api_url, pool.name, True))
        create_seconds = asyncio.run(schedule_runs(stack.api_url, deployment.id, runs, due_start(runs)))
        ids = [i for i in asyncio.run(run_ids(stack.api_url, deployment.id)) if i != warm]
        started = time.monotonic()
        asyncio.run(set_paused(stack.api_url, pool.name, False))
        seen = asyncio.run(wait_for_pids(stack.api_url, ids, timeout=timeout))
        if process.poll() is not None:
            raise RuntimeError(f"the worker exited:\n{log_path.read_text()[-3000:]}")
    times = sorted(seen.values())
    wall = (times[-1] - started) if times else float("nan")
    steady = (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return {"with_pid": len(seen), "runs_created": len(ids), "create_seconds": create_seconds,
            "wall_seconds": wall, "first_pid_seconds": (times[0] - started) if times else float("nan"),
            "steady_seconds": steady, "runs_per_second": len(seen) / wall if times else 0.0,
            "steady_runs_per_second": (len(seen) - 1) / steady if len(times) > 1 and steady > 0 else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--concurrency", default="8,32", help="PUSHPOOL_MAX_CONCURRENCY values, comma-separated")
    parser.add_argument("--no-worker", action="store_true")
    parser.add_argument("--worker-query-seconds", type=float, default=None)
    parser.add_argument("--smoke", action="store_true", help="10 runs, the worker polling every 2 s (for CI)")
    parser.add_argument("--child-sweep", metavar="POOL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_sweep:
        return child_sweep(args.child_sweep)
    if args.smoke:
        args.runs, args.worker_query_seconds = 10, args.worker_query_seconds or 2
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    extra = "" if args.no_worker else worker_versions(worker_python())
    results: dict[str, dict[str, Any]] = {}
    with bench_stack() as stack:
        for concurrency in concurrencies:
            results[f"pushpool-c{concurrency}"] = bench_pushpool(stack, args.runs, concurrency)
        if not args.no_worker:
            results["worker"] = bench_worker(stack, args.runs, args.worker_query_seconds, timeout=max(120, args.runs))
    print(machine_header(command_line(), extra))
    note = f" (PREFECT_WORKER_QUERY_SECONDS={args.worker_query_seconds:g})" if args.worker_query_seconds else ""
    print(f"{args.runs} runs due at once in one pool → every one has an infrastructure_pid{note}\n")
    print("| system | runs with a pid | wall (s) | runs/s | peak RSS (MB) | notes |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        if name == "worker":
            print(f"| Prefect ECS worker, defaults | {r['with_pid']} of {args.runs} | {r['wall_seconds']:.2f} "
                  f"| {r['runs_per_second']:.1f} | – | first pid after {r['first_pid_seconds']:.2f} s; steady "
                  f"{r['steady_runs_per_second']:.1f} runs/s |")
        else:
            c = name.removeprefix("pushpool-c")
            rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "–"
            print(f"| pushpool, one sweep, PUSHPOOL_MAX_CONCURRENCY={c} | {r['with_pid']} of {args.runs} "
                  f"| {r['wall_seconds']:.2f} | {r['runs_per_second']:.1f} | {rss} "
                  f"| sweep itself {r['sweep_seconds']:.2f} s; submitted {r['submitted']}, crashed {r['crashed']} |")
    if "worker" in results and results["worker"]["runs_per_second"]:
        for name, r in results.items():
            if name != "worker":
                print(f"\n{name}: {r['runs_per_second'] / results['worker']['runs_per_second']:.1f}× the worker's runs/s")
    created = [r["runs_created"] / r["create_seconds"] for r in results.values() if r.get("create_seconds")]
    if created:
        print(f"\n(the runs were made by the server from a finite schedule, `POST /deployments/{{id}}/schedule`, "
              f"at {min(created):,.0f}–{max(created):,.0f} runs/s; all due, one second apart, in the past)")
    write_json("throughput", {"command": command_line(), "smoke": args.smoke, "runs": args.runs,
                              "worker_query_seconds": args.worker_query_seconds, "results": results})


if __name__ == "__main__":
    main()
