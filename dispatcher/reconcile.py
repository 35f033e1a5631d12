"""The reconciler: every tick, settle what lost triggers, crashes and dead
infrastructure left behind, so every claimed run ends accounted for.

For each served pool it reads the runs in PENDING, RUNNING and CANCELLING (and
recent CANCELLED ones whose cancellation the server timed out), and for each:

- CANCELLING → stop the infrastructure, then CANCELLED (`dispatcher.cancellation`);
- PENDING with no `infrastructure_pid` for longer than `pending_timeout_seconds`
  (claimed, then the dispatcher died or lost the answer) → submitted again with
  the same idempotency key, so a run already launched is found, not launched
  twice; after `max_resubmissions` tries → CRASHED with the reason;
- PENDING or RUNNING whose infrastructure has exited or is gone → CRASHED with
  the exit code and the reason the provider gives (a run that reached a
  terminal state meanwhile is never touched: the run is read again first, and
  the server refuses to overwrite a terminal state anyway);
- running longer than its `max_run_time_seconds` → CANCELLING with that
  reason, then cancelled as above.

Level-triggered: it compares what the API says with what the infrastructure
says, so running it twice, or after a missed trigger, changes nothing more.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Optional
from uuid import UUID

from pydantic import BaseModel, Field

from dispatcher.cancellation import cancel_flow_run, stop_after_cancellation_timeout
from dispatcher.claims import PoolBusy, pool_claim_lock
from dispatcher.invocation import Invocation, RunOutcome, RunResult
from dispatcher.logs import get_logger, log_context
from dispatcher.models import FlowRun, StateProposal, StateType, WorkPool
from dispatcher.prefect_client import ObjectNotFound, PrefectAPIError, PrefectUnreachable
from dispatcher.run_policy import RunPolicy
from dispatcher.submission import launch
from dispatcher.templating import TemplateError
from providers.base import RESUBMISSIONS_LABEL, InfrastructureError, InfrastructureStatus, JobConfiguration
from providers.registry import UnknownPushType

logger = get_logger(__name__)

RESUBMITTED_AT_LABEL = "pushpool.io/resubmitted-at"  # the pending timeout restarts from here
ACTIVE_STATES = [StateType.PENDING.value, StateType.RUNNING.value, StateType.CANCELLING.value]
#: how far back to look for runs whose cancellation the server timed out
TIMED_OUT_CANCELLATION_WINDOW = timedelta(hours=1)


class ReconcileSummary(BaseModel):
    pools: list[str] = Field(default_factory=list)
    runs: list[RunResult] = Field(default_factory=list)
    resubmitted: int = 0

    def count(self, outcome: RunOutcome) -> int:
        return sum(1 for run in self.runs if run.outcome == outcome)


class Reconciler:
    def __init__(self, invocation: Invocation):
        self.inv = invocation
        self.client = invocation.client
        self.settings = invocation.settings

    async def run(self, pools: list[WorkPool]) -> ReconcileSummary:
        summary = ReconcileSummary(pools=[pool.name for pool in pools])
        for pool in pools:
            with log_context(pool=pool.name):
                try:
                    self.inv.provider(pool)
                except UnknownPushType:
                    continue
                try:
                    runs = await self._runs_to_check(pool)
                except (PrefectUnreachable, PrefectAPIError) as exc:
                    logger.error("could not read the pool's active runs", extra={"error": str(exc)})
                    continue
                to_check = [
                    run for run in runs
                    if _has_live_infrastructure(run) and run.current_state_type != StateType.CANCELLING
                ]
                statuses = await self._statuses(pool, to_check)
                for result, resubmitted in await self.inv.bounded(
                    lambda run: self._reconcile(pool, run, statuses.get(run.id)), runs
                ):
                    if result is not None:
                        summary.runs.append(result)
                    summary.resubmitted += resubmitted
        return summary

    async def _runs_to_check(self, pool: WorkPool) -> list[FlowRun]:
        in_pool = {"name": {"any_": [pool.name]}}
        active = await self.client.read_flow_runs(
            flow_runs={"state": {"type": {"any_": ACTIVE_STATES}}},
            work_pools=in_pool,
            sort="EXPECTED_START_TIME_ASC",
        )
        since = self.inv.clock() - TIMED_OUT_CANCELLATION_WINDOW
        cancelled = await self.client.read_flow_runs(
            flow_runs={"state": {"type": {"any_": [StateType.CANCELLED.value]}}, "end_time": {"after_": since.isoformat()}},
            work_pools=in_pool,
        )
        runs = active + [run for run in cancelled if run.infrastructure_pid]
        for run in runs:
            run.work_pool_name = pool.name
        return runs

    async def _reconcile(
        self, pool: WorkPool, run: FlowRun, status: Optional[InfrastructureStatus]
    ) -> tuple[Optional[RunResult], int]:
        """(what was done, if anything; 1 if the run was submitted again).
        `status`: its infrastructure's, read in this pool's batch (None: unknown)."""
        state = run.current_state_type
        if state == StateType.CANCELLING:
            return await cancel_flow_run(self.inv, pool, run), 0
        if state == StateType.CANCELLED:
            return await stop_after_cancellation_timeout(self.inv, pool, run), 0
        if state == StateType.PENDING and not run.infrastructure_pid:
            return await self._lost_submission(pool, run)
        if run.infrastructure_pid:
            settled = await self.settle_stopped_infrastructure(pool, run, status)
            if settled is not None:
                return settled, 0
            return await self._enforce_max_run_time(pool, run), 0
        return None, 0

    # ------------------------------------------------------------ lost submissions

    async def _lost_submission(self, pool: WorkPool, run: FlowRun) -> tuple[Optional[RunResult], int]:
        claimed_at = run.state.timestamp if run.state is not None else None
        timeout = timedelta(seconds=self.settings.pending_timeout_seconds)
        last_try = max(filter(None, [claimed_at, _time_label(run, RESUBMITTED_AT_LABEL)]), default=None)
        if claimed_at is None or last_try is None or self.inv.clock() - last_try < timeout:
            return None, 0  # maybe a dispatcher is submitting it right now
        tries = _int_label(run, RESUBMISSIONS_LABEL)
        if tries >= self.settings.max_resubmissions:
            return await self.inv.crash(
                pool, run,
                f"Claimed at {claimed_at.isoformat(timespec='seconds')} but its infrastructure was never recorded, "
                f"even after {tries} resubmissions: check the dispatcher's logs for this flow run id",
            ), 0
        try:
            # Concurrent reconcilers (other dispatchers' ticks) see the same run:
            # under the pool's claim lock, re-read it and count the resubmission
            # only if no one else has since, so exactly one of them resubmits.
            async with pool_claim_lock(self.client, pool.name):
                current = await self.client.read_flow_run(run.id)
                if (
                    current.infrastructure_pid
                    or current.current_state_type != StateType.PENDING
                    or _int_label(current, RESUBMISSIONS_LABEL) != tries
                ):
                    return None, 0  # launched, moved on, or resubmitted by another dispatcher
                await self.client.update_flow_run_labels(
                    run.id,
                    {RESUBMISSIONS_LABEL: str(tries + 1), RESUBMITTED_AT_LABEL: self.inv.clock().isoformat()},
                )
        except (PrefectUnreachable, PrefectAPIError, PoolBusy) as exc:
            logger.warning("could not count the resubmission; not resubmitting now", extra={"error": str(exc)})
            return None, 0
        logger.warning(
            "run was claimed but its infrastructure never recorded; submitting it again (idempotent)",
            extra={"resubmission": tries + 1},
        )
        run.labels = {**run.labels, RESUBMISSIONS_LABEL: str(tries + 1)}  # tells the provider (see is_resubmission)
        return await launch(self.inv, pool, run), 1

    # ------------------------------------------------------------ dead infrastructure

    async def check_infrastructure(self, pool: WorkPool, run: FlowRun) -> Optional[RunResult]:
        """CRASHED (or, if it was being cancelled, CANCELLED) when the run's
        infrastructure has exited or is gone while the run is not finished."""
        if not _has_live_infrastructure(run):
            return None
        statuses = await self._statuses(pool, [run])
        return await self.settle_stopped_infrastructure(pool, run, statuses.get(run.id))

    async def settle_stopped_infrastructure(
        self, pool: WorkPool, run: FlowRun, status: Optional[InfrastructureStatus]
    ) -> Optional[RunResult]:
        """What `check_infrastructure` does once the status is known."""
        if not _has_live_infrastructure(run) or status is None or status.state == "running":
            return None
        # What the infrastructure said is final; what the run says may have moved on.
        try:
            current = await self.client.read_flow_run(run.id)
        except ObjectNotFound:
            return None
        except (PrefectUnreachable, PrefectAPIError) as exc:
            logger.warning("could not re-read the run; settling it later", extra={"error": str(exc)})
            return None
        current.work_pool_name = pool.name
        state = current.current_state_type
        if state is None or state.is_terminal or state in (StateType.SCHEDULED, StateType.PAUSED):
            return None  # finished, or given back for a retry: nothing to settle
        if current.infrastructure_pid != run.infrastructure_pid:
            return None  # relaunched meanwhile; that infrastructure is checked next time
        if state == StateType.CANCELLING:
            return await self.inv.mark_cancelled(
                pool, current, f"Cancelled: its infrastructure {run.infrastructure_pid} has stopped."
            )
        return await self.inv.crash(pool, current, describe_exit(status))

    async def _statuses(self, pool: WorkPool, runs: list[FlowRun]) -> dict[UUID, InfrastructureStatus]:
        """The infrastructure status of each run whose status could be read,
        asked of the provider in one batch (a run whose configuration cannot be
        built, or whose backend cannot answer, is left out and checked next tick)."""
        asked: list[tuple[FlowRun, str, JobConfiguration]] = []
        for run in runs:
            try:
                asked.append((run, run.infrastructure_pid or "", await self.inv.job_configuration(pool, run)))
            except (TemplateError, ObjectNotFound, PrefectUnreachable, PrefectAPIError) as exc:
                self._cannot_read(run, exc)
        if not asked:
            return {}
        try:
            answers = await self.inv.provider(pool).statuses([(pid, configuration) for _, pid, configuration in asked])
        except InfrastructureError as exc:
            answers = [exc] * len(asked)
        found: dict[UUID, InfrastructureStatus] = {}
        for (run, _, _), answer in zip(asked, answers):
            if isinstance(answer, InfrastructureError):
                self._cannot_read(run, answer)
            else:
                found[run.id] = answer
        return found

    def _cannot_read(self, run: FlowRun, exc: Exception) -> None:
        with log_context(flow_run_id=run.id):
            logger.warning(
                "could not read the state of the run's infrastructure",
                extra={"infrastructure_pid": run.infrastructure_pid, "error": self.inv.reason(str(exc))},
            )

    # ------------------------------------------------------------ maximum run time

    async def _enforce_max_run_time(self, pool: WorkPool, run: FlowRun) -> Optional[RunResult]:
        started = run.start_time or (run.state.timestamp if run.state is not None else None)
        try:
            deployment = await self.inv.deployment(run.deployment_id) if run.deployment_id else None
        except (ObjectNotFound, PrefectUnreachable, PrefectAPIError):
            deployment = None
        reason = RunPolicy.for_run(pool, deployment, run).overran(started, self.inv.clock())
        if reason is None:
            return None
        result = await self.inv.propose(run, StateProposal(type=StateType.CANCELLING, name="Cancelling", message=reason))
        if result is None or result.state is None or result.state.type != StateType.CANCELLING:
            return None
        logger.warning("run exceeded its maximum run time; cancelling it", extra={"reason": reason})
        cancelling = run.model_copy(update={"state": result.state, "state_type": StateType.CANCELLING})
        return await cancel_flow_run(self.inv, pool, cancelling)


def _has_live_infrastructure(run: FlowRun) -> bool:
    """Recorded infrastructure under a run that has not finished."""
    return bool(run.infrastructure_pid) and not (run.current_state_type or StateType.SCHEDULED).is_terminal


def describe_exit(status: InfrastructureStatus) -> str:
    """The CRASHED message for infrastructure that stopped under a live run."""
    if status.state == "missing":
        return f"Flow run infrastructure disappeared while the run was not finished: {status.reason or 'not found'}"
    code = "" if status.exit_code is None else f" with exit code {status.exit_code}"
    reason = f": {status.reason}" if status.reason else ""
    return f"Flow run infrastructure exited{code} while the run was not finished{reason}"


def _time_label(run: FlowRun, name: str) -> Optional[datetime]:
    value = run.labels.get(name)
    try:
        moment = datetime.fromisoformat(str(value)) if value else None
    except ValueError:
        return None
    return moment if moment is None or moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _int_label(run: FlowRun, name: str) -> int:
    value = run.labels.get(name)
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        return 0
