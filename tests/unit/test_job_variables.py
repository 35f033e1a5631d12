"""`dispatcher.job_variables`: the merge against Prefect's worker, and the
validation against the Prefect server's own flow-run validation (the
installed `prefect` package is the oracle)."""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, Optional
from unittest import mock
from uuid import uuid4

import prefect
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.job_variables import (
    InvalidJobVariables,
    hydrate_defaults,
    merge_job_variables,
    preprocess_schema,
    validate_job_variables,
)
from dispatcher.templating import TemplateError
from tests.unit.test_templating import CREDS_ID, FakeLookups, json_values, same, text

PREFECT_ROOT = Path(prefect.__file__).parent
AGGREGATE_METADATA = PREFECT_ROOT / "server/api/collections_data/views/aggregate-worker-metadata.json"


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def prefect_template(worker_type: str) -> dict[str, Any]:
    """A default base job template as Prefect ships it."""
    if worker_type == "process":
        from prefect.workers.process import ProcessWorker

        template = ProcessWorker.get_default_base_job_template()
        return asyncio.run(template) if inspect.isawaitable(template) else template
    metadata = json.loads(AGGREGATE_METADATA.read_text())
    return next(w for c in metadata.values() for w in c.values() if w.get("type") == worker_type)[
        "default_base_job_configuration"
    ]


# ---------------------------------------------------------------- merge vs resolve_for_flow_run


@functools.lru_cache(maxsize=1)
def _capturing_configuration() -> Any:
    """Prefect's BaseJobConfiguration, recording the job variables that
    `resolve_for_flow_run` renders with (made once: pydantic classes are slow to create)."""
    from prefect.workers.base import BaseJobConfiguration

    class Capture(BaseJobConfiguration):
        captured: ClassVar[list[dict[str, Any]]] = []

        @classmethod
        async def from_template_and_values(cls, base_job_template, values, client=None):  # type: ignore[override]
            cls.captured.append(copy.deepcopy(values))
            return cls()

        def prepare_for_flow_run(self, *args: Any, **kwargs: Any) -> None:
            pass

    return Capture


def prefect_merge(deployment_vars: Optional[dict[str, Any]], flow_run_vars: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The values Prefect's `resolve_for_flow_run` hands to `from_template_and_values`."""
    Capture = _capturing_configuration()
    captured: list[dict[str, Any]] = Capture.captured
    captured.clear()

    class Client:
        async def read_flow(self, flow_id: Any) -> Any:
            return SimpleNamespace(id=flow_id, name="f")

    flow_run = SimpleNamespace(deployment_id=uuid4(), flow_id=uuid4(), job_variables=flow_run_vars)
    deployment = SimpleNamespace(job_variables=deployment_vars)
    work_pool = SimpleNamespace(base_job_template={})
    asyncio.run(
        Capture.resolve_for_flow_run(
            flow_run, client=Client(), work_pool=work_pool, worker_name="w", deployment=deployment  # type: ignore[arg-type]
        )
    )
    return captured[0]


env_dicts = st.dictionaries(st.sampled_from(["A", "B", "C", "PATH"]), st.one_of(st.none(), text, st.integers()), max_size=3)
variable_layers = st.dictionaries(
    st.sampled_from(["env", "image", "cpu", "labels", "env.A", "nested"]),
    st.one_of(json_values, env_dicts),
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(deployment_vars=st.one_of(st.none(), variable_layers), flow_run_vars=st.one_of(st.none(), variable_layers))
def test_merge_matches_prefect(deployment_vars: Optional[dict[str, Any]], flow_run_vars: Optional[dict[str, Any]]) -> None:
    deployment_env = (deployment_vars or {}).get("env")
    flow_run_env = (flow_run_vars or {}).get("env", {})
    if isinstance(deployment_env, dict) and not isinstance(flow_run_env, dict):
        # Prefect crashes here (dict.update of a non-dict); pushpool lets the flow run's value replace it.
        assert merge_job_variables(deployment_vars, flow_run_vars)["env"] == flow_run_env
        return
    originals = copy.deepcopy((deployment_vars, flow_run_vars))
    ours = merge_job_variables(deployment_vars, flow_run_vars)
    assert (deployment_vars, flow_run_vars) == originals  # inputs untouched
    assert same(ours, prefect_merge(copy.deepcopy(deployment_vars), copy.deepcopy(flow_run_vars)))


def test_merge_examples() -> None:
    deployment = {"env": {"A": "1", "B": "2"}, "image": "d", "labels": {"x": "1"}}
    flow_run = {"env": {"B": "3", "C": None}, "labels": {"y": "2"}}
    assert merge_job_variables(deployment, flow_run) == {
        "env": {"A": "1", "B": "3", "C": None},  # env merged key by key
        "image": "d",
        "labels": {"y": "2"},  # other keys replaced as a whole
    }
    assert merge_job_variables({"env": "{{ x }}"}, {"env": {"A": "1"}}) == {"env": {"A": "1"}}
    assert merge_job_variables(None, None) == {}


# ---------------------------------------------------------------- validation vs the Prefect server

BLOCK_ID = str(CREDS_ID)

CUSTOM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["image", "cpu"],
    "properties": {
        "image": {"type": "string"},
        "cpu": {"type": "integer", "default": 1024},
        "memory": {"type": "integer", "minimum": 512},
        "launch_type": {"type": "string", "enum": ["FARGATE", "EC2"], "default": "FARGATE"},
        "network": {
            "type": "object",
            "properties": {"subnets": {"type": "array", "items": {"type": "string"}}, "public": {"type": "boolean"}},
            "required": ["subnets"],
        },
        "creds": {"allOf": [{"$ref": "#/definitions/Creds"}]},
        "env": {"type": "object", "additionalProperties": {"type": "string"}},
        "api_token": {"type": "string", "maxLength": 8},
    },
    "definitions": {
        "Creds": {
            "title": "Creds",
            "type": "object",
            "properties": {"key": {"type": "string"}},
            "required": ["key"],
            "additionalProperties": False,
            "block_type_slug": "creds",
        }
    },
}


def with_property(schema: dict[str, Any], name: str, prop: dict[str, Any]) -> dict[str, Any]:
    schema = copy.deepcopy(schema)
    schema["properties"][name] = prop
    return schema


SCHEMAS: dict[str, dict[str, Any]] = {
    "process": prefect_template("process")["variables"],
    "ecs": prefect_template("ecs")["variables"],
    "custom": CUSTOM_SCHEMA,
    # a null default is invalid on its own (type string): the server then skips the required check
    "custom-null-default": with_property(CUSTOM_SCHEMA, "region", {"type": "string", "default": None}),
    "custom-invalid-default": with_property(CUSTOM_SCHEMA, "tags", {"type": "array", "default": "not-a-list"}),
    # pydantic v1's tuple `items` list is not valid 2020-12: the server rejects the whole schema
    "custom-tuple-items": with_property(
        CUSTOM_SCHEMA, "ports", {"type": "array", "items": [{"type": "integer"}, {"type": "string"}]}
    ),
    "custom-block-default": with_property(
        CUSTOM_SCHEMA, "creds", {"allOf": [{"$ref": "#/definitions/Creds"}], "default": {"$ref": {"block_document_id": BLOCK_ID}}}
    ),
    "empty": {},
}
BLOCK_DATA = [{"key": "abc"}, {"nokey": 1}]


_schema_checks: dict[tuple[str, bool], Optional[Exception]] = {}


def _memoized_check_schema(original: Any) -> Any:
    """Prefect's own schema check, remembered per schema: checking the ECS
    schema takes ~50 ms, and the property tests check it hundreds of times."""

    def check_schema(schema: Any, format_checker: Any = None) -> None:
        key = (json.dumps(schema, sort_keys=True), format_checker is not None)
        if key not in _schema_checks:
            try:
                original(schema, **({"format_checker": format_checker} if format_checker is not None else {}))
                _schema_checks[key] = None
            except Exception as exc:  # noqa: BLE001 - re-raised below, every time
                _schema_checks[key] = exc
        if _schema_checks[key] is not None:
            raise _schema_checks[key]

    return check_schema


def server_accepts(schema: dict[str, Any], block_data: Any, *layers: Optional[dict[str, Any]]) -> bool:
    """What `validate_job_variables_for_deployment_flow_run` decides, block defaults hydrated to `block_data`."""
    from fastapi import HTTPException
    from prefect.server.api import validation
    from prefect.utilities.schema_tools import ValidationError
    from prefect.utilities.schema_tools import validation as schema_validation

    async def resolve(variable: Any, session: Any) -> Any:
        return copy.deepcopy(block_data)

    template = {"job_configuration": {}, "variables": schema} if schema else {}
    prefect_validator = schema_validation._VALIDATOR
    with mock.patch.object(validation, "_resolve_default_reference", resolve), mock.patch.object(
        prefect_validator, "check_schema", _memoized_check_schema(prefect_validator.check_schema)
    ):
        try:
            asyncio.run(
                validation._validate_work_pool_job_variables(
                    None, "pool", template, *(layer or {} for layer in layers), ignore_required=False
                )
            )
        except (ValidationError, HTTPException):
            return False
    return True


def pushpool_accepts(schema: dict[str, Any], block_data: Any, *layers: Optional[dict[str, Any]]) -> bool:
    async def hydrated() -> dict[str, Any]:
        lookups = FakeLookups()
        lookups.blocks[("creds", "x")] = lookups.blocks[("creds", "prod")].model_copy(update={"data": block_data})
        del lookups.blocks[("creds", "prod")]
        return await hydrate_defaults(schema, lookups)

    try:
        validate_job_variables(schema, asyncio.run(hydrated()), *layers)
    except InvalidJobVariables:
        return False
    return True


interesting_values = st.one_of(
    json_values,
    st.sampled_from(
        [
            "FARGATE", "EC2", "X", "busybox", "/tmp", "a" * 50, 512, 100, 1024, 2.5, True, None,
            [1, "a"], [1], ["a", 1], [], {"subnets": ["a"]}, {"subnets": "a"}, {"public": True},
            {"$ref": {"block_document_id": BLOCK_ID}}, {"$ref": BLOCK_ID}, {"$ref": {}}, {"key": "k"},
            {"key": 1}, {"API_TOKEN": "x"}, {"A": 1}, {"A": None}, {"A": "b"},
            [{"capacityProvider": "FARGATE", "weight": 1, "base": 0}], [{"capacityProvider": 1}],
        ]
    ),
)


PLAUSIBLE_BY_TYPE: dict[str, list[Any]] = {
    "string": ["x", "FARGATE"],
    "integer": [1024],
    "number": [2.5, 3],
    "boolean": [True, False],
    "object": [{}, {"A": "b"}, {"key": "k"}],
    "array": [[], ["a"]],
    "null": [None],
}


def plausible_values(prop: Any) -> list[Any]:
    """Values that often fit a property's schema, so that many examples pass."""
    if not isinstance(prop, dict):
        return [None]
    if "enum" in prop:
        return list(prop["enum"])
    types = prop.get("type") or [alt.get("type") for alt in prop.get("anyOf", []) if isinstance(alt, dict)]
    values = [v for t in (types if isinstance(types, list) else [types]) for v in PLAUSIBLE_BY_TYPE.get(t, [])]
    return values or [{"key": "k"}, {"$ref": {"block_document_id": BLOCK_ID}}, {}]


@st.composite
def job_variables_for(draw: st.DrawFn, schema: dict[str, Any]) -> dict[str, Any]:
    properties = schema.get("properties", {})
    names = sorted(properties) + ["unknown"]
    keys = draw(st.lists(st.sampled_from(names), max_size=3, unique=True))
    if "image" in properties and draw(st.booleans()):
        keys.append("image")
    values = {}
    for key in keys:
        plausible = st.sampled_from(plausible_values(properties.get(key)))
        values[key] = draw(st.one_of(plausible, plausible, plausible, interesting_values))  # mostly plausible
    return values


@settings(max_examples=300, deadline=None)
@given(data=st.data(), schema_name=st.sampled_from(sorted(SCHEMAS)), block_data=st.sampled_from(BLOCK_DATA))
def test_validation_accepts_exactly_what_the_server_accepts(data: st.DataObject, schema_name: str, block_data: Any) -> None:
    schema = SCHEMAS[schema_name]
    deployment_vars = data.draw(st.one_of(st.none(), job_variables_for(schema)), label="deployment")
    flow_run_vars = data.draw(st.one_of(st.none(), job_variables_for(schema)), label="flow run")
    expected = server_accepts(schema, block_data, deployment_vars, flow_run_vars)
    assert pushpool_accepts(schema, block_data, deployment_vars, flow_run_vars) == expected


@pytest.mark.parametrize(
    ("schema_name", "block_data", "deployment_vars", "flow_run_vars", "accepted"),
    [
        ("custom", None, {"image": "x"}, {}, True),
        ("custom", None, {}, {"cpu": 1}, False),  # image is required
        ("custom-null-default", None, {}, {}, True),  # ...unless an invalid default was ignored
        ("custom-invalid-default", None, {}, {}, True),
        ("custom", None, {"image": "x", "memory": None}, {}, True),  # optional means nullable
        ("custom", None, {"image": "x", "launch_type": None}, {}, False),  # ...but enum still applies
        ("custom-tuple-items", None, {"image": "x", "ports": [1, "a"]}, {}, False),  # the schema itself is invalid
        ("custom", None, {"image": "x", "creds": {"$ref": {"block_document_id": BLOCK_ID}}}, {}, True),
        ("custom", None, {"image": "x", "creds": {"$ref": BLOCK_ID}}, {}, True),
        ("custom", None, {"image": "x", "creds": {"key": "k"}}, {}, True),
        ("custom", None, {"image": "x", "creds": {"nokey": "k"}}, {}, False),
        ("custom-block-default", {"key": "abc"}, {"image": "x"}, {}, True),
        ("custom-block-default", {"nokey": 1}, {}, {}, True),  # invalid hydrated default: ignored, required too
        ("custom", None, {"image": "x", "network": {"public": True}}, {}, False),  # nested required
        ("custom", None, {"image": "x", "env": {"A": 1}}, {"env": {"A": "1"}}, True),  # layers replace shallowly
        ("ecs", None, {"memory": "lots"}, {}, False),
        ("ecs", None, {"launch_type": "EC2", "cpu": 512}, {}, True),
        # Surprising but true: the server rejects a block $ref for ECS's aws_credentials
        # (the AwsCredentials definition has no required fields, so both oneOf branches match).
        ("ecs", None, {"aws_credentials": {"$ref": {"block_document_id": BLOCK_ID}}}, {}, False),
        ("process", None, {"working_dir": None, "stream_output": False}, {}, True),
        ("empty", None, {"anything": object.__name__}, {}, True),
    ],
)
def test_validation_examples(
    schema_name: str, block_data: Any, deployment_vars: dict[str, Any], flow_run_vars: dict[str, Any], accepted: bool
) -> None:
    schema = SCHEMAS[schema_name]
    assert server_accepts(schema, block_data, deployment_vars, flow_run_vars) == accepted
    assert pushpool_accepts(schema, block_data, deployment_vars, flow_run_vars) == accepted


def test_an_invalid_schema_is_rejected_like_the_server_does() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "strin"}}}
    assert not server_accepts(schema, None, {}, {})
    with pytest.raises(InvalidJobVariables, match="not a valid JSON schema"):
        validate_job_variables(schema, {}, {})


def test_preprocess_schema_matches_prefect() -> None:
    from prefect.utilities.schema_tools.validation import preprocess_schema as prefect_preprocess

    for schema in SCHEMAS.values():
        for allow_none in (False, True):
            assert preprocess_schema(schema, allow_none) == prefect_preprocess(schema, allow_none)


# ---------------------------------------------------------------- messages


def message_for(schema_name: str, *layers: dict[str, Any]) -> str:
    schema = SCHEMAS[schema_name]
    defaults = {name: prop["default"] for name, prop in schema.get("properties", {}).items() if "default" in prop}
    with pytest.raises(InvalidJobVariables) as info:
        validate_job_variables(schema, defaults, *layers)
    return str(info.value)


@pytest.mark.parametrize(
    ("schema_name", "layers", "message"),
    [
        ("ecs", [{"memory": "lots"}], "Invalid job variable 'memory': expected integer, got 'lots'"),
        ("custom", [{"cpu": 2}], "Missing required job variable 'image'"),
        ("custom", [{"image": "x", "launch_type": "X"}], "Invalid job variable 'launch_type': 'X' is not one of ['FARGATE', 'EC2']"),
        ("ecs", [{"launch_type": "X"}], "Invalid job variable 'launch_type': 'X' is not one of ['FARGATE', 'EC2', 'EXTERNAL', 'FARGATE_SPOT']"),
        ("custom", [{"image": 5}], "Invalid job variable 'image': expected string, got 5"),
        ("custom", [{"image": True}], "Invalid job variable 'image': expected string, got true"),
        ("custom", [{"image": "x", "memory": 100}], "Invalid job variable 'memory': 100 is less than the minimum of 512"),
        ("custom", [{"image": "x", "network": {"public": True}}], "Invalid job variable 'network': missing required key 'subnets'"),
        ("custom", [{"image": "x", "network": {"subnets": [1]}}], "Invalid job variable 'network.subnets[0]': expected string, got 1"),
        ("ecs", [{"capacity_provider_strategy": [{"capacityProvider": 1, "weight": 1, "base": 0}]}],
         "Invalid job variable 'capacity_provider_strategy[0].capacityProvider': expected string, got 1"),
        ("custom", [{"image": "x", "creds": {"nokey": "k"}}], "Invalid job variable 'creds': missing required key 'key'"),
        # values that may be secrets are described, not shown
        ("custom", [{"image": "x", "api_token": "hunter2-hunter2"}], "Invalid job variable 'api_token': a string is too long"),
        ("custom", [{"image": "x" * 25, "memory": "y" * 25}], "Invalid job variable 'memory': expected integer, got a string"),
        ("ecs", [{"env": {"AWS_SECRET_ACCESS_KEY": 12345}}], "Invalid job variable 'env.AWS_SECRET_ACCESS_KEY': expected string, got an integer"),
        ("ecs", [{"aws_credentials": {"aws_secret_access_key": 1234567}}],
         "Invalid job variable 'aws_credentials.aws_secret_access_key': expected string, got an integer"),
    ],
)
def test_messages(schema_name: str, layers: list[dict[str, Any]], message: str) -> None:
    assert message_for(schema_name, *layers) == message


def test_messages_never_contain_secret_values() -> None:
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    for layer in [
        {"aws_credentials": {"aws_secret_access_key": [secret]}},
        {"aws_credentials": secret},
        {"env": {"X": [secret]}},
        {"cloudwatch_logs_options": {"token": {"v": secret}}},
        {"memory": {"token": secret}},
        {"capacity_provider_strategy": secret},
    ]:
        assert secret not in message_for("ecs", layer)


# ---------------------------------------------------------------- defaults


def test_hydrate_defaults_reads_block_defaults() -> None:
    schema = {
        "properties": {
            "creds": {"default": {"$ref": {"block_document_id": BLOCK_ID}}},
            "unset": {"default": {"$ref": {"not_an_id": 1}}},  # no block_document_id: skipped, as the server does
            "none": {"default": None},
            "plain": {"default": {"a": 1}},
            "nodefault": {"type": "string"},
        }
    }
    defaults = asyncio.run(hydrate_defaults(schema, FakeLookups()))
    assert defaults == {"creds": FakeLookups().blocks[("creds", "prod")].data, "none": None, "plain": {"a": 1}}


def test_hydrate_defaults_names_a_deleted_block() -> None:
    missing = str(uuid4())
    schema = {"properties": {"aws_credentials": {"default": {"$ref": {"block_document_id": missing}}}}}
    with pytest.raises(TemplateError) as info:
        asyncio.run(hydrate_defaults(schema, FakeLookups()))
    assert str(info.value) == (
        f"Block document {missing} used as the default of job variable 'aws_credentials' no longer exists (deleted?)"
    )
