# EKS control plane and the small always-on system node group. GPU and Ray CPU capacity
# is not here: Karpenter adds it when Ray pods are pending and removes it when they are
# gone (karpenter.tf).

module "eks" {
  #checkov:skip=CKV_TF_1:Registry module pinned to an exact release; the Terraform registry has no commit pins. Use git::https://github.com/terraform-aws-modules/terraform-aws-eks.git?ref=<sha> if policy demands commit pins.
  source  = "terraform-aws-modules/eks/aws"
  version = "21.15.1" # exact: a module release can change what gets created; bump deliberately

  name               = local.name
  kubernetes_version = var.kubernetes_version

  # API reachable from the given CIDRs (terraform, kubectl) and privately from the nodes.
  endpoint_public_access       = true
  endpoint_public_access_cidrs = var.cluster_endpoint_public_access_cidrs
  endpoint_private_access      = true

  # Whoever applies this becomes cluster admin, so the Helm and kubectl resources below can
  # be created in the same apply; more admins through cluster_admin_arns.
  enable_cluster_creator_admin_permissions = true
  access_entries = {
    for i, arn in var.cluster_admin_arns : "admin-${i}" => {
      principal_arn = arn
      policy_associations = {
        admin = {
          policy_arn   = "arn:${local.partition}:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy"
          access_scope = { type = "cluster" }
        }
      }
    }
  }

  # Control plane logs to CloudWatch; Kubernetes secrets envelope-encrypted with a KMS key
  # the module creates (its defaults, spelled out here).
  enabled_log_types = ["api", "audit", "authenticator"]
  encryption_config = { resources = ["secrets"] }

  addons = {
    coredns = {}
    # EKS Pod Identity: how Ray pods and Karpenter get AWS credentials (access.tf).
    eks-pod-identity-agent = { before_compute = true }
    kube-proxy             = {}
    vpc-cni                = { before_compute = true }
  }

  vpc_id                   = module.vpc.vpc_id
  subnet_ids               = module.vpc.private_subnets
  control_plane_subnet_ids = module.vpc.intra_subnets

  eks_managed_node_groups = {
    system = {
      ami_type       = "AL2023_x86_64_STANDARD"
      instance_types = var.system_instance_types
      min_size       = var.system_node_min_size
      max_size       = var.system_node_max_size
      desired_size   = var.system_node_min_size

      # Karpenter must not run on capacity it manages itself.
      labels = merge(local.system_node_label, { "karpenter.sh/controller" = "true" })

      # Only pods that tolerate this taint (CoreDNS, Karpenter, the KubeRay operator) run
      # here; Ray pods go to Karpenter's nodes.
      taints = {
        critical = {
          key    = "CriticalAddonsOnly"
          value  = "true"
          effect = "NO_SCHEDULE"
        }
      }

      # IMDSv2 only, and unreachable from pods (one hop): pods get credentials from
      # Pod Identity, never from the node's role.
      metadata_options = {
        http_endpoint               = "enabled"
        http_tokens                 = "required"
        http_put_response_hop_limit = 1
      }
    }
  }

  # Ray's head and workers talk on many ports (GCS 6379, object manager, worker ports).
  node_security_group_additional_rules = {
    ingress_self_all = {
      description = "Node to node, all ports (Ray head and workers)"
      protocol    = "-1"
      from_port   = 0
      to_port     = 0
      type        = "ingress"
      self        = true
    }
  }

  # Karpenter launches its nodes into this security group.
  node_security_group_tags = local.discovery_tag
}
