################################################################################
# The function's role: least privilege, no wildcard action
################################################################################

locals {
  # Partition, region, account and name of each cluster, from its ARN.
  clusters = [
    for arn in var.cluster_arns :
    regex("^arn:(?P<partition>[^:]+):ecs:(?P<region>[^:]+):(?P<account>[0-9]{12}):cluster/(?P<name>.+)$", arn)
  ]
  # Tasks live under their cluster: arn:...:task/CLUSTER/ID.
  task_arns = distinct([for c in local.clusters : "arn:${c.partition}:ecs:${c.region}:${c.account}:task/${c.name}/*"])
  # RunTask is authorised on the task definition; where it runs is held by the ecs:cluster condition.
  task_definition_arns = distinct([for c in local.clusters : "arn:${c.partition}:ecs:${c.region}:${c.account}:task-definition/*"])
  task_log_stream_arns = distinct(flatten([
    for c in local.clusters : [
      for g in var.task_log_group_names : "arn:${c.partition}:logs:${c.region}:${c.account}:log-group:${g}:log-stream:*"
    ]
  ]))
  wake_schedule_arn = "arn:${local.partition}:scheduler:${local.region}:${local.account_id}:schedule/${aws_scheduler_schedule_group.wake.name}/*"
}

data "aws_iam_policy_document" "lambda_assume" {
  statement {
    sid     = "LambdaAssumesTheRole"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "lambda" {
  name               = "${var.name}-lambda"
  description        = "pushpool dispatcher (${var.name}): submits, watches and stops ECS tasks for Prefect flow runs"
  assume_role_policy = data.aws_iam_policy_document.lambda_assume.json

  tags = local.tags
}

data "aws_iam_policy_document" "lambda" {
  # Submit a flow run: RunTask only into the pools' clusters (the ecs:cluster
  # condition); the task definition is the pool's own, registered per flow.
  statement {
    sid       = "RunTasksInThePoolsClusters"
    actions   = ["ecs:RunTask"]
    resources = local.task_definition_arns

    condition {
      test     = "ArnEquals"
      variable = "ecs:cluster"
      values   = var.cluster_arns
    }
  }

  # Watch and cancel: describe a run's task (status, stop reason, exit code) and
  # stop it when the run is cancelled, only for tasks of those clusters.
  statement {
    sid       = "WatchAndStopTasksInThePoolsClusters"
    actions   = ["ecs:DescribeTasks", "ecs:StopTask"]
    resources = local.task_arns

    condition {
      test     = "ArnEquals"
      variable = "ecs:cluster"
      values   = var.cluster_arns
    }
  }

  # Idempotent submission: before launching, look for a task this flow run
  # already started (startedBy = flow run id). ListTasks is authorised on the
  # container-instance resource type, so the cluster is held by the condition.
  statement {
    sid       = "FindTasksAlreadyStartedInThePoolsClusters"
    actions   = ["ecs:ListTasks"]
    resources = ["*"]

    condition {
      test     = "ArnEquals"
      variable = "ecs:cluster"
      values   = var.cluster_arns
    }
  }

  # RunTask with tags (flow run id, run count, labels) also needs TagResource,
  # here only as part of RunTask (ecs:CreateAction) and only on those clusters' tasks.
  statement {
    sid       = "TagTasksWhenRunningThem"
    actions   = ["ecs:TagResource"]
    resources = local.task_arns

    condition {
      test     = "StringEquals"
      variable = "ecs:CreateAction"
      values   = ["RunTask"]
    }
  }

  # Task definitions are reused: one family per pool and flow, a new revision
  # only on a real difference, old ones deregistered when a pool asks for it.
  # These actions support no resource-level permissions ("*" is the only resource).
  statement {
    sid = "ManageTaskDefinitions"
    actions = [
      "ecs:RegisterTaskDefinition",
      "ecs:DescribeTaskDefinition",
      "ecs:DeregisterTaskDefinition",
    ]
    resources = ["*"]
  }

  # Network for awsvpc tasks: check the pool's vpc_id and subnets, or find the
  # default VPC's subnets. Describe calls support no resource-level permissions.
  statement {
    sid       = "FindTheTasksNetwork"
    actions   = ["ec2:DescribeVpcs", "ec2:DescribeSubnets"]
    resources = ["*"]
  }

  # A crashed task's reason: the last lines of its container's log stream.
  statement {
    sid       = "ReadCrashedTasksLogs"
    actions   = ["logs:GetLogEvents"]
    resources = local.task_log_stream_arns
  }

  # Start tasks with the pools' execution and task roles: only those roles,
  # and only to ECS tasks.
  statement {
    sid       = "PassThePoolsTaskRolesToEcs"
    actions   = ["iam:PassRole"]
    resources = var.pass_role_arns

    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ecs-tasks.amazonaws.com"]
    }
  }

  # The function's own logs, in its own log group only.
  statement {
    sid       = "WriteOwnLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.this.arn}:*"]
  }

  # Active X-Ray tracing. X-Ray supports no resource-level permissions.
  statement {
    sid       = "WriteTraces"
    actions   = ["xray:PutTraceSegments", "xray:PutTelemetryRecords"]
    resources = ["*"]
  }

  # The settings (Prefect API key or auth string, webhook secret) at cold start,
  # from the one secret or parameter, never anything else. The ARN is of one
  # service, so only that service's read action can ever match it.
  statement {
    sid       = "ReadTheSettingsSecret"
    actions   = ["secretsmanager:GetSecretValue", "ssm:GetParameter"]
    resources = [local.secret_arn]
  }

  # Exact-time wake-ups: one-time at() schedules in the dispatcher's own
  # schedule group (they delete themselves after running).
  statement {
    sid       = "ArrangeWakeUpsInOwnScheduleGroup"
    actions   = ["scheduler:CreateSchedule", "scheduler:DeleteSchedule", "scheduler:GetSchedule"]
    resources = [local.wake_schedule_arn]
  }

  # Those schedules invoke the function with the scheduler role: pass only
  # that role, and only to EventBridge Scheduler.
  statement {
    sid       = "PassTheSchedulerRoleToScheduler"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.scheduler.arn]

    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["scheduler.amazonaws.com"]
    }
  }

  # A customer-managed key on the settings secret: decrypt only through the
  # service that holds the secret.
  dynamic "statement" {
    for_each = local.secret_kms_key_arn == null ? [] : [local.secret_kms_key_arn]
    content {
      sid       = "DecryptTheSettingsSecret"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["secretsmanager.${local.region}.amazonaws.com", "ssm.${local.region}.amazonaws.com"]
      }
    }
  }

  # Failed asynchronous invocations go to the dead-letter queue.
  dynamic "statement" {
    for_each = var.create_dead_letter_queue ? [aws_sqs_queue.dead_letter[0].arn] : []
    content {
      sid       = "SendToTheDeadLetterQueue"
      actions   = ["sqs:SendMessage"]
      resources = [statement.value]
    }
  }

  # ... which, with a customer-managed key, needs the key through SQS only.
  dynamic "statement" {
    for_each = var.create_dead_letter_queue && var.kms_key_arn != null ? [var.kms_key_arn] : []
    content {
      sid       = "EncryptDeadLetters"
      actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
      resources = [statement.value]

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["sqs.${local.region}.amazonaws.com"]
      }
    }
  }
}

resource "aws_iam_role_policy" "lambda" {
  name   = "pushpool-dispatcher"
  role   = aws_iam_role.lambda.id
  policy = data.aws_iam_policy_document.lambda.json
}

# In a VPC, Lambda creates and deletes the function's network interfaces with
# this role; AWS's managed policy is exactly those EC2 actions.
resource "aws_iam_role_policy_attachment" "vpc" {
  count = length(var.vpc_subnet_ids) > 0 ? 1 : 0

  role       = aws_iam_role.lambda.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AWSLambdaENIManagementAccess"
}

################################################################################
# The scheduler's role: invoke this function, nothing else
################################################################################

data "aws_iam_policy_document" "scheduler_assume" {
  statement {
    sid     = "SchedulerAssumesTheRoleForThisAccount"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["scheduler.amazonaws.com"]
    }

    # Confused-deputy protection: only schedules of this account.
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role" "scheduler" {
  name               = "${var.name}-scheduler"
  description        = "EventBridge Scheduler invokes the pushpool dispatcher ${var.name} (timer ticks and exact-time wake-ups)"
  assume_role_policy = data.aws_iam_policy_document.scheduler_assume.json

  tags = local.tags
}

data "aws_iam_policy_document" "scheduler" {
  # The tick schedule and the wake-up schedules invoke this one function.
  statement {
    sid       = "InvokeTheDispatcher"
    actions   = ["lambda:InvokeFunction"]
    resources = [aws_lambda_function.this.arn]
  }

  # A schedule encrypted with a customer-managed key is decrypted with this role.
  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [var.kms_key_arn]
    content {
      sid       = "DecryptTheTickSchedule"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_role_policy" "scheduler" {
  name   = "pushpool-invoke-dispatcher"
  role   = aws_iam_role.scheduler.id
  policy = data.aws_iam_policy_document.scheduler.json
}
