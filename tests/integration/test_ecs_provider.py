"""`ecs:push` against moto in server mode (the real boto3 over HTTP) and a real
Prefect server: dispatch, idempotency, task-definition reuse, throttling,
crash reasons, cancel and status."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from dispatcher.dispatch import Dispatcher, RunOutcome
from dispatcher.models import FlowRun, State, StateProposal, StateType

from dispatcher.retries import RetryPolicy
from dispatcher.settings import Settings
from providers.base import RESUBMISSIONS_LABEL, InfrastructureError
from providers.ecs import EcsJobConfiguration, EcsProvider
from providers.registry import ProviderRegistry
from tests.support.ecs import (
    credentials_for,
    ecs_target,
    ecs_template,
    environment_of,
    make_credentials_block,
    revisions,
    tasks_in,
)
from tests.support.factories import client_for, make_deployment, make_pool, make_runs
from tests.support.fault_proxy import FaultProxy

pytestmark = pytest.mark.integration

BUNDLED_METADATA = Path(__import__("prefect").__file__).parent / (
    "server/api/collections_data/views/aggregate-worker-metadata.json"
)
THROTTLED = {"__type": "ThrottlingException", "message": "Rate exceeded"}


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module", autouse=True)
def frozen_tasks(moto_server):
    moto_server.freeze_ecs_tasks()  # DescribeTasks would otherwise walk tasks to STOPPED


@pytest.fixture
def cluster(moto_server, unique_name) -> str:
    moto_server.client("ecs").create_cluster(clusterName=unique_name)
    return unique_name


def sweep(api_url: str, pool: str, registry: ProviderRegistry | None = None):
    async def go():
        async with client_for(api_url) as client:
            return await Dispatcher(client, Settings(api_url=api_url), registry=registry).sweep([pool])

    return run(go())


async def read_run(api_url: str, run_id) -> FlowRun:
    async with client_for(api_url) as client:
        return await client.read_flow_run(run_id)


# ---------------------------------------------------------------- dispatch through the core


def test_a_due_run_becomes_exactly_one_task_even_when_dispatched_again(
    prefect_server, moto_server, cluster, unique_name
):
    api = prefect_server.api_url

    async def setup():
        async with client_for(api) as client:
            block_id = await make_credentials_block(client, f"{unique_name}-creds", moto_server.endpoint_url)
            template = ecs_template(aws_credentials={"$ref": {"block_document_id": block_id}}, cluster=cluster)
            await make_pool(client, unique_name, "ecs:push", base_job_template=template)
            deployment = await make_deployment(client, unique_name, job_variables={"image": "repo/flows:1"})
            [flow_run] = await make_runs(client, deployment, 1)
            return flow_run

    flow_run = run(setup())
    summary = sweep(api, unique_name)
    assert [(r.flow_run_id, r.outcome) for r in summary.runs] == [(flow_run.id, RunOutcome.SUBMITTED)], summary

    [task] = tasks_in(moto_server, cluster)
    env = environment_of(task)
    assert env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert env["PREFECT_API_URL"] == api
    tags = {t["key"]: t["value"] for t in task["tags"]}
    assert tags["prefect.io/flow-run-id"] == str(flow_run.id)
    assert tags["prefect.io/work-pool-name"] == unique_name
    assert task["startedBy"] == str(flow_run.id)
    assert "secret" not in json.dumps(task["overrides"])  # credentials never reach the task
    after = run(read_run(api, flow_run.id))
    assert after.infrastructure_pid == f"{task['clusterArn']}::{task['taskArn']}"
    assert task["clusterArn"].endswith(f":cluster/{cluster}")

    # The same run dispatched again (as after a lost claim): still one task, same pid.
    async def reschedule():
        async with client_for(api) as client:
            await client.set_flow_run_state(flow_run.id, StateProposal(type=StateType.SCHEDULED), force=True)

    run(reschedule())
    again = sweep(api, unique_name)
    assert [(r.outcome, r.infrastructure_pid) for r in again.runs] == [
        (RunOutcome.SUBMITTED, after.infrastructure_pid)
    ]
    assert len(tasks_in(moto_server, cluster)) == 1


def test_bundled_prefect_ecs_worker_template_dispatches_with_the_ambient_identity(
    prefect_server, moto_server, cluster, unique_name, monkeypatch
):
    """Prefect's own ECS *worker* template, unchanged, as an ecs:push pool's template;
    no credentials block, so boto3's default chain (here: environment) is used."""
    for key, value in {
        "AWS_ENDPOINT_URL": moto_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bundled = json.loads(BUNDLED_METADATA.read_text())["prefect-aws"]["ecs"]["default_base_job_configuration"]
    api = prefect_server.api_url

    async def setup():
        async with client_for(api) as client:
            await make_pool(client, unique_name, "ecs:push", base_job_template=bundled)
            deployment = await make_deployment(client, unique_name, job_variables={"cluster": cluster})
            [flow_run] = await make_runs(client, deployment, 1, job_variables={"env": {"EXTRA": "yes"}})
            return deployment, flow_run

    deployment, flow_run = run(setup())
    summary = sweep(api, unique_name)
    assert [r.outcome for r in summary.runs] == [RunOutcome.SUBMITTED], summary
    [task] = tasks_in(moto_server, cluster)
    assert environment_of(task)["EXTRA"] == "yes"
    assert environment_of(task)["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert task["launchType"] == "FARGATE"
    family = f"prefect_{unique_name}_{deployment.flow_id}"
    assert task["taskDefinitionArn"] == revisions(moto_server, family)[0]


def test_two_deployments_with_identical_task_settings_share_one_revision(
    prefect_server, moto_server, cluster, unique_name, monkeypatch
):
    for key, value in {
        "AWS_ENDPOINT_URL": moto_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    api = prefect_server.api_url

    async def setup(image: str):
        async with client_for(api) as client:
            variables = {"cluster": cluster, "image": image, "env": {"WHICH": image}}
            tag = image.rsplit(":", 1)[-1]
            first = await make_deployment(client, unique_name, name=f"a-{tag}", job_variables=variables)
            second = await make_deployment(client, unique_name, name=f"b-{tag}", job_variables=variables)
            await make_runs(client, first, 1)
            await make_runs(client, second, 1)
            return first.flow_id

    run(_make_ecs_pool(api, unique_name))
    flow_id = run(setup("repo/flows:1"))
    assert [r.outcome for r in sweep(api, unique_name).runs] == [RunOutcome.SUBMITTED] * 2
    family = f"prefect_{unique_name}_{flow_id}"
    assert len(revisions(moto_server, family)) == 1

    run(setup("repo/flows:2"))  # a changed image: a new revision of the same family
    assert [r.outcome for r in sweep(api, unique_name).runs] == [RunOutcome.SUBMITTED] * 2
    assert len(revisions(moto_server, family)) == 2


async def _make_ecs_pool(api: str, name: str) -> None:
    async with client_for(api) as client:
        await make_pool(client, name, "ecs:push")


def test_a_missing_cluster_crashes_the_run_with_a_sentence_naming_it(prefect_server, moto_server, unique_name):
    api = prefect_server.api_url
    missing = f"{unique_name}-nowhere"

    async def setup():
        async with client_for(api) as client:
            block_id = await make_credentials_block(client, f"{unique_name}-creds", moto_server.endpoint_url)
            template = ecs_template(aws_credentials={"$ref": {"block_document_id": block_id}}, cluster=missing)
            await make_pool(client, unique_name, "ecs:push", base_job_template=template)
            deployment = await make_deployment(client, unique_name)
            [flow_run] = await make_runs(client, deployment, 1)
            return flow_run

    flow_run = run(setup())
    summary = sweep(api, unique_name)
    assert [r.outcome for r in summary.runs] == [RunOutcome.CRASHED]
    after = run(read_run(api, flow_run.id))
    assert after.state.type == StateType.CRASHED
    assert f"ECS cluster '{missing}' does not exist in us-east-1" in after.state.message
    assert "testing-secret" not in after.state.message

    direct = flow_run_for(unique_name)
    config = with_env(configuration(moto_server.endpoint_url, missing), direct)
    with pytest.raises(InfrastructureError) as raised:
        run(EcsProvider().submit(config, direct))
    assert f"ECS cluster '{missing}' does not exist in us-east-1 (account 123456789012)" in str(raised.value)


# ---------------------------------------------------------------- the provider on its own


def configuration(endpoint_url: str, cluster: str, **overrides: Any) -> EcsJobConfiguration:
    values: dict[str, Any] = {
        "aws_credentials": credentials_for(endpoint_url),
        "cluster": cluster,
        "task_definition": {"containerDefinitions": [{"image": "repo/flows:1", "name": "prefect"}]},
        "task_run_request": {"launchType": "FARGATE", "cluster": cluster},
        "command": "prefect flow-run execute",
        "env": {"PREFECT_API_URL": "http://prefect.invalid/api"},
    }
    values.update(overrides)
    return EcsJobConfiguration.model_validate(values)


def flow_run_for(pool: str, deployment_id=None) -> FlowRun:
    return FlowRun(
        id=uuid.uuid4(), name="brave-otter", flow_id=uuid.uuid4(),
        deployment_id=deployment_id or uuid.uuid4(), work_pool_name=pool,
    )


def with_env(config: EcsJobConfiguration, flow_run: FlowRun) -> EcsJobConfiguration:
    env = {**config.env, "PREFECT__FLOW_RUN_ID": str(flow_run.id)}
    return config.model_copy(update={"env": env, "labels": {"prefect.io/flow-run-id": str(flow_run.id)}})


def test_submitting_twice_launches_one_task(moto_server, cluster, unique_name):
    flow_run = flow_run_for(unique_name)
    config = with_env(configuration(moto_server.endpoint_url, cluster), flow_run)
    provider = EcsProvider()
    first = run(provider.submit(config, flow_run))
    second = run(EcsProvider().submit(config, flow_run))  # a fresh dispatcher, no shared memory
    assert first == second
    assert len(tasks_in(moto_server, cluster, started_by=str(flow_run.id))) == 1


def claimed(flow_run: FlowRun, *, resubmissions: int = 0) -> FlowRun:
    """The run as the dispatcher hands it over: PENDING in its claim (and, from
    the reconciler, labelled with its resubmission count)."""
    labels = {RESUBMISSIONS_LABEL: str(resubmissions)} if resubmissions else {}
    return flow_run.model_copy(update={"state": State(id=uuid.uuid4(), type=StateType.PENDING), "labels": labels})


def test_a_resubmission_finds_the_task_its_claim_launched_even_stopped(moto_server, cluster, unique_name):
    """The pid write after a launch was lost and the task has already exited:
    the reconciler's resubmission of the same claim launches nothing new. A
    fresh claim costs one ListTasks (RUNNING); only a resubmission also looks
    among stopped tasks, since only it can have been launched before."""
    fresh = claimed(flow_run_for(unique_name))
    config = with_env(configuration(moto_server.endpoint_url, cluster), fresh)
    calls: list[str] = []
    provider = EcsProvider()
    ecs = provider.access(config).client("ecs")
    ecs.meta.events.register("before-call.ecs.*", lambda model, **_: calls.append(model.name))
    pid = run(provider.submit(config, fresh))
    assert calls.count("ListTasks") == 1 and calls.count("RunTask") == 1, calls
    moto_server.client("ecs").stop_task(cluster=cluster, task=pid.split("::")[1], reason="Essential container exited")

    again = fresh.model_copy(update={"labels": {RESUBMISSIONS_LABEL: "1"}})
    calls.clear()
    assert run(provider.submit(config, again)) == pid
    assert calls.count("ListTasks") == 2 and "RunTask" not in calls, calls
    assert len(tasks_in(moto_server, cluster, started_by=str(fresh.id))) == 1


def test_task_definitions_are_reused_until_the_settings_change(moto_server, cluster, unique_name):
    family = f"{unique_name}-family"
    config = configuration(
        moto_server.endpoint_url, cluster,
        task_definition={"family": family, "containerDefinitions": [{"image": "repo/flows:1", "name": "prefect"}]},
    )
    provider = EcsProvider()
    pids = [run(provider.submit(with_env(config, r), r)) for r in (flow_run_for(unique_name), flow_run_for(unique_name))]
    assert len(set(pids)) == 2
    assert len(revisions(moto_server, family)) == 1, "identical settings registered a second revision"

    changed = config.model_copy(
        update={"task_definition": {"family": family, "containerDefinitions": [{"image": "repo/flows:2", "name": "prefect"}]}}
    )
    flow_run = flow_run_for(unique_name)
    run(EcsProvider().submit(with_env(changed, flow_run), flow_run))
    assert len(revisions(moto_server, family)) == 2
    [task] = tasks_in(moto_server, cluster, started_by=str(flow_run.id))
    assert task["taskDefinitionArn"].endswith(":2")


def test_throttling_on_register_and_run_task_is_retried(moto_server, cluster, unique_name):
    flow_run = flow_run_for(unique_name)
    with FaultProxy(upstream=moto_server.endpoint_url) as proxy:
        register = proxy.add_rule(
            method="POST", match_headers=ecs_target("RegisterTaskDefinition"), respond=400, body=THROTTLED, times=2
        )
        run_task = proxy.add_rule(method="POST", match_headers=ecs_target("RunTask"), respond=400, body=THROTTLED, times=2)
        config = with_env(configuration(proxy.url, cluster), flow_run)
        provider = EcsProvider(retry=RetryPolicy(attempts=6, base_delay=0.01, max_delay=0.05), botocore_max_attempts=1)
        pid = run(provider.submit(config, flow_run))
    assert register.fired == 2 and run_task.fired == 2
    [task] = tasks_in(moto_server, cluster, started_by=str(flow_run.id))
    assert pid.endswith(f"::{task['taskArn']}")


def test_throttling_that_never_ends_is_an_infrastructure_error(moto_server, cluster, unique_name):
    flow_run = flow_run_for(unique_name)
    with FaultProxy(upstream=moto_server.endpoint_url) as proxy:
        proxy.add_rule(method="POST", match_headers=ecs_target("RunTask"), respond=400, body=THROTTLED)
        config = with_env(configuration(proxy.url, cluster), flow_run)
        provider = EcsProvider(retry=RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02), botocore_max_attempts=1)
        with pytest.raises(InfrastructureError, match="throttling ecs:RunTask"):
            run(provider.submit(config, flow_run))
    assert tasks_in(moto_server, cluster, started_by=str(flow_run.id)) == []


def test_cancel_stops_the_task_and_status_explains_it(moto_server, cluster, unique_name):
    flow_run = flow_run_for(unique_name)
    config = with_env(configuration(moto_server.endpoint_url, cluster), flow_run)
    provider = EcsProvider()
    pid = run(provider.submit(config, flow_run))
    assert run(provider.status(pid, config)).state == "running"

    run(provider.cancel(pid, config))
    [task] = tasks_in(moto_server, cluster, started_by=str(flow_run.id))
    assert task["lastStatus"] == "STOPPED" and task["desiredStatus"] == "STOPPED"
    status = run(provider.status(pid, config))
    assert status.state == "exited"
    assert status.reason.startswith("Task stopped")
    assert "Cancelled by pushpool" in status.reason and "container prefect" in status.reason
    run(provider.cancel(pid, config))  # a task already stopped: not an error

    cluster_arn = pid.split("::")[0]
    gone = run(provider.status(f"{cluster_arn}::{cluster_arn.replace(':cluster/', ':task/')}/{uuid.uuid4().hex}", config))
    assert gone.state == "missing"


def test_statuses_of_many_tasks_take_one_describe_tasks_call(moto_server, cluster, unique_name):
    """What the reconciler asks once per pool and tick: running, exited and
    missing tasks of one cluster, one DescribeTasks; a malformed pid is its own error."""
    provider = EcsProvider()
    runs = [claimed(flow_run_for(unique_name)) for _ in range(3)]
    configs = [with_env(configuration(moto_server.endpoint_url, cluster), r) for r in runs]
    pids = [run(provider.submit(c, r)) for c, r in zip(configs, runs)]
    moto_server.client("ecs").stop_task(cluster=cluster, task=pids[1].split("::")[1], reason="Essential container exited")
    cluster_arn = pids[0].split("::")[0]
    missing = f"{cluster_arn}::{cluster_arn.replace(':cluster/', ':task/')}/{uuid.uuid4().hex}"

    calls: list[str] = []
    provider.access(configs[0]).client("ecs").meta.events.register(
        "before-call.ecs.*", lambda model, **_: calls.append(model.name)
    )
    answers = run(provider.statuses(
        [(pids[0], configs[0]), (pids[1], configs[1]), (missing, configs[2]), ("not-a-pid", configs[2])]
    ))
    assert calls == ["DescribeTasks"], calls
    running, exited, gone, malformed = answers
    assert running.state == "running"
    assert exited.state == "exited" and "Essential container exited" in exited.reason
    assert gone.state == "missing" and "was not found" in gone.reason
    assert isinstance(malformed, InfrastructureError) and "not an ecs:push infrastructure pid" in str(malformed)


def test_given_network_configuration_is_used_and_a_bad_subnet_is_named(moto_server, cluster, unique_name):
    ec2 = moto_server.client("ec2")
    [vpc] = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    subnet = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}])["Subnets"][0]["SubnetId"]
    flow_run = flow_run_for(unique_name)
    config = with_env(
        configuration(moto_server.endpoint_url, cluster, vpc_id=vpc["VpcId"],
                      network_configuration={"subnets": [subnet], "assignPublicIp": "DISABLED"}),
        flow_run,
    )
    run(EcsProvider().submit(config, flow_run))
    [task] = tasks_in(moto_server, cluster, started_by=str(flow_run.id))
    assert task["attachments"] or task["lastStatus"]  # launched

    bad = config.model_copy(update={"network_configuration": {"subnets": ["subnet-0000dead"]}})
    other = flow_run_for(unique_name)
    with pytest.raises(InfrastructureError, match="subnet-0000dead|Subnet"):
        run(EcsProvider().submit(with_env(bad, other), other))
