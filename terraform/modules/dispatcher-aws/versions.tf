terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 6.28 added `invoked_via_function_url` to aws_lambda_permission, which a
      # Function URL created since October 2025 needs next to lambda:InvokeFunctionUrl.
      version = ">= 6.28, < 7.0"
    }
  }
}
