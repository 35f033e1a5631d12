"""The dispatch core: one sweep over the push pools a dispatcher serves.

For each pool: read the runs due within the prefetch window, and for each run,
concurrently up to `max_concurrency`: claim it (PENDING), build its job
configuration, submit it to the pool's provider with the flow run id as the
idempotency key, and record the `infrastructure_pid` — or, when anything fails
after the claim, propose CRASHED with a reason a person can act on. Nothing is
kept between sweeps: the Prefect API is the only truth.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Optional, TypeVar
from uuid import UUID, uuid4

from pydantic import BaseModel, Field

from dispatcher.claims import PoolBusy, claim, pool_claim_lock
from dispatcher.job_configuration import build_job_configuration
from dispatcher.logs import Redactor, get_logger, log_context
from dispatcher.models import Deployment, Flow, FlowRun, StateProposal, StateType, WorkPool, WorkQueue
from dispatcher.prefect_client import (
    PAGE_SIZE,
    ObjectNotFound,
    PrefectAPIError,
    PrefectClient,
    PrefectUnreachable,
)
from dispatcher.settings import Settings
from dispatcher.templating import CachedLookups, TemplateError
from providers.base import InfrastructureError, Provider
from providers.registry import ProviderRegistry, UnknownPushType

logger = get_logger(__name__)

MAX_STATE_MESSAGE = 2000
MAX_BATCHES_PER_POOL = 50  # bounds one sweep's time (50 × 200 runs)
T = TypeVar("T")


class RunOutcome(str, enum.Enum):
    SUBMITTED = "submitted"
    CRASHED = "crashed"
    SKIPPED = "skipped"  # not ours: another dispatcher or worker claimed it
    CANCELLED = "cancelled"  # its deployment no longer exists


class RunResult(BaseModel):
    flow_run_id: UUID
    pool: str
    outcome: RunOutcome
    infrastructure_pid: Optional[str] = None
    reason: Optional[str] = None


class SweepSummary(BaseModel):
    runs: list[RunResult] = Field(default_factory=list)
    pools: list[str] = Field(default_factory=list)

    def count(self, outcome: RunOutcome) -> int:
        return sum(1 for run in self.runs if run.outcome == outcome)

    @property
    def claimed(self) -> int:
        return self.count(RunOutcome.SUBMITTED) + self.count(RunOutcome.CRASHED)

    @property
    def submitted(self) -> int:
        return self.count(RunOutcome.SUBMITTED)

    @property
    def crashed(self) -> int:
        return self.count(RunOutcome.CRASHED)

    @property
    def skipped(self) -> int:
        return self.count(RunOutcome.SKIPPED)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Dispatcher:
    """Sweeps push pools. Cheap to create; holds no state between sweeps."""

    def __init__(
        self,
        client: PrefectClient,
        settings: Settings,
        *,
        registry: Optional[ProviderRegistry] = None,
        redactor: Optional[Redactor] = None,
        clock: Callable[[], datetime] = utcnow,
    ):
        self.client = client
        self.settings = settings
        self.registry = registry or ProviderRegistry()
        self.redactor = redactor or Redactor(settings.secret_values())
        self.clock = clock

    async def sweep(self, pool_names: Optional[Iterable[str]] = None) -> SweepSummary:
        """Dispatch every due run of the served pools (or of `pool_names`)."""
        sweep = _Sweep(self)
        pools = await self._served_pools(list(pool_names or self.settings.pools))
        summary = SweepSummary(pools=[pool.name for pool in pools])
        results = await asyncio.gather(*(sweep.pool(pool) for pool in pools))
        for pool_results in results:
            summary.runs.extend(pool_results)
        return summary

    async def _served_pools(self, names: list[str]) -> list[WorkPool]:
        if not names:
            return [pool for pool in await self.client.read_work_pools() if pool.is_push]
        pools = []
        for name in names:
            try:
                pools.append(await self.client.read_work_pool(name))
            except ObjectNotFound:
                logger.warning("work pool not found; skipping it", extra={"pool": name})
        return pools


class _Sweep:
    """The per-invocation context of one sweep: caches and the claim token."""

    def __init__(self, dispatcher: Dispatcher):
        self.d = dispatcher
        self.client = dispatcher.client
        self.claim_token = uuid4().hex[:12]
        self.lookups = CachedLookups(dispatcher.client, redactor=dispatcher.redactor)
        self.semaphore = asyncio.Semaphore(dispatcher.settings.max_concurrency)
        self._deployments: dict[UUID, asyncio.Task[Deployment]] = {}
        self._flows: dict[UUID, asyncio.Task[Flow]] = {}
        self._providers: dict[str, Provider] = {}

    # ------------------------------------------------------------ per pool

    async def pool(self, pool: WorkPool) -> list[RunResult]:
        with log_context(pool=pool.name):
            if pool.is_paused:
                logger.debug("pool is paused; skipping it")
                return []
            try:
                self._providers[pool.type] = self.d.registry.create(pool.type)
            except UnknownPushType as exc:
                logger.warning("no provider for this pool's type; skipping it", extra={"error": str(exc)})
                return []
            try:
                return await self._drain(pool)
            except PoolBusy as exc:
                logger.info(str(exc))
                return []
            except (PrefectUnreachable, PrefectAPIError) as exc:
                logger.error("could not sweep pool", extra={"error": str(exc)})
                return []

    async def _drain(self, pool: WorkPool) -> list[RunResult]:
        queues = await self.client.read_work_queues(pool.name)
        await self._heartbeat(pool)
        limited = pool.concurrency_limit is not None or any(
            q.concurrency_limit is not None for q in queues
        )
        results: list[RunResult] = []
        for _ in range(MAX_BATCHES_PER_POOL):
            if limited:
                batch_results, batch_size = await self._limited_batch(pool)
            else:
                batch_results, batch_size = await self._batch(pool)
            results.extend(batch_results)
            claimed_any = any(r.outcome != RunOutcome.SKIPPED for r in batch_results)
            if batch_size < PAGE_SIZE or not claimed_any:
                break
        return results

    async def _due_runs(self, pool: WorkPool) -> list[FlowRun]:
        before = self.d.clock() + timedelta(seconds=self.d.settings.prefetch_seconds)
        scheduled = await self.client.get_scheduled_flow_runs(pool.name, scheduled_before=before)
        runs = []
        for item in scheduled:
            run = item.flow_run
            run.work_pool_id = item.work_pool_id
            run.work_queue_id = item.work_queue_id
            run.work_pool_name = pool.name
            runs.append(run)
        return runs

    async def _batch(self, pool: WorkPool) -> tuple[list[RunResult], int]:
        runs = await self._due_runs(pool)

        async def claim_and_launch(run: FlowRun) -> RunResult:
            result = await self._claim(pool, run)
            return result if result is not None else await self._launch(pool, run)

        return await self._bounded(claim_and_launch, runs), len(runs)

    async def _limited_batch(self, pool: WorkPool) -> tuple[list[RunResult], int]:
        """Read and claim under the pool's claim lock, so concurrency limits hold
        across dispatchers; launch after releasing it."""
        async with pool_claim_lock(self.client, pool.name):
            runs = await self._due_runs(pool)
            claims = await self._bounded(lambda run: self._claim(pool, run), runs)
        claimed = [run for run, result in zip(runs, claims) if result is None]
        unclaimed = [result for result in claims if result is not None]
        launched = await self._bounded(lambda run: self._launch(pool, run), claimed)
        return unclaimed + launched, len(runs)

    async def _bounded(self, work: Callable[[FlowRun], Awaitable[T]], runs: list[FlowRun]) -> list[T]:
        async def one(run: FlowRun) -> T:
            async with self.semaphore:
                with log_context(flow_run_id=run.id):
                    return await work(run)

        return list(await asyncio.gather(*(one(run) for run in runs)))

    async def _heartbeat(self, pool: WorkPool) -> None:
        """Tell the UI the pool is served (cosmetic; never fails a sweep)."""
        try:
            await self.client.heartbeat(pool.name, self.d.settings.dispatcher_name, interval_seconds=60)
        except (PrefectUnreachable, PrefectAPIError) as exc:
            logger.debug("heartbeat failed", extra={"error": str(exc)})

    # ------------------------------------------------------------ per run

    async def _claim(self, pool: WorkPool, run: FlowRun) -> Optional[RunResult]:
        """None if the run is now ours; otherwise the result that ends it here."""
        if run.deployment_id is not None:
            try:
                await self._deployment(run.deployment_id)
            except ObjectNotFound:
                return await self._cancel_orphan(pool, run)
            except (PrefectUnreachable, PrefectAPIError) as exc:
                # Not claimed, so nothing is lost: a later sweep tries again.
                logger.warning("could not read the run's deployment; not claiming it", extra={"error": str(exc)})
                return RunResult(flow_run_id=run.id, pool=pool.name, outcome=RunOutcome.SKIPPED, reason=str(exc))
        claimed = await claim(
            self.client, run, dispatcher_name=self.d.settings.dispatcher_name, claim_token=self.claim_token
        )
        if not claimed:
            return RunResult(flow_run_id=run.id, pool=pool.name, outcome=RunOutcome.SKIPPED)
        logger.info("claimed flow run")
        return None

    async def _launch(self, pool: WorkPool, run: FlowRun) -> RunResult:
        """Build, submit and record a claimed run; CRASHED with a reason on failure."""
        provider = self._providers[pool.type]
        try:
            deployment = await self._deployment(run.deployment_id) if run.deployment_id else None
            configuration = await build_job_configuration(
                work_pool=pool,
                deployment=deployment,
                flow=await self._flow(run.flow_id),
                flow_run=run,
                provider_class=type(provider),
                lookups=self.lookups,
                base_environment=self._base_environment(),
                dispatcher_name=self.d.settings.dispatcher_name,
            )
            infrastructure_pid = await provider.submit(configuration, run)
        except (TemplateError, InfrastructureError) as exc:
            return await self._crash(pool, run, str(exc))
        except ObjectNotFound as exc:
            return await self._crash(pool, run, f"A Prefect object this run needs no longer exists: {exc.detail}")
        except (PrefectUnreachable, PrefectAPIError) as exc:
            return await self._crash(pool, run, f"Could not read this run's configuration from the Prefect API: {exc}")
        except Exception as exc:  # noqa: BLE001 - any failure after the claim must end the run accounted for
            logger.exception("submission failed")
            return await self._crash(
                pool, run, f"Failed to submit flow run to infrastructure: {type(exc).__name__}: {exc}"
            )

        try:
            await self.client.update_flow_run(run.id, infrastructure_pid=infrastructure_pid)
        except (PrefectUnreachable, PrefectAPIError) as exc:
            # The run is launched; a later sweep's reconciler resubmits with the
            # same idempotency key, which returns this pid again and records it.
            logger.error("launched, but could not record infrastructure_pid", extra={"error": str(exc)})
        logger.info("submitted flow run", extra={"infrastructure_pid": infrastructure_pid})
        return RunResult(
            flow_run_id=run.id, pool=pool.name, outcome=RunOutcome.SUBMITTED, infrastructure_pid=infrastructure_pid
        )

    async def _crash(self, pool: WorkPool, run: FlowRun, reason: str) -> RunResult:
        reason = self.d.redactor.redact(reason)[:MAX_STATE_MESSAGE]
        logger.error("flow run crashed before it started", extra={"reason": reason})
        try:
            # force=False: the server refuses to overwrite a terminal state.
            await self.client.set_flow_run_state(run.id, StateProposal(type=StateType.CRASHED, message=reason))
        except (PrefectUnreachable, PrefectAPIError) as exc:
            logger.error("could not mark the run CRASHED", extra={"error": str(exc)})
        return RunResult(flow_run_id=run.id, pool=pool.name, outcome=RunOutcome.CRASHED, reason=reason)

    async def _cancel_orphan(self, pool: WorkPool, run: FlowRun) -> RunResult:
        reason = f"Deployment {run.deployment_id} no longer exists, cancelled run."
        try:
            await self.client.set_flow_run_state(
                run.id, StateProposal(type=StateType.CANCELLED, name="Cancelled", message=reason)
            )
        except (PrefectUnreachable, PrefectAPIError) as exc:
            logger.error("could not cancel a run whose deployment is gone", extra={"error": str(exc)})
        return RunResult(flow_run_id=run.id, pool=pool.name, outcome=RunOutcome.CANCELLED, reason=reason)

    # ------------------------------------------------------------ cached reads

    def _deployment(self, deployment_id: UUID) -> "asyncio.Task[Deployment]":
        if deployment_id not in self._deployments:
            self._deployments[deployment_id] = asyncio.ensure_future(self.client.read_deployment(deployment_id))
        return self._deployments[deployment_id]

    def _flow(self, flow_id: UUID) -> "asyncio.Task[Flow]":
        if flow_id not in self._flows:
            self._flows[flow_id] = asyncio.ensure_future(self.client.read_flow(flow_id))
        return self._flows[flow_id]

    def _base_environment(self) -> dict[str, str]:
        """What every Prefect worker passes on: how to reach the API."""
        settings = self.d.settings
        env = {"PREFECT_API_URL": settings.api_url or ""}
        if settings.api_auth_string is not None:
            env["PREFECT_API_AUTH_STRING"] = settings.api_auth_string.get_secret_value()
        if settings.api_key is not None:
            env["PREFECT_API_KEY"] = settings.api_key.get_secret_value()
        return env
