provider "aws" {
  region = var.aws_region
}

# Authentication to the Prefect server comes from the environment:
# PREFECT_API_KEY, or PREFECT_BASIC_AUTH_KEY for a server with basic auth.
provider "prefect" {
  endpoint = var.prefect_api_url
}

# One ecs:push pool: its cluster, roles, registry on AWS; the pool, and the
# automations that call the dispatcher, on the Prefect server.
module "pool" {
  source = "../../modules/push-pool-ecs"

  pool_name = var.pool_name

  create_automations = true
  dispatcher_url     = module.dispatcher.function_url
  webhook_secret     = var.webhook_secret

  tags = var.tags
}

# The dispatcher, allowed to run tasks only in that pool's cluster and to pass
# only that pool's roles.
module "dispatcher" {
  source = "../../modules/dispatcher-aws"

  lambda_zip_path = var.lambda_zip_path
  prefect_api_url = var.prefect_api_url
  pools           = [module.pool.pool_name]
  cluster_arns    = [module.pool.cluster_arn]
  pass_role_arns  = module.pool.pass_role_arns

  tags = var.tags
}
