"""The Prefect event, as the server's event stream and its automations'
webhooks deliver it: `{"id", "event", "occurred", "resource", "related", "payload"}`,
where resources are Prefect's label dictionaries (`prefect.resource.id`,
`prefect.resource.role`, ...)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

FLOW_RUN_PREFIX = "prefect.flow-run."
WORK_POOL_PREFIX = "prefect.work-pool."


class Event(BaseModel):
    """One Prefect event as the websocket delivers it. Resources are Prefect's
    label dictionaries (`prefect.resource.id`, `prefect.resource.role`, ...)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: UUID
    event: str
    occurred: datetime
    received: Optional[datetime] = None
    follows: Optional[UUID] = None
    resource: dict[str, Any]
    related: list[dict[str, Any]] = Field(default_factory=list)
    payload: dict[str, Any] = Field(default_factory=dict)

    @property
    def resource_id(self) -> str:
        return str(self.resource.get("prefect.resource.id", ""))

    @property
    def resource_name(self) -> Optional[str]:
        return self.resource.get("prefect.resource.name")

    @property
    def flow_run_id(self) -> Optional[UUID]:
        """The flow run this event is about (resource `prefect.flow-run.<uuid>`)."""
        return _uuid_suffix(self.resource_id, FLOW_RUN_PREFIX)

    @property
    def state_type(self) -> Optional[str]:
        """For flow-run state events: `SCHEDULED`, `CANCELLING`, ..."""
        return self.resource.get("prefect.state-type")

    def related_resources(self, role: str) -> list[dict[str, Any]]:
        return [r for r in self.related if r.get("prefect.resource.role") == role]

    def related_resource(self, role: str) -> Optional[dict[str, Any]]:
        """The first related resource in `role` (`work-pool`, `deployment`, `flow`,
        `work-queue`, ...), e.g. `{"prefect.resource.id": "prefect.work-pool.<id>",
        "prefect.resource.role": "work-pool", "prefect.resource.name": "my-pool",
        "prefect.work-pool.type": "ecs:push"}`."""
        found = self.related_resources(role)
        return found[0] if found else None

    def resource_ids(self) -> set[str]:
        """The ids of the event's resource and of every related resource."""
        ids = {self.resource_id}
        ids.update(str(r.get("prefect.resource.id", "")) for r in self.related)
        return ids

    @property
    def work_pool_id(self) -> Optional[UUID]:
        pool = self.related_resource("work-pool")
        return _uuid_suffix(str(pool.get("prefect.resource.id", "")), WORK_POOL_PREFIX) if pool else None

    @property
    def work_pool_name(self) -> Optional[str]:
        pool = self.related_resource("work-pool")
        return pool.get("prefect.resource.name") if pool else None

    @property
    def work_pool_type(self) -> Optional[str]:
        pool = self.related_resource("work-pool")
        return pool.get("prefect.work-pool.type") if pool else None


def _uuid_suffix(resource_id: str, prefix: str) -> Optional[UUID]:
    if not resource_id.startswith(prefix):
        return None
    try:
        return UUID(resource_id[len(prefix):])
    except ValueError:
        return None
