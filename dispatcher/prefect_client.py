"""A thin async client for the Prefect 3 REST API (httpx + pydantic).

Retries with jittered back-off on connection errors, 429 and 5xx: a Prefect
server on SQLite answers 503 when its database is locked, and after a 5xx the
pooled keep-alive connection is often dead, so transport errors are retried too.
Requests that change state are safe to retry: claims carry a fixed transition id
(see `dispatcher.claims`), and the other writes are idempotent.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Optional, TypeVar
from uuid import UUID

import httpx
from pydantic import BaseModel, TypeAdapter

from dispatcher.logs import get_logger
from dispatcher.models import (
    BlockDocument,
    BlockSchema,
    BlockType,
    Deployment,
    Flow,
    FlowRun,
    OrchestrationResult,
    ScheduledFlowRun,
    State,
    StateProposal,
    Variable,
    WorkPool,
    WorkQueue,
)
from dispatcher.retries import RetryPolicy
from dispatcher.settings import Settings

logger = get_logger(__name__)

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
PAGE_SIZE = 200  # the server's maximum `limit`
M = TypeVar("M", bound=BaseModel)


class PrefectAPIError(Exception):
    """The Prefect API answered with an error (after retries, where retryable)."""

    def __init__(self, method: str, path: str, status_code: int, detail: str):
        self.method, self.path, self.status_code, self.detail = method, path, status_code, detail
        super().__init__(f"Prefect API {method} {path} answered {status_code}: {detail}")


class ObjectNotFound(PrefectAPIError):
    pass


class ObjectAlreadyExists(PrefectAPIError):
    pass


class PrefectUnreachable(Exception):
    """The Prefect API could not be reached (after retries)."""


class ConcurrencyLocked(Exception):
    """A global concurrency limit had no free slot (HTTP 423)."""


def auth_headers(settings: Settings) -> dict[str, str]:
    """Prefect's own rule: Basic with the auth string if set, else Bearer with the key."""
    if settings.api_auth_string is not None:
        token = base64.b64encode(settings.api_auth_string.get_secret_value().encode()).decode()
        return {"Authorization": f"Basic {token}"}
    if settings.api_key is not None:
        return {"Authorization": f"Bearer {settings.api_key.get_secret_value()}"}
    return {}


def _error_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        for key in ("detail", "exception_detail", "exception_message"):
            if body.get(key):
                return str(body[key])[:1000]
    return str(body)[:1000]


class PrefectClient:
    """Use as `async with PrefectClient(settings) as client:`."""

    def __init__(
        self,
        settings: Settings,
        *,
        retry_policy: Optional[RetryPolicy] = None,
        timeout: Optional[httpx.Timeout] = None,
        transport: Optional[httpx.AsyncBaseTransport] = None,
        max_connections: Optional[int] = None,
    ):
        if not settings.api_url:
            raise ValueError(
                "PREFECT_API_URL is not set: point it at your Prefect server's API, "
                "for example http://127.0.0.1:4200/api"
            )
        self.api_url = settings.api_url
        self.retry_policy = retry_policy or RetryPolicy()
        connections = max_connections or settings.max_concurrency + 4
        self._http = httpx.AsyncClient(
            base_url=self.api_url + "/",
            headers={"User-Agent": "pushpool", **auth_headers(settings)},
            timeout=timeout or httpx.Timeout(30.0, connect=5.0),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            transport=transport,
        )

    async def __aenter__(self) -> "PrefectClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---------------------------------------------------------------- transport

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Optional[dict[str, Any]] = None,
        attempts: Optional[int] = None,
    ) -> httpx.Response:
        """Send a request, retrying transient failures; raise on any error answer."""
        path = path.lstrip("/")
        attempts = attempts or self.retry_policy.attempts
        # Retries stop at the deadline too: a server whose database stays locked
        # (SQLite waits up to 60 s a write) must not hold one call for minutes.
        deadline = time.monotonic() + self.retry_policy.deadline_seconds
        for attempt in range(1, attempts + 1):
            last = attempt == attempts or time.monotonic() >= deadline
            try:
                response = await self._http.request(method, path, json=json, params=params)
            except httpx.TransportError as exc:
                if last:
                    raise PrefectUnreachable(
                        f"Prefect API {method} /{path} failed after {attempt} tries: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                delay = self.retry_policy.delay(attempt)
                logger.debug(
                    "retrying Prefect API call after a transport error",
                    extra={"method": method, "path": path, "error": type(exc).__name__, "delay": delay},
                )
                await asyncio.sleep(delay)
                continue

            if response.status_code in RETRYABLE_STATUS and not last:
                delay = self.retry_policy.delay(attempt, _retry_after(response))
                logger.debug(
                    "retrying Prefect API call",
                    extra={"method": method, "path": path, "status": response.status_code, "delay": delay},
                )
                await asyncio.sleep(delay)
                continue
            return self._raise_for_status(method, path, response)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _raise_for_status(method: str, path: str, response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        detail = _error_detail(response)
        status = response.status_code
        if status == 404:
            raise ObjectNotFound(method, "/" + path, status, detail)
        if status == 409:
            raise ObjectAlreadyExists(method, "/" + path, status, detail)
        if status == 423:
            raise ConcurrencyLocked(detail)
        raise PrefectAPIError(method, "/" + path, status, detail)

    async def _get_model(self, path: str, model: type[M], **kwargs: Any) -> M:
        response = await self.request("GET", path, **kwargs)
        return model.model_validate(response.json())

    async def _post_models(self, path: str, model: type[M], body: dict[str, Any]) -> list[M]:
        response = await self.request("POST", path, json=body)
        return TypeAdapter(list[model]).validate_python(response.json())  # type: ignore[valid-type]

    async def _paginate(self, path: str, model: type[M], body: dict[str, Any]) -> list[M]:
        items: list[M] = []
        offset = 0
        while True:
            page = await self._post_models(path, model, {**body, "limit": PAGE_SIZE, "offset": offset})
            items.extend(page)
            if len(page) < PAGE_SIZE:
                return items
            offset += PAGE_SIZE

    # ---------------------------------------------------------------- health

    async def health(self) -> bool:
        try:
            response = await self._http.get("health", timeout=5.0)
        except httpx.TransportError:
            return False
        return response.status_code == 200

    # ---------------------------------------------------------------- work pools

    async def read_work_pool(self, name: str) -> WorkPool:
        return await self._get_model(f"work_pools/{name}", WorkPool)

    async def read_work_pools(self) -> list[WorkPool]:
        return await self._paginate("work_pools/filter", WorkPool, {})

    async def create_work_pool(
        self,
        name: str,
        type: str,
        base_job_template: dict[str, Any],
        *,
        is_paused: bool = False,
        description: Optional[str] = None,
        concurrency_limit: Optional[int] = None,
    ) -> WorkPool:
        body: dict[str, Any] = {
            "name": name,
            "type": type,
            "base_job_template": base_job_template,
            "is_paused": is_paused,
        }
        if description is not None:
            body["description"] = description
        if concurrency_limit is not None:
            body["concurrency_limit"] = concurrency_limit
        response = await self.request("POST", "work_pools/", json=body)
        return WorkPool.model_validate(response.json())

    async def update_work_pool(self, name: str, **fields: Any) -> None:
        await self.request("PATCH", f"work_pools/{name}", json=fields)

    async def delete_work_pool(self, name: str) -> None:
        await self.request("DELETE", f"work_pools/{name}")

    async def read_work_queues(self, pool_name: str) -> list[WorkQueue]:
        return await self._paginate(f"work_pools/{pool_name}/queues/filter", WorkQueue, {})

    async def create_work_queue(
        self, pool_name: str, name: str, *, priority: Optional[int] = None,
        concurrency_limit: Optional[int] = None,
    ) -> WorkQueue:
        body: dict[str, Any] = {"name": name}
        if priority is not None:
            body["priority"] = priority
        if concurrency_limit is not None:
            body["concurrency_limit"] = concurrency_limit
        response = await self.request("POST", f"work_pools/{pool_name}/queues", json=body)
        return WorkQueue.model_validate(response.json())

    async def update_work_queue(self, pool_name: str, queue_name: str, **fields: Any) -> None:
        await self.request("PATCH", f"work_pools/{pool_name}/queues/{queue_name}", json=fields)

    async def get_scheduled_flow_runs(
        self,
        pool_name: str,
        *,
        scheduled_before: datetime,
        scheduled_after: Optional[datetime] = None,
        work_queue_names: Sequence[str] = (),
        limit: int = PAGE_SIZE,
    ) -> list[ScheduledFlowRun]:
        body: dict[str, Any] = {
            "scheduled_before": scheduled_before.isoformat(),
            "limit": limit,
        }
        if scheduled_after is not None:
            body["scheduled_after"] = scheduled_after.isoformat()
        if work_queue_names:
            body["work_queue_names"] = list(work_queue_names)
        return await self._post_models(
            f"work_pools/{pool_name}/get_scheduled_flow_runs", ScheduledFlowRun, body
        )

    async def heartbeat(self, pool_name: str, worker_name: str, interval_seconds: int) -> None:
        """Cosmetic (it marks the pool READY in the UI), so tried once: a busy
        server is better spent on claims."""
        await self.request(
            "POST",
            f"work_pools/{pool_name}/workers/heartbeat",
            json={"name": worker_name, "heartbeat_interval_seconds": interval_seconds},
            attempts=1,
        )

    # ---------------------------------------------------------------- flows, deployments

    async def create_flow(self, name: str) -> Flow:
        response = await self.request("POST", "flows/", json={"name": name})
        return Flow.model_validate(response.json())

    async def read_flow(self, flow_id: UUID) -> Flow:
        return await self._get_model(f"flows/{flow_id}", Flow)

    async def create_deployment(self, **fields: Any) -> Deployment:
        response = await self.request("POST", "deployments/", json=fields)
        return Deployment.model_validate(response.json())

    async def read_deployment(self, deployment_id: UUID) -> Deployment:
        return await self._get_model(f"deployments/{deployment_id}", Deployment)

    async def read_deployment_by_name(self, flow_name: str, deployment_name: str) -> Deployment:
        return await self._get_model(f"deployments/name/{flow_name}/{deployment_name}", Deployment)

    # ---------------------------------------------------------------- flow runs

    async def create_flow_run_from_deployment(self, deployment_id: UUID, **fields: Any) -> FlowRun:
        response = await self.request(
            "POST", f"deployments/{deployment_id}/create_flow_run", json=fields
        )
        return FlowRun.model_validate(response.json())

    async def read_flow_run(self, flow_run_id: UUID) -> FlowRun:
        return await self._get_model(f"flow_runs/{flow_run_id}", FlowRun)

    async def read_flow_runs(self, **filters: Any) -> list[FlowRun]:
        """`POST /flow_runs/filter` with the given top-level filter keys, every page."""
        return await self._paginate("flow_runs/filter", FlowRun, filters)

    async def read_flow_run_states(self, flow_run_id: UUID) -> list[State]:
        response = await self.request("GET", "flow_run_states/", params={"flow_run_id": str(flow_run_id)})
        return TypeAdapter(list[State]).validate_python(response.json())

    async def set_flow_run_state(
        self, flow_run_id: UUID, state: StateProposal, *, force: bool = False
    ) -> OrchestrationResult:
        body = {"state": state.model_dump(mode="json", exclude_none=True), "force": force}
        response = await self.request("POST", f"flow_runs/{flow_run_id}/set_state", json=body)
        return OrchestrationResult.model_validate(response.json())

    async def update_flow_run(self, flow_run_id: UUID, **fields: Any) -> None:
        await self.request("PATCH", f"flow_runs/{flow_run_id}", json=fields)

    async def update_flow_run_labels(self, flow_run_id: UUID, labels: dict[str, str]) -> None:
        await self.request("PATCH", f"flow_runs/{flow_run_id}/labels", json=labels)

    async def delete_flow_run(self, flow_run_id: UUID) -> None:
        await self.request("DELETE", f"flow_runs/{flow_run_id}")

    # ---------------------------------------------------------------- blocks, variables

    async def read_block_document(self, block_document_id: UUID | str) -> BlockDocument:
        return await self._get_model(
            f"block_documents/{block_document_id}", BlockDocument, params={"include_secrets": "true"}
        )

    async def read_block_document_by_name(self, block_type_slug: str, name: str) -> BlockDocument:
        return await self._get_model(
            f"block_types/slug/{block_type_slug}/block_documents/name/{name}",
            BlockDocument,
            params={"include_secrets": "true"},
        )

    async def read_block_type_by_slug(self, slug: str) -> BlockType:
        return await self._get_model(f"block_types/slug/{slug}", BlockType)

    async def read_latest_block_schema(self, block_type_id: UUID) -> BlockSchema:
        schemas = await self._post_models(
            "block_schemas/filter",
            BlockSchema,
            {"block_schemas": {"block_type_id": {"any_": [str(block_type_id)]}}, "limit": 1},
        )
        if not schemas:
            raise ObjectNotFound("POST", "/block_schemas/filter", 404, f"no schema for block type {block_type_id}")
        return schemas[0]

    async def create_block_document(
        self, name: str, block_type_id: UUID, block_schema_id: UUID, data: dict[str, Any]
    ) -> BlockDocument:
        response = await self.request(
            "POST",
            "block_documents/",
            json={
                "name": name,
                "block_type_id": str(block_type_id),
                "block_schema_id": str(block_schema_id),
                "data": data,
            },
        )
        return BlockDocument.model_validate(response.json())

    async def delete_block_document(self, block_document_id: UUID) -> None:
        await self.request("DELETE", f"block_documents/{block_document_id}")

    async def read_variable_by_name(self, name: str) -> Optional[Variable]:
        try:
            return await self._get_model(f"variables/name/{name}", Variable)
        except ObjectNotFound:
            return None

    # ---------------------------------------------------------------- global concurrency limits

    async def ensure_global_concurrency_limit(self, name: str, limit: int) -> None:
        try:
            await self.request("POST", "v2/concurrency_limits/", json={"name": name, "limit": limit})
        except ObjectAlreadyExists:
            pass

    async def acquire_concurrency_lease(
        self, names: Sequence[str], *, slots: int = 1, lease_duration: float = 60
    ) -> UUID:
        """Take `slots` on every named limit, or raise `ConcurrencyLocked` (no wait)."""
        response = await self.request(
            "POST",
            "v2/concurrency_limits/increment-with-lease",
            json={"names": list(names), "slots": slots, "mode": "concurrency", "lease_duration": lease_duration},
        )
        return UUID(response.json()["lease_id"])

    async def release_concurrency_lease(self, lease_id: UUID) -> None:
        await self.request(
            "POST", "v2/concurrency_limits/decrement-with-lease", json={"lease_id": str(lease_id)}
        )


def _retry_after(response: httpx.Response) -> Optional[float]:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
