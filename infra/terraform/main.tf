# batchinfer on AWS: what each file holds.
#   network.tf    VPC, subnets (tagged for Karpenter discovery), NAT, flow logs
#   eks.tf        EKS control plane, add-ons, the system node group
#   karpenter.tf  Karpenter (IAM, interruption queue, Helm) and its GPU and CPU NodePools
#   gpu.tf        NVIDIA device plugin (Helm)
#   kuberay.tf    KubeRay operator (Helm), the Ray namespace and service account
#   storage.tf    KMS key, the data bucket and its access-log bucket
#   access.tf     the Ray pods' IAM role (EKS Pod Identity), limited to the two prefixes
#   registry.tf   the ECR repository for batchinfer's image (the repository's Dockerfile)
#   airflow.tf    read-only access to the output prefix for Airflow (policy; role if in-cluster)
#   outputs.tf    names, URIs and commands to use the cluster

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

data "aws_availability_zones" "available" {
  #checkov:skip=CKV_AWS_394:Used only when availability_zones is empty, and then only the first availability_zone_count names in sorted order, so a zone AWS adds later (a later letter) does not move subnets. Set availability_zones to pin the zones exactly.
  # Local Zones and Wavelength Zones have no EKS control plane subnets and few GPU types.
  filter {
    name   = "opt-in-status"
    values = ["opt-in-not-required"]
  }
}

locals {
  name       = var.cluster_name
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  azs = (
    length(var.availability_zones) > 0
    ? var.availability_zones
    : slice(data.aws_availability_zones.available.names, 0, min(var.availability_zone_count, length(data.aws_availability_zones.available.names)))
  )

  bucket_name     = coalesce(var.bucket_name, "${local.name}-${local.account_id}-${var.region}")
  log_bucket_name = "${local.bucket_name}-logs"

  # Karpenter finds the subnets and the node security group by this tag.
  discovery_tag = { "karpenter.sh/discovery" = local.name }

  # Label of the system node group (tainted CriticalAddonsOnly): only cluster services run there.
  system_node_label = { "batchinfer.io/node-role" = "system" }

  tags = merge(
    {
      Project   = "batchinfer"
      ManagedBy = "terraform"
      Cluster   = local.name
    },
    var.tags,
  )
}

# Checks that involve more than one variable (a variable's own validation block may only
# look at that variable on Terraform < 1.9). They fail `terraform plan`, before anything
# is created.
resource "terraform_data" "input_checks" {
  input = {
    input_prefix  = var.input_prefix
    output_prefix = var.output_prefix
  }

  lifecycle {
    precondition {
      condition = !(
        startswith("${var.input_prefix}/", "${var.output_prefix}/") ||
        startswith("${var.output_prefix}/", "${var.input_prefix}/")
      )
      error_message = "input_prefix and output_prefix must not be equal or nested in each other: inputs are read-only for Ray pods and outputs read-write, so they need separate folders."
    }

    precondition {
      condition     = var.system_node_min_size <= var.system_node_max_size
      error_message = "system_node_min_size must not exceed system_node_max_size."
    }

    precondition {
      condition     = length(var.availability_zones) > 0 || length(local.azs) == var.availability_zone_count
      error_message = "The region has fewer availability zones than availability_zone_count; lower it."
    }

    precondition {
      condition     = alltrue([for az in var.availability_zones : startswith(az, var.region)])
      error_message = "Every entry of availability_zones must be a zone of the chosen region (e.g. us-west-2a for us-west-2)."
    }
  }
}
