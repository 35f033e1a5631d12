"""What a backend implements to run flow runs of a push work pool.

A provider is to the dispatcher what a transport is to httpx: the dispatcher
claims a run and builds its job configuration; the provider only launches,
stops and inspects infrastructure. A new backend is one module with a
`Provider` subclass and its default base job template (a JSON file in
`providers/templates/`), registered by push type.
"""

from __future__ import annotations

import json
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dispatcher.models import FlowRun, StateType


#: The reconciler's count of a run's resubmissions, a label on the run it
#: passes to `submit`: only a resubmission can find a launch of the same claim
#: that has already finished (a fresh claim has never been launched).
RESUBMISSIONS_LABEL = "pushpool.io/resubmissions"


def is_resubmission(flow_run: FlowRun) -> bool:
    return str(flow_run.labels.get(RESUBMISSIONS_LABEL) or "0") not in ("", "0")


def claim_key(flow_run: FlowRun) -> Optional[str]:
    """Which claim of the run a launch is for: its PENDING state's id (12 hex
    digits), or None when the run is not held in a claim."""
    state = flow_run.state
    if state is None or state.type != StateType.PENDING or state.id is None:
        return None
    return state.id.hex[:12]


def idempotency_key(flow_run: FlowRun) -> str:
    """The flow run id and its claim (≤ 64 characters): a resubmission of the
    same claim is the same launch; a run Prefect gave back and that is claimed
    again is launched anew."""
    key = claim_key(flow_run)
    return f"{flow_run.id}-{key}" if key else str(flow_run.id)


class JobConfiguration(BaseModel):
    """The rendered job configuration of one flow run, with the fields every
    Prefect worker's configuration has. Providers subclass it with their own
    fields (the keys of their template's `job_configuration`); unknown keys are
    ignored, as Prefect's workers ignore them."""

    model_config = ConfigDict(extra="ignore")

    command: Optional[str] = None
    env: dict[str, Optional[str]] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    name: Optional[str] = None

    @field_validator("command", mode="before")
    @classmethod
    def _empty_command_is_unset(cls, value: Any) -> Any:
        return value or None

    @field_validator("env", mode="before")
    @classmethod
    def _env_values_are_strings(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: None if v is None else str(v) for k, v in value.items()}
        return value


class InfrastructureStatus(BaseModel):
    """What a provider can tell about infrastructure it launched."""

    state: Literal["running", "exited", "missing"]
    exit_code: Optional[int] = None
    reason: Optional[str] = Field(None, description="why it exited, in words a person can act on")


class InfrastructureError(Exception):
    """A launch, stop or status call failed for a reason the user can act on
    ("image not found", "cluster prefect-ecs-cluster does not exist"). The
    message becomes the flow run's CRASHED state message, so it must not
    contain credential values."""


class Provider(ABC):
    """One backend. Instances are cheap; the dispatcher makes one per invocation."""

    #: the work pool types this provider serves, e.g. ("ecs:push",)
    push_types: ClassVar[tuple[str, ...]]
    #: the default base job template: a JSON file in `templates/` beside the provider's module
    template_file: ClassVar[str]
    #: the model the rendered job configuration is validated into
    configuration_model: ClassVar[type[JobConfiguration]] = JobConfiguration
    #: the command a run gets when its configuration sets none (Prefect's worker default)
    default_command: ClassVar[str] = "prefect flow-run execute"
    #: how long before a run is due to launch it when PUSHPOOL_PREFETCH_SECONDS is not set:
    #: about the time this backend takes to start a container. Prefect holds a run that
    #: starts early until its scheduled time, so launching early costs only idle seconds.
    default_prefetch_seconds: ClassVar[float] = 10.0

    @classmethod
    def default_base_job_template(cls) -> dict[str, Any]:
        module_file = sys.modules[cls.__module__].__file__
        if module_file is None:  # pragma: no cover - namespace modules have no file
            raise FileNotFoundError(f"cannot locate the templates of {cls.__qualname__}")
        return json.loads((Path(module_file).parent / "templates" / cls.template_file).read_text())

    @abstractmethod
    async def submit(self, configuration: JobConfiguration, flow_run: FlowRun) -> str:
        """Launch the flow run; return its `infrastructure_pid`.

        Must be idempotent, keyed by `idempotency_key(flow_run)`: calling it
        again for a claim already launched returns the same pid and launches
        nothing (a run given back and claimed anew is a new key). Raise
        `InfrastructureError` for failures a person can act on.
        """

    @abstractmethod
    async def cancel(self, infrastructure_pid: str, configuration: JobConfiguration) -> None:
        """Stop the infrastructure. Stopping what is already gone is not an error."""

    @abstractmethod
    async def status(self, infrastructure_pid: str, configuration: JobConfiguration) -> InfrastructureStatus:
        """Whether the infrastructure is running, has exited (and how), or is missing."""

    async def statuses(
        self, infrastructures: list[tuple[str, JobConfiguration]]
    ) -> list[InfrastructureStatus | InfrastructureError]:
        """`status` of many (infrastructure_pid, configuration) pairs, in order,
        each an `InfrastructureStatus` or the `InfrastructureError` that
        prevented it. The reconciler asks once per pool and tick; a backend
        that can describe many at once (ECS: 100 tasks a call) overrides this."""
        results: list[InfrastructureStatus | InfrastructureError] = []
        for pid, configuration in infrastructures:
            try:
                results.append(await self.status(pid, configuration))
            except InfrastructureError as exc:
                results.append(exc)
        return results
