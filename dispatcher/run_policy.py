"""The dispatcher's own per-run rules, set like any job variable (pool default
< deployment < flow run) so a pool, a deployment or one run can change them:

- `max_run_time_seconds`: a run still going after this long (counted from its
  start, or from its claim while it has not started) is cancelled with that
  reason. Default 24 h, as Prefect Cloud's push pools; 0 means no limit.
- `late_run_threshold_seconds`: a run found this late (now − its scheduled
  time) is not started but skipped: CANCELLED, saying how late it was. Default
  none: every late run is started. For schedules where a catch-up run after an
  outage is worse than a missed one.

A template without these variables (one copied from a Prefect worker pool) gets
the defaults.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dispatcher.job_configuration import variable_defaults
from dispatcher.models import Deployment, FlowRun, WorkPool

DEFAULT_MAX_RUN_TIME_SECONDS = 24 * 3600


class RunPolicy(BaseModel):
    model_config = ConfigDict(extra="ignore")

    max_run_time_seconds: int = Field(DEFAULT_MAX_RUN_TIME_SECONDS, ge=0)
    late_run_threshold_seconds: Optional[int] = Field(None, ge=0)

    @classmethod
    def for_run(cls, pool: WorkPool, deployment: Optional[Deployment], run: FlowRun) -> "RunPolicy":
        variables: dict[str, Any] = variable_defaults((pool.base_job_template or {}).get("variables") or {})
        if deployment is not None:
            variables.update(deployment.job_variables or {})
        variables.update(run.job_variables or {})
        wanted = {name: variables[name] for name in cls.model_fields if variables.get(name) is not None}
        try:
            return cls.model_validate(wanted)
        except ValidationError:
            # The server validated these against the pool's schema; a schema
            # that allows other values gets the defaults rather than a crash.
            return cls()

    def too_late(self, run: FlowRun, now: datetime) -> Optional[str]:
        """Why the run should be skipped instead of started, or None."""
        due = run.next_scheduled_start_time or run.expected_start_time
        if self.late_run_threshold_seconds is None or due is None:
            return None
        late = (now - due).total_seconds()
        if late <= self.late_run_threshold_seconds:
            return None
        return (
            f"Skipped: it was due at {due.isoformat(timespec='seconds')} and was {late:.0f} s late when found, "
            f"more than the pool's late_run_threshold_seconds ({self.late_run_threshold_seconds})"
        )

    def overran(self, started: Optional[datetime], now: datetime) -> Optional[str]:
        """Why the run should be cancelled for running too long, or None."""
        if not self.max_run_time_seconds or started is None:
            return None
        if now - started <= timedelta(seconds=self.max_run_time_seconds):
            return None
        return (
            f"Cancelled by pushpool: the run exceeded its maximum run time of {self.max_run_time_seconds} s "
            f"(max_run_time_seconds; started {started.isoformat(timespec='seconds')})"
        )
