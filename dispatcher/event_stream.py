"""A client for the Prefect server's event websocket, `GET /api/events/out`.

The long-running local dispatcher listens here so a run created for "now" is
dispatched within a second instead of at the next tick. Events are hints only
(the API stays the truth), so the stream is best effort: it reconnects with
jittered back-off whenever the connection drops, and after a reconnect it asks
the server to replay ("backfill") what matched while it was away, skipping
events it has already delivered.

The protocol, as the Prefect 3.8.8 server speaks it:

1. Connect with the websocket subprotocol `prefect` (without it a server with an
   auth string refuses the handshake).
2. Send `{"type": "auth", "token": <raw PREFECT_API_AUTH_STRING, else the API key, else null>}`;
   the server answers `{"type": "auth_success"}` or closes with code 1008.
3. Send `{"type": "filter", "backfill": <bool>, "filter": {...}}`. `occurred.until`
   must be in the future: it defaults to the moment the filter is parsed, and then
   every live event is silently dropped. There is no acknowledgement.
4. Receive `{"type": "event", "event": {...}}` messages.

Two server behaviours shape the filter (both checked against 3.8.8):

- The `related` filter is only applied to the backfill (a database query); live
  events are matched with `EventFilter.includes`, and the related filter has no
  `includes`, so it lets every event through. `any_resource` is applied to both,
  so the work-pool restriction is sent as `any_resource` and checked again here.
- A filter the server cannot parse makes it close with a reason longer than a
  control frame allows, so the client sees an abnormal close without a reason,
  indistinguishable from a dropped connection. A stream that is closed right after
  every subscription is therefore reported as an error instead of retried forever.

`websockets` is imported only when a stream is opened: the Lambda entry point,
which never streams, must not pay for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

from pydantic import ValidationError

from dispatcher.events import WORK_POOL_PREFIX, Event
from dispatcher.logs import get_logger
from dispatcher.retries import RetryPolicy
from dispatcher.settings import Settings

logger = get_logger(__name__)
# The websockets library logs every frame at DEBUG, the auth message (and its
# token) included. Its connections log here, and this logger never goes below INFO.
wire_logger = get_logger("event_stream.wire")
wire_logger.setLevel(logging.INFO)

# The server's policy-violation close code: bad or missing auth token.
WS_POLICY_VIOLATION = 1008
# Replay this much before a disconnect on reconnect (covers events in flight and
# a little clock skew; the server clamps backfill to 15 minutes).
RECONNECT_OVERLAP = timedelta(seconds=60)
# How far back the first subscription's window starts. Without backfill this only
# matters for clock skew: live events that occurred before `since` are dropped.
LIVE_WINDOW_START = timedelta(hours=1)
# `until` for every subscription: far in the future, or live events are dropped.
LIVE_WINDOW_END = timedelta(days=365)
# A connection that lasted this long (or delivered an event) resets the back-off.
STABLE_CONNECTION_SECONDS = 10.0
# A close this soon after subscribing, with nothing received, counts as "rapid".
RAPID_CLOSE_SECONDS = 2.0
SEEN_EVENT_IDS = 10_000
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_BACKOFF = RetryPolicy(base_delay=0.5, max_delay=30.0)


class EventStreamError(Exception):
    """The event stream cannot work as configured; retrying would not help."""


class EventStreamAuthError(EventStreamError):
    """The Prefect server refused the stream's credentials."""


def events_out_url(api_url: str) -> str:
    """`http(s)://host/api` → `ws(s)://host/api/events/out`."""
    parts = urlsplit(api_url)
    schemes = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
    if parts.scheme not in schemes or not parts.netloc:
        raise ValueError(f"PREFECT_API_URL must be an http(s) URL, got {_safe_url(api_url)!r}")
    path = parts.path.rstrip("/") + "/events/out"
    return urlunsplit((schemes[parts.scheme], parts.netloc, path, parts.query, ""))


def _safe_url(url: str) -> str:
    """The URL without any user:password part, for logs and messages."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _auth_token(settings: Settings) -> Optional[str]:
    """What the auth message carries: the raw auth string (OSS), else the API key."""
    for secret in (settings.api_auth_string, settings.api_key):
        if secret is not None and secret.get_secret_value():
            return secret.get_secret_value()
    return None


def _handshake_headers(settings: Settings) -> dict[str, str]:
    # The OSS server authenticates the websocket by message only; the header is for
    # reverse proxies in front of it that check the same credentials as the REST API.
    from dispatcher.prefect_client import auth_headers

    return auth_headers(settings)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class EventStream:
    """A reconnecting subscription to Prefect events.

    `async for event in EventStream(settings, event_names=[...])` yields matching
    `Event`s forever: a dropped connection is retried with jittered back-off and,
    with `backfill_on_reconnect`, the events missed meanwhile are replayed (each
    event is delivered at most once per stream, by id). It raises
    `EventStreamAuthError` when the server refuses the credentials and
    `EventStreamError` for other failures that retrying cannot fix.

    `connected` is set while a subscription is in place (the filter has been
    sent; the server does not acknowledge it, so allow a few milliseconds more).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        event_names: Sequence[str] = (),
        related_work_pool_ids: Optional[Iterable[UUID | str]] = None,
        since: Optional[datetime] = None,
        backfill_on_reconnect: bool = True,
        backoff: Optional[RetryPolicy] = None,
        open_timeout: float = 10.0,
        max_rapid_closes: int = 5,
    ):
        if not settings.api_url:
            raise ValueError(
                "PREFECT_API_URL is not set: point it at your Prefect server's API, "
                "for example http://127.0.0.1:4200/api"
            )
        self.url = events_out_url(settings.api_url)
        self.event_names = list(event_names)
        self.work_pool_resource_ids = (
            None
            if related_work_pool_ids is None
            else sorted(f"{WORK_POOL_PREFIX}{pool_id}" for pool_id in related_work_pool_ids)
        )
        self.since = since
        self.backfill_on_reconnect = backfill_on_reconnect
        self.backoff = backoff or DEFAULT_BACKOFF
        self.open_timeout = open_timeout
        self.max_rapid_closes = max_rapid_closes
        self.connected = asyncio.Event()
        self.connections = 0  # subscriptions made so far (1 + reconnects)
        self._token = _auth_token(settings)
        self._headers = _handshake_headers(settings)
        self._seen: OrderedDict[UUID, None] = OrderedDict()

    # ------------------------------------------------------------------ filter

    def filter(self, since: datetime) -> dict[str, Any]:
        """The server-side filter for a subscription whose window starts at `since`."""
        body: dict[str, Any] = {
            "occurred": {"since": since.isoformat(), "until": (_now() + LIVE_WINDOW_END).isoformat()},
        }
        if self.event_names:
            body["event"] = {"name": self.event_names}
        if self.work_pool_resource_ids is not None:
            # Not `related`: the server does not apply it to live events (see module doc).
            body["any_resource"] = {"id": self.work_pool_resource_ids}
        return body

    def matches(self, event: Event) -> bool:
        """The same filter, applied again on our side."""
        if self.event_names and event.event not in self.event_names:
            return False
        if self.work_pool_resource_ids is not None:
            return not event.resource_ids().isdisjoint(self.work_pool_resource_ids)
        return True

    def _first_time(self, event_id: UUID) -> bool:
        if event_id in self._seen:
            return False
        self._seen[event_id] = None
        if len(self._seen) > SEEN_EVENT_IDS:
            self._seen.popitem(last=False)
        return True

    # ------------------------------------------------------------------ stream

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.events()

    async def events(self) -> AsyncIterator[Event]:
        try:
            from websockets.asyncio.client import connect
            from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise EventStreamError(
                "The event stream needs the `websockets` package, version 13 or later "
                "(pip install 'websockets>=13')"
            ) from exc

        failures = 0
        rapid_closes = 0
        disconnected_at: Optional[datetime] = None
        safe_url = _safe_url(self.url)

        while True:
            if disconnected_at is None:
                since = self.since or _now() - LIVE_WINDOW_START
                backfill = self.since is not None
            else:
                since = disconnected_at - RECONNECT_OVERLAP
                backfill = self.backfill_on_reconnect
            subscribed_at: Optional[float] = None
            delivered = received = False
            try:
                async with connect(
                    self.url,
                    subprotocols=["prefect"],  # type: ignore[list-item]
                    additional_headers=self._headers,
                    user_agent_header="pushpool",
                    open_timeout=self.open_timeout,
                    close_timeout=2,  # a stopping dispatcher should not wait on a dead peer
                    max_size=MAX_MESSAGE_BYTES,
                    logger=wire_logger,
                ) as websocket:
                    await self._authenticate(websocket, ConnectionClosed)
                    await websocket.send(
                        json.dumps({"type": "filter", "backfill": backfill, "filter": self.filter(since)})
                    )
                    subscribed_at = time.monotonic()
                    self.connections += 1
                    self.connected.set()
                    logger.info(
                        "subscribed to the Prefect event stream"
                        if self.connections == 1
                        else "re-subscribed to the Prefect event stream",
                        extra={"url": safe_url, "events": ",".join(self.event_names) or "*", "backfill": backfill},
                    )
                    async for message in websocket:
                        received = True
                        event = self._parse(message)
                        if event is None or not self.matches(event) or not self._first_time(event.id):
                            continue
                        delivered = True
                        yield event
                    reason = _close_description(websocket.close_code, websocket.close_reason)
            except EventStreamError:
                raise
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status == 401:
                    raise EventStreamAuthError(
                        f"The Prefect server at {safe_url} refused the event stream's credentials "
                        "(HTTP 401); check PREFECT_API_AUTH_STRING / PREFECT_API_KEY"
                    ) from None
                if status in (403, 404):
                    raise EventStreamError(
                        f"The Prefect server refused the event stream at {safe_url} (HTTP {status}); "
                        "check that PREFECT_API_URL is the API URL (it usually ends in /api)"
                    ) from None
                reason = f"HTTP {status} from the handshake"
            except ConnectionClosed as exc:
                reason = _close_description(
                    exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else None
                )
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                self.connected.clear()

            if subscribed_at is not None:
                disconnected_at = _now()
                lived = time.monotonic() - subscribed_at
                if delivered or lived >= STABLE_CONNECTION_SECONDS:
                    failures = 0
                if not received and lived < RAPID_CLOSE_SECONDS:
                    rapid_closes += 1
                    if rapid_closes >= self.max_rapid_closes:
                        raise EventStreamError(
                            f"The Prefect server closed the event stream right after the subscription "
                            f"{rapid_closes} times in a row ({reason}); it may have rejected the filter, "
                            "see the server's log"
                        )
                else:
                    rapid_closes = 0
            failures += 1
            delay = self.backoff.delay(failures)
            logger.warning(
                "the Prefect event stream is not connected; reconnecting",
                extra={"url": safe_url, "reason": reason, "attempt": failures, "delay": round(delay, 2)},
            )
            await asyncio.sleep(delay)

    async def _authenticate(self, websocket: Any, connection_closed: type[Exception]) -> None:
        await websocket.send(json.dumps({"type": "auth", "token": self._token}))
        try:
            reply = json.loads(await asyncio.wait_for(websocket.recv(), timeout=self.open_timeout))
        except connection_closed as exc:
            rcvd = getattr(exc, "rcvd", None)
            if rcvd is not None and rcvd.code == WS_POLICY_VIOLATION:
                raise EventStreamAuthError(self._auth_failure(rcvd.reason)) from None
            raise
        except ValueError:
            raise EventStreamError("The Prefect event stream answered the auth message with non-JSON") from None
        if not isinstance(reply, dict) or reply.get("type") != "auth_success":
            reason = reply.get("reason") if isinstance(reply, dict) else None
            raise EventStreamAuthError(self._auth_failure(reason or f"unexpected reply {str(reply)[:200]!r}"))

    def _auth_failure(self, reason: Optional[str]) -> str:
        hint = (
            "set PREFECT_API_AUTH_STRING to the server's PREFECT_SERVER_API_AUTH_STRING"
            if self._token is None
            else "check PREFECT_API_AUTH_STRING (or PREFECT_API_KEY)"
        )
        return f"The Prefect server refused the event stream's credentials ({reason or 'no reason given'}): {hint}"

    @staticmethod
    def _parse(message: str | bytes) -> Optional[Event]:
        try:
            body = json.loads(message)
        except ValueError:
            logger.warning("ignoring a non-JSON message from the event stream")
            return None
        if not isinstance(body, dict) or body.get("type") != "event":
            logger.debug("ignoring an event stream message", extra={"type": str(body.get("type")) if isinstance(body, dict) else "?"})
            return None
        try:
            return Event.model_validate(body.get("event"))
        except ValidationError as exc:
            logger.warning("ignoring an event that does not parse", extra={"error": str(exc)[:500]})
            return None


def _close_description(code: Optional[int], reason: Optional[str]) -> str:
    if code is None:
        return "connection lost without a close frame"
    return f"closed by the server with code {code}" + (f": {reason}" if reason else "")


def subscribe(
    settings: Settings,
    *,
    event_names: Sequence[str],
    related_work_pool_ids: Optional[Iterable[UUID | str]] = None,
    **options: Any,
) -> AsyncIterator[Event]:
    """Events named `event_names` (all names if empty), optionally only those
    related to the given work pools, for as long as the caller iterates:
    `async for event in subscribe(settings, event_names=["prefect.flow-run.Scheduled"])`.
    `options` are `EventStream`'s (`since`, `backoff`, ...)."""
    return EventStream(
        settings, event_names=event_names, related_work_pool_ids=related_work_pool_ids, **options
    ).events()
