"""`pushpool work-pool …`: the verbs and flags of `prefect work-pool`, for push types."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from dispatcher.cli.console import console, exit_with_error, load_settings, run
from dispatcher.cli.provision import deprovision, pool_type, provision
from dispatcher.prefect_client import ObjectNotFound, PrefectClient
from providers.registry import ProviderRegistry, UnknownPushType
from provisioning.registry import has_provisioner

app = typer.Typer(name="work-pool", help="Create and inspect push work pools.", no_args_is_help=True)


def _provider_class(push_type: str, registry: ProviderRegistry):
    try:
        return registry.provider_class(push_type)
    except UnknownPushType as exc:
        exit_with_error(f"Unknown work pool type {exc.push_type!r}. Known push types: {', '.join(exc.known)}")


def render_template(template: dict[str, Any]) -> str:
    """The one serialisation of a base job template (Terraform reads the same bytes)."""
    return json.dumps(template, indent=2) + "\n"


def _read_template_file(path: Path) -> dict[str, Any]:
    try:
        template = json.loads(path.read_text())
    except OSError as exc:
        exit_with_error(f"Could not read the base job template {path}: {exc.strerror}")
    except json.JSONDecodeError as exc:
        exit_with_error(f"The base job template {path} is not valid JSON: {exc}")
    if not isinstance(template, dict) or (
        template and not {"job_configuration", "variables"} <= template.keys()
    ):
        exit_with_error(
            f"The base job template {path} must be an object with the keys "
            "'job_configuration' and 'variables' (or empty)."
        )
    return template


@app.command("get-default-base-job-template")
def get_default_base_job_template(
    type: Annotated[str, typer.Option("--type", "-t", help="The push work pool type, e.g. ecs:push")],
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="Write the template to this file")] = None,
) -> None:
    """Print the default base job template of a push work pool type."""
    text = render_template(_provider_class(type, ProviderRegistry()).default_base_job_template())
    if file is None:
        typer.echo(text, nl=False)
    else:
        file.write_text(text)
        console.print(f"Wrote the default base job template for {type!r} to {file}")


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="The name of the work pool")],
    type: Annotated[str, typer.Option("--type", "-t", help="The push type: process:push, ecs:push, …")],
    base_job_template: Annotated[
        Optional[Path], typer.Option("--base-job-template", help="A JSON file with the base job template")
    ] = None,
    paused: Annotated[bool, typer.Option("--paused", help="Create the pool paused")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Update the pool if it already exists")] = False,
    provision_infra: Annotated[
        bool, typer.Option("--provision-infra", help="Create the cloud resources the pool needs")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    no_access_key: Annotated[
        bool, typer.Option("--no-access-key", help="With --provision-infra: create no IAM user or key; "
                           "the dispatcher uses its own ambient cloud identity")
    ] = False,
) -> None:
    """Create a push work pool on the Prefect server (and its cloud resources with --provision-infra)."""
    registry = ProviderRegistry()
    provider_class = _provider_class(type, registry)
    push_type = registry.canonical(type)
    template = (
        _read_template_file(base_job_template)
        if base_job_template is not None
        else provider_class.default_base_job_template()
    )
    settings = load_settings()
    if provision_infra and has_provisioner(push_type):

        async def create_then_provision() -> None:
            async with PrefectClient(settings) as client:
                if not overwrite and await _pool_exists(client, name):
                    exit_with_error(f"Work pool named {name!r} already exists. Use --overwrite to update it.")

            async def create_pool(_client: PrefectClient) -> None:
                await _create(settings, name, push_type, template, paused, overwrite,
                              template_given=base_job_template is not None)

            await provision(settings, name, push_type, yes=yes, access_key=not no_access_key,
                            before_apply=create_pool)

        run(create_then_provision())
        return
    if provision_infra:
        console.print(
            f"[yellow]Automatic infrastructure provisioning is not available for {push_type!r} "
            "work pools yet; creating the pool without it.[/yellow]"
        )
    run(_create(settings, name, push_type, template, paused, overwrite, template_given=base_job_template is not None))


async def _pool_exists(client: PrefectClient, name: str) -> bool:
    try:
        await client.read_work_pool(name)
    except ObjectNotFound:
        return False
    return True


async def _create(settings, name: str, push_type: str, template: dict[str, Any], paused: bool,
                  overwrite: bool, template_given: bool) -> None:
    async with PrefectClient(settings) as client:
        try:
            existing = await client.read_work_pool(name)
        except ObjectNotFound:
            existing = None
        if existing is None:
            await client.create_work_pool(name, push_type, template, is_paused=paused)
            console.print(f"Created work pool {name!r} of type {push_type!r}.")
            console.print(f"Dispatch its runs here with: [bold]pushpool dispatch --pool {name}[/bold]")
            return
        if not overwrite:
            exit_with_error(f"Work pool named {name!r} already exists. Use --overwrite to update it.")
        if existing.type != push_type:
            exit_with_error(
                f"Work pool {name!r} has type {existing.type!r}; a pool's type cannot be changed. "
                "Delete it first or choose another name."
            )
        update: dict[str, Any] = {"is_paused": paused}
        if template_given or not existing.base_job_template:
            update["base_job_template"] = template
        await client.update_work_pool(name, **update)
        console.print(f"Updated work pool {name!r}.")


@app.command("ls")
def ls() -> None:
    """List the work pools, marking the push pools pushpool can dispatch."""
    settings = load_settings()
    registry = ProviderRegistry()

    async def _ls() -> None:
        async with PrefectClient(settings) as client:
            pools = await client.read_work_pools()
        table = Table(title="Work pools")
        for column in ("Name", "Type", "Dispatched by pushpool", "Paused", "Concurrency limit"):
            table.add_column(column)
        for pool in sorted(pools, key=lambda p: p.name):
            served = "yes" if pool.is_push and pool.type in registry else "no"
            limit = "" if pool.concurrency_limit is None else str(pool.concurrency_limit)
            table.add_row(pool.name, pool.type, served, "yes" if pool.is_paused else "", limit)
        console.print(table)

    run(_ls())


@app.command("provision-infra")
def provision_infra(
    name: Annotated[str, typer.Argument(help="The name of the work pool")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan and change nothing")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    no_access_key: Annotated[
        bool, typer.Option("--no-access-key", help="Create no IAM user or key; the dispatcher uses its own "
                           "ambient cloud identity")
    ] = False,
) -> None:
    """Create (or complete) the cloud resources an existing push pool needs, and
    write them into the pool's template defaults. Re-running creates nothing twice."""
    settings = load_settings()

    async def _provision() -> None:
        push_type = await pool_type(settings, name)
        await provision(settings, name, push_type, yes=yes, dry_run=dry_run, access_key=not no_access_key)

    run(_provision())


@app.command("deprovision-infra")
def deprovision_infra(
    name: Annotated[str, typer.Argument(help="The name of the work pool")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
) -> None:
    """Delete the cloud resources provisioned for a pool (only those tagged for it)
    and its credentials block; the pool itself stays."""
    settings = load_settings()

    async def _deprovision() -> None:
        push_type = await pool_type(settings, name)
        await deprovision(settings, name, push_type, yes=yes)

    run(_deprovision())
