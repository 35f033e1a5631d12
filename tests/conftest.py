from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# In CI the property tests draw the same examples every run, so a red build can
# be reproduced (and a green one is not luck); locally they explore afresh.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

from tests.support.prefect_server import PrefectServer, start_prefect_server

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """One real Prefect server for the whole test session."""
    server = start_prefect_server(tmp_path_factory.mktemp("prefect-home"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def api_env(prefect_server: PrefectServer, tmp_path: Path) -> dict[str, str]:
    """Environment for a dispatcher process talking to the test server."""
    from tests.support.factories import pushpool_process_env

    return pushpool_process_env(prefect_server.api_url, tmp_path)


@pytest.fixture
def unique_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def record_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the test-only `recording:push` provider writes its calls, for
    in-process and subprocess dispatchers; also puts the provider on the path."""
    from tests.support.factories import PLUGINS

    path = tmp_path / "record.jsonl"
    monkeypatch.setenv("PUSHPOOL_TEST_RECORD_FILE", str(path))
    monkeypatch.syspath_prepend(str(PLUGINS))
    return path


@pytest.fixture(scope="session")
def moto_server():
    """One moto server (AWS emulator, HTTP on loopback) for the test session."""
    from tests.support.moto_server import run_moto_server

    with run_moto_server() as server:
        yield server
