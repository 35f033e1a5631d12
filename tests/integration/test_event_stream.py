"""The event stream client against real Prefect servers: live delivery, the
work-pool filter, reconnects with replay, and auth."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Optional
from urllib.parse import urlsplit
from uuid import UUID

import pytest

from dispatcher.event_stream import (
    Event,
    EventStream,
    EventStreamAuthError,
    EventStreamError,
    events_out_url,
    subscribe,
)
from dispatcher.models import Deployment, FlowRun, WorkPool
from dispatcher.prefect_client import PrefectClient
from dispatcher.retries import RetryPolicy
from dispatcher.settings import Settings
from tests.conftest import REPO_ROOT
from tests.support.fault_proxy import TcpProxy
from tests.support.prefect_server import PrefectServer, start_prefect_server

pytestmark = pytest.mark.integration

SCHEDULED = "prefect.flow-run.Scheduled"
AUTH_STRING = "admin:s3cret"
FAST_BACKOFF = RetryPolicy(base_delay=0.05, max_delay=0.2)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    server = start_prefect_server(
        tmp_path_factory.mktemp("prefect-auth-home"),
        extra_env={"PREFECT_SERVER_API_AUTH_STRING": AUTH_STRING},
    )
    try:
        yield server
    finally:
        server.stop()


async def make_pool_and_deployment(client: PrefectClient, name: str) -> tuple[WorkPool, Deployment]:
    pool = await client.create_work_pool(name, "ecs:push", {})
    flow = await client.create_flow(f"{name}-flow")
    deployment = await client.create_deployment(
        name="dep", flow_id=str(flow.id), work_pool_name=name, entrypoint="flows.py:f"
    )
    return pool, deployment


class Collector:
    """Iterates a stream in a background task, collecting what it yields."""

    def __init__(self, stream: EventStream):
        self.stream = stream
        self.events: list[Event] = []
        self.error: Optional[BaseException] = None
        self._arrived = asyncio.Condition()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for event in self.stream:
                async with self._arrived:
                    self.events.append(event)
                    self._arrived.notify_all()
        except Exception as exc:  # surfaced by wait_for/close
            self.error = exc
            async with self._arrived:
                self._arrived.notify_all()

    async def connected(self, timeout: float = 15) -> None:
        await asyncio.wait_for(self.stream.connected.wait(), timeout)
        # The server subscribes after reading the filter and sends no ack.
        await asyncio.sleep(0.3)

    async def wait_for_run(self, run_id: UUID, timeout: float = 10) -> Event:
        async def found() -> Event:
            async with self._arrived:
                while True:
                    if self.error is not None:
                        raise self.error
                    for event in self.events:
                        if event.flow_run_id == run_id:
                            return event
                    await self._arrived.wait()

        return await asyncio.wait_for(found(), timeout)

    async def close(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


# --------------------------------------------------------------------- pure parts


SAMPLE_EVENT: dict[str, Any] = {
    "occurred": "2026-11-22T12:36:24.017069Z",
    "event": "prefect.flow-run.Scheduled",
    "id": "01a2e7c0-0000-4000-8000-000000006855",
    "follows": None,
    "received": "2026-11-22T12:36:24.049409Z",
    "resource": {
        "prefect.resource.id": "prefect.flow-run.fb3a53a6-5b8e-4a57-9a43-2c2a0b0d7c11",
        "prefect.resource.name": "unstoppable-guppy",
        "prefect.state-name": "Scheduled",
        "prefect.state-type": "SCHEDULED",
    },
    "related": [
        {"prefect.resource.id": "prefect.flow.99490000-0000-4000-8000-000000000001", "prefect.resource.role": "flow"},
        {"prefect.resource.id": "prefect.tag.t1", "prefect.resource.role": "tag"},
        {"prefect.resource.id": "prefect.tag.t2", "prefect.resource.role": "tag"},
        {
            "prefect.resource.id": "prefect.work-pool.a4b10000-0000-4000-8000-000000000002",
            "prefect.resource.role": "work-pool",
            "prefect.resource.name": "ref-ecs",
            "prefect.work-pool.type": "ecs:push",
        },
    ],
    "payload": {"intended": {"from": None, "to": "SCHEDULED"}},
    "something_new": {"ignored": True},
}


def test_event_model_reads_prefect_events() -> None:
    event = Event.model_validate(SAMPLE_EVENT)
    assert event.flow_run_id == UUID("fb3a53a6-5b8e-4a57-9a43-2c2a0b0d7c11")
    assert event.state_type == "SCHEDULED"
    assert event.resource_name == "unstoppable-guppy"
    pool = event.related_resource("work-pool")
    assert pool is not None and pool["prefect.work-pool.type"] == "ecs:push"
    assert event.work_pool_id == UUID("a4b10000-0000-4000-8000-000000000002")
    assert (event.work_pool_name, event.work_pool_type) == ("ref-ecs", "ecs:push")
    assert [t["prefect.resource.id"] for t in event.related_resources("tag")] == ["prefect.tag.t1", "prefect.tag.t2"]
    assert event.related_resource("deployment") is None
    assert event.payload["intended"]["to"] == "SCHEDULED"

    pool_event = Event.model_validate(
        {**SAMPLE_EVENT, "event": "prefect.work-pool.updated", "related": [],
         "resource": {"prefect.resource.id": "prefect.work-pool.a4b10000-0000-4000-8000-000000000002"}}
    )
    assert pool_event.flow_run_id is None and pool_event.work_pool_id is None


def test_stream_filter_and_local_matching() -> None:
    pool_id = UUID("a4b10000-0000-4000-8000-000000000002")
    stream = EventStream(
        Settings(api_url="https://prefect.example.com/api/"),
        event_names=[SCHEDULED],
        related_work_pool_ids=[pool_id],
    )
    assert stream.url == "wss://prefect.example.com/api/events/out"
    from datetime import datetime, timezone

    body = stream.filter(datetime(2026, 1, 1, tzinfo=timezone.utc))
    assert body["event"] == {"name": [SCHEDULED]}
    assert body["any_resource"] == {"id": [f"prefect.work-pool.{pool_id}"]}
    assert body["occurred"]["since"] == "2026-01-01T00:00:00+00:00"
    assert datetime.fromisoformat(body["occurred"]["until"]) > datetime.now(timezone.utc)

    event = Event.model_validate(SAMPLE_EVENT)
    assert stream.matches(event)
    assert not stream.matches(event.model_copy(update={"event": "prefect.flow-run.Pending"}))
    assert not stream.matches(event.model_copy(update={"related": event.related[:3]}))
    assert EventStream(Settings(api_url="http://x/api"), event_names=[]).matches(event)


def test_urls() -> None:
    assert events_out_url("http://127.0.0.1:4200/api") == "ws://127.0.0.1:4200/api/events/out"
    assert events_out_url("https://h/prefix/api/") == "wss://h/prefix/api/events/out"
    with pytest.raises(ValueError):
        events_out_url("127.0.0.1:4200/api")
    with pytest.raises(ValueError, match="PREFECT_API_URL"):
        EventStream(Settings(), event_names=[SCHEDULED])


def test_importing_the_module_does_not_import_websockets() -> None:
    code = "import sys, dispatcher.event_stream; assert 'websockets' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


# --------------------------------------------------------------------- live server


def test_scheduled_event_arrives_live_for_the_pool_only(prefect_server: PrefectServer, unique_name: str) -> None:
    settings = Settings(api_url=prefect_server.api_url)

    async def scenario() -> None:
        async with PrefectClient(settings) as client:
            pool_a, dep_a = await make_pool_and_deployment(client, f"{unique_name}-a")
            pool_b, dep_b = await make_pool_and_deployment(client, f"{unique_name}-b")
            filtered = Collector(
                EventStream(settings, event_names=[SCHEDULED], related_work_pool_ids=[pool_a.id])
            )
            unfiltered = Collector(EventStream(settings, event_names=[SCHEDULED]))
            try:
                await filtered.connected()
                await unfiltered.connected()
                run_b = await client.create_flow_run_from_deployment(dep_b.id)
                start = time.monotonic()
                run_a = await client.create_flow_run_from_deployment(dep_a.id)
                event = await filtered.wait_for_run(run_a.id, timeout=5)
                latency = time.monotonic() - start

                assert event.event == SCHEDULED
                assert event.flow_run_id == run_a.id
                assert event.work_pool_id == pool_a.id
                assert event.work_pool_name == pool_a.name
                assert event.work_pool_type == "ecs:push"
                assert event.related_resource("deployment")["prefect.resource.id"] == f"prefect.deployment.{dep_a.id}"
                assert latency < 3, latency

                # Pool B's run did emit an event (the unfiltered stream got it) ...
                await unfiltered.wait_for_run(run_b.id, timeout=5)
                await unfiltered.wait_for_run(run_a.id, timeout=5)
                await asyncio.sleep(1.0)
                # ... but the filtered stream only ever saw pool A's.
                assert [e.flow_run_id for e in filtered.events] == [run_a.id]
                assert filtered.error is None and filtered.stream.connections == 1
            finally:
                await filtered.close()
                await unfiltered.close()

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_subscribe_is_an_async_iterator(prefect_server: PrefectServer, unique_name: str) -> None:
    settings = Settings(api_url=prefect_server.api_url)

    async def scenario() -> None:
        async with PrefectClient(settings) as client:
            pool, dep = await make_pool_and_deployment(client, unique_name)
            events: AsyncIterator[Event] = subscribe(
                settings, event_names=[SCHEDULED], related_work_pool_ids=[str(pool.id)]
            )
            first = asyncio.create_task(events.__anext__())
            await asyncio.sleep(1.5)  # no `connected` to wait on here
            run = await client.create_flow_run_from_deployment(dep.id)
            event = await asyncio.wait_for(first, 10)
            assert event.flow_run_id == run.id
            await events.aclose()  # type: ignore[attr-defined]

    asyncio.run(asyncio.wait_for(scenario(), 60))


async def wait_until_stored(client: PrefectClient, run: FlowRun, timeout: float = 30) -> None:
    """Until the run's Scheduled event is in the database (the backfill reads it there)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = await client.request(
            "POST",
            "events/filter",
            json={"filter": {"resource": {"id": [f"prefect.flow-run.{run.id}"]}, "event": {"name": [SCHEDULED]}},
                  "limit": 5},
        )
        if response.json()["events"]:
            return
        await asyncio.sleep(0.3)
    raise AssertionError("the event was never stored")


def test_reconnects_after_a_drop_and_replays_what_it_missed(
    prefect_server: PrefectServer, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pushpool")
    server = urlsplit(prefect_server.api_url)
    direct = Settings(api_url=prefect_server.api_url)

    async def scenario(tcp: TcpProxy) -> None:
        proxied = Settings(api_url=f"http://127.0.0.1:{tcp.port}/api")
        async with PrefectClient(direct) as client:
            pool, dep = await make_pool_and_deployment(client, unique_name)
            collector = Collector(
                EventStream(proxied, event_names=[SCHEDULED], related_work_pool_ids=[pool.id], backoff=FAST_BACKOFF)
            )
            try:
                await collector.connected()
                before = await client.create_flow_run_from_deployment(dep.id)
                await collector.wait_for_run(before.id)

                # The connection drops and reconnecting fails for a while.
                tcp.refuse = True
                tcp.drop_connections()
                while collector.stream.connected.is_set():
                    await asyncio.sleep(0.02)
                during = await client.create_flow_run_from_deployment(dep.id)
                await wait_until_stored(client, during)
                failed_attempts = tcp.accepted
                await asyncio.sleep(0.5)
                assert tcp.accepted > failed_attempts  # it kept trying, with back-off
                tcp.refuse = False

                # The run created while it was away is replayed, then live delivery resumes.
                await collector.wait_for_run(during.id, timeout=15)
                await collector.connected()
                after = await client.create_flow_run_from_deployment(dep.id)
                await collector.wait_for_run(after.id, timeout=5)
                await asyncio.sleep(1.0)
                # Each exactly once: the replay window also covered `before`.
                assert [e.flow_run_id for e in collector.events] == [before.id, during.id, after.id]
                assert collector.stream.connections == 2
            finally:
                await collector.close()

    with TcpProxy(server.hostname, server.port) as tcp:
        asyncio.run(asyncio.wait_for(scenario(tcp), 120))
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("pushpool.")]
    assert "re-subscribed to the Prefect event stream" in messages
    assert any(r.levelno == logging.WARNING and "reconnecting" in r.getMessage() for r in caplog.records)


def test_a_wrong_url_is_an_error_not_a_retry_loop(prefect_server: PrefectServer) -> None:
    settings = Settings(api_url=prefect_server.api_url.removesuffix("/api"))

    async def scenario() -> None:
        with pytest.raises(EventStreamError, match="PREFECT_API_URL"):
            async for _ in subscribe(settings, event_names=[SCHEDULED]):
                pass

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_a_stream_closed_after_every_subscription_is_reported() -> None:
    """A filter the server rejects looks like a dropped connection; don't retry forever."""
    from websockets.asyncio.server import serve

    filters: list[dict[str, Any]] = []

    async def handler(websocket: Any) -> None:
        assert json.loads(await websocket.recv())["type"] == "auth"
        await websocket.send(json.dumps({"type": "auth_success"}))
        filters.append(json.loads(await websocket.recv()))
        await websocket.close()

    async def scenario() -> None:
        async with serve(handler, "127.0.0.1", 0, subprotocols=["prefect"]) as server:
            port = server.sockets[0].getsockname()[1]
            stream = EventStream(
                Settings(api_url=f"http://127.0.0.1:{port}/api"),
                event_names=[SCHEDULED],
                backoff=FAST_BACKOFF,
                max_rapid_closes=3,
            )
            with pytest.raises(EventStreamError, match="rejected the filter"):
                async for _ in stream:
                    pass
            assert stream.connections == 3

    asyncio.run(asyncio.wait_for(scenario(), 20))
    assert len(filters) == 3
    assert filters[0]["backfill"] is False
    assert all(f["filter"]["occurred"]["until"] > f["filter"]["occurred"]["since"] for f in filters)
    assert filters[1]["backfill"] is True  # reconnects replay


# --------------------------------------------------------------------- auth


def test_auth_string_server_accepts_our_auth(
    auth_server: PrefectServer, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = Settings(api_url=auth_server.api_url, api_auth_string=AUTH_STRING)

    async def scenario() -> None:
        async with PrefectClient(settings) as client:
            pool, dep = await make_pool_and_deployment(client, unique_name)
            collector = Collector(EventStream(settings, event_names=[SCHEDULED], related_work_pool_ids=[pool.id]))
            try:
                await collector.connected()
                run = await client.create_flow_run_from_deployment(dep.id)
                event = await collector.wait_for_run(run.id, timeout=5)
                assert event.work_pool_id == pool.id
            finally:
                await collector.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
    assert caplog.records  # DEBUG logging was really on ...
    assert "s3cret" not in caplog.text  # ... and the token never reached a log line


@pytest.mark.parametrize(
    "auth_string, reason",
    [("admin:wrong", "Invalid token"), (None, "Auth required but no token provided")],
)
def test_bad_auth_raises_a_clear_error_at_once(
    auth_server: PrefectServer, auth_string: Optional[str], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = Settings(api_url=auth_server.api_url, api_auth_string=auth_string)

    async def scenario() -> EventStream:
        stream = EventStream(settings, event_names=[SCHEDULED], backoff=RetryPolicy(base_delay=5, max_delay=5))
        with pytest.raises(EventStreamAuthError) as caught:
            async for _ in stream:
                pass
        message = str(caught.value)
        assert reason in message
        assert "PREFECT_API_AUTH_STRING" in message
        assert "wrong" not in message
        return stream

    start = time.monotonic()
    stream = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert time.monotonic() - start < 4  # no retry (the back-off is 5 s)
    assert stream.connections == 0
    assert "admin:wrong" not in caplog.text
