"""Pydantic models of the Prefect REST API objects the dispatcher reads and writes.

Only the fields pushpool uses are declared; everything else the server sends is
ignored, so a newer server with more fields keeps working.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, Optional
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field


class APIModel(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class StateType(str, enum.Enum):
    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"
    PAUSED = "PAUSED"
    CANCELLING = "CANCELLING"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATE_TYPES


TERMINAL_STATE_TYPES = frozenset(
    {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}
)


class StateDetails(APIModel):
    flow_run_id: Optional[UUID] = None
    scheduled_time: Optional[datetime] = None
    transition_id: Optional[UUID] = None
    pause_reschedule: bool = False


class State(APIModel):
    id: Optional[UUID] = None
    type: StateType
    name: Optional[str] = None
    timestamp: Optional[datetime] = None
    message: Optional[str] = None
    state_details: StateDetails = Field(default_factory=StateDetails)


class StateProposal(APIModel):
    """The body of `POST /flow_runs/{id}/set_state`'s `state`."""

    type: StateType
    name: Optional[str] = None
    message: Optional[str] = None
    state_details: dict[str, Any] = Field(default_factory=dict)


class OrchestrationStatus(str, enum.Enum):
    ACCEPT = "ACCEPT"
    REJECT = "REJECT"
    ABORT = "ABORT"
    WAIT = "WAIT"


class OrchestrationDetails(APIModel):
    type: Optional[str] = None
    reason: Optional[str] = None
    delay_seconds: Optional[float] = None


class OrchestrationResult(APIModel):
    status: OrchestrationStatus
    state: Optional[State] = None
    details: OrchestrationDetails = Field(default_factory=OrchestrationDetails)


class WorkPool(APIModel):
    id: UUID
    name: str
    type: str
    description: Optional[str] = None
    is_paused: bool = False
    concurrency_limit: Optional[int] = None
    base_job_template: dict[str, Any] = Field(default_factory=dict)
    default_queue_id: Optional[UUID] = None
    status: Optional[str] = None

    @property
    def is_push(self) -> bool:
        return self.type.endswith(":push")


class WorkQueue(APIModel):
    id: UUID
    name: str
    priority: int = 1
    concurrency_limit: Optional[int] = None
    is_paused: bool = False
    work_pool_id: Optional[UUID] = None


class Flow(APIModel):
    id: UUID
    name: str
    labels: dict[str, Any] = Field(default_factory=dict)


class Deployment(APIModel):
    id: UUID
    name: str
    flow_id: UUID
    updated: Optional[datetime] = None
    work_pool_name: Optional[str] = None
    work_queue_name: Optional[str] = None
    job_variables: dict[str, Any] = Field(default_factory=dict)
    parameters: dict[str, Any] = Field(default_factory=dict)
    entrypoint: Optional[str] = None
    path: Optional[str] = None
    pull_steps: Optional[list[dict[str, Any]]] = None
    paused: bool = False


class FlowRun(APIModel):
    id: UUID
    name: str
    flow_id: UUID
    deployment_id: Optional[UUID] = None
    work_queue_id: Optional[UUID] = None
    work_queue_name: Optional[str] = None
    work_pool_id: Optional[UUID] = None
    work_pool_name: Optional[str] = None
    state_type: Optional[StateType] = None
    state_name: Optional[str] = None
    state: Optional[State] = None
    created: Optional[datetime] = None
    expected_start_time: Optional[datetime] = None
    next_scheduled_start_time: Optional[datetime] = None
    start_time: Optional[datetime] = None
    end_time: Optional[datetime] = None
    infrastructure_pid: Optional[str] = None
    job_variables: Optional[dict[str, Any]] = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    labels: dict[str, Any] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    run_count: int = 0

    @property
    def current_state_type(self) -> Optional[StateType]:
        """`state` is null in poll results; `state_type` is always there."""
        if self.state is not None:
            return self.state.type
        return self.state_type


class ScheduledFlowRun(APIModel):
    """One item of `POST /work_pools/{name}/get_scheduled_flow_runs`."""

    work_pool_id: UUID
    work_queue_id: UUID
    flow_run: FlowRun


class BlockType(APIModel):
    id: UUID
    name: str
    slug: str


class BlockSchema(APIModel):
    id: UUID
    checksum: str
    fields: dict[str, Any] = Field(default_factory=dict)
    version: Optional[str] = None


class BlockDocument(APIModel):
    id: UUID
    name: Optional[str] = None
    data: dict[str, Any] = Field(default_factory=dict)
    block_type_id: Optional[UUID] = None
    block_schema_id: Optional[UUID] = None
    block_type_name: Optional[str] = None
    block_schema: Optional[BlockSchema] = None

    @property
    def secret_fields(self) -> Optional[list[str]]:
        """The schema's secret field paths (`a`, `a.b`, `a.*`), if the server sent the schema."""
        if self.block_schema is None or "secret_fields" not in self.block_schema.fields:
            return None
        return list(self.block_schema.fields["secret_fields"])


class Variable(APIModel):
    id: Optional[UUID] = None
    name: str
    value: Any = None
