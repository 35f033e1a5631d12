"""`pushpool work-pool …` and `pushpool dispatch --once`, as a user runs them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from providers.registry import ProviderRegistry
from tests.support.factories import client_for, dispatcher_env, make_deployment, make_runs, run_pushpool

pytestmark = pytest.mark.integration


def read_pool(api_url: str, name: str):
    async def read():
        async with client_for(api_url) as client:
            return await client.read_work_pool(name)

    return asyncio.run(read())


def test_get_default_base_job_template_prints_the_providers_template(api_env, tmp_path):
    result = run_pushpool(api_env, "work-pool", "get-default-base-job-template", "--type", "process:push")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ProviderRegistry().provider_class("process:push").default_base_job_template()

    out = tmp_path / "template.json"
    result = run_pushpool(api_env, "work-pool", "get-default-base-job-template", "-t", "process:push", "--file", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text()) == json.loads(
        run_pushpool(api_env, "work-pool", "get-default-base-job-template", "--type", "process:push").stdout
    )


def test_an_unknown_type_is_refused_with_the_known_types(api_env, unique_name):
    result = run_pushpool(api_env, "work-pool", "create", unique_name, "--type", "kubernetes:push")
    assert result.returncode == 1
    assert "Unknown work pool type 'kubernetes:push'" in result.stderr
    assert "process:push" in result.stderr


def test_create_then_refuse_a_duplicate_then_overwrite(prefect_server, api_env, unique_name):
    result = run_pushpool(api_env, "work-pool", "create", unique_name, "--type", "process:push")
    assert result.returncode == 0, result.stderr
    assert f"Created work pool '{unique_name}'" in result.stdout
    pool = read_pool(prefect_server.api_url, unique_name)
    assert pool.type == "process:push" and not pool.is_paused
    assert pool.base_job_template == ProviderRegistry().provider_class("process:push").default_base_job_template()

    result = run_pushpool(api_env, "work-pool", "create", unique_name, "--type", "process:push")
    assert result.returncode == 1
    assert "already exists. Use --overwrite to update it." in result.stderr

    result = run_pushpool(api_env, "work-pool", "create", unique_name, "--type", "process:push", "--overwrite", "--paused")
    assert result.returncode == 0, result.stderr
    assert read_pool(prefect_server.api_url, unique_name).is_paused


def test_create_with_a_template_file_and_provision_infra_notice(prefect_server, api_env, unique_name, tmp_path):
    template = ProviderRegistry().provider_class("process:push").default_base_job_template()
    template["variables"]["properties"]["env"]["default"] = {"FROM_FILE": "yes"}
    path = tmp_path / "template.json"
    path.write_text(json.dumps(template))
    result = run_pushpool(
        api_env, "work-pool", "create", unique_name, "--type", "process:push",
        "--base-job-template", str(path), "--provision-infra",
    )
    assert result.returncode == 0, result.stderr
    assert "provisioning is not available for 'process:push'" in " ".join(result.stdout.split())
    assert read_pool(prefect_server.api_url, unique_name).base_job_template == template


def test_a_malformed_template_file_is_a_clear_error(api_env, unique_name, tmp_path):
    path = tmp_path / "template.json"
    path.write_text("{not json")
    result = run_pushpool(
        api_env, "work-pool", "create", unique_name, "--type", "process:push", "--base-job-template", str(path)
    )
    assert result.returncode == 1
    assert "is not valid JSON" in result.stderr


def test_no_api_url_is_a_clear_error(api_env, unique_name):
    env = {k: v for k, v in api_env.items() if k != "PREFECT_API_URL"}
    result = run_pushpool(env, "work-pool", "create", unique_name, "--type", "process:push")
    assert result.returncode == 1
    assert "PREFECT_API_URL is not set" in result.stderr


def test_dispatch_once_prints_a_summary(prefect_server, api_env, unique_name, tmp_path):
    record = tmp_path / "record.jsonl"
    env = dispatcher_env(api_env, record)
    assert run_pushpool(env, "work-pool", "create", unique_name, "--type", "recording:push").returncode == 0

    async def setup():
        async with client_for(prefect_server.api_url) as client:
            deployment = await make_deployment(client, unique_name)
            await make_runs(client, deployment, 2)

    asyncio.run(setup())
    result = run_pushpool(env, "dispatch", "--once", "--pool", unique_name)
    assert result.returncode == 0, result.stderr
    assert f"Swept {unique_name}: claimed 2, submitted 2, crashed 0, skipped 0" in result.stdout
