"""`dispatcher.templating` against Prefect's own `prefect.utilities.templating`
(the installed `prefect` package is the oracle), plus the lookup cache."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any, Optional
from uuid import UUID, uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prefect.utilities.annotations import NotSet
from prefect.utilities.templating import apply_values as prefect_apply_values
from prefect.utilities.templating import find_placeholders as prefect_find_placeholders

from dispatcher.logs import MASK, Redactor
from dispatcher.models import BlockDocument, Variable
from dispatcher.prefect_client import ObjectNotFound, PrefectUnreachable
from dispatcher.templating import (
    NOTSET,
    CachedLookups,
    TemplateError,
    apply_values,
    find_placeholders,
    get_from_path,
    resolve_block_document_references,
    resolve_variables,
)

ENV_NAME = "PUSHPOOL_TEMPLATING_TEST_ENV"
ENV_VALUE = "from the environment"


@pytest.fixture(scope="module", autouse=True)
def test_environment() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_NAME, ENV_VALUE)
        patch.delenv("PUSHPOOL_TEMPLATING_UNSET", raising=False)
        yield


def same(a: Any, b: Any) -> bool:
    """Equal with types (True is not 1, 1 is not 1.0) and key order."""
    return json.dumps(a, default=repr) == json.dumps(b, default=repr)


def prefect_result(template: Any, values: dict[str, Any], remove_notset: bool = True) -> Any:
    result = prefect_apply_values(template, values, remove_notset=remove_notset)
    return NOTSET if result is NotSet else result


# ---------------------------------------------------------------- strategies

# Values never contain braces: Prefect substitutes a string's placeholders one by
# one in set (hash) order, so a value that itself contains "{{ x }}" would make
# its result depend on that order.
text = st.text(st.characters(blacklist_characters="{}", blacklist_categories=("Cs",)), max_size=8)
# Finite floats only: job variables and templates reach the dispatcher as JSON,
# which has no NaN or infinity.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-1000, 1000), st.floats(allow_nan=False, allow_infinity=False), text
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=6,
)
nested_values = st.fixed_dictionaries(
    {}, optional={"x": json_values, "y": st.fixed_dictionaries({}, optional={"z": json_values}), "0": json_values}
)
list_values = st.lists(st.one_of(json_values, st.fixed_dictionaries({}, optional={"k": json_values})), max_size=3)

values_strategy = st.fixed_dictionaries(
    {},
    optional={
        "a": json_values,
        "b": json_values,
        "image": json_values,
        "nested": st.one_of(nested_values, json_values),
        "lst": st.one_of(list_values, json_values),
        "s": text,
        "0": json_values,
        "x-y": json_values,
        "a_b": json_values,
        "$d": json_values,
    },
)

PLACEHOLDER_NAMES = [
    "a", "b", "image", "missing", "nested", "nested.x", "nested.y.z", "nested.0", "nested.missing",
    "nested.x.y", "lst", "lst[0]", "lst[1]", "lst[-1]", "lst.0", "lst[0].k", "lst[1].k", "lst[9]",
    "s[0]", "s.1", "0", "x-y", "a_b", "a.", "a..b", "$d", "[0]",
    f"${ENV_NAME}", f"$${ENV_NAME}", "$PUSHPOOL_TEMPLATING_UNSET", "$",
    "prefect.blocks.secret.token", "prefect.variables.region", "prefect.blocks.x",
]
names = st.one_of(
    st.sampled_from(PLACEHOLDER_NAMES),
    st.from_regex(r"[a-z0-9_\-\.\[\]$]{1,6}", fullmatch=True),
)
spacing = st.sampled_from(["", " ", "  ", "\t", " \n"])


@st.composite
def placeholders(draw: st.DrawFn) -> str:
    return "{{" + draw(spacing) + draw(names) + draw(spacing) + "}}"


template_strings = st.one_of(
    placeholders(),  # whole-string: keeps its type
    st.lists(st.one_of(text, placeholders()), min_size=0, max_size=4).map("".join),  # partial/multiple
    text,
)
templates = st.recursive(
    st.one_of(template_strings, scalars),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)),
    max_leaves=10,
)


# ---------------------------------------------------------------- apply_values vs Prefect


@settings(max_examples=1000, deadline=None)
@given(template=templates, values=values_strategy)
def test_apply_values_matches_prefect(template: Any, values: dict[str, Any]) -> None:
    assert same(apply_values(template, values), prefect_result(template, values))


@settings(max_examples=100, deadline=None)
@given(template=templates, values=values_strategy)
def test_apply_values_without_remove_notset_matches_prefect(template: Any, values: dict[str, Any]) -> None:
    assert same(apply_values(template, values, remove_notset=False), prefect_result(template, values, False))


@settings(max_examples=100, deadline=None)
@given(template=templates)
def test_find_placeholders_matches_prefect(template: Any) -> None:
    ours = {(p.full_match, p.name, p.type.value) for p in find_placeholders(template)}
    theirs = {(p.full_match, p.name, p.type.value) for p in prefect_find_placeholders(template)}
    assert ours == theirs


@settings(max_examples=150, deadline=None)
@given(data=st.one_of(values_strategy, list_values, json_values), path=names)
def test_get_from_path_matches_prefect(data: Any, path: str) -> None:
    from prefect.utilities.collections import get_from_dict

    assert same(get_from_path(data, path, default="<missing>"), get_from_dict(data, path, "<missing>"))


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ cpu }}", 1024),  # whole string keeps its type
        ("{{ flag }}", False),
        ("{{ nothing }}", None),  # explicit null is not missing
        ("cpu={{ cpu }}", "cpu=1024"),
        ("{{ flag }}/{{ nothing }}", "False/None"),  # Python str(), like Prefect
        ("{{ obj }}!", "{'k': [1, True]}!"),
        ("{{ missing }}", NOTSET),
        ("a{{ missing }}b", "ab"),
        ({"keep": "{{ nothing }}", "drop": "{{ missing }}"}, {"keep": None}),
        (["{{ missing }}", "{{ cpu }}", "x{{ missing }}"], [1024, "x"]),
        ("{{ obj.k[1] }}", True),
        (f"{{{{ ${ENV_NAME} }}}}", ENV_VALUE),
        ("{{ $PUSHPOOL_TEMPLATING_UNSET }}", ""),
        ("{{ prefect.blocks.secret.x }}-{{ cpu }}", "{{ prefect.blocks.secret.x }}-1024"),
        ("{{ prefect.variables.v }}", "{{ prefect.variables.v }}"),
        (3.5, 3.5),
        (None, None),
    ],
)
def test_apply_values_examples(template: Any, expected: Any) -> None:
    values = {"cpu": 1024, "flag": False, "nothing": None, "obj": {"k": [1, True]}}
    assert same(apply_values(template, values), expected)
    assert same(prefect_result(template, values), expected)


def test_substituted_values_are_not_rendered_again() -> None:
    assert apply_values("{{ a }}", {"a": "{{ b }}", "b": 1}) == "{{ b }}"
    assert apply_values("x{{ a }}", {"a": "{{ b }}", "b": 1}) == "x{{ b }}"


def test_unexpected_types_are_an_error() -> None:
    with pytest.raises(TemplateError):
        apply_values({"a": ("tuple",)}, {})


# ---------------------------------------------------------------- blocks and variables (unit level; the
# comparison with Prefect against a real server is in tests/integration/test_templating_blocks.py)

SECRET_ID = UUID("5af1b6a4-7f0e-4c33-9a55-6d9f0c7c1a01")
CREDS_ID = UUID("5af1b6a4-7f0e-4c33-9a55-6d9f0c7c1a02")


class FakeLookups:
    """In-memory blocks and variables that count reads."""

    def __init__(self, *, delay: float = 0):
        self.blocks = {
            ("secret", "token"): BlockDocument(id=SECRET_ID, name="token", data={"value": "s3cr3t-token-value"}),
            ("creds", "prod"): BlockDocument(
                id=CREDS_ID,
                name="prod",
                data={"user": "alice", "password": "hunter2-password", "region": "eu-west-1", "ports": [80, 443]},
            ),
            ("json", "cfg"): BlockDocument(id=uuid4(), name="cfg", data={"value": {"a": {"b": [1, 2]}, "values": 3}}),
        }
        self.variables = {"region": "eu-west-1", "count": 3, "nothing": None, "listy": [1, "a"]}
        self.reads: list[tuple[str, ...]] = []
        self.delay = delay
        self.fail_next: Optional[Exception] = None

    async def _read(self, *key: str) -> None:
        self.reads.append(key)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error

    async def read_block_document(self, block_document_id: UUID | str) -> BlockDocument:
        await self._read("id", str(block_document_id))
        for document in self.blocks.values():
            if str(document.id) == str(block_document_id):
                return document
        raise ObjectNotFound("GET", f"/block_documents/{block_document_id}", 404, "Block document not found")

    async def read_block_document_by_name(self, block_type_slug: str, name: str) -> BlockDocument:
        await self._read("name", block_type_slug, name)
        try:
            return self.blocks[(block_type_slug, name)]
        except KeyError:
            raise ObjectNotFound("GET", "/block_types/...", 404, "Block document not found") from None

    async def read_variable_by_name(self, name: str) -> Optional[Variable]:
        await self._read("variable", name)
        if name not in self.variables:
            return None
        return Variable(name=name, value=self.variables[name])


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ({"creds": {"$ref": {"block_document_id": str(CREDS_ID)}}}, {"creds": FakeLookups().blocks[("creds", "prod")].data}),
        ("{{ prefect.blocks.secret.token }}", "s3cr3t-token-value"),  # single `value` is unwrapped
        ("{{ prefect.blocks.secret.token.value }}", "s3cr3t-token-value"),
        ("Bearer {{ prefect.blocks.secret.token }}", "Bearer s3cr3t-token-value"),
        ("{{ prefect.blocks.creds.prod.ports }}", [80, 443]),
        ("{{ prefect.blocks.creds.prod.ports[1] }}", 443),
        ("port {{ prefect.blocks.creds.prod.ports[0] }}", "port 80"),
        ("{{ prefect.blocks.json.cfg.a.b }}", [1, 2]),
        ("{{ prefect.blocks.json.cfg.value.values }}", 3),
        ("{{ prefect.blocks.json.cfg.values }}", 3),
        (["{{ prefect.blocks.creds.prod.user }}", 5, None], ["alice", 5, None]),
        ("{{ prefect.variables.region }} {{ image }}", "{{ prefect.variables.region }} {{ image }}"),
    ],
)
def test_block_references(template: Any, expected: Any) -> None:
    assert same(run(resolve_block_document_references(template, FakeLookups())), expected)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ({"$ref": {"block_document_id": str(uuid4())}}, "referenced by the job configuration no longer exists (deleted?)"),
        ({"$ref": {"block_document_id": "not-an-id"}}, "is not a block document id"),
        ("{{ prefect.blocks.aws-credentials.my-creds }}", "Block 'aws-credentials/my-creds' not found"),
        ("{{ prefect.blocks.secret }}", "must be prefect.blocks.<block-type-slug>.<block-document-name>"),
        ("{{ prefect.blocks.creds.prod.nope }}", "Block 'creds/prod' has no value at 'nope'"),
        ("x {{ prefect.blocks.creds.prod }}", "resolves to an object, which cannot be put inside a longer string"),
    ],
)
def test_block_reference_errors(template: Any, message: str) -> None:
    with pytest.raises(TemplateError) as info:
        run(resolve_block_document_references(template, FakeLookups()))
    assert message in str(info.value)
    assert "hunter2" not in str(info.value) and "s3cr3t" not in str(info.value)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ prefect.variables.region }}", "eu-west-1"),
        ("{{ prefect.variables.count }}", 3),
        ("{{ prefect.variables.nothing }}", None),
        ("{{ prefect.variables.listy }}", [1, "a"]),
        ("{{ prefect.variables.missing }}", ""),  # the key stays, with ""
        ("n={{ prefect.variables.count }}/{{ prefect.variables.missing }}", "n=3/"),
        ({"a": ["{{ prefect.variables.count }}"]}, {"a": [3]}),
        ("{{ prefect.blocks.secret.token }}", "{{ prefect.blocks.secret.token }}"),
    ],
)
def test_variables(template: Any, expected: Any) -> None:
    assert same(run(resolve_variables(template, FakeLookups())), expected)


# ---------------------------------------------------------------- CachedLookups


def test_cached_lookups_read_each_block_and_variable_once_and_register_secrets() -> None:
    fake = FakeLookups(delay=0.01)
    redactor = Redactor()
    lookups = CachedLookups(fake, redactor=redactor)
    template = {
        "a": "{{ prefect.blocks.creds.prod.user }}",
        "b": "{{ prefect.blocks.creds.prod.password }}",
        "c": {"$ref": {"block_document_id": str(CREDS_ID)}},  # same block, by id: already known
        "d": "{{ prefect.variables.region }}-{{ prefect.variables.missing }}",
    }

    async def many_runs() -> list[Any]:
        rendered = await asyncio.gather(
            *(resolve_block_document_references(template, lookups) for _ in range(20))
        )
        return await asyncio.gather(*(resolve_variables(r, lookups) for r in rendered))

    results = run(many_runs())
    assert all(r == results[0] for r in results)
    assert sorted(fake.reads) == [("name", "creds", "prod"), ("variable", "missing"), ("variable", "region")]
    # every string in block data counts as secret (the redactor ignores strings under 4 characters)
    assert redactor.redact("user alice pw hunter2-password in eu-west-1") == f"user {MASK} pw {MASK} in {MASK}"
    assert redactor.redact("region") == "region"  # variables are not secrets


def test_cached_lookups_remember_missing_blocks_but_retry_transient_failures() -> None:
    fake = FakeLookups()
    lookups = CachedLookups(fake)

    async def scenario() -> None:
        for _ in range(2):
            with pytest.raises(ObjectNotFound):
                await lookups.read_block_document_by_name("secret", "gone")
        fake.fail_next = PrefectUnreachable("down")
        with pytest.raises(PrefectUnreachable):
            await lookups.read_block_document(SECRET_ID)
        assert (await lookups.read_block_document(str(SECRET_ID))).data == {"value": "s3cr3t-token-value"}
        assert await lookups.read_variable_by_name("missing") is None
        assert await lookups.read_variable_by_name("missing") is None

    run(scenario())
    assert fake.reads == [
        ("name", "secret", "gone"),
        ("id", str(SECRET_ID)),
        ("id", str(SECRET_ID)),
        ("variable", "missing"),
    ]


def test_placeholder_names() -> None:
    # Prefect's pattern: word characters, dots, dashes, brackets and $; anything else is plain text.
    found = find_placeholders({"a": ["{{ a.b-c[0]$ }} {{ a b }} {{ a/b }} {{}}", "{{ prefect.variables.v }}"], "b": 1})
    assert {(p.name, p.type.value) for p in found} == {("a.b-c[0]$", "standard"), ("prefect.variables.v", "variable")}


def test_secret_strings_follow_the_schema_and_credential_like_keys():
    from uuid import uuid4

    from dispatcher.models import BlockDocument, BlockSchema
    from dispatcher.templating import secret_strings

    data = {
        "aws_access_key_id": "AKIAEXAMPLE",
        "aws_secret_access_key": "s3cr3t-value",
        "region_name": "eu-west-1",
        "headers": {"X-Token": "tok-123", "Accept": "json"},
        "aws_client_parameters": {"endpoint_url": "http://127.0.0.1:5000"},
    }
    schema = BlockSchema(id=uuid4(), checksum="x", fields={"secret_fields": ["aws_secret_access_key", "headers.*"]})
    with_schema = BlockDocument(id=uuid4(), data=data, block_schema=schema)
    assert set(secret_strings(with_schema)) == {"s3cr3t-value", "tok-123", "json", "AKIAEXAMPLE"}
    without_schema = BlockDocument(id=uuid4(), data=data)
    assert "eu-west-1" in set(secret_strings(without_schema))  # unknown schema: every string is kept secret
