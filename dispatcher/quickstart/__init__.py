"""`pushpool quickstart`: from nothing to a completed flow run, no worker.

Starts an embedded Prefect server if PREFECT_API_URL is unset, creates the
`process:push` pool `quickstart-pool`, deploys the example flow beside this
file (code from local storage), creates a run, dispatches it, waits until it
completes and prints how long each step took.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path
from typing import Optional
from uuid import UUID

from pydantic import BaseModel
from rich.console import Console

from dispatcher.dispatch import Dispatcher, RunOutcome
from dispatcher.embedded_server import EmbeddedServer, start_embedded_server
from dispatcher.models import FlowRun, StateType, TERMINAL_STATE_TYPES
from dispatcher.prefect_client import ObjectNotFound, PrefectClient
from dispatcher.settings import Settings, pushpool_home
from providers.base import JobConfiguration
from providers.process import ProcessProvider
from providers.registry import ProviderRegistry

POOL_NAME = "quickstart-pool"
POOL_TYPE = "process:push"
FLOW_DIR = Path(__file__).resolve().parent
ENTRYPOINT = "hello_flow.py:hello"


class QuickstartFailed(Exception):
    pass


class TimelineEntry(BaseModel):
    state: str
    seconds: float


class QuickstartResult(BaseModel):
    flow_run_id: UUID
    final_state: str
    timeline: list[TimelineEntry]
    ui_url: str
    wall_seconds: float


def run_quickstart(console: Console, *, timeout: float = 120, keep_server: bool = False) -> QuickstartResult:
    started = time.monotonic()
    settings = Settings.from_env()
    server: Optional[EmbeddedServer] = None
    if not settings.api_url:
        with console.status("Starting an embedded Prefect server (the first start takes about 20 s)…"):
            server = start_embedded_server(pushpool_home() / "quickstart" / "prefect-home")
        console.print(f"Embedded Prefect server at {server.ui_url}")
        settings = settings.model_copy(update={"api_url": server.api_url})
    try:
        result = asyncio.run(_quickstart(console, settings, timeout=timeout, started=started))
        if keep_server and server is not None:
            console.print(f"The Prefect server keeps running at {server.ui_url}; press Ctrl-C to stop it.")
            try:
                server.process.wait()
            except KeyboardInterrupt:
                pass
        return result
    finally:
        if server is not None:
            server.stop()


async def _quickstart(console: Console, settings: Settings, *, timeout: float, started: float) -> QuickstartResult:
    async with PrefectClient(settings) as client:
        await _ensure_pool(client)
        flow = await client.create_flow("pushpool-quickstart")
        deployment = await client.create_deployment(
            name="hello",
            flow_id=str(flow.id),
            work_pool_name=POOL_NAME,
            entrypoint=ENTRYPOINT,
            path=str(FLOW_DIR),
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(FLOW_DIR)}}],
            parameters={"name": "pushpool"},
            enforce_parameter_schema=False,
        )
        console.print(f"Deployed the example flow as 'pushpool-quickstart/hello' on the {POOL_TYPE} pool {POOL_NAME!r}.")
        flow_run = await client.create_flow_run_from_deployment(deployment.id)
        console.print(f"Created flow run {flow_run.name!r} ({flow_run.id}); dispatching it…")

        summary = await Dispatcher(client, settings).sweep([POOL_NAME])
        ours = next((r for r in summary.runs if r.flow_run_id == flow_run.id), None)
        if ours is None or ours.outcome != RunOutcome.SUBMITTED:
            reason = ours.reason if ours and ours.reason else "it was not among the pool's due runs"
            raise QuickstartFailed(f"The flow run was not submitted: {reason}")
        console.print(f"Submitted: infrastructure_pid {ours.infrastructure_pid}")

        final = await _wait_until_finished(console, client, flow_run.id, timeout)
        # The flow process flushes its logs to the API as it exits; let it
        # finish before an embedded server is stopped under it.
        await _wait_for_process_exit(ours.infrastructure_pid or "", deadline=time.monotonic() + 15)
        timeline = await _timeline(client, final)
        ui_url = settings.api_url.removesuffix("/api") if settings.api_url else ""
        result = QuickstartResult(
            flow_run_id=flow_run.id,
            final_state=final.state.name if final.state and final.state.name else str(final.state_type),
            timeline=timeline,
            ui_url=f"{ui_url}/runs/flow-run/{flow_run.id}",
            wall_seconds=time.monotonic() - started,
        )
        if final.current_state_type != StateType.COMPLETED:
            message = final.state.message if final.state and final.state.message else "no message"
            raise QuickstartFailed(f"The flow run ended {result.final_state}: {message}")
        return result


async def _ensure_pool(client: PrefectClient) -> None:
    try:
        pool = await client.read_work_pool(POOL_NAME)
    except ObjectNotFound:
        template = ProviderRegistry().provider_class(POOL_TYPE).default_base_job_template()
        await client.create_work_pool(POOL_NAME, POOL_TYPE, template)
        return
    if pool.type != POOL_TYPE:
        raise QuickstartFailed(
            f"A work pool named {POOL_NAME!r} already exists with type {pool.type!r}; "
            f"the quickstart needs it to be {POOL_TYPE!r}."
        )
    if pool.is_paused:
        await client.update_work_pool(POOL_NAME, is_paused=False)


async def _wait_until_finished(console: Console, client: PrefectClient, flow_run_id: UUID, timeout: float) -> FlowRun:
    deadline = time.monotonic() + timeout
    with console.status("Waiting for the flow run to finish…") as status:
        while True:
            flow_run = await client.read_flow_run(flow_run_id)
            if flow_run.current_state_type in TERMINAL_STATE_TYPES:
                return flow_run
            if time.monotonic() > deadline:
                state = flow_run.state.name if flow_run.state else flow_run.state_type
                raise QuickstartFailed(
                    f"The flow run did not complete within {timeout:.0f} s (it is {state})."
                )
            status.update(f"Waiting for the flow run to finish… ({flow_run.state_name})")
            await asyncio.sleep(0.5)


async def _wait_for_process_exit(infrastructure_pid: str, *, deadline: float) -> None:
    provider = ProcessProvider()
    while time.monotonic() < deadline:
        status = await provider.status(infrastructure_pid, JobConfiguration())
        if status.state != "running":
            return
        await asyncio.sleep(0.2)


async def _timeline(client: PrefectClient, flow_run: FlowRun) -> list[TimelineEntry]:
    states = sorted(
        (s for s in await client.read_flow_run_states(flow_run.id) if s.timestamp is not None),
        key=lambda s: s.timestamp,  # type: ignore[arg-type,return-value]
    )
    origin: Optional[datetime] = flow_run.created or (states[0].timestamp if states else None)
    return [
        TimelineEntry(state=(s.name or s.type.value).lower(), seconds=max(0.0, (s.timestamp - origin).total_seconds()))  # type: ignore[operator]
        for s in states
        if origin is not None
    ]
