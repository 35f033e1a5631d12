"""`{{ placeholder }}` rendering, block document references and Prefect
variables, with the same results as Prefect's `prefect.utilities.templating`.

Three passes, in the order a Prefect worker runs them:

1. `apply_values(template, values)` fills standard placeholders (`{{ image }}`,
   `{{ a.b[0] }}`) from the job variables and `{{ $NAME }}` from the
   environment. A string that is exactly one standard placeholder takes the
   value with its type; anywhere else a value becomes `str(value)`. A missing
   value removes its dict key or list item (or becomes `""` inside a longer
   string). Block and variable placeholders are left for the next passes.
2. `resolve_block_document_references(template, lookups)` replaces every
   `{"$ref": {"block_document_id": ...}}` dict with that block's data and every
   `{{ prefect.blocks.<type-slug>.<name>[.<keypath>] }}` with the block's value.
3. `resolve_variables(template, lookups)` replaces
   `{{ prefect.variables.<name> }}` with the variable's value.

`CachedLookups` wraps the Prefect client for one dispatcher invocation: each
block document and variable is read once, and every string in block data is
registered as a secret with the log redactor.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import os
import re
from collections.abc import Awaitable, Callable, Hashable, Iterator
from typing import Any, NamedTuple, Optional, Protocol, TypeVar, Union
from uuid import UUID

from dispatcher.logs import Redactor
from dispatcher.models import BlockDocument, Variable
from dispatcher.prefect_client import ObjectNotFound

T = TypeVar("T")

PLACEHOLDER_PATTERN = re.compile(r"{{\s*([\w\.\-\[\]$]+)\s*}}")
BLOCK_PREFIX = "prefect.blocks."
VARIABLE_PREFIX = "prefect.variables."
ENV_VAR_PREFIX = "$"


class TemplateError(Exception):
    """A job configuration cannot be built. The message says what to fix and
    never contains a secret value: it becomes the flow run's CRASHED message."""


class _NotSetType:
    """The value of a placeholder that has no value."""

    _instance: Optional["_NotSetType"] = None

    def __new__(cls) -> "_NotSetType":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NOTSET"

    def __bool__(self) -> bool:
        return False


NOTSET = _NotSetType()


# ---------------------------------------------------------------- placeholders


class PlaceholderType(enum.Enum):
    STANDARD = "standard"
    BLOCK_DOCUMENT = "block_document"
    VARIABLE = "variable"
    ENV_VAR = "env_var"


class Placeholder(NamedTuple):
    full_match: str
    name: str
    type: PlaceholderType

    @classmethod
    def from_match(cls, match: re.Match[str]) -> "Placeholder":
        name = match.group(1)
        return cls(match.group(0), name, placeholder_type(name))


def placeholder_type(name: str) -> PlaceholderType:
    if name.startswith(BLOCK_PREFIX):
        return PlaceholderType.BLOCK_DOCUMENT
    if name.startswith(VARIABLE_PREFIX):
        return PlaceholderType.VARIABLE
    if name.startswith(ENV_VAR_PREFIX):
        return PlaceholderType.ENV_VAR
    return PlaceholderType.STANDARD


def placeholders_in(text: str) -> list[Placeholder]:
    """The distinct placeholders of one string, in order of first appearance."""
    return list(dict.fromkeys(Placeholder.from_match(m) for m in PLACEHOLDER_PATTERN.finditer(text)))


def find_placeholders(template: Any) -> set[Placeholder]:
    """Every placeholder in a template (strings, nested in dicts and lists)."""
    if template is None or isinstance(template, (bool, int, float)):
        return set()
    if isinstance(template, str):
        return set(placeholders_in(template))
    if isinstance(template, dict):
        return set().union(*(find_placeholders(value) for value in template.values()))
    if isinstance(template, list):
        return set().union(*(find_placeholders(item) for item in template))
    raise TemplateError(f"Unexpected value of type {type(template).__name__} in a job template")


def _sole_placeholder(text: str, placeholders: list[Placeholder]) -> Optional[Placeholder]:
    """The placeholder that is the whole string, if the string is exactly one."""
    if len(placeholders) == 1 and placeholders[0].full_match == text:
        return placeholders[0]
    return None


def get_from_path(data: Any, path: str, default: Any = NOTSET) -> Any:
    """The value at a dotted path with `[i]` indexes (`a.b[0].c`) or `default`.

    As in Prefect, every part that parses as an integer is used as an index
    (so `a.0` indexes a list and never reads a dict key `"0"`).
    """
    value = data
    for part in path.replace("[", ".").replace("]", "").split("."):
        key: Union[str, int] = part
        try:
            key = int(part)
        except ValueError:
            pass
        try:
            value = value[key]
        except (TypeError, KeyError, IndexError):
            return default
    return value


# ---------------------------------------------------------------- pass 1: values


def apply_values(template: Any, values: dict[str, Any], remove_notset: bool = True) -> Any:
    """Fill standard and `$ENV` placeholders; see the module docstring.

    Returns `NOTSET` when `template` itself is a whole-string placeholder that
    has no value.
    """
    if template is NOTSET or template is None or isinstance(template, (bool, int, float)):
        return template
    if isinstance(template, str):
        return _apply_to_string(template, values, remove_notset)
    if isinstance(template, dict):
        rendered: dict[str, Any] = {}
        for key, value in template.items():
            new_value = apply_values(value, values, remove_notset)
            if new_value is not NOTSET:
                rendered[key] = new_value
            elif not remove_notset:
                rendered[key] = value
        return rendered
    if isinstance(template, list):
        items = (apply_values(item, values, remove_notset) for item in template)
        return [item for item in items if item is not NOTSET]
    raise TemplateError(f"Unexpected value of type {type(template).__name__} in a job template")


def _apply_to_string(text: str, values: dict[str, Any], remove_notset: bool) -> Any:
    placeholders = placeholders_in(text)
    sole = _sole_placeholder(text, placeholders)
    if sole is not None and sole.type is PlaceholderType.STANDARD:
        return get_from_path(values, sole.name)
    if not placeholders:
        return text

    def substitute(match: re.Match[str]) -> str:
        placeholder = Placeholder.from_match(match)
        if placeholder.type is PlaceholderType.STANDARD:
            value = get_from_path(values, placeholder.name)
        elif placeholder.type is PlaceholderType.ENV_VAR:
            value = os.environ.get(placeholder.name.lstrip(ENV_VAR_PREFIX), NOTSET)
        else:
            return placeholder.full_match
        if value is NOTSET:
            return "" if remove_notset else placeholder.full_match
        return str(value)

    return PLACEHOLDER_PATTERN.sub(substitute, text)


# ---------------------------------------------------------------- lookups


class Lookups(Protocol):
    """What the block and variable passes read. `PrefectClient` is one; so is
    `CachedLookups`. Block reads raise `ObjectNotFound` for a missing block."""

    async def read_block_document(self, block_document_id: Union[UUID, str]) -> BlockDocument: ...

    async def read_block_document_by_name(self, block_type_slug: str, name: str) -> BlockDocument: ...

    async def read_variable_by_name(self, name: str) -> Optional[Variable]: ...


class CachedLookups:
    """Reads each block document and variable once per dispatcher invocation
    (concurrent callers share one read), and registers every string of block
    data with `redactor` so no secret a block holds is ever logged.

    A missing block or variable is remembered too; any other failure (the API
    unreachable) is not, so a later call tries again.
    """

    def __init__(self, client: Lookups, *, redactor: Optional[Redactor] = None):
        self._client = client
        self._redactor = redactor
        self._reads: dict[Hashable, asyncio.Future[Any]] = {}

    async def read_block_document(self, block_document_id: Union[UUID, str]) -> BlockDocument:
        key = ("block", _uuid_or_str(block_document_id))
        return await self._once(key, lambda: self._read_block(self._client.read_block_document(block_document_id)))

    async def read_block_document_by_name(self, block_type_slug: str, name: str) -> BlockDocument:
        key = ("block-name", block_type_slug, name)
        return await self._once(
            key, lambda: self._read_block(self._client.read_block_document_by_name(block_type_slug, name))
        )

    async def read_variable_by_name(self, name: str) -> Optional[Variable]:
        return await self._once(("variable", name), lambda: self._client.read_variable_by_name(name))

    async def _read_block(self, read: Awaitable[BlockDocument]) -> BlockDocument:
        document = await read
        if self._redactor is not None:
            self._redactor.add(secret_strings(document))
        by_id: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        by_id.set_result(document)
        self._reads.setdefault(("block", document.id), by_id)
        return document

    async def _once(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        future = self._reads.get(key)
        if future is None:
            future = asyncio.ensure_future(read())
            future.add_done_callback(_retrieve_exception)
            self._reads[key] = future
        try:
            return await asyncio.shield(future)
        except ObjectNotFound:
            raise
        except Exception:
            if future.done() and self._reads.get(key) is future:
                del self._reads[key]
            raise


def _retrieve_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _uuid_or_str(value: Union[UUID, str]) -> Union[UUID, str]:
    try:
        return value if isinstance(value, UUID) else UUID(str(value))
    except ValueError:
        return str(value)


CREDENTIAL_KEY_WORDS = ("secret", "password", "passwd", "token", "key", "credential", "auth")


def secret_strings(document: BlockDocument) -> Iterator[str]:
    """The values of a block to keep out of logs and messages: its schema's
    secret fields, and anything under a credential-like key (an access key id
    is not a schema secret but is still a credential). Without the schema,
    every string counts, to be safe; with it, a region or a URL stays readable."""
    secret_fields = document.secret_fields
    if secret_fields is None:
        yield from strings_in(document.data)
        return
    for path in secret_fields:
        yield from strings_in(_values_at(document.data, path.split(".")))
    yield from _credential_like_strings(document.data)


def _values_at(data: Any, parts: list[str]) -> Any:
    if not parts:
        return data
    head, rest = parts[0], parts[1:]
    if not isinstance(data, dict):
        return None
    if head == "*":
        return [_values_at(value, rest) for value in data.values()]
    return _values_at(data.get(head), rest)


def _credential_like_strings(data: Any) -> Iterator[str]:
    if isinstance(data, dict):
        for key, value in data.items():
            if any(word in str(key).lower() for word in CREDENTIAL_KEY_WORDS):
                yield from strings_in(value)
            else:
                yield from _credential_like_strings(value)
    elif isinstance(data, list):
        for item in data:
            yield from _credential_like_strings(item)


def strings_in(data: Any) -> Iterator[str]:
    """Every string value nested in `data` (not the dict keys)."""
    if isinstance(data, str):
        yield data
    elif isinstance(data, dict):
        for value in data.values():
            yield from strings_in(value)
    elif isinstance(data, list):
        for item in data:
            yield from strings_in(item)


# ---------------------------------------------------------------- pass 2: blocks


async def resolve_block_document_references(template: Any, lookups: Lookups) -> Any:
    """Replace `{"$ref": {"block_document_id": ...}}` dicts with the block's
    data and `{{ prefect.blocks.<slug>.<name>[.<keypath>] }}` placeholders with
    the block's value: typed as a whole string, `str()` inside a longer one."""
    if isinstance(template, dict):
        block_document_id = _block_reference(template)
        if block_document_id:
            return copy.deepcopy((await _read_referenced_block(lookups, block_document_id)).data)
        return {key: await resolve_block_document_references(value, lookups) for key, value in template.items()}
    if isinstance(template, list):
        return [await resolve_block_document_references(item, lookups) for item in template]
    if isinstance(template, str):
        return await _resolve_block_placeholders(template, lookups)
    return template


def _block_reference(template: dict[str, Any]) -> Any:
    reference = template.get("$ref")
    return reference.get("block_document_id") if isinstance(reference, dict) else None


async def _read_referenced_block(lookups: Lookups, block_document_id: Any) -> BlockDocument:
    try:
        UUID(str(block_document_id))
    except ValueError:
        raise TemplateError(
            f"Block document reference {str(block_document_id)[:40]!r} in the job configuration "
            "is not a block document id"
        ) from None
    try:
        return await lookups.read_block_document(str(block_document_id))
    except ObjectNotFound:
        raise TemplateError(
            f"Block document {block_document_id} referenced by the job configuration no longer exists (deleted?)"
        ) from None


async def _resolve_block_placeholders(text: str, lookups: Lookups) -> Any:
    placeholders = placeholders_in(text)
    if not any(p.type is PlaceholderType.BLOCK_DOCUMENT for p in placeholders):
        return text
    sole = _sole_placeholder(text, placeholders)
    if sole is not None:
        return await _block_placeholder_value(sole, lookups)
    for placeholder in placeholders:
        if placeholder.type is not PlaceholderType.BLOCK_DOCUMENT:
            continue
        value = await _block_placeholder_value(placeholder, lookups)
        if isinstance(value, (dict, list)):
            kind = "an object" if isinstance(value, dict) else "a list"
            raise TemplateError(
                f"Placeholder {placeholder.full_match} resolves to {kind}, which cannot be put inside "
                "a longer string; reference one of its values instead (for example a '.value' or '.url' keypath)"
            )
        text = text.replace(placeholder.full_match, str(value))
    return text


async def _block_placeholder_value(placeholder: Placeholder, lookups: Lookups) -> Any:
    parts = placeholder.name.replace(BLOCK_PREFIX, "").split(".", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise TemplateError(
            f"Placeholder {{{{ {placeholder.name} }}}} must be "
            "prefect.blocks.<block-type-slug>.<block-document-name>[.<keypath>]"
        )
    slug, name, *rest = parts
    keypath = rest[0] if rest else None
    try:
        document = await lookups.read_block_document_by_name(slug, name)
    except ObjectNotFound:
        raise TemplateError(
            f"Block '{slug}/{name}' not found (referenced as {{{{ {placeholder.name} }}}}; deleted or misspelt?)"
        ) from None

    value: Any = document.data
    if _unwraps_value(value, keypath):
        value = value["value"]
    if keypath is not None:
        value = get_from_path(value, keypath)
        if value is NOTSET:
            raise TemplateError(f"Block '{slug}/{name}' has no value at '{keypath}' ({{{{ {placeholder.name} }}}})")
    return copy.deepcopy(value)


def _unwraps_value(data: dict[str, Any], keypath: Optional[str]) -> bool:
    """Blocks whose data is only `value` (Secret, String, JSON...) resolve to
    that value, unless the keypath itself starts at `value`."""
    if len(data) != 1 or "value" not in data:
        return False
    return keypath is None or not (keypath == "value" or keypath.startswith(("value.", "value[")))


# ---------------------------------------------------------------- pass 3: variables


async def resolve_variables(template: Any, lookups: Lookups) -> Any:
    """Replace `{{ prefect.variables.<name> }}` with the variable's value:
    typed as a whole string, `str()` inside a longer one, `""` if missing."""
    if isinstance(template, dict):
        return {key: await resolve_variables(value, lookups) for key, value in template.items()}
    if isinstance(template, list):
        return [await resolve_variables(item, lookups) for item in template]
    if isinstance(template, str):
        return await _resolve_variable_placeholders(template, lookups)
    return template


async def _resolve_variable_placeholders(text: str, lookups: Lookups) -> Any:
    placeholders = placeholders_in(text)
    if not any(p.type is PlaceholderType.VARIABLE for p in placeholders):
        return text
    sole = _sole_placeholder(text, placeholders)
    if sole is not None:
        value = await _variable_value(sole, lookups)
        return "" if value is NOTSET else value
    for placeholder in placeholders:
        if placeholder.type is PlaceholderType.VARIABLE:
            value = await _variable_value(placeholder, lookups)
            text = text.replace(placeholder.full_match, "" if value is NOTSET else str(value))
    return text


async def _variable_value(placeholder: Placeholder, lookups: Lookups) -> Any:
    variable = await lookups.read_variable_by_name(placeholder.name.replace(VARIABLE_PREFIX, ""))
    return NOTSET if variable is None else variable.value
