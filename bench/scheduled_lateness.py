"""How late do scheduled runs start when only a timer finds them?

Runs created by a deployment's schedule emit no event on the OSS server, so
the dispatcher's timer is what finds them, and EventBridge's finest rate is one
minute. With prefetch P a tick claims runs due within P s; a run that becomes
claimable just after a tick waits for the next one. Each tick therefore looks
ahead and arranges a one-time wake-up for every run that becomes claimable
before the next tick (`dispatcher.wakeups`). This benchmark runs the local
dispatcher loop (`dispatcher.serve`, the same triggers as the Lambda, events
off) against a real Prefect server, with and without wake-ups, on runs
scheduled at spread-out times, and reports claim time − scheduled time
(negative = claimed early: the container starts and Prefect holds the flow
until its time, so it starts on time).

    python -m bench.scheduled_lateness [--tick 60] [--prefetch 10] [--runs 20]
    python -m bench.scheduled_lateness --smoke     # seconds, for CI
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import ClassVar

from dispatcher.embedded_server import start_embedded_server
from dispatcher.models import FlowRun, StateType
from dispatcher.prefect_client import PrefectClient
from dispatcher.serve import serve
from dispatcher.settings import Settings
from providers.base import InfrastructureStatus, JobConfiguration, Provider
from providers.registry import ProviderRegistry

PUSH_TYPE = "bench-null:push"


class NullProvider(Provider):
    """Launches nothing: the benchmark measures the dispatcher, not a backend."""

    push_types: ClassVar[tuple[str, ...]] = (PUSH_TYPE,)
    template_file: ClassVar[str] = "process.json"

    @classmethod
    def default_base_job_template(cls):
        from providers.process import ProcessProvider

        return ProcessProvider.default_base_job_template()

    async def submit(self, configuration: JobConfiguration, flow_run: FlowRun) -> str:
        return f"null:{flow_run.id}"

    async def cancel(self, infrastructure_pid: str, configuration: JobConfiguration) -> None:
        return None

    async def status(self, infrastructure_pid: str, configuration: JobConfiguration) -> InfrastructureStatus:
        return InfrastructureStatus(state="running")


async def one_configuration(api_url: str, *, tick: float, prefetch: float, runs: int, wakeups: bool) -> list[float]:
    """claim time − scheduled time, in seconds, for each run."""
    pool = f"lateness-{'wake' if wakeups else 'tick'}-{int(time.time())}"
    settings = Settings(api_url=api_url, prefetch_seconds=prefetch)
    registry = ProviderRegistry({PUSH_TYPE: f"{__name__}:NullProvider"}, load_entry_points=False)
    async with PrefectClient(settings) as client:
        await client.create_work_pool(pool, PUSH_TYPE, NullProvider.default_base_job_template())
        flow = await client.create_flow("lateness")
        deployment = await client.create_deployment(
            name=pool, flow_id=str(flow.id), work_pool_name=pool, entrypoint="f.py:f", enforce_parameter_schema=False
        )
        start = datetime.now(timezone.utc) + timedelta(seconds=prefetch + 3)
        span = 2 * tick
        created = []
        for index in range(runs):
            due = start + timedelta(seconds=span * (index + 0.5) / runs)
            created.append(
                await client.create_flow_run_from_deployment(
                    deployment.id, state={"type": "SCHEDULED", "state_details": {"scheduled_time": due.isoformat()}}
                )
            )
        stop = asyncio.Event()
        loop = asyncio.create_task(
            serve(settings, pools=[pool], interval=tick, stop=stop, use_events=False, use_wakeups=wakeups,
                  registry=registry)
        )
        deadline = time.monotonic() + (start - datetime.now(timezone.utc)).total_seconds() + span + tick + 5
        lateness: dict[str, float] = {}
        while len(lateness) < runs and time.monotonic() < deadline:
            await asyncio.sleep(1)
            for flow_run in created:
                if str(flow_run.id) in lateness:
                    continue
                states = await client.read_flow_run_states(flow_run.id)
                pending = next((s for s in states if s.type == StateType.PENDING), None)
                if pending is not None and pending.timestamp and pending.state_details.scheduled_time:
                    lateness[str(flow_run.id)] = (pending.timestamp - pending.state_details.scheduled_time).total_seconds()
        stop.set()
        await loop
        await client.delete_work_pool(pool)
    return list(lateness.values())


def describe(values: list[float], runs: int) -> str:
    if not values:
        return "| – | – | – | – | 0 |"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    late = sum(1 for v in values if v > 0)
    return (
        f"| {statistics.median(ordered):+.1f} | {p95:+.1f} | {ordered[-1]:+.1f} | {late} of {len(values)} "
        f"| {len(values)} of {runs} |"
    )


async def main_async(tick: float, prefetch: float, runs: int) -> None:
    with tempfile.TemporaryDirectory() as home:
        server = start_embedded_server(Path(home), extra_env={"PREFECT_SERVER_UI_ENABLED": "false"})
        try:
            print(f"tick {tick:g} s, prefetch {prefetch:g} s, {runs} runs due over {2 * tick:g} s; "
                  "claim − scheduled time (s)")
            print("| dispatcher | p50 | p95 | max | claimed after their time | claimed |")
            print("|---|---|---|---|---|---|")
            # Both dispatchers at once, each on its own pool: half the wall time,
            # and the same server load for both.
            measured = await asyncio.gather(*(
                one_configuration(server.api_url, tick=tick, prefetch=prefetch, runs=runs, wakeups=wakeups)
                for wakeups in (False, True)
            ))
            for wakeups, values in zip((False, True), measured):
                label = "tick + exact-time wake-ups" if wakeups else "tick only"
                print(f"| {label} " + describe(values, runs))
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tick", type=float, default=60.0)
    parser.add_argument("--prefetch", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="a tiny, fast configuration (for CI)")
    args = parser.parse_args()
    if args.smoke:
        args.tick, args.prefetch, args.runs = 6.0, 2.0, 4
    asyncio.run(main_async(args.tick, args.prefetch, args.runs))


if __name__ == "__main__":
    main()
