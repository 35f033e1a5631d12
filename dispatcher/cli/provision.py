"""The flow shared by `work-pool create --provision-infra`, `provision-infra`
and `deprovision-infra`: plan, show, confirm, apply, report."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Optional

import typer

from dispatcher.cli.console import console, error_console, exit_with_error
from dispatcher.prefect_client import ObjectNotFound, PrefectClient
from dispatcher.settings import Settings


def confirm_or_exit(question: str, yes: bool) -> None:
    """`--yes` skips the question; without a terminal to ask on, refuse
    rather than assume a yes."""
    if yes:
        return
    if not sys.stdin or not sys.stdin.isatty():
        exit_with_error(
            "Refusing to change cloud resources without confirmation: stdin is not interactive. "
            "Review the plan above and re-run with --yes to proceed (or --dry-run to only see the plan)."
        )
    if not typer.confirm(question, default=False):
        exit_with_error("Aborted; nothing was changed.")


def _report_failure(exc, pool: str, verb: str) -> None:
    error_console.print(f"[red]{exc.message}[/red]")
    if exc.done:
        error_console.print("Done before the failure (these exist now):")
        for step in exc.done:
            error_console.print(f"  - {step.describe()}")
    else:
        error_console.print("Nothing was changed before the failure.")
    error_console.print(f"Fix the cause and re-run `pushpool work-pool {verb} {pool}`: finished steps are not repeated.")
    raise typer.Exit(1)


async def provision(
    settings: Settings,
    pool: str,
    push_type: str,
    *,
    yes: bool,
    dry_run: bool = False,
    access_key: bool = True,
    before_apply: Optional[Callable[[PrefectClient], Awaitable[None]]] = None,
) -> None:
    from provisioning.plan import ProvisioningError, apply
    from provisioning.registry import provisioner_for

    async with PrefectClient(settings) as client:
        try:
            provisioner = provisioner_for(push_type)
            plan = await provisioner.plan_provision(client, pool, access_key=access_key)
        except ProvisioningError as exc:
            exit_with_error(exc.message)
        plan.render(console)
        if dry_run:
            console.print("Dry run: nothing was changed.")
            return
        if plan.has_changes:
            confirm_or_exit("Proceed with infrastructure provisioning?", yes)
        if before_apply is not None:
            await before_apply(client)
        try:
            if plan.has_changes:
                await apply(plan, console)
                console.print("[green]Infrastructure successfully provisioned![/green]")
            else:
                console.print("Everything already exists; nothing was created.")
            provisioner.finish(console)
        except ProvisioningError as exc:
            _report_failure(exc, pool, "provision-infra")


async def deprovision(settings: Settings, pool: str, push_type: str, *, yes: bool) -> None:
    from provisioning.plan import ProvisioningError, apply
    from provisioning.registry import provisioner_for

    async with PrefectClient(settings) as client:
        try:
            provisioner = provisioner_for(push_type)
            plan = await provisioner.plan_deprovision(client, pool)
        except ProvisioningError as exc:
            exit_with_error(exc.message)
        plan.render(console)
        if not plan.has_changes:
            return
        confirm_or_exit("Delete these resources?", yes)
        try:
            await apply(plan, console, description="Removing infrastructure")
        except ProvisioningError as exc:
            _report_failure(exc, pool, "deprovision-infra")
        console.print("[green]Infrastructure removed.[/green]")


async def pool_type(settings: Settings, pool: str) -> str:
    async with PrefectClient(settings) as client:
        try:
            return (await client.read_work_pool(pool)).type
        except ObjectNotFound:
            exit_with_error(
                f"Work pool {pool!r} does not exist. Create it with "
                f"`pushpool work-pool create {pool} --type ecs:push --provision-infra`."
            )
