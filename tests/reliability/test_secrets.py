"""Canary credentials never leak.

Every credential gets a canary value: the AWS keys of the aws-credentials
block an ecs:push pool uses (pointing at moto), the Prefect API auth string
(this module's own Prefect server runs with PREFECT_SERVER_API_AUTH_STRING =
the canary, and the dispatcher gets PREFECT_API_AUTH_STRING), a PREFECT_API_KEY
(on the path where it is used: a dispatcher with only a key, which this server
refuses), and the webhook secret. The main paths run with them, and everything
they produce is captured: every log record (a handler on the root and on the
`pushpool` logger, ahead of pushpool's own redacting handler, so records are
seen as the code made them; third-party loggers at INFO), the process's stdout/stderr (capfd, which also
holds powertools' JSON lines), subprocess output, every state message in the
state history of every run, every exception text, every HTTP response body.
No canary, nor the base64 of the auth string (the Basic header's token), may
appear in any of it.

Known exception, not read here: a run's container environment legitimately
carries PREFECT_API_AUTH_STRING (task overrides are not inspected).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import httpx
import pytest
from pydantic import SecretStr

from dispatcher import aws_lambda
from dispatcher.dispatch import Dispatcher, RunOutcome
from dispatcher.http import create_app
from dispatcher.models import StateProposal, StateType
from dispatcher.prefect_client import PrefectClient
from dispatcher.settings import Settings
from dispatcher.webhook import sign
from tests.integration.test_http_app import scheduled_event
from tests.integration.test_lambda_runtime import (
    LambdaContext,
    cancelling_event,
    ecs_task_state_change,
    function_url_request,
)
from tests.support.ecs import ecs_template, ensure_aws_credentials_block_type, tasks_in
from tests.support.factories import dispatcher_env, make_deployment, make_pool, make_runs, run_pushpool
from tests.support.prefect_server import PrefectServer, start_prefect_server

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

TAG = uuid.uuid4().hex[:10]
AWS_KEY_ID = f"AKIACANARY{TAG.upper()}"
AWS_SECRET = f"canary-aws-secret-{TAG}"
AUTH_STRING = f"canary-user:canary-pass-{TAG}"
API_KEY = f"pnu_canaryapikey{TAG}"
WEBHOOK_SECRET = f"canary-webhook-{TAG}"
CANARIES = {
    "AWS access key id": AWS_KEY_ID,
    "AWS secret access key": AWS_SECRET,
    "Prefect auth string": AUTH_STRING,
    "Prefect auth string, base64": base64.b64encode(AUTH_STRING.encode()).decode(),
    "Prefect auth password": AUTH_STRING.split(":", 1)[1],
    "Prefect API key": API_KEY,
    "webhook secret": WEBHOOK_SECRET,
}


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------- capture


class Capture(logging.Handler):
    """Every log record, with its extras, as the code made it; plus every
    other text a test collects (responses, exceptions, state messages)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.texts: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = {k: v for k, v in record.__dict__.items() if k not in ("args", "msg")}
        text = f"{record.getMessage()} {json.dumps(fields, default=repr)}"
        if record.exc_info and record.exc_info[1] is not None:
            text += " " + logging.Formatter().formatException(record.exc_info)
        self.add(f"log record {record.name}", text)

    def add(self, where: str, text: Any) -> None:
        self.texts.append((where, text if isinstance(text, str) else json.dumps(text, default=repr)))

    def leaks(self) -> list[str]:
        return [
            f"{name} in {where}: {text[:300]!r}"
            for where, text in self.texts
            for name, canary in CANARIES.items()
            if canary in text
        ]


@pytest.fixture
def capture(capfd) -> Iterator[Capture]:
    handler = Capture()
    root, pushpool = logging.getLogger(), logging.getLogger("pushpool")
    old_root_level, old_pushpool_level = root.level, pushpool.level
    root.addHandler(handler)
    pushpool.handlers.insert(0, handler)  # ahead of pushpool's redacting handler: records as made
    # pushpool's own records at every level; third-party ones (httpx, botocore, ...) at INFO, the
    # most a deployment logs: botocore's DEBUG lines print request headers and bodies verbatim
    # (the SigV4 credential scope holds the access key id), which no pushpool setting turns on.
    root.setLevel(logging.INFO)
    pushpool.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        if handler in pushpool.handlers:
            pushpool.removeHandler(handler)
        root.setLevel(old_root_level)
        pushpool.setLevel(old_pushpool_level)
    out, err = capfd.readouterr()
    handler.add("stdout", out)
    handler.add("stderr", err)
    assert handler.texts, "nothing was captured"
    assert not handler.leaks(), "\n".join(handler.leaks())


# ---------------------------------------------------------------- the authenticated server and pools


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory) -> Iterator[PrefectServer]:
    server = start_prefect_server(
        tmp_path_factory.mktemp("prefect-auth-home"), extra_env={"PREFECT_SERVER_API_AUTH_STRING": AUTH_STRING}
    )
    try:
        yield server
    finally:
        server.stop()


def authed(api_url: str) -> PrefectClient:
    return PrefectClient(Settings(api_url=api_url, api_auth_string=SecretStr(AUTH_STRING)))


def dispatcher_settings(api_url: str, **extra: Any) -> Settings:
    return Settings(api_url=api_url, api_auth_string=SecretStr(AUTH_STRING), webhook_secret=SecretStr(WEBHOOK_SECRET),
                    prefetch_seconds=10, **extra)


@pytest.fixture
def aws_env(moto_server, monkeypatch):
    """The dispatcher's own (ambient) AWS identity is moto's dummy one; the canary
    keys live only in the pool's aws-credentials block."""
    for key, value in {
        "AWS_ENDPOINT_URL": moto_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PUSHPOOL_WEBHOOK_SECRET",
                "PUSHPOOL_SECRETS_ARN", "AWS_PROFILE", "PUSHPOOL_POOLS"):
        monkeypatch.delenv(key, raising=False)
    moto_server.freeze_ecs_tasks()
    return moto_server


async def make_canary_ecs_pool(client: PrefectClient, moto_server, name: str, *, cluster: str) -> Any:
    block_type_id, schema_id = await ensure_aws_credentials_block_type(client)
    block = await client.create_block_document(
        f"{name}-creds", UUID(block_type_id), UUID(schema_id),
        {"aws_access_key_id": AWS_KEY_ID, "aws_secret_access_key": AWS_SECRET, "region_name": "us-east-1",
         "aws_client_parameters": {"endpoint_url": moto_server.endpoint_url}},
    )
    template = ecs_template(aws_credentials={"$ref": {"block_document_id": str(block.id)}}, cluster=cluster)
    return await make_pool(client, name, "ecs:push", base_job_template=template)


async def record_states(capture: Capture, client: PrefectClient, run_ids: list[UUID]) -> dict[UUID, Any]:
    """Every state message in every run's state history, into the capture."""
    finals = {}
    for run_id in run_ids:
        for state in await client.read_flow_run_states(run_id):
            capture.add(f"state history of {run_id}", {"type": str(state.type), "name": state.name, "message": state.message})
        finals[run_id] = await client.read_flow_run(run_id)
        capture.add(f"flow run {run_id}", finals[run_id].model_dump(mode="json", exclude={"job_variables"}))
    return finals


# ---------------------------------------------------------------- the paths


def test_sweeps_that_submit_crash_and_cancel(auth_server, aws_env, capture, unique_name) -> None:
    api = auth_server.api_url
    moto = aws_env
    moto.client("ecs").create_cluster(clusterName=unique_name)

    async def go():
        async with authed(api) as client:
            await make_canary_ecs_pool(client, moto, unique_name, cluster=unique_name)
            good = await make_deployment(client, unique_name, name=f"{unique_name}-good", job_variables={"image": "repo/flows:1"})
            # An AWS error: a cluster that does not exist (job variable of this deployment).
            aws_error = await make_deployment(
                client, unique_name, name=f"{unique_name}-nocluster",
                job_variables={"image": "repo/flows:1", "cluster": f"{unique_name}-missing"},
            )
            # A bad job variable whose values are credentials (made invalid after creation).
            bad_var = await make_deployment(
                client, unique_name, name=f"{unique_name}-badvar",
                job_variables={"image": "repo/flows:1", "env": {"PREFECT_API_AUTH_STRING": AUTH_STRING,
                                                                "AWS_SECRET_ACCESS_KEY": AWS_SECRET}},
            )
            [submitted] = await make_runs(client, good, 1)
            [crashed_aws] = await make_runs(client, aws_error, 1)
            [crashed_var] = await make_runs(client, bad_var, 1)
            pool = await client.read_work_pool(unique_name)
            template = pool.base_job_template
            template["variables"]["properties"]["env"]["additionalProperties"] = {"type": "integer"}
            await client.update_work_pool(unique_name, base_job_template=template)

            dispatcher = Dispatcher(client, dispatcher_settings(api))
            summary = await dispatcher.sweep([unique_name])
            capture.add("sweep summary", summary.model_dump(mode="json"))

            await client.set_flow_run_state(submitted.id, StateProposal(type=StateType.CANCELLING), force=True)
            cancelled = await dispatcher.cancel(submitted.id)
            capture.add("cancel result", cancelled.model_dump(mode="json") if cancelled else None)

            ids = [submitted.id, crashed_aws.id, crashed_var.id]
            return summary, cancelled, await record_states(capture, client, ids), ids

    summary, cancelled, finals, (submitted, crashed_aws, crashed_var) = run(go())
    outcomes = {r.flow_run_id: r.outcome for r in summary.runs}
    assert outcomes == {submitted: RunOutcome.SUBMITTED, crashed_aws: RunOutcome.CRASHED, crashed_var: RunOutcome.CRASHED}
    assert cancelled is not None and cancelled.outcome == RunOutcome.CANCELLED
    assert finals[submitted].state.type == StateType.CANCELLED
    assert "does not exist" in finals[crashed_aws].state.message
    assert "env" in finals[crashed_var].state.message.lower()


@pytest.fixture
def lambda_secrets(auth_server, aws_env, monkeypatch, unique_name):
    """The Lambda's settings as the Terraform module gives them: a Secrets Manager
    secret (in moto) holding the auth string and the webhook secret."""
    secret = aws_env.client("secretsmanager").create_secret(
        Name=f"pushpool/{unique_name}",
        SecretString=json.dumps({"PREFECT_API_URL": auth_server.api_url, "PREFECT_API_AUTH_STRING": AUTH_STRING,
                                 "PUSHPOOL_WEBHOOK_SECRET": WEBHOOK_SECRET}),
    )
    monkeypatch.setenv("PUSHPOOL_SECRETS_ARN", secret["ARN"])
    monkeypatch.setenv("PUSHPOOL_POOLS", unique_name)
    monkeypatch.setenv("PUSHPOOL_PREFETCH_SECONDS", "10")
    return auth_server.api_url


def test_the_lambda_handler(lambda_secrets, aws_env, capture, unique_name) -> None:
    api = lambda_secrets
    aws_env.client("ecs").create_cluster(clusterName=unique_name)

    def invoke(event: Any) -> Any:
        try:
            reply = aws_lambda.handler(event, LambdaContext())
        except Exception as exc:  # noqa: BLE001 - the handler must not raise; record the text if it does
            capture.add("exception", f"{exc!r} {exc}")
            raise
        capture.add("lambda reply", reply)
        return reply

    async def setup():
        async with authed(api) as client:
            pool = await make_canary_ecs_pool(client, aws_env, unique_name, cluster=unique_name)
            deployment = await make_deployment(client, unique_name, name=unique_name, job_variables={"image": "repo/flows:1"})
            return pool, deployment, await make_runs(client, deployment, 2)

    pool, deployment, (hooked, cancelled) = run(setup())
    hooked_body = json.dumps(scheduled_event(hooked.id, pool)).encode()

    # Webhooks, bad: no secret, a wrong one, a wrong signature, not JSON.
    for headers, body, status in [
        ({}, hooked_body, 401),
        ({"authorization": "Bearer " + WEBHOOK_SECRET[:-1]}, hooked_body, 401),
        ({"x-pushpool-signature": sign(hooked_body, "guess")}, hooked_body, 401),
        ({"authorization": f"Bearer {WEBHOOK_SECRET}"}, b"{not json", 400),
    ]:
        assert invoke(function_url_request(body, headers))["statusCode"] == status
    # ...and good: the Scheduled webhook claims and submits that run.
    reply = invoke(function_url_request(hooked_body, {"authorization": f"Bearer {WEBHOOK_SECRET}"}))
    assert reply["statusCode"] == 200 and json.loads(reply["body"])["submitted"] >= 1, reply
    # The webhook swept the pool; a run made afterwards is the tick's.
    async def another():
        async with authed(api) as client:
            return (await make_runs(client, deployment, 1))[0]

    ticked = run(another())
    tick = invoke({"pushpool": "tick"})
    assert tick["submitted"] >= 1 and "error" not in tick, tick
    # A cancellation through the Cancelling webhook.
    run(_set_state(api, cancelled.id, StateType.CANCELLING))
    reply = invoke(function_url_request(json.dumps(cancelling_event(cancelled, str(pool.id), pool.name)),
                                        {"x-pushpool-secret": WEBHOOK_SECRET}))
    assert reply["statusCode"] == 200 and json.loads(reply["body"])["cancelled"] == 1, reply
    # An ECS event: the task of the ticked run stopped with exit code 1.
    [task] = tasks_in(aws_env, unique_name, started_by=str(ticked.id))
    run(_set_state(api, ticked.id, StateType.RUNNING))
    aws_env.client("ecs").stop_task(cluster=unique_name, task=task["taskArn"], reason="Essential container in task exited")
    stopped = invoke(ecs_task_state_change(task, exit_code=1))
    assert stopped.get("crashed") == 1, stopped

    async def states():
        async with authed(api) as client:
            return await record_states(capture, client, [ticked.id, hooked.id, cancelled.id])

    finals = run(states())
    assert finals[ticked.id].state.type == StateType.CRASHED
    assert finals[cancelled.id].state.type == StateType.CANCELLED


async def _set_state(api: str, run_id: UUID, state: StateType) -> None:
    async with authed(api) as client:
        await client.set_flow_run_state(run_id, StateProposal(type=state), force=True)


def test_the_lambda_handler_with_a_key_the_server_refuses(lambda_secrets, aws_env, capture, monkeypatch, unique_name) -> None:
    """The API-key path: Bearer <key> to a server that wants Basic auth is refused; the
    errors the dispatcher reports must not carry the key."""
    monkeypatch.delenv("PUSHPOOL_SECRETS_ARN")
    monkeypatch.setenv("PREFECT_API_URL", lambda_secrets)
    monkeypatch.setenv("PREFECT_API_KEY", API_KEY)
    monkeypatch.setenv("PUSHPOOL_WEBHOOK_SECRET", WEBHOOK_SECRET)
    monkeypatch.delenv("PUSHPOOL_POOLS")
    tick = aws_lambda.handler({"pushpool": "tick"}, LambdaContext())
    capture.add("lambda reply", tick)
    assert tick.get("error"), tick
    body = json.dumps(scheduled_event(uuid.uuid4(), type("P", (), {"id": uuid.uuid4(), "name": unique_name, "type": "ecs:push"})))
    reply = aws_lambda.handler(function_url_request(body, {"authorization": f"Bearer {WEBHOOK_SECRET}"}), LambdaContext())
    capture.add("lambda reply", reply)
    assert reply["statusCode"] == 503, reply


def test_the_asgi_app(auth_server, aws_env, capture, monkeypatch, unique_name) -> None:
    api = auth_server.api_url
    aws_env.client("ecs").create_cluster(clusterName=unique_name)
    monkeypatch.setenv("PREFECT_API_URL", api)
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", AUTH_STRING)
    monkeypatch.setenv("PUSHPOOL_WEBHOOK_SECRET", WEBHOOK_SECRET)
    monkeypatch.setenv("PUSHPOOL_POOLS", unique_name)
    monkeypatch.setenv("PUSHPOOL_PREFETCH_SECONDS", "10")

    async def go():
        async with authed(api) as client:
            pool = await make_canary_ecs_pool(client, aws_env, unique_name, cluster=unique_name)
            deployment = await make_deployment(client, unique_name, name=unique_name, job_variables={"image": "repo/flows:1"})
            [flow_run] = await make_runs(client, deployment, 1)
        app = create_app()  # settings from the environment, on the first request
        body = json.dumps(scheduled_event(flow_run.id, pool)).encode()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dispatcher") as http:
            answers = [
                await http.get("/health"),
                await http.post("/webhook", content=body),
                await http.post("/webhook", content=body, headers={"authorization": "Bearer nope"}),
                await http.post("/webhook", content=b"[]", headers={"authorization": f"Bearer {WEBHOOK_SECRET}"}),
                await http.post("/webhook", content=body, headers={"x-pushpool-signature": sign(body, WEBHOOK_SECRET)}),
            ]
        for answer in answers:
            capture.add("asgi response", f"{answer.status_code} {dict(answer.headers)} {answer.text}")
        async with authed(api) as client:
            await record_states(capture, client, [flow_run.id])
        return [a.status_code for a in answers], answers[-1].json()

    statuses, last = run(go())
    assert statuses == [200, 401, 401, 400, 200], statuses
    assert last["submitted"] == 1, last


def test_pushpool_dispatch_once_and_connect_as_subprocesses(auth_server, capture, record_file, tmp_path, unique_name) -> None:
    api = auth_server.api_url
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PUSHPOOL_", "AWS_"))}
    base.update(PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "prefect-home"), PUSHPOOL_HOME=str(tmp_path / "pp"),
                PREFECT_SERVER_ANALYTICS_ENABLED="false")

    async def setup():
        async with authed(api) as client:
            await make_pool(client, unique_name)
            deployment = await make_deployment(client, unique_name, name=unique_name)
            good = await make_runs(client, deployment, 1)
            failing = await make_runs(client, deployment, 1, job_variables={
                "env": {"PUSHPOOL_TEST_FAIL": f"refused: token {AUTH_STRING} / {WEBHOOK_SECRET}"}})
            return [r.id for r in good + failing]

    run_ids = run(setup())
    outputs = []
    with_auth = dispatcher_env(base, record_file, PREFECT_API_AUTH_STRING=AUTH_STRING,
                               PUSHPOOL_WEBHOOK_SECRET=WEBHOOK_SECRET)
    outputs.append(("dispatch --once", run_pushpool(with_auth, "dispatch", "--once", "--pool", unique_name)))
    outputs.append(("connect", run_pushpool(with_auth, "connect", "--url", "https://dispatcher.example.com/webhook",
                                            "--pool", unique_name, "--yes")))
    outputs.append(("connect --secret", run_pushpool(dict(with_auth, PUSHPOOL_WEBHOOK_SECRET=""), "connect", "--url",
                                                     "https://dispatcher.example.com/webhook", "--secret", WEBHOOK_SECRET, "--yes")))
    with_key = dispatcher_env(base, record_file, PREFECT_API_KEY=API_KEY)
    outputs.append(("dispatch --once with a refused key", run_pushpool(with_key, "dispatch", "--once", "--pool", unique_name)))
    outputs.append(("connect with a refused key", run_pushpool(dict(with_key, PUSHPOOL_WEBHOOK_SECRET=WEBHOOK_SECRET),
                                                               "connect", "--url", "https://d.example.com/webhook", "--yes")))
    for name, process in outputs:
        capture.add(f"{name} stdout", process.stdout)
        capture.add(f"{name} stderr", process.stderr)

    async def states():
        async with authed(api) as client:
            return await record_states(capture, client, run_ids)

    finals = run(states())
    codes = {name: process.returncode for name, process in outputs}
    assert codes["dispatch --once"] == 0 and codes["connect"] == 0 and codes["connect --secret"] == 0, outputs
    assert codes["dispatch --once with a refused key"] != 0 and codes["connect with a refused key"] != 0, outputs
    good, failing = run_ids
    assert finals[good].infrastructure_pid
    assert finals[failing].state.type == StateType.CRASHED and "refused" in finals[failing].state.message


def test_the_capture_sees_a_canary_wherever_it_would_leak(capfd) -> None:
    """Positive control: a canary in a raw log record (even one pushpool's handler
    would redact), in a response, or on stdout is reported."""
    from dispatcher.logs import Redactor, configure_logging, get_logger

    handler = Capture()
    pushpool = logging.getLogger("pushpool")
    configure_logging(Redactor([AUTH_STRING]))
    pushpool.handlers.insert(0, handler)
    try:
        get_logger("canary").warning("leaked %s", AUTH_STRING, extra={"detail": WEBHOOK_SECRET})
    finally:
        pushpool.removeHandler(handler)
    print(base64.b64encode(AUTH_STRING.encode()).decode())
    handler.add("stdout", capfd.readouterr().out)
    handler.add("response", {"body": AWS_SECRET})
    found = "\n".join(handler.leaks())
    for name in ("Prefect auth string in log record", "webhook secret in log record",
                 "Prefect auth string, base64 in stdout", "AWS secret access key in response"):
        assert name in found, found
