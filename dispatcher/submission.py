"""Submitting a claimed run: build its job configuration, hand it to the
pool's provider with the flow run id as the idempotency key, record the
`infrastructure_pid` — or, when anything fails, propose CRASHED with a reason
a person can act on. Every claimed run ends accounted for."""

from __future__ import annotations

from dispatcher.invocation import Invocation, RunOutcome, RunResult
from dispatcher.logs import get_logger
from dispatcher.models import FlowRun, WorkPool
from dispatcher.prefect_client import ObjectNotFound, PrefectAPIError, PrefectUnreachable
from dispatcher.templating import TemplateError
from providers.base import InfrastructureError

logger = get_logger(__name__)


async def launch(invocation: Invocation, pool: WorkPool, run: FlowRun) -> RunResult:
    """Build, submit and record a claimed run; CRASHED with a reason on failure.
    Also what the reconciler calls to resubmit a run whose submission was lost:
    `submit` is idempotent, so a run already launched gets its pid back."""
    try:
        configuration = await invocation.job_configuration(pool, run)
        infrastructure_pid = await invocation.provider(pool).submit(configuration, run)
    except (TemplateError, InfrastructureError) as exc:
        return await invocation.crash(pool, run, str(exc))
    except ObjectNotFound as exc:
        return await invocation.crash(pool, run, f"A Prefect object this run needs no longer exists: {exc.detail}")
    except (PrefectUnreachable, PrefectAPIError) as exc:
        return await invocation.crash(pool, run, f"Could not read this run's configuration from the Prefect API: {exc}")
    except Exception as exc:  # noqa: BLE001 - any failure after the claim must end the run accounted for
        logger.exception("submission failed")
        return await invocation.crash(
            pool, run, f"Failed to submit flow run to infrastructure: {type(exc).__name__}: {exc}"
        )

    try:
        await invocation.client.update_flow_run(run.id, infrastructure_pid=infrastructure_pid)
    except (PrefectUnreachable, PrefectAPIError) as exc:
        # The run is launched; the reconciler resubmits with the same
        # idempotency key, which returns this pid again and records it.
        logger.error("launched, but could not record infrastructure_pid", extra={"error": str(exc)})
    scheduled = run.next_scheduled_start_time or run.expected_start_time
    latency = (invocation.clock() - scheduled).total_seconds() if scheduled is not None else None
    logger.info("submitted flow run", extra={"infrastructure_pid": infrastructure_pid, "latency_seconds": latency})
    return RunResult(
        flow_run_id=run.id, pool=pool.name, outcome=RunOutcome.SUBMITTED,
        infrastructure_pid=infrastructure_pid, latency_seconds=latency,
    )
