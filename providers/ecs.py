"""`ecs:push`: run each flow run as an AWS ECS task, with no worker.

The job configuration has the shape of Prefect's ECS worker (`task_definition`,
`task_run_request`, `aws_credentials`, ...; see `templates/ecs.json`), so a base
job template copied from an ECS *worker* pool works unchanged. What differs from
the worker, on purpose:

- Task definitions are reused, not churned: the wanted definition is compared
  with the latest ACTIVE revision of its family (normalised, AWS-added fields
  ignored) and a revision is registered only on a real difference. The family
  is stable per deployment (or flow) and slugified to ECS's character set.
- Submission is idempotent, keyed by the flow run id: `clientToken` and
  `startedBy` are the flow run id, and before launching, `ListTasks(startedBy=)`
  finds a task this run already has (moto ignores `clientToken`; this check
  makes idempotency hold everywhere).
- Throttling and "too many concurrent attempts to create a new revision" are
  retried with jittered back-off (botocore `adaptive` mode, then `RetryPolicy`).
- A launch type *or* a capacity-provider strategy, never both, and a given
  strategy is never overridden with FARGATE.
- `status` explains a stopped task in one sentence (stop code, stopped reason,
  container exit code and reason) instead of "exit code 1".

boto3 is synchronous: every AWS call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import re
import shlex
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar, Optional

from pydantic import Field, field_validator

from dispatcher.logs import get_logger
from dispatcher.models import FlowRun
from dispatcher.retries import RetryPolicy
from providers.base import (
    InfrastructureError,
    InfrastructureStatus,
    JobConfiguration,
    Provider,
    claim_key,
    idempotency_key,
    is_resubmission,
)

logger = get_logger(__name__)

ORCHESTRATION_CONTAINER = "prefect"
DEFAULT_IMAGE = "prefecthq/prefect:3-latest"
DEFAULT_CPU = 1024
DEFAULT_MEMORY = 2048
#: ECS limits
MAX_TAGS = 50
MAX_TAG_KEY = 128
MAX_TAG_VALUE = 256
MAX_FAMILY = 255
MAX_STOP_REASON = 255
#: how much of a crashed task's CloudWatch log stream a CRASHED message quotes
LOG_TAIL_LINES = 10
LOG_TAIL_CHARACTERS = 1000
#: our own tag: the claim (the flow run's PENDING state) a task was launched for
CLAIM_TAG = "pushpool.io/claim"
#: the most tasks one DescribeTasks call accepts
DESCRIBE_TASKS_LIMIT = 100
CONCURRENT_REVISION_TEXT = "too many concurrent attempts to create a new revision"
THROTTLING_CODES = frozenset(
    {"ThrottlingException", "Throttling", "ThrottledException", "RequestLimitExceeded", "TooManyRequestsException"}
)
CREDENTIAL_ERROR_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
        "AuthFailure",
        "InvalidAccessKeyId",
    }
)
ACCESS_DENIED_CODES = frozenset({"AccessDeniedException", "AccessDenied", "UnauthorizedOperation"})
RUNNING_STATUSES = frozenset(
    {"PROVISIONING", "PENDING", "ACTIVATING", "RUNNING", "DEACTIVATING", "STOPPING", "DEPROVISIONING"}
)
#: fields AWS adds to a registered task definition, ignored when comparing
AWS_ADDED_FIELDS = (
    "taskDefinitionArn",
    "revision",
    "status",
    "requiresAttributes",
    "compatibilities",
    "registeredAt",
    "registeredBy",
    "deregisteredAt",
)
_TAG_FORBIDDEN = re.compile(r"[^\w .:/=+\-@]", re.UNICODE)
_FAMILY_FORBIDDEN = re.compile(r"[^a-zA-Z0-9_-]+")


class EcsJobConfiguration(JobConfiguration):
    """The rendered `job_configuration` of an `ecs:push` (or ECS worker) template."""

    aws_credentials: Optional[dict[str, Any]] = None
    task_definition: dict[str, Any] = Field(default_factory=dict)
    task_run_request: dict[str, Any] = Field(default_factory=dict)
    configure_cloudwatch_logs: Optional[bool] = None
    cloudwatch_logs_options: dict[str, str] = Field(default_factory=dict)
    cloudwatch_logs_prefix: Optional[str] = None
    network_configuration: dict[str, Any] = Field(default_factory=dict)
    auto_deregister_task_definition: bool = False
    vpc_id: Optional[str] = None
    container_name: Optional[str] = None
    cluster: Optional[str] = None
    match_latest_revision_in_family: bool = False
    prefect_api_key_secret_arn: Optional[str] = None
    prefect_api_auth_string_secret_arn: Optional[str] = None
    execution_role_arn: Optional[str] = None
    # Deprecated in Prefect's worker and unused here; accepted so old templates validate.
    stream_output: Optional[bool] = None
    task_start_timeout_seconds: Optional[float] = None
    task_watch_poll_interval: Optional[float] = None

    @field_validator(
        "task_definition", "task_run_request", "network_configuration", "cloudwatch_logs_options", mode="before"
    )
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("aws_credentials", mode="before")
    @classmethod
    def _empty_credentials_are_ambient(cls, value: Any) -> Any:
        return value or None

    @field_validator("auto_deregister_task_definition", "match_latest_revision_in_family", mode="before")
    @classmethod
    def _null_is_false(cls, value: Any) -> Any:
        return False if value is None else value


def parse_infrastructure_pid(infrastructure_pid: str) -> tuple[str, str]:
    """`"<cluster>::<task arn>"` -> (cluster, task arn)."""
    cluster, separator, task = str(infrastructure_pid).partition("::")
    if not separator or not cluster or not task:
        raise InfrastructureError(
            f"{infrastructure_pid!r} is not an ecs:push infrastructure pid (expected '<cluster>::<task arn>')"
        )
    return cluster, task


# ---------------------------------------------------------------- AWS access


class AwsAccess:
    """boto3 clients for one set of credentials (block data, or the ambient
    identity when `credentials` is empty). Never logs or repeats credential values."""

    def __init__(self, credentials: Optional[dict[str, Any]], *, max_attempts: int):
        import boto3
        from botocore.config import Config

        data = {k: v for k, v in (credentials or {}).items() if v not in (None, "", {})}
        client_parameters = dict(data.get("aws_client_parameters") or {})
        session = boto3.Session(
            aws_access_key_id=data.get("aws_access_key_id"),
            aws_secret_access_key=data.get("aws_secret_access_key"),
            aws_session_token=data.get("aws_session_token"),
            profile_name=data.get("profile_name"),
            region_name=data.get("region_name"),
        )
        config = Config(retries={"mode": "adaptive", "max_attempts": max_attempts})
        if isinstance(client_parameters.get("config"), dict) and client_parameters["config"]:
            config = Config(**client_parameters["config"]).merge(config)
        self._client_kwargs: dict[str, Any] = {"config": config}
        for key in ("endpoint_url", "api_version", "use_ssl"):
            if client_parameters.get(key) not in (None, ""):
                self._client_kwargs[key] = client_parameters[key]
        verify = client_parameters.get("verify")
        if client_parameters.get("verify_cert_path") and verify is not False:
            verify = client_parameters["verify_cert_path"]
        if verify is not None:
            self._client_kwargs["verify"] = verify
        if data.get("assume_role_arn"):
            session = self._assume_role(session, data["assume_role_arn"], data.get("assume_role_kwargs") or {})
        self.session = session
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _assume_role(self, session: Any, role_arn: str, kwargs: dict[str, Any]) -> Any:
        import boto3

        arguments = {"RoleSessionName": f"pushpool-{uuid.uuid4().hex[:8]}", **kwargs, "RoleArn": role_arn}
        sts = session.client("sts", **self._client_kwargs)
        response = call_aws(lambda: sts.assume_role(**arguments), action="sts:AssumeRole")
        temporary = response["Credentials"]
        return boto3.Session(
            aws_access_key_id=temporary["AccessKeyId"],
            aws_secret_access_key=temporary["SecretAccessKey"],
            aws_session_token=temporary["SessionToken"],
            region_name=session.region_name,
        )

    @property
    def region(self) -> Optional[str]:
        return self.session.region_name

    def client(self, service: str) -> Any:
        with self._lock:
            if service not in self._clients:
                from botocore.exceptions import NoRegionError

                try:
                    self._clients[service] = self.session.client(service, **self._client_kwargs)
                except NoRegionError:
                    raise InfrastructureError(
                        "No AWS region is configured: set region_name in the aws-credentials block, "
                        "or AWS_REGION / AWS_DEFAULT_REGION where the dispatcher runs"
                    ) from None
            return self._clients[service]

    def account_id(self) -> Optional[str]:
        try:
            return self.client("sts").get_caller_identity()["Account"]
        except Exception:  # noqa: BLE001 - only decorates an error message
            return None


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str((response.get("Error") or {}).get("Code") or "")


def error_message(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str((response.get("Error") or {}).get("Message") or exc)


def is_retryable(exc: BaseException) -> bool:
    code = error_code(exc)
    if code in THROTTLING_CODES:
        return True
    return code == "ClientException" and CONCURRENT_REVISION_TEXT in error_message(exc).lower()


def call_aws(
    call: Callable[[], Any],
    *,
    action: str,
    retry: Optional[RetryPolicy] = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """`call()`, retried with jittered back-off on throttling, with AWS errors
    turned into `InfrastructureError`s that name the action."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    retry = retry or RetryPolicy(attempts=1)
    for attempt in range(1, retry.attempts + 1):
        try:
            return call()
        except ClientError as exc:
            if is_retryable(exc) and attempt < retry.attempts:
                delay = retry.delay(attempt)
                logger.info(
                    "AWS call throttled; retrying",
                    extra={"action": action, "code": error_code(exc), "delay_seconds": round(delay, 3)},
                )
                sleep(delay)
                continue
            raise explain_client_error(exc, action) from None
        except (NoCredentialsError, PartialCredentialsError):
            raise InfrastructureError(
                f"No usable AWS credentials for {action}: set the pool's aws_credentials block "
                "(access key, secret, or a role to assume), or give the dispatcher an AWS identity"
            ) from None
        except EndpointConnectionError as exc:
            raise InfrastructureError(f"Could not reach AWS for {action}: {exc}") from None
        except BotoCoreError as exc:
            raise InfrastructureError(f"AWS call {action} failed: {type(exc).__name__}: {exc}") from None
    raise AssertionError("unreachable")  # pragma: no cover


class AwsCallError(InfrastructureError):
    """An AWS error, explained; `code` is AWS's error code."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def explain_client_error(exc: BaseException, action: str) -> AwsCallError:
    code, message = error_code(exc), error_message(exc)
    if code in CREDENTIAL_ERROR_CODES:
        text = f"AWS rejected the credentials used for {action} ({code}): check the pool's aws-credentials block"
    elif code in ACCESS_DENIED_CODES:
        text = f"Access denied for {action}: the AWS identity in use is not allowed to call it ({message})"
    elif code in THROTTLING_CODES:
        text = f"AWS kept throttling {action} after retries ({code}): {message}"
    else:
        text = f"AWS {action} failed ({code or type(exc).__name__}): {message}"
    return AwsCallError(text, code)


# ---------------------------------------------------------------- pure helpers


def slugify_family(value: str) -> str:
    return _FAMILY_FORBIDDEN.sub("-", value).strip("-")[:MAX_FAMILY] or "prefect"


def default_family(pool_name: Optional[str], flow_run: FlowRun) -> str:
    """One family per pool and flow (Prefect's worker uses one per deployment).
    A task definition holds nothing run- or deployment-specific (env and command
    travel in RunTask overrides), so every deployment of a flow with the same
    task settings shares one revision, and a changed setting adds a revision
    to the same family instead of a new family."""
    return slugify_family(f"prefect_{pool_name or 'pool'}_{flow_run.flow_id}")


def sanitize_tag(value: Any, limit: int) -> str:
    return _TAG_FORBIDDEN.sub("-", str(value))[:limit]


def build_tags(template_tags: Any, labels: dict[str, str], extra: dict[str, str]) -> list[dict[str, str]]:
    """ECS tags: template tags not overridden by labels, then the labels, then
    `extra`; keys and values sanitised to ECS's rules, `aws:` keys dropped, at
    most 50 with the flow run id tag kept first."""
    merged: dict[str, Any] = {}
    if isinstance(template_tags, dict):
        merged.update(template_tags)
    elif isinstance(template_tags, list):
        for tag in template_tags:
            if isinstance(tag, dict) and "key" in tag:
                merged[tag["key"]] = tag.get("value", "")
    merged.update(labels)
    merged.update(extra)
    tags: dict[str, str] = {}
    for key, value in merged.items():
        if value is None:
            continue
        clean_key = sanitize_tag(key, MAX_TAG_KEY)
        if not clean_key or clean_key.lower().startswith("aws:"):
            continue
        tags[clean_key] = sanitize_tag(value, MAX_TAG_VALUE)
    ordered = sorted(tags.items(), key=lambda item: item[0] != "prefect.io/flow-run-id")
    return [{"key": key, "value": value} for key, value in ordered[:MAX_TAGS]]


def remove_empty(value: Any) -> Any:
    """Drop None, "", [] and {} recursively (but not False or 0)."""
    if isinstance(value, dict):
        cleaned = {k: remove_empty(v) for k, v in value.items()}
        return {k: v for k, v in cleaned.items() if v not in (None, "", [], {})}
    if isinstance(value, list):
        cleaned_list = [remove_empty(v) for v in value]
        return [v for v in cleaned_list if v not in (None, "", [], {})]
    return value


def normalize_task_definition(task_definition: dict[str, Any]) -> dict[str, Any]:
    """What matters of a task definition, for comparing the wanted one with a registered one."""
    td = copy.deepcopy(task_definition)
    for field in AWS_ADDED_FIELDS:
        td.pop(field, None)
    td.pop("tags", None)
    td.setdefault("networkMode", "bridge")
    for key in ("cpu", "memory"):
        if td.get(key) is not None:
            td[key] = str(td[key])
    if isinstance(td.get("requiresCompatibilities"), list):
        td["requiresCompatibilities"] = sorted(td["requiresCompatibilities"])
    for container in td.get("containerDefinitions") or []:
        container.setdefault("essential", True)
        if container.get("cpu") in (0, "0"):
            container.pop("cpu")  # AWS reports an unset container cpu as 0
        for key in ("environment", "secrets"):
            if isinstance(container.get(key), list):
                container[key] = sorted(container[key], key=lambda item: str(item.get("name")))
        if isinstance(container.get("environmentFiles"), list):
            container["environmentFiles"] = sorted(
                container["environmentFiles"], key=lambda item: str(item.get("value"))
            )
    return remove_empty(td)


def task_definitions_equal(wanted: dict[str, Any], registered: dict[str, Any]) -> bool:
    return normalize_task_definition(wanted) == normalize_task_definition(registered)


def infer_container_name(task_definition: dict[str, Any]) -> str:
    names = [c.get("name") for c in task_definition.get("containerDefinitions") or [] if c.get("name")]
    if ORCHESTRATION_CONTAINER in names or not names:
        return ORCHESTRATION_CONTAINER
    return names[0]


def build_task_definition(
    configuration: EcsJobConfiguration, *, family: str, region: Optional[str], log_prefix: str
) -> tuple[dict[str, Any], str]:
    """The wanted task definition and the orchestration container's name, as
    Prefect's ECS worker prepares them (`_prepare_task_definition`)."""
    td = copy.deepcopy(configuration.task_definition)
    containers = [c for c in td.get("containerDefinitions") or [] if c]
    td["containerDefinitions"] = containers
    container_name = configuration.container_name or infer_container_name(td)
    container = next((c for c in containers if c.get("name") == container_name), None)
    if container is None:
        if container_name != ORCHESTRATION_CONTAINER:
            raise InfrastructureError(
                f"The task definition has no container named {container_name!r} (container_name)"
            )
        container = next((c for c in containers if not c.get("name")), None)
        if container is None:
            container = {}
            containers.append(container)
        container["name"] = ORCHESTRATION_CONTAINER
    container.setdefault("image", DEFAULT_IMAGE)
    if not container.get("image"):
        container["image"] = DEFAULT_IMAGE
    if isinstance(container.get("environment"), list):
        container["environment"] = [e for e in container["environment"] if e.get("value") is not None]

    if configuration.execution_role_arn and not td.get("executionRoleArn"):
        td["executionRoleArn"] = configuration.execution_role_arn
    if configuration.configure_cloudwatch_logs:
        container["logConfiguration"] = {
            "logDriver": "awslogs",
            "options": {
                "awslogs-create-group": "true",
                "awslogs-group": "prefect",
                "awslogs-region": region or "",
                "awslogs-stream-prefix": configuration.cloudwatch_logs_prefix or log_prefix,
                **configuration.cloudwatch_logs_options,
            },
        }
    td["family"] = td.get("family") or family

    launch_type = configuration.task_run_request.get("launchType") or "FARGATE"
    cpu = td.get("cpu") or DEFAULT_CPU
    memory = td.get("memory") or DEFAULT_MEMORY
    if launch_type in ("FARGATE", "FARGATE_SPOT"):
        td["cpu"], td["memory"] = str(cpu), str(memory)
        requires = list(td.get("requiresCompatibilities") or [])
        if "FARGATE" not in requires:
            requires.append("FARGATE")
        td["requiresCompatibilities"] = requires
        td.setdefault("networkMode", "awsvpc")
        # Container-level memory: harmless on AWS (equal to the task's), needed by moto.
        if not container.get("memory") and not container.get("memoryReservation"):
            container["memory"] = int(memory)
    else:
        container.setdefault("cpu", int(cpu))
        if not container.get("memory") and not container.get("memoryReservation"):
            container["memory"] = int(memory)

    secrets = {s["name"]: s for s in container.get("secrets") or [] if isinstance(s, dict) and "name" in s}
    for name, arn in (
        ("PREFECT_API_KEY", configuration.prefect_api_key_secret_arn),
        ("PREFECT_API_AUTH_STRING", configuration.prefect_api_auth_string_secret_arn),
    ):
        if arn:
            secrets[name] = {"name": name, "valueFrom": arn}
    if secrets:
        container["secrets"] = list(secrets.values())
    return remove_empty(td), container_name


def build_run_task_request(
    configuration: EcsJobConfiguration,
    *,
    task_definition_arn: str,
    task_definition: dict[str, Any],
    container_name: str,
    flow_run: FlowRun,
    client_token: str,
) -> dict[str, Any]:
    """The RunTask request (network filled in later if the task needs one)."""
    request = copy.deepcopy(configuration.task_run_request)
    request["taskDefinition"] = task_definition_arn
    if not request.get("cluster") and configuration.cluster:
        request["cluster"] = configuration.cluster
    if not request.get("cluster"):
        request.pop("cluster", None)

    launch_type = request.get("launchType")
    if launch_type == "FARGATE_SPOT":
        request.pop("launchType", None)
        request["capacityProviderStrategy"] = [{"capacityProvider": "FARGATE_SPOT", "weight": 1}]
    elif request.get("capacityProviderStrategy"):
        request.pop("launchType", None)
    else:
        request.pop("capacityProviderStrategy", None)
        if not launch_type:
            compatibilities = task_definition.get("requiresCompatibilities") or []
            if "EC2" in compatibilities and "FARGATE" not in compatibilities:
                request.pop("launchType", None)
            else:
                request["launchType"] = "FARGATE"

    overrides = request.get("overrides") if isinstance(request.get("overrides"), dict) else {}
    container_overrides = [c for c in overrides.get("containerOverrides") or [] if isinstance(c, dict)]
    target = next((c for c in container_overrides if c.get("name") == container_name), None)
    if target is None:
        target = next((c for c in container_overrides if not c.get("name")), None)
        if target is None:
            target = {}
            container_overrides.append(target)
        target["name"] = container_name
    env = {k: v for k, v in configuration.env.items() if v is not None}
    template_environment = target.get("environment")
    environment: list[dict[str, str]] = []
    if isinstance(template_environment, list):
        environment = [
            {"name": e["name"], "value": str(e["value"])}
            for e in template_environment
            if isinstance(e, dict) and e.get("name") not in env and e.get("value") is not None
        ]
    environment += [{"name": name, "value": value} for name, value in env.items()]
    target["environment"] = environment
    if configuration.command:
        target["command"] = shlex.split(configuration.command)
    elif isinstance(target.get("command"), str):
        target["command"] = shlex.split(target["command"])
    for key in ("cpu", "memory"):
        if overrides.get(key) is not None:
            overrides[key] = str(overrides[key])
    overrides["containerOverrides"] = container_overrides
    request["overrides"] = overrides

    claim_tag = {CLAIM_TAG: claim_key(flow_run)} if claim_key(flow_run) else {}
    request["tags"] = build_tags(request.get("tags"), configuration.labels, claim_tag)
    request["clientToken"] = client_token
    request["startedBy"] = str(flow_run.id)[:128]
    return remove_empty(request)


def explain_stopped_task(task: dict[str, Any], container_name: Optional[str]) -> tuple[Optional[int], str]:
    """(exit code of the orchestration container, one sentence saying why the task stopped)."""
    containers = task.get("containers") or []
    container = next((c for c in containers if c.get("name") == (container_name or ORCHESTRATION_CONTAINER)), None)
    if container is None:
        container = next((c for c in containers if c.get("exitCode") is not None), None)
    if container is None and containers:
        container = containers[0]
    exit_code = container.get("exitCode") if container else None

    head = "Task stopped"
    if task.get("stopCode"):
        head += f" ({task['stopCode']})"
    parts = [head + (f": {task['stoppedReason']}" if task.get("stoppedReason") else "")]
    if container is not None:
        name = container.get("name") or "container"
        if exit_code is not None:
            detail = f"container {name} exited with code {exit_code}"
        else:
            detail = f"container {name} has no exit code"
        if container.get("reason"):
            detail += f": {container['reason']}"
        parts.append(detail)
    return exit_code, " — ".join(parts)


# ---------------------------------------------------------------- the provider


class EcsProvider(Provider):
    push_types: ClassVar[tuple[str, ...]] = ("ecs:push",)
    template_file: ClassVar[str] = "ecs.json"
    configuration_model: ClassVar[type[JobConfiguration]] = EcsJobConfiguration
    #: a Fargate task typically takes 30–60 s from RunTask to a running container
    default_prefetch_seconds: ClassVar[float] = 45.0

    def __init__(
        self,
        *,
        retry: Optional[RetryPolicy] = None,
        botocore_max_attempts: int = 4,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.retry = retry or RetryPolicy(attempts=8, base_delay=0.25, max_delay=8.0)
        self.botocore_max_attempts = botocore_max_attempts
        self.sleep = sleep
        self._access: dict[str, AwsAccess] = {}
        self._lock = threading.Lock()
        # Per family, within this provider instance (one dispatcher invocation):
        # a lock so concurrent runs of one flow register at most one revision,
        # and the latest revision seen, so the others need no DescribeTaskDefinition.
        self._family_locks: dict[str, threading.Lock] = {}
        self._latest_seen: dict[str, dict[str, Any]] = {}
        # The network configuration worked out for a VPC (and given subnets), per
        # credentials: the EC2 look-ups are made once per invocation, not per run.
        self._networks: dict[str, dict[str, Any]] = {}
        self._network_lock = threading.Lock()

    # --- the Provider interface ------------------------------------------------------

    async def submit(self, configuration: JobConfiguration, flow_run: FlowRun) -> str:
        return await asyncio.to_thread(self._submit, self._coerce(configuration), flow_run)

    async def cancel(self, infrastructure_pid: str, configuration: JobConfiguration) -> None:
        await asyncio.to_thread(self._cancel, infrastructure_pid, self._coerce(configuration))

    async def status(self, infrastructure_pid: str, configuration: JobConfiguration) -> InfrastructureStatus:
        [result] = await self.statuses([(infrastructure_pid, configuration)])
        if isinstance(result, InfrastructureError):
            raise result
        return result

    async def statuses(
        self, infrastructures: list[tuple[str, JobConfiguration]]
    ) -> list[InfrastructureStatus | InfrastructureError]:
        """One DescribeTasks per cluster and credentials for up to 100 tasks."""
        coerced = [(pid, self._coerce(configuration)) for pid, configuration in infrastructures]
        return await asyncio.to_thread(self._statuses, coerced)

    # --- plumbing --------------------------------------------------------------------

    @staticmethod
    def _coerce(configuration: JobConfiguration) -> EcsJobConfiguration:
        if isinstance(configuration, EcsJobConfiguration):
            return configuration
        return EcsJobConfiguration.model_validate(configuration.model_dump())

    def access(self, configuration: EcsJobConfiguration) -> AwsAccess:
        """Clients for the configuration's credentials, cached per credentials in this instance."""
        key = hashlib.sha256(
            json.dumps(configuration.aws_credentials or {}, sort_keys=True, default=str).encode()
        ).hexdigest()
        with self._lock:
            if key not in self._access:
                self._access[key] = AwsAccess(configuration.aws_credentials, max_attempts=self.botocore_max_attempts)
            return self._access[key]

    def _call(self, action: str, call: Callable[[], Any], *, retry: bool = True) -> Any:
        return call_aws(call, action=action, retry=self.retry if retry else None, sleep=self.sleep)

    # --- submit ----------------------------------------------------------------------

    def _submit(self, configuration: EcsJobConfiguration, flow_run: FlowRun) -> str:
        aws = self.access(configuration)
        ecs = aws.client("ecs")
        cluster = configuration.task_run_request.get("cluster") or configuration.cluster
        try:
            existing = self._existing_task(ecs, cluster, flow_run)
            if existing is not None:
                logger.info("flow run already has an ECS task; not launching another", extra={"task": existing[1]})
                return f"{existing[0]}::{existing[1]}"

            task_definition_arn, task_definition, container_name = self._task_definition(aws, configuration, flow_run)
            request = build_run_task_request(
                configuration,
                task_definition_arn=task_definition_arn,
                task_definition=task_definition,
                container_name=container_name,
                flow_run=flow_run,
                client_token=idempotency_key(flow_run),
            )
            if task_definition.get("networkMode") == "awsvpc" and not request.get("networkConfiguration"):
                request["networkConfiguration"] = self._cached_network_configuration(aws, configuration)
            response = self._call("ecs:RunTask", lambda: ecs.run_task(**request))
        except AwsCallError as exc:
            if exc.code == "ClusterNotFoundException":
                raise self._cluster_missing(aws, cluster) from None
            raise
        failures = response.get("failures") or []
        tasks = response.get("tasks") or []
        if failures or not tasks:
            reasons = "; ".join(
                f"{f.get('reason') or 'unknown'}" + (f" ({f['detail']})" if f.get("detail") else "")
                + (f" for {f['arn']}" if f.get("arn") else "")
                for f in failures
            )
            if any(f.get("reason") == "MISSING" and "cluster" in str(f.get("arn", "")) for f in failures):
                raise self._cluster_missing(aws, cluster)
            raise InfrastructureError(f"ECS RunTask started no task: {reasons or 'no tasks and no failures returned'}")
        task = tasks[0]
        return f"{task['clusterArn']}::{task['taskArn']}"

    def _cluster_missing(self, aws: AwsAccess, cluster: Optional[str]) -> InfrastructureError:
        account = aws.account_id()
        where = f"{aws.region}" + (f" (account {account})" if account else "")
        name = cluster or "default"
        return InfrastructureError(
            f"ECS cluster '{name}' does not exist in {where}: create it, or set the pool's 'cluster' variable "
            "to an existing cluster"
        )

    def _existing_task(self, ecs: Any, cluster: Optional[str], flow_run: FlowRun) -> Optional[tuple[str, str]]:
        """A task this flow run already has: (cluster arn, task arn). Any running
        one (never two at once); on a resubmission, also a stopped one launched
        for this very claim (it ran and exited before its pid was recorded). A
        fresh claim has never been launched, so it skips that second ListTasks."""
        base = {"startedBy": str(flow_run.id)[:128]}
        if cluster:
            base["cluster"] = cluster
        running = self._call("ecs:ListTasks", lambda: ecs.list_tasks(**base, desiredStatus="RUNNING"))
        arns = running.get("taskArns") or []
        if arns:
            return self._describe_pid(ecs, cluster, arns[:1])
        key = claim_key(flow_run)
        if key is None or not is_resubmission(flow_run):
            return None
        stopped = self._call("ecs:ListTasks", lambda: ecs.list_tasks(**base, desiredStatus="STOPPED"))
        arns = stopped.get("taskArns") or []
        if not arns:
            return None
        described = self._call(
            "ecs:DescribeTasks",
            lambda: ecs.describe_tasks(**({"cluster": cluster} if cluster else {}), tasks=arns[:100], include=["TAGS"]),
        )
        for task in described.get("tasks") or []:
            tags = {t.get("key"): t.get("value") for t in task.get("tags") or []}
            if tags.get(CLAIM_TAG) == key:
                return task["clusterArn"], task["taskArn"]
        return None

    def _describe_pid(self, ecs: Any, cluster: Optional[str], arns: list[str]) -> tuple[str, str]:
        task_arn = arns[0]
        # The task ARN's resource part is <cluster name>/<task id> in the long ARN format.
        described = self._call(
            "ecs:DescribeTasks",
            lambda: ecs.describe_tasks(**({"cluster": cluster} if cluster else {}), tasks=[task_arn]),
        )
        for task in described.get("tasks") or []:
            if task.get("taskArn") == task_arn and task.get("clusterArn"):
                return task["clusterArn"], task_arn
        return cluster or "default", task_arn

    # --- task definitions ------------------------------------------------------------

    def _task_definition(
        self, aws: AwsAccess, configuration: EcsJobConfiguration, flow_run: FlowRun
    ) -> tuple[str, dict[str, Any], str]:
        """(ARN, definition, orchestration container name) of the task definition to run."""
        ecs = aws.client("ecs")
        given_arn = configuration.task_run_request.get("taskDefinition")
        if given_arn:
            described = self._call(
                "ecs:DescribeTaskDefinition", lambda: ecs.describe_task_definition(taskDefinition=given_arn)
            )["taskDefinition"]
            name = configuration.container_name or infer_container_name(described)
            return described["taskDefinitionArn"], described, name

        owner = flow_run.deployment_id or flow_run.flow_id
        wanted, container_name = build_task_definition(
            configuration,
            family=default_family(flow_run.work_pool_name, flow_run),
            region=aws.region,
            log_prefix=f"prefect-logs_{flow_run.work_pool_name}_{owner}",
        )
        family = wanted["family"] = slugify_family(wanted["family"])
        with self._lock:
            family_lock = self._family_locks.setdefault(family, threading.Lock())
        with family_lock:
            seen = self._latest_seen.get(family)
            if seen is not None and task_definitions_equal(wanted, seen):
                return seen["taskDefinitionArn"], seen, container_name
            arn, registered = self._find_or_register(ecs, family, wanted)
            self._latest_seen[family] = registered
            return arn, registered, container_name

    def _find_or_register(self, ecs: Any, family: str, wanted: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The family's latest revision if it equals `wanted`, else a new one."""
        for attempt in range(1, self.retry.attempts + 1):
            latest = self._latest_revision(ecs, family)
            if latest is not None and task_definitions_equal(wanted, latest):
                return latest["taskDefinitionArn"], latest
            try:
                registered = call_aws(
                    lambda: ecs.register_task_definition(**wanted),
                    action="ecs:RegisterTaskDefinition",
                    retry=None,
                )["taskDefinition"]
            except AwsCallError as exc:
                if is_retryable_code(exc) and attempt < self.retry.attempts:
                    # Another dispatcher may be registering the same definition: look again first.
                    self.sleep(self.retry.delay(attempt))
                    continue
                raise
            logger.info("registered task definition", extra={"task_definition": registered["taskDefinitionArn"]})
            return registered["taskDefinitionArn"], registered
        raise AssertionError("unreachable")  # pragma: no cover

    def _latest_revision(self, ecs: Any, family: str) -> Optional[dict[str, Any]]:
        try:
            return self._call(
                "ecs:DescribeTaskDefinition", lambda: ecs.describe_task_definition(taskDefinition=family)
            )["taskDefinition"]
        except AwsCallError as exc:
            if exc.code in ("ClientException", "InvalidParameterException"):
                return None  # no ACTIVE revision in this family yet
            raise

    # --- network ---------------------------------------------------------------------

    def _cached_network_configuration(self, aws: AwsAccess, configuration: EcsJobConfiguration) -> dict[str, Any]:
        key = hashlib.sha256(
            json.dumps(
                [configuration.aws_credentials or {}, configuration.vpc_id, configuration.network_configuration],
                sort_keys=True, default=str,
            ).encode()
        ).hexdigest()
        # Held while looking up: the first runs of a sweep arrive together on
        # every executor thread, and one lookup is enough for all of them.
        with self._network_lock:
            cached = self._networks.get(key)
            if cached is None:
                cached = self._networks[key] = self._network_configuration(aws, configuration)
        return copy.deepcopy(cached)

    def _network_configuration(self, aws: AwsAccess, configuration: EcsJobConfiguration) -> dict[str, Any]:
        ec2 = aws.client("ec2")
        if configuration.network_configuration:
            awsvpc = copy.deepcopy(configuration.network_configuration)
            awsvpc = awsvpc.get("awsvpcConfiguration", awsvpc)
            awsvpc.setdefault("securityGroups", [])
            subnets = awsvpc.get("subnets") or []
            if subnets:
                self._check_subnets(aws, subnets, configuration.vpc_id)
            return {"awsvpcConfiguration": awsvpc}
        if configuration.vpc_id:
            vpcs = self._call("ec2:DescribeVpcs", lambda: ec2.describe_vpcs(
                Filters=[{"Name": "vpc-id", "Values": [configuration.vpc_id]}]
            )).get("Vpcs") or []
            if not vpcs:
                raise InfrastructureError(f"VPC '{configuration.vpc_id}' (vpc_id) was not found in {aws.region}")
        else:
            vpcs = self._call("ec2:DescribeVpcs", lambda: ec2.describe_vpcs(
                Filters=[{"Name": "isDefault", "Values": ["true"]}]
            )).get("Vpcs") or []
            if not vpcs:
                raise InfrastructureError(
                    f"No default VPC in {aws.region} and no vpc_id or network_configuration given: set the pool's "
                    "vpc_id (or network_configuration with subnets)"
                )
        vpc_id = vpcs[0]["VpcId"]
        subnets = self._call("ec2:DescribeSubnets", lambda: ec2.describe_subnets(
            Filters=[{"Name": "vpc-id", "Values": [vpc_id]}]
        )).get("Subnets") or []
        if not subnets:
            raise InfrastructureError(f"VPC '{vpc_id}' in {aws.region} has no subnets to run the task in")
        return {
            "awsvpcConfiguration": {
                "subnets": [s["SubnetId"] for s in subnets],
                "assignPublicIp": "ENABLED",
                "securityGroups": [],
            }
        }

    def _check_subnets(self, aws: AwsAccess, subnets: list[str], vpc_id: Optional[str]) -> None:
        ec2 = aws.client("ec2")
        try:
            found = self._call("ec2:DescribeSubnets", lambda: ec2.describe_subnets(SubnetIds=list(subnets)))
        except AwsCallError as exc:
            if exc.code.startswith("InvalidSubnet"):
                raise InfrastructureError(
                    f"Subnet(s) in network_configuration not found in {aws.region}: {error_text(exc)}"
                ) from None
            raise
        if vpc_id:
            outside = [s["SubnetId"] for s in found.get("Subnets") or [] if s.get("VpcId") != vpc_id]
            if outside:
                raise InfrastructureError(
                    f"Subnet(s) {', '.join(outside)} in network_configuration are not in VPC '{vpc_id}' (vpc_id)"
                )

    # --- cancel and status -----------------------------------------------------------

    def _cancel(self, infrastructure_pid: str, configuration: EcsJobConfiguration) -> None:
        cluster, task = parse_infrastructure_pid(infrastructure_pid)
        ecs = self.access(configuration).client("ecs")
        reason = "Cancelled by pushpool: the flow run was cancelled in Prefect"[:MAX_STOP_REASON]
        try:
            self._call("ecs:StopTask", lambda: ecs.stop_task(cluster=cluster, task=task, reason=reason))
        except AwsCallError as exc:
            if exc.code in ("ClusterNotFoundException",) or (
                exc.code == "InvalidParameterException" and "not found" in str(exc).lower()
            ):
                return  # already gone
            raise

    def _statuses(
        self, infrastructures: list[tuple[str, EcsJobConfiguration]]
    ) -> list[InfrastructureStatus | InfrastructureError]:
        results: dict[int, InfrastructureStatus | InfrastructureError] = {}
        # (credentials, cluster) → [(position, task arn, configuration)]
        groups: dict[tuple[int, str], list[tuple[int, str, EcsJobConfiguration]]] = {}
        for position, (pid, configuration) in enumerate(infrastructures):
            try:
                cluster, task_arn = parse_infrastructure_pid(pid)
                aws = self.access(configuration)
            except InfrastructureError as exc:
                results[position] = exc
                continue
            groups.setdefault((id(aws), cluster), []).append((position, task_arn, configuration))
        for (_, cluster), members in groups.items():
            for start in range(0, len(members), DESCRIBE_TASKS_LIMIT):
                chunk = members[start : start + DESCRIBE_TASKS_LIMIT]
                for position, status in self._describe_chunk(cluster, chunk):
                    results[position] = status
        return [results[position] for position in range(len(infrastructures))]

    def _describe_chunk(
        self, cluster: str, chunk: list[tuple[int, str, EcsJobConfiguration]]
    ) -> list[tuple[int, InfrastructureStatus | InfrastructureError]]:
        """Statuses of up to 100 tasks of one cluster, with one set of credentials."""
        aws = self.access(chunk[0][2])
        ecs = aws.client("ecs")
        arns = sorted({task_arn for _, task_arn, _ in chunk})
        try:
            described = self._call("ecs:DescribeTasks", lambda: ecs.describe_tasks(cluster=cluster, tasks=arns))
        except InfrastructureError as exc:
            answer: InfrastructureStatus | InfrastructureError = exc
            if isinstance(exc, AwsCallError) and exc.code == "ClusterNotFoundException":
                answer = InfrastructureStatus(state="missing", reason=f"ECS cluster '{cluster}' no longer exists")
            return [(position, answer) for position, _, _ in chunk]
        tasks = {t.get("taskArn"): t for t in described.get("tasks") or []}
        return [(position, self._status_of(aws, tasks.get(task_arn), task_arn, configuration))
                for position, task_arn, configuration in chunk]

    def _status_of(
        self, aws: AwsAccess, task: Optional[dict[str, Any]], task_arn: str, configuration: EcsJobConfiguration
    ) -> InfrastructureStatus:
        if task is None:
            return InfrastructureStatus(state="missing", reason=f"ECS task {task_arn} was not found")
        if task.get("lastStatus") == "STOPPED":
            exit_code, reason = explain_stopped_task(task, configuration.container_name)
            if exit_code != 0:
                tail = self._log_tail(aws, task, configuration.container_name)
                if tail:
                    reason += f" — last log lines: {tail}"
            return InfrastructureStatus(state="exited", exit_code=exit_code, reason=reason)
        return InfrastructureStatus(state="running")

    def _log_tail(self, aws: AwsAccess, task: dict[str, Any], container_name: Optional[str]) -> Optional[str]:
        """The last lines the task's container wrote to CloudWatch Logs, when
        its task definition sends them there (best effort: None on any failure)."""
        try:
            definition = self._call(
                "ecs:DescribeTaskDefinition",
                lambda: aws.client("ecs").describe_task_definition(taskDefinition=task["taskDefinitionArn"]),
            )["taskDefinition"]
            name = container_name or infer_container_name(definition)
            container = next(c for c in definition.get("containerDefinitions") or [] if c.get("name") == name)
            log_configuration = container.get("logConfiguration") or {}
            options = log_configuration.get("options") or {}
            if log_configuration.get("logDriver") != "awslogs" or not options.get("awslogs-stream-prefix"):
                return None
            stream = f"{options['awslogs-stream-prefix']}/{name}/{task['taskArn'].rsplit('/', 1)[-1]}"
            events = self._call(
                "logs:GetLogEvents",
                lambda: aws.client("logs").get_log_events(
                    logGroupName=options["awslogs-group"], logStreamName=stream, limit=LOG_TAIL_LINES, startFromHead=False
                ),
            ).get("events") or []
        except (InfrastructureError, KeyError, StopIteration):
            return None
        lines = [str(e.get("message", "")).rstrip() for e in events if str(e.get("message", "")).strip()]
        return " | ".join(lines)[-LOG_TAIL_CHARACTERS:] or None


def is_retryable_code(exc: AwsCallError) -> bool:
    return exc.code in THROTTLING_CODES or (
        exc.code == "ClientException" and CONCURRENT_REVISION_TEXT in str(exc).lower()
    )


def error_text(exc: BaseException) -> str:
    return str(exc)
