"""Per-cloud provisioners: what `pushpool work-pool create --provision-infra`,
`provision-infra` and `deprovision-infra` do (plan, apply, detect what exists,
tear down). No provisioner exists yet; `process:push` needs none."""
