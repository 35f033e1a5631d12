"""Jittered exponential back-off, shared by the Prefect client and the providers."""

from __future__ import annotations

import random

from pydantic import BaseModel, Field


class RetryPolicy(BaseModel):
    attempts: int = Field(8, ge=1, description="total tries, the first one included")
    base_delay: float = Field(0.1, ge=0)
    max_delay: float = Field(5.0, ge=0)
    deadline_seconds: float = Field(
        90.0, gt=0, description="no retry starts after this long from the first try (bounds one call's time)"
    )

    def delay(self, retry_number: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry `retry_number` (1 = the first retry).

        "Full jitter": uniform in [0, min(max, base * 2^n)], so many dispatchers
        retrying at once spread out instead of hammering in step. A server's
        `Retry-After` is honoured, capped at `max_delay` so an invocation's time
        stays bounded.
        """
        ceiling = min(self.max_delay, self.base_delay * (2 ** (retry_number - 1)))
        delay = random.uniform(0, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_delay))
        return delay
