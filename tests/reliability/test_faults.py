"""Faults: a fault-injecting proxy (FaultProxy) in front of the Prefect server
and in front of moto (ECS), plus a dispatcher SIGKILLed in the middle of a
batch. Then at most 3 ticks (`pushpool dispatch --once`: sweep + reconcile,
with a short pending timeout so lost submissions are resubmitted) must leave
every run launched exactly once — one ECS task per run, found with ListTasks
startedBy=<flow run id> — or CRASHED with a reason; none lost, none duplicated.

Cloud side: 20 % of ECS JSON-API calls (matched on `X-Amz-Target`) answer
400 ThrottlingException. Prefect side: 10 % 503, 2 % connections dropped
before the server sees the request, 2 % dropped after it handled it.

Sizes: reduced (CI) unless PUSHPOOL_RELIABILITY=full (`make reliability`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dispatcher.models import StateType
from tests.support.ecs import ecs_template, make_credentials_block, tasks_in
from tests.support.factories import (
    dispatcher_env,
    make_deployment,
    make_pool,
    make_runs,
    pushpool_process_env,
    states_of,
    submit_counts,
)
from tests.support.fault_proxy import FaultProxy
from tests.support.ticks import (
    make_due_runs,
    PREFETCH_SECONDS,
    SCHEDULED_IN,
    patient_client,
    read_runs,
    report,
    run,
    start_dispatcher,
)
from tests.support.ticks import tick as one_tick

FULL = os.environ.get("PUSHPOOL_RELIABILITY") == "full"
RUNS = 200 if FULL else 20
RECORDING_RUNS, RECORDING_DISPATCHERS = (200, 4) if FULL else (30, 3)
MAX_TICKS = 3
PENDING_TIMEOUT = "4"  # seconds; longer than the slow RunTask delay below, so a launch in flight lands first
SLOW_RUN_TASK_SECONDS = 1.0
THROTTLED = {"__type": "ThrottlingException", "message": "Rate exceeded"}
ECS_JSON_API = {"X-Amz-Target": r"^AmazonEC2ContainerServiceV20141113\."}

pytestmark = [
    pytest.mark.integration,
    pytest.mark.reliability,
    pytest.mark.timeout(1200 if FULL else 300),
]


def prefect_faults(proxy: FaultProxy) -> dict[str, Any]:
    """10 % 503, and dropped connections both before and after the server acted."""
    return {
        "503": proxy.add_rule(path=r"^/api/", respond=503, probability=0.10, seed=11),
        # reset=True: a TCP RST, as from a crashed server or load balancer (a
        # plain close can leave the client waiting out its 30 s read timeout).
        "drop-before": proxy.add_rule(path=r"^/api/", drop=True, reset=True, probability=0.02, seed=12),
        "drop-after": proxy.add_rule(
            path=r"^/api/", drop=True, reset=True, forward_first=True, probability=0.02, seed=13
        ),
    }


def base_env(tmp_path: Path, api_url: str) -> dict[str, str]:
    return pushpool_process_env(
        api_url, tmp_path, drop=("AWS_",),
        PUSHPOOL_PENDING_TIMEOUT_SECONDS=PENDING_TIMEOUT,
        PUSHPOOL_MAX_CONCURRENCY="4",
        PUSHPOOL_PREFETCH_SECONDS=PREFETCH_SECONDS,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )


def tick(env: dict[str, str], pool: str) -> dict[str, Any]:
    """One tick; its output kept beside the pushpool home for a person reading a failure."""
    return one_tick(env, pool, log_file=Path(env["PUSHPOOL_HOME"]) / "ticks.log")


def unsettled(api_url: str, run_ids: list[str]) -> list[str]:
    """Runs neither launched (pid recorded) nor CRASHED."""
    final = run(read_runs(api_url, run_ids))
    return [
        str(r.id) for r in final.values()
        if not (r.state.type == StateType.CRASHED or (r.state.type == StateType.PENDING and r.infrastructure_pid))
    ]


# ---------------------------------------------------------------- ECS, faults on both sides, SIGKILL


def test_faults_on_both_sides_and_a_sigkilled_dispatcher_still_launch_each_run_exactly_once(
    prefect_server, moto_server, tmp_path, unique_name, request
):
    api = prefect_server.api_url
    moto_server.freeze_ecs_tasks(times=100_000)
    moto_server.client("ecs").create_cluster(clusterName=unique_name)
    started = time.monotonic()

    with FaultProxy(upstream=moto_server.endpoint_url, seed=7) as cloud, FaultProxy(
        upstream=api.removesuffix("/api"), seed=8
    ) as prefect:
        slow = cloud.add_rule(match_headers={"X-Amz-Target": r"\.RunTask$"}, delay=SLOW_RUN_TASK_SECONDS, times=RUNS)
        throttle = cloud.add_rule(match_headers=ECS_JSON_API, respond=400, body=THROTTLED, probability=0.20, seed=9)

        async def setup():
            async with patient_client(api) as client:
                block_id = await make_credentials_block(client, f"{unique_name}-creds", cloud.url)
                template = ecs_template(aws_credentials={"$ref": {"block_document_id": block_id}}, cluster=unique_name)
                await make_pool(client, unique_name, "ecs:push", base_job_template=template)
                deployment = await make_deployment(client, unique_name, job_variables={"image": "repo/flows:1"})
                return [str(r.id) for r in await make_runs(client, deployment, RUNS, scheduled_in=SCHEDULED_IN)]

        run_ids = run(setup())
        env = base_env(tmp_path, prefect.url + "/api")
        prefect_rules = prefect_faults(prefect)

        # 1. A dispatcher killed with SIGKILL in the middle of its batch.
        victim = start_dispatcher(env, unique_name)
        at_kill = run(_wait_for_pending(api, run_ids, victim, at_least=min(4, RUNS), in_flight=slow))
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=30)
        assert victim.returncode == -signal.SIGKILL, "the dispatcher finished before it could be killed"
        at_kill["tasks"] = len(tasks_in(moto_server, unique_name))
        at_kill["seconds"] = round(time.monotonic() - started, 1)
        cloud.remove_rule(slow)  # RunTask calls already in flight still land, after their delay
        faults = {"throttle": throttle, "slow RunTask": slow, **prefect_rules}
        time.sleep(float(PENDING_TIMEOUT) + 0.5)

        # 2. At most 3 ticks, through the same faults.
        ticks: list[dict[str, int]] = []
        for _ in range(MAX_TICKS):
            tick_started = time.monotonic()
            ticks.append(tick(env, unique_name))
            ticks[-1]["seconds"] = round(time.monotonic() - tick_started, 1)
            if not unsettled(api, run_ids):
                break
            time.sleep(float(PENDING_TIMEOUT) + 0.5)  # let lost submissions age into resubmission
        fired = {name: rule.fired for name, rule in faults.items()}
        cloud_calls = len(cloud.requests)
        prefect_calls = len(prefect.requests)

    # 3. Every run: one task and its pid recorded, or CRASHED with a reason; never two tasks.
    final = run(read_runs(api, run_ids))
    tasks_per_run = {r: tasks_in(moto_server, unique_name, started_by=r) for r in run_ids}
    duplicated = {r: len(t) for r, t in tasks_per_run.items() if len(t) > 1}
    assert not duplicated, f"runs launched more than once: {duplicated}"
    lost = unsettled(api, run_ids)
    assert not lost, f"runs neither launched nor crashed after {len(ticks)} ticks: {[(r, final[r].state.type) for r in lost]}"
    crashed = []
    for run_id in run_ids:
        flow_run = final[run_id]
        tasks = tasks_per_run[run_id]
        if flow_run.state.type == StateType.CRASHED:
            assert flow_run.state.message, f"{run_id} CRASHED without a reason"
            crashed.append((run_id, flow_run.state.message, len(tasks)))
        else:
            assert len(tasks) == 1, f"{run_id} has a pid but {len(tasks)} tasks"
            [task] = tasks
            assert flow_run.infrastructure_pid == f"{task['clusterArn']}::{task['taskArn']}"
    report(
        request,
        f"{RUNS} ECS runs; SIGKILL with {at_kill['pending']} PENDING ({at_kill['without_pid']} without pid, "
        f"{at_kill['tasks']} tasks in moto); ticks after: {ticks}; faults fired {fired} over {cloud_calls} cloud and "
        f"{prefect_calls} Prefect requests; crashed {len(crashed)} {[c[1][:120] for c in crashed][:3]}; "
        f"wall {time.monotonic() - started:.1f} s",
    )
    assert throttle.fired > 0 and fired["503"] > 0, "the faults never fired; nothing was tested"


async def _wait_for_pending(
    api: str, run_ids: list[str], victim: subprocess.Popen, *, at_least: int, in_flight: Any
) -> dict[str, int]:
    """Wait until the victim has claimed some runs (read straight from the
    server) and has a RunTask in flight (held by the proxy's delay rule)."""
    deadline = time.monotonic() + 120
    async with patient_client(api) as client:
        while time.monotonic() < deadline:
            assert victim.poll() is None, f"the dispatcher exited early: {victim.communicate()}"
            runs = (await states_of(client, run_ids)).values()
            pending = [r for r in runs if r.state.type == StateType.PENDING]
            if len(pending) >= at_least and in_flight.fired > 0:
                return {
                    "pending": len(pending),
                    "without_pid": sum(1 for r in pending if not r.infrastructure_pid),
                    "tasks": -1,
                }
            await asyncio.sleep(0.05)
    raise AssertionError("the dispatcher claimed nothing within 120 s")


# ---------------------------------------------------------------- concurrent dispatchers through a faulty API


def test_concurrent_dispatchers_through_a_faulty_prefect_api_submit_each_run_exactly_once(
    prefect_server, tmp_path, record_file, unique_name, request
):
    """No cloud needed: the recording provider counts submissions, and several
    dispatchers race for the same runs while their claims' answers get lost."""
    api = prefect_server.api_url
    run_ids = make_due_runs(api, unique_name, RECORDING_RUNS)
    started = time.monotonic()
    with FaultProxy(upstream=api.removesuffix("/api"), seed=21) as prefect:
        rules = prefect_faults(prefect)
        env = dispatcher_env(base_env(tmp_path, prefect.url + "/api"), record_file)
        results: list[Any] = [None] * RECORDING_DISPATCHERS

        def one(i: int) -> None:
            try:
                results[i] = tick(env, unique_name)
            except BaseException as exc:  # noqa: BLE001 - asserted below
                results[i] = exc

        threads = [threading.Thread(target=one, args=(i,)) for i in range(RECORDING_DISPATCHERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not [r for r in results if isinstance(r, BaseException)], results
        ticks = list(results)
        for _ in range(MAX_TICKS):
            if not unsettled(api, run_ids):
                break
            time.sleep(float(PENDING_TIMEOUT) + 0.5)
            ticks.append(tick(env, unique_name))
        fired = {name: rule.fired for name, rule in rules.items()}
        calls = len(prefect.requests)

    counts = submit_counts(record_file)
    duplicated = {k: v for k, v in counts.items() if v > 1}
    assert not duplicated, f"runs submitted more than once: {duplicated}"
    lost = unsettled(api, run_ids)
    assert not lost, f"runs neither launched nor crashed: {lost}"
    final = run(read_runs(api, run_ids))
    crashed = [r for r in final.values() if r.state.type == StateType.CRASHED]
    assert all(r.state.message for r in crashed)
    launched = [r for r in final.values() if r.state.type == StateType.PENDING]
    assert {str(r.id) for r in launched} <= set(counts)
    assert len({r.infrastructure_pid for r in launched}) == len(launched)
    report(
        request,
        f"{RECORDING_DISPATCHERS} dispatchers x {RECORDING_RUNS} runs through the faulty API: ticks {ticks}; "
        f"faults fired {fired} over {calls} requests; submitted {len(counts)}, crashed {len(crashed)}; "
        f"wall {time.monotonic() - started:.1f} s",
    )
    assert fired["503"] > 0
