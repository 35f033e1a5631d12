provider "aws" {
  region = "us-east-1"
}

# The dispatcher for an existing pool whose cluster and execution role were
# made elsewhere (e.g. by `pushpool work-pool create --provision-infra`).
module "dispatcher" {
  source = "../.."

  lambda_zip_path = "${path.root}/../../../../../dist/pushpool-lambda.zip"
  prefect_api_url = "https://prefect.example.com/api"

  cluster_arns   = ["arn:aws:ecs:us-east-1:123456789012:cluster/prefect-ecs-cluster"]
  pass_role_arns = ["arn:aws:iam::123456789012:role/prefect-ecs-execution-role"]
}
