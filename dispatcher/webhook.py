"""Prefect automation webhooks: authenticate, parse, dispatch.

Prefect's `call-webhook` action sends the webhook block's fixed headers and
cannot sign each body, so the scheme automations use is the shared secret
`PUSHPOOL_WEBHOOK_SECRET` in a header, compared in constant time:

    Authorization: Bearer <secret>        (what `pushpool connect` sets up)
    X-Pushpool-Secret: <secret>           (for senders that cannot set Authorization)

Other senders may instead sign the body: `X-Pushpool-Signature: sha256=<hex
HMAC-SHA256 of the raw body keyed with the secret>`.

The body is one Prefect event (the automation's payload is `{{ event | tojson }}`).
`prefect.flow-run.Scheduled` (and `Late`, the only event a schedule-created run
emits) sweeps the run's pool; `prefect.flow-run.Cancelling`
cancels the run. The event is only a hint: the run and its pool are read from
the API before anything changes, so a replayed or forged event about a run
that is not due changes nothing.

Answers: 401 unauthenticated; 400 not JSON or not a Prefect event (with the
reason); 413 a body over 256 KB; 200 with what was done (or why nothing was);
503 when the Prefect API could not be reached. Never raises, never echoes a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any, Optional, Union

from pydantic import BaseModel, SecretStr, ValidationError

from dispatcher.events import Event
from dispatcher.logs import get_logger
from dispatcher.settings import Settings
from dispatcher.triggers import RunCancelling, RunScheduled, run_trigger
from providers.registry import ProviderRegistry

logger = get_logger(__name__)

MAX_BODY_BYTES = 256 * 1024
SECRET_HEADER = "x-pushpool-secret"
SIGNATURE_HEADER = "x-pushpool-signature"
SIGNATURE_PREFIX = "sha256="
SCHEDULED_EVENT = "prefect.flow-run.Scheduled"
#: runs created by a deployment's schedule emit no Scheduled event, only Late
#: about 15–20 s after they were due: a late second chance to sweep.
LATE_EVENT = "prefect.flow-run.Late"
CANCELLING_EVENT = "prefect.flow-run.Cancelling"


class WebhookResponse(BaseModel):
    status: int
    body: dict[str, Any]


def sign(body: bytes, secret: str) -> str:
    """The `X-Pushpool-Signature` value for `body`."""
    return SIGNATURE_PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def authenticate(headers: Mapping[str, str], body: bytes, secret: Optional[SecretStr]) -> Optional[str]:
    """None if the request carries the shared secret (or a valid signature);
    otherwise why not. `headers` keys must be lower-case."""
    if secret is None or not secret.get_secret_value():
        return "this dispatcher has no PUSHPOOL_WEBHOOK_SECRET, so it accepts no webhooks"
    expected = secret.get_secret_value().encode()
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    presented = [token.strip().encode()] if scheme.lower() == "bearer" and token.strip() else []
    if headers.get(SECRET_HEADER):
        presented.append(headers[SECRET_HEADER].strip().encode())
    # Compare every presented value (constant time each), so timing reveals nothing.
    matched = False
    for value in presented:
        matched |= hmac.compare_digest(value, expected)
    signature = headers.get(SIGNATURE_HEADER, "").strip()
    if signature:
        matched |= hmac.compare_digest(signature.encode(), sign(body, secret.get_secret_value()).encode())
    if matched:
        return None
    if presented or signature:
        return "the webhook secret or signature is wrong"
    return (
        "missing credentials: send 'Authorization: Bearer <PUSHPOOL_WEBHOOK_SECRET>', "
        "'X-Pushpool-Secret', or an 'X-Pushpool-Signature' of the body"
    )


def parse_event(body: bytes) -> Union[Event, str]:
    """The Prefect event in `body`, or why it is not one."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return f"the body is not JSON: {type(exc).__name__}"
    if not isinstance(document, dict):
        return "the body is not a Prefect event: expected a JSON object"
    try:
        return Event.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'body'}: {error['msg']}"
            for error in exc.errors(include_url=False, include_input=False)[:3]
        )
        return f"the body is not a Prefect event ({problems})"


def trigger_for(event: Event) -> Union[RunScheduled, RunCancelling, str]:
    """What the event asks of the dispatcher, or why it asks nothing."""
    if event.flow_run_id is None:
        return f"event {event.event!r} is not about a flow run"
    if event.event in (SCHEDULED_EVENT, LATE_EVENT):
        return RunScheduled(flow_run_id=event.flow_run_id, pool_name=event.work_pool_name)
    if event.event == CANCELLING_EVENT:
        return RunCancelling(flow_run_id=event.flow_run_id)
    return f"event {event.event!r} needs nothing from the dispatcher"


async def handle_webhook(
    headers: Mapping[str, str],
    body: bytes,
    settings: Settings,
    *,
    registry: Optional[ProviderRegistry] = None,
) -> WebhookResponse:
    """Authenticate, parse and act on one webhook request."""
    headers = {key.lower(): value for key, value in headers.items()}
    if len(body) > MAX_BODY_BYTES:
        return WebhookResponse(status=413, body={"error": f"the body is over {MAX_BODY_BYTES // 1024} KB"})
    refused = authenticate(headers, body, settings.webhook_secret)
    if refused is not None:
        logger.warning("webhook refused", extra={"reason": refused})
        return WebhookResponse(status=401, body={"error": refused})
    event = parse_event(body)
    if isinstance(event, str):
        logger.warning("webhook rejected", extra={"reason": event})
        return WebhookResponse(status=400, body={"error": event})
    trigger = trigger_for(event)
    if isinstance(trigger, str):
        return WebhookResponse(status=200, body={"ignored": trigger, "event_id": str(event.id)})
    logger.info("webhook", extra={"event": event.event, "event_id": str(event.id), "flow_run_id": str(trigger.flow_run_id)})
    result = await run_trigger(trigger, settings, registry=registry)
    status = 503 if result.error else 200
    return WebhookResponse(status=status, body={"event_id": str(event.id), **result.model_dump(exclude_none=True)})
