################################################################################
# The work pool: the template pushpool ships, with this pool's defaults
################################################################################

locals {
  # templates/ecs-push.json is byte for byte what
  # `pushpool work-pool get-default-base-job-template --type ecs:push` prints.
  template = jsondecode(file(coalesce(var.base_job_template_file, "${path.module}/templates/ecs-push.json")))

  # Block document names allow lowercase letters, digits and dashes only.
  block_prefix = trim(replace(lower(var.pool_name), "/[^a-z0-9-]+/", "-"), "-")

  # Variable defaults set from the resources (as provisioning sets them).
  defaults = merge(
    {
      cluster            = aws_ecs_cluster.this.arn
      execution_role_arn = aws_iam_role.execution.arn
    },
    var.create_vpc || var.vpc_id != null ? { vpc_id = local.vpc_id } : {},
    var.create_vpc ? {
      network_configuration = {
        subnets        = aws_subnet.public[*].id
        securityGroups = [aws_security_group.tasks[0].id]
        assignPublicIp = "ENABLED"
      }
    } : {},
    var.create_task_role ? { task_role_arn = aws_iam_role.task[0].arn } : {},
    var.create_access_key ? {
      aws_credentials = { "$ref" = { block_document_id = prefect_block.aws_credentials[0].id } }
    } : {},
  )

  # Only variables the template has get a default (a custom template may lack some).
  properties = merge(
    local.template.variables.properties,
    {
      for name, value in local.defaults : name => merge(local.template.variables.properties[name], { default = value })
      if contains(keys(local.template.variables.properties), name)
    },
  )

  base_job_template = jsonencode(merge(local.template, {
    variables = merge(local.template.variables, { properties = local.properties })
  }))
}

resource "prefect_work_pool" "this" {
  name              = var.pool_name
  type              = "ecs:push"
  description       = var.pool_description
  paused            = var.pool_paused
  concurrency_limit = var.pool_concurrency_limit
  base_job_template = local.base_job_template
}

################################################################################
# aws-credentials block (only with create_access_key)
################################################################################

# The server must know the aws-credentials block type: it does when prefect-aws
# registered it (`prefect block register -m prefect_aws`) or after any
# `pushpool work-pool provision-infra` with an access key.
resource "prefect_block" "aws_credentials" {
  count = var.create_access_key ? 1 : 0

  name      = "${local.block_prefix}-aws-credentials"
  type_slug = "aws-credentials"

  # The key is in the state already (aws_iam_access_key); see create_access_key.
  data = jsonencode({
    aws_access_key_id     = aws_iam_access_key.this[0].id
    aws_secret_access_key = aws_iam_access_key.this[0].secret
    region_name           = local.region
  })
}

################################################################################
# Automations: a Scheduled or Cancelling run of this pool calls the dispatcher
################################################################################

# A new dispatcher URL makes a new webhook block (its data is write-only, so
# a changed URL would otherwise go unseen).
resource "terraform_data" "dispatcher_url" {
  count = var.create_automations ? 1 : 0

  input = var.dispatcher_url
}

resource "prefect_block" "webhook" {
  count = var.create_automations ? 1 : 0

  name      = "${local.block_prefix}-dispatcher-webhook"
  type_slug = "webhook"

  # Write-only: the secret goes to the Prefect server, never into the state.
  # (Module inputs are not stored in the state either.)
  data_wo = jsonencode({
    url    = var.dispatcher_url
    method = "POST"
    headers = {
      "Content-Type"  = "application/json"
      "Authorization" = "Bearer ${var.webhook_secret}"
    }
  })
  data_wo_version = var.webhook_secret_version

  lifecycle {
    replace_triggered_by = [terraform_data.dispatcher_url[count.index]]

    precondition {
      condition     = var.dispatcher_url != null && var.webhook_secret != null
      error_message = "create_automations needs dispatcher_url (the dispatcher-aws module's function_url) and webhook_secret (its PUSHPOOL_WEBHOOK_SECRET)."
    }
  }
}

locals {
  automations = var.create_automations ? {
    # Late too, as `pushpool connect` does: a run created by a deployment's
    # schedule emits no Scheduled event on the OSS server, its first is Late.
    scheduled = {
      name        = "pushpool ${var.pool_name}: dispatch scheduled runs"
      description = "Calls the pushpool dispatcher when a flow run of push pool ${var.pool_name} is scheduled (or late), so it starts within seconds (the dispatcher's timer finds it too)."
      events      = ["prefect.flow-run.Scheduled", "prefect.flow-run.Late"]
    }
    cancelling = {
      name        = "pushpool ${var.pool_name}: cancel runs"
      description = "Calls the pushpool dispatcher when a flow run of push pool ${var.pool_name} is cancelling, so its ECS task is stopped within seconds."
      events      = ["prefect.flow-run.Cancelling"]
    }
  } : {}
}

resource "prefect_automation" "this" {
  for_each = local.automations

  name        = each.value.name
  description = each.value.description
  enabled     = true

  trigger = {
    event = {
      posture = "Reactive"
      expect  = each.value.events
      match = jsonencode({
        "prefect.resource.id" = "prefect.flow-run.*"
      })
      match_related = jsonencode({
        "prefect.resource.role" = "work-pool"
        "prefect.resource.id"   = "prefect.work-pool.${prefect_work_pool.this.id}"
      })
      threshold = 1
      within    = 0
    }
  }

  actions = [
    {
      type              = "call-webhook"
      block_document_id = prefect_block.webhook[0].id
      payload           = "{{ event | tojson }}"
    },
  ]
}
