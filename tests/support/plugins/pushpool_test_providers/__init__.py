"""A provider that launches nothing and records every call, for tests that
count submissions across dispatcher processes. It is found the way any
third-party provider is: through the `pushpool.providers` entry point group
(this folder holds a `.dist-info` beside the package; put it on PYTHONPATH).

Set PUSHPOOL_TEST_RECORD_FILE to the file to append to (one JSON line a call;
O_APPEND keeps lines from concurrent processes whole).

Like every provider, `submit` is idempotent by `idempotency_key(flow_run)`: a
second submit of the same claim (a reconciler resubmitting a run whose pid
write was slow or lost) launches nothing, returns the first pid and is
recorded as `"call": "resubmit"`. So the count of `submit` lines is the count
of launches, and a dispatcher that launched a claim twice would show it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from typing import Any, Optional

from dispatcher.models import FlowRun
from providers.base import InfrastructureError, InfrastructureStatus, JobConfiguration, Provider, idempotency_key


def _record(entry: dict[str, Any], *, launch_key: Optional[str] = None) -> dict[str, Any]:
    """Append one line. With `launch_key`, under an exclusive lock on the file
    (so concurrent processes agree): if a launch with that key is already
    recorded, record a resubmit instead and return the first launch's entry."""
    path = os.environ["PUSHPOOL_TEST_RECORD_FILE"]
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if launch_key is not None:
            with open(path) as existing:
                for line in existing:
                    earlier = json.loads(line) if launch_key in line else {}
                    if earlier.get("call") == "submit" and earlier.get("idempotency_key") == launch_key:
                        entry = {**entry, "call": "resubmit", "infrastructure_pid": earlier["infrastructure_pid"]}
                        os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
                        return earlier
        os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
        return entry
    finally:
        os.close(fd)  # releases the lock


class RecordingJobConfiguration(JobConfiguration):
    memory: Optional[int] = None


class RecordingProvider(Provider):
    push_types = ("recording:push",)
    template_file = "recording.json"
    configuration_model = RecordingJobConfiguration

    async def submit(self, configuration: JobConfiguration, flow_run: FlowRun) -> str:
        if configuration.env.get("PUSHPOOL_TEST_FAIL"):
            raise InfrastructureError(configuration.env["PUSHPOOL_TEST_FAIL"])
        pid = f"{socket.gethostname()}:{os.getpid()}:{flow_run.id}"
        key = idempotency_key(flow_run)
        launched = _record(
            {
                "call": "submit",
                "idempotency_key": key,
                "flow_run_id": str(flow_run.id),
                "infrastructure_pid": pid,
                "dispatcher_pid": os.getpid(),
                "command": configuration.command,
                "env": configuration.env,
                "labels": configuration.labels,
                "name": configuration.name,
                "configuration": configuration.model_dump(mode="json"),
            },
            launch_key=key,
        )
        return launched["infrastructure_pid"]

    async def cancel(self, infrastructure_pid: str, configuration: JobConfiguration) -> None:
        _record({"call": "cancel", "infrastructure_pid": infrastructure_pid})

    async def status(self, infrastructure_pid: str, configuration: JobConfiguration) -> InfrastructureStatus:
        return InfrastructureStatus(state="running")
