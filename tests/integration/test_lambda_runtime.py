"""The serverless runtime through its AWS Lambda door: `dispatcher.aws_lambda.handler`
invoked in-process with real event JSON (EventBridge Scheduler input, ECS Task
State Change events, Lambda Function URL requests), against a real Prefect
server and moto in server mode — cancellation, crash detection, the
reconciler, exact-time wake-ups and secrets from Secrets Manager."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from dispatcher import aws_lambda
from dispatcher.models import FlowRun, StateProposal, StateType
from dispatcher.prefect_client import PrefectClient
from providers.base import RESUBMISSIONS_LABEL
from tests.support.ecs import ecs_target, ecs_template, make_credentials_block, tasks_in
from tests.support.factories import client_for, make_deployment, make_pool, make_runs
from tests.support.fault_proxy import FaultProxy

pytestmark = pytest.mark.integration

SECRET = "webhook-canary-9f3c2a"
FUNCTION_ARN = "arn:aws:lambda:us-east-1:123456789012:function:pushpool-dispatcher"


@dataclass
class LambdaContext:
    function_name: str = "pushpool-dispatcher"
    function_version: str = "$LATEST"
    invoked_function_arn: str = FUNCTION_ARN
    memory_limit_in_mb: int = 512
    aws_request_id: str = "3f0b7a51-0000-4000-8000-000000000000"
    log_group_name: str = "/aws/lambda/pushpool-dispatcher"
    log_stream_name: str = "2026/12/01/[$LATEST]0000"


def run(coro):
    return asyncio.run(coro)


def invoke(event: Any) -> Any:
    return aws_lambda.handler(event, LambdaContext())


def scheduler_tick() -> dict[str, Any]:
    """What the EventBridge Scheduler schedule of terraform/modules/dispatcher-aws sends."""
    return {"pushpool": "tick"}


def ecs_task_state_change(task: dict[str, Any], *, exit_code: int | None = 1) -> dict[str, Any]:
    """An EventBridge "ECS Task State Change" event for a STOPPED task, shaped as AWS sends it."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "ECS Task State Change",
        "source": "aws.ecs",
        "account": "123456789012",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "region": "us-east-1",
        "resources": [task["taskArn"]],
        "detail": {
            "clusterArn": task["clusterArn"],
            "taskArn": task["taskArn"],
            "taskDefinitionArn": task["taskDefinitionArn"],
            "startedBy": task.get("startedBy"),
            "lastStatus": "STOPPED",
            "desiredStatus": "STOPPED",
            "stopCode": "EssentialContainerExited",
            "stoppedReason": "Essential container in task exited",
            "containers": [
                {"name": "prefect", "lastStatus": "STOPPED", "exitCode": exit_code, "taskArn": task["taskArn"]}
            ],
        },
    }


def function_url_request(body: str | bytes, headers: dict[str, str] | None = None, method: str = "POST") -> dict[str, Any]:
    """A Lambda Function URL (payload format 2.0) request."""
    text = body.decode() if isinstance(body, bytes) else body
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": "/webhook",
        "rawQueryString": "",
        "headers": {"content-type": "application/json", **(headers or {})},
        "requestContext": {
            "http": {"method": method, "path": "/webhook", "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1"},
            "requestId": str(uuid.uuid4()),
        },
        "body": text,
        "isBase64Encoded": False,
    }


def cancelling_event(flow_run: FlowRun, pool_id: str, pool_name: str) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "event": "prefect.flow-run.Cancelling",
        "occurred": datetime.now(timezone.utc).isoformat(),
        "resource": {"prefect.resource.id": f"prefect.flow-run.{flow_run.id}", "prefect.state-type": "CANCELLING"},
        "related": [
            {"prefect.resource.id": f"prefect.work-pool.{pool_id}", "prefect.resource.role": "work-pool",
             "prefect.resource.name": pool_name, "prefect.work-pool.type": "ecs:push"}
        ],
        "payload": {},
    }


async def read_run(api: str, run_id) -> FlowRun:
    async with client_for(api) as client:
        return await client.read_flow_run(run_id)


async def set_state(api: str, run_id, state: StateType, *, force: bool = False, name: str | None = None):
    async with client_for(api) as client:
        return await client.set_flow_run_state(run_id, StateProposal(type=state, name=name), force=force)


@pytest.fixture
def lambda_env(prefect_server, moto_server, monkeypatch, unique_name):
    """The Lambda's environment: the Prefect API URL and webhook secret from a
    Secrets Manager secret (in moto), only this test's pool served, AWS via moto."""
    for key, value in {
        "AWS_ENDPOINT_URL": moto_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "PUSHPOOL_POOLS": unique_name,
        "PUSHPOOL_PENDING_TIMEOUT_SECONDS": "0.5",
        "PUSHPOOL_PREFETCH_SECONDS": "10",
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PUSHPOOL_WEBHOOK_SECRET", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    secret = moto_server.client("secretsmanager").create_secret(
        Name=f"pushpool/{unique_name}",
        SecretString=json.dumps({"PREFECT_API_URL": prefect_server.api_url, "PUSHPOOL_WEBHOOK_SECRET": SECRET}),
    )
    monkeypatch.setenv("PUSHPOOL_SECRETS_ARN", secret["ARN"])
    return prefect_server.api_url


@pytest.fixture
def ecs_pool(moto_server, lambda_env, unique_name, request):
    """An ecs:push pool on its own moto cluster, with tasks frozen RUNNING, and
    one deployment; `endpoint` (param) lets a test put a proxy before moto."""
    moto_server.freeze_ecs_tasks()
    moto_server.client("ecs").create_cluster(clusterName=unique_name)

    def make(endpoint_url: str = moto_server.endpoint_url, **defaults: Any):
        async def setup():
            async with client_for(lambda_env) as client:
                block_id = await make_credentials_block(client, f"{unique_name}-creds", endpoint_url)
                template = ecs_template(
                    aws_credentials={"$ref": {"block_document_id": block_id}}, cluster=unique_name, **defaults
                )
                pool = await make_pool(client, unique_name, "ecs:push", base_job_template=template)
                deployment = await make_deployment(client, unique_name, job_variables={"image": "repo/flows:1"})
                return pool, deployment

        return run(setup())

    return make


def new_runs(api: str, deployment, count: int = 1, **kwargs) -> list[FlowRun]:
    async def go():
        async with client_for(api) as client:
            return await make_runs(client, deployment, count, **kwargs)

    return run(go())


# ---------------------------------------------------------------- the tick


def test_a_tick_dispatches_due_runs_with_secrets_from_secrets_manager(lambda_env, ecs_pool, moto_server, unique_name):
    pool, deployment = ecs_pool()
    due = new_runs(lambda_env, deployment, 2)
    [later] = new_runs(lambda_env, deployment, 1, scheduled_in=timedelta(hours=1))

    result = invoke(scheduler_tick())

    assert result["trigger"] == "tick" and result["submitted"] == 2, result
    assert len(result["dispatch_latency_seconds"]) == 2
    tasks = tasks_in(moto_server, unique_name)
    assert sorted(t["startedBy"] for t in tasks) == sorted(str(r.id) for r in due)
    for flow_run in due:
        assert run(read_run(lambda_env, flow_run.id)).infrastructure_pid
    assert run(read_run(lambda_env, later.id)).current_state_type == StateType.SCHEDULED
    assert SECRET not in json.dumps(result)

    # A second tick changes nothing: level-triggered.
    again = invoke(scheduler_tick())
    assert again["submitted"] == 0 and again["crashed"] == 0, again
    assert len(tasks_in(moto_server, unique_name)) == 2


def test_a_tick_arranges_an_exact_time_wake_up_for_a_run_due_before_the_next_tick(
    lambda_env, ecs_pool, moto_server, monkeypatch, unique_name
):
    scheduler = moto_server.client("scheduler")
    group = f"wake-{unique_name}"
    scheduler.create_schedule_group(Name=group)
    monkeypatch.setenv("PUSHPOOL_WAKE_ROLE_ARN", "arn:aws:iam::123456789012:role/pushpool-scheduler")
    monkeypatch.setenv("PUSHPOOL_WAKE_GROUP", group)
    pool, deployment = ecs_pool()
    [soon] = new_runs(lambda_env, deployment, 1, scheduled_in=timedelta(seconds=14))

    result = invoke(scheduler_tick())

    assert result["submitted"] == 0, result  # not due within the 10 s prefetch yet
    [name] = result["wakeups"]
    schedule = scheduler.get_schedule(Name=name, GroupName=group)
    assert schedule["ActionAfterCompletion"] == "DELETE"
    assert schedule["Target"]["Arn"] == FUNCTION_ARN
    payload = json.loads(schedule["Target"]["Input"])
    assert payload["pushpool"] == "wake"
    moment = datetime.fromisoformat(payload["at"])
    due = run(read_run(lambda_env, soon.id)).next_scheduled_start_time
    # The moment the run enters the prefetch window (10 s before it is due)...
    assert timedelta(0) <= moment - (due - timedelta(seconds=10)) < timedelta(seconds=1)
    # ...and a schedule that fires (somewhere in its minute: 60 s precision) before it.
    assert schedule["ScheduleExpression"].startswith("at(")
    fires = datetime.fromisoformat(schedule["ScheduleExpression"][3:-1]).replace(tzinfo=timezone.utc)
    assert fires.second == 0 and fires + timedelta(seconds=60) <= moment

    # What EventBridge Scheduler then sends: the woken invocation waits for the moment and claims the run.
    woken = invoke(payload)
    assert woken["trigger"] == "wake" and woken["submitted"] == 1, woken
    claimed = run(read_run(lambda_env, soon.id))
    pending = claimed.state.timestamp
    assert pending >= moment - timedelta(seconds=0.5)

    # The same tick again arranges nothing new (the run is claimed; the schedule stays one).
    invoke(scheduler_tick())
    names = [s["Name"] for s in scheduler.list_schedules(GroupName=group)["Schedules"]]
    assert names == [name]


# ---------------------------------------------------------------- cancellation


def test_cancelling_webhook_stops_the_ecs_task_and_marks_the_run_cancelled(lambda_env, ecs_pool, moto_server, unique_name):
    pool, deployment = ecs_pool()
    [flow_run] = new_runs(lambda_env, deployment, 1)
    assert invoke(scheduler_tick())["submitted"] == 1
    submitted = run(read_run(lambda_env, flow_run.id))
    assert run(set_state(lambda_env, flow_run.id, StateType.CANCELLING, name="Cancelling")).status.value == "ACCEPT"

    body = json.dumps(cancelling_event(flow_run, str(pool.id), pool.name))
    reply = invoke(function_url_request(body, {"authorization": f"Bearer {SECRET}"}))

    assert reply["statusCode"] == 200, reply
    assert json.loads(reply["body"])["cancelled"] == 1
    [task] = tasks_in(moto_server, unique_name)
    assert task["lastStatus"] == "STOPPED"
    assert "cancelled" in task["stoppedReason"].lower()
    after = run(read_run(lambda_env, flow_run.id))
    assert after.current_state_type == StateType.CANCELLED
    assert submitted.infrastructure_pid in after.state.message
    assert SECRET not in reply["body"]


def test_a_cancelling_run_without_infrastructure_is_cancelled_by_the_reconciler(lambda_env, ecs_pool, unique_name):
    pool, deployment = ecs_pool()
    [flow_run] = new_runs(lambda_env, deployment, 1)
    run(set_state(lambda_env, flow_run.id, StateType.PENDING))  # claimed, never launched
    run(set_state(lambda_env, flow_run.id, StateType.CANCELLING, name="Cancelling"))

    invoke(scheduler_tick())

    after = run(read_run(lambda_env, flow_run.id))
    assert after.current_state_type == StateType.CANCELLED
    assert "no infrastructure" in after.state.message


# ---------------------------------------------------------------- the reconciler


def test_a_claimed_run_whose_submission_was_lost_is_resubmitted_once(lambda_env, ecs_pool, moto_server, unique_name):
    pool, deployment = ecs_pool()
    [flow_run] = new_runs(lambda_env, deployment, 1)
    # A dispatcher claimed it and died before launching anything.
    assert run(set_state(lambda_env, flow_run.id, StateType.PENDING, name="Pending")).status.value == "ACCEPT"
    time.sleep(0.6)  # past PUSHPOOL_PENDING_TIMEOUT_SECONDS

    result = invoke(scheduler_tick())

    assert result["resubmitted"] == 1, result
    [task] = tasks_in(moto_server, unique_name)
    after = run(read_run(lambda_env, flow_run.id))
    assert after.infrastructure_pid == f"{task['clusterArn']}::{task['taskArn']}"
    assert after.labels[RESUBMISSIONS_LABEL] == "1"
    assert invoke(scheduler_tick())["resubmitted"] == 0
    assert len(tasks_in(moto_server, unique_name)) == 1


def test_a_run_claimed_and_never_recorded_is_crashed_after_the_resubmissions(
    lambda_env, ecs_pool, monkeypatch, unique_name
):
    monkeypatch.setenv("PUSHPOOL_MAX_RESUBMISSIONS", "0")
    pool, deployment = ecs_pool()
    [flow_run] = new_runs(lambda_env, deployment, 1)
    run(set_state(lambda_env, flow_run.id, StateType.PENDING))
    time.sleep(0.6)

    invoke(scheduler_tick())

    after = run(read_run(lambda_env, flow_run.id))
    assert after.current_state_type == StateType.CRASHED
    assert "never recorded" in after.state.message


def test_a_run_past_its_maximum_run_time_is_cancelled_and_its_task_stopped(lambda_env, ecs_pool, moto_server, unique_name):
    pool, deployment = ecs_pool(max_run_time_seconds=3)
    [flow_run] = new_runs(lambda_env, deployment, 1)
    invoke(scheduler_tick())
    run(set_state(lambda_env, flow_run.id, StateType.RUNNING))  # the flow started in its container
    invoke(scheduler_tick())
    assert run(read_run(lambda_env, flow_run.id)).current_state_type == StateType.RUNNING
    time.sleep(3.2)

    invoke(scheduler_tick())

    after = run(read_run(lambda_env, flow_run.id))
    assert after.current_state_type == StateType.CANCELLED
    [task] = tasks_in(moto_server, unique_name)
    assert task["lastStatus"] == "STOPPED"
    states = run(_state_messages(lambda_env, flow_run.id))
    assert any("maximum run time of 3 s" in message for message in states), states


async def _state_messages(api: str, run_id) -> list[str]:
    async with client_for(api) as client:
        return [s.message or "" for s in await client.read_flow_run_states(run_id)]


def test_a_run_later_than_the_pools_threshold_is_skipped_not_started(lambda_env, ecs_pool, moto_server, unique_name):
    pool, deployment = ecs_pool(late_run_threshold_seconds=60)
    [late] = new_runs(lambda_env, deployment, 1, scheduled_in=timedelta(minutes=-5))
    [on_time] = new_runs(lambda_env, deployment, 1)

    result = invoke(scheduler_tick())

    assert result["submitted"] == 1 and result["cancelled"] == 1, result
    skipped = run(read_run(lambda_env, late.id))
    assert skipped.current_state_type == StateType.CANCELLED
    assert "late_run_threshold_seconds (60)" in skipped.state.message
    assert [t["startedBy"] for t in tasks_in(moto_server, unique_name)] == [str(on_time.id)]


# ---------------------------------------------------------------- ECS task state changes


def exit_code_rewriter(exit_code: int, reason: str):
    """Make moto's DescribeTasks report what a failing container reports (moto
    always says exit code 0): the proxy rewrites the JSON answer."""

    def rewrite(body: bytes) -> bytes:
        document = json.loads(body)
        for task in document.get("tasks", []):
            if task.get("lastStatus") == "STOPPED":
                task["stopCode"] = "EssentialContainerExited"
                for container in task.get("containers", []):
                    container["exitCode"] = exit_code
                    container["reason"] = reason
        return json.dumps(document).encode()

    return rewrite


def test_an_ecs_task_that_exits_non_zero_crashes_its_run_with_the_reason(lambda_env, ecs_pool, moto_server, unique_name):
    with FaultProxy(upstream=moto_server.endpoint_url) as proxy:
        proxy.add_rule(
            match_headers=ecs_target("DescribeTasks"),
            rewrite=exit_code_rewriter(137, "OutOfMemoryError: Container killed due to memory usage"),
        )
        pool, deployment = ecs_pool(endpoint_url=proxy.url)
        [flow_run] = new_runs(lambda_env, deployment, 1)
        invoke(scheduler_tick())
        run(set_state(lambda_env, flow_run.id, StateType.RUNNING))
        [task] = tasks_in(moto_server, unique_name)
        moto_server.client("ecs").stop_task(
            cluster=unique_name, task=task["taskArn"], reason="Essential container in task exited"
        )

        result = invoke(ecs_task_state_change(task, exit_code=137))

    assert result["crashed"] == 1, result
    after = run(read_run(lambda_env, flow_run.id))
    assert after.current_state_type == StateType.CRASHED
    message = after.state.message
    assert "exit code 137" in message
    assert "EssentialContainerExited" in message and "Essential container in task exited" in message
    assert "OutOfMemoryError" in message


def test_a_run_that_completed_before_its_task_stopped_is_left_completed(lambda_env, ecs_pool, moto_server, unique_name):
    pool, deployment = ecs_pool()
    [flow_run] = new_runs(lambda_env, deployment, 1)
    invoke(scheduler_tick())
    run(set_state(lambda_env, flow_run.id, StateType.RUNNING))
    run(set_state(lambda_env, flow_run.id, StateType.COMPLETED))
    [task] = tasks_in(moto_server, unique_name)
    moto_server.client("ecs").stop_task(cluster=unique_name, task=task["taskArn"], reason="Essential container in task exited")

    result = invoke(ecs_task_state_change(task, exit_code=0))

    assert result["crashed"] == 0, result
    assert run(read_run(lambda_env, flow_run.id)).current_state_type == StateType.COMPLETED
    # Nor does the reconciler touch it.
    invoke(scheduler_tick())
    assert run(read_run(lambda_env, flow_run.id)).current_state_type == StateType.COMPLETED


def test_a_running_run_whose_task_vanished_is_crashed_by_the_tick(lambda_env, ecs_pool, moto_server, unique_name):
    pool, deployment = ecs_pool()
    [flow_run] = new_runs(lambda_env, deployment, 1)
    invoke(scheduler_tick())
    run(set_state(lambda_env, flow_run.id, StateType.RUNNING))
    [task] = tasks_in(moto_server, unique_name)
    moto_server.client("ecs").stop_task(cluster=unique_name, task=task["taskArn"], reason="Host EC2 instance terminated")

    invoke(scheduler_tick())  # the stop event was lost; the reconciler finds it

    after = run(read_run(lambda_env, flow_run.id))
    assert after.current_state_type == StateType.CRASHED
    assert "Host EC2 instance terminated" in after.state.message


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "event, expected",
    [
        ("a string", "not an event object"),
        ({"source": "aws.s3", "detail-type": "Object Created"}, "unrecognised event"),
        ({"source": "aws.ecs", "detail-type": "ECS Task State Change", "detail": {"lastStatus": "RUNNING"}}, "not STOPPED"),
        (
            {"source": "aws.ecs", "detail-type": "ECS Task State Change",
             "detail": {"lastStatus": "STOPPED", "startedBy": "ecs-svc/123"}},
            "not started by pushpool",
        ),
        ({"pushpool": "explode"}, "unrecognised event"),
    ],
)
def test_events_that_are_not_for_the_dispatcher_are_ignored_without_raising(lambda_env, event, expected):
    result = invoke(event)
    assert expected in result["ignored"]


@pytest.mark.parametrize(
    "headers, body, status, says",
    [
        ({}, "{}", 401, "missing credentials"),
        ({"authorization": "Bearer wrong"}, "{}", 401, "wrong"),
        ({"authorization": f"Bearer {SECRET}"}, "not json", 400, "not JSON"),
        ({"authorization": f"Bearer {SECRET}"}, '{"hello": "world"}', 400, "not a Prefect event"),
        ({"x-pushpool-secret": SECRET}, "[1, 2]", 400, "expected a JSON object"),
        ({"authorization": f"Bearer {SECRET}"}, "x" * (256 * 1024 + 1), 413, "256 KB"),
    ],
)
def test_bad_webhook_requests_get_a_clear_4xx(lambda_env, headers, body, status, says):
    reply = invoke(function_url_request(body, headers))
    assert reply["statusCode"] == status
    assert says in json.loads(reply["body"])["error"]
    assert SECRET not in reply["body"]


def test_a_replayed_cancelling_event_for_a_finished_run_changes_nothing(lambda_env, ecs_pool, moto_server, unique_name):
    pool, deployment = ecs_pool()
    [flow_run] = new_runs(lambda_env, deployment, 1)
    invoke(scheduler_tick())
    run(set_state(lambda_env, flow_run.id, StateType.RUNNING))
    run(set_state(lambda_env, flow_run.id, StateType.COMPLETED))

    body = json.dumps(cancelling_event(flow_run, str(pool.id), pool.name))
    reply = invoke(function_url_request(body, {"authorization": f"Bearer {SECRET}"}))

    assert reply["statusCode"] == 200
    assert run(read_run(lambda_env, flow_run.id)).current_state_type == StateType.COMPLETED
    [task] = tasks_in(moto_server, unique_name)
    assert task["lastStatus"] != "STOPPED"


def test_health_over_the_function_url(lambda_env):
    reply = invoke(function_url_request("", method="GET") | {"rawPath": "/health"})
    assert reply["statusCode"] == 200 and json.loads(reply["body"]) == {"status": "ok"}


def test_an_unreadable_secret_is_a_clear_error_not_a_crash(lambda_env, monkeypatch):
    monkeypatch.setenv("PUSHPOOL_SECRETS_ARN", "arn:aws:secretsmanager:us-east-1:123456789012:secret:missing-AbCdEf")
    result = invoke(scheduler_tick())
    assert "could not read PUSHPOOL_SECRETS_ARN" in result["error"]


def test_a_run_whose_cancellation_the_server_timed_out_still_gets_its_task_stopped(
    lambda_env, ecs_pool, moto_server, unique_name
):
    """Prefect's server marks a run CANCELLING for 300 s Cancelled by itself, and
    for :push pools it stops nothing: the reconciler stops the task, once."""
    from dispatcher.cancellation import INFRASTRUCTURE_STOPPED_LABEL

    pool, deployment = ecs_pool()
    [flow_run] = new_runs(lambda_env, deployment, 1)
    invoke(scheduler_tick())
    run(set_state(lambda_env, flow_run.id, StateType.RUNNING))

    async def time_out():
        async with client_for(lambda_env) as client:
            await client.set_flow_run_state(
                flow_run.id,
                StateProposal(
                    type=StateType.CANCELLED, name="Cancelled",
                    message="Flow run cancellation timed out; marked this flow run as Cancelled.",
                ),
                force=True,
            )

    run(time_out())
    [task] = tasks_in(moto_server, unique_name)
    assert task["lastStatus"] != "STOPPED"

    invoke(scheduler_tick())

    [task] = tasks_in(moto_server, unique_name)
    assert task["lastStatus"] == "STOPPED"
    after = run(read_run(lambda_env, flow_run.id))
    assert after.current_state_type == StateType.CANCELLED
    assert after.labels[INFRASTRUCTURE_STOPPED_LABEL] == "true"


def test_a_crashed_tasks_message_ends_with_the_last_lines_of_its_cloudwatch_log_stream(
    lambda_env, ecs_pool, moto_server, unique_name
):
    with FaultProxy(upstream=moto_server.endpoint_url) as proxy:
        proxy.add_rule(match_headers=ecs_target("DescribeTasks"), rewrite=exit_code_rewriter(1, "exited"))
        pool, deployment = ecs_pool(
            endpoint_url=proxy.url,
            configure_cloudwatch_logs=True,
            cloudwatch_logs_prefix=unique_name,
            execution_role_arn="arn:aws:iam::123456789012:role/prefect-ecs-execution-role",
        )
        [flow_run] = new_runs(lambda_env, deployment, 1)
        invoke(scheduler_tick())
        [task] = tasks_in(moto_server, unique_name)
        logs = moto_server.client("logs")
        stream = f"{unique_name}/prefect/{task['taskArn'].rsplit('/', 1)[-1]}"
        try:
            logs.create_log_group(logGroupName="prefect")
        except logs.exceptions.ResourceAlreadyExistsException:
            pass
        logs.create_log_stream(logGroupName="prefect", logStreamName=stream)
        now_ms = int(time.time() * 1000)
        logs.put_log_events(
            logGroupName="prefect",
            logStreamName=stream,
            logEvents=[
                {"timestamp": now_ms, "message": "Traceback (most recent call last):"},
                {"timestamp": now_ms + 1, "message": "ModuleNotFoundError: No module named 'pandas'"},
            ],
        )
        moto_server.client("ecs").stop_task(cluster=unique_name, task=task["taskArn"], reason="Essential container in task exited")

        invoke(ecs_task_state_change(task, exit_code=1))

    message = run(read_run(lambda_env, flow_run.id)).state.message
    assert "exit code 1" in message
    assert "last log lines: Traceback (most recent call last): | ModuleNotFoundError: No module named 'pandas'" in message


def test_a_crashed_run_that_is_rescheduled_gets_a_new_task(lambda_env, ecs_pool, moto_server, unique_name):
    """Idempotency is per claim: a resubmission of the same claim finds its task
    (even stopped), but a run Prefect gave back (CRASHED → SCHEDULED) is launched anew."""
    pool, deployment = ecs_pool()
    [flow_run] = new_runs(lambda_env, deployment, 1)
    invoke(scheduler_tick())
    [first] = tasks_in(moto_server, unique_name)
    moto_server.client("ecs").stop_task(cluster=unique_name, task=first["taskArn"], reason="CannotPullContainerError")
    invoke(scheduler_tick())  # the reconciler: infrastructure exited under a PENDING run
    assert run(read_run(lambda_env, flow_run.id)).current_state_type == StateType.CRASHED

    assert run(set_state(lambda_env, flow_run.id, StateType.SCHEDULED)).status.value == "ACCEPT"
    result = invoke(scheduler_tick())

    assert result["submitted"] == 1, result
    tasks = tasks_in(moto_server, unique_name)
    assert len(tasks) == 2
    [second] = [t for t in tasks if t["taskArn"] != first["taskArn"]]
    assert run(read_run(lambda_env, flow_run.id)).infrastructure_pid.endswith(second["taskArn"])
