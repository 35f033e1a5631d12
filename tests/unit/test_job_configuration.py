"""`dispatcher.job_configuration` against Prefect's own worker code
(`BaseJobConfiguration.from_template_and_values` and `resolve_for_flow_run`),
plus the parts pushpool adds: validation, errors, the empty template."""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar, Optional
from unittest import mock
from uuid import UUID, uuid4

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dispatcher.job_configuration import (
    build_job_configuration,
    expand_dot_keys,
    render_job_configuration,
    validate_configuration,
)
from dispatcher.job_variables import InvalidJobVariables
from dispatcher.models import Deployment, Flow, FlowRun, WorkPool
from dispatcher.templating import CachedLookups, TemplateError
from providers.base import JobConfiguration
from providers.process import ProcessProvider
from tests.unit.test_templating import (
    ENV_NAME,
    ENV_VALUE,
    SECRET_ID,
    FakeLookups,
    json_values,
    same,
    template_strings,
    text,
)

REPO_PYTHON = sys.executable


@pytest.fixture(scope="module", autouse=True)
def test_environment() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_NAME, ENV_VALUE)
        yield


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


class NoClient:
    """Stands in for Prefect's client where no block or variable is referenced."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the client was used: {name}")


# ---------------------------------------------------------------- strategies

VARIABLE_NAMES = ["command", "env", "labels", "name", "image", "cpu", "nested", "team"]
DOT_KEYS = ["env.FOO", "env.BAR", "nested.a", "nested.b.c", "labels.team", "image.x"]

env_values = st.one_of(st.none(), text, st.integers(-5, 5), st.booleans())
env_dicts = st.dictionaries(st.sampled_from(["FOO", "BAR", "BAZ", "PATH"]), env_values, max_size=3)
string_or_none = st.one_of(st.none(), text)


def value_for(name: str) -> st.SearchStrategy[Any]:
    """Job variable values. `command` stays a string or null: pushpool's model
    turns any falsy command into null, where Prefect's rejects 0 or False."""
    if name == "command":
        return string_or_none
    if name in ("env", "env.FOO", "env.BAR"):
        return st.one_of(env_dicts, env_values, json_values) if name == "env" else env_values
    if name == "labels":
        return st.one_of(st.dictionaries(st.sampled_from(["team", "tier"]), text, max_size=2), json_values)
    if name == "name":
        return st.one_of(string_or_none, st.sampled_from(["{{ ctx.flow_run.name }}-job", "{{ image }}"]))
    return json_values


@st.composite
def job_variables(draw: st.DrawFn) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(VARIABLE_NAMES + DOT_KEYS), max_size=5, unique=True))
    return {key: draw(value_for(key)) for key in keys}


@st.composite
def base_job_templates(draw: st.DrawFn) -> dict[str, Any]:
    options: dict[str, st.SearchStrategy[Any]] = {
        "command": st.sampled_from(["{{ command }}", "run {{ image }}", "python -m app", None, ""]),
        "env": st.one_of(
            st.just("{{ env }}"),
            st.dictionaries(
                st.sampled_from(["LIT", "FOO", "TPL", "FROM_ENV", "NONE"]),
                st.sampled_from(["1", "{{ image }}", f"{{{{ ${ENV_NAME} }}}}", None, "{{ team }}", "x{{ cpu }}"]),
                max_size=4,
            ),
        ),
        "labels": st.sampled_from(["{{ labels }}", {"team": "{{ team }}"}, {"fixed": "yes"}]),
        "name": st.sampled_from(["{{ name }}", "job-{{ name }}", "{{ ctx.flow_run.name }}"]),
        "image": st.sampled_from(["{{ image }}", "registry/{{ image }}:latest"]),
        "cpu": st.just("{{ cpu }}"),
        "nested": st.just({"a": "{{ nested.a }}", "b": ["{{ cpu }}", "x", "{{ nested.b.c }}"]}),
        "anything": template_strings.filter(lambda t: "prefect." not in t),  # no blocks, no variables
    }
    keys = draw(st.lists(st.sampled_from(sorted(options)), max_size=len(options), unique=True))
    job_configuration = {key: draw(options[key]) for key in keys}
    properties: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(VARIABLE_NAMES), max_size=len(VARIABLE_NAMES), unique=True)):
        prop: dict[str, Any] = {"title": name}
        if draw(st.booleans()):
            prop["default"] = draw(st.one_of(st.none(), value_for(name)))
        properties[name] = prop
    return {"job_configuration": job_configuration, "variables": {"type": "object", "properties": properties}}


# ---------------------------------------------------------------- render vs from_template_and_values


@functools.lru_cache(maxsize=1)
def _capturing_configuration() -> Any:
    """Prefect's BaseJobConfiguration, recording what it is built from (made
    once: creating a pydantic class costs milliseconds)."""
    from prefect.workers.base import BaseJobConfiguration

    class Capturing(BaseJobConfiguration):
        captured: ClassVar[list[dict[str, Any]]] = []

        def __init__(self, **data: Any):
            self.captured.append(copy.deepcopy(data))
            super().__init__(**data)

    return Capturing


def prefect_from_template_and_values(
    template: dict[str, Any], values: dict[str, Any], loop: asyncio.AbstractEventLoop
) -> tuple[Optional[dict[str, Any]], Optional[dict[str, Any]]]:
    """(the configuration Prefect renders, its model_dump) - None where Prefect fails."""
    capturing = _capturing_configuration()
    captured: list[dict[str, Any]] = capturing.captured
    captured.clear()
    try:
        result = loop.run_until_complete(
            capturing.from_template_and_values(copy.deepcopy(template), copy.deepcopy(values), client=NoClient())
        )
    except Exception:  # noqa: BLE001 - any failure counts as "Prefect rejects this"
        return (captured[0] if captured else None), None
    return captured[0], result.model_dump()


def pushpool_render(
    template: dict[str, Any], values: dict[str, Any], loop: asyncio.AbstractEventLoop
) -> tuple[Optional[dict[str, Any]], Optional[dict[str, Any]]]:
    try:
        rendered = loop.run_until_complete(render_job_configuration(template, values, NoClient()))
    except TemplateError:
        return None, None
    try:
        return rendered, validate_configuration(JobConfiguration, rendered).model_dump()
    except InvalidJobVariables:
        return rendered, None


@settings(max_examples=300, deadline=None)
@given(template=base_job_templates(), values=job_variables())
def test_render_matches_prefect(template: dict[str, Any], values: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
    original = copy.deepcopy((template, values))
    theirs = prefect_from_template_and_values(template, values, loop)
    ours = pushpool_render(template, values, loop)
    assert (template, values) == original  # inputs untouched
    assert same(ours[0], theirs[0])  # the rendered dict, before the model
    assert same(ours[1], theirs[1])  # the model (None: rejected)


# ---------------------------------------------------------------- the whole build vs resolve_for_flow_run

UPDATED = datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=timezone(timedelta(hours=2)))


def prefect_objects(flow_run_vars: Optional[dict[str, Any]], deployment_vars: Optional[dict[str, Any]], template: dict[str, Any]) -> dict[str, Any]:
    from prefect.client.schemas.objects import Flow as PFlow
    from prefect.client.schemas.objects import FlowRun as PFlowRun
    from prefect.client.schemas.objects import WorkPool as PWorkPool
    from prefect.client.schemas.responses import DeploymentResponse

    flow = PFlow(id=uuid4(), name="etl-flow")
    deployment = DeploymentResponse(
        id=uuid4(), name="nightly", flow_id=flow.id, updated=UPDATED, job_variables=deployment_vars or {}
    )
    flow_run = PFlowRun(
        id=uuid4(), name="brave-fox", flow_id=flow.id, deployment_id=deployment.id,
        job_variables=flow_run_vars, tags=["a"], parameters={"x": 1},
    )
    work_pool = PWorkPool(id=uuid4(), name="pool", type="process:push", base_job_template=template)
    return {"flow": flow, "deployment": deployment, "flow_run": flow_run, "work_pool": work_pool}


def as_pushpool_objects(objects: dict[str, Any]) -> dict[str, Any]:
    return {
        "flow": Flow.model_validate(objects["flow"].model_dump(mode="json")),
        "deployment": Deployment.model_validate(objects["deployment"].model_dump(mode="json")),
        "flow_run": FlowRun.model_validate(objects["flow_run"].model_dump(mode="json")),
        "work_pool": WorkPool.model_validate(objects["work_pool"].model_dump(mode="json")),
    }


def prefect_resolve(objects: dict[str, Any], loop: asyncio.AbstractEventLoop) -> Optional[dict[str, Any]]:
    from prefect.workers.base import BaseJobConfiguration

    flow = objects["flow"]

    class Client:
        async def read_flow(self, flow_id: UUID) -> Any:
            return flow

    try:
        with mock.patch.object(BaseJobConfiguration, "_base_environment", prefect_base_environment):
            configuration = loop.run_until_complete(
                BaseJobConfiguration.resolve_for_flow_run(
                    objects["flow_run"], client=Client(), work_pool=objects["work_pool"], worker_name="pushpool-test",
                    deployment=objects["deployment"],
                )
            )
    except Exception:  # noqa: BLE001
        return None
    dump = configuration.model_dump()
    del dump["labels"]["prefect.io/version"]  # the worker's Prefect version: pushpool has none to give
    return dump


def pushpool_build(objects: dict[str, Any], loop: asyncio.AbstractEventLoop, base_environment: dict[str, str]) -> Optional[dict[str, Any]]:
    try:
        configuration = loop.run_until_complete(
            build_job_configuration(
                **objects, provider_class=BareProvider, lookups=NoClient(),
                base_environment=base_environment, dispatcher_name="pushpool-test",
            )
        )
    except TemplateError:
        return None
    return configuration.model_dump()


@functools.lru_cache(maxsize=1)
def _prefect_settings_environment() -> tuple[tuple[str, str], ...]:
    from prefect.workers.base import BaseJobConfiguration

    return tuple(BaseJobConfiguration._base_environment().items())


@classmethod  # type: ignore[misc]
def prefect_base_environment(cls: Any) -> dict[str, str]:
    """Prefect's `_base_environment` (the worker's settings as env vars),
    computed once: it costs ~20 ms and never changes within the tests."""
    return dict(_prefect_settings_environment())


class BareProvider(ProcessProvider):
    """A provider whose configuration is Prefect's base one, and whose default
    command is Prefect's worker default."""

    configuration_model = JobConfiguration
    default_command = "prefect flow-run execute"


@settings(max_examples=200, deadline=None)
@given(template=base_job_templates(), deployment_vars=st.one_of(st.none(), job_variables()), flow_run_vars=st.one_of(st.none(), job_variables()))
def test_build_matches_prefect_resolve_for_flow_run(
    template: dict[str, Any], deployment_vars: Optional[dict[str, Any]], flow_run_vars: Optional[dict[str, Any]],
    loop: asyncio.AbstractEventLoop,
) -> None:
    # Prefect crashes on a flow-run env that is not an object when the deployment's is one.
    flow_run_env = (flow_run_vars or {}).get("env", {})
    assume(not (isinstance((deployment_vars or {}).get("env"), dict) and not isinstance(flow_run_env, dict)))
    objects = prefect_objects(flow_run_vars, deployment_vars, template)
    ours = pushpool_build(as_pushpool_objects(objects), loop, dict(_prefect_settings_environment()))
    theirs = prefect_resolve(objects, loop)  # last: Prefect changes the job variables it is given
    assert same(ours, theirs)


# ---------------------------------------------------------------- pushpool's own behaviour


def objects_for(template: dict[str, Any], *, deployment_vars: Optional[dict[str, Any]] = None,
                flow_run_vars: Optional[dict[str, Any]] = None, with_deployment: bool = True) -> dict[str, Any]:
    flow = Flow(id=uuid4(), name="etl-flow")
    deployment = Deployment(id=uuid4(), name="nightly", flow_id=flow.id, updated=UPDATED, job_variables=deployment_vars or {})
    flow_run = FlowRun(
        id=uuid4(), name="brave-fox", flow_id=flow.id, deployment_id=deployment.id if with_deployment else None,
        job_variables=flow_run_vars, parameters={"x": 1},
    )
    work_pool = WorkPool(id=uuid4(), name="pool", type="process:push", base_job_template=template)
    return {"flow": flow, "deployment": deployment if with_deployment else None, "flow_run": flow_run, "work_pool": work_pool}


def build(objects: dict[str, Any], *, provider_class: Any = ProcessProvider, lookups: Any = None,
          base_environment: Optional[dict[str, str]] = None) -> Any:
    return asyncio.run(
        build_job_configuration(
            **objects, provider_class=provider_class, lookups=lookups or FakeLookups(),
            base_environment=base_environment or {}, dispatcher_name="dispatcher-1",
        )
    )


def test_empty_template_means_the_provider_default() -> None:
    objects = objects_for({}, deployment_vars={"stream_output": False, "env": {"A": "1"}}, flow_run_vars={"working_dir": "/tmp"})
    configuration = build(objects)
    assert configuration.stream_output is False
    assert str(configuration.working_dir) == "/tmp"
    assert configuration.env["A"] == "1"
    assert configuration.command == ProcessProvider.default_command
    assert configuration.name == "brave-fox"


def test_environment_labels_name_and_command() -> None:
    template = {
        "job_configuration": {
            "env": {"FROM_TEMPLATE": "t", "PREFECT_API_URL": "{{ api }}"},
            "labels": "{{ labels }}",
            "name": "{{ name }}",
            "command": "{{ command }}",
        },
        "variables": {"properties": {"env": {"type": "object", "default": {"FROM_DEFAULT": "d", "DROP": "x"}},
                                     "labels": {"type": "object"}, "command": {"type": "string"}, "api": {"type": "string"},
                                     # ctx placeholders work in variable values only: in the template itself
                                     # the first rendering pass finds no `ctx` variable and blanks them
                                     "name": {"type": "string",
                                              "default": "{{ ctx.flow.name }}-{{ ctx.flow_run.name }}-{{ ctx.flow_run.parameters.x }}"}}},
    }
    objects = objects_for(
        template,
        deployment_vars={"env": {"FROM_DEPLOYMENT": "dep", "PREFECT__FLOW_RUN_ID": "overridden"}, "labels": {"prefect.io/flow-name": "mine"}},
        flow_run_vars={"env": {"DROP": None}, "command": "run it"},
    )
    base = {"PREFECT_API_URL": "http://base/api", "BASE_ONLY": "b", "PREFECT__WORKER_NAME": "base-loses"}
    configuration = build(objects, provider_class=BareProvider, base_environment=base)
    flow, flow_run, deployment, pool = objects["flow"], objects["flow_run"], objects["deployment"], objects["work_pool"]
    assert configuration.env == {
        "PREFECT_API_URL": "http://base/api",  # `{{ api }}` has no value: the template's key is dropped
        "BASE_ONLY": "b",
        "PREFECT__FLOW_RUN_ID": "overridden",  # the configuration's env wins over everything
        "PREFECT__WORKER_NAME": "dispatcher-1",
        "PREFECT__FLOW_ID": str(flow.id),
        "PREFECT__FLOW_NAME": "etl-flow",
        "PREFECT__DEPLOYMENT_ID": str(deployment.id),
        "PREFECT__DEPLOYMENT_NAME": "nightly",
        "FROM_TEMPLATE": "t",
        "FROM_DEFAULT": "d",
        "FROM_DEPLOYMENT": "dep",
    }  # DROP: null removes it
    assert list(configuration.labels.items()) == [
        ("prefect.io/flow-run-id", str(flow_run.id)),
        ("prefect.io/flow-run-name", "brave-fox"),
        ("prefect.io/work-pool-name", "pool"),
        ("prefect.io/work-pool-id", str(pool.id)),
        ("prefect.io/worker-name", "dispatcher-1"),
        ("prefect.io/flow-id", str(flow.id)),
        ("prefect.io/flow-name", "mine"),  # user labels win
        ("prefect.io/deployment-id", str(deployment.id)),
        ("prefect.io/deployment-name", "nightly"),
        ("prefect.io/deployment-updated", "2026-03-04T03:06:07.891011+00:00"),
    ]
    assert configuration.name == "etl-flow-brave-fox-1"
    assert configuration.command == "run it"


def test_a_run_without_deployment() -> None:
    configuration = build(objects_for({}, with_deployment=False, flow_run_vars={"env": {"A": "1"}}))
    assert "PREFECT__DEPLOYMENT_ID" not in configuration.env
    assert not any(key.startswith("prefect.io/deployment") for key in configuration.labels)
    assert configuration.env["A"] == "1"


def test_blocks_and_variables_are_resolved_and_their_secrets_registered() -> None:
    from dispatcher.logs import Redactor

    template = {
        "job_configuration": {"env": "{{ env }}", "creds": "{{ creds }}", "region": "{{ region }}"},
        "variables": {"properties": {
            "env": {"type": "object"},
            "creds": {"default": {"$ref": {"block_document_id": str(SECRET_ID)}}},
            "region": {"type": "string", "default": "{{ prefect.variables.region }}"},
        }},
    }

    class WithExtras(JobConfiguration):
        creds: dict[str, Any]
        region: str

    class Provider(BareProvider):
        configuration_model = WithExtras

    fake = FakeLookups()
    redactor = Redactor()
    objects = objects_for(template, flow_run_vars={"env": {"TOKEN": "{{ prefect.blocks.secret.token }}"}})
    configuration = build(objects, provider_class=Provider, lookups=CachedLookups(fake, redactor=redactor))
    assert configuration.creds == {"value": "s3cr3t-token-value"}
    assert configuration.region == "eu-west-1"
    assert configuration.env["TOKEN"] == "s3cr3t-token-value"
    assert ("id", str(SECRET_ID)) in fake.reads and len(fake.reads) == len(set(fake.reads))  # each read once
    assert "s3cr3t" not in redactor.redact("token=s3cr3t-token-value")


@pytest.mark.parametrize(
    ("flow_run_vars", "message"),
    [
        ({"stream_output": "maybe"}, "Invalid job variable 'stream_output': expected boolean, got 'maybe'"),
        ({"env": {"TOKEN": 1}}, "Invalid job variable 'env.TOKEN': expected string, got an integer"),
        ({"name": 5}, "Invalid job variable 'name': expected string, got 5"),
    ],
)
def test_invalid_job_variables_are_reported_before_rendering(flow_run_vars: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidJobVariables) as info:
        build(objects_for({}, flow_run_vars=flow_run_vars))
    assert str(info.value) == message


def test_an_invalid_rendered_configuration_names_the_field() -> None:
    template = {
        "job_configuration": {"stream_output": "{{ so }}", "working_dir": "{{ dir }}", "env": "{{ env }}"},
        "variables": {"properties": {"so": {}, "dir": {}, "env": {}}},  # nothing typed: the schema lets it through
    }
    secret = "hunter2-hunter2-hunter2-hunter2"
    with pytest.raises(InvalidJobVariables) as info:
        build(objects_for(template, flow_run_vars={"so": secret, "dir": ["x"], "env": secret}))
    message = str(info.value)
    assert message.startswith("Invalid job configuration after rendering the job variables: ")
    assert "'env'" in message and "'stream_output'" in message and "'working_dir'" in message
    assert secret not in message


def test_deleted_block_default_is_named() -> None:
    missing = uuid4()
    template = {"job_configuration": {"creds": "{{ creds }}"},
                "variables": {"properties": {"creds": {"default": {"$ref": {"block_document_id": str(missing)}}}}}}
    with pytest.raises(TemplateError, match=f"Block document {missing} used as the default of job variable 'creds'"):
        build(objects_for(template))


def test_a_malformed_template_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match="must be empty or have both 'job_configuration' and 'variables'"):
        build(objects_for({"job_configuration": {"command": "x"}}))


def test_dot_keys() -> None:
    assert expand_dot_keys({"env.A": "1", "env": {"B": "2", "A": "nested wins"}, "x.y.z": 1}) == {
        "env": {"A": "nested wins", "B": "2"},
        "x": {"y": {"z": 1}},
    }
    with pytest.raises(InvalidJobVariables, match="Job variable 'env.A.B' cannot be set: 'env.A' is not an object"):
        expand_dot_keys({"env.A": "1", "env.A.B": "2"})


def test_importing_the_module_imports_neither_prefect_nor_jsonschema() -> None:
    code = (
        "import sys, json, dispatcher.job_configuration, dispatcher.templating, dispatcher.job_variables;"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'jsonschema', 'referencing'))))"
    )
    output = subprocess.run([REPO_PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(output) == []
