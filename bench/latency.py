"""How long from "a run is created for now" to "its infrastructure_pid is recorded"?

Side by side on one embedded Prefect server and one moto (ECS tasks frozen
RUNNING), each system on its own pool and moto cluster, runs created one at a
time (create, wait for the pid, then the next), after one unmeasured warm-up run:

- pushpool, webhook: `uvicorn dispatcher.http:app`, wired with
  `pushpool connect --url .../webhook --secret S --pool P` (a Prefect automation
  calls the app on the run's Scheduled event; the app sweeps the pool);
- pushpool, event stream: `pushpool dispatch --pool P` (a subprocess on Prefect's
  event websocket, plus its 10 s tick);
- Prefect's ECS worker at its defaults: `prefect worker start --pool W --type ecs`
  (prefect-aws, in its own venv; see bench/worker_env.py).

The time is measured by the client: from sending `POST /deployments/{id}/create_flow_run`
to the first `GET /flow_runs/{id}` (polled every 50 ms) that shows an infrastructure_pid.

    python -m bench.latency [--runs 50] [--systems webhook,dispatch,worker]
    python -m bench.latency --smoke     # 3 runs each, the worker polling every 2 s
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

import httpx

from bench.worker_env import (
    REPO_ROOT,
    Stack,
    bench_stack,
    command_line,
    machine_header,
    make_push_pool,
    make_worker_pool,
    quantiles,
    running_worker,
    stop_process,
    worker_python,
    worker_versions,
    write_json,
)
from dispatcher.embedded_server import free_port
from dispatcher.prefect_client import PrefectClient
from dispatcher.settings import Settings

LABELS = {
    "webhook": "pushpool: automation webhook → ASGI app",
    "dispatch": "pushpool: `pushpool dispatch` (event stream)",
    "worker": "Prefect ECS worker (`prefect worker start --type ecs`), defaults",
}


async def one_run(api_url: str, deployment_id: Any, timeout: float) -> float:
    async with PrefectClient(Settings(api_url=api_url)) as client:
        started = time.monotonic()
        run = await client.create_flow_run_from_deployment(deployment_id)
        while time.monotonic() - started < timeout:
            current = await client.read_flow_run(run.id)
            if current.infrastructure_pid:
                return time.monotonic() - started
            await asyncio.sleep(0.05)
    raise TimeoutError(f"run {run.id} got no infrastructure_pid within {timeout:.0f} s")


def measure(api_url: str, deployment_id: Any, runs: int, timeout: float) -> list[float]:
    asyncio.run(one_run(api_url, deployment_id, timeout * 3))  # warm-up: connections, caches, first import
    values = []
    for _ in range(runs):
        values.append(asyncio.run(one_run(api_url, deployment_id, timeout)))
    return values


@contextmanager
def uvicorn_app(stack: Stack, secret: str) -> Iterator[str]:
    port = free_port()
    env = stack.base_env()
    env["PUSHPOOL_WEBHOOK_SECRET"] = secret
    log = open(stack.home / "uvicorn.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "dispatcher.http:app", "--host", "127.0.0.1", "--port", str(port)],
        env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"uvicorn exited: {(stack.home / 'uvicorn.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the app did not answer /health within 30 s")
            time.sleep(0.1)
        yield base
    finally:
        stop_process(process)


def pushpool(stack: Stack, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dispatcher", *args], env=stack.base_env(), cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"pushpool {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def run_webhook(stack: Stack, runs: int, timeout: float) -> list[float]:
    pool, deployment, _ = asyncio.run(make_push_pool(stack, "lat-webhook"))
    secret = secrets.token_hex(16)
    with uvicorn_app(stack, secret) as base:
        pushpool(stack, "connect", "--url", f"{base}/webhook", "--secret", secret, "--pool", pool.name)
        try:
            return measure(stack.api_url, deployment.id, runs, timeout)
        finally:
            pushpool(stack, "connect", "--remove", "--yes")


def run_dispatch(stack: Stack, runs: int, timeout: float) -> list[float]:
    pool, deployment, _ = asyncio.run(make_push_pool(stack, "lat-dispatch"))
    log = open(stack.home / "dispatch.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "dispatcher", "dispatch", "--pool", pool.name],
                               env=stack.base_env(), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    log.close()
    try:
        return measure(stack.api_url, deployment.id, runs, timeout)
    finally:
        stop_process(process)


def run_worker(stack: Stack, runs: int, timeout: float, query_seconds: float | None) -> list[float]:
    pool, deployment, _ = asyncio.run(make_worker_pool(stack, "lat-worker"))
    extra = {"PREFECT_WORKER_QUERY_SECONDS": str(query_seconds)} if query_seconds else {}
    with running_worker(stack, pool.name, stack.home / "worker.log", extra) as process:
        try:
            return measure(stack.api_url, deployment.id, runs, timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; worker log:\n{(stack.home / 'worker.log').read_text()[-3000:]}") from None
        finally:
            if process.poll() is not None:
                print((stack.home / "worker.log").read_text()[-3000:], file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--systems", default="webhook,dispatch,worker")
    parser.add_argument("--worker-query-seconds", type=float, default=None,
                        help="PREFECT_WORKER_QUERY_SECONDS for the worker (default: Prefect's, 15 s)")
    parser.add_argument("--smoke", action="store_true", help="3 runs each, the worker polling every 2 s (for CI)")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.worker_query_seconds = 3, args.worker_query_seconds or 2
    systems = [s for s in args.systems.split(",") if s]
    extra = ""
    if "worker" in systems:
        extra = worker_versions(worker_python())
    results: dict[str, dict[str, float]] = {}
    with bench_stack() as stack:
        for system in systems:
            if system == "webhook":
                values = run_webhook(stack, args.runs, timeout=30)
            elif system == "dispatch":
                values = run_dispatch(stack, args.runs, timeout=30)
            else:
                values = run_worker(stack, args.runs, timeout=90, query_seconds=args.worker_query_seconds)
            results[system] = {**quantiles(values), "values": values}
    print(machine_header(command_line(), extra))
    worker_note = f", PREFECT_WORKER_QUERY_SECONDS={args.worker_query_seconds:g}" if args.worker_query_seconds else ""
    print(f"run created for now → infrastructure_pid recorded, {args.runs} runs each, one at a time{worker_note}\n")
    print("| system | runs | p50 (s) | p95 (s) | max (s) |")
    print("|---|---|---|---|---|")
    for system, q in results.items():
        print(f"| {LABELS[system]} | {q['n']} of {args.runs} | {q['p50']:.3f} | {q['p95']:.3f} | {q['max']:.3f} |")
    if "worker" in results:
        for system in ("webhook", "dispatch"):
            if system in results:
                print(f"\n{system}: p50 = {results[system]['p50'] / results['worker']['p50']:.3f}× the worker's")
    write_json("latency", {"command": command_line(), "smoke": args.smoke, "runs": args.runs,
                           "worker_query_seconds": args.worker_query_seconds,
                           "labels": LABELS, "results": results})


if __name__ == "__main__":
    main()
