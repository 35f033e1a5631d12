"""The dispatch core against a real Prefect server: claims, limits, failures.

Races between several dispatcher processes (exactly once, pool and queue
concurrency limits held) are in tests/reliability/test_exactly_once.py, on
SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from dispatcher.dispatch import Dispatcher, RunOutcome
from dispatcher.models import StateType
from dispatcher.settings import Settings
from tests.support.factories import (
    client_for,
    make_deployment,
    make_pool,
    make_runs,
    recorded_submits,
    states_of,
    submit_counts,
)

pytestmark = pytest.mark.integration


def in_process_sweep(api_url: str, pool: str, **settings: object):
    async def sweep():
        async with client_for(api_url) as client:
            return await Dispatcher(client, Settings(api_url=api_url, **settings)).sweep([pool])

    return asyncio.run(sweep())


def test_a_due_run_is_claimed_rendered_submitted_and_recorded(prefect_server, record_file, unique_name):
    async def setup():
        async with client_for(prefect_server.api_url) as client:
            await make_pool(client, unique_name)
            deployment = await make_deployment(
                client, unique_name, job_variables={"env": {"FROM_DEPLOYMENT": "d", "SHARED": "deployment"}}
            )
            [run] = await make_runs(client, deployment, 1, job_variables={"env": {"SHARED": "run"}})
            return deployment, run

    deployment, run = asyncio.run(setup())
    summary = in_process_sweep(prefect_server.api_url, unique_name)
    assert [(r.flow_run_id, r.outcome) for r in summary.runs] == [(run.id, RunOutcome.SUBMITTED)]

    [submitted] = recorded_submits(record_file)
    env = submitted["env"]
    assert env["PREFECT__FLOW_RUN_ID"] == str(run.id)
    assert env["PREFECT_API_URL"] == prefect_server.api_url
    assert env["PREFECT__DEPLOYMENT_ID"] == str(deployment.id)
    assert env["FROM_DEPLOYMENT"] == "d" and env["SHARED"] == "run"  # env merged key by key, run wins
    assert submitted["command"] == "prefect flow-run execute"
    assert submitted["labels"]["prefect.io/flow-run-id"] == str(run.id)
    assert submitted["labels"]["prefect.io/work-pool-name"] == unique_name
    assert submitted["configuration"]["memory"] == 512  # the template default, typed

    async def read_back():
        async with client_for(prefect_server.api_url) as client:
            return await client.read_flow_run(run.id)

    after = asyncio.run(read_back())
    assert after.state.type == StateType.PENDING and after.state.name == "Pending"
    assert "pushpool claim" in after.state.message
    assert after.infrastructure_pid == submitted["infrastructure_pid"]


def test_a_run_whose_job_variables_no_longer_validate_crashes_and_the_others_are_submitted(
    prefect_server, record_file, unique_name
):
    async def setup():
        async with client_for(prefect_server.api_url) as client:
            pool = await make_pool(client, unique_name)
            bad = await make_deployment(client, unique_name, name="bad", job_variables={"memory": 1024})
            good = await make_deployment(client, unique_name, name="good")
            [bad_run] = await make_runs(client, bad, 1)
            good_runs = await make_runs(client, good, 2)
            # The server validated the runs when they were created; now the
            # template changes under them.
            template = pool.base_job_template
            template["variables"]["properties"]["memory"] = {"type": "string", "title": "Memory"}
            await client.update_work_pool(unique_name, base_job_template=template)
            return bad_run, good_runs

    bad_run, good_runs = asyncio.run(setup())
    summary = in_process_sweep(prefect_server.api_url, unique_name)
    outcomes = {r.flow_run_id: r for r in summary.runs}
    assert outcomes[bad_run.id].outcome == RunOutcome.CRASHED
    assert "memory" in outcomes[bad_run.id].reason and "string" in outcomes[bad_run.id].reason
    assert {outcomes[r.id].outcome for r in good_runs} == {RunOutcome.SUBMITTED}

    async def read_back():
        async with client_for(prefect_server.api_url) as client:
            return await client.read_flow_run(bad_run.id)

    crashed = asyncio.run(read_back())
    assert crashed.state.type == StateType.CRASHED
    assert "memory" in crashed.state.message
    assert set(submit_counts(record_file)) == {str(r.id) for r in good_runs}


def test_a_run_whose_block_was_deleted_crashes_naming_the_block(prefect_server, record_file, unique_name):
    async def setup():
        async with client_for(prefect_server.api_url) as client:
            block_type = await client.read_block_type_by_slug("secret")
            schema = await client.read_latest_block_schema(block_type.id)
            block = await client.create_block_document(
                f"{unique_name}-token", block_type.id, schema.id, {"value": "s3cr3t-token-value"}
            )
            await make_pool(client, unique_name)
            deployment = await make_deployment(
                client,
                unique_name,
                job_variables={"env": {"TOKEN": f"{{{{ prefect.blocks.secret.{unique_name}-token }}}}"}},
            )
            [run] = await make_runs(client, deployment, 1)
            await client.delete_block_document(block.id)
            return run

    asyncio.run(setup())
    summary = in_process_sweep(prefect_server.api_url, unique_name)
    [result] = summary.runs
    assert result.outcome == RunOutcome.CRASHED
    assert f"{unique_name}-token" in result.reason
    assert recorded_submits(record_file) == []


def test_the_api_answering_503_twice_then_200_still_submits_once(prefect_server, record_file, unique_name):
    from tests.support.fault_proxy import FaultProxy

    async def setup():
        async with client_for(prefect_server.api_url) as client:
            await make_pool(client, unique_name)
            deployment = await make_deployment(client, unique_name)
            return (await make_runs(client, deployment, 1))[0]

    run = asyncio.run(setup())
    upstream = prefect_server.api_url.removesuffix("/api")
    with FaultProxy(upstream=upstream) as proxy:
        proxy.add_rule(method="POST", path=r"/api/flow_runs/[^/]+/set_state", respond=503, times=2)
        summary = in_process_sweep(proxy.url + "/api", unique_name)
        set_state_calls = [r for r in proxy.requests if r.path.endswith("/set_state")]

    assert [(r.flow_run_id, r.outcome) for r in summary.runs] == [(run.id, RunOutcome.SUBMITTED)]
    assert submit_counts(record_file) == {str(run.id): 1}
    assert len(set_state_calls) == 3


def test_a_run_scheduled_an_hour_ahead_is_not_claimed(prefect_server, record_file, unique_name):
    async def setup():
        async with client_for(prefect_server.api_url) as client:
            await make_pool(client, unique_name)
            deployment = await make_deployment(client, unique_name)
            return (await make_runs(client, deployment, 1, scheduled_in=timedelta(hours=1)))[0]

    run = asyncio.run(setup())
    summary = in_process_sweep(prefect_server.api_url, unique_name, prefetch_seconds=10)
    assert summary.runs == []

    async def read_back():
        async with client_for(prefect_server.api_url) as client:
            return await client.read_flow_run(run.id)

    assert asyncio.run(read_back()).state.type == StateType.SCHEDULED
    assert recorded_submits(record_file) == []


def test_a_paused_pool_has_nothing_claimed(prefect_server, record_file, unique_name):
    async def setup():
        async with client_for(prefect_server.api_url) as client:
            await make_pool(client, unique_name)
            deployment = await make_deployment(client, unique_name)
            runs = await make_runs(client, deployment, 3)
            await client.update_work_pool(unique_name, is_paused=True)
            return runs

    runs = asyncio.run(setup())
    summary = in_process_sweep(prefect_server.api_url, unique_name)
    assert summary.runs == []
    assert recorded_submits(record_file) == []

    async def read_back():
        async with client_for(prefect_server.api_url) as client:
            return await states_of(client, [r.id for r in runs])

    assert {r.state.type for r in asyncio.run(read_back()).values()} == {StateType.SCHEDULED}


def test_a_paused_queue_is_skipped_and_the_others_served(prefect_server, record_file, unique_name):
    async def setup():
        async with client_for(prefect_server.api_url) as client:
            await make_pool(client, unique_name)
            await client.create_work_queue(unique_name, "low", priority=5)
            deployment = await make_deployment(client, unique_name)
            served = await make_runs(client, deployment, 2)
            held = [
                await client.create_flow_run_from_deployment(deployment.id, work_queue_name="low")
            ]
            await client.update_work_queue(unique_name, "low", is_paused=True)
            return served, held

    served, held = asyncio.run(setup())
    in_process_sweep(prefect_server.api_url, unique_name)
    assert set(submit_counts(record_file)) == {str(r.id) for r in served}


def test_a_claim_whose_answer_was_lost_is_recognised_as_ours(prefect_server, record_file, unique_name):
    """The server commits the PENDING claim but the answer never arrives: the
    retry, with the same transition id, is told the run already made that
    transition, and the dispatcher knows the claim is its own."""
    from tests.support.fault_proxy import FaultProxy

    async def setup():
        async with client_for(prefect_server.api_url) as client:
            await make_pool(client, unique_name)
            deployment = await make_deployment(client, unique_name)
            return (await make_runs(client, deployment, 1))[0]

    run = asyncio.run(setup())
    with FaultProxy(upstream=prefect_server.api_url.removesuffix("/api")) as proxy:
        proxy.add_rule(method="POST", path=r"/api/flow_runs/[^/]+/set_state", drop=True, forward_first=True, times=1)
        summary = in_process_sweep(proxy.url + "/api", unique_name)
        set_state_calls = proxy.requests_matching(method="POST", path=r"/set_state$")

    assert [(r.flow_run_id, r.outcome) for r in summary.runs] == [(run.id, RunOutcome.SUBMITTED)]
    assert len(set_state_calls) == 2 and set_state_calls[0].faulted
    assert submit_counts(record_file) == {str(run.id): 1}
