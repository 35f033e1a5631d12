"""Making pools, deployments and runs on the test server, through the same
REST client the dispatcher uses."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional
from uuid import UUID

from dispatcher.models import Deployment, FlowRun, WorkPool
from dispatcher.prefect_client import PrefectClient
from dispatcher.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGINS = Path(__file__).resolve().parent / "plugins"


def client_for(api_url: str) -> PrefectClient:
    return PrefectClient(Settings(api_url=api_url))


async def make_pool(
    client: PrefectClient,
    name: str,
    type: str = "recording:push",
    *,
    base_job_template: Optional[dict[str, Any]] = None,
    concurrency_limit: Optional[int] = None,
    paused: bool = False,
) -> WorkPool:
    if base_job_template is None:
        from providers.registry import ProviderRegistry

        base_job_template = ProviderRegistry().provider_class(type).default_base_job_template()
    return await client.create_work_pool(
        name, type, base_job_template, is_paused=paused, concurrency_limit=concurrency_limit
    )


async def make_deployment(
    client: PrefectClient, pool: str, *, name: str = "dep", job_variables: Optional[dict[str, Any]] = None,
    flow_name: str = "test-flow",
) -> Deployment:
    flow = await client.create_flow(flow_name)
    return await client.create_deployment(
        name=name,
        flow_id=str(flow.id),
        work_pool_name=pool,
        entrypoint="flows.py:test_flow",
        job_variables=job_variables or {},
        enforce_parameter_schema=False,
    )


async def make_runs(
    client: PrefectClient,
    deployment: Deployment,
    count: int,
    *,
    scheduled_in: Optional[timedelta] = None,
    job_variables: Optional[dict[str, Any]] = None,
) -> list[FlowRun]:
    body: dict[str, Any] = {}
    if scheduled_in is not None:
        when = datetime.now(timezone.utc) + scheduled_in
        body["state"] = {"type": "SCHEDULED", "state_details": {"scheduled_time": when.isoformat()}}
    if job_variables is not None:
        body["job_variables"] = job_variables
    semaphore = asyncio.Semaphore(4)

    async def one() -> FlowRun:
        async with semaphore:
            return await client.create_flow_run_from_deployment(deployment.id, **body)

    return list(await asyncio.gather(*(one() for _ in range(count))))


def pushpool_process_env(api_url: str, tmp_path: Path, *, drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """Environment of a `pushpool` (or other client) process talking to
    `api_url`: this process's environment without any PREFECT_/PUSHPOOL_
    setting (or other `drop` prefix), homes under `tmp_path`, and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PUSHPOOL_", *drop))}
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PUSHPOOL_HOME=str(tmp_path / "pushpool-home"),
        **extra,
    )
    return env


def dispatcher_env(base_env: dict[str, str], record_file: Path, **extra: str) -> dict[str, str]:
    """Environment of a `pushpool` process that can see the test providers."""
    env = dict(base_env)
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGINS), str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PUSHPOOL_TEST_RECORD_FILE"] = str(record_file)
    env.update(extra)
    return env


def pushpool_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dispatcher", *args]


def run_pushpool(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pushpool_command(*args), env=env, capture_output=True, text=True, timeout=timeout)


def recorded_submits(record_file: Path, *, calls: tuple[str, ...] = ("submit",)) -> list[dict[str, Any]]:
    """The recording provider's launches (`submit`), or with
    `calls=("submit", "resubmit")` every submit call it answered."""
    if not record_file.exists():
        return []
    entries = [json.loads(line) for line in record_file.read_text().splitlines() if line.strip()]
    return [e for e in entries if e["call"] in calls]


def submit_counts(record_file: Path) -> Counter[str]:
    """Launches per flow run id (a resubmission of the same claim launches nothing)."""
    return Counter(e["flow_run_id"] for e in recorded_submits(record_file))


def submit_call_counts(record_file: Path) -> Counter[str]:
    """Submit calls per flow run id, launches and resubmissions alike."""
    return Counter(e["flow_run_id"] for e in recorded_submits(record_file, calls=("submit", "resubmit")))


async def states_of(client: PrefectClient, run_ids: list[UUID]) -> dict[UUID, FlowRun]:
    runs = await client.read_flow_runs(flow_runs={"id": {"any_": [str(i) for i in run_ids]}})
    return {run.id: run for run in runs}
