output "function_url" {
  description = "The URL Prefect automations call (`pushpool connect --url ...`)."
  value       = module.dispatcher.function_url
}

output "secret_arn" {
  description = "The settings secret: set its value with `aws secretsmanager put-secret-value`."
  value       = module.dispatcher.secret_arn
}
