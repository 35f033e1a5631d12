"""Users deploy to push pools with Prefect's own tools: `flow.deploy()` must work
against the server the `local` extra installs (a FastAPI release in the pinned
range once broke it with a 422 on `workers/filter`)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from tests.support.factories import client_for, make_pool

pytestmark = pytest.mark.integration

DEPLOY = """
from prefect import flow

@flow
def etl():
    pass

print(etl.deploy(name="etl", work_pool_name={pool!r}, image="registry.example/prefect-flows:etl", build=False, push=False))
"""


def test_flow_deploy_to_a_push_pool(prefect_server, api_env, unique_name, tmp_path):
    async def setup():
        async with client_for(prefect_server.api_url) as client:
            await make_pool(client, unique_name, "ecs:push")

    asyncio.run(setup())
    script = tmp_path / "etl.py"  # Prefect deploys flows defined in files only
    script.write_text(DEPLOY.format(pool=unique_name))
    result = subprocess.run(
        [sys.executable, str(script)],
        env=api_env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    async def read():
        async with client_for(prefect_server.api_url) as client:
            return await client.read_deployment_by_name("etl", "etl")

    deployment = asyncio.run(read())
    assert deployment.work_pool_name == unique_name
    assert deployment.job_variables.get("image") == "registry.example/prefect-flows:etl"
