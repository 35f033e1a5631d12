################################################################################
# Optional VPC: public subnets, internet gateway, egress-only security group
# (what `pushpool work-pool create --provision-infra` creates when an account
# has no usable default VPC)
################################################################################

data "aws_availability_zones" "available" {
  count = var.create_vpc ? 1 : 0

  state = "available"

  filter {
    name   = "zone-type"
    values = ["availability-zone"]
  }
}

locals {
  zones = var.create_vpc ? slice(
    sort(data.aws_availability_zones.available[0].names), 0, min(3, length(data.aws_availability_zones.available[0].names))
  ) : []

  # Up to 4 equal subnets (a /16 gives /18s, as provisioning does); 3 are used.
  subnet_newbits = 2

  vpc_id = var.create_vpc ? aws_vpc.this[0].id : var.vpc_id
}

resource "aws_vpc" "this" {
  count = var.create_vpc ? 1 : 0

  #checkov:skip=CKV2_AWS_11:A minimal network for Fargate tasks that only make outbound calls, the same as pushpool's provisioning creates; bring your own VPC (vpc_id) where flow logs are required.
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true

  tags = merge(local.tags, { Name = "${var.name_prefix}-vpc" })
}

# The VPC's default security group, emptied: nothing uses it, nothing may.
resource "aws_default_security_group" "this" {
  count = var.create_vpc ? 1 : 0

  vpc_id = aws_vpc.this[0].id

  tags = merge(local.tags, { Name = "${var.name_prefix}-default-closed" })
}

resource "aws_internet_gateway" "this" {
  count = var.create_vpc ? 1 : 0

  vpc_id = aws_vpc.this[0].id

  tags = merge(local.tags, { Name = "${var.name_prefix}-vpc" })
}

# Public subnets: tasks get a public IP from the run request
# (assignPublicIp = ENABLED in the pool's network_configuration), so the
# subnets need not hand one to everything launched in them.
resource "aws_subnet" "public" {
  count = length(local.zones)

  vpc_id                  = aws_vpc.this[0].id
  availability_zone       = local.zones[count.index]
  cidr_block              = cidrsubnet(var.vpc_cidr, local.subnet_newbits, count.index)
  map_public_ip_on_launch = false

  tags = merge(local.tags, { Name = "${var.name_prefix}-vpc-${local.zones[count.index]}" })
}

resource "aws_route_table" "public" {
  count = var.create_vpc ? 1 : 0

  vpc_id = aws_vpc.this[0].id

  tags = merge(local.tags, { Name = "${var.name_prefix}-vpc" })
}

resource "aws_route" "internet" {
  count = var.create_vpc ? 1 : 0

  route_table_id         = aws_route_table.public[0].id
  destination_cidr_block = "0.0.0.0/0"
  gateway_id             = aws_internet_gateway.this[0].id
}

resource "aws_route_table_association" "public" {
  count = length(local.zones)

  subnet_id      = aws_subnet.public[count.index].id
  route_table_id = aws_route_table.public[0].id
}

# No inbound rule at all; all outbound (the Prefect API on any port, ECR, S3,
# and whatever the flows themselves call).
resource "aws_security_group" "tasks" {
  count = var.create_vpc ? 1 : 0

  #checkov:skip=CKV2_AWS_5:Attached at run time, not by Terraform: the pool's network_configuration default names this group, and ECS attaches it to every flow-run task it starts.

  name        = "${var.name_prefix}-security-group"
  description = "Prefect flow-run tasks of push pool ${var.pool_name}: no inbound, all outbound"
  vpc_id      = aws_vpc.this[0].id

  tags = merge(local.tags, { Name = "${var.name_prefix}-security-group" })
}

resource "aws_vpc_security_group_egress_rule" "tasks_all" {
  count = var.create_vpc ? 1 : 0

  security_group_id = aws_security_group.tasks[0].id
  description       = "All outbound traffic"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"

  tags = local.tags
}
