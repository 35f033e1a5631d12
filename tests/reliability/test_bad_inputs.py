"""A catalogue of bad inputs, each with its expected outcome, against a real
Prefect server (and moto for ecs:push).

Two tables:

- SWEEP_CASES: something wrong with a pool, a deployment, a run, a block or
  the infrastructure. Each case makes its own pool and one bad run; one sweep
  covers the bad pool *and* a healthy pool with a due run. The bad run ends
  with the expected state and a message holding the expected words (or is left
  untouched, when nothing about it is the dispatcher's to change), and the
  healthy run is submitted in that same sweep.
- WEBHOOK_CASES: bad requests through both webhook doors, the Lambda Function
  URL event shape (`dispatcher.aws_lambda.handler`, in-process) and the ASGI app
  (`dispatcher.http`, in-process over httpx's ASGI transport). Each ends with
  the expected status and reason, and the same door then still dispatches a
  good webhook's run.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional
from uuid import UUID

import httpx
import pytest
from pydantic import SecretStr

from dispatcher import aws_lambda
from dispatcher.dispatch import Dispatcher, RunOutcome
from dispatcher.http import create_app
from dispatcher.models import StateType
from dispatcher.prefect_client import ObjectNotFound, PrefectClient
from dispatcher.settings import Settings
from dispatcher.webhook import MAX_BODY_BYTES, sign
from tests.integration.test_http_app import scheduled_event
from tests.integration.test_lambda_runtime import LambdaContext, ecs_task_state_change, function_url_request
from tests.support.ecs import ecs_template, make_credentials_block
from tests.support.factories import client_for, make_deployment, make_pool, make_runs, submit_counts
from tests.support.fault_proxy import FaultProxy

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

SECRET = "bad-inputs-secret-" + uuid.uuid4().hex[:8]


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------- the sweep catalogue


@dataclass
class World:
    """What a case's setup gets: a client on the real server, names, moto."""

    client: PrefectClient
    api_url: str
    name: str  # the bad pool's name
    moto: Any = None
    proxy: Optional[FaultProxy] = None
    #: runs concurrently with the sweep (mid-sweep faults)
    during: Optional[Callable[[], Awaitable[None]]] = None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepCase:
    id: str
    setup: Callable[[World], Awaitable[Optional[UUID]]]  # returns the bad run's id
    state: str  # CRASHED, CANCELLED, SCHEDULED (untouched), or GONE (the run no longer exists)
    words: tuple[str, ...] = ()  # each must be in the run's state message (case-insensitive)
    moto: bool = False
    proxy: bool = False
    outcome: Optional[RunOutcome] = None  # the bad run's result in the sweep; None = not in the results


async def one_run(world: World, *, type: str = "recording:push", template: Optional[dict] = None,
                  job_variables: Optional[dict] = None, run_variables: Optional[dict] = None,
                  **pool_kwargs: Any) -> UUID:
    await make_pool(world.client, world.name, type, base_job_template=template, **pool_kwargs)
    # Deployments are unique by (flow, name): a name of its own, or it would take over another case's.
    deployment = await make_deployment(world.client, world.name, name=f"{world.name}-bad", job_variables=job_variables)
    world.notes["deployment"] = deployment
    [flow_run] = await make_runs(world.client, deployment, 1, job_variables=run_variables)
    return flow_run.id


def recording_template() -> dict[str, Any]:
    from providers.registry import ProviderRegistry

    return copy.deepcopy(ProviderRegistry().provider_class("recording:push").default_base_job_template())


async def _retype_memory(world: World) -> UUID:
    run_id = await one_run(world, job_variables={"memory": 1024})
    template = recording_template()
    template["variables"]["properties"]["memory"] = {"type": "string", "title": "Memory", "default": "512"}
    await world.client.update_work_pool(world.name, base_job_template=template)
    return run_id


async def _closed_schema_unknown_variable(world: World) -> UUID:
    run_id = await one_run(world, job_variables={"memroy": 1024})
    template = recording_template()
    template["variables"]["additionalProperties"] = False
    await world.client.update_work_pool(world.name, base_job_template=template)
    return run_id


async def _missing_placeholder(world: World) -> UUID:
    template = recording_template()
    # The server refuses undeclared placeholders, so declare it, without a default: no layer sets it.
    template["variables"]["properties"]["memory_gb"] = {"type": "integer", "title": "Memory (GiB)"}
    template["job_configuration"]["memory"] = "{{ memory_gb }}x1024"
    return await one_run(world, template=template)


async def _deleted_block_reference(world: World) -> UUID:
    block_type = await world.client.read_block_type_by_slug("secret")
    schema = await world.client.read_latest_block_schema(block_type.id)
    block = await world.client.create_block_document(f"{world.name}-token", block_type.id, schema.id, {"value": "short-lived"})
    template = recording_template()
    template["variables"]["properties"]["token"] = {
        "type": "object", "title": "Token", "default": {"$ref": {"block_document_id": str(block.id)}}
    }
    template["job_configuration"]["env"] = {"TOKEN": "{{ token }}"}
    run_id = await one_run(world, template=template)
    await world.client.delete_block_document(block.id)
    return run_id


async def _missing_block_placeholder(world: World) -> UUID:
    return await one_run(world, job_variables={"env": {"TOKEN": "{{ prefect.blocks.secret.no-such-block }}"}})


async def _provider_refuses(world: World) -> UUID:
    return await one_run(world, run_variables={"env": {"PUSHPOOL_TEST_FAIL": "quota exceeded: no capacity for 4 vCPU"}})


async def _too_late(world: World) -> UUID:
    template = recording_template()
    template["variables"]["properties"]["late_run_threshold_seconds"] = {"type": "integer", "default": 60}
    await make_pool(world.client, world.name, base_job_template=template)
    deployment = await make_deployment(world.client, world.name, name=f"{world.name}-bad")
    [flow_run] = await make_runs(world.client, deployment, 1, scheduled_in=timedelta(hours=-1))
    return flow_run.id


async def _deleted_deployment(world: World) -> UUID:
    # Deleting a deployment deletes its scheduled runs too, so the window is between the
    # sweep's read of the run and its read of the run's deployment.
    run_id = await one_run(world)
    deployment_id = world.notes["deployment"].id
    rule = world.proxy.add_rule(method="GET", path=rf"/api/deployments/{deployment_id}$", delay=3.0, times=1)

    async def delete_when_read() -> None:
        for _ in range(6000):  # up to 120 s: a busy SQLite server can stall a request for a minute
            if rule.fired:
                break
            await asyncio.sleep(0.02)
        assert rule.fired, "the sweep never read the run's deployment"
        await world.client.request("DELETE", f"deployments/{deployment_id}")

    world.during = delete_when_read
    return run_id


async def _paused_pool(world: World) -> UUID:
    run_id = await one_run(world)
    await world.client.update_work_pool(world.name, is_paused=True)
    return run_id


async def _paused_queue(world: World) -> UUID:
    run_id = await one_run(world)
    await world.client.update_work_queue(world.name, "default", is_paused=True)
    return run_id


async def _unknown_push_type(world: World) -> UUID:
    return await one_run(world, type="no-such-backend:push", template=recording_template())


async def _run_deleted_between_read_and_claim(world: World) -> UUID:
    run_id = await one_run(world)
    rule = world.proxy.add_rule(method="POST", path=rf"/api/flow_runs/{run_id}/set_state", delay=3.0, times=1)

    async def delete_when_claimed() -> None:
        for _ in range(6000):  # up to 120 s: a busy SQLite server can stall a request for a minute
            if rule.fired:
                break
            await asyncio.sleep(0.02)
        assert rule.fired, "the sweep never tried to claim the run"
        await world.client.delete_flow_run(run_id)

    world.during = delete_when_claimed
    return run_id


async def _pool_deleted_mid_sweep(world: World) -> UUID:
    run_id = await one_run(world)
    rule = world.proxy.add_rule(
        method="POST", path=rf"/api/work_pools/{world.name}/queues/filter", delay=3.0, times=1
    )

    async def delete_when_read() -> None:
        for _ in range(6000):  # up to 120 s: a busy SQLite server can stall a request for a minute
            if rule.fired:
                break
            await asyncio.sleep(0.02)
        assert rule.fired, "the sweep never read the pool's runs"
        await world.client.delete_work_pool(world.name)

    world.during = delete_when_read
    return run_id


def _ecs(**defaults: Any) -> Callable[[World], Awaitable[UUID]]:
    async def setup(world: World) -> UUID:
        block_id = await make_credentials_block(world.client, f"{world.name}-creds", world.moto.endpoint_url)
        cluster = defaults.pop("cluster", world.name)
        template = ecs_template(aws_credentials={"$ref": {"block_document_id": block_id}}, cluster=cluster, **defaults)
        return await one_run(world, type="ecs:push", template=template, job_variables={"image": "repo/flows:1"})

    return setup


def _ecs_missing_cluster(world: World) -> Awaitable[UUID]:
    return _ecs(cluster=f"{world.name}-nowhere")(world)


def _ecs_bad_subnet(world: World) -> Awaitable[UUID]:
    world.moto.client("ecs").create_cluster(clusterName=world.name)
    return _ecs(network_configuration={"subnets": ["subnet-0000dead"], "assignPublicIp": "DISABLED"})(world)


def _ecs_missing_vpc(world: World) -> Awaitable[UUID]:
    world.moto.client("ecs").create_cluster(clusterName=world.name)
    return _ecs(vpc_id="vpc-0000dead")(world)


SWEEP_CASES = [
    SweepCase("wrong-typed-job-variable", _retype_memory, "CRASHED", ("invalid job variable", "memory", "string"),
              outcome=RunOutcome.CRASHED),
    SweepCase("unknown-job-variable-closed-schema", _closed_schema_unknown_variable, "CRASHED", ("memroy",),
              outcome=RunOutcome.CRASHED),
    SweepCase("placeholder-of-a-missing-variable", _missing_placeholder, "CRASHED", ("memory", "integer"),
              outcome=RunOutcome.CRASHED),
    SweepCase("ref-to-a-deleted-block", _deleted_block_reference, "CRASHED", ("block document", "token", "no longer exists"),
              outcome=RunOutcome.CRASHED),
    SweepCase("blocks-placeholder-to-a-missing-block", _missing_block_placeholder, "CRASHED",
              ("secret/no-such-block", "not found"), outcome=RunOutcome.CRASHED),
    SweepCase("provider-refuses-the-submission", _provider_refuses, "CRASHED", ("quota exceeded",),
              outcome=RunOutcome.CRASHED),
    SweepCase("run-later-than-its-late-run-threshold", _too_late, "CANCELLED", ("late",),
              outcome=RunOutcome.CANCELLED),
    SweepCase("deployment-deleted-before-claim", _deleted_deployment, "GONE", proxy=True,
              outcome=RunOutcome.SKIPPED),
    SweepCase("paused-pool", _paused_pool, "SCHEDULED"),
    SweepCase("paused-queue", _paused_queue, "SCHEDULED"),
    SweepCase("unknown-push-type", _unknown_push_type, "SCHEDULED"),
    SweepCase("run-deleted-between-read-and-claim", _run_deleted_between_read_and_claim, "GONE", proxy=True,
              outcome=RunOutcome.SKIPPED),
    SweepCase("pool-deleted-mid-sweep", _pool_deleted_mid_sweep, "SCHEDULED", proxy=True),
    SweepCase("ecs-missing-cluster", _ecs_missing_cluster, "CRASHED", ("cluster", "-nowhere", "does not exist"),
              moto=True, outcome=RunOutcome.CRASHED),
    SweepCase("ecs-subnet-that-does-not-exist", _ecs_bad_subnet, "CRASHED", ("subnet-0000dead",), moto=True,
              outcome=RunOutcome.CRASHED),
    SweepCase("ecs-vpc-that-does-not-exist", _ecs_missing_vpc, "CRASHED", ("vpc-0000dead",), moto=True,
              outcome=RunOutcome.CRASHED),
]


@pytest.fixture
def healthy(prefect_server, record_file, unique_name):
    """A healthy recording:push pool with one due run, for the same sweep."""
    name = f"{unique_name}-ok"

    async def setup():
        async with client_for(prefect_server.api_url) as client:
            await make_pool(client, name)
            deployment = await make_deployment(client, name, name=name)
            [flow_run] = await make_runs(client, deployment, 1)
            return flow_run.id

    return name, run(setup())


@pytest.mark.parametrize("case", SWEEP_CASES, ids=[c.id for c in SWEEP_CASES])
def test_bad_input_in_a_sweep(case: SweepCase, request, prefect_server, record_file, unique_name, healthy, caplog) -> None:
    healthy_pool, healthy_run = healthy
    moto = request.getfixturevalue("moto_server") if case.moto else None
    if moto is not None:
        moto.freeze_ecs_tasks()
    api = prefect_server.api_url
    caplog.set_level(logging.INFO)

    async def go():
        proxy = FaultProxy(upstream=api.removesuffix("/api")).start() if case.proxy else None
        try:
            async with client_for(api) as client:
                world = World(client=client, api_url=api, name=unique_name, moto=moto, proxy=proxy)
                bad_run = await case.setup(world)
                sweep_api = proxy.url + "/api" if proxy else api
                async with client_for(sweep_api) as sweep_client:
                    dispatcher = Dispatcher(sweep_client, Settings(api_url=sweep_api, prefetch_seconds=10))
                    sweeping = dispatcher.sweep([unique_name, healthy_pool])
                    if world.during is not None:
                        summary, _ = await asyncio.gather(sweeping, world.during())
                    else:
                        summary = await sweeping
                try:
                    after = await client.read_flow_run(bad_run)
                except ObjectNotFound:
                    after = None
                healthy_after = await client.read_flow_run(healthy_run)
                return bad_run, summary, after, healthy_after
        finally:
            if proxy is not None:
                proxy.stop()

    bad_run, summary, after, healthy_after = run(go())
    outcomes = {r.flow_run_id: r for r in summary.runs}

    # The dispatcher kept serving the others: the healthy run was submitted in the same sweep.
    assert outcomes[healthy_run].outcome == RunOutcome.SUBMITTED, summary
    assert healthy_after.infrastructure_pid and submit_counts(record_file)[str(healthy_run)] == 1

    if case.outcome is None:
        assert bad_run not in outcomes, summary
    else:
        assert outcomes[bad_run].outcome == case.outcome, summary
    if case.state == "GONE":
        assert after is None
        return
    assert after is not None
    assert after.state.type == StateType(case.state), (after.state, summary)
    message = (after.state.message or "").lower()
    for word in case.words:
        assert word.lower() in message, f"{word!r} not in the state message {after.state.message!r}"
    if case.state == "SCHEDULED":
        assert not after.infrastructure_pid
    if case.id == "unknown-push-type":
        assert any("no provider for this pool's type" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- the webhook catalogue


@dataclass(frozen=True)
class WebhookCase:
    id: str
    body: Callable[[dict[str, Any]], bytes]  # from a valid event
    headers: Callable[[bytes], dict[str, str]]
    status: int
    words: tuple[str, ...] = ()


def _event_bytes(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


BEARER = lambda body: {"Authorization": f"Bearer {SECRET}"}  # noqa: E731

WEBHOOK_CASES = [
    WebhookCase("not-json", lambda e: b"<xml>not json</xml>", BEARER, 400, ("not json",)),
    WebhookCase("json-but-not-an-object", lambda e: b"[1, 2, 3]", BEARER, 400, ("not a prefect event",)),
    WebhookCase("json-but-not-an-event", lambda e: b'{"hello": "world"}', BEARER, 400, ("not a prefect event", "id")),
    WebhookCase("unsigned", _event_bytes, lambda body: {}, 401, ("missing credentials",)),
    WebhookCase("wrong-secret", _event_bytes, lambda body: {"Authorization": "Bearer nope"}, 401, ("wrong",)),
    WebhookCase("wrongly-signed", _event_bytes, lambda body: {"X-Pushpool-Signature": sign(body, "not-the-secret")},
                401, ("wrong",)),
    WebhookCase("signed-for-another-body", _event_bytes,
                lambda body: {"X-Pushpool-Signature": sign(body + b" ", SECRET)}, 401, ("wrong",)),
    WebhookCase("oversize", lambda e: b'{"pad": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}', BEARER, 413, ("256 kb",)),
    WebhookCase("an-event-that-is-not-about-a-flow-run",
                lambda e: _event_bytes({**e, "resource": {"prefect.resource.id": "prefect.deployment.x"}}), BEARER,
                200, ("not about a flow run",)),
]


async def _new_due_run(api: str, pool: str) -> UUID:
    async with client_for(api) as client:
        deployment = await make_deployment(client, pool, name=f"d-{uuid.uuid4().hex[:6]}")
        [flow_run] = await make_runs(client, deployment, 1)
        return flow_run.id


@pytest.fixture
def webhook_pool(prefect_server, record_file, unique_name, monkeypatch):
    async def setup():
        async with client_for(prefect_server.api_url) as client:
            return await make_pool(client, unique_name)

    pool = run(setup())
    for key in ("PUSHPOOL_SECRETS_ARN", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PREFECT_API_URL", prefect_server.api_url)
    monkeypatch.setenv("PUSHPOOL_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("PUSHPOOL_POOLS", unique_name)
    return pool


def lambda_door(body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    reply = aws_lambda.handler(function_url_request(body, headers), LambdaContext())
    return reply["statusCode"], json.loads(reply["body"])


def asgi_door(api: str, pool: str) -> Callable[[bytes, dict[str, str]], tuple[int, dict[str, Any]]]:
    app = create_app(Settings(api_url=api, webhook_secret=SecretStr(SECRET), pools=[pool]))

    def send(body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        async def go():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://dispatcher") as http:
                response = await http.post("/webhook", content=body, headers={"content-type": "application/json", **headers})
                return response.status_code, response.json()

        return run(go())

    return send


@pytest.mark.parametrize("door", ["lambda-function-url", "asgi"])
@pytest.mark.parametrize("case", WEBHOOK_CASES, ids=[c.id for c in WEBHOOK_CASES])
def test_bad_webhook(case: WebhookCase, door: str, prefect_server, webhook_pool, record_file) -> None:
    api = prefect_server.api_url
    send = lambda_door if door == "lambda-function-url" else asgi_door(api, webhook_pool.name)
    bad_target = run(_new_due_run(api, webhook_pool.name))
    body = case.body(scheduled_event(bad_target, webhook_pool))

    status, answer = send(body, case.headers(body))

    assert status == case.status, answer
    text = json.dumps(answer).lower()
    for word in case.words:
        assert word.lower() in text, answer
    assert SECRET not in text
    assert submit_counts(record_file)[str(bad_target)] == 0  # a refused webhook starts nothing

    # The door still serves: a good webhook for the same (still due) run dispatches it.
    good = _event_bytes(scheduled_event(bad_target, webhook_pool))
    status, answer = send(good, {"Authorization": f"Bearer {SECRET}"})
    assert status == 200 and answer["submitted"] == 1, answer
    assert submit_counts(record_file)[str(bad_target)] == 1


@pytest.mark.parametrize("door", ["lambda-function-url", "asgi"])
def test_a_replayed_webhook_starts_nothing_twice(door: str, prefect_server, webhook_pool, record_file) -> None:
    api = prefect_server.api_url
    send = lambda_door if door == "lambda-function-url" else asgi_door(api, webhook_pool.name)
    target = run(_new_due_run(api, webhook_pool.name))
    body = _event_bytes(scheduled_event(target, webhook_pool))
    signed = {"X-Pushpool-Signature": sign(body, SECRET)}

    first = send(body, signed)
    replayed = [send(body, signed) for _ in range(3)]

    assert first[0] == 200 and first[1]["submitted"] == 1, first
    for status, answer in replayed:
        assert status == 200 and answer["submitted"] == 0 and answer["claimed"] == 0, answer
    assert submit_counts(record_file)[str(target)] == 1


LAMBDA_EVENT_CASES = [
    ("ecs-task-not-started-by-pushpool", lambda: ecs_task_state_change(
        {"taskArn": "arn:aws:ecs:us-east-1:123456789012:task/c/abc", "clusterArn": "arn:aws:ecs:us-east-1:123456789012:cluster/c",
         "taskDefinitionArn": "arn:aws:ecs:us-east-1:123456789012:task-definition/x:1", "startedBy": "ecs-svc/123"}),
     "not started by pushpool"),
    ("ecs-task-of-an-unknown-flow-run", lambda: ecs_task_state_change(
        {"taskArn": "arn:aws:ecs:us-east-1:123456789012:task/c/def", "clusterArn": "arn:aws:ecs:us-east-1:123456789012:cluster/c",
         "taskDefinitionArn": "arn:aws:ecs:us-east-1:123456789012:task-definition/x:1", "startedBy": str(uuid.uuid4())}),
     None),
    ("unknown-eventbridge-event", lambda: {"source": "aws.s3", "detail-type": "Object Created", "detail": {}},
     "unrecognised event"),
    ("not-an-object", lambda: ["tick"], "not an event object"),
    ("malformed-requestContext", lambda: {"requestContext": ["http"], "body": "{}"}, "unrecognised event"),
    ("function-url-with-a-non-string-body", lambda: {**function_url_request("{}"), "body": 12345678}, "not a string"),
]


@pytest.mark.parametrize("make, words", [c[1:] for c in LAMBDA_EVENT_CASES], ids=[c[0] for c in LAMBDA_EVENT_CASES])
def test_bad_lambda_event(make, words, prefect_server, webhook_pool, record_file) -> None:
    api = prefect_server.api_url
    target = run(_new_due_run(api, webhook_pool.name))

    reply = aws_lambda.handler(make(), LambdaContext())

    text = json.dumps(reply).lower()
    if words:
        assert words in text, reply
    assert "statuscode" not in text or reply["statusCode"] == 400, reply
    assert reply.get("submitted", 0) == 0 and reply.get("crashed", 0) == 0, reply
    assert submit_counts(record_file)[str(target)] == 0
    # ...and the function still serves: the next tick dispatches the due run.
    tick = aws_lambda.handler({"pushpool": "tick"}, LambdaContext())
    assert tick["submitted"] >= 1 and submit_counts(record_file)[str(target)] == 1, tick
