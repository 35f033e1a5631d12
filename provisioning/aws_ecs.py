"""AWS resources for an `ecs:push` pool, with boto3 (no `aws` CLI).

Credentials and region come from boto3's default chain (environment, profile,
SSO, instance/Lambda role); `AWS_ENDPOINT_URL` is honoured by botocore itself.
Everything created is tagged `pushpool:pool=<pool>` and `pushpool:managed=true`;
teardown deletes only what carries both tags. Every apply step is
find-or-create, so a re-run after a failure completes the job and creates
nothing twice."""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterable
from typing import Any, Optional

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError
from rich.console import Console

from dispatcher.prefect_client import ObjectNotFound, PrefectClient
from provisioning.plan import Action, Plan, ProvisioningError, describe_error
from provisioning.prefect_side import (
    clear_template_defaults,
    create_aws_credentials_block,
    read_block,
    set_profile_setting,
    set_template_defaults,
)

TAG_POOL = "pushpool:pool"
TAG_MANAGED = "pushpool:managed"

USER_NAME = "prefect-ecs-user"
POLICY_NAME = "prefect-ecs-policy"
EXECUTION_ROLE_NAME = "prefect-ecs-execution-role"
EXECUTION_LOGS_POLICY_NAME = "prefect-ecs-execution-logs"
CLUSTER_NAME = "prefect-ecs-cluster"
VPC_NAME = "prefect-ecs-vpc"
SECURITY_GROUP_NAME = "prefect-ecs-security-group"
REPOSITORY_NAME = "prefect-flows"
FIRST_VPC_CIDR = "172.31.0.0/16"
MAX_SUBNETS = 3

# What a dispatcher needs to submit, watch and cancel ECS tasks; see the
# README's "IAM actions granted" for why each is there. No wildcard action.
SUBMISSION_ACTIONS = [
    "ecs:RegisterTaskDefinition",
    "ecs:DeregisterTaskDefinition",
    "ecs:DescribeTaskDefinition",
    "ecs:ListTaskDefinitions",
    "ecs:RunTask",
    "ecs:StopTask",
    "ecs:DescribeTasks",
    "ecs:ListTasks",
    "ecs:DescribeClusters",
    "ecs:TagResource",
    "ec2:DescribeVpcs",
    "ec2:DescribeSubnets",
    "logs:GetLogEvents",
]


def block_name_for(pool: str) -> str:
    return f"{pool}-aws-credentials"


def submission_policy(pass_role_arns: Iterable[str]) -> dict[str, Any]:
    """The least-privilege policy document for the submitter."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "PushpoolEcsSubmit", "Effect": "Allow", "Action": list(SUBMISSION_ACTIONS), "Resource": "*"},
            {
                "Sid": "PushpoolPassTaskRoles",
                "Effect": "Allow",
                "Action": "iam:PassRole",
                "Resource": sorted(set(pass_role_arns)),
                "Condition": {"StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}},
            },
        ],
    }


ECS_TASKS_TRUST = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "ecs-tasks.amazonaws.com"}, "Action": "sts:AssumeRole"}
    ],
}


def _tag_dict(tags: Optional[Iterable[dict[str, str]]]) -> dict[str, str]:
    out = {}
    for tag in tags or []:
        key = tag.get("Key", tag.get("key"))
        value = tag.get("Value", tag.get("value"))
        if key is not None:
            out[key] = value
    return out


def _error_code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


class EcsPushProvisioner:
    push_type = "ecs:push"

    def __init__(self, session: Optional[boto3.Session] = None):
        self._session = session
        self._clients: dict[str, Any] = {}
        self.region = ""
        self.account = ""
        self.partition = "aws"
        # What apply learns and later steps use.
        self.vpc_id: Optional[str] = None
        self.vpc_managed = False
        self.block_id: Optional[str] = None
        self.repository_uri: Optional[str] = None

    # ---------------------------------------------------------------- AWS session

    def _connect(self) -> None:
        if self._session is None:
            self._session = boto3.Session()
        self.region = self._session.region_name or ""
        if not self.region:
            raise ProvisioningError(
                "No AWS region is configured. Set AWS_DEFAULT_REGION (or a region in your AWS profile) and retry."
            )
        identity = self.client("sts").get_caller_identity()
        self.account = identity["Account"]
        self.partition = identity["Arn"].split(":")[1]

    def client(self, service: str):
        if service not in self._clients:
            config = Config(retries={"mode": "adaptive", "max_attempts": 8})
            self._clients[service] = self._session.client(service, region_name=self.region or None, config=config)
        return self._clients[service]

    @property
    def tags(self) -> dict[str, str]:
        return {TAG_POOL: self.pool, TAG_MANAGED: "true"}

    def _owned(self, tags: dict[str, str]) -> bool:
        return tags.get(TAG_POOL) == self.pool and tags.get(TAG_MANAGED) == "true"

    def _iam_tags(self) -> list[dict[str, str]]:
        return [{"Key": k, "Value": v} for k, v in self.tags.items()]

    @property
    def execution_role_arn(self) -> str:
        return f"arn:{self.partition}:iam::{self.account}:role/{EXECUTION_ROLE_NAME}"

    @property
    def policy_arn(self) -> str:
        return f"arn:{self.partition}:iam::{self.account}:policy/{POLICY_NAME}"

    @property
    def managed_execution_policy_arn(self) -> str:
        return f"arn:{self.partition}:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"

    @property
    def registry(self) -> str:
        suffix = "amazonaws.com.cn" if self.partition == "aws-cn" else "amazonaws.com"
        return f"{self.account}.dkr.ecr.{self.region}.{suffix}"

    def _guard(self, what: str):
        provisioner = self

        class _Guard:
            def __enter__(self):
                return provisioner

            def __exit__(self, exc_type, exc, tb):
                if exc is None or isinstance(exc, ProvisioningError):
                    return False
                if isinstance(exc, NoCredentialsError):
                    raise ProvisioningError(
                        "No AWS credentials found. Configure them as for the AWS CLI (aws configure, "
                        "AWS_PROFILE, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and retry."
                    ) from exc
                if isinstance(exc, NoRegionError):
                    raise ProvisioningError("No AWS region is configured. Set AWS_DEFAULT_REGION and retry.") from exc
                if isinstance(exc, (ClientError, BotoCoreError)):
                    raise ProvisioningError(f"AWS refused while {what}: {describe_error(exc)}") from exc
                return False

        return _Guard()

    # ---------------------------------------------------------------- plans

    async def plan_provision(self, prefect: PrefectClient, pool: str, *, access_key: bool = True) -> Plan:
        self.pool, self.prefect, self.access_key = pool, prefect, access_key
        with self._guard("reading what already exists"):
            self._connect()
            plan = Plan(title=f"Provisioning infrastructure for work pool {pool!r} (AWS account {self.account}, {self.region})")
            self._plan_execution_role(plan)
            self._plan_policy(plan)
            if access_key:
                self._plan_user(plan)
                await self._plan_credentials(plan)
            self._plan_cluster(plan)
            self._plan_network(plan)
            self._plan_repository(plan)
            await self._plan_pool_defaults(plan)
        if access_key:
            plan.notes.append(
                f"Credentials: the dispatcher will use an access key of IAM user {USER_NAME}, "
                f"stored in the Prefect block {block_name_for(pool)!r} (never printed)."
            )
        else:
            plan.notes.append(
                "Credentials: no access key (--no-access-key). The dispatcher uses its own ambient AWS role; "
                f"attach the policy {POLICY_NAME} ({self.policy_arn}) to that role."
            )
        return plan

    async def plan_deprovision(self, prefect: PrefectClient, pool: str) -> Plan:
        self.pool, self.prefect = pool, prefect
        with self._guard("reading what exists"):
            self._connect()
            plan = Plan(
                title=f"Removing the infrastructure pushpool created for work pool {pool!r} "
                f"(AWS account {self.account}, {self.region})"
            )
            await self._plan_clear_pool_defaults(plan)
            block = await read_block(prefect, block_name_for(pool))
            if block is not None:
                plan.add("Prefect block", block_name_for(pool), Action.DELETE, "aws-credentials block",
                         run=lambda: prefect.delete_block_document(block.id))
            self._plan_delete_cluster(plan)
            self._plan_delete_repository(plan)
            self._plan_delete_network(plan)
            self._plan_delete_user(plan)
            self._plan_delete_policy(plan)
            self._plan_delete_execution_role(plan)
        plan.notes.append(
            f"Only resources tagged {TAG_POOL}={pool} and {TAG_MANAGED}=true are deleted; nothing else is touched."
        )
        if not plan.steps:
            plan.notes.append("Nothing to remove: no resources are tagged for this pool.")
        return plan

    # ---------------------------------------------------------------- IAM: execution role

    def _find_role(self) -> Optional[dict[str, str]]:
        iam = self.client("iam")
        try:
            iam.get_role(RoleName=EXECUTION_ROLE_NAME)
        except ClientError as exc:
            if _error_code(exc) == "NoSuchEntity":
                return None
            raise
        return _tag_dict(iam.list_role_tags(RoleName=EXECUTION_ROLE_NAME)["Tags"])

    def _role_attached(self) -> set[str]:
        pages = self.client("iam").get_paginator("list_attached_role_policies").paginate(RoleName=EXECUTION_ROLE_NAME)
        return {p["PolicyArn"] for page in pages for p in page["AttachedPolicies"]}

    def _plan_execution_role(self, plan: Plan) -> None:
        tags = self._find_role()
        if tags is None:
            plan.add("IAM role", EXECUTION_ROLE_NAME, Action.CREATE,
                     "task execution role with AmazonECSTaskExecutionRolePolicy", run=self._ensure_execution_role)
        elif not self._owned(tags):
            plan.add("IAM role", EXECUTION_ROLE_NAME, Action.REUSE, "exists (not created for this pool; never deleted)")
        elif self.managed_execution_policy_arn not in self._role_attached():
            plan.add("IAM role", EXECUTION_ROLE_NAME, Action.UPDATE, "attach AmazonECSTaskExecutionRolePolicy",
                     run=self._ensure_execution_role)
        else:
            plan.add("IAM role", EXECUTION_ROLE_NAME, Action.REUSE, "exists, created for this pool")

    def _ensure_execution_role(self) -> None:
        iam = self.client("iam")
        if self._find_role() is None:
            iam.create_role(
                RoleName=EXECUTION_ROLE_NAME,
                AssumeRolePolicyDocument=json.dumps(ECS_TASKS_TRUST),
                Description="ECS task execution role for Prefect flow runs (pushpool)",
                Tags=self._iam_tags(),
            )
        iam.attach_role_policy(RoleName=EXECUTION_ROLE_NAME, PolicyArn=self.managed_execution_policy_arn)
        # awslogs-create-group in the task definition needs the execution role to create the log group.
        iam.put_role_policy(
            RoleName=EXECUTION_ROLE_NAME,
            PolicyName=EXECUTION_LOGS_POLICY_NAME,
            PolicyDocument=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{
                    "Effect": "Allow",
                    "Action": "logs:CreateLogGroup",
                    "Resource": f"arn:{self.partition}:logs:{self.region}:{self.account}:log-group:*",
                }],
            }),
        )

    # ---------------------------------------------------------------- IAM: policy

    def _find_policy(self) -> Optional[dict[str, Any]]:
        iam = self.client("iam")
        for page in iam.get_paginator("list_policies").paginate(Scope="Local"):
            for policy in page["Policies"]:
                if policy["PolicyName"] == POLICY_NAME:
                    return policy
        return None

    def _policy_tags(self, arn: str) -> dict[str, str]:
        return _tag_dict(self.client("iam").list_policy_tags(PolicyArn=arn)["Tags"])

    def _policy_document(self, policy: dict[str, Any]) -> Any:
        version = self.client("iam").get_policy_version(PolicyArn=policy["Arn"], VersionId=policy["DefaultVersionId"])
        document = version["PolicyVersion"]["Document"]
        if isinstance(document, str):
            from urllib.parse import unquote

            document = json.loads(unquote(document))
        return document

    @property
    def wanted_policy(self) -> dict[str, Any]:
        return submission_policy([self.execution_role_arn])

    def _plan_policy(self, plan: Plan) -> None:
        policy = self._find_policy()
        detail = f"ECS/EC2/logs actions for submission; iam:PassRole only on {EXECUTION_ROLE_NAME}"
        if policy is None:
            plan.add("IAM policy", POLICY_NAME, Action.CREATE, detail, run=self._ensure_policy)
        elif not self._owned(self._policy_tags(policy["Arn"])):
            plan.add("IAM policy", POLICY_NAME, Action.REUSE, "exists (not created for this pool; used as is, never deleted)")
        elif self._policy_document(policy) != self.wanted_policy:
            plan.add("IAM policy", POLICY_NAME, Action.UPDATE, "new default version: " + detail, run=self._ensure_policy)
        else:
            plan.add("IAM policy", POLICY_NAME, Action.REUSE, "exists, created for this pool")

    def _ensure_policy(self) -> None:
        iam = self.client("iam")
        document = json.dumps(self.wanted_policy)
        policy = self._find_policy()
        if policy is None:
            iam.create_policy(
                PolicyName=POLICY_NAME,
                PolicyDocument=document,
                Description="Least privilege for submitting Prefect flow runs to ECS (pushpool)",
                Tags=self._iam_tags(),
            )
            return
        if self._policy_document(policy) == self.wanted_policy:
            return
        versions = iam.list_policy_versions(PolicyArn=policy["Arn"])["Versions"]
        old = sorted((v for v in versions if not v["IsDefaultVersion"]), key=lambda v: v["CreateDate"])
        if len(versions) >= 5 and old:
            iam.delete_policy_version(PolicyArn=policy["Arn"], VersionId=old[0]["VersionId"])
        iam.create_policy_version(PolicyArn=policy["Arn"], PolicyDocument=document, SetAsDefault=True)

    # ---------------------------------------------------------------- IAM: user, key, block

    def _find_user(self) -> Optional[dict[str, str]]:
        iam = self.client("iam")
        try:
            iam.get_user(UserName=USER_NAME)
        except ClientError as exc:
            if _error_code(exc) == "NoSuchEntity":
                return None
            raise
        return _tag_dict(iam.list_user_tags(UserName=USER_NAME)["Tags"])

    def _user_policies(self) -> set[str]:
        pages = self.client("iam").get_paginator("list_attached_user_policies").paginate(UserName=USER_NAME)
        return {p["PolicyArn"] for page in pages for p in page["AttachedPolicies"]}

    def _plan_user(self, plan: Plan) -> None:
        tags = self._find_user()
        if tags is None:
            plan.add("IAM user", USER_NAME, Action.CREATE, f"with policy {POLICY_NAME} attached", run=self._ensure_user)
        elif self.policy_arn not in self._user_policies():
            plan.add("IAM user", USER_NAME, Action.UPDATE, f"attach policy {POLICY_NAME}", run=self._ensure_user)
        else:
            owned = "created for this pool" if self._owned(tags) else "not created for this pool; never deleted"
            plan.add("IAM user", USER_NAME, Action.REUSE, f"exists ({owned})")

    def _ensure_user(self) -> None:
        iam = self.client("iam")
        if self._find_user() is None:
            iam.create_user(UserName=USER_NAME, Tags=self._iam_tags())
        iam.attach_user_policy(UserName=USER_NAME, PolicyArn=self.policy_arn)

    async def _plan_credentials(self, plan: Plan) -> None:
        name = block_name_for(self.pool)
        block = await read_block(self.prefect, name)
        if block is not None:
            self.block_id = str(block.id)
            plan.add("Prefect block", name, Action.REUSE, "aws-credentials block exists; no new access key")
            return
        if self._find_user() is not None:
            keys = self.client("iam").list_access_keys(UserName=USER_NAME)["AccessKeyMetadata"]
            if len(keys) >= 2:
                raise ProvisioningError(
                    f"IAM user {USER_NAME} already has {len(keys)} access keys (the AWS limit is 2), so no key can "
                    f"be created for the block {name!r}. Delete an unused key of {USER_NAME}, or re-run with "
                    "--no-access-key to use the dispatcher's own role."
                )
        plan.add("Access key + Prefect block", name, Action.CREATE,
                 f"new access key of {USER_NAME}, stored in an aws-credentials block", run=self._create_credentials)

    async def _create_credentials(self) -> None:
        name = block_name_for(self.pool)
        existing = await read_block(self.prefect, name)
        if existing is not None:
            self.block_id = str(existing.id)
            return
        iam = self.client("iam")
        key = iam.create_access_key(UserName=USER_NAME)["AccessKey"]
        data: dict[str, Any] = {
            "aws_access_key_id": key["AccessKeyId"],
            "aws_secret_access_key": key["SecretAccessKey"],
            "region_name": self.region,
        }
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            data["aws_client_parameters"] = {"endpoint_url": endpoint}
        try:
            block = await create_aws_credentials_block(self.prefect, name, data)
        except BaseException:
            # No orphaned key: the block is the only place it would have been kept.
            iam.delete_access_key(UserName=USER_NAME, AccessKeyId=key["AccessKeyId"])
            raise
        self.block_id = str(block.id)

    # ---------------------------------------------------------------- ECS cluster

    def _find_cluster(self) -> Optional[dict[str, str]]:
        clusters = self.client("ecs").describe_clusters(clusters=[CLUSTER_NAME], include=["TAGS"])["clusters"]
        active = [c for c in clusters if c.get("status") == "ACTIVE"]
        return _tag_dict(active[0].get("tags")) if active else None

    def _plan_cluster(self, plan: Plan) -> None:
        tags = self._find_cluster()
        if tags is None:
            plan.add("ECS cluster", CLUSTER_NAME, Action.CREATE, "FARGATE and FARGATE_SPOT capacity providers",
                     run=self._ensure_cluster)
        else:
            owned = "created for this pool" if self._owned(tags) else "not created for this pool; never deleted"
            plan.add("ECS cluster", CLUSTER_NAME, Action.REUSE, f"exists ({owned})")

    def _ensure_cluster(self) -> None:
        if self._find_cluster() is not None:
            return
        self.client("ecs").create_cluster(
            clusterName=CLUSTER_NAME,
            capacityProviders=["FARGATE", "FARGATE_SPOT"],
            defaultCapacityProviderStrategy=[{"capacityProvider": "FARGATE", "weight": 1}],
            tags=[{"key": k, "value": v} for k, v in self.tags.items()],
        )

    # ---------------------------------------------------------------- network

    def _ec2_tag_filters(self) -> list[dict[str, Any]]:
        return [{"Name": f"tag:{k}", "Values": [v]} for k, v in self.tags.items()]

    def _tag_spec(self, resource_type: str, name: str) -> list[dict[str, Any]]:
        tags = [{"Key": "Name", "Value": name}] + self._iam_tags()
        return [{"ResourceType": resource_type, "Tags": tags}]

    def _find_own_vpc(self) -> Optional[str]:
        vpcs = self.client("ec2").describe_vpcs(
            Filters=[{"Name": "tag:Name", "Values": [VPC_NAME]}] + self._ec2_tag_filters()
        )["Vpcs"]
        return vpcs[0]["VpcId"] if vpcs else None

    def _usable_default_vpc(self) -> Optional[str]:
        ec2 = self.client("ec2")
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        for vpc in vpcs:
            subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}])["Subnets"]
            if subnets:
                return vpc["VpcId"]
        return None

    def _free_cidr(self) -> str:
        taken = [
            ipaddress.ip_network(assoc["CidrBlock"])
            for vpc in self.client("ec2").describe_vpcs()["Vpcs"]
            for assoc in vpc.get("CidrBlockAssociationSet", [{"CidrBlock": vpc["CidrBlock"]}])
        ]
        candidate = ipaddress.ip_network(FIRST_VPC_CIDR)
        while any(candidate.overlaps(t) for t in taken):
            following = int(candidate.network_address) + candidate.num_addresses
            if following >= int(ipaddress.ip_address("255.255.0.0")):
                raise ProvisioningError("No free /16 address range is left for a new VPC.")
            candidate = ipaddress.ip_network((following, 16))
        return str(candidate)

    def _availability_zones(self) -> list[str]:
        zones = self.client("ec2").describe_availability_zones(
            Filters=[{"Name": "state", "Values": ["available"]}, {"Name": "zone-type", "Values": ["availability-zone"]}]
        )["AvailabilityZones"]
        return sorted(z["ZoneName"] for z in zones)[:MAX_SUBNETS]

    def _plan_network(self, plan: Plan) -> None:
        own = self._find_own_vpc()
        if own is None:
            default = self._usable_default_vpc()
            if default is not None:
                plan.add("VPC", default, Action.SKIP, "a usable default VPC exists; tasks use it (vpc_id not set)")
                return
            plan.add("VPC", VPC_NAME, Action.CREATE, f"CIDR {self._free_cidr()}", run=self._ensure_vpc)
            plan.add("Internet gateway", VPC_NAME, Action.CREATE, "attached to the VPC", run=self._ensure_gateway)
            zones = self._availability_zones()
            plan.add("Subnets", VPC_NAME, Action.CREATE, f"one public subnet in each of {', '.join(zones)}",
                     run=self._ensure_subnets)
            plan.add("Route table", VPC_NAME, Action.CREATE, "0.0.0.0/0 via the internet gateway", run=self._ensure_routes)
            plan.add("Security group", SECURITY_GROUP_NAME, Action.CREATE, "no inbound, all outbound",
                     run=self._ensure_security_group)
            return
        self.vpc_id, self.vpc_managed = own, True
        plan.add("VPC", f"{VPC_NAME} ({own})", Action.REUSE, "exists, created for this pool")
        parts = [
            ("Internet gateway", VPC_NAME, self._find_gateway() is not None, self._ensure_gateway),
            ("Subnets", VPC_NAME, len(self._find_subnets()) >= len(self._availability_zones()), self._ensure_subnets),
            ("Route table", VPC_NAME, self._find_route_table() is not None, self._ensure_routes),
            ("Security group", SECURITY_GROUP_NAME, self._find_security_group() is not None, self._ensure_security_group),
        ]
        for kind, name, exists, run in parts:
            if exists:
                plan.add(kind, name, Action.REUSE, "exists, created for this pool")
            else:
                plan.add(kind, name, Action.CREATE, "missing from the pool's VPC", run=run)

    def _vpc_filter(self) -> list[dict[str, Any]]:
        return [{"Name": "vpc-id", "Values": [self.vpc_id]}]

    def _ensure_vpc(self) -> None:
        self.vpc_id = self._find_own_vpc()
        if self.vpc_id is None:
            ec2 = self.client("ec2")
            vpc = ec2.create_vpc(CidrBlock=self._free_cidr(), TagSpecifications=self._tag_spec("vpc", VPC_NAME))["Vpc"]
            self.vpc_id = vpc["VpcId"]
            ec2.get_waiter("vpc_available").wait(VpcIds=[self.vpc_id])
            ec2.modify_vpc_attribute(VpcId=self.vpc_id, EnableDnsHostnames={"Value": True})
        self.vpc_managed = True

    def _find_gateway(self) -> Optional[str]:
        gateways = self.client("ec2").describe_internet_gateways(
            Filters=[{"Name": "attachment.vpc-id", "Values": [self.vpc_id]}]
        )["InternetGateways"]
        return gateways[0]["InternetGatewayId"] if gateways else None

    def _ensure_gateway(self) -> None:
        if self._find_gateway() is not None:
            return
        ec2 = self.client("ec2")
        tagged = ec2.describe_internet_gateways(Filters=self._ec2_tag_filters())["InternetGateways"]
        detached = [g for g in tagged if not g.get("Attachments")]
        gateway_id = (
            detached[0]["InternetGatewayId"] if detached
            else ec2.create_internet_gateway(TagSpecifications=self._tag_spec("internet-gateway", VPC_NAME))[
                "InternetGateway"]["InternetGatewayId"]
        )
        ec2.attach_internet_gateway(InternetGatewayId=gateway_id, VpcId=self.vpc_id)

    def _find_subnets(self) -> list[dict[str, Any]]:
        return self.client("ec2").describe_subnets(Filters=self._vpc_filter() + self._ec2_tag_filters())["Subnets"]

    def _ensure_subnets(self) -> None:
        ec2 = self.client("ec2")
        existing = self._find_subnets()
        have_zones = {s["AvailabilityZone"] for s in existing}
        used = {ipaddress.ip_network(s["CidrBlock"]) for s in
                ec2.describe_subnets(Filters=self._vpc_filter())["Subnets"]}
        vpc = ec2.describe_vpcs(VpcIds=[self.vpc_id])["Vpcs"][0]
        free = (c for c in ipaddress.ip_network(vpc["CidrBlock"]).subnets(new_prefix=18)
                if not any(c.overlaps(u) for u in used))
        for zone in self._availability_zones():
            if zone in have_zones:
                continue
            cidr = next(free, None)
            if cidr is None:
                raise ProvisioningError(f"The VPC {self.vpc_id} has no free /18 range left for a subnet in {zone}.")
            subnet = ec2.create_subnet(
                VpcId=self.vpc_id, CidrBlock=str(cidr), AvailabilityZone=zone,
                TagSpecifications=self._tag_spec("subnet", f"{VPC_NAME}-{zone}"),
            )["Subnet"]
            ec2.modify_subnet_attribute(SubnetId=subnet["SubnetId"], MapPublicIpOnLaunch={"Value": True})

    def _find_route_table(self) -> Optional[dict[str, Any]]:
        tables = self.client("ec2").describe_route_tables(
            Filters=self._vpc_filter() + self._ec2_tag_filters()
        )["RouteTables"]
        return tables[0] if tables else None

    def _ensure_routes(self) -> None:
        ec2 = self.client("ec2")
        table = self._find_route_table()
        if table is None:
            table = ec2.create_route_table(
                VpcId=self.vpc_id, TagSpecifications=self._tag_spec("route-table", VPC_NAME)
            )["RouteTable"]
        table_id = table["RouteTableId"]
        gateway_id = self._find_gateway()
        if gateway_id is None:
            raise ProvisioningError(f"The VPC {self.vpc_id} has no internet gateway yet.")
        if not any(r.get("DestinationCidrBlock") == "0.0.0.0/0" for r in table.get("Routes", [])):
            ec2.create_route(RouteTableId=table_id, DestinationCidrBlock="0.0.0.0/0", GatewayId=gateway_id)
        associated = {a.get("SubnetId") for a in table.get("Associations", [])}
        for subnet in self._find_subnets():
            if subnet["SubnetId"] not in associated:
                ec2.associate_route_table(RouteTableId=table_id, SubnetId=subnet["SubnetId"])

    def _find_security_group(self) -> Optional[str]:
        groups = self.client("ec2").describe_security_groups(
            Filters=self._vpc_filter() + [{"Name": "group-name", "Values": [SECURITY_GROUP_NAME]}]
        )["SecurityGroups"]
        return groups[0]["GroupId"] if groups else None

    def _ensure_security_group(self) -> None:
        if self._find_security_group() is not None:
            return
        # A new group has no inbound rules and allows all outbound: exactly egress-only.
        self.client("ec2").create_security_group(
            GroupName=SECURITY_GROUP_NAME,
            Description="Prefect flow runs: no inbound traffic, all outbound traffic",
            VpcId=self.vpc_id,
            TagSpecifications=self._tag_spec("security-group", SECURITY_GROUP_NAME),
        )

    # ---------------------------------------------------------------- ECR

    def _find_repository(self) -> Optional[tuple[dict[str, Any], dict[str, str]]]:
        ecr = self.client("ecr")
        try:
            repo = ecr.describe_repositories(repositoryNames=[REPOSITORY_NAME])["repositories"][0]
        except ClientError as exc:
            if _error_code(exc) == "RepositoryNotFoundException":
                return None
            raise
        tags = _tag_dict(ecr.list_tags_for_resource(resourceArn=repo["repositoryArn"])["tags"])
        return repo, tags

    def _plan_repository(self, plan: Plan) -> None:
        found = self._find_repository()
        if found is None:
            plan.add("ECR repository", REPOSITORY_NAME, Action.CREATE, f"in registry {self.registry}",
                     run=self._ensure_repository)
        else:
            self.repository_uri = found[0]["repositoryUri"]
            owned = "created for this pool" if self._owned(found[1]) else "not created for this pool; never deleted"
            plan.add("ECR repository", REPOSITORY_NAME, Action.REUSE, f"exists ({owned})")

    def _ensure_repository(self) -> None:
        found = self._find_repository()
        if found is None:
            repo = self.client("ecr").create_repository(
                repositoryName=REPOSITORY_NAME,
                tags=[{"Key": k, "Value": v} for k, v in self.tags.items()],
            )["repository"]
        else:
            repo = found[0]
        self.repository_uri = repo["repositoryUri"]

    # ---------------------------------------------------------------- the pool's template

    def wanted_defaults(self) -> dict[str, Any]:
        values: dict[str, Any] = {"cluster": CLUSTER_NAME, "execution_role_arn": self.execution_role_arn}
        if self.vpc_id and self.vpc_managed:
            values["vpc_id"] = self.vpc_id
        if self.access_key and self.block_id:
            values["aws_credentials"] = {"$ref": {"block_document_id": self.block_id}}
        return values

    async def _read_template(self) -> Optional[dict[str, Any]]:
        try:
            return (await self.prefect.read_work_pool(self.pool)).base_job_template
        except ObjectNotFound:
            return None

    async def _plan_pool_defaults(self, plan: Plan) -> None:
        names = ["cluster", "execution_role_arn"]
        if self.access_key:
            names.insert(0, "aws_credentials")
        if self.vpc_managed or any(s.kind == "VPC" and s.action is Action.CREATE for s in plan.steps):
            names.append("vpc_id")
        template = await self._read_template()
        if template is not None and plan.steps and not any(s.action.changes for s in plan.steps):
            updated, _ = set_template_defaults(template, self.wanted_defaults())
            if updated == template:
                plan.add("Work pool defaults", self.pool, Action.REUSE, "already set: " + ", ".join(names))
                return
        plan.add("Work pool defaults", self.pool, Action.UPDATE, "set " + ", ".join(names), run=self._write_defaults)

    async def _write_defaults(self) -> None:
        template = await self._read_template()
        if template is None:
            raise ProvisioningError(f"Work pool {self.pool!r} does not exist.")
        if self.access_key and self.block_id is None:
            block = await read_block(self.prefect, block_name_for(self.pool))
            self.block_id = str(block.id) if block else None
        if self.vpc_id is None:
            self.vpc_id = self._find_own_vpc()
            self.vpc_managed = self.vpc_id is not None
        updated, missing = set_template_defaults(template, self.wanted_defaults())
        self.missing_variables = missing
        if updated != template:
            await self.prefect.update_work_pool(self.pool, base_job_template=updated)

    # ---------------------------------------------------------------- after apply

    def finish(self, console: Console, environ: Optional[dict[str, str]] = None) -> None:
        """What to do next: the registry, how to log in without a password on
        a command line, and the profile's default Docker build namespace."""
        if getattr(self, "missing_variables", None):
            console.print(
                f"[yellow]The pool's template has no variable for {', '.join(self.missing_variables)}; "
                "those values were not written.[/yellow]"
            )
        if self.repository_uri is None:
            found = self._find_repository()
            self.repository_uri = found[0]["repositoryUri"] if found else None
        registry = (self.repository_uri or self.registry).split("/")[0]
        console.print(f"ECR repository: [bold]{self.repository_uri or registry + '/' + REPOSITORY_NAME}[/bold]")
        console.print("Log Docker in to the registry (the password goes through a pipe, never the command line):")
        console.print(
            f"  aws ecr get-login-password --region {self.region} | "
            f"docker login --username AWS --password-stdin {registry}"
        )
        console.print(f"Build and push an image into it, e.g.:\n  docker build -t {registry}/{REPOSITORY_NAME}:latest . "
                      f"&& docker push {registry}/{REPOSITORY_NAME}:latest")
        profile = set_profile_setting("PREFECT_DEFAULT_DOCKER_BUILD_NAMESPACE", registry, environ)
        if profile is not None:
            console.print(f"Set PREFECT_DEFAULT_DOCKER_BUILD_NAMESPACE={registry} in the Prefect profile {profile!r}.")

    # ---------------------------------------------------------------- teardown

    async def _plan_clear_pool_defaults(self, plan: Plan) -> None:
        template = await self._read_template()
        if template is None:
            return
        values = await self._defaults_set_by_provisioning()
        cleared_template, cleared = clear_template_defaults(template, values)
        if cleared:

            async def clear() -> None:
                current = await self._read_template()
                if current is not None:
                    new, names = clear_template_defaults(current, await self._defaults_set_by_provisioning())
                    if names:
                        await self.prefect.update_work_pool(self.pool, base_job_template=new)

            plan.add("Work pool defaults", self.pool, Action.UPDATE, "clear " + ", ".join(cleared), run=clear)

    async def _defaults_set_by_provisioning(self) -> dict[str, Any]:
        values: dict[str, Any] = {"cluster": CLUSTER_NAME, "execution_role_arn": self.execution_role_arn}
        vpc = self._find_own_vpc()
        if vpc:
            values["vpc_id"] = vpc
        block = await read_block(self.prefect, block_name_for(self.pool))
        if block is not None:
            values["aws_credentials"] = {"$ref": {"block_document_id": str(block.id)}}
        return values

    def _plan_delete_cluster(self, plan: Plan) -> None:
        tags = self._find_cluster()
        if tags is not None and self._owned(tags):
            plan.add("ECS cluster", CLUSTER_NAME, Action.DELETE, "",
                     run=lambda: self.client("ecs").delete_cluster(cluster=CLUSTER_NAME))

    def _plan_delete_repository(self, plan: Plan) -> None:
        found = self._find_repository()
        if found is not None and self._owned(found[1]):

            def delete() -> None:
                try:
                    self.client("ecr").delete_repository(repositoryName=REPOSITORY_NAME)
                except ClientError as exc:
                    if _error_code(exc) == "RepositoryNotEmptyException":
                        raise ProvisioningError(
                            f"the repository {REPOSITORY_NAME} still holds images; delete them (or the "
                            "repository) yourself if you no longer need them, then re-run"
                        ) from exc
                    raise

            plan.add("ECR repository", REPOSITORY_NAME, Action.DELETE, "only if it holds no images", run=delete)

    def _plan_delete_network(self, plan: Plan) -> None:
        ec2 = self.client("ec2")
        for vpc in ec2.describe_vpcs(Filters=self._ec2_tag_filters())["Vpcs"]:
            vpc_id = vpc["VpcId"]
            vpc_filter = [{"Name": "vpc-id", "Values": [vpc_id]}]
            own = self._ec2_tag_filters()
            for group in ec2.describe_security_groups(Filters=vpc_filter + own)["SecurityGroups"]:
                plan.add("Security group", group["GroupId"], Action.DELETE, f"in {vpc_id}",
                         run=lambda g=group["GroupId"]: ec2.delete_security_group(GroupId=g))
            for table in ec2.describe_route_tables(Filters=vpc_filter + own)["RouteTables"]:

                def delete_table(table_id: str = table["RouteTableId"]) -> None:
                    current = ec2.describe_route_tables(RouteTableIds=[table_id])["RouteTables"][0]
                    for assoc in current.get("Associations", []):
                        if not assoc.get("Main"):
                            ec2.disassociate_route_table(AssociationId=assoc["RouteTableAssociationId"])
                    ec2.delete_route_table(RouteTableId=table_id)

                plan.add("Route table", table["RouteTableId"], Action.DELETE, f"in {vpc_id}", run=delete_table)
            for subnet in ec2.describe_subnets(Filters=vpc_filter + own)["Subnets"]:
                plan.add("Subnet", subnet["SubnetId"], Action.DELETE, f"{subnet['AvailabilityZone']} in {vpc_id}",
                         run=lambda s=subnet["SubnetId"]: ec2.delete_subnet(SubnetId=s))
            for gateway in ec2.describe_internet_gateways(Filters=own)["InternetGateways"]:
                attached = [a["VpcId"] for a in gateway.get("Attachments", [])]
                if attached and attached != [vpc_id]:
                    continue

                def delete_gateway(gateway_id: str = gateway["InternetGatewayId"], vpcs: list[str] = attached) -> None:
                    for attached_vpc in vpcs:
                        ec2.detach_internet_gateway(InternetGatewayId=gateway_id, VpcId=attached_vpc)
                    ec2.delete_internet_gateway(InternetGatewayId=gateway_id)

                plan.add("Internet gateway", gateway["InternetGatewayId"], Action.DELETE, f"from {vpc_id}",
                         run=delete_gateway)
            plan.add("VPC", vpc_id, Action.DELETE, VPC_NAME, run=lambda v=vpc_id: ec2.delete_vpc(VpcId=v))

    def _plan_delete_user(self, plan: Plan) -> None:
        tags = self._find_user()
        if tags is None or not self._owned(tags):
            return

        def delete() -> None:
            iam = self.client("iam")
            for key in iam.list_access_keys(UserName=USER_NAME)["AccessKeyMetadata"]:
                iam.delete_access_key(UserName=USER_NAME, AccessKeyId=key["AccessKeyId"])
            for arn in self._user_policies():
                iam.detach_user_policy(UserName=USER_NAME, PolicyArn=arn)
            iam.delete_user(UserName=USER_NAME)

        plan.add("IAM user", USER_NAME, Action.DELETE, "with its access keys", run=delete)

    def _plan_delete_policy(self, plan: Plan) -> None:
        policy = self._find_policy()
        if policy is None or not self._owned(self._policy_tags(policy["Arn"])):
            return

        def delete() -> None:
            iam = self.client("iam")
            arn = policy["Arn"]
            entities = iam.list_entities_for_policy(PolicyArn=arn)
            for user in entities.get("PolicyUsers", []):
                iam.detach_user_policy(UserName=user["UserName"], PolicyArn=arn)
            for role in entities.get("PolicyRoles", []):
                iam.detach_role_policy(RoleName=role["RoleName"], PolicyArn=arn)
            for group in entities.get("PolicyGroups", []):
                iam.detach_group_policy(GroupName=group["GroupName"], PolicyArn=arn)
            for version in iam.list_policy_versions(PolicyArn=arn)["Versions"]:
                if not version["IsDefaultVersion"]:
                    iam.delete_policy_version(PolicyArn=arn, VersionId=version["VersionId"])
            iam.delete_policy(PolicyArn=arn)

        plan.add("IAM policy", POLICY_NAME, Action.DELETE, "detached from whatever uses it first", run=delete)

    def _plan_delete_execution_role(self, plan: Plan) -> None:
        tags = self._find_role()
        if tags is None or not self._owned(tags):
            return

        def delete() -> None:
            iam = self.client("iam")
            for arn in self._role_attached():
                iam.detach_role_policy(RoleName=EXECUTION_ROLE_NAME, PolicyArn=arn)
            for name in iam.list_role_policies(RoleName=EXECUTION_ROLE_NAME)["PolicyNames"]:
                iam.delete_role_policy(RoleName=EXECUTION_ROLE_NAME, PolicyName=name)
            iam.delete_role(RoleName=EXECUTION_ROLE_NAME)

        plan.add("IAM role", EXECUTION_ROLE_NAME, Action.DELETE, "", run=delete)
