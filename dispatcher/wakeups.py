"""Exact-time wake-ups, so scheduled runs start on time with a coarse timer.

Runs created by a deployment's schedule emit no event on the OSS server, so
only the timer finds them, and EventBridge's finest rate is one minute. A run
due 50 s after a tick would start ~50 s late at the next tick. So each tick
looks ahead: for every run that becomes claimable (due − prefetch) before the
next tick, it arranges a sweep at that moment.

`pushpool dispatch` just sleeps until then. The Lambda arranges EventBridge
Scheduler one-time `at()` schedules that delete themselves after use — but
EventBridge Scheduler invokes targets with 60-second precision (a schedule
`at(12:00:00)` fires between 12:00:00 and 12:00:59). So the schedule is set
in the minute before the moment, carries the moment in its input
(`{"pushpool": "wake", "at": "..."}`), and the woken invocation waits the
remaining seconds (at most ~2 minutes) before it sweeps.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any, Optional, Protocol

from dispatcher.logs import get_logger
from dispatcher.prefect_client import PrefectAPIError, PrefectClient, PrefectUnreachable

logger = get_logger(__name__)

#: EventBridge Scheduler fires a schedule somewhere in the minute it names
SCHEDULER_PRECISION = timedelta(seconds=60)
SCHEDULE_NAME_PREFIX = "pushpool-wake-"


def wake_times(
    due_times: Iterable[datetime], *, now: datetime, horizon_seconds: float, prefetch_seconds: float
) -> list[datetime]:
    """When to sweep again, within `horizon_seconds` from now, so that every run
    in `due_times` is claimed as soon as it is `prefetch_seconds` from due (to
    the next whole second; runs whose moments fall in the same second share one)."""
    horizon = now + timedelta(seconds=horizon_seconds)
    prefetch = timedelta(seconds=prefetch_seconds)
    moments = {_ceil_to_second(due - prefetch) for due in due_times}
    return sorted(at for at in moments if now < at <= horizon)


def _ceil_to_second(moment: datetime) -> datetime:
    floor = moment.replace(microsecond=0)
    return floor if floor == moment else floor + timedelta(seconds=1)


async def upcoming_due_times(
    client: PrefectClient, pool_names: Iterable[str], *, now: datetime, horizon_seconds: float, prefetch_seconds: float
) -> list[datetime]:
    """Scheduled times of runs that the sweep just done could not claim yet
    but that become claimable within `horizon_seconds` (one API call per pool;
    the server returns nothing for a paused pool)."""
    after = now + timedelta(seconds=prefetch_seconds)
    before = after + timedelta(seconds=horizon_seconds)
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

    #: how much later than `tick_seconds` the next tick may come
    horizon_margin_seconds: float

    def arrange(self, times: Iterable[datetime]) -> list[str]: ...


class EventBridgeWakeups:
    """One-time EventBridge Scheduler schedules that invoke `target_arn` (the
    dispatcher's own Lambda) with `{"pushpool": "wake", "at": <moment>}` in
    the minute before the moment, then delete themselves. Named by their
    moment, so two ticks arranging the same wake-up create one schedule."""

    #: how far ahead of the next tick a tick must look: the tick itself may come late by this much
    horizon_margin_seconds = SCHEDULER_PRECISION.total_seconds()

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
            fire = schedule_minute(at)
            payload = json.dumps({"pushpool": "wake", "at": at.astimezone(timezone.utc).isoformat()})
            try:
                self.client.create_schedule(
                    Name=name,
                    GroupName=self.group,
                    ScheduleExpression=f"at({fire.replace(tzinfo=None).isoformat()})",
                    ScheduleExpressionTimezone="UTC",
                    FlexibleTimeWindow={"Mode": "OFF"},
                    ActionAfterCompletion="DELETE",
                    Target={"Arn": self.target_arn, "RoleArn": self.role_arn, "Input": payload},
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


def schedule_minute(moment: datetime) -> datetime:
    """The `at()` time whose firing minute ends before `moment`: the start of
    the minute that contains `moment − 60 s`."""
    return (moment.astimezone(timezone.utc) - SCHEDULER_PRECISION).replace(second=0, microsecond=0)


def wakeups_from_environment(environ: dict[str, str], function_arn: Optional[str]) -> Optional[EventBridgeWakeups]:
    """Configured when the Lambda knows its own ARN and `PUSHPOOL_WAKE_ROLE_ARN` is set."""
    role = environ.get("PUSHPOOL_WAKE_ROLE_ARN")
    if not role or not function_arn:
        return None
    return EventBridgeWakeups(target_arn=function_arn, role_arn=role, group=environ.get("PUSHPOOL_WAKE_GROUP") or "default")
