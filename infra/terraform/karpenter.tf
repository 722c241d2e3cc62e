# Karpenter: nodes on demand. Two NodePools, both empty until a Ray pod is pending and
# emptied again a few minutes after the last one ends:
#   ray-gpu  GPU instances (gpu_instance_types), tainted nvidia.com/gpu=true:NoSchedule so
#            only pods that tolerate it (Ray GPU workers) land there; capped at gpu_max_count GPUs
#   ray-cpu  general-purpose instances for Ray head pods (the batchinfer driver) and
#            CPU-only workers; capped at ray_cpu_max_vcpus

# The Karpenter chart lives in ECR Public, which only answers in us-east-1.
data "aws_ecrpublic_authorization_token" "token" {
  region = "us-east-1"
}

# Controller IAM role (bound to its service account through Pod Identity), the node IAM role
# with its EKS access entry, and the SQS queue + EventBridge rules that tell Karpenter about
# spot interruptions and instance health events before they hit running pods.
module "karpenter" {
  #checkov:skip=CKV_TF_1:Registry module pinned to an exact release (same as module.eks); the Terraform registry has no commit pins.
  source  = "terraform-aws-modules/eks/aws//modules/karpenter"
  version = "21.15.1"

  cluster_name = module.eks.cluster_name
  namespace    = "kube-system"

  # A fixed name: the EC2NodeClasses below refer to the role by name.
  node_iam_role_use_name_prefix   = false
  node_iam_role_name              = "${local.name}-karpenter-node"
  create_pod_identity_association = true
}

resource "helm_release" "karpenter" {
  name                = "karpenter"
  namespace           = "kube-system"
  repository          = "oci://public.ecr.aws/karpenter"
  repository_username = data.aws_ecrpublic_authorization_token.token.user_name
  repository_password = data.aws_ecrpublic_authorization_token.token.password
  chart               = "karpenter"
  version             = var.karpenter_chart_version

  values = [yamlencode({
    # On the system node group, never on a node it manages.
    nodeSelector = { "karpenter.sh/controller" = "true" }
    tolerations  = [{ key = "CriticalAddonsOnly", operator = "Exists" }]
    dnsPolicy    = "Default"
    settings = {
      clusterName       = module.eks.cluster_name
      clusterEndpoint   = module.eks.cluster_endpoint
      interruptionQueue = module.karpenter.queue_name
    }
    webhook = { enabled = false }
  })]
}

locals {
  # Shared by both node classes: where nodes go and how they boot.
  node_class_common = {
    role                       = module.karpenter.node_iam_role_name
    amiSelectorTerms           = [{ alias = var.node_ami_alias }]
    subnetSelectorTerms        = [{ tags = local.discovery_tag }]
    securityGroupSelectorTerms = [{ tags = local.discovery_tag }]
    # IMDSv2 only, one hop: pods cannot borrow the node's role; they use Pod Identity.
    metadataOptions = {
      httpEndpoint            = "enabled"
      httpProtocolIPv6        = "disabled"
      httpPutResponseHopLimit = 1
      httpTokens              = "required"
    }
    tags = merge(local.tags, local.discovery_tag)
  }

  # Running jobs are never disrupted for drift (a new AMI): GPU and Ray nodes are short-lived,
  # so the next node picks up the new AMI anyway. Empty nodes go freely.
  disruption_budgets = [
    { nodes = "100%", reasons = ["Empty"] },
    { nodes = "0", reasons = ["Drifted"] },
  ]
}

resource "kubectl_manifest" "node_class_gpu" {
  yaml_body = yamlencode({
    apiVersion = "karpenter.k8s.aws/v1"
    kind       = "EC2NodeClass"
    metadata   = { name = "ray-gpu" }
    spec = merge(local.node_class_common, {
      blockDeviceMappings = [{
        deviceName = "/dev/xvda"
        ebs = {
          volumeSize          = "${var.gpu_node_disk_gib}Gi"
          volumeType          = "gp3"
          throughput          = 500 # MiB/s: container image and model weights load faster
          iops                = 6000
          encrypted           = true
          deleteOnTermination = true
        }
      }]
    })
  })

  # On destroy, wait for Karpenter's finalizer: it removes the nodes it launched first.
  wait       = true
  depends_on = [helm_release.karpenter]
}

resource "kubectl_manifest" "node_pool_gpu" {
  yaml_body = yamlencode({
    apiVersion = "karpenter.sh/v1"
    kind       = "NodePool"
    metadata   = { name = "ray-gpu" }
    spec = {
      template = {
        metadata = {
          labels = {
            "batchinfer.io/node-role" = "ray-gpu"
            # Lets the NVIDIA device plugin's default node affinity select these nodes
            # without Node Feature Discovery.
            "nvidia.com/gpu.present" = "true"
          }
        }
        spec = {
          nodeClassRef = { group = "karpenter.k8s.aws", kind = "EC2NodeClass", name = "ray-gpu" }
          taints       = [{ key = "nvidia.com/gpu", value = "true", effect = "NoSchedule" }]
          requirements = [
            { key = "node.kubernetes.io/instance-type", operator = "In", values = var.gpu_instance_types },
            { key = "karpenter.sh/capacity-type", operator = "In", values = var.gpu_capacity_types },
            { key = "kubernetes.io/arch", operator = "In", values = ["amd64"] },
            { key = "kubernetes.io/os", operator = "In", values = ["linux"] },
          ]
          expireAfter = "720h"
        }
      }
      # The spending cap: never more GPUs than this at once.
      limits = { "nvidia.com/gpu" = var.gpu_max_count }
      disruption = {
        consolidationPolicy = "WhenEmpty"
        consolidateAfter    = var.gpu_consolidate_after
        budgets             = local.disruption_budgets
      }
    }
  })

  wait       = true
  depends_on = [kubectl_manifest.node_class_gpu]
}

resource "kubectl_manifest" "node_class_cpu" {
  yaml_body = yamlencode({
    apiVersion = "karpenter.k8s.aws/v1"
    kind       = "EC2NodeClass"
    metadata   = { name = "ray-cpu" }
    spec = merge(local.node_class_common, {
      blockDeviceMappings = [{
        deviceName = "/dev/xvda"
        ebs = {
          volumeSize          = "100Gi" # the Ray/vLLM image is large even on a CPU node
          volumeType          = "gp3"
          encrypted           = true
          deleteOnTermination = true
        }
      }]
    })
  })

  # On destroy, wait for Karpenter's finalizer: it removes the nodes it launched first.
  wait       = true
  depends_on = [helm_release.karpenter]
}

resource "kubectl_manifest" "node_pool_cpu" {
  yaml_body = yamlencode({
    apiVersion = "karpenter.sh/v1"
    kind       = "NodePool"
    metadata   = { name = "ray-cpu" }
    spec = {
      template = {
        metadata = { labels = { "batchinfer.io/node-role" = "ray-cpu" } }
        spec = {
          nodeClassRef = { group = "karpenter.k8s.aws", kind = "EC2NodeClass", name = "ray-cpu" }
          requirements = [
            { key = "karpenter.k8s.aws/instance-category", operator = "In", values = ["c", "m", "r"] },
            { key = "karpenter.k8s.aws/instance-generation", operator = "Gt", values = ["5"] },
            { key = "karpenter.k8s.aws/instance-cpu", operator = "In", values = ["4", "8", "16", "32"] },
            # The head runs the driver: keep it off spot so a reclaim does not end the job.
            { key = "karpenter.sh/capacity-type", operator = "In", values = ["on-demand"] },
            { key = "kubernetes.io/arch", operator = "In", values = ["amd64"] },
            { key = "kubernetes.io/os", operator = "In", values = ["linux"] },
          ]
          expireAfter = "720h"
        }
      }
      limits = { cpu = var.ray_cpu_max_vcpus }
      disruption = {
        consolidationPolicy = "WhenEmpty"
        consolidateAfter    = "5m"
        budgets             = local.disruption_budgets
      }
    }
  })

  wait       = true
  depends_on = [kubectl_manifest.node_class_cpu]
}
