"""What one dispatcher invocation shares across all its work: the API client,
reads cached for the invocation (deployments, flows, pools, blocks, variables),
one provider per push type, the bounded concurrency, and the ways a run is
settled (recorded, crashed, cancelled). Nothing outlives the invocation."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Optional, TypeVar
from uuid import UUID, uuid4

from pydantic import BaseModel, Field

from dispatcher.job_configuration import build_job_configuration
from dispatcher.logs import Redactor, get_logger, log_context
from dispatcher.models import (
    Deployment,
    Flow,
    FlowRun,
    OrchestrationResult,
    StateProposal,
    StateType,
    WorkPool,
)
from dispatcher.prefect_client import PrefectAPIError, PrefectClient, PrefectUnreachable
from dispatcher.settings import Settings
from dispatcher.templating import CachedLookups
from providers.base import JobConfiguration, Provider
from providers.registry import ProviderRegistry

logger = get_logger(__name__)

MAX_STATE_MESSAGE = 2000
T = TypeVar("T")


class RunOutcome(str, enum.Enum):
    SUBMITTED = "submitted"
    CRASHED = "crashed"
    SKIPPED = "skipped"  # not ours (another dispatcher or worker claimed it), or nothing to do
    CANCELLED = "cancelled"


class RunResult(BaseModel):
    flow_run_id: UUID
    pool: str
    outcome: RunOutcome
    infrastructure_pid: Optional[str] = None
    reason: Optional[str] = None
    latency_seconds: Optional[float] = Field(None, description="submitted at − the run's scheduled start")


class Invocation:
    def __init__(
        self,
        client: PrefectClient,
        settings: Settings,
        *,
        registry: ProviderRegistry,
        redactor: Redactor,
        clock: Callable[[], datetime],
    ):
        self.client = client
        self.settings = settings
        self.registry = registry
        self.redactor = redactor
        self.clock = clock
        self.claim_token = uuid4().hex[:12]
        self.lookups = CachedLookups(client, redactor=redactor)
        self.semaphore = asyncio.Semaphore(settings.max_concurrency)
        self._deployments: dict[UUID, asyncio.Task[Deployment]] = {}
        self._flows: dict[UUID, asyncio.Task[Flow]] = {}
        self._pools: dict[str, asyncio.Task[WorkPool]] = {}
        self._providers: dict[str, Provider] = {}

    # ------------------------------------------------------------ cached reads

    def deployment(self, deployment_id: UUID) -> "asyncio.Task[Deployment]":
        if deployment_id not in self._deployments:
            self._deployments[deployment_id] = asyncio.ensure_future(self.client.read_deployment(deployment_id))
        return self._deployments[deployment_id]

    def flow(self, flow_id: UUID) -> "asyncio.Task[Flow]":
        if flow_id not in self._flows:
            self._flows[flow_id] = asyncio.ensure_future(self.client.read_flow(flow_id))
        return self._flows[flow_id]

    def work_pool(self, name: str) -> "asyncio.Task[WorkPool]":
        if name not in self._pools:
            self._pools[name] = asyncio.ensure_future(self.client.read_work_pool(name))
        return self._pools[name]

    def remember_pool(self, pool: WorkPool) -> None:
        """A pool read by a listing, so later lookups by name cost nothing."""
        if pool.name not in self._pools:
            future: asyncio.Future[WorkPool] = asyncio.get_running_loop().create_future()
            future.set_result(pool)
            self._pools[pool.name] = future  # type: ignore[assignment]

    def provider(self, pool: WorkPool) -> Provider:
        """The provider for the pool's type (`UnknownPushType` if there is none)."""
        push_type = self.registry.canonical(pool.type)
        if push_type not in self._providers:
            self._providers[push_type] = self.registry.create(push_type)
        return self._providers[push_type]

    def prefetch_seconds(self, pool: WorkPool) -> float:
        """How far ahead of their time this pool's runs are claimed."""
        if self.settings.prefetch_seconds is not None:
            return self.settings.prefetch_seconds
        return type(self.provider(pool)).default_prefetch_seconds

    async def job_configuration(self, pool: WorkPool, run: FlowRun) -> JobConfiguration:
        """The run's rendered configuration (raises `TemplateError`, `ObjectNotFound`, ...)."""
        deployment = await self.deployment(run.deployment_id) if run.deployment_id else None
        return await build_job_configuration(
            work_pool=pool,
            deployment=deployment,
            flow=await self.flow(run.flow_id),
            flow_run=run,
            provider_class=type(self.provider(pool)),
            lookups=self.lookups,
            base_environment=self.base_environment(),
            dispatcher_name=self.settings.dispatcher_name,
        )

    def base_environment(self) -> dict[str, str]:
        """What every Prefect worker passes on: how to reach the API."""
        settings = self.settings
        env = {"PREFECT_API_URL": settings.api_url or ""}
        if settings.api_auth_string is not None:
            env["PREFECT_API_AUTH_STRING"] = settings.api_auth_string.get_secret_value()
        if settings.api_key is not None:
            env["PREFECT_API_KEY"] = settings.api_key.get_secret_value()
        return env

    # ------------------------------------------------------------ concurrency

    async def bounded(self, work: Callable[[FlowRun], Awaitable[T]], runs: list[FlowRun]) -> list[T]:
        """`work(run)` for every run, at most `max_concurrency` at once, each
        logging with its flow run id."""

        async def one(run: FlowRun) -> T:
            async with self.semaphore:
                with log_context(flow_run_id=run.id):
                    return await work(run)

        return list(await asyncio.gather(*(one(run) for run in runs)))

    # ------------------------------------------------------------ settling a run

    async def propose(
        self, run: FlowRun, proposal: StateProposal, *, force: bool = False
    ) -> Optional[OrchestrationResult]:
        """Propose a state; None (logged) if the API could not be reached."""
        try:
            return await self.client.set_flow_run_state(run.id, proposal, force=force)
        except (PrefectUnreachable, PrefectAPIError) as exc:
            logger.error(
                "could not set the run's state",
                extra={"state": proposal.type.value, "error": self.redactor.redact(str(exc))},
            )
            return None

    def reason(self, text: str) -> str:
        """A state message: never a secret, never too long."""
        return self.redactor.redact(text)[:MAX_STATE_MESSAGE]

    async def crash(self, pool: WorkPool, run: FlowRun, reason: str) -> RunResult:
        """Propose CRASHED with `reason`. force=False: the server refuses to
        overwrite a terminal state, so a run that finished meanwhile keeps its end."""
        reason = self.reason(reason)
        logger.error("flow run crashed", extra={"reason": reason})
        await self.propose(run, StateProposal(type=StateType.CRASHED, name="Crashed", message=reason))
        return RunResult(flow_run_id=run.id, pool=pool.name, outcome=RunOutcome.CRASHED, reason=reason)

    async def mark_cancelled(self, pool: WorkPool, run: FlowRun, reason: str) -> RunResult:
        """Propose CANCELLED (force=False: a terminal state is never overwritten)."""
        reason = self.reason(reason)
        result = await self.propose(run, StateProposal(type=StateType.CANCELLED, name="Cancelled", message=reason))
        accepted = result is not None and result.state is not None and result.state.type == StateType.CANCELLED
        outcome = RunOutcome.CANCELLED if accepted else RunOutcome.SKIPPED
        if accepted:
            logger.info("flow run cancelled", extra={"reason": reason})
        return RunResult(flow_run_id=run.id, pool=pool.name, outcome=outcome, reason=reason)
