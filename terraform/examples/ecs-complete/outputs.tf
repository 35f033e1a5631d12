output "pool_name" {
  description = "The ecs:push work pool to deploy flows to."
  value       = module.pool.pool_name
}

output "ecr_repository_url" {
  description = "Where to push the flows' images."
  value       = module.pool.ecr_repository_url
}

output "cluster_arn" {
  description = "The ECS cluster the flow runs run in."
  value       = module.pool.cluster_arn
}

output "function_name" {
  description = "The dispatcher's Lambda function."
  value       = module.dispatcher.function_name
}

output "function_url" {
  description = "The dispatcher's Function URL, which the automations call."
  value       = module.dispatcher.function_url
}

output "secret_arn" {
  description = "The settings secret: set its value with `aws secretsmanager put-secret-value` (see README)."
  value       = module.dispatcher.secret_arn
}

output "log_group_name" {
  description = "The dispatcher's logs."
  value       = module.dispatcher.log_group_name
}
