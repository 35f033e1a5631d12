"""A real Prefect server for tests: the embedded server the quickstart uses
(the `prefect` package, SQLite in a temp dir, a free port, analytics off),
with the UI off and retryable database errors logged."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from dispatcher.embedded_server import EmbeddedServer, free_port, start_embedded_server

PrefectServer = EmbeddedServer
__all__ = ["PrefectServer", "free_port", "start_prefect_server"]


def start_prefect_server(home: Path, *, extra_env: Optional[dict[str, str]] = None, timeout: float = 120) -> EmbeddedServer:
    env = {"PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true", **(extra_env or {})}
    return start_embedded_server(home, extra_env=env, timeout=timeout)
