data "aws_partition" "current" {}
data "aws_region" "current" {}
data "aws_caller_identity" "current" {}

locals {
  partition  = data.aws_partition.current.partition
  region     = data.aws_region.current.region
  account_id = data.aws_caller_identity.current.account_id

  # Every resource carries the pool's tags, as `pushpool work-pool create --provision-infra` does.
  tags = merge(var.tags, {
    "pushpool:pool"    = var.pool_name
    "pushpool:managed" = "true"
  })

  execution_role_name = "${var.name_prefix}-execution-role"
  task_role_name      = "${var.name_prefix}-task-role"
  user_name           = "${var.name_prefix}-user"
}

################################################################################
# ECS cluster (Fargate)
################################################################################

resource "aws_ecs_cluster" "this" {
  name = var.cluster_name

  setting {
    name  = "containerInsights"
    value = var.container_insights
  }

  tags = local.tags
}

resource "aws_ecs_cluster_capacity_providers" "this" {
  cluster_name       = aws_ecs_cluster.this.name
  capacity_providers = var.capacity_providers

  default_capacity_provider_strategy {
    capacity_provider = var.capacity_providers[0]
    weight            = 1
  }
}

################################################################################
# Task execution role (pulls the image, writes the container's logs)
################################################################################

data "aws_iam_policy_document" "execution_assume" {
  statement {
    sid     = "EcsTasksAssumeTheExecutionRole"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "execution" {
  name               = local.execution_role_name
  description        = "ECS task execution role for the Prefect flow runs of push pool ${var.pool_name} (pushpool)"
  assume_role_policy = data.aws_iam_policy_document.execution_assume.json

  tags = local.tags
}

resource "aws_iam_role_policy_attachment" "execution" {
  role       = aws_iam_role.execution.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

# configure_cloudwatch_logs sets awslogs-create-group: the execution role
# creates the log group ("prefect" by default) on the first run.
data "aws_iam_policy_document" "execution_logs" {
  statement {
    sid       = "CreateTheFlowRunsLogGroup"
    actions   = ["logs:CreateLogGroup"]
    resources = ["arn:${local.partition}:logs:${local.region}:${local.account_id}:log-group:*"]
  }
}

resource "aws_iam_role_policy" "execution_logs" {
  name   = "prefect-ecs-execution-logs"
  role   = aws_iam_role.execution.id
  policy = data.aws_iam_policy_document.execution_logs.json
}

################################################################################
# Task role (optional: the flow-run containers' own AWS identity)
################################################################################

data "aws_iam_policy_document" "task_assume" {
  statement {
    sid     = "EcsTasksOfThisAccountAssumeTheTaskRole"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }

    # Confused-deputy protection (as the ECS docs recommend for task roles):
    # only ECS tasks of this account.
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }

    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = ["arn:${local.partition}:ecs:${local.region}:${local.account_id}:*"]
    }
  }
}

resource "aws_iam_role" "task" {
  count = var.create_task_role ? 1 : 0

  name               = local.task_role_name
  description        = "AWS identity of the Prefect flow-run containers of push pool ${var.pool_name} (pushpool)"
  assume_role_policy = data.aws_iam_policy_document.task_assume.json

  tags = local.tags
}

resource "aws_iam_role_policy_attachment" "task" {
  for_each = var.create_task_role ? toset(var.task_role_policy_arns) : toset([])

  role       = aws_iam_role.task[0].name
  policy_arn = each.value
}

################################################################################
# Container registry
################################################################################

resource "aws_ecr_repository" "this" {
  count = var.create_ecr_repository ? 1 : 0

  #checkov:skip=CKV_AWS_51:Mutable tags are the default because `flow.deploy(image="...:TAG")` pushes the same tag again on every deploy; set ecr_image_tag_mutability = "IMMUTABLE" when tags are unique.
  #checkov:skip=CKV_AWS_136:AES256 (ECR's default encryption at rest) unless ecr_encryption_type = "KMS" is chosen; a customer-managed key adds a key policy to maintain for every puller.
  name                 = var.ecr_repository_name
  image_tag_mutability = var.ecr_image_tag_mutability
  force_delete         = var.ecr_force_delete

  image_scanning_configuration {
    scan_on_push = true
  }

  encryption_configuration {
    encryption_type = var.ecr_encryption_type
    kms_key         = var.ecr_encryption_type == "KMS" ? var.ecr_kms_key_arn : null
  }

  tags = local.tags
}

################################################################################
# IAM user + access key (optional, for a dispatcher outside AWS)
################################################################################

# The same least-privilege submission policy the dispatcher's Lambda role has
# for ECS, for a dispatcher that runs outside AWS.
data "aws_iam_policy_document" "submit" {
  # Submit flow runs: RunTask only into this pool's cluster.
  statement {
    sid       = "RunTasksInThePoolsCluster"
    actions   = ["ecs:RunTask"]
    resources = ["arn:${local.partition}:ecs:${local.region}:${local.account_id}:task-definition/*"]

    condition {
      test     = "ArnEquals"
      variable = "ecs:cluster"
      values   = [aws_ecs_cluster.this.arn]
    }
  }

  # Watch and cancel the cluster's tasks.
  statement {
    sid       = "WatchAndStopTasksInThePoolsCluster"
    actions   = ["ecs:DescribeTasks", "ecs:StopTask"]
    resources = ["arn:${local.partition}:ecs:${local.region}:${local.account_id}:task/${aws_ecs_cluster.this.name}/*"]
  }

  # Find a task a flow run already started (idempotent submission).
  statement {
    sid       = "FindTasksAlreadyStartedInThePoolsCluster"
    actions   = ["ecs:ListTasks"]
    resources = ["*"]

    condition {
      test     = "ArnEquals"
      variable = "ecs:cluster"
      values   = [aws_ecs_cluster.this.arn]
    }
  }

  # Tags on RunTask need TagResource, only as part of RunTask.
  statement {
    sid       = "TagTasksWhenRunningThem"
    actions   = ["ecs:TagResource"]
    resources = ["arn:${local.partition}:ecs:${local.region}:${local.account_id}:task/${aws_ecs_cluster.this.name}/*"]

    condition {
      test     = "StringEquals"
      variable = "ecs:CreateAction"
      values   = ["RunTask"]
    }
  }

  # Task definitions (no resource-level permissions exist for these).
  statement {
    sid       = "ManageTaskDefinitions"
    actions   = ["ecs:RegisterTaskDefinition", "ecs:DescribeTaskDefinition", "ecs:DeregisterTaskDefinition"]
    resources = ["*"]
  }

  # The tasks' network (no resource-level permissions exist for these).
  statement {
    sid       = "FindTheTasksNetwork"
    actions   = ["ec2:DescribeVpcs", "ec2:DescribeSubnets"]
    resources = ["*"]
  }

  # A crashed task's last log lines.
  statement {
    sid       = "ReadCrashedTasksLogs"
    actions   = ["logs:GetLogEvents"]
    resources = ["arn:${local.partition}:logs:${local.region}:${local.account_id}:log-group:prefect:log-stream:*"]
  }

  # Start tasks with this pool's roles only, and only to ECS tasks.
  statement {
    sid       = "PassThePoolsTaskRolesToEcs"
    actions   = ["iam:PassRole"]
    resources = concat([aws_iam_role.execution.arn], aws_iam_role.task[*].arn)

    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ecs-tasks.amazonaws.com"]
    }
  }
}

resource "aws_iam_user" "this" {
  count = var.create_access_key ? 1 : 0

  name = local.user_name
  tags = local.tags
}

resource "aws_iam_user_policy" "this" {
  count = var.create_access_key ? 1 : 0

  name   = "prefect-ecs-policy"
  user   = aws_iam_user.this[0].name
  policy = data.aws_iam_policy_document.submit.json
}

# The secret access key is stored in the Terraform state (and in the Prefect
# block below): keep the state encrypted, or prefer create_access_key = false.
resource "aws_iam_access_key" "this" {
  count = var.create_access_key ? 1 : 0

  user = aws_iam_user.this[0].name
}
