"""Job variables: how a deployment's and a flow run's overrides combine, and
whether they satisfy the work pool's `variables` schema.

`merge_job_variables` is the merge a Prefect worker does before rendering
(`BaseJobConfiguration.resolve_for_flow_run`). `validate_job_variables` accepts
exactly what the Prefect server accepts when a flow run is created
(`prefect/server/api/validation.py`): the schema is "fixed" the same way (optional
properties also allow null, tuple `items` become `prefixItems`, block types may
be given as a `$ref` to a block document), invalid defaults are ignored, and
required variables are checked unless an invalid default was ignored.

`jsonschema` is imported inside the functions that use it: the dispatcher's cold
start should not pay for it unless a run is actually validated.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional
from uuid import UUID

from dispatcher.prefect_client import ObjectNotFound
from dispatcher.templating import Lookups, TemplateError

if TYPE_CHECKING:
    from jsonschema.exceptions import ValidationError as JSONSchemaError

#: a value under a key whose name matches this is never shown in a message
SECRET_KEY_PATTERN = re.compile(r"secret|key|token|password|passwd|credential|auth", re.IGNORECASE)
#: strings longer than this are never shown in a message (they may be secrets: an AWS secret key has 40 characters)
MAX_SHOWN_STRING = 24

#: what the Prefect server lets stand for a block-typed variable: a `$ref` to a block document
_BLOCK_REFERENCE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "$ref": {
            "oneOf": [
                {"type": "string", "format": "uuid"},
                {"type": "object", "additionalProperties": {"type": "string"}, "minProperties": 1},
            ]
        }
    },
    "required": ["$ref"],
}


INVALID_SCHEMA = "The work pool's job variables schema is not a valid JSON schema"


class InvalidJobVariables(TemplateError):
    """Job variables (or the configuration rendered from them) do not fit the
    work pool's schema. The message names the variable and what was expected."""


# ---------------------------------------------------------------- merge


def merge_job_variables(
    deployment_vars: Optional[Mapping[str, Any]], flow_run_vars: Optional[Mapping[str, Any]]
) -> dict[str, Any]:
    """The deployment's job variables overridden by the flow run's.

    Each flow-run key replaces the deployment's as a whole, except `env`: when
    both are objects they are merged key by key (the flow run wins). Neither
    input is modified.
    """
    merged = copy.deepcopy(dict(deployment_vars or {}))
    overrides = copy.deepcopy(dict(flow_run_vars or {}))
    if isinstance(merged.get("env"), dict) and isinstance(overrides.get("env"), dict):
        merged["env"] = {**merged["env"], **overrides.pop("env")}
    merged.update(overrides)
    return merged


# ---------------------------------------------------------------- defaults


async def hydrate_defaults(variables_schema: Mapping[str, Any], lookups: Lookups) -> dict[str, Any]:
    """The schema's defaults as the server validates them: every property that
    has a `default` (null included), with a `{"$ref": {"block_document_id": ...}}`
    default replaced by that block document's data."""
    defaults: dict[str, Any] = {}
    for name, attrs in _properties(variables_schema).items():
        if "default" not in attrs:
            continue
        default = attrs["default"]
        if isinstance(default, dict) and "$ref" in default:
            block_document_id = _block_document_id(default["$ref"])
            if block_document_id is None:
                continue
            default = await _read_default_block(lookups, name, block_document_id)
        defaults[name] = default
    return defaults


def _properties(variables_schema: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    properties = variables_schema.get("properties") if isinstance(variables_schema, Mapping) else None
    if not isinstance(properties, dict):
        return {}
    return {name: attrs for name, attrs in properties.items() if isinstance(attrs, dict)}


def _block_document_id(reference: Any) -> Any:
    return reference.get("block_document_id") if isinstance(reference, dict) else None


async def _read_default_block(lookups: Lookups, variable: str, block_document_id: Any) -> Any:
    try:
        UUID(str(block_document_id))
    except ValueError:
        raise TemplateError(
            f"The default of job variable '{variable}' refers to block document "
            f"{str(block_document_id)[:40]!r}, which is not a block document id"
        ) from None
    try:
        document = await lookups.read_block_document(str(block_document_id))
    except ObjectNotFound:
        raise TemplateError(
            f"Block document {block_document_id} used as the default of job variable '{variable}' "
            "no longer exists (deleted?)"
        ) from None
    return document.data


# ---------------------------------------------------------------- validation


def validate_job_variables(
    variables_schema: Mapping[str, Any],
    defaults_hydrated: Mapping[str, Any],
    *job_variable_layers: Optional[Mapping[str, Any]],
) -> None:
    """Raise `InvalidJobVariables` unless the Prefect server would accept these
    job variables for a flow run: the valid defaults, overridden (shallowly) by
    each layer in turn (deployment's, then flow run's), against the schema."""
    if not variables_schema:
        return
    if not isinstance(variables_schema, Mapping):
        raise InvalidJobVariables(f"{INVALID_SCHEMA}: it must be an object")
    schema = dict(variables_schema)
    _check_schema(schema, check_formats=True)
    defaults, ignored_invalid_defaults = _valid_defaults(schema, defaults_hydrated)

    variables = dict(defaults)
    for layer in job_variable_layers:
        if isinstance(layer, Mapping):
            variables.update(layer)

    fixed = preprocess_schema(schema, allow_none_with_default=True)
    if ignored_invalid_defaults:
        # Without the invalid defaults, required variables may be missing only
        # because of them: the server skips the required check then, and so do we.
        fixed = remove_nested_keys("required", fixed)
    _check_schema(fixed, check_formats=False)
    error = _best_error(_errors(variables, fixed, check_formats=False))
    if error is not None:
        raise InvalidJobVariables(explain_error(error))


def _valid_defaults(schema: dict[str, Any], defaults: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """The defaults that are valid on their own (raw schema, required ignored)."""
    without_required = remove_nested_keys("required", schema)
    valid = {
        name: default
        for name, default in defaults.items()
        if not _errors({name: default}, without_required, check_formats=True)
    }
    return valid, len(valid) != len(defaults)


def _check_schema(schema: dict[str, Any], *, check_formats: bool) -> None:
    problem = _schema_problem(json.dumps(schema, sort_keys=True, default=str), check_formats)
    if problem is not None:
        raise InvalidJobVariables(f"{INVALID_SCHEMA}: {problem}")


@functools.lru_cache(maxsize=64)
def _schema_problem(schema_json: str, check_formats: bool) -> Optional[str]:
    """Why the schema is not a valid Draft 2020-12 schema, or None. Checking a
    schema costs tens of milliseconds and a sweep sees the same few pools'
    schemas over and over, so the answers are cached."""
    from jsonschema import Draft202012Validator, SchemaError

    try:
        if check_formats:
            format_checker = Draft202012Validator.FORMAT_CHECKER
            Draft202012Validator.check_schema(json.loads(schema_json), format_checker=format_checker)
        else:
            Draft202012Validator.check_schema(json.loads(schema_json))
    except SchemaError as exc:
        return _shorten(exc.message)
    return None


def _errors(instance: dict[str, Any], schema: dict[str, Any], *, check_formats: bool) -> list["JSONSchemaError"]:
    from jsonschema import Draft202012Validator
    from referencing import Registry
    from referencing.exceptions import Unresolvable

    format_checker = Draft202012Validator.FORMAT_CHECKER if check_formats else None
    # An empty registry: local `#/definitions/...` refs resolve, remote ones are never fetched.
    validator = Draft202012Validator(schema, format_checker=format_checker, registry=Registry())
    try:
        return list(validator.iter_errors(instance))
    except Unresolvable as exc:
        raise InvalidJobVariables(
            f"The work pool's job variables schema has a reference that cannot be resolved: {exc}"
        ) from None
    except RecursionError:
        raise InvalidJobVariables("The work pool's job variables schema has a circular reference") from None


def _best_error(errors: list["JSONSchemaError"]) -> Optional["JSONSchemaError"]:
    from jsonschema.exceptions import best_match

    return best_match(errors)


# ---------------------------------------------------------------- schema fixes (as the server makes them)


def preprocess_schema(schema: Mapping[str, Any], allow_none_with_default: bool = False) -> dict[str, Any]:
    """The schema as the Prefect server validates flow-run job variables with:
    optional typed properties also accept null (only those without a default,
    unless `allow_none_with_default`), tuple-style `items` lists become
    `prefixItems`, and a block type definition also accepts a `$ref` object."""
    fixed = copy.deepcopy(dict(schema))
    if isinstance(fixed.get("properties"), dict):
        _fix_properties(fixed["properties"], fixed.get("required", []), allow_none_with_default)
    definitions = fixed.get("definitions")
    if isinstance(definitions, dict):
        for definition in list(definitions.values()):
            if not isinstance(definition, dict):
                continue
            if isinstance(definition.get("properties"), dict):
                _fix_properties(definition["properties"], definition.get("required", []), allow_none_with_default)
            if "block_type_slug" in definition and "title" in definition:
                definitions[definition["title"]] = {"oneOf": [definition, copy.deepcopy(_BLOCK_REFERENCE_SCHEMA)]}
    return fixed


def _fix_properties(properties: dict[str, Any], required: Sequence[str], allow_none_with_default: bool) -> None:
    for name, prop in properties.items():
        if not isinstance(prop, dict):
            continue
        optional = name not in required and ("default" not in prop or allow_none_with_default)
        if optional and "type" in prop and prop["type"] != "null":
            prop["anyOf"] = [{"type": prop.pop("type")}, {"type": "null"}]
        items = prop.get("items")
        if items and isinstance(items, list) and not prop.get("prefixItems"):
            prop["prefixItems"] = prop.pop("items")
        if isinstance(prop.get("properties"), dict):
            _fix_properties(prop["properties"], prop.get("required", []), allow_none_with_default)


def remove_nested_keys(key: str, obj: Any) -> Any:
    """A copy of `obj` without `key` in any dict nested in dicts (not in lists)."""
    if not isinstance(obj, dict):
        return obj
    return {k: remove_nested_keys(key, v) for k, v in obj.items() if k != key}


# ---------------------------------------------------------------- messages


def explain_error(error: "JSONSchemaError") -> str:
    """One sentence naming the variable and what was expected, without the
    offending value when it might be a secret."""
    if error.validator in ("anyOf", "oneOf") and error.context:
        fitting = _fitting_alternative_error(error)
        if fitting is not None:
            return explain_error(fitting)
    path = list(error.absolute_path)
    where = format_path(path)
    if error.validator == "required":
        missing = _missing_required(error)
        if not path:
            return f"Missing required job variable '{missing}'"
        return f"Invalid job variable '{where}': missing required key '{missing}'"
    subject = f"Invalid job variable '{where}'" if path else "Invalid job variables"
    return f"{subject}: {_what_is_wrong(error, describe_value(error.instance, sensitive=_is_sensitive(path)))}"


def _what_is_wrong(error: "JSONSchemaError", got: str) -> str:
    if error.validator == "type":
        return f"expected {_join_types([error.validator_value], error.instance)}, got {got}"
    if error.validator == "enum":
        return f"{got} is not one of {error.validator_value!r}"
    if error.validator in ("anyOf", "oneOf") and error.context:
        types = _alternative_types(error)
        if types:
            return f"expected {_join_types(types, error.instance)}, got {got}"
    if error.validator == "oneOf" and not error.context:
        return f"{got} fits more than one of the allowed forms (oneOf), so it is ambiguous"
    return _shorten(error.message.replace(repr(error.instance), got))


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _branches(error: "JSONSchemaError") -> dict[Any, list["JSONSchemaError"]]:
    """The errors of an `anyOf`/`oneOf`, by alternative."""
    branches: dict[Any, list[JSONSchemaError]] = {}
    for sub_error in error.context or []:
        branches.setdefault(sub_error.relative_schema_path[0], []).append(sub_error)
    return branches


def _type_mismatch(sub_errors: list["JSONSchemaError"]) -> Optional["JSONSchemaError"]:
    return next((e for e in sub_errors if e.validator == "type" and not e.relative_path), None)


def _fitting_alternative_error(error: "JSONSchemaError") -> Optional["JSONSchemaError"]:
    """The best error of the one alternative whose type fits the value, if
    exactly one does (`"X"` for an optional enum fails the enum, not `null`)."""
    fitting = {index: errs for index, errs in _branches(error).items() if _type_mismatch(errs) is None}
    if len(fitting) > 1:  # a block-typed variable: explain the block's own schema, not the `$ref` form
        fitting = {i: errs for i, errs in fitting.items() if error.validator_value[i] != _BLOCK_REFERENCE_SCHEMA}
    return _best_error(next(iter(fitting.values()))) if len(fitting) == 1 else None


def _alternative_types(error: "JSONSchemaError") -> list[Any]:
    """The types the alternatives expect, when every alternative failed on its type."""
    mismatches = [_type_mismatch(errs) for errs in _branches(error).values()]
    if not mismatches or any(m is None for m in mismatches):
        return []
    return [m.validator_value for m in mismatches if m is not None]


def _missing_required(error: "JSONSchemaError") -> str:
    present = error.instance if isinstance(error.instance, dict) else {}
    for name in error.validator_value or []:
        if name not in present:
            return str(name)
    return error.message.partition(" ")[0].strip("'")


def _join_types(types: list[Any], instance: Any) -> str:
    names: list[str] = []
    for entry in types:
        for name in entry if isinstance(entry, list) else [entry]:
            if name not in names:
                names.append(str(name))
    if instance is not None and len(names) > 1 and "null" in names:
        names.remove("null")  # null is usually the server's "optional" fix, not what the user meant
    return " or ".join(names)


def format_path(path: Sequence[Any]) -> str:
    """`["env", "FOO"]` -> `env.FOO`; `["items", 0, "x"]` -> `items[0].x`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _is_sensitive(path: Sequence[Any]) -> bool:
    return any(isinstance(part, str) and SECRET_KEY_PATTERN.search(part) for part in path)


def describe_value(value: Any, *, sensitive: bool = False) -> str:
    """A value for an error message: shown when short and harmless, else its kind."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean" if sensitive else str(value).lower()
    if isinstance(value, int):
        return "an integer" if sensitive else str(value)
    if isinstance(value, float):
        return "a number" if sensitive else repr(value)
    if isinstance(value, str):
        return "a string" if sensitive or len(value) > MAX_SHOWN_STRING else repr(value)
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"
