# NVIDIA device plugin: advertises each GPU node's GPUs as the nvidia.com/gpu resource, so
# Ray worker pods can request them and Kubernetes (and Karpenter's limit) can count them.
# The al2023 NVIDIA AMI brings the driver and container toolkit; this brings the plugin.
# It runs only on GPU nodes: the chart's default node affinity matches the
# nvidia.com/gpu.present=true label that the ray-gpu NodePool puts on them, and it
# tolerates the nvidia.com/gpu taint.

resource "helm_release" "nvidia_device_plugin" {
  name       = "nvidia-device-plugin"
  namespace  = "kube-system"
  repository = "https://nvidia.github.io/k8s-device-plugin"
  chart      = "nvidia-device-plugin"
  version    = var.nvidia_device_plugin_chart_version

  values = [yamlencode({
    tolerations = [
      { key = "nvidia.com/gpu", operator = "Exists", effect = "NoSchedule" },
      { key = "CriticalAddonsOnly", operator = "Exists" },
    ]
    # A GPU that fails to initialise should make the pod crash loudly, not advertise zero GPUs.
    failOnInitError = true
  })]

  # A DaemonSet with no GPU node yet is a success, not something to wait for.
  wait = false

  depends_on = [module.eks]
}
