"""An embedded Prefect server for the quickstart (and the tests): `prefect
server start` from the `local` extra, SQLite under a home directory of its own,
a free port on loopback, analytics off. Started as a subprocess, so the
dispatcher itself still never imports `prefect`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional

import httpx


class EmbeddedServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_environment(prefect_home: Path, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The server's environment: ours without any PREFECT_/PUSHPOOL_ setting that
    could point it elsewhere, plus its own home and quiet defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PUSHPOOL_"))}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    env.update(extra or {})
    return env


@dataclass
class EmbeddedServer:
    api_url: str
    home: Path
    process: subprocess.Popen
    log_path: Path

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> "EmbeddedServer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_embedded_server(
    home: Path,
    *,
    extra_env: Optional[Mapping[str, str]] = None,
    timeout: float = 120,
    python: str = sys.executable,
) -> EmbeddedServer:
    """Start a Prefect server and wait until `/api/health` answers (the first
    start takes ~20 s: database migrations and block registration)."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = home / "server.log"
    log: IO[bytes] = open(log_path, "wb")
    try:
        process = subprocess.Popen(
            [python, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_environment(home, extra_env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()
    server = EmbeddedServer(api_url=f"http://127.0.0.1:{port}/api", home=home, process=process, log_path=log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            if "No module named prefect" in tail:
                raise EmbeddedServerError(
                    "The embedded Prefect server needs the `local` extra: pip install 'pushpool[local]'"
                )
            raise EmbeddedServerError(f"The Prefect server exited with code {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{server.api_url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise EmbeddedServerError(
        f"The Prefect server did not become healthy within {timeout:.0f} s; see {log_path}"
    )
