"""Driving `pushpool dispatch --once` processes (one tick each: sweep, then
reconcile) from the reliability tests, and reading back what they did.

What the tests share: a patient client of their own, the timing that keeps
the server's late-runs service out of a race, starting and finishing
dispatcher processes, the counts a tick prints, and a test's measured report.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import pytest

from dispatcher.models import FlowRun
from dispatcher.prefect_client import PrefectClient
from dispatcher.retries import RetryPolicy
from dispatcher.settings import Settings
from tests.support.factories import make_deployment, make_pool, make_runs, pushpool_command, states_of

# Runs are created due a little ahead and claimed within a prefetch window, so
# the server's late-runs service (which rewrites runs due >15 s ago as "Late")
# does not fight the dispatchers for SQLite's write lock.
SCHEDULED_IN = timedelta(seconds=120)
PREFETCH_SECONDS = "600"

SWEPT = re.compile(r"claimed (\d+), submitted (\d+), crashed (\d+), skipped (\d+)")
RECONCILED = re.compile(r"Reconciled: resubmitted (\d+), crashed (\d+), cancelled (\d+)")


def run(coro):
    return asyncio.run(coro)


def patient_client(api_url: str) -> PrefectClient:
    """The test's own client: patient, because a SQLite-backed server can stop
    answering for a minute under concurrent writes (see the README's
    "Reliability" section), and the test must outlast what it measures."""
    return PrefectClient(Settings(api_url=api_url), retry_policy=RetryPolicy(attempts=40, max_delay=2.0))


def make_due_runs(api_url: str, pool: str, count: int) -> list[str]:
    """A `recording:push` pool named `pool`, a deployment on it, and `count`
    runs due SCHEDULED_IN from now; their ids."""

    async def setup() -> list[str]:
        async with patient_client(api_url) as client:
            await make_pool(client, pool)
            deployment = await make_deployment(client, pool)
            return [str(r.id) for r in await make_runs(client, deployment, count, scheduled_in=SCHEDULED_IN)]

    return run(setup())


def start_dispatcher(env: dict[str, str], pool: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        pushpool_command("dispatch", "--once", "--pool", pool),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 600, *, log_file: Optional[Path] = None) -> dict[str, Any]:
    """Wait for a `--once` process (killed if it overruns) and return its
    counts: claimed, submitted, crashed, skipped (the sweep); resubmitted and
    reconcile_crashed (the reconciler); found_existing_task (resubmissions
    that found the ECS task a killed dispatcher had launched). Its output is
    appended to `log_file` when given, and kept as "log" when it resubmitted."""
    try:
        out, err = process.communicate(timeout=timeout)
    except BaseException:
        process.kill()
        process.communicate()
        raise
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("a") as log:
            log.write(f"--- tick ended at {time.time():.3f}\n{out}\n{err}\n")
    assert process.returncode == 0, f"dispatcher failed:\n{out}\n{err}"
    text = " ".join(out.split())
    swept = SWEPT.search(text)
    assert swept, f"no summary in the dispatcher's output:\n{out}\n{err}"
    counts: dict[str, Any] = dict(zip(("claimed", "submitted", "crashed", "skipped"), map(int, swept.groups())))
    reconciled = RECONCILED.search(text)
    counts["resubmitted"] = int(reconciled.group(1)) if reconciled else 0
    counts["reconcile_crashed"] = int(reconciled.group(2)) if reconciled else 0
    counts["found_existing_task"] = err.count("already has an ECS task")
    if counts["resubmitted"]:
        counts["log"] = err[-1500:]
    return counts


def tick(env: dict[str, str], pool: str, timeout: float = 600, *, log_file: Optional[Path] = None) -> dict[str, Any]:
    """One tick, waited for."""
    return finish(start_dispatcher(env, pool), timeout, log_file=log_file)


def run_dispatchers_at_once(env: dict[str, str], pool: str, count: int) -> list[dict[str, Any]]:
    processes = [start_dispatcher(env, pool) for _ in range(count)]
    try:
        return [finish(p) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()


async def read_runs(api_url: str, run_ids: list[str]) -> dict[str, FlowRun]:
    """The runs as the server has them now, by id (200 to a request)."""
    async with patient_client(api_url) as client:
        found: dict[str, FlowRun] = {}
        for i in range(0, len(run_ids), 200):
            found.update({str(k): v for k, v in (await states_of(client, run_ids[i : i + 200])).items()})
        return found


def report(request: pytest.FixtureRequest, text: str) -> None:
    """Measured facts, printed in the test's report section (`-rP`) and to the terminal."""
    request.node.user_properties.append(("measured", text))
    print(f"\n[reliability] {request.node.name}: {text}")
