"""ECS test helpers: an aws-credentials block pointing at moto, ecs:push
templates with defaults, and reading back what moto holds."""

from __future__ import annotations

import copy
import uuid
from typing import Any

from dispatcher.prefect_client import ObjectNotFound, PrefectClient
from providers.ecs import EcsProvider


def ecs_target(action: str) -> dict[str, str]:
    return {"X-Amz-Target": rf"^AmazonEC2ContainerServiceV20141113\.{action}$"}


def credentials_for(endpoint_url: str) -> dict[str, Any]:
    return {
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing-secret",
        "region_name": "us-east-1",
        "aws_client_parameters": {"endpoint_url": endpoint_url},
    }


async def ensure_aws_credentials_block_type(client: PrefectClient) -> tuple[str, str]:
    """OSS Prefect has no aws-credentials block type unless prefect-aws registered it."""
    try:
        block_type = await client.read_block_type_by_slug("aws-credentials")
        block_type_id = str(block_type.id)
    except ObjectNotFound:
        response = await client.request(
            "POST", "block_types/", json={"name": "AWS Credentials", "slug": "aws-credentials"}
        )
        block_type_id = response.json()["id"]
    definition = EcsProvider.default_base_job_template()["variables"]["definitions"]
    fields = copy.deepcopy(definition["AwsCredentials"])
    fields["definitions"] = {"AwsClientParameters": definition["AwsClientParameters"]}
    response = await client.request(
        "POST",
        "block_schemas/",
        json={"block_type_id": block_type_id, "fields": fields, "capabilities": [], "version": "pushpool-test"},
    )
    return block_type_id, response.json()["id"]


async def make_credentials_block(client: PrefectClient, name: str, endpoint_url: str) -> str:
    block_type_id, schema_id = await ensure_aws_credentials_block_type(client)
    document = await client.create_block_document(
        name, uuid.UUID(block_type_id), uuid.UUID(schema_id), credentials_for(endpoint_url)
    )
    return str(document.id)


def ecs_template(**defaults: Any) -> dict[str, Any]:
    template = EcsProvider.default_base_job_template()
    for name, value in defaults.items():
        template["variables"]["properties"][name]["default"] = value
    return template


def tasks_in(moto_server, cluster: str, started_by: str | None = None) -> list[dict[str, Any]]:
    ecs = moto_server.client("ecs")
    arns: list[str] = []
    for status in ("RUNNING", "STOPPED"):
        kwargs: dict[str, Any] = {"cluster": cluster, "desiredStatus": status}
        if started_by:
            kwargs["startedBy"] = started_by
        arns += ecs.list_tasks(**kwargs)["taskArns"]
    if not arns:
        return []
    return ecs.describe_tasks(cluster=cluster, tasks=arns, include=["TAGS"])["tasks"]


def environment_of(task: dict[str, Any], container: str = "prefect") -> dict[str, str]:
    [override] = [c for c in task["overrides"]["containerOverrides"] if c["name"] == container]
    return {e["name"]: e["value"] for e in override["environment"]}


def revisions(moto_server, family: str) -> list[str]:
    return moto_server.client("ecs").list_task_definitions(familyPrefix=family)["taskDefinitionArns"]
