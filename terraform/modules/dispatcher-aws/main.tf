data "aws_partition" "current" {}
data "aws_region" "current" {}
data "aws_caller_identity" "current" {}

locals {
  partition  = data.aws_partition.current.partition
  region     = data.aws_region.current.region
  account_id = data.aws_caller_identity.current.account_id

  tags = merge(var.tags, { "pushpool:managed" = "true", "pushpool:component" = "dispatcher" })

  # The settings secret: the one created here, or the one given.
  secret_arn = var.create_secret ? aws_secretsmanager_secret.this[0].arn : var.secrets_arn
  # The key that encrypts it, when it is a customer-managed one.
  secret_kms_key_arn = var.create_secret ? var.kms_key_arn : var.secrets_kms_key_arn

  # PUSHPOOL_TICK_SECONDS: from rate(N unit) unless given.
  rate_parts   = regexall("^rate\\(([0-9]+) (minute|minutes|hour|hours|day|days)\\)$", var.tick_schedule_expression)
  unit_seconds = { minute = 60, minutes = 60, hour = 3600, hours = 3600, day = 86400, days = 86400 }
  tick_seconds = var.tick_seconds != null ? var.tick_seconds : (
    length(local.rate_parts) > 0 ? tonumber(local.rate_parts[0][0]) * local.unit_seconds[local.rate_parts[0][1]] : null
  )

  # The function's settings. Secrets are never here: they are in the secret
  # PUSHPOOL_SECRETS_ARN names, which the function reads at cold start.
  environment = merge(
    var.extra_environment_variables,
    var.prefect_api_url == null ? {} : { PREFECT_API_URL = var.prefect_api_url },
    var.prefetch_seconds == null ? {} : { PUSHPOOL_PREFETCH_SECONDS = tostring(var.prefetch_seconds) },
    {
      PUSHPOOL_SECRETS_ARN         = local.secret_arn
      PUSHPOOL_POOLS               = join(",", [for p in var.pools : trimspace(p)])
      PUSHPOOL_MAX_CONCURRENCY     = tostring(var.max_concurrency)
      PUSHPOOL_TICK_SECONDS        = tostring(local.tick_seconds == null ? 60 : local.tick_seconds)
      PUSHPOOL_WAKE_ROLE_ARN       = aws_iam_role.scheduler.arn
      PUSHPOOL_WAKE_GROUP          = aws_scheduler_schedule_group.wake.name
      POWERTOOLS_SERVICE_NAME      = "pushpool"
      POWERTOOLS_METRICS_NAMESPACE = "pushpool"
      POWERTOOLS_LOG_LEVEL         = var.log_level
    },
  )
}

################################################################################
# The function
################################################################################

resource "aws_lambda_function" "this" {
  #checkov:skip=CKV_AWS_272:Code signing needs an AWS Signer profile and a signed upload through S3; the zip is built locally by `pushpool package aws-lambda` and pinned by source_code_hash.
  function_name = var.name
  description   = "pushpool dispatcher: submits Prefect flow runs of push work pools to ECS"
  role          = aws_iam_role.lambda.arn

  filename         = var.lambda_zip_path
  source_code_hash = filebase64sha256(var.lambda_zip_path)
  handler          = "dispatcher.aws_lambda.handler"
  runtime          = var.runtime
  architectures    = [var.architecture]
  memory_size      = var.memory_size
  timeout          = var.timeout

  # Unreserved by default: reserving takes from the account's unreserved pool
  # (and fails on accounts with the default limit of 10). Claims are serialised
  # by the Prefect server, so more instances than needed are only idle.
  reserved_concurrent_executions = var.reserved_concurrent_executions
  # The environment holds no secret; a customer-managed key is optional.
  kms_key_arn = var.kms_key_arn

  environment {
    variables = local.environment
  }

  tracing_config {
    mode = "Active"
  }

  logging_config {
    log_format = "Text"
    log_group  = aws_cloudwatch_log_group.this.name
  }

  # Optional: every trigger is only a hint and the next tick re-reads the
  # truth from the Prefect API, so a lost invocation loses nothing.
  dynamic "dead_letter_config" {
    for_each = var.create_dead_letter_queue ? [aws_sqs_queue.dead_letter[0].arn] : []
    content {
      target_arn = dead_letter_config.value
    }
  }

  # Optional: only for a Prefect server reachable inside a VPC.
  dynamic "vpc_config" {
    for_each = length(var.vpc_subnet_ids) > 0 ? [true] : []
    content {
      subnet_ids         = var.vpc_subnet_ids
      security_group_ids = var.vpc_security_group_ids
    }
  }

  tags = local.tags

  lifecycle {
    precondition {
      condition     = var.create_secret == (var.secrets_arn == null)
      error_message = "Either leave create_secret = true (the module creates the settings secret), or set create_secret = false and pass secrets_arn."
    }
    precondition {
      condition     = local.tick_seconds != null
      error_message = "tick_schedule_expression is a cron() expression: set tick_seconds to its period."
    }
    precondition {
      condition     = length(var.vpc_subnet_ids) == 0 || length(var.vpc_security_group_ids) > 0
      error_message = "With vpc_subnet_ids, also give vpc_security_group_ids."
    }
  }

  # The log group and the permissions exist before the first invocation can happen.
  depends_on = [
    aws_cloudwatch_log_group.this,
    aws_iam_role_policy.lambda,
    aws_iam_role_policy_attachment.vpc,
  ]
}

resource "aws_cloudwatch_log_group" "this" {
  name              = "/aws/lambda/${var.name}"
  retention_in_days = var.log_retention_in_days
  kms_key_id        = var.kms_key_arn

  tags = local.tags
}

################################################################################
# Settings secret (value set out of band: never in Terraform state)
################################################################################

resource "aws_secretsmanager_secret" "this" {
  count = var.create_secret ? 1 : 0

  #checkov:skip=CKV2_AWS_57:The secret holds a Prefect API key or auth string that only the Prefect server can mint; Secrets Manager has nothing to rotate it with. Rotate by putting a new value.
  name                    = "${var.name}/settings"
  description             = "pushpool dispatcher settings: a JSON object with any of PREFECT_API_URL, PREFECT_API_KEY, PREFECT_API_AUTH_STRING, PUSHPOOL_WEBHOOK_SECRET. Set with `aws secretsmanager put-secret-value`."
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = var.secret_recovery_window_in_days

  tags = local.tags
}

################################################################################
# Dead-letter queue (optional)
################################################################################

resource "aws_sqs_queue" "dead_letter" {
  count = var.create_dead_letter_queue ? 1 : 0

  name                      = "${var.name}-dlq"
  message_retention_seconds = 1209600 # 14 days, SQS's maximum
  sqs_managed_sse_enabled   = var.kms_key_arn == null ? true : null
  kms_master_key_id         = var.kms_key_arn

  tags = local.tags
}
