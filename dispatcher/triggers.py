"""What wakes the dispatcher, and what it does for each. Every trigger is only
a hint ("look now"): the dispatcher re-reads pools and runs from the Prefect
API, so a forged or replayed trigger can never run anything that is not due.

    Tick                   (timer)              sweep every served pool, then reconcile
    Wake                   (exact-time timer)   sweep every served pool
    RunScheduled           (automation webhook) sweep that run's pool now
    RunCancelling          (automation webhook) cancel that run
    InfrastructureStopped  (e.g. ECS event)     settle that run if its infrastructure really stopped

`run_trigger` is the one core the three doors (AWS Lambda, the ASGI app,
`pushpool dispatch`) call.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Literal, Optional, Union
from uuid import UUID

from pydantic import BaseModel, Field

from dispatcher.dispatch import Dispatcher, RunOutcome, SweepSummary
from dispatcher.logs import get_logger
from dispatcher.prefect_client import PrefectAPIError, PrefectClient, PrefectUnreachable
from dispatcher.settings import Settings
from dispatcher.wakeups import Wakeups, upcoming_due_times, wake_times
from providers.registry import ProviderRegistry

logger = get_logger(__name__)

#: a Wake that arrives early (EventBridge Scheduler's 60 s precision) waits at most this long
MAX_WAKE_WAIT_SECONDS = 150.0


class Tick(BaseModel):
    kind: Literal["tick"] = "tick"


class Wake(BaseModel):
    kind: Literal["wake"] = "wake"
    at: Optional[datetime] = Field(None, description="sweep at this moment (wait until then if woken early)")


class RunScheduled(BaseModel):
    kind: Literal["run-scheduled"] = "run-scheduled"
    flow_run_id: UUID
    pool_name: Optional[str] = None


class RunCancelling(BaseModel):
    kind: Literal["run-cancelling"] = "run-cancelling"
    flow_run_id: UUID


class InfrastructureStopped(BaseModel):
    kind: Literal["infrastructure-stopped"] = "infrastructure-stopped"
    flow_run_id: UUID
    infrastructure: Optional[str] = Field(None, description="what stopped, for the logs (e.g. a task ARN)")


Trigger = Annotated[Union[Tick, Wake, RunScheduled, RunCancelling, InfrastructureStopped], Field(discriminator="kind")]


class TriggerResult(BaseModel):
    """What one trigger led to; safe to return to a caller (no secrets)."""

    trigger: str
    pools: list[str] = Field(default_factory=list)
    claimed: int = 0
    submitted: int = 0
    crashed: int = 0
    cancelled: int = 0
    skipped: int = 0
    resubmitted: int = 0
    wakeups: list[str] = Field(default_factory=list, description="exact-time sweeps arranged before the next tick")
    dispatch_latency_seconds: list[float] = Field(
        default_factory=list, description="for each submitted run: submitted at − scheduled start"
    )
    error: Optional[str] = None


async def run_trigger(
    trigger: Trigger,
    settings: Settings,
    *,
    registry: Optional[ProviderRegistry] = None,
    client: Optional[PrefectClient] = None,
    wakeups: Optional[Wakeups] = None,
) -> TriggerResult:
    """Do what `trigger` asks. Never raises for an unreachable or failing
    Prefect API: the result carries the error, and the next tick retries."""
    result = TriggerResult(trigger=trigger.kind)
    if not settings.api_url:
        result.error = "PREFECT_API_URL is not set"
        return result
    own_client = client is None
    client = client or PrefectClient(settings)
    dispatcher = Dispatcher(client, settings, registry=registry)
    try:
        await _dispatch(trigger, dispatcher, result, wakeups)
    except (PrefectUnreachable, PrefectAPIError) as exc:
        logger.error("trigger not handled; the next tick retries", extra={"trigger": trigger.kind, "error": str(exc)})
        result.error = dispatcher.redactor.redact(str(exc))
    finally:
        if own_client:
            await client.aclose()
    return result


async def _dispatch(
    trigger: Trigger, dispatcher: Dispatcher, result: TriggerResult, wakeups: Optional[Wakeups]
) -> None:
    if isinstance(trigger, Wake) and trigger.at is not None:
        wait = (trigger.at - dispatcher.clock()).total_seconds()
        if wait > 0:
            await asyncio.sleep(min(wait, MAX_WAKE_WAIT_SECONDS))
    if isinstance(trigger, (Tick, Wake, RunScheduled)):
        pools = None
        if isinstance(trigger, RunScheduled):
            if not trigger.pool_name:
                return
            if dispatcher.settings.pools and trigger.pool_name not in dispatcher.settings.pools:
                logger.info("scheduled run is in a pool this dispatcher does not serve", extra={"pool": trigger.pool_name})
                return
            pools = [trigger.pool_name]
        sweep = await dispatcher.sweep(pools)
        result.pools = sweep.pools
        result.claimed, result.submitted, result.crashed = sweep.claimed, sweep.submitted, sweep.crashed
        result.cancelled, result.skipped = sweep.cancelled, sweep.skipped
        result.dispatch_latency_seconds = [r.latency_seconds for r in sweep.runs if r.latency_seconds is not None]
        if wakeups is not None and not isinstance(trigger, RunScheduled):
            result.wakeups = await _arrange_wakeups(dispatcher, sweep, wakeups)
        if isinstance(trigger, Tick):
            reconciled = await dispatcher.reconcile()
            result.resubmitted = reconciled.resubmitted
            result.crashed += reconciled.count(RunOutcome.CRASHED)
            result.cancelled += reconciled.count(RunOutcome.CANCELLED)
        return
    if isinstance(trigger, RunCancelling):
        settled = await dispatcher.cancel(trigger.flow_run_id)
    else:
        settled = await dispatcher.infrastructure_stopped(trigger.flow_run_id)
    if settled is not None:
        result.pools = [settled.pool]
        outcome = settled.outcome.value  # submitted | crashed | skipped | cancelled: a counter of the result
        setattr(result, outcome, getattr(result, outcome) + 1)


async def _arrange_wakeups(dispatcher: Dispatcher, sweep: SweepSummary, wakeups: Wakeups) -> list[str]:
    now = dispatcher.clock()
    horizon = dispatcher.settings.tick_seconds + wakeups.horizon_margin_seconds
    times: set[datetime] = set()
    for pool, prefetch in sweep.prefetch_seconds.items():
        due = await upcoming_due_times(
            dispatcher.client, [pool], now=now, horizon_seconds=horizon, prefetch_seconds=prefetch
        )
        times.update(wake_times(due, now=now, horizon_seconds=horizon, prefetch_seconds=prefetch))
    return await asyncio.to_thread(wakeups.arrange, sorted(times)) if times else []
