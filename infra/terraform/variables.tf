# Inputs. Every variable says what it is for, has a type and, where a bad value would only
# surface halfway through an apply, a validation that fails at plan time instead.
# Checks that involve two variables live in main.tf (terraform_data.input_checks).

################################################################################
# Placement
################################################################################

variable "region" {
  description = "AWS region for every resource, e.g. us-west-2. Pick one with the GPU instance types below (not every region has every family)."
  type        = string
  default     = "us-west-2"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-[0-9]+$", var.region))
    error_message = "region must look like us-west-2, eu-central-1 or us-gov-west-1."
  }
}

variable "cluster_name" {
  description = "Name of the EKS cluster; also the stem of every other name (IAM roles, buckets, Karpenter discovery tag). 3-24 characters: lower-case letters, digits and hyphens, starting with a letter."
  type        = string
  default     = "batchinfer"

  validation {
    # 24 keeps the derived bucket names (<name>-<account>-<region>-logs) within S3's 63.
    condition     = can(regex("^[a-z][a-z0-9-]{1,22}[a-z0-9]$", var.cluster_name))
    error_message = "cluster_name must be 3-24 characters of a-z, 0-9 and '-', start with a letter and not end with '-'."
  }
}

variable "kubernetes_version" {
  description = "EKS Kubernetes minor version (e.g. 1.35). Karpenter, KubeRay and the device plugin chart versions below were chosen for it; bump them together."
  type        = string
  default     = "1.35"

  validation {
    condition     = can(regex("^1\\.[0-9]{2}$", var.kubernetes_version))
    error_message = "kubernetes_version must be a minor version such as 1.35."
  }
}

variable "tags" {
  description = "Extra tags for every AWS resource (cost allocation, owner). Merged over the defaults Project=batchinfer, ManagedBy=terraform, Cluster=<cluster_name>."
  type        = map(string)
  default     = {}
}

################################################################################
# Network
################################################################################

variable "vpc_cidr" {
  description = "CIDR block of the new VPC. A /16 leaves room for many pods: the VPC CNI gives every pod a VPC address."
  type        = string
  default     = "10.0.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && can(regex("/(1[6-9]|20)$", var.vpc_cidr))
    error_message = "vpc_cidr must be an IPv4 CIDR between /16 and /20, e.g. 10.0.0.0/16."
  }
}

variable "availability_zone_count" {
  description = "How many availability zones to spread subnets over when availability_zones is empty. More zones give Karpenter more places to find scarce GPU capacity."
  type        = number
  default     = 3

  validation {
    condition     = var.availability_zone_count >= 2 && var.availability_zone_count <= 4 && floor(var.availability_zone_count) == var.availability_zone_count
    error_message = "availability_zone_count must be a whole number from 2 to 4 (EKS needs at least two zones)."
  }
}

variable "availability_zones" {
  description = "Exact zones to use, e.g. [\"us-west-2a\", \"us-west-2b\", \"us-west-2c\"] (pick zones that offer your GPU types). Empty: the first availability_zone_count zones of the region."
  type        = list(string)
  default     = []

  validation {
    condition     = length(var.availability_zones) == 0 || (length(var.availability_zones) >= 2 && length(var.availability_zones) <= 4 && alltrue([for az in var.availability_zones : can(regex("^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-[0-9]+[a-z]$", az))]))
    error_message = "availability_zones must be empty or list 2 to 4 zone names such as us-west-2a."
  }
}

variable "single_nat_gateway" {
  description = "One NAT gateway for all zones (cheaper, about $0.045/h plus data) instead of one per zone (survives the loss of a zone). Nodes pull images and models through it."
  type        = bool
  default     = true
}

variable "flow_log_retention_days" {
  description = "Days to keep VPC flow logs in CloudWatch Logs."
  type        = number
  default     = 30

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.flow_log_retention_days)
    error_message = "flow_log_retention_days must be a value CloudWatch Logs accepts (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, ...)."
  }
}

################################################################################
# Cluster
################################################################################

variable "cluster_endpoint_public_access_cidrs" {
  description = "CIDR blocks allowed to reach the Kubernetes API over the internet (where you run terraform and kubectl), e.g. [\"203.0.113.7/32\"]. Required on purpose: there is no open-to-the-world default."
  type        = list(string)

  validation {
    condition     = length(var.cluster_endpoint_public_access_cidrs) > 0 && alltrue([for c in var.cluster_endpoint_public_access_cidrs : can(cidrhost(c, 0))])
    error_message = "cluster_endpoint_public_access_cidrs must hold at least one valid IPv4 CIDR, e.g. 203.0.113.7/32."
  }
}

variable "system_instance_types" {
  description = "Instance types of the managed node group that runs cluster services (CoreDNS, Karpenter, the KubeRay operator). Ray pods never land here."
  type        = list(string)
  default     = ["m7i.large", "m6i.large"]

  validation {
    condition     = length(var.system_instance_types) > 0 && alltrue([for t in var.system_instance_types : can(regex("^[a-z][a-z0-9-]*\\.[0-9]*(nano|micro|small|medium|large|xlarge|metal)$", t))])
    error_message = "system_instance_types must be a non-empty list of EC2 instance types such as m7i.large."
  }
}

variable "system_node_min_size" {
  description = "Minimum (and initial) number of system nodes. Two keep Karpenter and CoreDNS available while a node is replaced."
  type        = number
  default     = 2

  validation {
    condition     = var.system_node_min_size >= 1 && floor(var.system_node_min_size) == var.system_node_min_size
    error_message = "system_node_min_size must be a whole number >= 1: Karpenter itself must run somewhere before it can add nodes."
  }
}

variable "system_node_max_size" {
  description = "Maximum number of system nodes."
  type        = number
  default     = 3

  validation {
    condition     = var.system_node_max_size >= 1 && floor(var.system_node_max_size) == var.system_node_max_size
    error_message = "system_node_max_size must be a whole number >= 1."
  }
}

################################################################################
# Ray capacity (Karpenter)
################################################################################

variable "gpu_instance_types" {
  description = "EC2 GPU instance types Karpenter may launch for Ray GPU workers; it picks the cheapest that fits each pod. Check the region offers them. A worker pod holds a whole engine replica on one node, so a job with resources.gpus_per_replica = N (tensor parallel) needs a type with at least N GPUs: the default has 1-GPU types (g6e/g5 xlarge, 2xlarge: L40S and A10G, for 7-8B models) and 4-GPU ones (g6e.12xlarge, g5.12xlarge) for gpus_per_replica 2-4; add p4de.24xlarge/p5.48xlarge (8 GPUs) for 70B models."
  type        = list(string)
  default     = ["g6e.xlarge", "g6e.2xlarge", "g5.xlarge", "g5.2xlarge", "g6e.12xlarge", "g5.12xlarge"]

  validation {
    condition     = length(var.gpu_instance_types) > 0
    error_message = "gpu_instance_types must name at least one instance type."
  }

  validation {
    condition     = alltrue([for t in var.gpu_instance_types : can(regex("^(g|gr|p)[0-9][a-z0-9-]*\\.[0-9]*x?large$", t))])
    error_message = "gpu_instance_types must be NVIDIA GPU instance types from the g or p families, e.g. g6e.xlarge or p5.48xlarge."
  }
}

variable "gpu_capacity_types" {
  description = "Purchase options for GPU nodes: on-demand, spot, or both. batchinfer resumes after a lost node (committed chunks are kept), so spot is a fair trade for long jobs; on-demand is the predictable default."
  type        = list(string)
  default     = ["on-demand"]

  validation {
    condition     = length(var.gpu_capacity_types) > 0 && alltrue([for c in var.gpu_capacity_types : contains(["on-demand", "spot"], c)])
    error_message = "gpu_capacity_types must be a non-empty subset of [\"on-demand\", \"spot\"]."
  }
}

variable "gpu_max_count" {
  description = "Upper bound on GPUs Karpenter will run at once across all GPU nodes (the NodePool limit): the spending cap of the cluster."
  type        = number
  default     = 8

  validation {
    condition     = var.gpu_max_count > 0 && floor(var.gpu_max_count) == var.gpu_max_count
    error_message = "gpu_max_count must be a whole number greater than 0."
  }
}

variable "gpu_node_disk_gib" {
  description = "Root volume of each GPU node in GiB (gp3, encrypted). Holds the Ray/vLLM container image (about 20 GiB) and downloaded model weights."
  type        = number
  default     = 300

  validation {
    condition     = var.gpu_node_disk_gib >= 100 && var.gpu_node_disk_gib <= 16384
    error_message = "gpu_node_disk_gib must be between 100 and 16384."
  }
}

variable "node_ami_alias" {
  description = "Karpenter AMI alias for the Ray nodes it launches (both pools). al2023 picks the NVIDIA variant for GPU instance types (driver and container toolkit included; the device plugin comes from Helm). Pin a dated release (al2023@vYYYYMMDD, see the EKS AMI release notes) in production so nodes do not change under you."
  type        = string
  default     = "al2023@latest"

  validation {
    # Bottlerocket's NVIDIA variant ships its own device plugin, which would clash with the Helm one.
    condition     = can(regex("^al2023@(latest|v[0-9]{8})$", var.node_ami_alias))
    error_message = "node_ami_alias must be al2023@latest or al2023@vYYYYMMDD."
  }
}

variable "gpu_consolidate_after" {
  description = "How long a GPU node must sit empty before Karpenter removes it (a Go duration such as 5m). Short saves money; long lets the next job start without a cold node."
  type        = string
  default     = "5m"

  validation {
    condition     = can(regex("^[0-9]+(s|m|h)$", var.gpu_consolidate_after))
    error_message = "gpu_consolidate_after must be a duration such as 30s, 5m or 1h."
  }
}

variable "ray_cpu_max_vcpus" {
  description = "Upper bound on vCPUs of the CPU NodePool that runs Ray head pods (the batchinfer driver) and CPU-only workers; it scales to zero too."
  type        = number
  default     = 64

  validation {
    condition     = var.ray_cpu_max_vcpus >= 4 && floor(var.ray_cpu_max_vcpus) == var.ray_cpu_max_vcpus
    error_message = "ray_cpu_max_vcpus must be a whole number >= 4 (a Ray head needs a few cores)."
  }
}

################################################################################
# Storage
################################################################################

variable "bucket_name" {
  description = "Name of the S3 bucket for job inputs and outputs. Null derives <cluster_name>-<account id>-<region>, which is globally unique. A '-logs' bucket next to it receives the access logs."
  type        = string
  default     = null

  validation {
    condition     = var.bucket_name == null || can(regex("^[a-z0-9][a-z0-9.-]{1,56}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be 3-58 characters of a-z, 0-9, '.' and '-' (58 so that '<name>-logs' fits S3's 63)."
  }
}

variable "input_prefix" {
  description = "Key prefix (folder) in the bucket that jobs read from; Ray pods may only read here. No leading or trailing slash, e.g. inputs or team-a/inputs."
  type        = string
  default     = "inputs"

  validation {
    condition     = can(regex("^[A-Za-z0-9!_.'()-]+(/[A-Za-z0-9!_.'()-]+)*$", var.input_prefix))
    error_message = "input_prefix must be non-empty, without leading, trailing or double slashes, using S3-safe characters (A-Z a-z 0-9 ! _ . ' ( ) -); no * or ?, which IAM would read as wildcards."
  }
}

variable "output_prefix" {
  description = "Key prefix (folder) in the bucket that jobs write results, markers, manifests and ledgers to; Ray pods may read, write and delete here. No leading or trailing slash."
  type        = string
  default     = "outputs"

  validation {
    condition     = can(regex("^[A-Za-z0-9!_.'()-]+(/[A-Za-z0-9!_.'()-]+)*$", var.output_prefix))
    error_message = "output_prefix must be non-empty, without leading, trailing or double slashes, using S3-safe characters (A-Z a-z 0-9 ! _ . ' ( ) -); no * or ?, which IAM would read as wildcards."
  }
}

variable "noncurrent_version_retention_days" {
  description = "Days a replaced or deleted object version is kept before S3 expires it (versioning protects against a bad job overwriting good data; this bounds what it costs)."
  type        = number
  default     = 30

  validation {
    condition     = var.noncurrent_version_retention_days >= 1 && floor(var.noncurrent_version_retention_days) == var.noncurrent_version_retention_days
    error_message = "noncurrent_version_retention_days must be a whole number >= 1."
  }
}

variable "access_log_retention_days" {
  description = "Days to keep S3 server access logs of the data bucket."
  type        = number
  default     = 90

  validation {
    condition     = var.access_log_retention_days >= 1 && floor(var.access_log_retention_days) == var.access_log_retention_days
    error_message = "access_log_retention_days must be a whole number >= 1."
  }
}

variable "force_destroy_buckets" {
  description = "Let `terraform destroy` delete the buckets even when they still hold objects and versions, and the ECR repository with its images. Leave false for real data; see the README's teardown section."
  type        = bool
  default     = false
}

variable "kms_key_deletion_window_days" {
  description = "Waiting period before the bucket's KMS key is deleted after `terraform destroy` (data encrypted with it is unreadable once it is gone)."
  type        = number
  default     = 30

  validation {
    condition     = var.kms_key_deletion_window_days >= 7 && var.kms_key_deletion_window_days <= 30
    error_message = "kms_key_deletion_window_days must be between 7 and 30."
  }
}

################################################################################
# Ray workloads
################################################################################

variable "ray_namespace" {
  description = "Kubernetes namespace for RayJobs/RayClusters. `batchinfer render kuberay` uses batchinfer unless told otherwise."
  type        = string
  default     = "batchinfer"

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", var.ray_namespace))
    error_message = "ray_namespace must be a DNS-1123 label: up to 63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit."
  }
}

variable "ray_cluster_name" {
  description = "Name of the standing RayCluster (`batchinfer render raycluster --name`, default batchinfer). Terraform does not create it (you kubectl apply it); the outputs use it: its head Service <name>-head-svc serves the Ray Jobs API on 8265, and KubeRay keeps its token in the Secret <name>."
  type        = string
  default     = "batchinfer"

  validation {
    # 47: the head Service name (<name>-head-svc) must stay within a 63-character DNS label.
    condition     = can(regex("^[a-z]([a-z0-9-]{0,45}[a-z0-9])?$", var.ray_cluster_name))
    error_message = "ray_cluster_name must be 1-47 characters of a-z, 0-9 and '-', start with a letter and not end with '-'."
  }
}

variable "ray_service_account" {
  description = "Kubernetes service account of the Ray head and worker pods; it alone gets the bucket role. `batchinfer render kuberay` uses batchinfer-ray unless told otherwise."
  type        = string
  default     = "batchinfer-ray"

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$", var.ray_service_account))
    error_message = "ray_service_account must be a DNS-1123 subdomain: a-z, 0-9, '-' and '.', starting and ending with a letter or digit."
  }
}

################################################################################
# Container image
################################################################################

variable "ecr_repository_name" {
  description = "Name of the ECR repository for batchinfer's image (the repository's Dockerfile); pass <repository URL>:<tag> to `batchinfer render ... --image`."
  type        = string
  default     = "batchinfer"

  validation {
    condition     = can(regex("^[a-z0-9]+([._/-][a-z0-9]+)*$", var.ecr_repository_name)) && length(var.ecr_repository_name) <= 256
    error_message = "ecr_repository_name must be lower-case letters and digits, separated by '.', '_', '-' or '/', at most 256 characters."
  }
}

variable "ecr_keep_images" {
  description = "How many images the ECR repository keeps (older ones expire; a vLLM image is about 10 GB). Keep enough to roll back to the last good build."
  type        = number
  default     = 10

  validation {
    condition     = var.ecr_keep_images >= 1 && floor(var.ecr_keep_images) == var.ecr_keep_images
    error_message = "ecr_keep_images must be a whole number >= 1."
  }
}

################################################################################
# Airflow
################################################################################

variable "airflow_namespace" {
  description = "Kubernetes namespace of Airflow, when it runs in this EKS cluster (used only with airflow_service_account)."
  type        = string
  default     = "airflow"

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", var.airflow_namespace))
    error_message = "airflow_namespace must be a DNS-1123 label: up to 63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit."
  }
}

variable "airflow_service_account" {
  description = "Service account of Airflow's workers when Airflow runs in this EKS cluster (e.g. airflow-worker for the official chart): they then get a role, through EKS Pod Identity, that may only list and read the output prefix (for the XCom result). Empty: no role; attach the airflow_outputs_read_policy_arn output to Airflow's own role instead (e.g. MWAA's execution role)."
  type        = string
  default     = ""

  validation {
    condition     = var.airflow_service_account == "" || can(regex("^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$", var.airflow_service_account))
    error_message = "airflow_service_account must be empty or a DNS-1123 subdomain: a-z, 0-9, '-' and '.', starting and ending with a letter or digit."
  }
}

################################################################################
# Chart versions (pinned; bump deliberately)
################################################################################

variable "karpenter_chart_version" {
  description = "Karpenter Helm chart version (oci://public.ecr.aws/karpenter/karpenter). 1.11 supports Kubernetes 1.29-1.35."
  type        = string
  default     = "1.11.1"

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.karpenter_chart_version))
    error_message = "karpenter_chart_version must be an exact version such as 1.11.1."
  }
}

variable "kuberay_operator_chart_version" {
  description = "KubeRay operator Helm chart version (https://ray-project.github.io/kuberay-helm/, chart kuberay-operator). Installs the RayCluster, RayJob and RayService CRDs. At least 1.5.1: batchinfer's manifests use authOptions (Ray token authentication), which KubeRay 1.5.1 introduced."
  type        = string
  default     = "1.5.1"

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.kuberay_operator_chart_version))
    error_message = "kuberay_operator_chart_version must be an exact version such as 1.5.1."
  }
}

variable "nvidia_device_plugin_chart_version" {
  description = "NVIDIA device plugin Helm chart version (https://nvidia.github.io/k8s-device-plugin, chart nvidia-device-plugin); advertises nvidia.com/gpu on GPU nodes."
  type        = string
  default     = "0.18.2"

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.nvidia_device_plugin_chart_version))
    error_message = "nvidia_device_plugin_chart_version must be an exact version such as 0.18.2."
  }
}

variable "cluster_admin_arns" {
  description = "IAM role or user ARNs (besides whoever runs terraform apply) that get cluster-admin through EKS access entries, e.g. your team's SSO role."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for a in var.cluster_admin_arns : can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:(role|user)/.+$", a))])
    error_message = "cluster_admin_arns must be IAM role or user ARNs such as arn:aws:iam::123456789012:role/platform-admins."
  }
}
