output "pool_name" {
  description = "The work pool to deploy flows to."
  value       = module.pool.pool_name
}

output "ecr_repository_url" {
  description = "Where to push the flows' images."
  value       = module.pool.ecr_repository_url
}
