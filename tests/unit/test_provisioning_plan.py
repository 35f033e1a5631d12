"""The provider-neutral parts of provisioning: plans, the apply loop, the
policy document, template defaults and the profile file."""

from __future__ import annotations

import asyncio
import io
import tomllib

import pytest
from rich.console import Console

from provisioning.aws_ecs import SUBMISSION_ACTIONS, submission_policy
from provisioning.plan import Action, Plan, ProvisioningError, apply
from provisioning.prefect_side import clear_template_defaults, set_profile_setting, set_template_defaults
from provisioning.registry import has_provisioner, provisioner_for


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=120)


def test_apply_runs_only_changing_steps_in_order_sync_and_async():
    calls: list[str] = []

    async def async_step() -> None:
        calls.append("b")

    plan = Plan("t")
    plan.add("K", "a", Action.CREATE, run=lambda: calls.append("a"))
    plan.add("K", "kept", Action.REUSE, run=lambda: calls.append("never"))
    plan.add("K", "b", Action.UPDATE, run=async_step)
    plan.add("K", "c", Action.DELETE, run=lambda: calls.append("c"))
    done = asyncio.run(apply(plan, quiet_console()))
    assert calls == ["a", "b", "c"]
    assert [s.name for s in done] == ["a", "b", "c"]


def test_a_failing_step_reports_what_was_done_and_stops():
    calls: list[str] = []

    def boom() -> None:
        raise RuntimeError("quota exceeded")

    plan = Plan("t")
    plan.add("IAM role", "r", Action.CREATE, run=lambda: calls.append("r"))
    plan.add("ECS cluster", "c", Action.CREATE, run=boom)
    plan.add("ECR repository", "e", Action.CREATE, run=lambda: calls.append("e"))
    with pytest.raises(ProvisioningError) as info:
        asyncio.run(apply(plan, quiet_console()))
    assert info.value.message == "Could not create ECS cluster c: quota exceeded"
    assert [s.name for s in info.value.done] == ["r"]
    assert calls == ["r"]


def test_botocore_errors_become_one_line():
    from botocore.exceptions import ClientError

    def denied() -> None:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "not allowed"}}, "CreateCluster")

    plan = Plan("t")
    plan.add("ECS cluster", "c", Action.CREATE, run=denied)
    with pytest.raises(ProvisioningError, match="Could not create ECS cluster c: AccessDenied: not allowed"):
        asyncio.run(apply(plan, quiet_console()))


def test_plan_table_lists_every_step_and_whether_anything_changes():
    plan = Plan("Provisioning")
    plan.add("ECS cluster", "prefect-ecs-cluster", Action.REUSE, "exists")
    assert not plan.has_changes
    plan.add("ECR repository", "prefect-flows", Action.CREATE, "new")
    assert plan.has_changes
    console = quiet_console()
    plan.render(console)
    text = console.file.getvalue()
    assert "prefect-ecs-cluster" in text and "reuse" in text and "create" in text


def test_the_submission_policy_is_least_privilege():
    arn = "arn:aws:iam::123456789012:role/prefect-ecs-execution-role"
    document = submission_policy([arn])
    actions = [a for s in document["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])]
    assert not any("*" in a for a in actions)
    assert sorted(actions) == sorted(SUBMISSION_ACTIONS + ["iam:PassRole"])
    assert all(a.split(":")[0] in {"ecs", "ec2", "logs", "iam"} for a in actions)
    (pass_role,) = [s for s in document["Statement"] if s["Action"] == "iam:PassRole"]
    assert pass_role["Resource"] == [arn]
    assert pass_role["Condition"] == {"StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}}


def test_template_defaults_are_set_and_cleared_only_while_unchanged():
    template = {
        "job_configuration": {},
        "variables": {"properties": {"cluster": {"type": "string"}, "vpc_id": {"type": "string", "default": "mine"}}},
    }
    updated, missing = set_template_defaults(template, {"cluster": "c", "execution_role_arn": "arn"})
    assert missing == ["execution_role_arn"]
    assert updated["variables"]["properties"]["cluster"]["default"] == "c"
    assert "default" not in template["variables"]["properties"]["cluster"]  # a copy

    cleared, names = clear_template_defaults(updated, {"cluster": "c", "vpc_id": "vpc-other"})
    assert names == ["cluster"]
    assert "default" not in cleared["variables"]["properties"]["cluster"]
    assert cleared["variables"]["properties"]["vpc_id"]["default"] == "mine"


def test_profile_setting_goes_into_the_active_profile_only_if_the_file_exists(tmp_path):
    env = {"PREFECT_HOME": str(tmp_path)}
    assert set_profile_setting("PREFECT_DEFAULT_DOCKER_BUILD_NAMESPACE", "reg", env) is None
    assert not (tmp_path / "profiles.toml").exists()

    (tmp_path / "profiles.toml").write_text(
        'active = "dev"\n\n[profiles.default]\n\n[profiles.dev]\nPREFECT_API_URL = "http://x/api"\n'
        'PREFECT_DEBUG_MODE = true\n'
    )
    assert set_profile_setting("PREFECT_DEFAULT_DOCKER_BUILD_NAMESPACE", "123.dkr.ecr.us-east-1.amazonaws.com", env) == "dev"
    document = tomllib.loads((tmp_path / "profiles.toml").read_text())
    assert document["active"] == "dev"
    assert document["profiles"]["dev"] == {
        "PREFECT_API_URL": "http://x/api",
        "PREFECT_DEBUG_MODE": True,
        "PREFECT_DEFAULT_DOCKER_BUILD_NAMESPACE": "123.dkr.ecr.us-east-1.amazonaws.com",
    }
    assert document["profiles"]["default"] == {}


def test_only_ecs_push_has_a_provisioner():
    assert has_provisioner("ecs:push")
    assert not has_provisioner("process:push")
    with pytest.raises(ProvisioningError, match="not available for 'process:push'"):
        provisioner_for("process:push")
