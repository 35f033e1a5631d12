output "pool_name" {
  description = "Name of the ecs:push work pool (what deployments' work_pool_name and the dispatcher's pools name)."
  value       = prefect_work_pool.this.name
}

output "pool_id" {
  description = "Id (UUID) of the work pool on the Prefect server."
  value       = prefect_work_pool.this.id
}

output "base_job_template" {
  description = "The pool's base job template (JSON): the shipped template with this pool's defaults."
  value       = local.base_job_template
}

output "cluster_arn" {
  description = "ARN of the ECS cluster (the pool's cluster default; the dispatcher-aws module's cluster_arns)."
  value       = aws_ecs_cluster.this.arn
}

output "cluster_name" {
  description = "Name of the ECS cluster."
  value       = aws_ecs_cluster.this.name
}

output "execution_role_arn" {
  description = "ARN of the task execution role (the pool's execution_role_arn default)."
  value       = aws_iam_role.execution.arn
}

output "task_role_arn" {
  description = "ARN of the task role (the pool's task_role_arn default); null when create_task_role = false."
  value       = try(aws_iam_role.task[0].arn, null)
}

output "pass_role_arns" {
  description = "Every role the pool's tasks are started with (execution role, and task role when created): what a submitter's iam:PassRole must cover (the dispatcher-aws module's pass_role_arns)."
  value       = concat([aws_iam_role.execution.arn], aws_iam_role.task[*].arn)
}

output "ecr_repository_url" {
  description = "URL of the ECR repository to push flow images to (REGISTRY/prefect-flows); null when create_ecr_repository = false."
  value       = try(aws_ecr_repository.this[0].repository_url, null)
}

output "vpc_id" {
  description = "Id of the VPC the tasks run in (created, or given); null = the region's default VPC."
  value       = local.vpc_id
}

output "subnet_ids" {
  description = "Ids of the created public subnets (create_vpc); empty otherwise."
  value       = aws_subnet.public[*].id
}

output "security_group_id" {
  description = "Id of the created egress-only security group of the tasks (create_vpc); null otherwise."
  value       = try(aws_security_group.tasks[0].id, null)
}

output "aws_credentials_block_id" {
  description = "Id of the aws-credentials block (create_access_key); null otherwise."
  value       = try(prefect_block.aws_credentials[0].id, null)
}

output "webhook_block_id" {
  description = "Id of the webhook block the automations call the dispatcher with (create_automations); null otherwise."
  value       = try(prefect_block.webhook[0].id, null)
}

output "automation_ids" {
  description = "Ids of the automations, by what they react to (scheduled, cancelling); empty without create_automations."
  value       = { for key, automation in prefect_automation.this : key => automation.id }
}
