# KubeRay: the operator that turns RayJob and RayCluster objects into Ray head and worker
# pods, plus the namespace and service account that batchinfer's RayJobs use
# (`batchinfer render kuberay` defaults to namespace batchinfer, serviceAccountName
# batchinfer-ray; both are variables here and outputs below).

resource "helm_release" "kuberay_operator" {
  name             = "kuberay-operator"
  namespace        = "ray-system"
  create_namespace = true
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  version          = var.kuberay_operator_chart_version

  values = [yamlencode({
    # A cluster service: on the system node group, next to Karpenter.
    nodeSelector = local.system_node_label
    tolerations  = [{ key = "CriticalAddonsOnly", operator = "Exists" }]
  })]

  depends_on = [module.eks]
}

resource "kubernetes_namespace_v1" "ray" {
  metadata {
    name = var.ray_namespace
    labels = {
      "app.kubernetes.io/part-of" = "batchinfer"
      # Ray pods need nothing privileged; refuse anything that asks for it.
      "pod-security.kubernetes.io/enforce" = "baseline"
      "pod-security.kubernetes.io/warn"    = "restricted"
    }
  }

  depends_on = [module.eks]
}

# The identity of every Ray pod of a batchinfer job. access.tf binds it, and only it, to the
# IAM role that may read the input prefix and write the output prefix. It has no Kubernetes
# RBAC of its own; the token stays mounted because KubeRay binds its autoscaler role to the
# head pod's service account when a RayCluster enables in-tree autoscaling.
resource "kubernetes_service_account_v1" "ray" {
  metadata {
    name      = var.ray_service_account
    namespace = kubernetes_namespace_v1.ray.metadata[0].name
    labels    = { "app.kubernetes.io/part-of" = "batchinfer" }
  }

  automount_service_account_token = true
}
