"""moto in server mode on a free loopback port: a real HTTP AWS emulator the
real boto3 talks to (never a patched SDK)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

REGION = "us-east-1"
ACCOUNT_ID = "123456789012"


@dataclass
class MotoServer:
    endpoint_url: str
    region: str = REGION

    def client(self, service: str):
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def reset(self) -> None:
        httpx.post(f"{self.endpoint_url}/moto-api/reset").raise_for_status()

    def freeze_ecs_tasks(self, times: int = 1000) -> None:
        """Keep tasks RUNNING: by default each DescribeTasks call advances them."""
        httpx.post(
            f"{self.endpoint_url}/moto-api/state-manager/set-transition",
            json={"model_name": "ecs::task", "transition": {"progression": "manual", "times": times}},
        ).raise_for_status()


@contextmanager
def run_moto_server() -> Iterator[MotoServer]:
    os.environ.setdefault("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield MotoServer(endpoint_url=f"http://{host}:{port}")
    finally:
        server.stop()
