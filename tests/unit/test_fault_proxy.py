"""The fault-injecting proxy the reliability tests rely on: it must forward
faithfully, and fault exactly when told to."""

from __future__ import annotations

import base64
import gzip
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.fault_proxy import BackgroundServer, FaultProxy, TcpProxy

UPSTREAM_HEADERS = [
    (b"x-upstream", b"yes"),
    (b"set-cookie", b"a=1; Path=/"),
    (b"set-cookie", b"b=2; Path=/"),
    (b"content-type", b"application/json"),
]


class Upstream:
    """An ASGI app that echoes each request as JSON and counts what it saw."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        echo = {
            "method": scope["method"],
            "raw_path": scope["raw_path"].decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "body": base64.b64encode(body).decode(),
        }
        with self.lock:
            self.seen.append(echo)
        if scope["path"] == "/gzip":
            content = gzip.compress(b'{"compressed": true}', mtime=0)
            headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
        else:
            content = json.dumps(echo).encode()
            headers = list(UPSTREAM_HEADERS)
        status = 201 if scope["method"] == "POST" else 200
        headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[Upstream, str]]:
    app = Upstream()
    with BackgroundServer(app, name="upstream") as server:
        yield app, server.url


@pytest.fixture
def proxy(upstream: tuple[Upstream, str]) -> Iterator[FaultProxy]:
    with FaultProxy(upstream=upstream[1], seed=1234) as proxy:
        yield proxy


def test_forwards_method_path_query_headers_and_body_byte_for_byte(
    proxy: FaultProxy, upstream: tuple[Upstream, str]
) -> None:
    body = bytes(range(256)) * 40  # not UTF-8, not JSON
    headers = [
        ("X-Custom", "spaced  value; with=stuff, \"quoted\""),
        ("X-Repeated", "one"),
        ("X-Repeated", "two"),
        ("Authorization", "Basic YWRtaW46czNjcmV0"),
        ("Content-Type", "application/octet-stream"),
    ]
    with httpx.Client() as client:
        response = client.post(
            proxy.url + "/api/odd%2Fpath/%C3%A9",
            params=[("a", "1"), ("a", "2"), ("sp ace", "x y")],
            headers=headers,
            content=body,
        )
    assert response.status_code == 201
    echo = response.json()
    assert echo["method"] == "POST"
    assert echo["raw_path"] == "/api/odd%2Fpath/%C3%A9"
    assert echo["query"] == "a=1&a=2&sp+ace=x+y"
    assert base64.b64decode(echo["body"]) == body
    received = [(k, v) for k, v in echo["headers"]]
    for name, value in headers:
        assert (name.lower(), value) in received
    assert received.count(("x-repeated", "one")) == 1 and ("x-repeated", "two") in received
    assert ("content-length", str(len(body))) in received
    host = dict(received)["host"]
    assert host == upstream[1].removeprefix("http://")
    # Nothing added by the proxy's own HTTP client.
    sent_names = {name.lower() for name, _ in headers} | {"host", "content-length", "accept",
                                                         "accept-encoding", "user-agent"}
    assert {name for name, _ in received} <= sent_names
    assert dict(received)["user-agent"] == client.headers["user-agent"]

    # The upstream's response headers come back as they were, repeated ones included.
    assert response.headers["x-upstream"] == "yes"
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert "server" not in response.headers and "date" not in response.headers
    assert [(r.method, r.path, r.status, r.faulted, r.action) for r in proxy.requests] == [
        ("POST", "/api/odd/path/é", 201, False, "forward")
    ]


def test_compressed_responses_pass_through_undecoded(proxy: FaultProxy) -> None:
    with httpx.Client() as client:
        response = client.get(proxy.url + "/gzip", headers={"Accept-Encoding": "gzip"})
    assert response.headers["content-encoding"] == "gzip"
    assert response.json() == {"compressed": True}  # httpx decoded it: the bytes were gzip
    assert int(response.headers["content-length"]) == len(gzip.compress(b'{"compressed": true}', mtime=0))


def test_503_twice_then_pass_through(proxy: FaultProxy, upstream: tuple[Upstream, str]) -> None:
    app, _ = upstream
    rule = proxy.add_rule(method="POST", path=r"/api/flow_runs/.*/set_state", respond=503, times=2)
    before = len(app.seen)
    with httpx.Client(base_url=proxy.url) as client:
        answers = [client.post("/api/flow_runs/abc/set_state", json={"state": {}}) for _ in range(3)]
        other = client.get("/api/flow_runs/abc")  # does not match: forwarded
    assert [r.status_code for r in answers] == [503, 503, 201]
    assert answers[0].json() == {"exception_message": "Service Unavailable"}
    assert answers[0].headers["content-type"] == "application/json"
    assert other.status_code == 200
    assert len(app.seen) - before == 2  # the faulted requests never reached the upstream
    assert (rule.matched, rule.fired, rule.exhausted) == (3, 2, True)
    assert [(r.status, r.faulted, r.action) for r in proxy.requests] == [
        (503, True, "respond"),
        (503, True, "respond"),
        (201, False, "forward"),
        (200, False, "forward"),
    ]
    assert [r.status for r in proxy.requests_matching(method="POST", path="set_state$")] == [503, 503, 201]


def test_429_carries_retry_after_and_custom_bodies(proxy: FaultProxy) -> None:
    proxy.add_rule(path="^/limited$", respond=429, retry_after=3, times=1)
    proxy.add_rule(path="^/custom$", respond=500, body={"detail": "boom"}, headers={"X-Fault": "1"})
    with httpx.Client(base_url=proxy.url) as client:
        limited = client.get("/limited")
        custom = client.get("/custom")
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "3"
    assert limited.json() == {"exception_message": "Too Many Requests"}
    assert custom.status_code == 500 and custom.json() == {"detail": "boom"}
    assert custom.headers["x-fault"] == "1"


@pytest.mark.parametrize("reset", [False, True])
def test_drop_makes_httpx_raise_a_transport_error(proxy: FaultProxy, reset: bool) -> None:
    proxy.add_rule(method="GET", path="^/drop$", drop=True, reset=reset, times=1)
    with httpx.Client(base_url=proxy.url) as client:
        assert client.get("/before").status_code == 200  # a keep-alive connection exists
        with pytest.raises(httpx.TransportError) as caught:
            client.get("/drop")
        assert client.get("/drop").status_code == 200  # the next try goes through
    # A FIN before any response reads as "server disconnected", a RST as a read error.
    assert isinstance(caught.value, httpx.ReadError if reset else httpx.RemoteProtocolError)
    assert [(r.path, r.status, r.action) for r in proxy.requests] == [
        ("/before", 200, "forward"),
        ("/drop", None, "drop"),
        ("/drop", 200, "forward"),
    ]


def test_async_httpx_sees_the_drop_too(proxy: FaultProxy) -> None:
    import asyncio

    proxy.add_rule(path="^/drop$", drop=True)

    async def main() -> None:
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            with pytest.raises(httpx.TransportError):
                await client.post("/drop", json={})

    asyncio.run(main())


def test_forward_first_lets_the_upstream_act_but_loses_the_answer(
    proxy: FaultProxy, upstream: tuple[Upstream, str]
) -> None:
    app, _ = upstream
    proxy.add_rule(path="^/lost$", drop=True, forward_first=True, times=1)
    proxy.add_rule(path="^/masked$", respond=503, forward_first=True, times=1)
    before = len(app.seen)
    with httpx.Client(base_url=proxy.url) as client:
        with pytest.raises(httpx.TransportError):
            client.post("/lost", content=b"x")
        assert client.post("/masked", content=b"y").status_code == 503
    assert [base64.b64decode(s["body"]) for s in app.seen[before:]] == [b"x", b"y"]
    assert [(r.status, r.upstream_status) for r in proxy.requests] == [(None, 201), (503, 201)]


def test_delay_then_pass_through(proxy: FaultProxy) -> None:
    proxy.add_rule(path="^/slow$", delay=0.5, times=1)
    with httpx.Client(base_url=proxy.url) as client:
        start = time.monotonic()
        assert client.get("/slow").status_code == 200
        slow = time.monotonic() - start
        with pytest.raises(httpx.ReadTimeout):
            proxy.add_rule(path="^/slower$", delay=2, times=1)
            client.get("/slower", timeout=0.3)
    assert slow >= 0.5
    assert proxy.requests[0].action == "delay" and proxy.requests[0].faulted


def test_probability_with_a_seed_is_reproducible(upstream: tuple[Upstream, str]) -> None:
    def pattern(seed: int) -> list[int]:
        with FaultProxy(upstream=upstream[1], seed=seed) as proxy:
            proxy.add_rule(path="^/flaky$", respond=503, probability=0.3)
            with httpx.Client(base_url=proxy.url) as client:
                return [client.get("/flaky").status_code for _ in range(40)]

    first, again, other = pattern(7), pattern(7), pattern(8)
    assert first == again
    assert first != other
    assert 3 <= first.count(503) <= 25  # roughly 30 %
    assert set(first) == {200, 503}


def test_probability_and_times_combine(proxy: FaultProxy) -> None:
    rule = proxy.add_rule(path="^/x$", respond=503, probability=0.5, times=3, seed=1)
    with httpx.Client(base_url=proxy.url) as client:
        statuses = [client.get("/x").status_code for _ in range(30)]
    assert statuses.count(503) == 3 and rule.fired == 3 and rule.matched == 30


def test_rules_are_checked_in_order_and_can_be_removed(proxy: FaultProxy) -> None:
    first = proxy.add_rule(path="^/a", respond=418, times=1)
    proxy.add_rule(path="^/a", respond=503)
    with httpx.Client(base_url=proxy.url) as client:
        assert [client.get("/a").status_code for _ in range(2)] == [418, 503]
        proxy.clear_rules()
        assert client.get("/a").status_code == 200
    assert first.fired == 1
    assert [r.rule is first for r in proxy.requests] == [True, False, False]


def test_rules_added_while_serving_from_other_threads(proxy: FaultProxy) -> None:
    statuses: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=proxy.url) as client:
            while not stop.is_set():
                statuses.append(client.get("/busy").status_code)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    rules = [proxy.add_rule(path="^/busy$", respond=503, times=5) for _ in range(10)]
    deadline = time.monotonic() + 20
    while not all(rule.exhausted for rule in rules) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join()
    assert all(rule.fired == 5 for rule in rules)
    assert statuses.count(503) == 50
    assert len(proxy.requests) == len(statuses)


def test_upstream_down_gives_502(upstream: tuple[Upstream, str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with FaultProxy(upstream=dead) as proxy:
        response = httpx.get(proxy.url + "/anything")
    assert response.status_code == 502
    assert "Bad Gateway" in response.json()["exception_message"]
    assert proxy.requests[0].action == "error"


def test_bad_rules_are_refused(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError):
        proxy.add_rule(path="x")
    with pytest.raises(ValueError):
        proxy.add_rule(path="x", respond=503, drop=True)
    with pytest.raises(ValueError):
        proxy.add_rule(path="x", respond=503, probability=1.5)


def test_stops_cleanly(upstream: tuple[Upstream, str]) -> None:
    threads_before = set(threading.enumerate())
    proxy = FaultProxy(upstream=upstream[1])
    with proxy:
        url, port = proxy.url, proxy.port
        proxy.add_rule(path="^/slow$", delay=30)
        # A request still in flight when the proxy stops must not hold it up.
        inflight = threading.Thread(target=lambda: _swallow(lambda: httpx.get(url + "/slow", timeout=60)))
        inflight.start()
        time.sleep(0.2)
        assert httpx.get(url + "/ok").status_code == 200
        start = time.monotonic()
    assert time.monotonic() - start < 8
    inflight.join(10)
    assert not inflight.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/ok")
    with socket.socket() as sock:  # the port is free again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    assert {t for t in threading.enumerate() if t.is_alive()} <= threads_before
    with pytest.raises(RuntimeError):
        proxy.url
    proxy.stop()  # idempotent


def _swallow(call: Any) -> None:
    try:
        call()
    except httpx.HTTPError:
        pass


def test_tcp_proxy_forwards_and_cuts(upstream: tuple[Upstream, str]) -> None:
    host, port = upstream[1].removeprefix("http://").split(":")
    with TcpProxy(host, int(port)) as tcp:
        with httpx.Client(base_url=f"http://127.0.0.1:{tcp.port}") as client:
            assert client.get("/one").status_code == 200
            assert tcp.active_connections == 1
            tcp.drop_connections()
            time.sleep(0.1)
            assert tcp.active_connections == 0
            tcp.refuse = True
            with pytest.raises(httpx.TransportError):
                client.get("/two")
            tcp.refuse = False
            assert client.get("/three").status_code == 200


def test_head_keeps_the_upstream_length(proxy: FaultProxy) -> None:
    got = httpx.get(proxy.url + "/h")  # separate clients: no cookies carried over
    head = httpx.head(proxy.url + "/h")
    assert head.status_code == 200 and head.content == b""
    # The echo differs by method only in its text, which has the same length.
    assert abs(int(head.headers["content-length"]) - len(got.content)) <= 1


def test_no_content_length_is_invented(proxy: FaultProxy) -> None:
    with httpx.Client(base_url=proxy.url) as client:
        for method in ("GET", "HEAD", "DELETE", "OPTIONS"):
            echo_headers = client.request(method, "/n").json()["headers"] if method != "HEAD" else None
            if echo_headers is not None:
                assert "content-length" not in dict(echo_headers), method
        empty_post = client.post("/n", content=b"").json()["headers"]
    assert dict(empty_post)["content-length"] == "0"  # the client sent it: kept
