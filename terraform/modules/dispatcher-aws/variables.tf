################################################################################
# The function
################################################################################

variable "name" {
  type        = string
  description = "Name of the Lambda function; also the prefix of every other resource this module creates (roles, schedule, schedule group, rule, queue, secret)."
  default     = "pushpool-dispatcher"

  validation {
    # 46, not Lambda's 64: other resources append up to 17 characters ("-ecs-task-stopped").
    condition     = can(regex("^[A-Za-z0-9_-]{1,46}$", var.name))
    error_message = "name must be 1-46 characters: letters, digits, '-' and '_'."
  }
}

variable "lambda_zip_path" {
  type        = string
  description = "Path of the deployment package built by `pushpool package aws-lambda -o dist/pushpool-lambda.zip` (with the same --architecture and --python-version as `architecture` and `runtime`)."

  validation {
    condition     = can(regex("\\.zip$", var.lambda_zip_path))
    error_message = "lambda_zip_path must be the path of a .zip file built by `pushpool package aws-lambda`."
  }
}

variable "runtime" {
  type        = string
  description = "Lambda Python runtime. Must match the --python-version the zip was built for."
  default     = "python3.12"

  validation {
    condition     = contains(["python3.11", "python3.12", "python3.13"], var.runtime)
    error_message = "runtime must be python3.11, python3.12 or python3.13 (pushpool needs Python >= 3.11)."
  }
}

variable "architecture" {
  type        = string
  description = "Instruction set of the function: x86_64 or arm64. Must match the --architecture the zip was built for (its compiled wheels are per architecture)."
  default     = "x86_64"

  validation {
    condition     = contains(["x86_64", "arm64"], var.architecture)
    error_message = "architecture must be x86_64 or arm64."
  }
}

variable "memory_size" {
  type        = number
  description = "Memory of the function in MB (CPU is allotted in proportion)."
  default     = 512

  validation {
    condition     = var.memory_size >= 128 && var.memory_size <= 10240 && floor(var.memory_size) == var.memory_size
    error_message = "memory_size must be a whole number of MB between 128 and 10240."
  }
}

variable "timeout" {
  type        = number
  description = "Timeout of one invocation in seconds (Lambda allows at most 900). An exact-time wake-up arrives up to 2 minutes early (EventBridge Scheduler's 60 s precision) and waits in the invocation, so keep at least 180."
  default     = 300

  validation {
    condition     = var.timeout >= 180 && var.timeout <= 900 && floor(var.timeout) == var.timeout
    error_message = "timeout must be a whole number of seconds between 180 and 900 (a wake-up may wait up to 150 s before it sweeps)."
  }
}

variable "reserved_concurrent_executions" {
  type        = number
  description = "Concurrency reserved for the function; null leaves it unreserved (the account's shared pool). Claims are serialised by the Prefect server, so extra instances are safe; reserve only to cap the load on the Prefect API."
  default     = null

  validation {
    condition     = var.reserved_concurrent_executions == null || try(var.reserved_concurrent_executions >= 0 && floor(var.reserved_concurrent_executions) == var.reserved_concurrent_executions, false)
    error_message = "reserved_concurrent_executions must be null or a whole number >= 0."
  }
}

variable "vpc_subnet_ids" {
  type        = list(string)
  description = "Subnets to attach the function to, for a Prefect server reachable only inside a VPC. Empty = no VPC. The subnets need a route to the AWS APIs (NAT gateway or VPC endpoints for ECS, EC2, Logs, Scheduler, X-Ray and Secrets Manager/SSM)."
  default     = []

  validation {
    condition     = alltrue([for id in var.vpc_subnet_ids : can(regex("^subnet-[0-9a-f]+$", id))])
    error_message = "vpc_subnet_ids must be subnet ids (subnet-...)."
  }
}

variable "vpc_security_group_ids" {
  type        = list(string)
  description = "Security groups of the function's network interfaces when vpc_subnet_ids is set (they must allow outbound HTTPS and the Prefect API's port)."
  default     = []

  validation {
    condition     = alltrue([for id in var.vpc_security_group_ids : can(regex("^sg-[0-9a-f]+$", id))])
    error_message = "vpc_security_group_ids must be security group ids (sg-...)."
  }
}

################################################################################
# Settings (environment of the function)
################################################################################

variable "prefect_api_url" {
  type        = string
  description = "PREFECT_API_URL, as a plain (non-secret) setting, e.g. https://prefect.example.com/api. Optional: a PREFECT_API_URL key in the settings secret wins over it."
  default     = null

  validation {
    condition     = var.prefect_api_url == null || can(regex("^https?://[^\\s]+$", var.prefect_api_url))
    error_message = "prefect_api_url must be an http(s):// URL, e.g. https://prefect.example.com/api."
  }
}

variable "pools" {
  type        = list(string)
  description = "Names of the push work pools this dispatcher serves (PUSHPOOL_POOLS). Empty = every pool whose type ends in ':push'."
  default     = []

  validation {
    condition     = alltrue([for p in var.pools : length(trimspace(p)) > 0 && !strcontains(p, ",")])
    error_message = "Each pool name must be non-empty and contain no comma."
  }
}

variable "prefetch_seconds" {
  type        = number
  description = "PUSHPOOL_PREFETCH_SECONDS: claim runs due within this many seconds; match how long the backend takes to start a container (Prefect makes an early run wait). null = each backend's own default (45 s for ecs:push)."
  default     = null

  validation {
    condition     = var.prefetch_seconds == null ? true : (var.prefetch_seconds >= 0 && var.prefetch_seconds <= 3600)
    error_message = "prefetch_seconds must be between 0 and 3600."
  }
}

variable "max_concurrency" {
  type        = number
  description = "PUSHPOOL_MAX_CONCURRENCY: runs claimed and submitted at once per invocation."
  default     = 8

  validation {
    condition     = var.max_concurrency >= 1 && var.max_concurrency <= 512 && floor(var.max_concurrency) == var.max_concurrency
    error_message = "max_concurrency must be a whole number between 1 and 512."
  }
}

variable "log_level" {
  type        = string
  description = "POWERTOOLS_LOG_LEVEL of the function."
  default     = "INFO"

  validation {
    condition     = contains(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], var.log_level)
    error_message = "log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL."
  }
}

variable "extra_environment_variables" {
  type        = map(string)
  description = "More plain settings for the function (e.g. PUSHPOOL_PENDING_TIMEOUT_SECONDS). Never secrets: those go in the settings secret."
  default     = {}

  validation {
    condition = length(setintersection(
      toset(keys(var.extra_environment_variables)),
      toset(["PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PUSHPOOL_WEBHOOK_SECRET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"])
    )) == 0
    error_message = "Secrets (PREFECT_API_KEY, PREFECT_API_AUTH_STRING, PUSHPOOL_WEBHOOK_SECRET, AWS keys) must not be plain environment variables: put them in the settings secret (secrets_arn)."
  }
}

################################################################################
# Secrets
################################################################################

variable "create_secret" {
  type        = bool
  description = "Create an empty Secrets Manager secret for the settings (you set its value out of band with `aws secretsmanager put-secret-value`). Set false and pass secrets_arn to use an existing one."
  default     = true
}

variable "secrets_arn" {
  type        = string
  description = "ARN of an existing Secrets Manager secret, or SSM SecureString parameter, whose value is a JSON object with any of PREFECT_API_URL, PREFECT_API_KEY, PREFECT_API_AUTH_STRING, PUSHPOOL_WEBHOOK_SECRET (PUSHPOOL_SECRETS_ARN; read at cold start). Only with create_secret = false."
  default     = null

  validation {
    condition = var.secrets_arn == null || can(regex(
      "^arn:aws[a-z-]*:(secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:[A-Za-z0-9/_+=.@-]+|ssm:[a-z0-9-]+:[0-9]{12}:parameter/[A-Za-z0-9/_.-]+)$",
      var.secrets_arn
    ))
    error_message = "secrets_arn must be a Secrets Manager secret ARN (arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME) or an SSM parameter ARN (arn:aws:ssm:REGION:ACCOUNT:parameter/NAME)."
  }
}

variable "secrets_kms_key_arn" {
  type        = string
  description = "Customer-managed KMS key that encrypts the existing secret or parameter given as secrets_arn, if any: the function gets kms:Decrypt on it (through that service only). Null for AWS-managed keys."
  default     = null

  validation {
    condition     = var.secrets_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+$", var.secrets_kms_key_arn))
    error_message = "secrets_kms_key_arn must be a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)."
  }
}

variable "secret_recovery_window_in_days" {
  type        = number
  description = "Days a deleted settings secret (create_secret) can be restored; 0 deletes it at once."
  default     = 7

  validation {
    condition     = var.secret_recovery_window_in_days == 0 || (var.secret_recovery_window_in_days >= 7 && var.secret_recovery_window_in_days <= 30)
    error_message = "secret_recovery_window_in_days must be 0 or between 7 and 30."
  }
}

variable "kms_key_arn" {
  type        = string
  description = "Customer-managed KMS key for what this module creates: the settings secret, the log group, the dead-letter queue, the schedule and the function's environment. Null = AWS-managed keys. Its key policy must allow logs.REGION.amazonaws.com to use it for the log group."
  default     = null

  validation {
    condition     = var.kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+$", var.kms_key_arn))
    error_message = "kms_key_arn must be a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)."
  }
}

################################################################################
# What the function may touch
################################################################################

variable "cluster_arns" {
  type        = list(string)
  description = "ARNs of the ECS clusters of the pools served: the function may run, stop and describe tasks only there, and their \"Task State Change\" events trigger it."

  validation {
    condition     = length(var.cluster_arns) > 0
    error_message = "cluster_arns must name at least one ECS cluster."
  }

  validation {
    condition     = alltrue([for arn in var.cluster_arns : can(regex("^arn:aws[a-z-]*:ecs:[a-z0-9-]+:[0-9]{12}:cluster/[A-Za-z0-9_-]+$", arn))])
    error_message = "cluster_arns must be ECS cluster ARNs (arn:aws:ecs:REGION:ACCOUNT:cluster/NAME)."
  }
}

variable "pass_role_arns" {
  type        = list(string)
  description = "The task execution role and task role ARNs the pools' tasks run with: the function may pass only these (iam:PassRole), and only to ecs-tasks.amazonaws.com."

  validation {
    condition     = length(var.pass_role_arns) > 0
    error_message = "pass_role_arns must name at least the pool's task execution role."
  }

  validation {
    condition     = alltrue([for arn in var.pass_role_arns : can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]+$", arn))])
    error_message = "pass_role_arns must be IAM role ARNs (arn:aws:iam::ACCOUNT:role/NAME), no wildcards."
  }
}

variable "task_log_group_names" {
  type        = list(string)
  description = "CloudWatch log groups the flow-run containers log to (\"prefect\" is what configure_cloudwatch_logs uses): the function may read their streams (logs:GetLogEvents) to report why a task crashed."
  default     = ["prefect"]

  validation {
    condition     = alltrue([for g in var.task_log_group_names : can(regex("^[A-Za-z0-9_/.#-]{1,512}$", g))])
    error_message = "task_log_group_names must be log group names (letters, digits, '_', '-', '/', '.', '#'), without wildcards."
  }
}

################################################################################
# Triggers
################################################################################

variable "create_function_url" {
  type        = bool
  description = "Create the Lambda Function URL that Prefect automations call (webhook triggers, authenticated by PUSHPOOL_WEBHOOK_SECRET)."
  default     = true
}

variable "tick_schedule_expression" {
  type        = string
  description = "EventBridge Scheduler expression of the timer that sweeps and reconciles, e.g. rate(1 minute) or cron(0/2 * * * ? *). Runs created by a deployment's schedule are only found by this timer."
  default     = "rate(1 minute)"

  validation {
    condition     = can(regex("^(rate|cron)\\(.+\\)$", var.tick_schedule_expression))
    error_message = "tick_schedule_expression must start with rate( or cron(, e.g. rate(1 minute)."
  }
}

variable "tick_seconds" {
  type        = number
  description = "PUSHPOOL_TICK_SECONDS, the timer's period in seconds. Null = derived from a rate() expression; required with cron()."
  default     = null

  validation {
    condition     = var.tick_seconds == null || try(var.tick_seconds >= 60, false)
    error_message = "tick_seconds must be null or at least 60 (EventBridge Scheduler's finest rate)."
  }
}

################################################################################
# Logs, dead letters, tags
################################################################################

variable "log_retention_in_days" {
  type        = number
  description = "Retention of the function's log group /aws/lambda/<name>, in days (0 = never expire)."
  default     = 365

  validation {
    condition     = contains([0, 1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_in_days)
    error_message = "log_retention_in_days must be one of CloudWatch Logs' values: 0, 1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653."
  }
}

variable "create_dead_letter_queue" {
  type        = bool
  description = "Create an encrypted SQS dead-letter queue for asynchronous invocations that failed every retry. Optional: every trigger is only a hint, and the next tick re-reads the truth from the Prefect API."
  default     = false
}

variable "tags" {
  type        = map(string)
  description = "Tags for every resource this module creates."
  default     = {}
}
