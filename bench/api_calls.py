"""Where a sweep's time goes: API calls per run, and a profile.

One in-process `Dispatcher.sweep` of N due runs of an `ecs:push` pool, with a
`FaultProxy` (tests/support/fault_proxy.py, forwarding only) in front of the
Prefect server and another in front of moto. Prefect calls are counted by
method and path (ids replaced by `{id}`); ECS calls by their `X-Amz-Target`
action (one pass-through `rewrite` rule per ECS operation of botocore's model, so each
recorded request names its rule); other AWS calls (EC2, STS: query protocol,
the action is in the body) are named by a botocore `before-call` hook. The
per-run targets: 1 claim, 1 cloud launch, 1 pid write; everything else batched
or cached per invocation.

Then a second sweep of N fresh runs under cProfile (the event loop's thread and
every worker thread boto3 runs in, merged), top 15 by cumulative time.

    python -m bench.api_calls [--runs 100]
    python -m bench.api_calls --smoke       # 5 runs
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import re
import threading
import time
from collections import Counter, defaultdict
from typing import Any

from bench.worker_env import Stack, bench_stack, command_line, due_start, machine_header, make_push_pool, schedule_runs, write_json
from dispatcher.dispatch import Dispatcher
from dispatcher.prefect_client import PrefectClient
from dispatcher.settings import Settings
from tests.support.ecs import ecs_target
from tests.support.fault_proxy import FaultProxy

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
PER_RUN_TARGETS = {
    "POST /api/flow_runs/{id}/set_state": "claim (PENDING)",
    "PATCH /api/flow_runs/{id}": "pid write",
    "ecs:RunTask": "cloud launch",
}


async def create_due(api_url: str, deployment_id: Any, count: int) -> None:
    await schedule_runs(api_url, deployment_id, count, due_start(count))


async def sweep(api_url: str, pool: str) -> Any:
    settings = Settings(api_url=api_url)
    async with PrefectClient(settings) as client:
        return await Dispatcher(client, settings).sweep([pool])


class BotocoreCalls:
    """Counts every AWS operation boto3 makes in this process (service:Operation)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def install(self) -> None:
        import botocore.client

        original = botocore.client.BaseClient._make_api_call
        calls = self

        def counted(client: Any, operation_name: str, api_params: Any) -> Any:
            with calls._lock:
                calls.counts[f"{client.meta.service_model.endpoint_prefix}:{operation_name}"] += 1
            return original(client, operation_name, api_params)

        botocore.client.BaseClient._make_api_call = counted  # type: ignore[method-assign]


def profile_sweep(api_url: str, pool: str) -> str:
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()

    def start_in_thread(*_: Any) -> None:
        profile = cProfile.Profile()
        with lock:
            profiles.append(profile)
        profile.enable()

    main = cProfile.Profile()
    threading.setprofile(start_in_thread)
    try:
        main.enable()
        asyncio.run(sweep(api_url, pool))
        main.disable()
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    stats = pstats.Stats(main, stream=(out := io.StringIO()))
    for profile in profiles:
        try:
            stats.add(profile)
        except (TypeError, ValueError):
            pass
    stats.sort_stats("cumulative").print_stats(15)
    lines = [l for l in out.getvalue().splitlines() if l.strip()]
    start = next(i for i, l in enumerate(lines) if "ncalls" in l)
    return "\n".join(lines[start - 1:start + 16])


def same(body: bytes) -> bytes:
    """A pass-through `rewrite`: the rule only names the request it matched."""
    return body


def run(stack: Stack, runs: int) -> dict[str, Any]:
    import botocore.session

    calls = BotocoreCalls()
    calls.install()
    operations = botocore.session.get_session().get_service_model("ecs").operation_names
    with FaultProxy(upstream=stack.api_url.removesuffix("/api")) as prefect_proxy, \
            FaultProxy(upstream=stack.moto.endpoint_url) as aws_proxy:
        rules = {aws_proxy.add_rule(method="POST", match_headers=ecs_target(op), rewrite=same): op for op in operations}
        pool, deployment, _ = asyncio.run(make_push_pool(stack, "calls", aws_endpoint=aws_proxy.url))
        api_url = prefect_proxy.url + "/api"
        asyncio.run(create_due(stack.api_url, deployment.id, runs))
        prefect_proxy.clear_requests()
        aws_proxy.clear_requests()
        calls.counts.clear()
        started = time.monotonic()
        summary = asyncio.run(sweep(api_url, pool.name))
        seconds = time.monotonic() - started
        prefect: Counter[str] = Counter()
        prefect_time: defaultdict[str, float] = defaultdict(float)
        for request in prefect_proxy.requests:
            key = f"{request.method} {UUID.sub('{id}', request.path)}"
            prefect[key] += 1
            prefect_time[key] += request.duration
        aws: Counter[str] = Counter()
        aws_time: defaultdict[str, float] = defaultdict(float)
        for request in aws_proxy.requests:
            key = f"ecs:{rules[request.rule]}" if request.rule in rules else "non-ECS (query protocol)"
            aws[key] += 1
            aws_time[key] += request.duration
        boto = Counter(calls.counts)

        # The profile: a fresh batch of due runs, straight to the server and moto (no proxies).
        profile_pool, profile_deployment, _ = asyncio.run(make_push_pool(stack, "calls-profile"))
        asyncio.run(sweep(stack.api_url, profile_pool.name))  # warm: first imports, first clients
        asyncio.run(create_due(stack.api_url, profile_deployment.id, runs))
        profile = profile_sweep(stack.api_url, profile_pool.name)
    return {"runs": runs, "submitted": summary.submitted, "sweep_seconds": seconds,
            "prefect": dict(prefect), "prefect_time": dict(prefect_time), "aws": dict(aws),
            "aws_time": dict(aws_time), "boto": dict(boto), "profile": profile}


def table(counts: dict[str, int], times: dict[str, float], runs: int) -> list[str]:
    lines = ["| call | count | per run | total time in it (s) | target |", "|---|---|---|---|---|"]
    for key, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        target = PER_RUN_TARGETS.get(key, "")
        target = f"1 per run ({target})" if target else "batched / cached"
        lines.append(f"| `{key}` | {count} | {count / runs:.2f} | {times.get(key, 0.0):.2f} | {target} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--smoke", action="store_true", help="5 runs (for CI)")
    args = parser.parse_args()
    if args.smoke:
        args.runs = 5
    with bench_stack() as stack:
        result = run(stack, args.runs)
    print(machine_header(command_line()))
    print(f"one sweep of {args.runs} due ecs:push runs: {result['submitted']} of {args.runs} submitted in "
          f"{result['sweep_seconds']:.2f} s (through both proxies)\n")
    print("Prefect API (FaultProxy in front of the server):\n")
    print("\n".join(table(result["prefect"], result["prefect_time"], args.runs)))
    print("\nAWS (FaultProxy in front of moto; ECS actions by X-Amz-Target):\n")
    print("\n".join(table(result["aws"], result["aws_time"], args.runs)))
    print("\nAWS operations as boto3 made them (botocore hook, this process):\n")
    print("| operation | count | per run |\n|---|---|---|")
    for key, count in sorted(result["boto"].items(), key=lambda kv: -kv[1]):
        print(f"| `{key}` | {count} | {count / args.runs:.2f} |")
    per_run = {k: v / args.runs for k, v in {**result["prefect"], **result["aws"]}.items()}
    missed = {k: v for k, v in per_run.items() if v > 1.0 or (v >= 0.5 and k not in PER_RUN_TARGETS)}
    result["extra_per_run"] = missed
    print("\ncalls made about once per run or more, beyond the three targets: "
          + (", ".join(f"`{k}` {v:.2f}" for k, v in missed.items() if k not in PER_RUN_TARGETS) or "none"))
    print(f"\nprofile of a second sweep of {args.runs} runs (no proxies; all threads), top 15 cumulative:\n")
    print("```\n" + result["profile"] + "\n```")
    write_json("api_calls", {"command": command_line(), "smoke": args.smoke, **result})


if __name__ == "__main__":
    main()
