"""Fault injection for tests: an HTTP reverse proxy with programmable failures,
and a TCP proxy whose connections can be cut (for websockets and other streams).

    with FaultProxy(upstream=server.api_url.removesuffix("/api")) as proxy:
        proxy.add_rule(method="POST", path=r"/api/flow_runs/.*/set_state", respond=503, times=2)
        client = PrefectClient(Settings(api_url=proxy.url + "/api"))
        ...
        assert [r.status for r in proxy.requests_matching(path="set_state")] == [503, 503, 201]

`FaultProxy` is an ASGI app served by uvicorn on 127.0.0.1 (a free port) in a
background thread. Every request is forwarded to the upstream with httpx
(method, path and query as raw bytes, headers and body unchanged except the
hop-by-hop headers and Host) and the upstream's answer is returned the same way,
unless a rule fires first. Rules are checked in the order they were added; the
first one that matches the request *and fires* (see `times` and `probability`)
applies its fault:

- `respond=503`: answer with that status and a Prefect-like JSON body
  (`{"exception_message": "Service Unavailable"}`); 429 also gets `Retry-After`.
- `drop=True`: close the connection without any response; an httpx client raises
  a `TransportError` (`RemoteProtocolError`, or `ReadError` with `reset=True`,
  which sends a TCP RST like a crashed server).
- `delay=seconds`: wait, then go on (forward, or apply the rule's other fault).
- `forward_first=True`: the request reaches the upstream, then the fault replaces
  its answer: "the server did it, but the client never heard" (idempotency tests).
- `rewrite=function`: the upstream's answer body goes through `function(bytes) -> bytes`
  (to make an emulator say what it cannot, such as a container's non-zero exit code).

Rules and records are guarded by a lock: tests add rules from their own thread
while the server thread serves.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Callable, Optional, Union

import httpx
import uvicorn

__all__ = ["BackgroundServer", "FaultProxy", "FaultRule", "RecordedRequest", "TcpProxy"]

# RFC 9110 §7.6.1 connection-specific headers, plus the ones a proxy recomputes.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


@dataclass(frozen=True)
class RecordedRequest:
    """One request the proxy received and what it did with it."""

    method: str
    path: str
    query: str
    status: Optional[int]  # what the client got; None when the connection was dropped
    faulted: bool  # a rule fired for it (respond, drop or delay)
    action: str  # "forward", "respond", "drop", "delay" (then forwarded) or "error" (upstream unreachable)
    rule: Optional["FaultRule"] = None
    upstream_status: Optional[int] = None  # when the request reached the upstream
    started: float = 0.0  # time.monotonic() when it arrived
    duration: float = 0.0


@dataclass(eq=False)
class FaultRule:
    """What to do to requests that match. Build with `FaultProxy.add_rule`."""

    method: Optional[str] = None
    path: Optional[re.Pattern[str]] = None
    match_headers: dict[str, re.Pattern[str]] = field(default_factory=dict)
    respond: Optional[int] = None
    body: Optional[bytes] = None
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False
    reset: bool = False
    delay: float = 0.0
    forward_first: bool = False
    rewrite: Optional[Callable[[bytes], bytes]] = None
    times: Optional[int] = None
    probability: Optional[float] = None
    rng: Optional[random.Random] = None
    matched: int = 0  # requests that matched method and path
    fired: int = 0  # requests the fault was applied to

    def matches(self, method: str, path: str, headers: Optional[dict[str, str]] = None) -> bool:
        if self.method is not None and method.upper() != self.method:
            return False
        for name, pattern in self.match_headers.items():
            if pattern.search((headers or {}).get(name, "")) is None:
                return False
        return self.path is None or self.path.search(path) is not None

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.fired >= self.times

    def _should_fire(self) -> bool:
        """Called under the proxy's lock for each matching request."""
        self.matched += 1
        if self.exhausted:
            return False
        if self.probability is not None:
            assert self.rng is not None
            if self.rng.random() >= self.probability:
                return False
        self.fired += 1
        return True

    @property
    def action(self) -> str:
        if self.drop:
            return "drop"
        if self.respond is not None:
            return "respond"
        if self.rewrite is not None:
            return "rewrite"
        return "delay"

    def __repr__(self) -> str:
        what = {
            "drop": "drop", "respond": f"respond={self.respond}", "delay": f"delay={self.delay}", "rewrite": "rewrite"
        }[self.action]
        where = f"{self.method or '*'} {self.path.pattern if self.path else '*'}"
        return f"FaultRule({where} -> {what}, fired={self.fired}/{self.times if self.times is not None else '∞'})"


def _default_body(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return json.dumps({"exception_message": phrase}).encode()


class FaultProxy:
    """A fault-injecting reverse proxy in a background thread; see the module doc."""

    def __init__(self, upstream: str, *, seed: int = 0, timeout: float = 60.0):
        self.upstream = httpx.URL(upstream.rstrip("/"))
        self.seed = seed
        self.timeout = timeout
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._requests: list[RecordedRequest] = []
        self._server: Optional[BackgroundServer] = None
        self._client: Optional[httpx.AsyncClient] = None

    # ------------------------------------------------------------ rules, records

    def add_rule(
        self,
        *,
        method: Optional[str] = None,
        path: Optional[str] = None,
        match_headers: Optional[dict[str, str]] = None,
        respond: Optional[int] = None,
        body: Union[bytes, str, dict[str, Any], list[Any], None] = None,
        headers: Optional[dict[str, str]] = None,
        retry_after: Optional[float] = None,
        drop: bool = False,
        reset: bool = False,
        delay: float = 0.0,
        forward_first: bool = False,
        rewrite: Optional[Callable[[bytes], bytes]] = None,
        times: Optional[int] = None,
        probability: Optional[float] = None,
        seed: Optional[int] = None,
    ) -> FaultRule:
        """Add a rule (checked after the ones already added) and return it.

        `path` is a regular expression searched in the request path (anchor it
        with ^...$ for an exact match). `times`: only the first N matching
        requests (that pass `probability`) are faulted. `probability`: each
        matching request is faulted with that chance, drawn from a random
        generator seeded with `seed` (default: the proxy's seed), so a run of
        requests gets the same faults every time.
        """
        if drop and respond is not None:
            raise ValueError("a rule either responds or drops, not both")
        if reset and not drop:
            raise ValueError("reset=True only applies to drop=True")
        if respond is None and not drop and delay <= 0 and rewrite is None:
            raise ValueError("a rule needs respond=STATUS, drop=True, delay=SECONDS or rewrite=FUNCTION")
        if probability is not None and not 0 <= probability <= 1:
            raise ValueError("probability must be between 0 and 1")
        if times is not None and times < 0:
            raise ValueError("times must be >= 0")
        rule_headers = dict(headers or {})
        if respond is not None:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                rule_headers.setdefault("content-type", "application/json")
            elif isinstance(body, str):
                body = body.encode()
            elif body is None:
                body = _default_body(respond)
                rule_headers.setdefault("content-type", "application/json")
            if respond == 429 and retry_after is None:
                retry_after = 1
            if retry_after is not None:
                rule_headers.setdefault("retry-after", f"{retry_after:g}")
        rule = FaultRule(
            method=method.upper() if method else None,
            path=re.compile(path) if path is not None else None,
            match_headers={k.lower(): re.compile(v) for k, v in (match_headers or {}).items()},
            respond=respond,
            body=body if isinstance(body, bytes) else None,
            headers={k.lower(): v for k, v in rule_headers.items()},
            drop=drop,
            reset=reset,
            delay=delay,
            forward_first=forward_first,
            rewrite=rewrite,
            times=times,
            probability=probability,
            rng=random.Random(self.seed if seed is None else seed) if probability is not None else None,
        )
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove_rule(self, rule: FaultRule) -> None:
        with self._lock:
            self._rules.remove(rule)

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    @property
    def rules(self) -> list[FaultRule]:
        with self._lock:
            return list(self._rules)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request answered so far (in the order they were answered)."""
        with self._lock:
            return list(self._requests)

    def requests_matching(self, method: Optional[str] = None, path: Optional[str] = None) -> list[RecordedRequest]:
        pattern = re.compile(path) if path is not None else None
        return [
            r
            for r in self.requests
            if (method is None or r.method == method.upper()) and (pattern is None or pattern.search(r.path))
        ]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def _choose_rule(
        self, method: str, path: str, headers: Optional[dict[str, str]] = None
    ) -> Optional[FaultRule]:
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, path, headers) and rule._should_fire():
                    return rule
        return None

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        return self._server.url

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        return self._server.port

    def start(self) -> "FaultProxy":
        self._server = BackgroundServer(self._app, name="fault-proxy", lifespan="on").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------ the ASGI app

    async def _app(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # No default headers (User-Agent, Accept...), no proxies from the
                # environment, no redirects: the request goes out as it came in.
                self._client = httpx.AsyncClient(
                    timeout=self.timeout,
                    follow_redirects=False,
                    trust_env=False,
                    limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        started = time.monotonic()
        method = scope["method"]
        path = scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        body = await _read_body(receive)
        request_headers = {
            name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", [])
        }
        rule = self._choose_rule(method, path, request_headers)

        def record(status: Optional[int], action: str, upstream_status: Optional[int] = None) -> None:
            self._record(
                RecordedRequest(
                    method=method,
                    path=path,
                    query=query,
                    status=status,
                    faulted=rule is not None,
                    action=action,
                    rule=rule,
                    upstream_status=upstream_status,
                    started=started,
                    duration=time.monotonic() - started,
                )
            )

        if rule is not None and rule.delay > 0:
            await asyncio.sleep(rule.delay)

        upstream: Optional[tuple[int, list[tuple[bytes, bytes]], bytes]] = None
        if rule is None or rule.action in ("delay", "rewrite") or rule.forward_first:
            try:
                upstream = await self._forward(scope, body)
            except httpx.HTTPError as exc:
                if rule is None or rule.action in ("delay", "rewrite"):
                    message = json.dumps({"exception_message": f"Bad Gateway: {type(exc).__name__}: {exc}"})
                    record(502, "error")
                    await _respond(send, 502, [(b"content-type", b"application/json")], message.encode())
                    return
        upstream_status = upstream[0] if upstream else None

        # Recorded before the client can see the outcome, so a test that has its
        # answer (or its error) finds the request in `proxy.requests`.
        if rule is not None and rule.drop:
            record(None, "drop", upstream_status)
            await _drop_connection(send, reset=rule.reset)
            return
        if rule is not None and rule.respond is not None:
            record(rule.respond, "respond", upstream_status)
            headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in rule.headers.items()]
            await _respond(send, rule.respond, headers, rule.body or b"")
            return
        assert upstream is not None
        status, headers, content = upstream
        if rule is not None and rule.rewrite is not None:
            content = rule.rewrite(content)
            headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(content)).encode()))
        record(status, rule.action if rule is not None else "forward", status)
        await _respond(send, status, headers, content)

    async def _forward(self, scope: dict[str, Any], body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        assert self._client is not None
        raw_path = scope.get("raw_path") or scope["path"].encode()
        target = self.upstream.raw_path.rstrip(b"/").split(b"?", 1)[0] + raw_path
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        url = self.upstream.copy_with(raw_path=target)
        headers = [
            (name, value)
            for name, value in scope["headers"]
            if name.lower().decode("latin-1") not in HOP_BY_HOP and name.lower() != b"host"
        ]
        # content=None for no body, or httpx would add `Content-Length: 0` to it.
        request = httpx.Request(scope["method"], url, headers=headers, content=body or None)
        response = await self._client.send(request, stream=True)
        try:
            content = b"".join([chunk async for chunk in response.aiter_raw()])
        finally:
            await response.aclose()
        keep_length = scope["method"] == "HEAD"  # a HEAD answer's length is the GET body's
        response_headers = [
            (name, value)
            for name, value in response.headers.raw
            if name.lower().decode("latin-1") not in HOP_BY_HOP
            and (keep_length or name.lower() != b"content-length")
        ]
        if not keep_length:
            response_headers.append((b"content-length", str(len(content)).encode()))
        return response.status_code, response_headers, content


async def _read_body(receive: Callable[..., Any]) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _respond(send: Callable[..., Any], status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    if not any(name.lower() == b"content-length" for name, _ in headers):
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _drop_connection(send: Callable[..., Any], *, reset: bool) -> None:
    """Close the client's connection without a response.

    ASGI has no way to say this, and an app that raises before responding gets a
    500 from uvicorn. So reach the connection's transport through uvicorn's
    request cycle (the object `send` is bound to), close it, and return once
    uvicorn has seen the connection go (then it sends nothing more).
    """
    cycle = getattr(send, "__self__", None)
    transport: Optional[asyncio.Transport] = getattr(cycle, "transport", None)
    if transport is None:  # pragma: no cover - another server: promise a body, send none
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1")]})
        raise ConnectionAbortedError("fault proxy: dropping the connection")
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()
    for _ in range(100):
        if getattr(cycle, "disconnected", True):
            return
        await asyncio.sleep(0.001)



class BackgroundServer:
    """Any ASGI app served by uvicorn on 127.0.0.1 and a free port, in a daemon
    thread: `with BackgroundServer(app) as server: httpx.get(server.url + "/")`.
    No `server`/`date` headers are added, so responses are the app's own."""

    def __init__(self, app: Callable[..., Any], *, name: str = "asgi-server", **config: Any):
        self.app = app
        self.name = name
        self.config = config
        self.port: int = 0
        self._server: Optional[uvicorn.Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "BackgroundServer":
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that
        # say so, and without it every response waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        options: dict[str, Any] = dict(
            interface="asgi3",
            http="h11",
            ws="none",
            lifespan="auto",
            log_level="warning",
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=2,
        )
        options.update(self.config)
        self._server = uvicorn.Server(uvicorn.Config(self.app, **options))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"{self.name}-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                sock.close()
                raise RuntimeError(f"{self.name} did not start")
            time.sleep(0.01)
        return self  # uvicorn owns the listening socket now and closes it on shutdown

    def stop(self, timeout: float = 10.0) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout / 2)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout / 2)
        if thread.is_alive():
            raise RuntimeError(f"{self.name} did not stop")
        self._server = self._thread = None

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class TcpProxy:
    """A byte-level TCP forwarder in a background thread whose connections can be
    cut at will: for streams (websockets) that an HTTP-level proxy cannot fault.

        with TcpProxy("127.0.0.1", server_port) as tcp:
            url = f"http://127.0.0.1:{tcp.port}/api"
            ...
            tcp.refuse = True      # new connections are closed at once
            tcp.drop_connections() # cut the open ones
            tcp.refuse = False
    """

    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.refuse = False
        self.accepted = 0
        self.port: Optional[int] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._server: Optional[asyncio.base_events.Server] = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._ready = threading.Event()

    @property
    def active_connections(self) -> int:
        return len(self._writers) // 2

    def start(self) -> "TcpProxy":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the TCP proxy did not start")
        return self

    def _run(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        if self.refuse:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                sink.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers.discard(writer)
            self._writers.discard(up_writer)

    def drop_connections(self) -> None:
        """Cut every open connection (both sides, without a goodbye)."""
        assert self._loop is not None

        def cut() -> None:
            for writer in list(self._writers):
                writer.transport.abort()

        self._loop.call_soon_threadsafe(cut)

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
