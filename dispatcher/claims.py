"""How a dispatcher takes ownership of a flow run: the claim.

The claim is the SCHEDULED → PENDING transition. The server serialises
`set_state` per run, so of many dispatchers proposing PENDING at once exactly
one is ACCEPTed; every other answer means someone else owns the run.

Two details make the claim safe to retry and to verify:
- the proposal carries a fixed `transition_id`, so when an answer is lost and
  the request is retried, the server recognises the duplicate and answers with
  the current state — whose `transition_id` is ours if the first try committed;
- the PENDING state's message carries this invocation's claim token, so anyone
  reading the run later can tell which dispatcher invocation claimed it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Optional
from uuid import UUID, uuid4

from dispatcher.logs import get_logger
from dispatcher.models import FlowRun, OrchestrationStatus, State, StateProposal, StateType
from dispatcher.prefect_client import (
    ConcurrencyLocked,
    PrefectAPIError,
    PrefectClient,
    PrefectUnreachable,
)

logger = get_logger(__name__)

CLAIM_STATE_NAME = "Pending"  # exactly this: PENDING→PENDING with another name would be let through


def claim_message(dispatcher_name: str, claim_token: str) -> str:
    return f"Claimed by {dispatcher_name} (pushpool claim {claim_token})"


def is_our_claim(state: State | None, transition_id: UUID) -> bool:
    return (
        state is not None
        and state.type == StateType.PENDING
        and state.state_details.transition_id == transition_id
    )


async def claim(
    client: PrefectClient, flow_run: FlowRun, *, dispatcher_name: str, claim_token: str
) -> Optional[State]:
    """Propose PENDING; the PENDING state (the claim) if this invocation now owns the run, else None."""
    transition_id = uuid4()
    proposal = StateProposal(
        type=StateType.PENDING,
        name=CLAIM_STATE_NAME,
        message=claim_message(dispatcher_name, claim_token),
        state_details={"transition_id": str(transition_id)},
    )
    try:
        result = await client.set_flow_run_state(flow_run.id, proposal)
    except (PrefectUnreachable, PrefectAPIError) as exc:
        # The client already retried with the same transition id. Read the run
        # back to learn whether one of those tries committed.
        logger.warning("claim answer lost; reading the run back", extra={"error": str(exc)})
        try:
            current = await client.read_flow_run(flow_run.id)
        except (PrefectUnreachable, PrefectAPIError):
            logger.error(
                "could not claim or read back the run; the reconciler will settle it if the claim committed"
            )
            return None
        return current.state if is_our_claim(current.state, transition_id) else None

    if result.status == OrchestrationStatus.ACCEPT and result.state is not None:
        return result.state
    if is_our_claim(result.state, transition_id):
        return result.state  # a retried proposal whose first try had committed
    logger.debug(
        "not claimed: another dispatcher or worker owns the run",
        extra={"status": result.status.value, "reason": result.details.reason or ""},
    )
    return None


def claim_lock_name(pool_name: str) -> str:
    return f"pushpool-claims-{pool_name}"


class PoolBusy(Exception):
    """Another dispatcher holds the pool's claim lock for longer than we wait."""


@asynccontextmanager
async def pool_claim_lock(
    client: PrefectClient, pool_name: str, *, wait_seconds: float = 15.0, lease_seconds: float = 60.0
) -> AsyncIterator[None]:
    """Serialise "read due runs, claim them" across dispatchers for one pool.

    Prefect applies pool and queue concurrency limits only when runs are read,
    so two dispatchers reading at once could both claim the last free slot. A
    global concurrency limit of 1 per pool, taken with a lease, makes the read
    and the claims of one dispatcher finish before the next one reads. The
    lease expires by itself (after `lease_seconds`) if a dispatcher dies
    holding it. Only pools with a concurrency limit (on the pool or a queue)
    pay for this.
    """
    name = claim_lock_name(pool_name)
    await client.ensure_global_concurrency_limit(name, 1)
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            lease_id = await client.acquire_concurrency_lease([name], lease_duration=lease_seconds)
            break
        except ConcurrencyLocked:
            if time.monotonic() >= deadline:
                raise PoolBusy(f"pool {pool_name!r} is being claimed by another dispatcher") from None
            await asyncio.sleep(random.uniform(0.05, 0.25))
    try:
        yield
    finally:
        try:
            await client.release_concurrency_lease(lease_id)
        except (PrefectUnreachable, PrefectAPIError) as exc:
            logger.warning("could not release the pool claim lock; it expires by itself", extra={"error": str(exc)})
