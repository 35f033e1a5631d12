"""`pushpool dispatch` without `--once`: a long-running local dispatcher that
sweeps on a timer and at once when the event stream says a run was scheduled."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.factories import (
    client_for,
    dispatcher_env,
    make_deployment,
    make_pool,
    make_runs,
    pushpool_command,
    submit_counts,
)

pytestmark = pytest.mark.integration


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_a_run_created_for_now_is_submitted_on_its_event_not_the_next_tick(
    prefect_server, api_env, unique_name, record_file: Path
):
    record = record_file

    async def setup():
        async with client_for(prefect_server.api_url) as client:
            await make_pool(client, unique_name)
            return await make_deployment(client, unique_name)

    deployment = asyncio.run(setup())
    env = dispatcher_env(api_env, record)
    # The tick is an hour away: only the event stream can explain a submission.
    process = subprocess.Popen(
        pushpool_command("dispatch", "--pool", unique_name, "--interval", "3600"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(3)  # the first sweep (nothing due) and the subscription
        assert process.poll() is None

        async def create_run():
            async with client_for(prefect_server.api_url) as client:
                return (await make_runs(client, deployment, 1))[0]

        run = asyncio.run(create_run())
        assert wait_for(lambda: submit_counts(record) == {str(run.id): 1}, timeout=30)

        # a second run, then a graceful stop
        run2 = asyncio.run(create_run())
        assert wait_for(lambda: str(run2.id) in submit_counts(record), timeout=30)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert submit_counts(record) == {str(run.id): 1, str(run2.id): 1}
