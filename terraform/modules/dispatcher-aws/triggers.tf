################################################################################
# Webhook trigger: the Function URL Prefect automations call
################################################################################

# authorization_type NONE: Prefect's call-webhook action cannot sign requests
# with SigV4. Requests are authenticated by the function itself, which rejects
# any request without `Authorization: Bearer <PUSHPOOL_WEBHOOK_SECRET>` (the
# secret is in the settings secret). And a webhook is only a hint: the
# function re-reads pools and runs from the Prefect API, so even a forged or
# replayed request cannot run anything that is not really due.
resource "aws_lambda_function_url" "this" {
  count = var.create_function_url ? 1 : 0

  #checkov:skip=CKV_AWS_258:Prefect automations cannot sign requests (SigV4); the function authenticates each request with the shared webhook secret (Authorization: Bearer PUSHPOOL_WEBHOOK_SECRET) and only re-reads the Prefect API on it.
  function_name      = aws_lambda_function.this.function_name
  authorization_type = "NONE"
  invoke_mode        = "BUFFERED"
}

# A public Function URL needs both statements (since October 2025): the URL
# may be invoked, and invoking the function is allowed only through the URL.
# The AWS provider also adds such statements itself when it creates the URL,
# outside the state; these are the ones Terraform tracks (distinct statement
# ids, so they never collide with the provider's).
resource "aws_lambda_permission" "function_url" {
  count = var.create_function_url ? 1 : 0

  #checkov:skip=CKV_AWS_301:Public only through the Function URL (function_url_auth_type NONE), which the webhook shared secret authenticates; see aws_lambda_function_url.this.
  statement_id           = "PushpoolFunctionUrlPublicAccess"
  action                 = "lambda:InvokeFunctionUrl"
  function_name          = aws_lambda_function.this.function_name
  principal              = "*"
  function_url_auth_type = "NONE"
}

resource "aws_lambda_permission" "function_url_invoke" {
  count = var.create_function_url ? 1 : 0

  #checkov:skip=CKV_AWS_301:Invocation is allowed only via the Function URL (invoked_via_function_url), which the webhook shared secret authenticates.
  statement_id             = "PushpoolFunctionUrlInvoke"
  action                   = "lambda:InvokeFunction"
  function_name            = aws_lambda_function.this.function_name
  principal                = "*"
  invoked_via_function_url = true
}

################################################################################
# Timer trigger: sweep + reconcile every tick
################################################################################

resource "aws_scheduler_schedule" "tick" {
  name        = "${var.name}-tick"
  group_name  = "default"
  description = "pushpool: sweep the push pools and reconcile (runs created by deployment schedules are found only by this timer)"

  schedule_expression          = var.tick_schedule_expression
  schedule_expression_timezone = "UTC"
  state                        = "ENABLED"
  kms_key_arn                  = var.kms_key_arn

  flexible_time_window {
    mode = "OFF"
  }

  target {
    arn      = aws_lambda_function.this.arn
    role_arn = aws_iam_role.scheduler.arn
    input    = jsonencode({ pushpool = "tick" })

    # A late tick is worthless: the next one comes a period later.
    retry_policy {
      maximum_event_age_in_seconds = 60
      maximum_retry_attempts       = 0
    }
  }

  # The first tick may come at once: the role must already allow the invocation.
  depends_on = [aws_iam_role_policy.scheduler]
}

# Exact-time wake-ups: the function creates one-time at() schedules here,
# targeting itself with the scheduler role; they delete themselves after use.
resource "aws_scheduler_schedule_group" "wake" {
  name = "${var.name}-wake"

  tags = local.tags
}

################################################################################
# ECS trigger: a task of the pools' clusters stopped
################################################################################

resource "aws_cloudwatch_event_rule" "ecs_task_stopped" {
  name        = "${var.name}-ecs-task-stopped"
  description = "pushpool: an ECS task of a push pool's cluster stopped; settle its flow run"
  state       = "ENABLED"

  event_pattern = jsonencode({
    source        = ["aws.ecs"]
    "detail-type" = ["ECS Task State Change"]
    detail = {
      lastStatus = ["STOPPED"]
      clusterArn = var.cluster_arns
    }
  })

  tags = local.tags
}

resource "aws_cloudwatch_event_target" "ecs_task_stopped" {
  rule      = aws_cloudwatch_event_rule.ecs_task_stopped.name
  target_id = "pushpool-dispatcher"
  arn       = aws_lambda_function.this.arn

  retry_policy {
    maximum_event_age_in_seconds = 3600
    maximum_retry_attempts       = 3
  }
}

resource "aws_lambda_permission" "ecs_task_stopped" {
  statement_id  = "PushpoolEcsTaskStateChange"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.this.function_name
  principal     = "events.amazonaws.com"
  source_arn    = aws_cloudwatch_event_rule.ecs_task_stopped.arn
}
