# VPC: private subnets for nodes and pods (one large /20-ish block per zone: the VPC CNI gives
# every pod a VPC address), small public subnets for the NAT gateway and load balancers,
# and intra subnets (no internet route) for the EKS control plane's network interfaces.

module "vpc" {
  #checkov:skip=CKV_TF_1:Registry module pinned to an exact release; the Terraform registry has no commit pins. Use git::https://github.com/terraform-aws-modules/terraform-aws-vpc.git?ref=<sha> if policy demands commit pins.
  source  = "terraform-aws-modules/vpc/aws"
  version = "6.6.1" # exact: bump deliberately

  name = local.name
  cidr = var.vpc_cidr
  azs  = local.azs

  private_subnets = [for i, _ in local.azs : cidrsubnet(var.vpc_cidr, 4, i)]
  public_subnets  = [for i, _ in local.azs : cidrsubnet(var.vpc_cidr, 8, i + 48)]
  intra_subnets   = [for i, _ in local.azs : cidrsubnet(var.vpc_cidr, 8, i + 52)]

  enable_nat_gateway     = true
  single_nat_gateway     = var.single_nat_gateway
  one_nat_gateway_per_az = !var.single_nat_gateway

  enable_dns_hostnames = true
  enable_dns_support   = true

  # The default security group of the VPC allows nothing (nothing here uses it).
  manage_default_security_group  = true
  default_security_group_ingress = []
  default_security_group_egress  = []

  enable_flow_log                                 = true
  create_flow_log_cloudwatch_log_group            = true
  create_flow_log_cloudwatch_iam_role             = true
  flow_log_max_aggregation_interval               = 60
  flow_log_cloudwatch_log_group_retention_in_days = var.flow_log_retention_days

  public_subnet_tags = {
    "kubernetes.io/role/elb" = 1
  }

  private_subnet_tags = merge(local.discovery_tag, {
    "kubernetes.io/role/internal-elb" = 1
  })
}

# Traffic to S3 stays on the AWS network and skips the NAT gateway's per-GB charge, which
# matters when a job streams many GB of Parquet in and out.
resource "aws_vpc_endpoint" "s3" {
  vpc_id            = module.vpc.vpc_id
  service_name      = "com.amazonaws.${var.region}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = module.vpc.private_route_table_ids

  tags = { Name = "${local.name}-s3" }
}
