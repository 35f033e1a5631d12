"""Cancellation that reaches the infrastructure.

A run moved to CANCELLING has its infrastructure stopped through its pool's
provider, then is marked CANCELLED; a run with no infrastructure yet is marked
CANCELLED directly. Prefect's server skips infrastructure cleanup for `:push`
pools (after 300 s it just marks a CANCELLING run Cancelled, "cancellation
timed out"), so that cleanup is ours too: `stop_after_cancellation_timeout`.
"""

from __future__ import annotations

from dispatcher.invocation import Invocation, RunOutcome, RunResult
from dispatcher.logs import get_logger
from dispatcher.models import FlowRun, StateType, WorkPool
from dispatcher.prefect_client import ObjectNotFound, PrefectAPIError, PrefectUnreachable
from dispatcher.templating import TemplateError
from providers.base import InfrastructureError

logger = get_logger(__name__)

#: set on a run once its infrastructure was stopped after the server timed out its cancellation
INFRASTRUCTURE_STOPPED_LABEL = "pushpool.io/infrastructure-stopped"
#: the message Prefect's server gives a run whose CANCELLING state timed out
CANCELLATION_TIMED_OUT_TEXT = "cancellation timed out"


async def cancel_flow_run(invocation: Invocation, pool: WorkPool, run: FlowRun) -> RunResult:
    """Stop a CANCELLING run's infrastructure, then mark it CANCELLED."""
    if run.current_state_type != StateType.CANCELLING:
        return RunResult(flow_run_id=run.id, pool=pool.name, outcome=RunOutcome.SKIPPED, reason="not cancelling")
    if not run.infrastructure_pid:
        return await invocation.mark_cancelled(
            pool, run, "Cancelled by pushpool: the run had no infrastructure to stop."
        )
    stopped = await _stop_infrastructure(invocation, pool, run)
    if stopped is None:
        # A failure worth retrying (cloud or API unreachable): stay CANCELLING;
        # the reconciler tries again at the next tick.
        return RunResult(
            flow_run_id=run.id, pool=pool.name, outcome=RunOutcome.SKIPPED,
            reason="infrastructure not stopped yet; will retry",
        )
    return await invocation.mark_cancelled(pool, run, stopped)


async def stop_after_cancellation_timeout(invocation: Invocation, pool: WorkPool, run: FlowRun) -> RunResult | None:
    """A run the server marked Cancelled because its cancellation timed out
    still has its infrastructure: stop it, once."""
    state = run.state
    if (
        state is None
        or state.type != StateType.CANCELLED
        or not run.infrastructure_pid
        or CANCELLATION_TIMED_OUT_TEXT not in (state.message or "")
        or run.labels.get(INFRASTRUCTURE_STOPPED_LABEL)
    ):
        return None
    stopped = await _stop_infrastructure(invocation, pool, run)
    if stopped is None:
        return None
    try:
        await invocation.client.update_flow_run_labels(run.id, {INFRASTRUCTURE_STOPPED_LABEL: "true"})
    except (PrefectUnreachable, PrefectAPIError) as exc:
        logger.warning("could not label the run; its infrastructure may be stopped again", extra={"error": str(exc)})
    logger.info("stopped the infrastructure of a run whose cancellation had timed out")
    return RunResult(
        flow_run_id=run.id, pool=pool.name, outcome=RunOutcome.CANCELLED,
        infrastructure_pid=run.infrastructure_pid, reason=stopped,
    )


async def _stop_infrastructure(invocation: Invocation, pool: WorkPool, run: FlowRun) -> str | None:
    """Stop the run's infrastructure. The CANCELLED message to use, or None
    when stopping failed in a way worth retrying."""
    pid = run.infrastructure_pid or ""
    try:
        configuration = await invocation.job_configuration(pool, run)
        await invocation.provider(pool).cancel(pid, configuration)
    except (TemplateError, ObjectNotFound) as exc:
        # The configuration cannot be built (a block was deleted, the template
        # changed): the infrastructure cannot be reached, and never will be.
        detail = exc.detail if isinstance(exc, ObjectNotFound) else str(exc)
        logger.error("cannot stop the run's infrastructure", extra={"error": invocation.reason(detail)})
        return (
            f"Cancelled, but its infrastructure {pid} could not be stopped because its job configuration "
            f"could not be built ({detail}): stop it by hand."
        )
    except (InfrastructureError, PrefectUnreachable, PrefectAPIError) as exc:
        logger.error("could not stop the run's infrastructure; will retry", extra={"error": invocation.reason(str(exc))})
        return None
    logger.info("stopped the run's infrastructure", extra={"infrastructure_pid": pid})
    return f"Cancelled by pushpool: stopped its infrastructure {pid}."
