"""Exactly once under concurrency: many `pushpool dispatch --once` processes at
the same time on the same due runs, against a Prefect server on SQLite and one
on PostgreSQL.

- Each run is submitted exactly once (the recording provider's file is the
  count), with distinct infrastructure_pids, and at the end no run is left
  SCHEDULED, or PENDING without an infrastructure_pid.
- With a pool concurrency limit and a queue concurrency limit, dispatchers
  looping `--once` while the test "finishes" submitted runs never have more
  runs PENDING/RUNNING than the limits allow — checked exactly, from every
  run's state history, not only by sampling.

Sizes: reduced (CI) unless PUSHPOOL_RELIABILITY=full (`make reliability`).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from dispatcher.models import StateProposal, StateType
from tests.support.factories import (
    dispatcher_env,
    make_deployment,
    make_pool,
    make_runs,
    pushpool_process_env,
    recorded_submits,
    submit_call_counts,
    submit_counts,
)
from tests.support.postgres import PostgresCluster, PostgresUnavailable
from tests.support.prefect_server import PrefectServer, start_prefect_server
from tests.support.ticks import (
    PREFETCH_SECONDS,
    SCHEDULED_IN,
    finish,
    make_due_runs,
    patient_client,
    read_runs,
    report,
    run,
    run_dispatchers_at_once,
    start_dispatcher,
)

FULL = os.environ.get("PUSHPOOL_RELIABILITY") == "full"
# (dispatcher processes, due runs)
DISPATCHERS, RUNS = (8, 500) if FULL else (4, 100)
# (dispatcher processes, pool limit, queue limit, runs in the default queue, runs in the limited queue)
LIMIT_DISPATCHERS, POOL_LIMIT, QUEUE_LIMIT, LIMIT_RUNS, QUEUE_RUNS = (8, 5, 2, 30, 10) if FULL else (3, 3, 1, 8, 4)
# Claims in flight per dispatcher process: 2 keeps the race. The more writes
# at once, the more often a SQLite-backed server stops answering for a minute
# (the README's "Reliability" section says why); the dispatchers ride it out,
# but each stall is a minute of suite time.
MAX_CONCURRENCY = "2"
HOLD_SECONDS = 0.3  # how long a submitted run "runs" before the test completes it

pytestmark = [
    pytest.mark.integration,
    pytest.mark.reliability,
    # Room for two of a SQLite server's minute-long stalls.
    pytest.mark.timeout(1200 if FULL else 420),
]

# ---------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def sqlite_prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A fresh SQLite-backed server for this module, as the PostgreSQL one is:
    the session's server carries every earlier test's runs and services' work."""
    server = start_prefect_server(tmp_path_factory.mktemp("prefect-home-sqlite"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def postgres_prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A Prefect server whose database is a throwaway PostgreSQL cluster."""
    try:
        cluster = PostgresCluster.start()
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL not available: {exc}")
    try:
        url = cluster.create_database("prefect")
        server = start_prefect_server(
            tmp_path_factory.mktemp("prefect-home-pg"),
            extra_env={"PREFECT_API_DATABASE_CONNECTION_URL": url},
            timeout=180,
        )
        try:
            yield server
        finally:
            server.stop()
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest) -> PrefectServer:
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_prefect_server")
    return request.getfixturevalue("postgres_prefect_server")


@pytest.fixture
def env(server: PrefectServer, tmp_path: Path, record_file: Path) -> dict[str, str]:
    """A `pushpool` process's environment: the chosen server, the test providers."""
    base = pushpool_process_env(server.api_url, tmp_path)
    return dispatcher_env(
        base, record_file, PUSHPOOL_MAX_CONCURRENCY=MAX_CONCURRENCY, PUSHPOOL_PREFETCH_SECONDS=PREFETCH_SECONDS
    )


# ---------------------------------------------------------------- helpers


def assert_each_run_launched_exactly_once(api_url: str, record_file: Path, run_ids: list[str]) -> dict[str, Any]:
    counts = submit_counts(record_file)
    duplicated = {k: v for k, v in counts.items() if v > 1}
    assert not duplicated, f"runs submitted more than once: {duplicated}"
    assert set(counts) == set(run_ids), f"{len(set(run_ids) - set(counts))} runs never submitted"
    final = run(read_runs(api_url, run_ids))
    not_launched = [str(r.id) for r in final.values() if r.state.type != StateType.PENDING or not r.infrastructure_pid]
    assert not not_launched, f"runs not PENDING with an infrastructure_pid: {not_launched[:10]}"
    pids = [r.infrastructure_pid for r in final.values()]
    assert len(set(pids)) == len(run_ids), "two runs share an infrastructure_pid"
    recorded = {e["flow_run_id"]: e["infrastructure_pid"] for e in recorded_submits(record_file)}
    assert all(recorded[str(r.id)] == r.infrastructure_pid for r in final.values())
    return {"dispatcher_pids": {e["dispatcher_pid"] for e in recorded_submits(record_file)}}


# ---------------------------------------------------------------- exactly once


def test_concurrent_dispatchers_submit_every_due_run_exactly_once(server, env, record_file, unique_name, request):
    api = server.api_url
    started = time.monotonic()
    run_ids = make_due_runs(api, unique_name, RUNS)
    setup_seconds = time.monotonic() - started
    started = time.monotonic()
    summaries = run_dispatchers_at_once(env, unique_name, DISPATCHERS)
    race_seconds = time.monotonic() - started

    # Runs a dispatcher saw but another had claimed are fine; one more tick
    # (sweep + reconcile) must then leave nothing unlaunched.
    leftover = finish(start_dispatcher(env, unique_name))
    facts = assert_each_run_launched_exactly_once(api, record_file, run_ids)

    claimed = [s["claimed"] for s in summaries]
    collisions = sum(s["skipped"] for s in summaries)
    assert sum(claimed) + leftover["claimed"] == RUNS
    assert sum(s["crashed"] for s in summaries) == 0
    assert len(facts["dispatcher_pids"]) > 1, "one dispatcher did all the work; the race was not exercised"
    # A claim whose pid write was held up past the pending timeout (a SQLite
    # server's minute-long stalls) is resubmitted; the provider then launches
    # nothing new and returns the same pid (asserted above: one launch a run).
    resubmitted = sum(s["resubmitted"] for s in [*summaries, leftover])
    report(
        request,
        f"{DISPATCHERS} dispatchers x {RUNS} runs (created in {setup_seconds:.1f} s) in {race_seconds:.1f} s: "
        f"claims per dispatcher {claimed}, lost claims (skipped) {collisions}, left for the extra tick "
        f"{leftover['claimed']}, resubmissions of slow pid writes {resubmitted}",
    )


# ---------------------------------------------------------------- concurrency limits


class Completer:
    """Plays the infrastructure: a submitted run (PENDING with an
    infrastructure_pid) "runs" for HOLD_SECONDS, then is moved to COMPLETED.
    Also samples the active counts of the pool and the limited queue."""

    def __init__(self, api_url: str, pool: str, queue: str):
        self.api_url, self.pool, self.queue = api_url, pool, queue
        self.completed: set[str] = set()
        self.samples: list[tuple[int, int]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._loop())
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            self.errors.append(exc)

    async def _loop(self) -> None:
        active = {"state": {"type": {"any_": ["PENDING", "RUNNING"]}}}
        in_pool = {"name": {"any_": [self.pool]}}
        async with patient_client(self.api_url) as client:
            while not self._stop.is_set():
                runs = await client.read_flow_runs(flow_runs=active, work_pools=in_pool)
                in_queue = await client.request(
                    "POST", "flow_runs/count",
                    json={"flow_runs": active, "work_pools": in_pool, "work_pool_queues": {"name": {"any_": [self.queue]}}},
                )
                self.samples.append((len(runs), int(in_queue.json())))
                now = time.time()
                for flow_run in runs:
                    claimed_at = flow_run.state.timestamp.timestamp() if flow_run.state and flow_run.state.timestamp else now
                    if flow_run.infrastructure_pid and now - claimed_at >= HOLD_SECONDS:
                        await client.set_flow_run_state(flow_run.id, StateProposal(type=StateType.COMPLETED), force=True)
                        self.completed.add(str(flow_run.id))
                await asyncio.sleep(0.05)

    def __enter__(self) -> "Completer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals [start, end) open at any one time (an end at the same
    instant as a start frees its slot first)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    highest = current = 0
    for _, step in events:
        current += step
        highest = max(highest, current)
    return highest


async def active_intervals(api_url: str, run_ids: list[str]) -> dict[str, tuple[datetime, datetime]]:
    """Per run: from its first PENDING to its first terminal state, from its state history."""
    async with patient_client(api_url) as client:
        semaphore = asyncio.Semaphore(8)

        async def one(run_id: str) -> tuple[str, tuple[datetime, datetime]]:
            async with semaphore:
                states = sorted(await client.read_flow_run_states(run_id), key=lambda s: s.timestamp)
            start = next(s.timestamp for s in states if s.type in (StateType.PENDING, StateType.RUNNING))
            end = next(s.timestamp for s in states if s.type.is_terminal and s.timestamp >= start)
            return run_id, (start, end)

        return dict(await asyncio.gather(*(one(r) for r in run_ids)))


def test_pool_and_queue_concurrency_limits_hold_across_looping_dispatchers(
    server, env, record_file, unique_name, request
):
    api = server.api_url
    queue = "limited"

    async def setup():
        async with patient_client(api) as client:
            await make_pool(client, unique_name, concurrency_limit=POOL_LIMIT)
            await client.create_work_queue(unique_name, queue, concurrency_limit=QUEUE_LIMIT)
            deployment = await make_deployment(client, unique_name)
            default_runs = await make_runs(client, deployment, LIMIT_RUNS, scheduled_in=SCHEDULED_IN)
            when = (datetime.now(timezone.utc) + SCHEDULED_IN).isoformat()
            queued = [
                await client.create_flow_run_from_deployment(
                    deployment.id, work_queue_name=queue,
                    state={"type": "SCHEDULED", "state_details": {"scheduled_time": when}},
                )
                for _ in range(QUEUE_RUNS)
            ]
            return [str(r.id) for r in default_runs], [str(r.id) for r in queued]

    default_ids, queue_ids = run(setup())
    run_ids = default_ids + queue_ids
    all_submitted = threading.Event()
    ticks: list[dict[str, int]] = []
    failures: list[BaseException] = []

    def loop() -> None:
        try:
            while not all_submitted.is_set():
                ticks.append(finish(start_dispatcher(env, unique_name)))
                if set(submit_counts(record_file)) >= set(run_ids):
                    all_submitted.set()
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            failures.append(exc)
            all_submitted.set()

    started = time.monotonic()
    with Completer(api, unique_name, queue) as completer:
        loopers = [threading.Thread(target=loop, daemon=True) for _ in range(LIMIT_DISPATCHERS)]
        for looper in loopers:
            looper.start()
        for looper in loopers:
            looper.join(timeout=900 if FULL else 240)
        assert not any(t.is_alive() for t in loopers), "dispatchers did not submit every run in time"
        deadline = time.monotonic() + 60
        while completer.completed < set(run_ids) and time.monotonic() < deadline and not completer.errors:
            time.sleep(0.1)
    wall = time.monotonic() - started
    assert not failures, failures
    assert not completer.errors, completer.errors

    counts = submit_counts(record_file)
    assert set(counts) == set(run_ids) and set(counts.values()) == {1}, {k: v for k, v in counts.items() if v > 1}
    intervals = run(active_intervals(api, run_ids))
    pool_peak = max_overlap(list(intervals.values()))
    queue_peak = max_overlap([intervals[r] for r in queue_ids])
    sampled_pool = max(s[0] for s in completer.samples)
    sampled_queue = max(s[1] for s in completer.samples)
    assert pool_peak <= POOL_LIMIT, f"{pool_peak} runs active at once in a pool limited to {POOL_LIMIT}"
    assert queue_peak <= QUEUE_LIMIT, f"{queue_peak} runs active at once in a queue limited to {QUEUE_LIMIT}"
    assert sampled_pool <= POOL_LIMIT and sampled_queue <= QUEUE_LIMIT
    assert pool_peak == POOL_LIMIT, "the pool limit was never reached; nothing was tested"
    report(
        request,
        f"{LIMIT_DISPATCHERS} looping dispatchers, {len(run_ids)} runs, pool limit {POOL_LIMIT} / queue limit "
        f"{QUEUE_LIMIT}: peak active {pool_peak} / {queue_peak} (from state histories; sampled {sampled_pool} / "
        f"{sampled_queue} over {len(completer.samples)} samples); {len(ticks)} ticks in {wall:.1f} s",
    )


# ---------------------------------------------------------------- concurrent reconcilers


def test_concurrent_reconcilers_resubmit_a_lost_submission_once(server, env, record_file, unique_name, request):
    """Found by the full-size limit test on SQLite: a run whose claimer was
    slowed past the pending timeout was resubmitted by 3 dispatchers at once
    (before the fix in Reconciler._lost_submission: 4 of 4 on SQLite, 2 of 4
    on PostgreSQL)."""
    api = server.api_url

    async def setup():
        async with patient_client(api) as client:
            await make_pool(client, unique_name)
            deployment = await make_deployment(client, unique_name)
            [flow_run] = await make_runs(client, deployment, 1)
            # Claimed by a dispatcher that then died before launching anything.
            result = await client.set_flow_run_state(flow_run.id, StateProposal(type=StateType.PENDING, name="Pending"))
            assert result.status.value == "ACCEPT"
            return str(flow_run.id)

    run_id = run(setup())
    time.sleep(3.0)  # past the pending timeout below, which is longer than the processes' start-up skew
    summaries = run_dispatchers_at_once({**env, "PUSHPOOL_PENDING_TIMEOUT_SECONDS": "2.5"}, unique_name, 4)
    # Every submit call counts here, not only launches: the provider would
    # absorb a second resubmission, but the reconcilers must not make one.
    counts = submit_call_counts(record_file)
    report(request, f"4 concurrent reconcilers: the lost submission was submitted {counts.get(run_id, 0)} times")
    if counts != {run_id: 1}:
        for summary in summaries:
            print(summary.get("resubmitted"), summary.get("log", ""))
    assert counts == {run_id: 1}, summaries
