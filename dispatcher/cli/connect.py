"""`pushpool connect --url URL`: wire the Prefect server's automations to a
deployed dispatcher (the ASGI app, the Lambda function URL, ...).

It keeps three objects on the Prefect server, found again by name, so re-running
updates them instead of adding more:

    block       webhook/pushpool-dispatcher            url, POST, Authorization: Bearer <secret>
    automation  pushpool: dispatch scheduled runs      prefect.flow-run.Scheduled → call the webhook
    automation  pushpool: cancel runs                  prefect.flow-run.Cancelling → call the webhook

Both automations match flow runs of every push pool (`prefect.work-pool.type`
`*:push`), or only of the `--pool`s given; their payload is the whole event
(`{{ event | tojson }}`), which `dispatcher.webhook` understands. `--remove`
deletes exactly these three objects.

The secret: `--secret`, else `PUSHPOOL_WEBHOOK_SECRET`, else the one the block
already holds (a re-run keeps a working setup working), else a new one, printed
once. A secret the user supplied is never printed.
"""

from __future__ import annotations

import secrets as secrets_module
import sys
from dataclasses import dataclass
from typing import Annotated, Any, Optional
from urllib.parse import urlsplit

import typer
from rich.table import Table

from dispatcher.cli.console import console, exit_with_error, load_settings, run
from dispatcher.prefect_client import ObjectNotFound, PrefectClient
from dispatcher.webhook import CANCELLING_EVENT, LATE_EVENT, SCHEDULED_EVENT

BLOCK_TYPE_SLUG = "webhook"
BLOCK_NAME = "pushpool-dispatcher"
SCHEDULED_AUTOMATION = "pushpool: dispatch scheduled runs"
CANCELLING_AUTOMATION = "pushpool: cancel runs"
# Late too: a run created by a deployment's schedule emits no Scheduled event.
AUTOMATIONS = {SCHEDULED_AUTOMATION: [SCHEDULED_EVENT, LATE_EVENT], CANCELLING_AUTOMATION: [CANCELLING_EVENT]}
PAYLOAD_TEMPLATE = "{{ event | tojson }}"
MIN_SECRET_LENGTH = 16


@dataclass
class Change:
    kind: str  # "webhook block" | "automation"
    name: str
    id: str
    action: str  # created | updated | removed | replaced duplicate | not found
    detail: str = ""


# ---------------------------------------------------------------- validation


def validate_url(url: str) -> Optional[str]:
    """None if `url` is an absolute http(s) URL, else why not."""
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:
        return f"--url {url!r} is not a valid URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"--url must be an absolute http:// or https:// URL, e.g. https://dispatcher.example.com/webhook (got {url!r})"
    if not parts.hostname:
        return f"--url has no host: {url!r}"
    if any(c.isspace() for c in url.strip()):
        return f"--url must not contain spaces: {url!r}"
    try:
        parts.port
    except ValueError:
        return f"--url has an invalid port: {url!r}"
    return None


def validate_secret(secret: str, source: str) -> Optional[str]:
    """None if `secret` can travel as a bearer token, else why not (never the value)."""
    if not secret:
        return f"{source} is empty"
    if any(not (33 <= ord(c) <= 126) for c in secret):
        return f"{source} must be printable ASCII without spaces (it is sent as 'Authorization: Bearer <secret>')"
    return None


def display_url(url: str) -> str:
    """The URL without credentials, query or fragment, which may carry tokens."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" + (" (query hidden)" if parts.query else "")


# ---------------------------------------------------------------- what is sent to Prefect


def block_data(url: str, secret: str) -> dict[str, Any]:
    return {
        "url": url,
        "method": "POST",
        "headers": {"Content-Type": "application/json", "Authorization": f"Bearer {secret}"},
    }


def automation_body(
    name: str, events: list[str], block_document_id: str, pool_ids: Optional[list[str]]
) -> dict[str, Any]:
    """The automation that calls the dispatcher's webhook with the whole event."""
    if pool_ids:
        related: dict[str, Any] = {
            "prefect.resource.role": "work-pool",
            "prefect.resource.id": [f"prefect.work-pool.{pool_id}" for pool_id in pool_ids],
        }
        scope = "the selected push pools"
    else:
        related = {"prefect.resource.role": "work-pool", "prefect.work-pool.type": "*:push"}
        scope = "every push pool"
    return {
        "name": name,
        "description": f"Managed by `pushpool connect`: sends {' and '.join(events)} events of flow runs in {scope} "
        "to the pushpool dispatcher's webhook.",
        "enabled": True,
        "trigger": {
            "type": "event",
            "posture": "Reactive",
            "expect": list(events),
            "match": {"prefect.resource.id": "prefect.flow-run.*"},
            "match_related": related,
            "threshold": 1,
            "within": 0,
        },
        "actions": [{"type": "call-webhook", "block_document_id": block_document_id, "payload": PAYLOAD_TEMPLATE}],
    }


def bearer_secret(headers: Any) -> Optional[str]:
    """The secret in a stored block's `Authorization: Bearer` header, if any."""
    if not isinstance(headers, dict):
        return None
    for key, value in headers.items():
        if str(key).lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


# ---------------------------------------------------------------- Prefect API calls


async def find_automations(client: PrefectClient, names: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The automations with these names, oldest first, by name."""
    response = await client.request(
        "POST",
        "automations/filter",
        json={"automations": {"name": {"any_": names}}, "sort": "NAME_ASC", "limit": 200},
    )
    found: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for automation in response.json():
        if automation.get("name") in found:
            found[automation["name"]].append(automation)
    for automations in found.values():
        automations.sort(key=lambda a: str(a.get("created") or ""))
    return found


async def read_block(client: PrefectClient):
    try:
        return await client.read_block_document_by_name(BLOCK_TYPE_SLUG, BLOCK_NAME)
    except ObjectNotFound:
        return None


async def pool_ids_for(client: PrefectClient, names: list[str]) -> list[str]:
    ids: list[str] = []
    problems: list[str] = []
    for name in dict.fromkeys(names):
        try:
            pool = await client.read_work_pool(name)
        except ObjectNotFound:
            problems.append(f"there is no work pool named {name!r}")
            continue
        if not pool.is_push:
            problems.append(f"work pool {name!r} has type {pool.type!r}, which is not a push type")
            continue
        ids.append(str(pool.id))
    if problems:
        exit_with_error("Cannot connect: " + "; ".join(problems) + ". See `pushpool work-pool ls`.")
    return ids


async def ensure_block(client: PrefectClient, existing, url: str, secret: str) -> Change:
    block_type = await client.read_block_type_by_slug(BLOCK_TYPE_SLUG)
    schema = await client.read_latest_block_schema(block_type.id)
    data = block_data(url, secret)
    if existing is None:
        created = await client.create_block_document(BLOCK_NAME, block_type.id, schema.id, data)
        return Change("webhook block", f"{BLOCK_TYPE_SLUG}/{BLOCK_NAME}", str(created.id), "created", display_url(url))
    await client.request(
        "PATCH",
        f"block_documents/{existing.id}",
        json={"block_schema_id": str(schema.id), "data": data, "merge_existing_data": False},
    )
    return Change("webhook block", f"{BLOCK_TYPE_SLUG}/{BLOCK_NAME}", str(existing.id), "updated", display_url(url))


async def ensure_automations(
    client: PrefectClient, block_document_id: str, pool_ids: Optional[list[str]], scope: str
) -> list[Change]:
    changes: list[Change] = []
    existing = await find_automations(client, list(AUTOMATIONS))
    for name, events in AUTOMATIONS.items():
        body = automation_body(name, events, block_document_id, pool_ids)
        current, *duplicates = existing[name] or [None]
        if current is None:
            response = await client.request("POST", "automations/", json=body)
            changes.append(Change("automation", name, str(response.json()["id"]), "created", scope))
        else:
            await client.request("PUT", f"automations/{current['id']}", json=body)
            changes.append(Change("automation", name, str(current["id"]), "updated", scope))
        for duplicate in duplicates:
            await _delete(client, f"automations/{duplicate['id']}")
            changes.append(Change("automation", name, str(duplicate["id"]), "removed", "a duplicate"))
    return changes


async def _delete(client: PrefectClient, path: str) -> bool:
    try:
        await client.request("DELETE", path)
    except ObjectNotFound:
        return False
    return True


async def remove_connection(client: PrefectClient) -> list[Change]:
    """Delete the two automations and the webhook block `connect` made; nothing else."""
    changes: list[Change] = []
    existing = await find_automations(client, list(AUTOMATIONS))
    for name in AUTOMATIONS:
        if not existing[name]:
            changes.append(Change("automation", name, "", "not found"))
        for automation in existing[name]:
            removed = await _delete(client, f"automations/{automation['id']}")
            changes.append(Change("automation", name, str(automation["id"]), "removed" if removed else "not found"))
    block = await read_block(client)
    if block is None:
        changes.append(Change("webhook block", f"{BLOCK_TYPE_SLUG}/{BLOCK_NAME}", "", "not found"))
    else:
        removed = await _delete(client, f"block_documents/{block.id}")
        changes.append(
            Change("webhook block", f"{BLOCK_TYPE_SLUG}/{BLOCK_NAME}", str(block.id), "removed" if removed else "not found")
        )
    return changes


# ---------------------------------------------------------------- the command


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin or not sys.stdin.isatty():
        exit_with_error(f"{question} Refusing without confirmation: stdin is not interactive. Re-run with --yes.")
    if not typer.confirm(question, default=False):
        exit_with_error("Aborted; nothing was changed.")


def _print_changes(changes: list[Change], title: str) -> None:
    table = Table(title=title)
    table.add_column("Object", no_wrap=True)
    table.add_column("Name", overflow="fold")
    table.add_column("Id", no_wrap=True, min_width=36)
    table.add_column("Action", no_wrap=True)
    table.add_column("Detail", overflow="fold")
    for change in changes:
        colour = {"created": "green", "updated": "cyan", "removed": "yellow"}.get(change.action, "dim")
        table.add_row(change.kind, change.name, change.id, f"[{colour}]{change.action}[/{colour}]", change.detail)
    console.print(table)


def connect(
    url: Annotated[
        Optional[str],
        typer.Option("--url", help="The dispatcher's webhook URL, e.g. https://dispatcher.example.com/webhook"),
    ] = None,
    secret: Annotated[
        Optional[str],
        typer.Option(
            "--secret",
            help="The dispatcher's PUSHPOOL_WEBHOOK_SECRET (default: $PUSHPOOL_WEBHOOK_SECRET, else the one "
            "already connected, else a new one, printed once)",
        ),
    ] = None,
    pool: Annotated[
        Optional[list[str]],
        typer.Option("--pool", "-p", help="Only runs of this push pool (repeatable); default: every push pool"),
    ] = None,
    remove: Annotated[
        bool, typer.Option("--remove", help="Delete the webhook block and the automations connect created")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
) -> None:
    """Make the Prefect server call a deployed dispatcher's webhook when a run of a
    push pool is scheduled or cancelling (a webhook block and two automations)."""
    if remove:
        if url or secret or pool:
            exit_with_error("--remove takes no --url, --secret or --pool: it removes the whole connection.")
        settings = load_settings()

        async def _remove() -> list[Change]:
            async with PrefectClient(settings) as client:
                existing = await find_automations(client, list(AUTOMATIONS))
                block = await read_block(client)
                if block is None and not any(existing.values()):
                    return []
                _confirm(
                    f"Delete the webhook block {BLOCK_TYPE_SLUG}/{BLOCK_NAME} and the automations "
                    f"{', '.join(repr(n) for n in AUTOMATIONS)}?",
                    yes,
                )
                return await remove_connection(client)

        changes = run(_remove())
        if not changes:
            console.print("Nothing to remove: this Prefect server has no pushpool connection.")
            return
        _print_changes(changes, "pushpool connection removed")
        console.print("Prefect no longer calls the dispatcher; its timer still sweeps the pools.")
        return

    if not url:
        exit_with_error("Missing --url: the dispatcher's webhook URL, e.g. --url https://dispatcher.example.com/webhook")
    url = url.strip()
    problem = validate_url(url)
    if problem:
        exit_with_error(problem)
    settings = load_settings()
    if secret is not None:
        supplied: Optional[tuple[str, str]] = (secret, "--secret")
    elif settings.webhook_secret is not None and settings.webhook_secret.get_secret_value():
        supplied = (settings.webhook_secret.get_secret_value(), "PUSHPOOL_WEBHOOK_SECRET")
    else:
        supplied = None
    if supplied is not None:
        problem = validate_secret(*supplied)
        if problem:
            exit_with_error(problem)

    async def _connect() -> tuple[list[Change], str, str]:
        async with PrefectClient(settings) as client:
            pool_ids = await pool_ids_for(client, pool) if pool else None
            block = await read_block(client)
            if block is not None:
                old_url = block.data.get("url")
                if isinstance(old_url, str) and old_url != url:
                    _confirm(
                        f"The Prefect server calls {display_url(old_url)} now; point it at {display_url(url)} instead?",
                        yes,
                    )
            if supplied is not None:
                value, source = supplied
            elif block is not None and bearer_secret(block.data.get("headers")):
                value, source = bearer_secret(block.data.get("headers")), "kept"  # type: ignore[assignment]
            else:
                value, source = secrets_module.token_urlsafe(32), "generated"
            block_change = await ensure_block(client, block, url, value)
            scope = f"pools {', '.join(pool or [])}" if pool_ids else "every push pool"
            changes = [block_change, *await ensure_automations(client, block_change.id, pool_ids, scope)]
            return changes, value, source

    changes, value, source = run(_connect())
    _print_changes(changes, f"pushpool connection → {display_url(url)}")
    if source == "generated":
        console.print(
            "Generated a webhook secret. Set it as the dispatcher's PUSHPOOL_WEBHOOK_SECRET "
            "(it is shown only this once):"
        )
        console.print(f"  PUSHPOOL_WEBHOOK_SECRET={value}", soft_wrap=True)
    elif source == "kept":
        console.print("Kept the webhook secret the block already held.")
    else:
        console.print(f"The webhook sends the secret from {source} as 'Authorization: Bearer …'.")
        if len(value) < MIN_SECRET_LENGTH:
            console.print(
                f"[yellow]That secret is short ({len(value)} characters); "
                f"a random one of {MIN_SECRET_LENGTH}+ is safer.[/yellow]"
            )
    console.print(
        "Prefect now calls the dispatcher when a run of "
        + (f"pool {', '.join(pool or [])}" if pool else "any push pool")
        + " is scheduled, late or cancelling. Keep the dispatcher's timer too: runs made by deployment schedules "
        "emit no Scheduled event, only Late ~15 s after they were due, and webhook calls are never retried."
    )
