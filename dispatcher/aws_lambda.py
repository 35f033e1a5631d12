"""The AWS Lambda door: `dispatcher.aws_lambda.handler`.

One function serves every trigger:

    EventBridge Scheduler `{"pushpool": "tick"}` or a   sweep every served pool, reconcile,
      rule's "Scheduled Event"                            arrange exact-time wake-ups
    EventBridge Scheduler `{"pushpool": "wake"}`         sweep every served pool
    Lambda Function URL / API Gateway request            a Prefect automation webhook
                                                           (`dispatcher.webhook`); GET /health
    ECS "Task State Change", lastStatus STOPPED          settle that task's flow run
                                                           (its `startedBy` is the flow run id)

Secrets never sit in plain environment variables: `PUSHPOOL_SECRETS_ARN` names
a Secrets Manager secret or an SSM SecureString parameter holding a JSON object
with any of `PREFECT_API_URL`, `PREFECT_API_KEY`, `PREFECT_API_AUTH_STRING`,
`PUSHPOOL_WEBHOOK_SECRET`; it is read once per container (cold start).

Built on aws-lambda-powertools: JSON logs with the request's correlation id
and, inside a run's work, its flow run id; EMF metrics (runs claimed,
submitted, crashed, cancelled; dispatch latency = submitted at − scheduled
start); X-Ray tracing when `PUSHPOOL_TRACING=true` (opt-in: powertools' Tracer
loads the X-Ray SDK and botocore, about 0.5 s on every cold start). The
handler never raises and never returns a secret.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
from datetime import datetime
from typing import Any, Literal, Optional, Union
from uuid import UUID

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dispatcher.logs import ROOT_LOGGER, Redactor, get_logger, redacting_filter
from dispatcher.settings import Settings
from dispatcher.triggers import InfrastructureStopped, Tick, Trigger, TriggerResult, Wake, run_trigger
from dispatcher.wakeups import wakeups_from_environment
from dispatcher.webhook import handle_webhook

SECRET_KEYS = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PUSHPOOL_WEBHOOK_SECRET")
ECS_TASK_STATE_CHANGE = "ECS Task State Change"

# Powertools' objects are made once per container, as its documentation asks.
# The logger is pushpool's root logger, so every `pushpool.*` line goes through it.
logger = Logger(service=ROOT_LOGGER)
metrics = Metrics(namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE") or "pushpool")
log = get_logger(__name__)


@functools.lru_cache(maxsize=1)
def tracer() -> Any:
    """Powertools' Tracer, made on first use and only when tracing is asked for."""
    if os.environ.get("PUSHPOOL_TRACING", "").lower() not in ("1", "true", "yes"):
        return None
    from aws_lambda_powertools import Tracer

    return Tracer(service=ROOT_LOGGER)


class SecretsUnavailable(Exception):
    pass


@functools.lru_cache(maxsize=4)
def read_secrets(arn: str) -> dict[str, str]:
    """The JSON object stored at `arn` (Secrets Manager secret or SSM parameter),
    read once per container."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        if arn.startswith("arn:") and ":ssm:" in arn:
            name = arn.split(":parameter", 1)[1]
            value = boto3.client("ssm").get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]
        else:
            value = boto3.client("secretsmanager").get_secret_value(SecretId=arn)["SecretString"]
    except (ClientError, BotoCoreError) as exc:
        raise SecretsUnavailable(f"could not read PUSHPOOL_SECRETS_ARN {arn}: {type(exc).__name__}") from None
    try:
        document = json.loads(value)
    except ValueError:
        raise SecretsUnavailable(f"PUSHPOOL_SECRETS_ARN {arn} does not hold a JSON object") from None
    if not isinstance(document, dict):
        raise SecretsUnavailable(f"PUSHPOOL_SECRETS_ARN {arn} does not hold a JSON object")
    return {key: str(document[key]) for key in SECRET_KEYS if document.get(key)}


def load_settings() -> Settings:
    environment = dict(os.environ)
    if environment.get("PUSHPOOL_SECRETS_ARN"):
        environment.update(read_secrets(environment["PUSHPOOL_SECRETS_ARN"]))
    return Settings.from_env(environment)


# ---------------------------------------------------------------- the handler


def handler(event: Any, context: Any) -> dict[str, Any]:
    traced = tracer()
    if traced is None:
        return _logged_handler(event, context)
    return traced.capture_lambda_handler(_logged_handler)(event, context)


@metrics.log_metrics(raise_on_empty_metrics=False)
@logger.inject_lambda_context(clear_state=True)
def _logged_handler(event: Any, context: Any) -> dict[str, Any]:
    try:
        settings = load_settings()
    except (SecretsUnavailable, ValidationError) as exc:
        log.error("dispatcher is misconfigured", extra={"error": str(exc)})
        return _reply(event, 500, {"error": f"dispatcher is misconfigured: {exc}"})
    redactor = Redactor(settings.secret_values())
    _install_redaction(redactor)
    try:
        return asyncio.run(_handle(event, context, settings))
    except Exception as exc:  # noqa: BLE001 - a handler that raises gets retried and alarms; answer instead
        log.exception("unexpected failure")
        return _reply(event, 500, {"error": f"internal error: {redactor.redact(type(exc).__name__)}"})


async def _handle(event: Any, context: Any, settings: Settings) -> dict[str, Any]:
    if is_http_request(event):
        return await _handle_http(event, settings)
    trigger = trigger_for_event(event)
    if isinstance(trigger, str):
        log.warning("event ignored", extra={"reason": trigger})
        return {"ignored": trigger}
    logger.set_correlation_id(str(event.get("id") or getattr(context, "aws_request_id", "")))
    wakeups = None
    if isinstance(trigger, Tick):
        wakeups = wakeups_from_environment(dict(os.environ), getattr(context, "invoked_function_arn", None))
    result = await run_trigger(trigger, settings, wakeups=wakeups)
    record_metrics(result)
    return result.model_dump(exclude_none=True)


async def _handle_http(event: dict[str, Any], settings: Settings) -> dict[str, Any]:
    request = HttpRequest.from_event(event)
    if isinstance(request, str):
        return http_response(400, {"error": request})
    logger.set_correlation_id(request.request_id)
    if request.method == "GET" and request.path.rstrip("/").endswith("/health"):
        return http_response(200, {"status": "ok"})
    if request.method != "POST":
        return http_response(405, {"error": "use POST for webhooks, GET /health for health"})
    response = await handle_webhook(request.headers, request.body, settings)
    if "trigger" in response.body:
        record_metrics(TriggerResult.model_validate(response.body))
    return http_response(response.status, response.body)


# ---------------------------------------------------------------- event shapes


class SchedulerInput(BaseModel):
    """What the dispatcher's own EventBridge Scheduler schedules send."""

    pushpool: Literal["tick", "wake"]
    at: Optional[datetime] = None


class EventBridgeEvent(BaseModel):
    """An EventBridge event: a rule's "Scheduled Event", or an ECS "Task State Change"."""

    model_config = ConfigDict(populate_by_name=True)

    source: str
    detail_type: str = Field(alias="detail-type")
    id: Optional[str] = None
    detail: dict[str, Any] = Field(default_factory=dict)


class EcsTaskStateChange(BaseModel):
    """The `detail` of an ECS "Task State Change" event (the fields used here)."""

    model_config = ConfigDict(extra="ignore")

    lastStatus: str
    taskArn: Optional[str] = None
    startedBy: Optional[str] = None


class HttpRequest(BaseModel):
    """A Lambda Function URL / API Gateway (payload 2.0 or 1.0) request."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    request_id: str = ""

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> Union["HttpRequest", str]:
        context = event.get("requestContext")
        if not isinstance(context, dict):
            context = {}
        http = context.get("http")
        if isinstance(http, dict):  # payload 2.0 (Function URL, HTTP API)
            method, path = str(http.get("method", "")), str(event.get("rawPath") or http.get("path") or "/")
        else:  # payload 1.0 (REST API)
            method, path = str(event.get("httpMethod", "")), str(event.get("path") or "/")
        body = event.get("body") or ""
        if not isinstance(body, (str, bytes)):
            return "the body is not a string"
        if event.get("isBase64Encoded"):
            try:
                raw = base64.b64decode(body, validate=True)
            except ValueError:
                return "the body is not valid base64"
        else:
            raw = body.encode() if isinstance(body, str) else body
        headers = event.get("headers") or {}
        if not isinstance(headers, dict):
            return "the headers are not an object"
        headers = {str(k): str(v) for k, v in headers.items()}
        return cls(method=method.upper(), path=path, headers=headers, body=raw,
                   request_id=str(context.get("requestId") or ""))


def is_http_request(event: Any) -> bool:
    if not isinstance(event, dict):
        return False
    context = event.get("requestContext")
    return "httpMethod" in event or (isinstance(context, dict) and "http" in context)


def trigger_for_event(event: Any) -> Union[Trigger, str]:
    """The trigger an EventBridge / Scheduler event carries, or why it carries none."""
    if not isinstance(event, dict):
        return f"not an event object: {type(event).__name__}"
    if "pushpool" in event:
        try:
            asked = SchedulerInput.model_validate(event)
        except ValidationError:
            return f"unrecognised event (pushpool {str(event.get('pushpool'))[:40]!r})"
        return Tick() if asked.pushpool == "tick" else Wake(at=asked.at)
    try:
        bridged = EventBridgeEvent.model_validate(event)
    except ValidationError:
        return f"unrecognised event (source {event.get('source')!r}, detail-type {event.get('detail-type')!r})"
    if bridged.detail_type == "Scheduled Event":
        return Tick()
    if bridged.detail_type == ECS_TASK_STATE_CHANGE and bridged.source == "aws.ecs":
        return _ecs_task_stopped(bridged.detail)
    return f"unrecognised event (source {bridged.source!r}, detail-type {bridged.detail_type!r})"


def _ecs_task_stopped(detail: dict[str, Any]) -> Union[InfrastructureStopped, str]:
    try:
        change = EcsTaskStateChange.model_validate(detail)
    except ValidationError:
        return "ECS task state change without a lastStatus"
    if change.lastStatus != "STOPPED":
        return f"ECS task is {change.lastStatus!r}, not STOPPED"
    try:
        flow_run_id = UUID(change.startedBy or "")
    except ValueError:
        return "ECS task was not started by pushpool (its startedBy is not a flow run id)"
    return InfrastructureStopped(flow_run_id=flow_run_id, infrastructure=change.taskArn)


# ---------------------------------------------------------------- replies and metrics


def http_response(status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"statusCode": status, "headers": {"Content-Type": "application/json"}, "body": json.dumps(body)}


def _reply(event: Any, status: int, body: dict[str, Any]) -> dict[str, Any]:
    return http_response(status, body) if is_http_request(event) else body


def record_metrics(result: TriggerResult) -> None:
    for name, value in (
        ("RunsClaimed", result.claimed),
        ("RunsSubmitted", result.submitted),
        ("RunsCrashed", result.crashed),
        ("RunsCancelled", result.cancelled),
        ("RunsResubmitted", result.resubmitted),
    ):
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)
    for latency in result.dispatch_latency_seconds:
        metrics.add_metric(name="DispatchLatency", unit=MetricUnit.Seconds, value=latency)


def _install_redaction(redactor: Redactor) -> None:
    """Mask credential values on every line that reaches powertools' handler."""
    handler = logger.registered_handler
    for existing in list(handler.filters):
        if getattr(existing, "_pushpool", False):
            handler.removeFilter(existing)
    handler.addFilter(redacting_filter(redactor))

