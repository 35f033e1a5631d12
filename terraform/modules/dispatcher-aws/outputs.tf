output "function_name" {
  description = "Name of the dispatcher's Lambda function."
  value       = aws_lambda_function.this.function_name
}

output "function_arn" {
  description = "ARN of the dispatcher's Lambda function."
  value       = aws_lambda_function.this.arn
}

output "function_url" {
  description = "HTTPS URL of the Function URL that Prefect automations call (the push-pool-ecs module's dispatcher_url); null when create_function_url = false."
  value       = try(aws_lambda_function_url.this[0].function_url, null)
}

output "role_arn" {
  description = "ARN of the function's IAM role (its ambient AWS identity: the one ECS calls are made with when a pool sets no aws_credentials block)."
  value       = aws_iam_role.lambda.arn
}

output "role_name" {
  description = "Name of the function's IAM role, to attach more policies to."
  value       = aws_iam_role.lambda.name
}

output "log_group_name" {
  description = "Name of the function's CloudWatch log group."
  value       = aws_cloudwatch_log_group.this.name
}

output "secret_arn" {
  description = "ARN of the settings secret (PUSHPOOL_SECRETS_ARN): the one created here, whose value you set with `aws secretsmanager put-secret-value`, or the one given."
  value       = local.secret_arn
}

output "dead_letter_queue_arn" {
  description = "ARN of the dead-letter queue; null when create_dead_letter_queue = false."
  value       = try(aws_sqs_queue.dead_letter[0].arn, null)
}

output "schedule_group_name" {
  description = "Name of the EventBridge Scheduler group of the exact-time wake-ups (PUSHPOOL_WAKE_GROUP)."
  value       = aws_scheduler_schedule_group.wake.name
}

output "scheduler_role_arn" {
  description = "ARN of the role EventBridge Scheduler invokes the function with (PUSHPOOL_WAKE_ROLE_ARN)."
  value       = aws_iam_role.scheduler.arn
}

output "tick_schedule_arn" {
  description = "ARN of the timer schedule."
  value       = aws_scheduler_schedule.tick.arn
}

output "ecs_event_rule_arn" {
  description = "ARN of the EventBridge rule for the clusters' stopped tasks."
  value       = aws_cloudwatch_event_rule.ecs_task_stopped.arn
}
