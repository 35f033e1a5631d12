"""The Prefect half of provisioning: the credentials block (registering its
type and schema when the server has none, as OSS servers without prefect-aws
do), the pool's template defaults, and the local profile's Docker namespace."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from dispatcher.models import BlockDocument
from dispatcher.prefect_client import ObjectNotFound, PrefectClient
from dispatcher.settings import prefect_home

AWS_CREDENTIALS_SLUG = "aws-credentials"

# The schema prefect-aws registers for `AwsCredentials` (field names and the
# secret field as prefect-aws has them), so blocks made here open in the UI and
# in prefect-aws alike.
AWS_CLIENT_PARAMETERS_SCHEMA: dict[str, Any] = {
    "title": "AwsClientParameters",
    "description": "Extra parameters to initialize the boto3 client.",
    "type": "object",
    "properties": {
        "api_version": {"title": "API Version", "description": "The API version to use.", "type": "string"},
        "use_ssl": {"title": "Use SSL", "description": "Whether or not to use SSL.", "default": True, "type": "boolean"},
        "verify": {
            "title": "Verify",
            "description": "Whether or not to verify SSL certificates.",
            "default": True,
            "anyOf": [{"type": "boolean"}, {"type": "string", "format": "file-path"}],
        },
        "verify_cert_path": {
            "title": "Certificate Authority Bundle File Path",
            "description": "Path to the CA cert bundle to use.",
            "format": "file-path",
            "type": "string",
        },
        "endpoint_url": {
            "title": "Endpoint URL",
            "description": "The complete URL to use for the constructed client.",
            "type": "string",
        },
        "config": {"title": "Botocore Config", "description": "Advanced configuration for Botocore clients.", "type": "object"},
    },
}

AWS_CREDENTIALS_SCHEMA: dict[str, Any] = {
    "title": "AwsCredentials",
    "description": "Block used to manage authentication with AWS (boto3's credential options).",
    "type": "object",
    "properties": {
        "aws_access_key_id": {"title": "AWS Access Key ID", "description": "A specific AWS access key ID.", "type": "string"},
        "aws_secret_access_key": {
            "title": "AWS Access Key Secret",
            "description": "A specific AWS secret access key.",
            "type": "string",
            "writeOnly": True,
            "format": "password",
        },
        "aws_session_token": {
            "title": "AWS Session Token",
            "description": "The session key for your AWS account. Only needed for temporary credentials.",
            "type": "string",
        },
        "profile_name": {"title": "Profile Name", "description": "The profile to use when creating your session.", "type": "string"},
        "region_name": {"title": "Region Name", "description": "The AWS Region where you want to create new connections.", "type": "string"},
        "aws_client_parameters": {
            "title": "AWS Client Parameters",
            "description": "Extra parameters to initialize the Client.",
            "allOf": [{"$ref": "#/definitions/AwsClientParameters"}],
        },
    },
    "block_type_slug": AWS_CREDENTIALS_SLUG,
    "secret_fields": ["aws_secret_access_key"],
    "block_schema_references": {},
    "definitions": {"AwsClientParameters": AWS_CLIENT_PARAMETERS_SCHEMA},
}


async def ensure_aws_credentials_block_type(client: PrefectClient) -> tuple[str, str]:
    """The ids of the `aws-credentials` block type and its newest schema,
    registering both when the server does not have them."""
    try:
        block_type = (await client.request("GET", f"block_types/slug/{AWS_CREDENTIALS_SLUG}")).json()
    except ObjectNotFound:
        block_type = (
            await client.request(
                "POST",
                "block_types/",
                json={
                    "name": "AWS Credentials",
                    "slug": AWS_CREDENTIALS_SLUG,
                    "description": "Credentials for AWS (access key, session token, profile, region).",
                    "logo_url": None,
                    "documentation_url": None,
                    "code_example": None,
                },
            )
        ).json()
    block_type_id = block_type["id"]
    schemas = (
        await client.request(
            "POST",
            "block_schemas/filter",
            json={"block_schemas": {"block_type_id": {"any_": [block_type_id]}}, "limit": 1},
        )
    ).json()
    if schemas:
        return block_type_id, schemas[0]["id"]
    schema = (
        await client.request(
            "POST",
            "block_schemas/",
            json={"block_type_id": block_type_id, "capabilities": [], "version": "pushpool", "fields": AWS_CREDENTIALS_SCHEMA},
        )
    ).json()
    return block_type_id, schema["id"]


async def read_block(client: PrefectClient, name: str) -> Optional[BlockDocument]:
    try:
        return await client.read_block_document_by_name(AWS_CREDENTIALS_SLUG, name)
    except ObjectNotFound:
        return None


async def create_aws_credentials_block(client: PrefectClient, name: str, data: dict[str, Any]) -> BlockDocument:
    block_type_id, block_schema_id = await ensure_aws_credentials_block_type(client)
    return await client.create_block_document(name, block_type_id, block_schema_id, data)


# ---------------------------------------------------------------- template defaults


def set_template_defaults(template: dict[str, Any], values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A copy of `template` with `values` as variable defaults; also the names
    the template has no variable for (left out, reported to the user)."""
    template = copy.deepcopy(template)
    properties = template.get("variables", {}).get("properties", {})
    missing = []
    for name, value in values.items():
        if name in properties:
            properties[name]["default"] = value
        else:
            missing.append(name)
    return template, missing


def clear_template_defaults(template: dict[str, Any], values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A copy of `template` without the defaults provisioning set: a default is
    removed only while it still equals what was set (a user's change stays)."""
    template = copy.deepcopy(template)
    properties = template.get("variables", {}).get("properties", {})
    cleared = []
    for name, value in values.items():
        prop = properties.get(name)
        if isinstance(prop, dict) and "default" in prop and prop["default"] == value:
            del prop["default"]
            cleared.append(name)
    return template, cleared


# ---------------------------------------------------------------- the local Prefect profile


def profiles_path(environ: Optional[Mapping[str, str]] = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("PREFECT_PROFILES_PATH") or prefect_home(env) / "profiles.toml")


def set_profile_setting(name: str, value: str, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Set `name = value` in the active profile of an existing profiles file, as
    `prefect config set` would. Returns the profile's name, or None when there
    is no profiles file (nothing is created then)."""
    import tomllib

    env = os.environ if environ is None else environ
    path = profiles_path(env)
    if not path.is_file():
        return None
    document = tomllib.loads(path.read_text())
    active = env.get("PREFECT_PROFILE") or document.get("active") or "ephemeral"
    document.setdefault("profiles", {}).setdefault(active, {})[name] = value
    path.write_text(_dump_toml(document))
    return active


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "-_" for c in key) else _toml_value(key)


def _dump_toml(document: dict[str, Any], prefix: tuple[str, ...] = ()) -> str:
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in document.items() if not isinstance(v, dict)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in document.items():
        if isinstance(value, dict):
            path = prefix + (key,)
            scalars = any(not isinstance(v, dict) for v in value.values()) or not value
            header = f"\n[{'.'.join(_toml_key(p) for p in path)}]\n" if scalars else ""
            out += header + _dump_toml(value, path)
    return out
