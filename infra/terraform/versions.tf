# Terraform and provider versions. Every provider is bounded above (`~>`), so a new major
# release never arrives through `terraform init -upgrade` unannounced; commit the
# .terraform.lock.hcl that `terraform init` writes to pin the exact builds.
terraform {
  # 1.5.7: the floor of terraform-aws-modules/eks v21. Works with OpenTofu >= 1.6 too.
  required_version = ">= 1.5.7, < 2.0.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 6.0" # eks module v21 and vpc module v6 need aws >= 6
    }
    helm = {
      source  = "hashicorp/helm"
      version = "~> 3.0" # 3.x: `kubernetes = { ... }` is an attribute, not a block
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "~> 2.38"
    }
    kubectl = {
      # Applies Karpenter's NodePool/EC2NodeClass without needing their CRDs at plan time
      # (the kubernetes provider's kubernetes_manifest does). alekc/kubectl is the maintained
      # fork of gavinbunney/kubectl.
      source  = "alekc/kubectl"
      version = "~> 2.1"
    }
  }

  # Keep state remote for anything but a trial. Uncomment and fill in, then `terraform init`:
  # backend "s3" {
  #   bucket       = "my-terraform-state"
  #   key          = "batchinfer/terraform.tfstate"
  #   region       = "us-west-2"
  #   encrypt      = true
  #   use_lockfile = true
  # }
}
