"""The job configuration of one flow run, built the way a Prefect worker
builds it (`BaseJobConfiguration.resolve_for_flow_run` in `prefect/workers/base.py`).

    base job template ─┐
    variable defaults  ├─► merge ─► validate (as the server does) ─► render
    deployment vars    │            placeholders, block refs, variables
    flow-run vars     ─┘          ─► provider's configuration model
                                  ─► add what every run gets (env, labels, name, command)

Precedence, low to high: variable defaults < deployment `job_variables` <
flow-run `job_variables`; `env` is merged key by key at every step.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import timezone
from typing import Any, Optional

from pydantic import ValidationError

from dispatcher.job_variables import (
    InvalidJobVariables,
    describe_value,
    format_path,
    hydrate_defaults,
    merge_job_variables,
    validate_job_variables,
)
from dispatcher.models import Deployment, Flow, FlowRun, WorkPool
from dispatcher.templating import (
    NOTSET,
    Lookups,
    TemplateError,
    apply_values,
    resolve_block_document_references,
    resolve_variables,
)
from providers.base import JobConfiguration, Provider

#: how many field errors of the configuration model one message lists
MAX_LISTED_ERRORS = 3


async def build_job_configuration(
    *,
    work_pool: WorkPool,
    deployment: Optional[Deployment],
    flow: Flow,
    flow_run: FlowRun,
    provider_class: type[Provider],
    lookups: Lookups,
    base_environment: Mapping[str, str],
    dispatcher_name: str,
) -> JobConfiguration:
    """The ready-to-submit configuration of `flow_run` in `work_pool`.

    Raises `TemplateError` (or its `InvalidJobVariables`) with a message a
    person can act on when the variables do not fit the pool's schema, a
    referenced block is gone, or the rendered configuration is invalid.
    """
    template = work_pool.base_job_template or provider_class.default_base_job_template()
    variables_schema = template.get("variables") or {}
    deployment_vars = deployment.job_variables if deployment is not None else {}
    flow_run_vars = flow_run.job_variables or {}

    defaults = await hydrate_defaults(variables_schema, lookups)
    validate_job_variables(variables_schema, defaults, deployment_vars, flow_run_vars)
    values = merge_job_variables(deployment_vars, flow_run_vars)
    rendered = await render_job_configuration(template, values, lookups)
    configuration = validate_configuration(provider_class.configuration_model, rendered)
    return prepare_for_flow_run(
        configuration,
        flow_run=flow_run,
        flow=flow,
        deployment=deployment,
        work_pool=work_pool,
        dispatcher_name=dispatcher_name,
        base_environment=base_environment,
        default_command=provider_class.default_command,
    )


# ---------------------------------------------------------------- render (from_template_and_values)


async def render_job_configuration(
    base_job_template: Mapping[str, Any], values: Mapping[str, Any], lookups: Lookups
) -> dict[str, Any]:
    """The template's `job_configuration` with variable defaults and `values`
    (merged job variables) applied, block references and Prefect variables
    resolved: Prefect's `BaseJobConfiguration.from_template_and_values`
    before the model is built."""
    job_configuration, variables_schema = _template_parts(base_job_template)
    config = copy.deepcopy(job_configuration)
    variables = variable_defaults(variables_schema)

    # Default env joins the template's literal env before any override replaces it.
    if variables.get("env"):
        config["env"] = _overlay_env(config.get("env"), variables["env"])
    variables.update(expand_dot_keys(copy.deepcopy(dict(values))))
    if isinstance(config.get("env"), dict) and variables.get("env"):
        config["env"] = _overlay_env(config["env"], variables["env"])

    rendered = apply_values(config, variables)
    rendered = await resolve_block_document_references(rendered, lookups)
    return await resolve_variables(rendered, lookups)


def _template_parts(base_job_template: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    job_configuration = base_job_template.get("job_configuration")
    variables_schema = base_job_template.get("variables")
    if not isinstance(job_configuration, dict) or not isinstance(variables_schema, dict):
        raise TemplateError(
            "The work pool's base job template must be empty or have both 'job_configuration' and "
            "'variables' objects (see `pushpool work-pool get-default-base-job-template`)"
        )
    return job_configuration, variables_schema


def variable_defaults(variables_schema: Mapping[str, Any]) -> dict[str, Any]:
    """The schema's defaults that templating uses: only those set and not null."""
    properties = variables_schema.get("properties")
    if not isinstance(properties, dict):
        return {}
    return {
        name: copy.deepcopy(attrs["default"])
        for name, attrs in properties.items()
        if isinstance(attrs, dict) and attrs.get("default") is not None
    }


def _overlay_env(env: Any, overrides: Any) -> Any:
    """`overrides` merged key by key into `env` when it is an object, else replacing it."""
    if not isinstance(env, dict):
        return overrides
    if not isinstance(overrides, dict):
        got = describe_value(overrides, sensitive=True)
        raise InvalidJobVariables(f"Invalid job variable 'env': expected object, got {got}")
    return {**env, **overrides}


def expand_dot_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """`{"env.FOO": "x"}` -> `{"env": {"FOO": "x"}}`. Where a dotted and a
    nested key set the same thing, the nested one wins (deep-merged)."""
    expanded: dict[str, Any] = {}
    for key, value in values.items():
        if "." in key:
            _set_path(expanded, key, value)
    for key, value in values.items():
        if "." in key:
            continue
        if isinstance(expanded.get(key), dict) and isinstance(value, dict):
            expanded[key] = deep_merge(expanded[key], value)
        else:
            expanded[key] = value
    return expanded


def _set_path(target: dict[str, Any], dotted_key: str, value: Any) -> None:
    parts = dotted_key.replace("[", ".").replace("]", "").split(".")
    for depth, part in enumerate(parts[:-1]):
        existing = target.setdefault(part, {})
        if not isinstance(existing, dict):
            raise InvalidJobVariables(
                f"Job variable '{dotted_key}' cannot be set: '{'.'.join(parts[: depth + 1])}' is not an object"
            )
        target = existing
    target[parts[-1]] = value


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`overrides` merged into `base`, recursively where both sides are objects."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def validate_configuration(model: type[JobConfiguration], rendered: Mapping[str, Any]) -> JobConfiguration:
    """The rendered configuration as the provider's model, or `InvalidJobVariables`
    naming the fields that do not fit (never their values)."""
    try:
        return model.model_validate(dict(rendered))
    except ValidationError as exc:
        raise InvalidJobVariables(_explain_validation_error(exc)) from None


def _explain_validation_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    reasons = [f"'{format_path(error['loc']) or 'job configuration'}': {error['msg']}" for error in errors]
    more = len(reasons) - MAX_LISTED_ERRORS
    text = "; ".join(reasons[:MAX_LISTED_ERRORS]) + (f" (and {more} more)" if more > 0 else "")
    return f"Invalid job configuration after rendering the job variables: {text}"


# ---------------------------------------------------------------- prepare (prepare_for_flow_run)


def prepare_for_flow_run(
    configuration: JobConfiguration,
    *,
    flow_run: FlowRun,
    flow: Flow,
    deployment: Optional[Deployment],
    work_pool: WorkPool,
    dispatcher_name: str,
    base_environment: Mapping[str, str],
    default_command: str,
) -> JobConfiguration:
    """Add what every run gets, as Prefect's `prepare_for_flow_run` does.

    env: base environment < PREFECT__FLOW_RUN_ID < attribution < configured env,
    then null values removed. labels: Prefect's `prefect.io/*` labels < configured
    labels. name: rendered with `{{ ctx.flow.* }}` / `{{ ctx.flow_run.* }}`, else the
    flow run's name. command: configured, else the provider's default.
    """
    env = {
        **base_environment,
        "PREFECT__FLOW_RUN_ID": str(flow_run.id),
        **_attribution_environment(flow_run, flow, deployment, dispatcher_name),
        **configuration.env,
    }
    labels = {
        "prefect.io/flow-run-id": str(flow_run.id),
        "prefect.io/flow-run-name": flow_run.name,
        "prefect.io/work-pool-name": work_pool.name,
        "prefect.io/work-pool-id": str(work_pool.id),
        "prefect.io/worker-name": dispatcher_name,
        "prefect.io/flow-id": str(flow.id),
        "prefect.io/flow-name": flow.name,
        **_deployment_labels(deployment),
        **configuration.labels,
    }
    return configuration.model_copy(
        update={
            "env": {key: value for key, value in env.items() if value is not None},
            "labels": labels,
            "name": render_name(configuration.name, flow, flow_run),
            "command": configuration.command or default_command,
        }
    )


def _attribution_environment(
    flow_run: FlowRun, flow: Flow, deployment: Optional[Deployment], dispatcher_name: str
) -> dict[str, str]:
    env = {"PREFECT__WORKER_NAME": dispatcher_name, "PREFECT__FLOW_ID": str(flow_run.flow_id)}
    if flow.name:
        env["PREFECT__FLOW_NAME"] = flow.name
    if flow_run.deployment_id:
        env["PREFECT__DEPLOYMENT_ID"] = str(flow_run.deployment_id)
    if deployment is not None and deployment.name:
        env["PREFECT__DEPLOYMENT_NAME"] = deployment.name
    return env


def _deployment_labels(deployment: Optional[Deployment]) -> dict[str, str]:
    if deployment is None:
        return {}
    labels = {"prefect.io/deployment-id": str(deployment.id), "prefect.io/deployment-name": deployment.name}
    if deployment.updated is not None:
        labels["prefect.io/deployment-updated"] = deployment.updated.astimezone(timezone.utc).isoformat()
    return labels


def render_name(name: Optional[str], flow: Flow, flow_run: FlowRun) -> str:
    """The infrastructure name: `name` rendered against `ctx.flow` and
    `ctx.flow_run` (kept as written if it is one placeholder with no value),
    or the flow run's name when it renders empty."""
    if name:
        context = {"ctx": {"flow": flow.model_dump(mode="json"), "flow_run": flow_run.model_dump(mode="json")}}
        rendered = apply_values(name, context)
        if rendered is not NOTSET:
            name = rendered
    if not name:
        return flow_run.name
    return name if isinstance(name, str) else str(name)
