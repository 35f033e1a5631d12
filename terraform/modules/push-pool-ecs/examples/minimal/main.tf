provider "aws" {
  region = "us-east-1"
}

# PREFECT_API_URL (and PREFECT_API_KEY or PREFECT_BASIC_AUTH_KEY) from the environment.
provider "prefect" {}

# One ecs:push pool with its cluster, execution role and ECR repository, in
# the region's default VPC, served by a dispatcher with its own AWS role.
module "pool" {
  source = "../.."

  pool_name = "my-ecs-pool"
}
