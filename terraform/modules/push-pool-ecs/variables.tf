################################################################################
# The pool (Prefect side)
################################################################################

variable "pool_name" {
  type        = string
  description = "Name of the ecs:push work pool on the Prefect server; also the value of the pushpool:pool tag on every AWS resource."

  validation {
    # Prefect rejects names with / % & > <; AWS tag values allow no more than 256 characters.
    condition     = length(var.pool_name) > 0 && length(var.pool_name) <= 256 && !can(regex("[/%&><]", var.pool_name))
    error_message = "pool_name must be 1-256 characters and contain none of / % & > <."
  }
}

variable "pool_description" {
  type        = string
  description = "Description of the work pool."
  default     = "ECS push work pool (pushpool), managed by Terraform"
}

variable "pool_paused" {
  type        = bool
  description = "Create the pool paused (its runs are not dispatched until it is resumed)."
  default     = false
}

variable "pool_concurrency_limit" {
  type        = number
  description = "Most runs of the pool at once (the dispatcher honours it across instances); null = no limit."
  default     = null

  validation {
    condition     = var.pool_concurrency_limit == null || try(var.pool_concurrency_limit >= 0 && floor(var.pool_concurrency_limit) == var.pool_concurrency_limit, false)
    error_message = "pool_concurrency_limit must be null or a whole number >= 0."
  }
}

variable "base_job_template_file" {
  type        = string
  description = "A base job template JSON file to use instead of the module's templates/ecs-push.json (the default of `pushpool work-pool get-default-base-job-template --type ecs:push`). A template copied from a Prefect ECS worker pool works too. The module sets the cluster, role, VPC and credentials defaults in it either way."
  default     = null

  validation {
    condition     = var.base_job_template_file == null || can(regex("\\.json$", var.base_job_template_file))
    error_message = "base_job_template_file must be the path of a .json file."
  }
}

################################################################################
# ECS cluster and roles
################################################################################

variable "name_prefix" {
  type        = string
  description = "Prefix of the IAM roles, IAM user, VPC and security group names (<prefix>-execution-role, <prefix>-task-role, <prefix>-user, <prefix>-vpc, <prefix>-security-group); the same names as `pushpool work-pool create --provision-infra` with the default."
  default     = "prefect-ecs"

  validation {
    condition     = can(regex("^[A-Za-z0-9+=,.@_-]{1,40}$", var.name_prefix))
    error_message = "name_prefix must be 1-40 characters valid in IAM names (letters, digits, + = , . @ _ -)."
  }
}

variable "cluster_name" {
  type        = string
  description = "Name of the ECS cluster the pool's flow runs run in."
  default     = "prefect-ecs-cluster"

  validation {
    condition     = can(regex("^[A-Za-z0-9_-]{1,255}$", var.cluster_name))
    error_message = "cluster_name must be 1-255 letters, digits, '-' or '_'."
  }
}

variable "container_insights" {
  type        = string
  description = "CloudWatch Container Insights on the cluster: enabled, enhanced or disabled."
  default     = "enabled"

  validation {
    condition     = contains(["enabled", "enhanced", "disabled"], var.container_insights)
    error_message = "container_insights must be enabled, enhanced or disabled."
  }
}

variable "capacity_providers" {
  type        = list(string)
  description = "Fargate capacity providers of the cluster. The first is the cluster's default strategy (a run can pick another with the capacity_provider_strategy job variable)."
  default     = ["FARGATE", "FARGATE_SPOT"]

  validation {
    condition     = length(var.capacity_providers) > 0 && alltrue([for p in var.capacity_providers : contains(["FARGATE", "FARGATE_SPOT"], p)])
    error_message = "capacity_providers must be a non-empty list of FARGATE and/or FARGATE_SPOT."
  }
}

variable "create_task_role" {
  type        = bool
  description = "Create a task role (<prefix>-task-role): the AWS identity of the flow-run containers, set as the pool's task_role_arn default. Attach what flows need with task_role_policy_arns."
  default     = false
}

variable "task_role_policy_arns" {
  type        = list(string)
  description = "Managed policy ARNs to attach to the task role (with create_task_role)."
  default     = []

  validation {
    condition     = alltrue([for arn in var.task_role_policy_arns : can(regex("^arn:aws[a-z-]*:iam::([0-9]{12}|aws):policy/.+$", arn))])
    error_message = "task_role_policy_arns must be IAM policy ARNs."
  }
}

################################################################################
# Container registry
################################################################################

variable "create_ecr_repository" {
  type        = bool
  description = "Create the ECR repository the flows' images are pushed to."
  default     = true
}

variable "ecr_repository_name" {
  type        = string
  description = "Name of the ECR repository."
  default     = "prefect-flows"

  validation {
    condition     = can(regex("^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$", var.ecr_repository_name)) && length(var.ecr_repository_name) <= 256
    error_message = "ecr_repository_name must be a valid ECR repository name (lowercase letters, digits, . _ - and /)."
  }
}

variable "ecr_image_tag_mutability" {
  type        = string
  description = "MUTABLE lets `flow.deploy(image=\"...:etl\")` push the same tag again on each deploy; IMMUTABLE refuses an existing tag (use unique tags then)."
  default     = "MUTABLE"

  validation {
    condition     = contains(["MUTABLE", "IMMUTABLE"], var.ecr_image_tag_mutability)
    error_message = "ecr_image_tag_mutability must be MUTABLE or IMMUTABLE."
  }
}

variable "ecr_encryption_type" {
  type        = string
  description = "Encryption of the repository's images: AES256, or KMS (with ecr_kms_key_arn, or the AWS-managed ECR key when it is null)."
  default     = "AES256"

  validation {
    condition     = contains(["AES256", "KMS"], var.ecr_encryption_type)
    error_message = "ecr_encryption_type must be AES256 or KMS."
  }
}

variable "ecr_kms_key_arn" {
  type        = string
  description = "KMS key of the repository with ecr_encryption_type = KMS; null = the AWS-managed key."
  default     = null

  validation {
    condition     = var.ecr_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+$", var.ecr_kms_key_arn))
    error_message = "ecr_kms_key_arn must be a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)."
  }
}

variable "ecr_force_delete" {
  type        = bool
  description = "Let `terraform destroy` delete the repository even when it still holds images."
  default     = false
}

################################################################################
# Network
################################################################################

variable "create_vpc" {
  type        = bool
  description = "Create a VPC for the tasks: an internet gateway, one public subnet per availability zone (up to 3) and an egress-only security group, set as the pool's vpc_id and network_configuration defaults. false = use vpc_id, or the region's default VPC when it is null."
  default     = false
}

variable "vpc_id" {
  type        = string
  description = "An existing VPC for the tasks (with create_vpc = false), set as the pool's vpc_id default; null = the dispatcher uses the region's default VPC."
  default     = null

  validation {
    condition     = var.vpc_id == null || can(regex("^vpc-[0-9a-f]+$", var.vpc_id))
    error_message = "vpc_id must be a VPC id (vpc-...)."
  }
}

variable "vpc_cidr" {
  type        = string
  description = "IPv4 range of the created VPC (create_vpc); split into /18 subnets when it is a /16."
  default     = "10.0.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && try(tonumber(split("/", var.vpc_cidr)[1]) >= 16 && tonumber(split("/", var.vpc_cidr)[1]) <= 24, false)
    error_message = "vpc_cidr must be an IPv4 CIDR block from /16 to /24, e.g. 10.0.0.0/16."
  }
}

################################################################################
# Credentials for a dispatcher outside AWS (optional)
################################################################################

variable "create_access_key" {
  type        = bool
  description = "Create an IAM user (<prefix>-user) with the submission policy, an access key, and a Prefect aws-credentials block holding it, set as the pool's aws_credentials default. Only for a dispatcher outside AWS: the secret key then lives in the Terraform state. Prefer false: the dispatcher-aws Lambda uses its own role."
  default     = false
}

################################################################################
# Automations calling the dispatcher (optional)
################################################################################

variable "create_automations" {
  type        = bool
  description = "Create a Prefect webhook block for dispatcher_url and two automations calling it when a run of this pool is Scheduled (or Late) or Cancelling, so runs start and cancellations happen within seconds instead of at the next tick."
  default     = false
}

variable "dispatcher_url" {
  type        = string
  description = "HTTPS URL of the dispatcher (the dispatcher-aws module's function_url) for the automations; with create_automations."
  default     = null

  validation {
    condition     = var.dispatcher_url == null || can(regex("^https://[^\\s]+$", var.dispatcher_url))
    error_message = "dispatcher_url must be an https:// URL."
  }
}

variable "webhook_secret" {
  type        = string
  description = "The dispatcher's PUSHPOOL_WEBHOOK_SECRET, sent by the automations as `Authorization: Bearer <secret>`; with create_automations. It is written to the webhook block's write-only data, so it is never stored in the Terraform state. Pass it as TF_VAR_webhook_secret, not in a file."
  default     = null
  sensitive   = true

  validation {
    # As `pushpool connect` requires: it travels as `Authorization: Bearer <secret>`.
    condition     = var.webhook_secret == null || can(regex("^[!-~]{16,}$", var.webhook_secret))
    error_message = "webhook_secret must be at least 16 printable ASCII characters without spaces (e.g. `openssl rand -hex 32`)."
  }
}

variable "webhook_secret_version" {
  type        = number
  description = "Bump to write a changed webhook_secret into the webhook block (its data is write-only, so Terraform cannot see a change)."
  default     = 1

  validation {
    condition     = var.webhook_secret_version >= 1 && floor(var.webhook_secret_version) == var.webhook_secret_version
    error_message = "webhook_secret_version must be a whole number >= 1."
  }
}

################################################################################
# Tags
################################################################################

variable "tags" {
  type        = map(string)
  description = "Tags for every AWS resource, merged with pushpool:pool = <pool_name> and pushpool:managed = \"true\"."
  default     = {}
}
