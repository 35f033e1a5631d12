"""Block documents and Prefect variables against a real Prefect server:
`dispatcher.templating` must resolve them exactly as Prefect's own
`resolve_block_document_references` / `resolve_variables` do with Prefect's
own client."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Optional
from uuid import UUID, uuid4

import pytest

from dispatcher.logs import MASK, Redactor
from dispatcher.models import BlockDocument, Variable
from dispatcher.prefect_client import PrefectClient
from dispatcher.templating import (
    CachedLookups,
    TemplateError,
    resolve_block_document_references,
    resolve_variables,
)
from tests.support.factories import client_for
from tests.support.prefect_server import PrefectServer

pytestmark = pytest.mark.integration

SECRET_VALUE = "sk-live-9f8e7d6c5b4a3210"
PASSWORD = "correct-horse-battery-staple"


def same(a: Any, b: Any) -> bool:
    return json.dumps(a, default=repr) == json.dumps(b, default=repr)


async def create_block_type(client: PrefectClient, slug: str, properties: dict[str, Any], secret_fields: list[str]) -> tuple[UUID, UUID]:
    response = await client.request("POST", "block_types/", json={"name": slug, "slug": slug})
    block_type_id = UUID(response.json()["id"])
    fields = {
        "title": slug,
        "type": "object",
        "properties": properties,
        "secret_fields": secret_fields,
        "block_type_slug": slug,
        "block_schema_references": {},
    }
    response = await client.request(
        "POST", "block_schemas/", json={"fields": fields, "block_type_id": str(block_type_id), "capabilities": []}
    )
    return block_type_id, UUID(response.json()["id"])


async def create_block(client: PrefectClient, slug: str, name: str, data: dict[str, Any]) -> BlockDocument:
    block_type = await client.read_block_type_by_slug(slug)
    schema = await client.read_latest_block_schema(block_type.id)
    return await client.create_block_document(name, block_type.id, schema.id, data)


async def create_variable(client: PrefectClient, name: str, value: Any) -> None:
    await client.request("POST", "variables/", json={"name": name, "value": value})


class World:
    """The blocks and variables every test here reads (created once)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.creds_slug = f"{prefix}-creds"
        self.value_slug = f"{prefix}-value"
        self.ids: dict[str, str] = {}

    async def create(self, client: PrefectClient) -> None:
        p = self.prefix
        await create_block_type(
            client,
            self.creds_slug,
            {
                "username": {"type": "string"},
                "password": {"type": "string", "format": "password", "writeOnly": True},
                "region": {"type": "string"},
                "ports": {"type": "array", "items": {"type": "integer"}},
                "extra": {"type": "object"},
                "enabled": {"type": "boolean"},
            },
            ["password"],
        )
        await create_block_type(client, self.value_slug, {"value": {}}, [])
        secret = await create_block(client, "secret", f"{p}-token", {"value": SECRET_VALUE})
        creds = await create_block(
            client,
            self.creds_slug,
            f"{p}-prod",
            {
                "username": "alice",
                "password": PASSWORD,
                "region": "eu-west-1",
                "ports": [80, 443],
                "extra": {"a": {"b": [1, {"c": None}]}, "value": "not unwrapped: more than one key"},
                "enabled": True,
            },
        )
        value = await create_block(
            client, self.value_slug, f"{p}-cfg", {"value": {"key": {"nested": "deep"}, "list": [{"k": "v"}, 1], "values": 7}}
        )
        scalar = await create_block(client, self.value_slug, f"{p}-num", {"value": 42})
        # a block that references another: the server inlines the referenced document's data
        wrapper = await create_block(
            client, self.creds_slug, f"{p}-wrapper", {"username": "bob", "extra": {"$ref": {"block_document_id": str(secret.id)}}}
        )
        self.ids = {
            "secret": str(secret.id), "creds": str(creds.id), "value": str(value.id), "scalar": str(scalar.id),
            "wrapper": str(wrapper.id),
        }
        for name, variable_value in {
            f"{p}_region": "us-east-2",
            f"{p}_count": 3,
            f"{p}_ratio": 0.5,
            f"{p}_flag": False,
            f"{p}_obj": {"a": [1, "b"]},
            f"{p}_list": ["x", 2],
        }.items():
            await create_variable(client, name, variable_value)

    def templates(self) -> dict[str, Any]:
        p, creds, value = self.prefix, self.creds_slug, self.value_slug
        return {
            "ref_dict": {"aws_credentials": {"$ref": {"block_document_id": self.ids["creds"]}}},
            "ref_in_list": [{"$ref": {"block_document_id": self.ids["secret"]}}, "plain", 5],
            "ref_with_other_keys": {"$ref": {"block_document_id": self.ids["value"]}, "ignored": "x"},
            "secret_whole": f"{{{{ prefect.blocks.secret.{p}-token }}}}",
            "secret_inline": f"Bearer {{{{prefect.blocks.secret.{p}-token}}}}!",
            "secret_value_path": f"{{{{ prefect.blocks.secret.{p}-token.value }}}}",
            "creds_whole": f"{{{{ prefect.blocks.{creds}.{p}-prod }}}}",
            "creds_key": f"{{{{ prefect.blocks.{creds}.{p}-prod.username }}}}",
            "creds_index": f"{{{{ prefect.blocks.{creds}.{p}-prod.ports[1] }}}}",
            "creds_deep": f"{{{{ prefect.blocks.{creds}.{p}-prod.extra.a.b[1].c }}}}",
            "creds_bool_inline": f"enabled={{{{ prefect.blocks.{creds}.{p}-prod.enabled }}}}",
            "creds_mixed": f"{{{{ prefect.blocks.{creds}.{p}-prod.username }}}}@{{{{ prefect.blocks.{creds}.{p}-prod.region }}}}:{{{{ image }}}}",
            "nested_block_whole": f"{{{{ prefect.blocks.{creds}.{p}-wrapper }}}}",
            "nested_block_path": f"{{{{ prefect.blocks.{creds}.{p}-wrapper.extra.value }}}}",
            "nested_block_ref": {"$ref": {"block_document_id": self.ids["wrapper"]}},
            "value_unwrapped": f"{{{{ prefect.blocks.{value}.{p}-cfg }}}}",
            "value_unwrapped_path": f"{{{{ prefect.blocks.{value}.{p}-cfg.key.nested }}}}",
            "value_explicit_path": f"{{{{ prefect.blocks.{value}.{p}-cfg.value.list[0].k }}}}",
            "value_values_key": f"{{{{ prefect.blocks.{value}.{p}-cfg.values }}}}",
            "value_scalar_inline": f"n={{{{ prefect.blocks.{value}.{p}-num }}}}",
            "var_whole_str": f"{{{{ prefect.variables.{p}_region }}}}",
            "var_whole_int": f"{{{{ prefect.variables.{p}_count }}}}",
            "var_whole_float": f"{{{{ prefect.variables.{p}_ratio }}}}",
            "var_whole_bool": f"{{{{ prefect.variables.{p}_flag }}}}",
            "var_whole_obj": f"{{{{ prefect.variables.{p}_obj }}}}",
            "var_whole_list": [f"{{{{ prefect.variables.{p}_list }}}}"],
            "var_inline": f"region={{{{ prefect.variables.{p}_region }}}}, n={{{{prefect.variables.{p}_count}}}}, o={{{{ prefect.variables.{p}_obj }}}}",
            "var_missing_whole": f"{{{{ prefect.variables.{p}_missing }}}}",
            "var_missing_inline": f"[{{{{ prefect.variables.{p}_missing }}}}]",
            "untouched": ["{{ image }}", "{{ $HOME }}", 1.5, None, True],
        }


@pytest.fixture(scope="module")
def world(prefect_server: PrefectServer) -> World:
    world = World(f"pp{uuid4().hex[:8]}")

    async def create() -> None:
        async with client_for(prefect_server.api_url) as client:
            await world.create(client)

    asyncio.run(create())
    return world


async def prefect_resolve(api_url: str, template: Any) -> Any:
    """Prefect's own two passes, with Prefect's own client."""
    from prefect.client.orchestration import PrefectClient as PrefectsClient
    from prefect.utilities.templating import resolve_block_document_references as prefect_blocks
    from prefect.utilities.templating import resolve_variables as prefect_variables

    async with PrefectsClient(api=api_url) as client:
        resolved = await prefect_blocks(template, client=client)
        return await prefect_variables(resolved, client=client)


async def pushpool_resolve(api_url: str, template: Any, *, redactor: Optional[Redactor] = None) -> Any:
    async with client_for(api_url) as client:
        lookups = CachedLookups(client, redactor=redactor)
        resolved = await resolve_block_document_references(template, lookups)
        return await resolve_variables(resolved, lookups)


def test_resolution_matches_prefect(prefect_server: PrefectServer, world: World) -> None:
    templates = world.templates()
    ours = asyncio.run(pushpool_resolve(prefect_server.api_url, templates))
    theirs = asyncio.run(prefect_resolve(prefect_server.api_url, templates))
    for key in templates:
        assert same(ours[key], theirs[key]), key
    # and a few facts spelled out, so a change on both sides is noticed too
    assert ours["secret_whole"] == SECRET_VALUE
    assert ours["secret_inline"] == f"Bearer {SECRET_VALUE}!"
    assert ours["creds_whole"]["password"] == PASSWORD
    assert ours["creds_index"] == 443
    assert ours["creds_deep"] is None
    assert ours["creds_bool_inline"] == "enabled=True"
    assert ours["creds_mixed"] == "alice@eu-west-1:{{ image }}"
    assert ours["nested_block_whole"] == {"username": "bob", "extra": {"value": SECRET_VALUE}}
    assert ours["nested_block_path"] == SECRET_VALUE
    assert ours["value_unwrapped"] == {"key": {"nested": "deep"}, "list": [{"k": "v"}, 1], "values": 7}
    assert ours["value_values_key"] == 7
    assert ours["value_scalar_inline"] == "n=42"
    assert ours["ref_with_other_keys"] == {"value": {"key": {"nested": "deep"}, "list": [{"k": "v"}, 1], "values": 7}}
    assert ours["var_whole_obj"] == {"a": [1, "b"]}
    assert ours["var_inline"] == "region=us-east-2, n=3, o={'a': [1, 'b']}"
    assert ours["var_missing_whole"] == "" and ours["var_missing_inline"] == "[]"
    assert ours["untouched"] == ["{{ image }}", "{{ $HOME }}", 1.5, None, True]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("creds_inline_object", "resolves to an object, which cannot be put inside a longer string"),
        ("missing_keypath", "has no value at 'nope'"),
        ("missing_block", "not found"),
        ("too_short", "must be prefect.blocks.<block-type-slug>.<block-document-name>"),
    ],
)
def test_errors_where_prefect_fails(prefect_server: PrefectServer, world: World, key: str, message: str) -> None:
    p, creds = world.prefix, world.creds_slug
    template = {
        "creds_inline_object": f"x {{{{ prefect.blocks.{creds}.{p}-prod.extra }}}}",
        "missing_keypath": f"{{{{ prefect.blocks.{creds}.{p}-prod.nope }}}}",
        "missing_block": f"{{{{ prefect.blocks.{creds}.{p}-nothing }}}}",
        "too_short": "{{ prefect.blocks.secret }}",
    }[key]
    with pytest.raises(Exception):  # noqa: B017 - Prefect raises ValueError or ObjectNotFound
        asyncio.run(prefect_resolve(prefect_server.api_url, template))
    with pytest.raises(TemplateError) as info:
        asyncio.run(pushpool_resolve(prefect_server.api_url, template))
    assert message in str(info.value)
    assert PASSWORD not in str(info.value)


def test_a_deleted_block_is_named(prefect_server: PrefectServer, world: World) -> None:
    name = f"{world.prefix}-doomed"

    async def scenario() -> tuple[str, str]:
        async with client_for(prefect_server.api_url) as client:
            block = await create_block(client, "secret", name, {"value": "short-lived-secret"})
            await client.delete_block_document(block.id)
        messages = []
        for template in ({"creds": {"$ref": {"block_document_id": str(block.id)}}}, f"{{{{ prefect.blocks.secret.{name} }}}}"):
            with pytest.raises(TemplateError) as info:
                await pushpool_resolve(prefect_server.api_url, template)
            messages.append(str(info.value))
        return str(block.id), messages

    block_id, (by_id, by_name) = asyncio.run(scenario())
    assert by_id == f"Block document {block_id} referenced by the job configuration no longer exists (deleted?)"
    assert by_name.startswith(f"Block 'secret/{name}' not found")


class CountingClient:
    """The real client, counting block and variable reads."""

    def __init__(self, client: PrefectClient):
        self.client = client
        self.reads: list[tuple[str, ...]] = []

    async def read_block_document(self, block_document_id: UUID | str) -> BlockDocument:
        self.reads.append(("id", str(block_document_id)))
        return await self.client.read_block_document(block_document_id)

    async def read_block_document_by_name(self, block_type_slug: str, name: str) -> BlockDocument:
        self.reads.append(("name", block_type_slug, name))
        return await self.client.read_block_document_by_name(block_type_slug, name)

    async def read_variable_by_name(self, name: str) -> Optional[Variable]:
        self.reads.append(("variable", name))
        return await self.client.read_variable_by_name(name)


def test_cached_lookups_read_each_block_once_and_register_secrets(prefect_server: PrefectServer, world: World) -> None:
    templates = world.templates()
    redactor = Redactor()

    async def sweep() -> tuple[list[Any], list[tuple[str, ...]]]:
        async with client_for(prefect_server.api_url) as client:
            counting = CountingClient(client)
            lookups = CachedLookups(counting, redactor=redactor)

            async def one_run() -> Any:
                resolved = await resolve_block_document_references(templates, lookups)
                return await resolve_variables(resolved, lookups)

            results = await asyncio.gather(*(one_run() for _ in range(10)))
            return results, counting.reads

    results, reads = asyncio.run(sweep())
    assert all(result == results[0] for result in results)
    assert len(reads) == len(set(reads))  # nothing read twice, though 10 runs resolved concurrently
    block_reads = [r for r in reads if r[0] != "variable"]
    # 5 by name; 3 of the 4 `$ref`s by id: the wrapper was already known from its read by name. (A
    # document first read by id is read again by name: its type's slug is not in the answer we model.)
    assert len(block_reads) == 8
    # Secret fields (and credential-like keys) are masked; a region or a user name stays readable.
    text = f"token {SECRET_VALUE} password {PASSWORD} user alice in eu-west-1"
    assert redactor.redact(text) == f"token {MASK} password {MASK} user alice in eu-west-1"
