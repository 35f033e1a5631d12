"""The long-running local door (`pushpool dispatch` without `--once`): the same
triggers the Lambda gets, from a timer and from the Prefect server's event
stream instead of EventBridge and automations.

- every `interval` seconds, a tick: sweep, reconcile (cancellations, lost
  submissions, dead infrastructure, maximum run times), and look ahead for runs
  that become due before the next tick — the loop wakes at those moments
  instead of waiting for the tick (`dispatcher.wakeups`);
- a `Scheduled` (or `Late`) event about a served push pool: sweep now;
- a `Cancelling` event: cancel that run now.

The timer is not optional: runs created by a deployment's schedule emit no
`Scheduled` event, and the stream may drop; events only make things fast.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Optional

from dispatcher.events import Event
from dispatcher.logs import get_logger
from dispatcher.prefect_client import PrefectClient
from dispatcher.settings import Settings
from dispatcher.triggers import RunCancelling, Tick, Trigger, TriggerResult, Wake, run_trigger
from dispatcher.webhook import CANCELLING_EVENT, LATE_EVENT, SCHEDULED_EVENT
from providers.registry import ProviderRegistry

logger = get_logger(__name__)

WAKE_EVENTS = (SCHEDULED_EVENT, LATE_EVENT, CANCELLING_EVENT)
TIMER_RESOLUTION = 0.5


class LocalWakeups:
    """Wake-ups for an in-process loop: remembered, and slept until."""

    horizon_margin_seconds = 0.0

    def __init__(self) -> None:
        self.times: list[datetime] = []

    def arrange(self, times: Iterable[datetime]) -> list[str]:
        self.times = sorted(set(self.times) | set(times))
        return [t.isoformat() for t in self.times]

    def due(self, now: datetime) -> bool:
        """Whether a wake-up has come (and forget those that have)."""
        passed = [t for t in self.times if t <= now]
        self.times = [t for t in self.times if t > now]
        return bool(passed)


async def serve(
    settings: Settings,
    *,
    pools: list[str],
    interval: float,
    stop: asyncio.Event,
    use_events: bool = True,
    use_wakeups: bool = True,
    registry: Optional[ProviderRegistry] = None,
    on_trigger: Optional[Callable[[TriggerResult], None]] = None,
) -> None:
    settings = settings.model_copy(update={"pools": pools, "tick_seconds": interval})
    queue: asyncio.Queue[Trigger] = asyncio.Queue()
    wakeups = LocalWakeups()
    async with PrefectClient(settings) as client:
        listener = asyncio.create_task(_listen(settings, pools, queue)) if use_events else None
        timer = asyncio.create_task(_timer(queue, interval, wakeups, stop))
        try:
            while not stop.is_set():
                first = await _first_of(queue, stop)
                if first is None:
                    break
                for trigger in _merge(first, queue):
                    result = await run_trigger(
                        trigger, settings, registry=registry, client=client,
                        wakeups=wakeups if use_wakeups and isinstance(trigger, Tick) else None,
                    )
                    if on_trigger is not None:
                        on_trigger(result)
        finally:
            for task in (listener, timer):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task


async def _first_of(queue: asyncio.Queue[Trigger], stop: asyncio.Event) -> Optional[Trigger]:
    """The next trigger, or None once `stop` is set."""
    getter = asyncio.create_task(queue.get())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([getter, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if getter.done():
        return getter.result()
    getter.cancel()
    return None


def _merge(first: Trigger, queue: asyncio.Queue[Trigger]) -> list[Trigger]:
    """`first` and everything queued behind it, with the sweeps merged into one
    (a tick, if any asked for one, else a sweep of every served pool)."""
    waiting = [first]
    while not queue.empty():
        waiting.append(queue.get_nowait())
    cancellations = [t for t in waiting if isinstance(t, RunCancelling)]
    sweeps = [t for t in waiting if not isinstance(t, RunCancelling)]
    if not sweeps:
        return cancellations
    merged: Trigger = sweeps[0] if len(sweeps) == 1 else (
        Tick() if any(isinstance(t, Tick) for t in sweeps) else Wake()
    )
    return cancellations + [merged]


async def _timer(queue: asyncio.Queue[Trigger], interval: float, wakeups: LocalWakeups, stop: asyncio.Event) -> None:
    """A tick now and every `interval` s; a wake at each arranged wake-up in between
    (checked twice a second, so a wake-up is at most half a second late)."""
    loop = asyncio.get_running_loop()
    next_tick = loop.time()
    while not stop.is_set():
        if loop.time() >= next_tick:
            queue.put_nowait(Tick())
            next_tick = loop.time() + interval
        now = datetime.now(timezone.utc)
        if wakeups.due(now):
            queue.put_nowait(Wake())
        await asyncio.sleep(max(0.0, min(TIMER_RESOLUTION, next_tick - loop.time())))


async def _listen(settings: Settings, pools: list[str], queue: asyncio.Queue[Trigger]) -> None:
    """Queue a trigger for every Scheduled / Cancelling event about a served push pool."""
    from dispatcher.event_stream import EventStreamError, subscribe
    from dispatcher.webhook import trigger_for

    try:
        async for event in subscribe(settings, event_names=list(WAKE_EVENTS)):
            if not _served(event, pools):
                continue
            trigger = trigger_for(event)
            if not isinstance(trigger, str):
                logger.debug("woken by an event", extra={"event": event.event, "pool": event.work_pool_name or ""})
                await queue.put(trigger)
    except EventStreamError as exc:
        # Reconnectable drops are handled inside the stream; this is final
        # (credentials refused, filter rejected). The timer keeps dispatching.
        logger.warning("event stream unavailable; dispatching on the timer only", extra={"error": str(exc)})


def _served(event: Event, pools: list[str]) -> bool:
    pool_type, pool_name = event.work_pool_type or "", event.work_pool_name or ""
    return pool_type.endswith(":push") and (not pools or pool_name in pools)
