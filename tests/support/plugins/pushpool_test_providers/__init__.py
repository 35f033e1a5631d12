"""A provider that launches nothing and records every call, for tests that
count submissions across dispatcher processes. It is found the way any
third-party provider is: through the `pushpool.providers` entry point group
(this folder holds a `.dist-info` beside the package; put it on PYTHONPATH).

Set PUSHPOOL_TEST_RECORD_FILE to the file to append to (one JSON line a call;
O_APPEND keeps lines from concurrent processes whole).
"""

from __future__ import annotations

import json
import os
import socket
from typing import Optional

from dispatcher.models import FlowRun
from providers.base import InfrastructureError, InfrastructureStatus, JobConfiguration, Provider


def _record(entry: dict) -> None:
    path = os.environ["PUSHPOOL_TEST_RECORD_FILE"]
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


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
        _record(
            {
                "call": "submit",
                "flow_run_id": str(flow_run.id),
                "infrastructure_pid": pid,
                "dispatcher_pid": os.getpid(),
                "command": configuration.command,
                "env": configuration.env,
                "labels": configuration.labels,
                "name": configuration.name,
                "configuration": configuration.model_dump(mode="json"),
            }
        )
        return pid

    async def cancel(self, infrastructure_pid: str, configuration: JobConfiguration) -> None:
        _record({"call": "cancel", "infrastructure_pid": infrastructure_pid})

    async def status(self, infrastructure_pid: str, configuration: JobConfiguration) -> InfrastructureStatus:
        return InfrastructureStatus(state="running")
