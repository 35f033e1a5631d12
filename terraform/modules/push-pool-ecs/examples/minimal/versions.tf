terraform {
  required_version = ">= 1.11.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 6.0, < 7.0"
    }
    prefect = {
      source  = "PrefectHQ/prefect"
      version = ">= 2.83.0, < 4.0.0"
    }
  }
}
