"""The dispatcher as an ASGI app, for Cloud Run services, Azure Functions or
any host that speaks ASGI:

    uvicorn dispatcher.http:app --host 0.0.0.0 --port 8080

    POST /webhook  (or POST /)   a Prefect automation webhook (see `dispatcher.webhook`)
    GET  /health                 200 {"status": "ok"}; makes no Prefect call

A plain ASGI callable, no web framework, so that importing it stays cheap. The
settings are read from the environment once per app instance, at lifespan
startup or on the first request (hosts that send no lifespan events), never at
import: `app` imports without PREFECT_API_URL. A missing PREFECT_API_URL or
PUSHPOOL_WEBHOOK_SECRET fails the lifespan startup (the host sees a broken
revision at once); without lifespan, `/health` and webhooks answer 503.

The body is read with a hard cap: past 256 KB the app stops reading and answers
413. Bad input never raises out of the app; an unexpected error answers 500
`{"error": "internal error"}` and is logged, redacted.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Optional

from dispatcher.logs import Redactor, configure_logging, get_logger
from dispatcher.settings import Settings
from dispatcher.webhook import MAX_BODY_BYTES, handle_webhook

logger = get_logger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

WEBHOOK_PATHS = frozenset({"/", "/webhook"})
HEALTH_PATH = "/health"
MISCONFIGURED = "the dispatcher is misconfigured; see its logs"


class BodyTooLarge(Exception):
    pass


class ClientDisconnected(Exception):
    pass


class DispatcherApp:
    """One ASGI app: its settings are read once, on first need."""

    def __init__(self, settings: Optional[Settings] = None, registry: Any = None):
        self._settings = settings
        self._registry = registry
        self._ready = False
        self._config_error: Optional[str] = None

    # ------------------------------------------------------------ configuration

    def _prepare(self) -> Optional[str]:
        """Read the settings, set up logging; None when ready, else why not.
        Runs once; never raises."""
        if self._ready:
            return self._config_error
        self._ready = True
        try:
            if self._settings is None:
                self._settings = Settings.from_env()
        except ValueError as exc:
            configure_logging(Redactor())
            self._config_error = f"invalid pushpool settings: {_describe(exc)}"
            logger.error("the ASGI app cannot start", extra={"reason": self._config_error})
            return self._config_error
        settings = self._settings
        configure_logging(Redactor(settings.secret_values()))
        problems = []
        if not settings.api_url:
            problems.append("PREFECT_API_URL is not set")
        if settings.webhook_secret is None or not settings.webhook_secret.get_secret_value():
            problems.append("PUSHPOOL_WEBHOOK_SECRET is not set, so no webhook could be accepted")
        if problems:
            self._config_error = "; ".join(problems)
            logger.error("the ASGI app cannot start", extra={"reason": self._config_error})
            return self._config_error
        if self._registry is None:
            try:
                from providers.registry import ProviderRegistry

                self._registry = ProviderRegistry()
            except Exception:  # a broken plug-in: each request finds its own registry
                logger.exception("could not load the provider registry")
        logger.info(
            "ASGI app ready",
            extra={"api_url": settings.api_url, "pools": ",".join(settings.pools) or "every push pool"},
        )
        return None

    # ------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            message = await receive()
            if message.get("type") == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                error = self._prepare()
                if error:
                    await send({"type": "lifespan.startup.failed", "message": error})
                else:
                    await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def respond(status: int, body: dict[str, Any], extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
            nonlocal started
            payload = json.dumps(body, separators=(",", ":")).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"cache-control", b"no-store"),
                *extra_headers,
            ]
            started = True
            await send({"type": "http.response.start", "status": status, "headers": headers})
            if scope.get("method") == "HEAD":
                payload = b""
            await send({"type": "http.response.body", "body": payload})

        try:
            path = _route_path(scope)
            method = scope.get("method", "GET").upper()
            if path == HEALTH_PATH:
                if method not in ("GET", "HEAD"):
                    await respond(405, {"error": "use GET /health"}, ((b"allow", b"GET, HEAD"),))
                elif self._prepare():
                    await respond(503, {"status": "error", "error": MISCONFIGURED})
                else:
                    await respond(200, {"status": "ok"})
                return
            if path not in WEBHOOK_PATHS:
                await respond(404, {"error": "not found: POST /webhook for Prefect automation webhooks, GET /health"})
                return
            if method != "POST":
                await respond(405, {"error": f"use POST {path}"}, ((b"allow", b"POST"),))
                return
            headers = _headers(scope)
            too_large = {"error": f"the body is over {MAX_BODY_BYTES // 1024} KB"}
            if _declared_length(headers) > MAX_BODY_BYTES:
                await respond(413, too_large, ((b"connection", b"close"),))
                return
            try:
                body = await _read_body(receive, MAX_BODY_BYTES)
            except BodyTooLarge:
                await respond(413, too_large, ((b"connection", b"close"),))
                return
            except ClientDisconnected:
                return
            if self._prepare():
                await respond(503, {"error": MISCONFIGURED})
                return
            result = await handle_webhook(headers, body, self._settings, registry=self._registry)
            await respond(result.status, result.body)
        except Exception:
            logger.exception("the ASGI app failed on a request", extra={"path": str(scope.get("path", ""))[:200]})
            if not started:
                try:
                    await respond(500, {"error": "internal error"})
                except Exception:  # the client is gone
                    pass


def _route_path(scope: Scope) -> str:
    """The request path without the app's mount point, without a trailing slash."""
    path = scope.get("path") or "/"
    root = (scope.get("root_path") or "").rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root):] or "/"
    return path.rstrip("/") or "/"


def _headers(scope: Scope) -> dict[str, str]:
    """Lower-case header names; the first value of a repeated header wins."""
    headers: dict[str, str] = {}
    for name, value in scope.get("headers") or ():
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


def _declared_length(headers: dict[str, str]) -> int:
    try:
        return int(headers.get("content-length", "0"))
    except ValueError:
        return 0


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The request body; raises BodyTooLarge as soon as it passes `limit`
    bytes, without reading (or buffering) the rest."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        if message["type"] != "http.request":
            continue
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _describe(exc: ValueError) -> str:
    """What is wrong with the settings, without the values (they may be secret)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'settings'}: {error['msg']}"
            for error in errors(include_url=False, include_input=False)
        )
    return type(exc).__name__


def create_app(settings: Optional[Settings] = None, registry: Any = None) -> DispatcherApp:
    """A new ASGI app. Without `settings`, they are read from the environment
    at lifespan startup or on the first request."""
    return DispatcherApp(settings, registry)


app = create_app()

__all__ = ["DispatcherApp", "app", "create_app"]
