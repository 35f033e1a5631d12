"""Per-cloud provisioners: what `pushpool work-pool create --provision-infra`,
`provision-infra` and `deprovision-infra` do (plan, apply, detect what exists,
tear down). `plan` holds the provider-neutral Plan/Step/apply shape, `registry`
maps push types to provisioners (`ecs:push` → `aws_ecs`), `prefect_side` the
credentials block, template defaults and profile."""
