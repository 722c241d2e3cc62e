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
  description = "Kubernetes namespace for batchinfer RayJobs and the standing RayCluster (`batchinfer render kuberay|raycluster` default)."
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
  description = "Forwards the Ray dashboard and Jobs API (port 8265) of the standing RayCluster (ray_cluster_name, once you kubectl apply it) to http://127.0.0.1:8265, through the head Service KubeRay creates."
  value       = "kubectl -n ${kubernetes_namespace_v1.ray.metadata[0].name} port-forward svc/${var.ray_cluster_name}-head-svc 8265:8265"
}

output "ray_jobs_api_in_cluster_address" {
  description = "The standing RayCluster's Ray Jobs API as pods in this EKS cluster (an in-cluster Airflow) reach it: the Airflow Variable batchinfer_ray_address, or `batchinfer submit --address`."
  value       = "http://${var.ray_cluster_name}-head-svc.${kubernetes_namespace_v1.ray.metadata[0].name}.svc:8265"
}

output "ray_auth_token_command" {
  description = "Prints the standing RayCluster's token (KubeRay keeps it in the Secret named like the cluster, key auth_token). For RAY_AUTH_TOKEN or a file named by RAY_AUTH_TOKEN_PATH, with RAY_AUTH_MODE=token; never put it in a job file, a manifest or an Airflow Variable."
  value       = "kubectl -n ${kubernetes_namespace_v1.ray.metadata[0].name} get secret ${var.ray_cluster_name} -o jsonpath='{.data.auth_token}' | base64 -d"
}

output "ecr_repository_url" {
  description = "ECR repository for batchinfer's image: docker push <url>:<tag>, then `batchinfer render ... --image <url>:<tag>`."
  value       = aws_ecr_repository.batchinfer.repository_url
}

output "ecr_login_command" {
  description = "Logs docker in to the ECR registry, for docker push."
  value       = "aws ecr get-login-password --region ${var.region} | docker login --username AWS --password-stdin ${split("/", aws_ecr_repository.batchinfer.repository_url)[0]}"
}

output "airflow_outputs_read_policy_arn" {
  description = "IAM policy that may only list and read the output prefix (and decrypt it through S3): attach it to Airflow's role (e.g. MWAA's execution role) so the operator can read the manifest and ledger for its XCom result."
  value       = aws_iam_policy.airflow_outputs_read.arn
}

output "airflow_role_arn" {
  description = "Role of Airflow's workers in this EKS cluster (EKS Pod Identity, with airflow_outputs_read attached); null unless airflow_service_account is set."
  value       = local.airflow_in_cluster ? aws_iam_role.airflow[0].arn : null
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
