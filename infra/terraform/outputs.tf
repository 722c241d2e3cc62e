# What you need after `terraform apply`: `terraform output` lists them all,
# `terraform output -raw kubeconfig_command` prints one ready to paste.

output "region" {
  description = "AWS region everything was created in."
  value       = var.region
}

output "cluster_name" {
  description = "Name of the EKS cluster."
  value       = module.eks.cluster_name
}

output "cluster_endpoint" {
  description = "HTTPS endpoint of the Kubernetes API."
  value       = module.eks.cluster_endpoint
}

output "kubeconfig_command" {
  description = "Adds the cluster to ~/.kube/config and makes it the current context."
  value       = "aws eks update-kubeconfig --region ${var.region} --name ${module.eks.cluster_name}"
}

output "bucket_name" {
  description = "S3 bucket for job inputs and outputs."
  value       = aws_s3_bucket.data.bucket
}

output "bucket_arn" {
  description = "ARN of the data bucket."
  value       = aws_s3_bucket.data.arn
}

output "kms_key_arn" {
  description = "KMS key that encrypts the data bucket."
  value       = aws_kms_key.data.arn
}

output "input_uri" {
  description = "Where to put input Parquet (input.path of a job must be under it); Ray pods can only read here."
  value       = "s3://${aws_s3_bucket.data.bucket}/${var.input_prefix}/"
}

output "output_uri" {
  description = "Where jobs write (output.path of a job must be under it); Ray pods can read, write and delete here."
  value       = "s3://${aws_s3_bucket.data.bucket}/${var.output_prefix}/"
}

output "ray_namespace" {
  description = "Kubernetes namespace for batchinfer RayJobs (`batchinfer render kuberay` default)."
  value       = kubernetes_namespace_v1.ray.metadata[0].name
}

output "ray_service_account" {
  description = "Service account Ray pods must run as to reach the bucket (`serviceAccountName` in the RayJob; `batchinfer render kuberay` default)."
  value       = kubernetes_service_account_v1.ray.metadata[0].name
}

output "ray_role_arn" {
  description = "IAM role the Ray pods' service account assumes through EKS Pod Identity."
  value       = aws_iam_role.ray.arn
}

output "ray_dashboard_port_forward_command" {
  description = "Forwards the Ray dashboard and Jobs API (port 8265) of the running Ray head in the Ray namespace to http://127.0.0.1:8265."
  value       = "kubectl -n ${kubernetes_namespace_v1.ray.metadata[0].name} port-forward \"$(kubectl -n ${kubernetes_namespace_v1.ray.metadata[0].name} get pod -l ray.io/node-type=head -o name | head -n 1)\" 8265:8265"
}

output "gpu_node_pool" {
  description = "Karpenter NodePool that launches GPU nodes; Ray GPU pods must tolerate the taint shown."
  value = {
    name          = "ray-gpu"
    instance      = var.gpu_instance_types
    capacity      = var.gpu_capacity_types
    max_gpus      = var.gpu_max_count
    taint         = "nvidia.com/gpu=true:NoSchedule"
    node_selector = { "batchinfer.io/node-role" = "ray-gpu" }
  }
}
