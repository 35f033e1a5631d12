"""The dispatch core: what a dispatcher invocation does for the push pools it serves.

- `sweep`: for each pool, read the runs due within the prefetch window, and for
  each run, concurrently up to `max_concurrency`: claim it (PENDING), build its
  job configuration, submit it to the pool's provider with the flow run id as
  the idempotency key, and record the `infrastructure_pid` — or, when anything
  fails after the claim, propose CRASHED with a reason a person can act on.
- `cancel`: stop a CANCELLING run's infrastructure, then mark it CANCELLED
  (`dispatcher.cancellation`).
- `reconcile`: settle what a lost trigger or a crash left behind
  (`dispatcher.reconcile`).
- `infrastructure_stopped`: a hint that a run's infrastructure stopped; the run
  is re-read and settled like the reconciler would.

Nothing is kept between invocations: the Prefect API is the only truth, and a
trigger only says "look now".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Callable, Optional
from uuid import UUID

from pydantic import BaseModel, Field

from dispatcher.cancellation import cancel_flow_run
from dispatcher.claims import PoolBusy, claim, pool_claim_lock
from dispatcher.invocation import Invocation, RunOutcome, RunResult
from dispatcher.logs import Redactor, get_logger, log_context
from dispatcher.models import FlowRun, WorkPool
from dispatcher.prefect_client import (
    PAGE_SIZE,
    ObjectNotFound,
    PrefectAPIError,
    PrefectClient,
    PrefectUnreachable,
)
from dispatcher.reconcile import ReconcileSummary, Reconciler
from dispatcher.run_policy import RunPolicy
from dispatcher.settings import Settings
from dispatcher.submission import launch
from providers.registry import ProviderRegistry, UnknownPushType

__all__ = ["Dispatcher", "RunOutcome", "RunResult", "SweepSummary", "utcnow"]

logger = get_logger(__name__)

MAX_BATCHES_PER_POOL = 50  # bounds one sweep's time (50 × 200 runs)


class SweepSummary(BaseModel):
    runs: list[RunResult] = Field(default_factory=list)
    pools: list[str] = Field(default_factory=list)
    prefetch_seconds: dict[str, float] = Field(default_factory=dict, description="per swept pool")

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

    @property
    def cancelled(self) -> int:
        return self.count(RunOutcome.CANCELLED)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Dispatcher:
    """Serves push pools. Cheap to create; holds no state between calls."""

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

    def invocation(self) -> Invocation:
        return Invocation(self.client, self.settings, registry=self.registry, redactor=self.redactor, clock=self.clock)

    async def sweep(self, pool_names: Optional[Iterable[str]] = None) -> SweepSummary:
        """Dispatch every due run of the served pools (or of `pool_names`)."""
        invocation = self.invocation()
        pools = await self.served_pools(invocation, pool_names)
        summary = SweepSummary(pools=[pool.name for pool in pools])
        sweep = _Sweep(invocation)
        for pool in pools:
            try:
                summary.prefetch_seconds[pool.name] = invocation.prefetch_seconds(pool)
            except UnknownPushType:
                pass
        for pool_results in await asyncio.gather(*(sweep.pool(pool) for pool in pools)):
            summary.runs.extend(pool_results)
        return summary

    async def cancel(self, flow_run_id: UUID) -> Optional[RunResult]:
        """Cancel one run if it is CANCELLING in a served push pool (else None)."""
        return await self._for_served_run(flow_run_id, cancel_flow_run)

    async def reconcile(self, pool_names: Optional[Iterable[str]] = None) -> ReconcileSummary:
        invocation = self.invocation()
        pools = await self.served_pools(invocation, pool_names)
        return await Reconciler(invocation).run(pools)

    async def infrastructure_stopped(self, flow_run_id: UUID) -> Optional[RunResult]:
        """Settle a run whose infrastructure is said to have stopped (a hint:
        the run and its infrastructure are read again before anything changes)."""
        return await self._for_served_run(
            flow_run_id, lambda invocation, pool, run: Reconciler(invocation).check_infrastructure(pool, run)
        )

    async def _for_served_run(
        self,
        flow_run_id: UUID,
        act: Callable[[Invocation, WorkPool, FlowRun], Awaitable[Optional[RunResult]]],
    ) -> Optional[RunResult]:
        """`act` on the run, read from the API, if it is in a pool this dispatcher serves."""
        invocation = self.invocation()
        found = await self._served_run(invocation, flow_run_id)
        if found is None:
            return None
        pool, run = found
        with log_context(flow_run_id=run.id, pool=pool.name):
            return await act(invocation, pool, run)

    # ------------------------------------------------------------ what is served

    async def served_pools(self, invocation: Invocation, names: Optional[Iterable[str]] = None) -> list[WorkPool]:
        names = list(names or self.settings.pools)
        if not names:
            pools = [pool for pool in await self.client.read_work_pools() if pool.is_push]
        else:
            pools = []
            for name in names:
                try:
                    pools.append(await invocation.work_pool(name))
                except ObjectNotFound:
                    logger.warning("work pool not found; skipping it", extra={"pool": name})
        for pool in pools:
            invocation.remember_pool(pool)
        return pools

    def serves(self, pool: WorkPool) -> bool:
        if not pool.is_push or pool.type not in self.registry:
            return False
        return not self.settings.pools or pool.name in self.settings.pools

    async def _served_run(self, invocation: Invocation, flow_run_id: UUID) -> Optional[tuple[WorkPool, FlowRun]]:
        """The run and its pool, read from the API, if this dispatcher serves that pool."""
        try:
            run = await self.client.read_flow_run(flow_run_id)
        except ObjectNotFound:
            logger.info("flow run not found; nothing to do", extra={"flow_run_id": str(flow_run_id)})
            return None
        if not run.work_pool_name:
            return None
        try:
            pool = await invocation.work_pool(run.work_pool_name)
        except ObjectNotFound:
            return None
        if not self.serves(pool):
            logger.info(
                "flow run is not in a pool this dispatcher serves; nothing to do",
                extra={"flow_run_id": str(flow_run_id), "pool": pool.name},
            )
            return None
        return pool, run


class _Sweep:
    """One sweep over a set of pools, within one invocation."""

    def __init__(self, invocation: Invocation):
        self.inv = invocation
        self.client = invocation.client

    async def pool(self, pool: WorkPool) -> list[RunResult]:
        with log_context(pool=pool.name):
            if pool.is_paused:
                logger.debug("pool is paused; skipping it")
                return []
            try:
                self.inv.provider(pool)
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
        before = self.inv.clock() + timedelta(seconds=self.inv.prefetch_seconds(pool))
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

        return await self.inv.bounded(claim_and_launch, runs), len(runs)

    async def _limited_batch(self, pool: WorkPool) -> tuple[list[RunResult], int]:
        """Read and claim under the pool's claim lock, so concurrency limits hold
        across dispatchers; launch after releasing it."""
        async with pool_claim_lock(self.client, pool.name):
            runs = await self._due_runs(pool)
            claims = await self.inv.bounded(lambda run: self._claim(pool, run), runs)
        claimed = [run for run, result in zip(runs, claims) if result is None]
        unclaimed = [result for result in claims if result is not None]
        launched = await self.inv.bounded(lambda run: self._launch(pool, run), claimed)
        return unclaimed + launched, len(runs)

    async def _heartbeat(self, pool: WorkPool) -> None:
        """Tell the UI the pool is served (cosmetic; never fails a sweep)."""
        try:
            await self.client.heartbeat(pool.name, self.inv.settings.dispatcher_name, interval_seconds=60)
        except (PrefectUnreachable, PrefectAPIError) as exc:
            logger.debug("heartbeat failed", extra={"error": str(exc)})

    # ------------------------------------------------------------ per run

    async def _claim(self, pool: WorkPool, run: FlowRun) -> Optional[RunResult]:
        """None if the run is now ours; otherwise the result that ends it here."""
        deployment = None
        if run.deployment_id is not None:
            try:
                deployment = await self.inv.deployment(run.deployment_id)
            except ObjectNotFound:
                return await self.inv.mark_cancelled(
                    pool, run, f"Deployment {run.deployment_id} no longer exists, cancelled run."
                )
            except (PrefectUnreachable, PrefectAPIError) as exc:
                # Not claimed, so nothing is lost: a later sweep tries again.
                logger.warning("could not read the run's deployment; not claiming it", extra={"error": str(exc)})
                return RunResult(flow_run_id=run.id, pool=pool.name, outcome=RunOutcome.SKIPPED, reason=str(exc))
        too_late = RunPolicy.for_run(pool, deployment, run).too_late(run, self.inv.clock())
        if too_late is not None:
            return await self.inv.mark_cancelled(pool, run, too_late)
        claimed = await claim(
            self.client, run, dispatcher_name=self.inv.settings.dispatcher_name, claim_token=self.inv.claim_token
        )
        if claimed is None:
            return RunResult(flow_run_id=run.id, pool=pool.name, outcome=RunOutcome.SKIPPED)
        # From here the run is what the API now says: PENDING, with this claim,
        # which providers key their idempotency by.
        run.state, run.state_type, run.state_name = claimed, claimed.type, claimed.name
        logger.info("claimed flow run")
        return None

    async def _launch(self, pool: WorkPool, run: FlowRun) -> RunResult:
        return await launch(self.inv, pool, run)
