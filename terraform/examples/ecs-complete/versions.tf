terraform {
  # 1.11: the webhook block's data is write-only (see modules/push-pool-ecs).
  required_version = ">= 1.11.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 6.28, < 7.0"
    }
    prefect = {
      source  = "PrefectHQ/prefect"
      version = ">= 2.83.0, < 4.0.0"
    }
  }
}
