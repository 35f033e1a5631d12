terraform {
  # 1.11: the webhook block's data is a write-only argument (data_wo), so the
  # webhook secret never reaches the state.
  required_version = ">= 1.11.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 6.0, < 7.0"
    }
    prefect = {
      source = "PrefectHQ/prefect"
      # 2.83 added the write-only data_wo of prefect_block; works with Prefect OSS servers.
      version = ">= 2.83.0, < 4.0.0"
    }
  }
}
