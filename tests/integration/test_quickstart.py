"""`pushpool quickstart` end to end: deploy → run → dispatch → COMPLETED, with a
real flow executed by the process:push provider and no worker."""

from __future__ import annotations

import re

import pytest

from tests.support.factories import run_pushpool

pytestmark = pytest.mark.integration


def assert_completed_with_timeline(output: str) -> None:
    assert "Completed" in output, output
    for state in ("created (scheduled)", "pending", "running", "completed"):
        assert re.search(rf"{re.escape(state)}\s.*\d+\.\d\d", output), f"no {state!r} row in:\n{output}"


def test_quickstart_against_a_running_server(api_env):
    result = run_pushpool(api_env, "quickstart", "--timeout", "120", timeout=180)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert_completed_with_timeline(result.stdout)


def test_quickstart_on_a_fresh_machine_starts_its_own_server(api_env, tmp_path):
    env = {k: v for k, v in api_env.items() if k != "PREFECT_API_URL"}
    env["PUSHPOOL_HOME"] = str(tmp_path / "fresh-home")
    result = run_pushpool(env, "quickstart", timeout=240)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "Embedded Prefect server at http://127.0.0.1:" in result.stdout
    assert_completed_with_timeline(result.stdout)
    assert (tmp_path / "fresh-home" / "quickstart" / "prefect-home").is_dir()
