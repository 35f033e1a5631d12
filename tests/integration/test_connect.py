"""`pushpool connect` end to end: the real Prefect server's automations call the
ASGI app's webhook, which sweeps the pool, with no sweep loop or dispatcher
process anywhere else. Also: re-running changes nothing twice, and `--remove`
deletes exactly what connect made."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import pytest
from typer.testing import CliRunner

from dispatcher.cli import app as cli_app
from dispatcher.cli.connect import BLOCK_NAME, CANCELLING_AUTOMATION, SCHEDULED_AUTOMATION
from dispatcher.models import StateProposal, StateType
from tests.integration.test_http_app import SECRET, app_env, running_app
from tests.support.factories import client_for, make_deployment, make_pool, make_runs, recorded_submits, submit_counts

pytestmark = pytest.mark.integration

OURS = [SCHEDULED_AUTOMATION, CANCELLING_AUTOMATION]


def cli_env(api_env: dict[str, str], **extra: Optional[str]) -> dict[str, Optional[str]]:
    env: dict[str, Optional[str]] = {
        "PREFECT_API_URL": api_env["PREFECT_API_URL"],
        "PREFECT_HOME": api_env["PREFECT_HOME"],
        "PREFECT_API_KEY": None,
        "PREFECT_API_AUTH_STRING": None,
        "PREFECT_PROFILE": None,
        "PUSHPOOL_WEBHOOK_SECRET": None,
        "PUSHPOOL_POOLS": None,
    }
    env.update(extra)
    return env


def pushpool(env: dict[str, Optional[str]], *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli_app, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


async def api(api_url: str, method: str, path: str, body: Any = None) -> Any:
    async with client_for(api_url) as client:
        response = await client.request(method, path, json=body)
        return response.json() if response.content else None


def automations_named(api_url: str, names: list[str]) -> list[dict[str, Any]]:
    return asyncio.run(api(api_url, "POST", "automations/filter", {"automations": {"name": {"any_": names}}}))


def webhook_blocks(api_url: str, names: list[str]) -> list[dict[str, Any]]:
    body = {
        "block_types": {"slug": {"any_": ["webhook"]}},
        "block_documents": {"name": {"any_": names}},
        "include_secrets": True,
    }
    return asyncio.run(api(api_url, "POST", "block_documents/filter", body))


def rows_with(output: str, action: str) -> int:
    """How many rows of connect's table have this action."""
    return sum(1 for line in output.splitlines() if line.startswith("│") and f"│ {action} " in line)


def wait_until(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def test_connect_wires_prefect_automations_to_the_asgi_app(
    prefect_server, api_env, unique_name, record_file: Path, tmp_path: Path
):
    api_url = prefect_server.api_url
    unrelated = f"unrelated-{unique_name}"

    async def setup():
        async with client_for(api_url) as client:
            pool = await make_pool(client, unique_name)
            deployment = await make_deployment(client, unique_name)
            block_type = await client.read_block_type_by_slug("webhook")
            schema = await client.read_latest_block_schema(block_type.id)
            await client.create_block_document(
                unrelated, block_type.id, schema.id, {"url": "http://127.0.0.1:9/elsewhere", "method": "POST"}
            )
            await client.request(
                "POST",
                "automations/",
                json={
                    "name": unrelated,
                    "trigger": {
                        "type": "event", "posture": "Reactive", "expect": ["prefect.flow-run.Completed"],
                        "match": {"prefect.resource.id": "prefect.flow-run.*"}, "threshold": 1, "within": 0,
                    },
                    "actions": [{"type": "do-nothing"}],
                },
            )
            return pool, deployment

    pool, deployment = asyncio.run(setup())
    env = cli_env(api_env)

    # Bad input is refused before anything is created.
    assert "absolute http" in pushpool(env, "connect", "--url", "dispatcher.example.com/webhook", code=1)
    assert "no work pool named 'no-such-pool'" in pushpool(
        env, "connect", "--url", "http://127.0.0.1:1/webhook", "--secret", SECRET, "--pool", "no-such-pool", code=1
    )
    assert automations_named(api_url, OURS) == [] and webhook_blocks(api_url, [BLOCK_NAME]) == []

    with running_app(app_env(api_env, record_file), tmp_path / "uvicorn.log") as base:
        url = f"{base}/webhook"
        first = pushpool(env, "connect", "--url", url, "--secret", SECRET, "--pool", unique_name)
        assert rows_with(first, "created") == 3 and SECRET not in first
        second = pushpool(env, "connect", "--url", url, "--secret", SECRET, "--pool", unique_name)
        assert rows_with(second, "updated") == 3 and rows_with(second, "created") == 0 and SECRET not in second

        automations = automations_named(api_url, OURS)
        assert sorted(a["name"] for a in automations) == sorted(OURS)
        blocks = webhook_blocks(api_url, [BLOCK_NAME])
        assert len(blocks) == 1
        assert blocks[0]["data"]["url"] == url
        assert blocks[0]["data"]["headers"]["Authorization"] == f"Bearer {SECRET}"
        for automation in automations:
            assert automation["trigger"]["match_related"] == {
                "prefect.resource.role": "work-pool",
                "prefect.resource.id": [f"prefect.work-pool.{pool.id}"],
            }
            assert automation["actions"] == [
                {"type": "call-webhook", "block_document_id": blocks[0]["id"], "payload": "{{ event | tojson }}"}
            ]

        # Pointing the connection elsewhere needs a yes (there is no terminal here).
        refused = pushpool(env, "connect", "--url", "http://127.0.0.1:1/other", "--secret", SECRET, code=1)
        assert "--yes" in refused
        assert webhook_blocks(api_url, [BLOCK_NAME])[0]["data"]["url"] == url

        # Runs created for now are submitted by the automation → webhook → sweep alone.
        async def create_and_wait(timeout: float = 30) -> tuple[Any, float, float]:
            async with client_for(api_url) as client:
                started = time.monotonic()
                run = (await make_runs(client, deployment, 1))[0]
                while time.monotonic() - started < timeout:
                    current = await client.read_flow_run(run.id)
                    if current.infrastructure_pid:
                        seen = time.monotonic() - started
                        states = await client.read_flow_run_states(run.id)
                        pending = min(s.timestamp for s in states if s.type == StateType.PENDING)
                        return current, seen, (pending - run.created).total_seconds()
                    await asyncio.sleep(0.05)
                raise AssertionError(f"run {run.id} got no infrastructure_pid within {timeout} s")

        timings = [asyncio.run(create_and_wait()) for _ in range(5)]
        seconds = sorted(t[1] for t in timings)
        claimed = sorted(t[2] for t in timings)
        print(
            "\nwebhook-to-submitted (create_flow_run request → infrastructure_pid seen), "
            f"5 runs: {', '.join(f'{s:.2f}' for s in seconds)} s; "
            f"p50 {statistics.median(seconds):.2f} s, max {max(seconds):.2f} s; "
            f"server-side created → PENDING: p50 {statistics.median(claimed):.2f} s, max {max(claimed):.2f} s"
        )
        runs = [t[0] for t in timings]
        assert submit_counts(record_file) == {str(r.id): 1 for r in runs}

        # Cancelling a submitted run: the cancel automation stops its infrastructure.
        async def cancel(run_id):
            async with client_for(api_url) as client:
                await client.set_flow_run_state(run_id, StateProposal(type=StateType.CANCELLING), force=True)

        asyncio.run(cancel(runs[0].id))

        async def state_of(run_id):
            async with client_for(api_url) as client:
                return (await client.read_flow_run(run_id)).state_type

        assert wait_until(lambda: asyncio.run(state_of(runs[0].id)) == StateType.CANCELLED, timeout=30, interval=0.2)

        def cancels() -> list[str]:
            lines = [l for l in record_file.read_text().splitlines() if '"call": "cancel"' in l]
            return lines

        assert len(cancels()) == 1 and runs[0].infrastructure_pid in cancels()[0]

        # No --pool, no --secret: every push pool, and the secret the block holds is kept.
        kept = pushpool(env, "connect", "--url", url)
        assert "Kept the webhook secret" in kept and SECRET not in kept
        for automation in automations_named(api_url, OURS):
            assert automation["trigger"]["match_related"] == {
                "prefect.resource.role": "work-pool",
                "prefect.work-pool.type": "*:push",
            }
        run, _, _ = asyncio.run(create_and_wait())
        assert submit_counts(record_file)[str(run.id)] == 1

        # --remove: exactly what connect made is gone, the rest is untouched.
        assert "--yes" in pushpool(env, "connect", "--remove", code=1)  # no terminal to ask on
        assert len(automations_named(api_url, OURS)) == 2
        removed = pushpool(env, "connect", "--remove", "--yes")
        assert rows_with(removed, "removed") == 3
        assert automations_named(api_url, OURS) == [] and webhook_blocks(api_url, [BLOCK_NAME]) == []
        assert [a["name"] for a in automations_named(api_url, [unrelated])] == [unrelated]
        assert len(webhook_blocks(api_url, [unrelated])) == 1
        assert "Nothing to remove" in pushpool(env, "connect", "--remove", "--yes")

        # ... and Prefect no longer calls the app.
        async def create_run():
            async with client_for(api_url) as client:
                return (await make_runs(client, deployment, 1))[0]

        orphan = asyncio.run(create_run())
        time.sleep(4)
        assert str(orphan.id) not in submit_counts(record_file)

    # With no secret anywhere, connect makes one and prints it once.
    generated = pushpool(env, "connect", "--url", "https://dispatcher.example.com/webhook")
    match = re.search(r"PUSHPOOL_WEBHOOK_SECRET=(\S+)", generated)
    assert match, generated
    block = webhook_blocks(api_url, [BLOCK_NAME])[0]
    assert block["data"]["headers"]["Authorization"] == f"Bearer {match.group(1)}"
    again = pushpool(env, "connect", "--url", "https://dispatcher.example.com/webhook")
    assert match.group(1) not in again and "Kept" in again
    # A secret from PUSHPOOL_WEBHOOK_SECRET is used and not printed either.
    from_env = pushpool(
        cli_env(api_env, PUSHPOOL_WEBHOOK_SECRET=SECRET), "connect", "--url", "https://dispatcher.example.com/webhook"
    )
    assert SECRET not in from_env and "PUSHPOOL_WEBHOOK_SECRET" in from_env
    assert webhook_blocks(api_url, [BLOCK_NAME])[0]["data"]["headers"]["Authorization"] == f"Bearer {SECRET}"
    pushpool(env, "connect", "--remove", "--yes")
    assert automations_named(api_url, OURS) == [] and webhook_blocks(api_url, [BLOCK_NAME]) == []
    assert len(recorded_submits(record_file)) == len(submit_counts(record_file))  # never twice
