"""Exact-time wake-ups, so scheduled runs start on time with a coarse timer.

Runs created by a deployment's schedule emit no event on the OSS server, so
only the timer finds them, and EventBridge's finest rate is one minute. A run
due 50 s after a tick would start ~50 s late at the next tick. So each tick
looks ahead: for every run that becomes claimable (due − prefetch) before the
next tick, it arranges a one-time sweep at that moment. The Lambda arranges
them as EventBridge Scheduler one-time `at()` schedules that delete themselves
after use; `pushpool dispatch` just sleeps until the earliest one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any, Optional, Protocol

from dispatcher.logs import get_logger
from dispatcher.prefect_client import PrefectAPIError, PrefectClient, PrefectUnreachable

logger = get_logger(__name__)

#: wake-ups closer together than this are merged into one (the earlier)
WAKE_RESOLUTION = timedelta(seconds=5)
#: a wake-up this close to now is pointless: the sweep that just ran covers it
MIN_LEAD = timedelta(seconds=2)
WAKE_INPUT = json.dumps({"pushpool": "wake"})
SCHEDULE_NAME_PREFIX = "pushpool-wake-"


def wake_times(
    due_times: Iterable[datetime], *, now: datetime, tick_seconds: float, prefetch_seconds: float
) -> list[datetime]:
    """When to sweep again before the next tick so that every run in
    `due_times` is claimed `prefetch_seconds` before it is due."""
    next_tick = now + timedelta(seconds=tick_seconds)
    prefetch = timedelta(seconds=prefetch_seconds)
    wanted = sorted(due - prefetch for due in due_times if now + MIN_LEAD < due - prefetch < next_tick)
    merged: list[datetime] = []
    for at in wanted:
        if not merged or at - merged[-1] >= WAKE_RESOLUTION:
            merged.append(at)
    return merged


async def upcoming_due_times(
    client: PrefectClient, pool_names: Iterable[str], *, now: datetime, tick_seconds: float, prefetch_seconds: float
) -> list[datetime]:
    """Scheduled times of runs that the sweep just done could not claim yet
    but that become due before the next tick (one API call per pool; the
    server returns nothing for a paused pool)."""
    after = now + timedelta(seconds=prefetch_seconds)
    before = after + timedelta(seconds=tick_seconds)
    times: list[datetime] = []
    for name in pool_names:
        try:
            scheduled = await client.get_scheduled_flow_runs(name, scheduled_after=after, scheduled_before=before)
        except (PrefectUnreachable, PrefectAPIError) as exc:
            logger.warning("could not look ahead for wake-ups", extra={"pool": name, "error": str(exc)})
            continue
        times.extend(
            item.flow_run.next_scheduled_start_time or item.flow_run.expected_start_time
            for item in scheduled
            if item.flow_run.next_scheduled_start_time or item.flow_run.expected_start_time
        )
    return times


class Wakeups(Protocol):
    """Arranges sweeps at given times; returns what it arranged."""

    def arrange(self, times: Iterable[datetime]) -> list[str]: ...


class EventBridgeWakeups:
    """One-time EventBridge Scheduler schedules that invoke `target_arn` (the
    dispatcher's own Lambda) with `{"pushpool": "wake"}` and then delete
    themselves. Named by their time, so two ticks arranging the same wake-up
    create one schedule."""

    def __init__(self, *, target_arn: str, role_arn: str, group: str = "default", client: Any = None):
        self.target_arn, self.role_arn, self.group = target_arn, role_arn, group
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client("scheduler", config=Config(retries={"mode": "adaptive", "max_attempts": 5}))
        return self._client

    def schedule_name(self, at: datetime) -> str:
        return SCHEDULE_NAME_PREFIX + at.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S")

    def arrange(self, times: Iterable[datetime]) -> list[str]:
        """Create a schedule for each time (existing ones are kept); the names created or found."""
        from botocore.exceptions import BotoCoreError, ClientError

        names = []
        for at in times:
            name = self.schedule_name(at)
            when = at.astimezone(timezone.utc).replace(tzinfo=None, microsecond=0).isoformat()
            try:
                self.client.create_schedule(
                    Name=name,
                    GroupName=self.group,
                    ScheduleExpression=f"at({when})",
                    ScheduleExpressionTimezone="UTC",
                    FlexibleTimeWindow={"Mode": "OFF"},
                    ActionAfterCompletion="DELETE",
                    Target={"Arn": self.target_arn, "RoleArn": self.role_arn, "Input": WAKE_INPUT},
                    Description="pushpool: sweep when a scheduled flow run becomes due",
                )
            except ClientError as exc:
                if (exc.response.get("Error") or {}).get("Code") != "ConflictException":
                    logger.warning("could not arrange a wake-up", extra={"schedule": name, "error": str(exc)})
                    continue
            except BotoCoreError as exc:
                logger.warning("could not arrange a wake-up", extra={"schedule": name, "error": str(exc)})
                continue
            names.append(name)
        return names


def wakeups_from_environment(environ: dict[str, str], function_arn: Optional[str]) -> Optional[EventBridgeWakeups]:
    """Configured when the Lambda knows its own ARN and `PUSHPOOL_WAKE_ROLE_ARN` is set."""
    role = environ.get("PUSHPOOL_WAKE_ROLE_ARN")
    if not role or not function_arn:
        return None
    return EventBridgeWakeups(target_arn=function_arn, role_arn=role, group=environ.get("PUSHPOOL_WAKE_GROUP") or "default")
