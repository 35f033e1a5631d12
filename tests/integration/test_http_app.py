"""The ASGI app `dispatcher.http:app` under a real uvicorn, against a real
Prefect server: authentication, bad bodies, the size cap, and webhooks that
sweep a pool (or, for a run not yet due, do not)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from dispatcher.webhook import sign
from tests.support.factories import (
    REPO_ROOT,
    client_for,
    dispatcher_env,
    make_deployment,
    make_pool,
    make_runs,
    submit_counts,
)
from tests.support.prefect_server import free_port

pytestmark = pytest.mark.integration

SECRET = "test-webhook-secret-" + uuid.uuid4().hex


@contextlib.contextmanager
def running_app(env: dict[str, str], log_path: Path, timeout: float = 30) -> Iterator[str]:
    """`uvicorn dispatcher.http:app` on a free loopback port; yields its base URL."""
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "dispatcher.http:app", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"uvicorn exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the app did not answer /health within {timeout} s:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def app_env(api_env: dict[str, str], record_file: Path, secret: str = SECRET) -> dict[str, str]:
    return dispatcher_env(api_env, record_file, PUSHPOOL_WEBHOOK_SECRET=secret)


def scheduled_event(run_id: Any, pool: Any, event: str = "prefect.flow-run.Scheduled") -> dict[str, Any]:
    """A Prefect event as an automation's `{{ event | tojson }}` sends it."""
    return {
        "id": str(uuid.uuid4()),
        "event": event,
        "occurred": datetime.now(timezone.utc).isoformat(),
        "resource": {
            "prefect.resource.id": f"prefect.flow-run.{run_id}",
            "prefect.resource.name": "some-run",
            "prefect.state-type": "SCHEDULED",
        },
        "related": [
            {
                "prefect.resource.id": f"prefect.work-pool.{pool.id}",
                "prefect.resource.role": "work-pool",
                "prefect.resource.name": pool.name,
                "prefect.work-pool.type": pool.type,
            }
        ],
        "payload": {"intended": {"from": None, "to": "SCHEDULED"}},
    }


def test_the_asgi_app_authenticates_validates_and_dispatches(
    prefect_server, api_env, unique_name, record_file: Path, tmp_path: Path
):
    async def setup():
        async with client_for(prefect_server.api_url) as client:
            pool = await make_pool(client, unique_name)
            deployment = await make_deployment(client, unique_name)
            later = (await make_runs(client, deployment, 1, scheduled_in=timedelta(hours=1)))[0]
            return pool, deployment, later

    pool, deployment, later = asyncio.run(setup())
    bearer = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"}
    log_path = tmp_path / "uvicorn.log"
    bodies: list[str] = []

    with running_app(app_env(api_env, record_file), log_path) as base, httpx.Client(base_url=base, timeout=60) as http:

        def send(method: str, path: str, **kwargs: Any) -> httpx.Response:
            response = http.request(method, path, **kwargs)
            bodies.append(response.text)
            assert response.headers["content-type"] == "application/json"
            return response

        health = send("GET", "/health")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        assert send("GET", "/nope").status_code == 404
        wrong_method = send("GET", "/webhook")
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
        assert send("POST", "/health").status_code == 405

        event = json.dumps(scheduled_event(later.id, pool)).encode()
        missing = send("POST", "/webhook", content=event)
        assert missing.status_code == 401 and "missing credentials" in missing.json()["error"]
        wrong = send("POST", "/webhook", content=event, headers={"Authorization": "Bearer not-the-secret"})
        assert wrong.status_code == 401 and "wrong" in wrong.json()["error"]
        wrong_header = send("POST", "/webhook", content=event, headers={"X-Pushpool-Secret": SECRET[:-1]})
        assert wrong_header.status_code == 401

        not_json = send("POST", "/webhook", content=b"<xml/>", headers=bearer)
        assert not_json.status_code == 400 and "not JSON" in not_json.json()["error"]
        not_event = send("POST", "/webhook", content=b'{"hello": "world"}', headers=bearer)
        assert not_event.status_code == 400 and "not a Prefect event" in not_event.json()["error"]
        not_object = send("POST", "/webhook", content=b"[1, 2]", headers=bearer)
        assert not_object.status_code == 400

        # Over 256 KB: refused by its Content-Length, and when streamed without one.
        big = b'{"pad": "' + b"x" * (300 * 1024) + b'"}'
        assert send("POST", "/webhook", content=big, headers=bearer).status_code == 413

        def chunks():
            for _ in range(300):
                yield b"x" * 1024

        streamed = send("POST", "/webhook", content=chunks(), headers=bearer)
        assert streamed.status_code == 413

        # An HMAC-signed body is accepted (an event the dispatcher has nothing to do for).
        running = json.dumps(scheduled_event(later.id, pool, event="prefect.flow-run.Running")).encode()
        signed = send("POST", "/webhook", content=running, headers={"X-Pushpool-Signature": sign(running, SECRET)})
        assert signed.status_code == 200 and "ignored" in signed.json(), signed.text
        bad_signature = send(
            "POST", "/webhook", content=running, headers={"X-Pushpool-Signature": sign(running + b" ", SECRET)}
        )
        assert bad_signature.status_code == 401

        # A Scheduled event for a run an hour ahead: accepted, but nothing is claimed.
        ahead = send("POST", "/webhook", content=event, headers=bearer)
        assert ahead.status_code == 200, ahead.text
        assert ahead.json()["claimed"] == 0 and ahead.json()["pools"] == [unique_name]

        # A due run: the event sweeps its pool, the run is submitted once.
        async def create_due_run():
            async with client_for(prefect_server.api_url) as client:
                return (await make_runs(client, deployment, 1))[0]

        due = asyncio.run(create_due_run())
        due_event = json.dumps(scheduled_event(due.id, pool)).encode()
        first = send("POST", "/", content=due_event, headers=bearer)  # POST / is the webhook too
        assert first.status_code == 200, first.text
        assert first.json()["submitted"] == 1
        replay = send("POST", "/webhook", content=due_event, headers={"X-Pushpool-Secret": SECRET})
        assert replay.status_code == 200 and replay.json()["submitted"] == 0, replay.text

    async def read(run_id):
        async with client_for(prefect_server.api_url) as client:
            return await client.read_flow_run(run_id)

    submitted = asyncio.run(read(due.id))
    assert submitted.infrastructure_pid and submitted.infrastructure_pid.endswith(str(due.id))
    assert submit_counts(record_file) == {str(due.id): 1}
    not_yet = asyncio.run(read(later.id))
    assert not_yet.state_type == "SCHEDULED" and not_yet.infrastructure_pid is None

    assert all(SECRET not in body for body in bodies)
    log = log_path.read_text()
    assert SECRET not in log
    assert '"message": "webhook"' in log  # pushpool's JSON logging is on


def test_without_a_webhook_secret_the_app_refuses_to_start(api_env, record_file: Path, tmp_path: Path):
    env = dispatcher_env(api_env, record_file)
    env.pop("PUSHPOOL_WEBHOOK_SECRET", None)
    port = free_port()
    completed = subprocess.run(
        [sys.executable, "-m", "uvicorn", "dispatcher.http:app", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert completed.returncode != 0
    assert "PUSHPOOL_WEBHOOK_SECRET is not set" in completed.stdout + completed.stderr


@pytest.fixture
def restore_pushpool_logging() -> Iterator[None]:
    """The app configures pushpool's logging in-process; undo it afterwards."""
    import logging

    root = logging.getLogger("pushpool")
    saved = (list(root.handlers), root.level, root.propagate)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    root.propagate = saved[2]


def test_in_process_errors_are_500_lifespan_and_lazy_settings(monkeypatch, capsys, restore_pushpool_logging):
    """No server needed: an unexpected error answers 500 with no secret; the
    settings are read on the first request when the host sends no lifespan."""
    import dispatcher.http as http_module
    from dispatcher.settings import Settings

    async def explode(headers, body, settings, *, registry=None):
        raise RuntimeError(f"boom with {settings.webhook_secret.get_secret_value()}")

    monkeypatch.setattr(http_module, "handle_webhook", explode)
    settings = Settings(api_url="http://127.0.0.1:9/api", webhook_secret=SECRET)

    async def scenario():
        app = http_module.create_app(settings, registry=object())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            failed = await http.post("/webhook", content=b"{}", headers={"Authorization": f"Bearer {SECRET}"})
            health = await http.head("/health")
        # The lifespan protocol, as uvicorn drives it.
        messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
        sent: list[dict] = []

        async def receive():
            return next(messages)

        async def send(message):
            sent.append(message)

        await http_module.create_app(settings)({"type": "lifespan"}, receive, send)
        # No PREFECT_API_URL: importable and startable to the point of saying why not.
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
        monkeypatch.setenv("PREFECT_PROFILES_PATH", "/nonexistent/profiles.toml")
        monkeypatch.setenv("PUSHPOOL_WEBHOOK_SECRET", SECRET)
        lazy = http_module.create_app()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=lazy), base_url="http://app") as http:
            unconfigured = await http.get("/health")
        return failed, health, sent, unconfigured

    failed, health, sent, unconfigured = asyncio.run(scenario())
    assert (failed.status_code, failed.json()) == (500, {"error": "internal error"})
    assert health.status_code == 200 and health.content == b""
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert unconfigured.status_code == 503 and "misconfigured" in unconfigured.json()["error"]
    logged = capsys.readouterr().err
    assert "boom with ********" in logged and SECRET not in logged
    assert "PREFECT_API_URL is not set" in logged
