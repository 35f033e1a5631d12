"""The long-running local dispatcher (`pushpool dispatch` without `--once`):
sweep on an interval, and at once whenever the Prefect server's event stream
says a run of a push pool was scheduled. The interval sweep is not optional:
runs created by a deployment's schedule emit no `Scheduled` event, and the
stream may drop; events only make ad-hoc runs fast."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Optional

from dispatcher.dispatch import Dispatcher, SweepSummary
from dispatcher.logs import get_logger
from dispatcher.prefect_client import PrefectAPIError, PrefectClient, PrefectUnreachable
from dispatcher.settings import Settings
from providers.registry import ProviderRegistry

logger = get_logger(__name__)

WAKE_EVENTS = ("prefect.flow-run.Scheduled",)


async def serve(
    settings: Settings,
    *,
    pools: list[str],
    interval: float,
    stop: asyncio.Event,
    use_events: bool = True,
    registry: Optional[ProviderRegistry] = None,
    on_sweep: Optional[Callable[[SweepSummary], None]] = None,
) -> None:
    wake = asyncio.Event()
    async with PrefectClient(settings) as client:
        dispatcher = Dispatcher(client, settings, registry=registry)
        listener = asyncio.create_task(_wake_on_events(settings, pools, wake)) if use_events else None
        try:
            while not stop.is_set():
                wake.clear()
                try:
                    summary = await dispatcher.sweep(pools)
                except (PrefectUnreachable, PrefectAPIError) as exc:
                    logger.error("sweep failed; trying again at the next tick", extra={"error": str(exc)})
                else:
                    if on_sweep is not None:
                        on_sweep(summary)
                await _first_of(stop, wake, timeout=interval)
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await listener


async def _first_of(*events: asyncio.Event, timeout: float) -> None:
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _wake_on_events(settings: Settings, pools: list[str], wake: asyncio.Event) -> None:
    """Set `wake` for every Scheduled event about a run of a served push pool."""
    from dispatcher.event_stream import EventStreamError, subscribe

    try:
        async for event in subscribe(settings, event_names=list(WAKE_EVENTS)):
            pool_type, pool_name = event.work_pool_type or "", event.work_pool_name or ""
            if pool_type.endswith(":push") and (not pools or pool_name in pools):
                logger.debug("woken by an event", extra={"event": event.event, "pool": pool_name})
                wake.set()
    except EventStreamError as exc:
        # Reconnectable drops are handled inside the stream; this is final
        # (credentials refused, filter rejected). The timer keeps dispatching.
        logger.warning("event stream unavailable; sweeping on the timer only", extra={"error": str(exc)})
