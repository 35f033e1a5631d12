"""The pure parts of `ecs:push`: template shape, task definition and RunTask
request building, normalisation, tags, stopped-task sentences."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from dispatcher.job_variables import InvalidJobVariables, validate_job_variables
from dispatcher.models import FlowRun
from providers.base import InfrastructureError
from providers.ecs import (
    EcsJobConfiguration,
    EcsProvider,
    build_run_task_request,
    build_tags,
    build_task_definition,
    default_family,
    explain_stopped_task,
    parse_infrastructure_pid,
    task_definitions_equal,
)
from providers.registry import ProviderRegistry

BUNDLED = json.loads(
    (
        Path(__import__("prefect").__file__).parent
        / "server/api/collections_data/views/aggregate-worker-metadata.json"
    ).read_text()
)["prefect-aws"]["ecs"]["default_base_job_configuration"]


def flow_run(**fields) -> FlowRun:
    values = dict(id=uuid.uuid4(), name="brave-otter", flow_id=uuid.uuid4(), deployment_id=uuid.uuid4())
    values.update(fields)
    return FlowRun(**values)


def config(**values) -> EcsJobConfiguration:
    base = {
        "task_definition": {"containerDefinitions": [{"image": "img:1", "name": "prefect"}]},
        "task_run_request": {"launchType": "FARGATE", "cluster": "c"},
        "env": {"A": "1", "PREFECT__FLOW_RUN_ID": "x"},
        "command": "prefect flow-run execute --flag 'two words'",
        "labels": {"prefect.io/flow-run-id": "x"},
    }
    base.update(values)
    return EcsJobConfiguration.model_validate(base)


def test_registered_and_template_matches_prefects_ecs_worker():
    assert ProviderRegistry(load_entry_points=False).provider_class("ecs:push") is EcsProvider
    template = EcsProvider.default_base_job_template()
    assert set(BUNDLED["variables"]["properties"]) <= set(template["variables"]["properties"])
    assert set(BUNDLED["job_configuration"]) <= set(template["job_configuration"])
    assert template["job_configuration"]["task_definition"] == BUNDLED["job_configuration"]["task_definition"]
    assert template["job_configuration"]["task_run_request"] == BUNDLED["job_configuration"]["task_run_request"]
    for name in ("prefect_api_key_secret_arn", "prefect_api_auth_string_secret_arn", "execution_role_arn"):
        assert template["job_configuration"][name] == "{{ %s }}" % name
    for name, definition in template["variables"]["definitions"].items():
        assert definition["title"], name


def test_a_block_reference_is_unambiguous_in_job_variables():
    schema = EcsProvider.default_base_job_template()["variables"]
    reference = {"aws_credentials": {"$ref": {"block_document_id": str(uuid.uuid4())}}}
    validate_job_variables(schema, {}, reference, {})  # one oneOf branch only
    with pytest.raises(InvalidJobVariables):
        validate_job_variables(BUNDLED["variables"], {}, reference, {})  # the bundled schema is ambiguous


def test_task_definition_defaults_like_prefects_worker():
    td, container = build_task_definition(
        config(configure_cloudwatch_logs=True, execution_role_arn="arn:role", prefect_api_key_secret_arn="arn:sec"),
        family="fam", region="eu-west-1", log_prefix="prefect-logs_pool_dep",
    )
    assert container == "prefect"
    assert td["cpu"] == "1024" and td["memory"] == "2048"
    assert td["requiresCompatibilities"] == ["FARGATE"] and td["networkMode"] == "awsvpc"
    assert td["family"] == "fam" and td["executionRoleArn"] == "arn:role"
    [c] = td["containerDefinitions"]
    assert c["memory"] == 2048  # container-level memory (moto needs it; equal to the task's)
    assert c["logConfiguration"]["options"]["awslogs-region"] == "eu-west-1"
    assert c["logConfiguration"]["options"]["awslogs-stream-prefix"] == "prefect-logs_pool_dep"
    assert c["secrets"] == [{"name": "PREFECT_API_KEY", "valueFrom": "arn:sec"}]
    assert "environment" not in c  # run env is never written into the task definition


def test_unnamed_container_becomes_prefect_and_a_missing_named_container_is_an_error():
    td, _ = build_task_definition(
        config(task_definition={"containerDefinitions": [{"image": "img"}]}), family="f", region=None, log_prefix="p"
    )
    assert td["containerDefinitions"][0]["name"] == "prefect"
    with pytest.raises(InfrastructureError, match="no container named 'app'"):
        build_task_definition(config(container_name="app"), family="f", region=None, log_prefix="p")


def test_normalisation_ignores_aws_added_fields_and_order():
    wanted, _ = build_task_definition(config(), family="f", region=None, log_prefix="p")
    registered = json.loads(json.dumps(wanted))
    registered.update(
        taskDefinitionArn="arn:td/f:3", revision=3, status="ACTIVE", compatibilities=["EC2", "FARGATE"],
        requiresAttributes=[{"name": "x"}], registeredAt="2024-01-01", registeredBy="me", volumes=[],
        placementConstraints=[],
    )
    registered["containerDefinitions"][0].update(cpu=0, essential=True, portMappings=[], environment=[])
    assert task_definitions_equal(wanted, registered)
    changed = json.loads(json.dumps(registered))
    changed["containerDefinitions"][0]["image"] = "img:2"
    assert not task_definitions_equal(wanted, changed)


def test_family_is_a_stable_slug():
    run = flow_run()
    family = default_family("my pool/ä", run)
    assert family == f"prefect_my-pool-_{run.flow_id}"
    no_deployment = flow_run(deployment_id=None)
    assert default_family("p", no_deployment) == f"prefect_p_{no_deployment.flow_id}"
    assert len(default_family("x" * 400, run)) == 255


def request_for(cfg: EcsJobConfiguration, run: FlowRun) -> dict:
    td, name = build_task_definition(cfg, family="f", region=None, log_prefix="p")
    return build_run_task_request(
        cfg, task_definition_arn="arn:td", task_definition=td, container_name=name, flow_run=run,
        client_token=str(run.id),
    )


def test_run_task_request_carries_env_command_token_and_tags():
    run = flow_run()
    request = request_for(config(), run)
    assert request["clientToken"] == request["startedBy"] == str(run.id)
    assert request["launchType"] == "FARGATE" and "capacityProviderStrategy" not in request
    [override] = request["overrides"]["containerOverrides"]
    assert override["name"] == "prefect"
    assert override["command"] == ["prefect", "flow-run", "execute", "--flag", "two words"]
    assert {"name": "A", "value": "1"} in override["environment"]
    assert request["tags"][0] == {"key": "prefect.io/flow-run-id", "value": "x"}
    assert "propagateTags" not in request


def test_launch_type_or_capacity_provider_strategy_never_both():
    run = flow_run()
    strategy = [{"capacityProvider": "mine", "weight": 1, "base": 0}]
    given = request_for(config(task_run_request={"launchType": "FARGATE", "capacityProviderStrategy": strategy}), run)
    assert "launchType" not in given and given["capacityProviderStrategy"] == strategy
    spot = request_for(config(task_run_request={"launchType": "FARGATE_SPOT"}), run)
    assert "launchType" not in spot
    assert spot["capacityProviderStrategy"] == [{"capacityProvider": "FARGATE_SPOT", "weight": 1}]
    plain = request_for(config(task_run_request={}), run)
    assert plain["launchType"] == "FARGATE"


def test_bundled_template_overrides_are_completed():
    """The bundled template renders `environment` as the env *variable* and may
    leave the override unnamed; the full env and the name are filled in."""
    run = flow_run()
    cfg = config(
        task_run_request={
            "launchType": "FARGATE",
            "overrides": {"containerOverrides": [{"environment": {"A": "old"}, "cpu": 512}], "cpu": 512},
        }
    )
    request = request_for(cfg, run)
    [override] = request["overrides"]["containerOverrides"]
    assert override["name"] == "prefect"
    assert {e["name"]: e["value"] for e in override["environment"]} == {"A": "1", "PREFECT__FLOW_RUN_ID": "x"}
    assert request["overrides"]["cpu"] == "512"


def test_tags_are_sanitised_and_capped():
    labels = {f"label-{i}": "v" for i in range(60)}
    labels["bad key!"] = "va|ue"
    labels["aws:reserved"] = "x"
    tags = build_tags({"team": "data"}, {**labels, "prefect.io/flow-run-id": "id"}, {})
    assert len(tags) == 50
    assert tags[0] == {"key": "prefect.io/flow-run-id", "value": "id"}
    keys = {t["key"] for t in build_tags({}, {"bad key!": "va|ue", "aws:reserved": "x"}, {})}
    assert keys == {"bad key-"}


def test_stopped_task_is_explained_in_one_sentence():
    task = {
        "lastStatus": "STOPPED",
        "stopCode": "TaskFailedToStart",
        "stoppedReason": "CannotPullContainerError: pull image manifest has been retried 5 time(s)",
        "containers": [
            {"name": "sidecar", "exitCode": 0},
            {"name": "prefect", "exitCode": 1, "reason": "OutOfMemoryError: Container killed due to memory usage"},
        ],
    }
    exit_code, reason = explain_stopped_task(task, None)
    assert exit_code == 1
    assert reason == (
        "Task stopped (TaskFailedToStart): CannotPullContainerError: pull image manifest has been retried 5 time(s)"
        " — container prefect exited with code 1: OutOfMemoryError: Container killed due to memory usage"
    )


def test_pid_format():
    assert parse_infrastructure_pid("arn:c::arn:aws:ecs:r:1:task/c/t") == ("arn:c", "arn:aws:ecs:r:1:task/c/t")
    with pytest.raises(InfrastructureError):
        parse_infrastructure_pid("just-a-task")
