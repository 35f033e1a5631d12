variable "aws_region" {
  type        = string
  description = "AWS region of the cluster and the dispatcher."
  default     = "us-east-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.aws_region))
    error_message = "aws_region must be an AWS region name such as us-east-1."
  }
}

variable "prefect_api_url" {
  type        = string
  description = "URL of your Prefect server's API, e.g. https://prefect.example.com/api: Terraform manages the pool there, and the dispatcher calls it."

  validation {
    condition     = can(regex("^https?://[^\\s]+$", var.prefect_api_url))
    error_message = "prefect_api_url must be an http(s):// URL, e.g. https://prefect.example.com/api."
  }
}

variable "pool_name" {
  type        = string
  description = "Name of the ecs:push work pool."
  default     = "my-ecs-pool"

  validation {
    condition     = length(var.pool_name) > 0 && !can(regex("[/%&><]", var.pool_name))
    error_message = "pool_name must be non-empty and contain none of / % & > <."
  }
}

variable "lambda_zip_path" {
  type        = string
  description = "The dispatcher's deployment package, built with `pushpool package aws-lambda -o dist/pushpool-lambda.zip` (relative to this folder, or absolute)."
  default     = "../../../dist/pushpool-lambda.zip"

  validation {
    condition     = can(regex("\\.zip$", var.lambda_zip_path))
    error_message = "lambda_zip_path must be the path of a .zip file."
  }
}

variable "webhook_secret" {
  type        = string
  description = "The shared secret the automations send and the dispatcher checks (PUSHPOOL_WEBHOOK_SECRET; put the same value in the settings secret). Pass it as TF_VAR_webhook_secret; it is never stored in the state."
  sensitive   = true

  validation {
    condition     = can(regex("^[!-~]{16,}$", var.webhook_secret))
    error_message = "webhook_secret must be at least 16 printable ASCII characters without spaces (e.g. `openssl rand -hex 32`)."
  }
}

variable "tags" {
  type        = map(string)
  description = "Tags for every AWS resource."
  default     = {}
}
