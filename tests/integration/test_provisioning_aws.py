"""`pushpool work-pool create --provision-infra`, `provision-infra` and
`deprovision-infra` against moto (server mode) and a real Prefect server, run as
a user runs them. The moto server is shared with other tests: assertions are
about resources tagged with this test's pool, and each test removes what it made."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher.prefect_client import ObjectNotFound
from provisioning.aws_ecs import (
    CLUSTER_NAME,
    EXECUTION_ROLE_NAME,
    POLICY_NAME,
    REPOSITORY_NAME,
    SUBMISSION_ACTIONS,
    USER_NAME,
    VPC_NAME,
)
from tests.support.factories import client_for, pushpool_command, run_pushpool

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------- helpers


@pytest.fixture
def aws_env(api_env: dict[str, str], moto_server) -> dict[str, str]:
    env = {k: v for k, v in api_env.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=moto_server.endpoint_url,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_CONFIG_FILE="/nonexistent",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
    )
    return env


@pytest.fixture
def pool(aws_env: dict[str, str], unique_name: str, moto_server) -> Iterator[str]:
    """A pool name; whatever was provisioned for it is torn down afterwards."""
    yield unique_name
    run_pushpool(aws_env, "work-pool", "deprovision-infra", unique_name, "--yes")
    assert not owned_resources(moto_server, unique_name), "teardown left tagged resources"


def is_owned(tags: Any, pool: str) -> bool:
    tag_map = {t.get("Key", t.get("key")): t.get("Value", t.get("value")) for t in tags or []}
    return tag_map.get("pushpool:pool") == pool and tag_map.get("pushpool:managed") == "true"


def owned_resources(moto, pool: str) -> dict[str, list[str]]:
    """Every resource carrying this pool's tags, by kind."""
    iam, ecs, ec2, ecr = (moto.client(s) for s in ("iam", "ecs", "ec2", "ecr"))
    found: dict[str, list[str]] = {}

    def add(kind: str, ident: str) -> None:
        found.setdefault(kind, []).append(ident)

    for user in iam.list_users()["Users"]:
        if is_owned(iam.list_user_tags(UserName=user["UserName"])["Tags"], pool):
            add("user", user["UserName"])
    for role in iam.list_roles()["Roles"]:
        if is_owned(iam.list_role_tags(RoleName=role["RoleName"])["Tags"], pool):
            add("role", role["RoleName"])
    for policy in iam.list_policies(Scope="Local")["Policies"]:
        if is_owned(iam.list_policy_tags(PolicyArn=policy["Arn"])["Tags"], pool):
            add("policy", policy["PolicyName"])
    arns = ecs.list_clusters()["clusterArns"]
    if arns:
        for cluster in ecs.describe_clusters(clusters=arns, include=["TAGS"])["clusters"]:
            if cluster["status"] == "ACTIVE" and is_owned(cluster.get("tags"), pool):
                add("cluster", cluster["clusterName"])
    for repo in ecr.describe_repositories()["repositories"]:
        if is_owned(ecr.list_tags_for_resource(resourceArn=repo["repositoryArn"])["tags"], pool):
            add("repository", repo["repositoryName"])
    for vpc in ec2.describe_vpcs()["Vpcs"]:
        if is_owned(vpc.get("Tags"), pool):
            add("vpc", vpc["VpcId"])
    for subnet in ec2.describe_subnets()["Subnets"]:
        if is_owned(subnet.get("Tags"), pool):
            add("subnet", subnet["SubnetId"])
    for gateway in ec2.describe_internet_gateways()["InternetGateways"]:
        if is_owned(gateway.get("Tags"), pool):
            add("internet_gateway", gateway["InternetGatewayId"])
    for table in ec2.describe_route_tables()["RouteTables"]:
        if is_owned(table.get("Tags"), pool):
            add("route_table", table["RouteTableId"])
    for group in ec2.describe_security_groups()["SecurityGroups"]:
        if is_owned(group.get("Tags"), pool):
            add("security_group", group["GroupId"])
    return found


def resource_counts(moto) -> dict[str, int]:
    """How many of each kind exist in the account, tagged or not."""
    iam, ecs, ec2, ecr = (moto.client(s) for s in ("iam", "ecs", "ec2", "ecr"))
    users = iam.list_users()["Users"]
    return {
        "users": len(users),
        "access_keys": sum(len(iam.list_access_keys(UserName=u["UserName"])["AccessKeyMetadata"]) for u in users),
        "roles": len(iam.list_roles()["Roles"]),
        "policies": len(iam.list_policies(Scope="Local")["Policies"]),
        "clusters": len(ecs.list_clusters()["clusterArns"]),
        "repositories": len(ecr.describe_repositories()["repositories"]),
        "vpcs": len(ec2.describe_vpcs()["Vpcs"]),
        "subnets": len(ec2.describe_subnets()["Subnets"]),
        "gateways": len(ec2.describe_internet_gateways()["InternetGateways"]),
        "route_tables": len(ec2.describe_route_tables()["RouteTables"]),
        "security_groups": len(ec2.describe_security_groups()["SecurityGroups"]),
    }


def read_pool(api_url: str, name: str):
    async def read():
        async with client_for(api_url) as client:
            return await client.read_work_pool(name)

    return asyncio.run(read())


def read_block(api_url: str, name: str):
    async def read():
        async with client_for(api_url) as client:
            try:
                return await client.read_block_document_by_name("aws-credentials", name)
            except ObjectNotFound:
                return None

    return asyncio.run(read())


def defaults(pool) -> dict[str, Any]:
    return {
        name: prop["default"]
        for name, prop in pool.base_job_template["variables"]["properties"].items()
        if "default" in prop and name in ("aws_credentials", "cluster", "vpc_id", "execution_role_arn")
    }


def flat(text: str) -> str:
    return " ".join(text.split())


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


# ---------------------------------------------------------------- tests


def test_provision_reprovision_and_deprovision(prefect_server, aws_env, pool, moto_server, tmp_path):
    profiles = Path(aws_env["PREFECT_HOME"]) / "profiles.toml"
    profiles.parent.mkdir(parents=True, exist_ok=True)
    profiles.write_text('active = "dev"\n\n[profiles.dev]\nPREFECT_API_URL = "http://example.invalid/api"\n')
    before = resource_counts(moto_server)

    result = ok(run_pushpool(aws_env, "work-pool", "create", pool, "--type", "ecs:push", "--provision-infra", "--yes"))
    out = flat(result.stdout)
    for name in (USER_NAME, POLICY_NAME, EXECUTION_ROLE_NAME, CLUSTER_NAME, REPOSITORY_NAME, f"{pool}-aws-credentials"):
        assert name in out
    assert "Infrastructure successfully provisioned" in out
    assert "Created work pool" in out

    # The resources exist, tagged for this pool; moto's default VPC is usable, so no VPC was made.
    owned = owned_resources(moto_server, pool)
    assert owned == {
        "user": [USER_NAME], "role": [EXECUTION_ROLE_NAME], "policy": [POLICY_NAME],
        "cluster": [CLUSTER_NAME], "repository": [REPOSITORY_NAME],
    }
    iam = moto_server.client("iam")
    assert {p["PolicyName"] for p in iam.list_attached_user_policies(UserName=USER_NAME)["AttachedPolicies"]} == {POLICY_NAME}
    assert "AmazonECSTaskExecutionRolePolicy" in {
        p["PolicyName"] for p in iam.list_attached_role_policies(RoleName=EXECUTION_ROLE_NAME)["AttachedPolicies"]
    }
    policy_arn = f"arn:aws:iam::123456789012:policy/{POLICY_NAME}"
    document = iam.get_policy_version(PolicyArn=policy_arn, VersionId="v1")["PolicyVersion"]["Document"]
    actions = [a for s in document["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])]
    assert not any("*" in a for a in actions)
    pass_role = [s for s in document["Statement"] if s["Action"] == "iam:PassRole"]
    assert pass_role[0]["Resource"] == [f"arn:aws:iam::123456789012:role/{EXECUTION_ROLE_NAME}"]
    assert sorted(actions) == sorted(SUBMISSION_ACTIONS + ["iam:PassRole"])
    cluster = moto_server.client("ecs").describe_clusters(clusters=[CLUSTER_NAME])["clusters"][0]
    assert set(cluster.get("capacityProviders", [])) == {"FARGATE", "FARGATE_SPOT"}
    assert len(iam.list_access_keys(UserName=USER_NAME)["AccessKeyMetadata"]) == 1

    # The block holds the key; the pool's template points at it and at the resources.
    block = read_block(prefect_server.api_url, f"{pool}-aws-credentials")
    assert block is not None
    key_id = iam.list_access_keys(UserName=USER_NAME)["AccessKeyMetadata"][0]["AccessKeyId"]
    assert block.data["aws_access_key_id"] == key_id
    assert block.data["region_name"] == "us-east-1"
    assert block.data["aws_secret_access_key"] not in result.stdout + result.stderr
    created = read_pool(prefect_server.api_url, pool)
    assert created.type == "ecs:push"
    assert defaults(created) == {
        "aws_credentials": {"$ref": {"block_document_id": str(block.id)}},
        "cluster": CLUSTER_NAME,
        "execution_role_arn": f"arn:aws:iam::123456789012:role/{EXECUTION_ROLE_NAME}",
    }

    # Next steps: the registry, a password-less login line, the profile's build namespace.
    registry = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
    assert f"{registry}/{REPOSITORY_NAME}" in out
    assert f"docker login --username AWS --password-stdin {registry}" in out
    assert f'PREFECT_DEFAULT_DOCKER_BUILD_NAMESPACE = "{registry}"' in profiles.read_text()
    assert 'PREFECT_API_URL = "http://example.invalid/api"' in profiles.read_text()

    # Again: everything is detected, nothing is created, no second key.
    after_first = resource_counts(moto_server)
    assert after_first["users"] == before["users"] + 1 and after_first["clusters"] == before["clusters"] + 1
    again = ok(run_pushpool(aws_env, "work-pool", "provision-infra", pool, "--yes"))
    assert "nothing was created" in flat(again.stdout)
    assert " create " not in flat(again.stdout).replace("│", " ")
    assert resource_counts(moto_server) == after_first
    assert read_block(prefect_server.api_url, f"{pool}-aws-credentials").id == block.id
    assert defaults(read_pool(prefect_server.api_url, pool)) == defaults(created)

    # Untagged look-alikes the user made themselves must survive the teardown.
    ecs, ec2 = moto_server.client("ecs"), moto_server.client("ec2")
    ecs.create_cluster(clusterName=f"{pool}-mine")
    iam.create_role(RoleName=f"{pool}-mine", AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": []}))
    my_vpc = ec2.create_vpc(CidrBlock="10.77.0.0/16", TagSpecifications=[
        {"ResourceType": "vpc", "Tags": [{"Key": "Name", "Value": VPC_NAME}]}])["Vpc"]["VpcId"]
    try:
        result = ok(run_pushpool(aws_env, "work-pool", "deprovision-infra", pool, "--yes"))
        assert "Infrastructure removed" in flat(result.stdout)
        assert owned_resources(moto_server, pool) == {}
        assert read_block(prefect_server.api_url, f"{pool}-aws-credentials") is None
        assert defaults(read_pool(prefect_server.api_url, pool)) == {}
        assert resource_counts(moto_server)["access_keys"] == before["access_keys"]
        assert ecs.describe_clusters(clusters=[f"{pool}-mine"])["clusters"][0]["status"] == "ACTIVE"
        assert iam.get_role(RoleName=f"{pool}-mine")["Role"]["RoleName"] == f"{pool}-mine"
        assert ec2.describe_vpcs(VpcIds=[my_vpc])["Vpcs"]
        # A second teardown finds nothing of this pool's.
        assert "Nothing to remove" in flat(ok(run_pushpool(aws_env, "work-pool", "deprovision-infra", pool, "--yes")).stdout)
    finally:
        ecs.delete_cluster(cluster=f"{pool}-mine")
        iam.delete_role(RoleName=f"{pool}-mine")
        ec2.delete_vpc(VpcId=my_vpc)


def test_dry_run_and_unconfirmed_runs_change_nothing(prefect_server, aws_env, pool, moto_server):
    before = resource_counts(moto_server)

    # create --provision-infra with no terminal and no --yes: an error, and not even the pool is made.
    refused = subprocess.run(
        pushpool_command("work-pool", "create", pool, "--type", "ecs:push", "--provision-infra"),
        env=aws_env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )
    assert refused.returncode == 1
    assert "--yes" in flat(refused.stderr)
    assert USER_NAME in refused.stdout  # the plan was shown first
    with pytest.raises(ObjectNotFound):
        read_pool(prefect_server.api_url, pool)

    ok(run_pushpool(aws_env, "work-pool", "create", pool, "--type", "ecs:push"))
    dry = ok(run_pushpool(aws_env, "work-pool", "provision-infra", pool, "--dry-run"))
    out = flat(dry.stdout)
    assert "Dry run: nothing was changed" in out
    for name in (USER_NAME, POLICY_NAME, CLUSTER_NAME, REPOSITORY_NAME):
        assert name in out
    assert "access key" in out

    refused = subprocess.run(
        pushpool_command("work-pool", "provision-infra", pool),
        env=aws_env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )
    assert refused.returncode == 1 and "--yes" in flat(refused.stderr)

    assert resource_counts(moto_server) == before
    assert owned_resources(moto_server, pool) == {}
    assert read_block(prefect_server.api_url, f"{pool}-aws-credentials") is None
    assert defaults(read_pool(prefect_server.api_url, pool)) == {}


def test_no_access_key_uses_the_ambient_role(prefect_server, aws_env, pool, moto_server):
    ok(run_pushpool(aws_env, "work-pool", "create", pool, "--type", "ecs:push"))
    result = ok(run_pushpool(aws_env, "work-pool", "provision-infra", pool, "--no-access-key", "--yes"))
    out = flat(result.stdout)
    assert "ambient AWS role" in out
    assert USER_NAME not in out

    owned = owned_resources(moto_server, pool)
    assert "user" not in owned
    assert owned["policy"] == [POLICY_NAME] and owned["cluster"] == [CLUSTER_NAME]
    assert read_block(prefect_server.api_url, f"{pool}-aws-credentials") is None
    assert set(defaults(read_pool(prefect_server.api_url, pool))) == {"cluster", "execution_role_arn"}


@pytest.fixture
def no_default_vpc(moto_server) -> Iterator[None]:
    """Delete moto's default VPC (as Prefect's provisioner tests do); put one back afterwards."""
    ec2 = moto_server.client("ec2")
    for vpc in ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]:
        vpc_filter = [{"Name": "vpc-id", "Values": [vpc["VpcId"]]}]
        for subnet in ec2.describe_subnets(Filters=vpc_filter)["Subnets"]:
            ec2.delete_subnet(SubnetId=subnet["SubnetId"])
        for gateway in ec2.describe_internet_gateways(Filters=[{"Name": "attachment.vpc-id", "Values": [vpc["VpcId"]]}])[
            "InternetGateways"
        ]:
            ec2.detach_internet_gateway(InternetGatewayId=gateway["InternetGatewayId"], VpcId=vpc["VpcId"])
            ec2.delete_internet_gateway(InternetGatewayId=gateway["InternetGatewayId"])
        ec2.delete_vpc(VpcId=vpc["VpcId"])
    try:
        yield
    finally:
        if not ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]:
            ec2.create_default_vpc()


def test_a_vpc_is_created_when_there_is_no_default_vpc(prefect_server, aws_env, no_default_vpc, pool, moto_server):
    ok(run_pushpool(aws_env, "work-pool", "create", pool, "--type", "ecs:push"))
    plan = ok(run_pushpool(aws_env, "work-pool", "provision-infra", pool, "--dry-run"))
    assert "CIDR 172.31.0.0/16" in flat(plan.stdout)

    ok(run_pushpool(aws_env, "work-pool", "provision-infra", pool, "--no-access-key", "--yes"))
    owned = owned_resources(moto_server, pool)
    assert len(owned["vpc"]) == 1
    vpc_id = owned["vpc"][0]
    ec2 = moto_server.client("ec2")
    vpc = ec2.describe_vpcs(VpcIds=[vpc_id])["Vpcs"][0]
    assert vpc["CidrBlock"] == "172.31.0.0/16"
    assert {"Key": "Name", "Value": VPC_NAME} in vpc["Tags"]
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["Subnets"]
    assert len(subnets) == 3 and len({s["AvailabilityZone"] for s in subnets}) == 3
    assert all(s["MapPublicIpOnLaunch"] for s in subnets)
    assert len(owned["internet_gateway"]) == 1 and len(owned["route_table"]) == 1
    table = ec2.describe_route_tables(RouteTableIds=owned["route_table"])["RouteTables"][0]
    assert any(r.get("GatewayId") == owned["internet_gateway"][0] and r.get("DestinationCidrBlock") == "0.0.0.0/0"
               for r in table["Routes"])
    assert {a["SubnetId"] for a in table["Associations"] if not a.get("Main")} == {s["SubnetId"] for s in subnets}
    group = ec2.describe_security_groups(GroupIds=owned["security_group"])["SecurityGroups"][0]
    assert group["IpPermissions"] == [] and group["IpPermissionsEgress"]
    assert defaults(read_pool(prefect_server.api_url, pool))["vpc_id"] == vpc_id

    # Re-running reuses the VPC and its parts.
    before = resource_counts(moto_server)
    ok(run_pushpool(aws_env, "work-pool", "provision-infra", pool, "--no-access-key", "--yes"))
    assert resource_counts(moto_server) == before

    ok(run_pushpool(aws_env, "work-pool", "deprovision-infra", pool, "--yes"))
    assert owned_resources(moto_server, pool) == {}
    assert not ec2.describe_vpcs(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["Vpcs"]


def test_a_rerun_completes_what_an_earlier_run_left_out(prefect_server, aws_env, pool, moto_server):
    """A first pass without the key (as after a failure before the key step);
    the next run creates only what is missing and reuses the rest."""
    ok(run_pushpool(aws_env, "work-pool", "create", pool, "--type", "ecs:push"))
    ok(run_pushpool(aws_env, "work-pool", "provision-infra", pool, "--no-access-key", "--yes"))
    before = resource_counts(moto_server)

    result = ok(run_pushpool(aws_env, "work-pool", "provision-infra", pool, "--yes"))
    rows = {line.split("│")[1].strip(): line.split("│")[3].strip()
            for line in result.stdout.splitlines() if line.count("│") >= 4 and line.split("│")[3].strip()}
    assert rows["ECS cluster"] == "reuse" and rows["IAM policy"] == "reuse" and rows["IAM user"] == "create"
    after = resource_counts(moto_server)
    assert after == {**before, "users": before["users"] + 1, "access_keys": before["access_keys"] + 1}
    block = read_block(prefect_server.api_url, f"{pool}-aws-credentials")
    assert defaults(read_pool(prefect_server.api_url, pool))["aws_credentials"] == {
        "$ref": {"block_document_id": str(block.id)}
    }
