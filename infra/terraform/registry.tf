# The container registry for batchinfer's image (the repository's Dockerfile): the Ray head and
# GPU workers pull it from here. Tags are immutable, so a tag names one build forever (a
# RayCluster or RayJob manifest never changes under a running job); every push is scanned
# for known vulnerabilities; images are encrypted with KMS (the AWS managed key for ECR, so
# no key policy to keep and no grant for the nodes: their role already may pull,
# AmazonEC2ContainerRegistryPullOnly, from the Karpenter module).

resource "aws_ecr_repository" "batchinfer" {
  name                 = var.ecr_repository_name
  image_tag_mutability = "IMMUTABLE"
  force_delete         = var.force_destroy_buckets

  image_scanning_configuration {
    scan_on_push = true
  }

  encryption_configuration {
    encryption_type = "KMS"
  }
}

# Old builds cost storage (a vLLM image is about 10 GB): keep the last few tagged ones and drop
# untagged layers left behind by interrupted pushes.
resource "aws_ecr_lifecycle_policy" "batchinfer" {
  repository = aws_ecr_repository.batchinfer.name

  policy = jsonencode({
    rules = [
      {
        rulePriority = 1
        description  = "Expire untagged images after a day"
        selection = {
          tagStatus   = "untagged"
          countType   = "sinceImagePushed"
          countUnit   = "days"
          countNumber = 1
        }
        action = { type = "expire" }
      },
      {
        rulePriority = 2
        description  = "Keep the last ${var.ecr_keep_images} images"
        selection = {
          tagStatus   = "any"
          countType   = "imageCountMoreThan"
          countNumber = var.ecr_keep_images
        }
        action = { type = "expire" }
      },
    ]
  })
}
