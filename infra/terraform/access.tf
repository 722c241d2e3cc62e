# Least-privilege access for Ray pods, through EKS Pod Identity: the pods of the
# <ray_namespace>/<ray_service_account> service account on this cluster (and nothing else)
# get temporary credentials for a role that may
#   - list the bucket, but only under the input and output prefixes,
#   - read objects under <input_prefix>/,
#   - read, write and delete objects under <output_prefix>/ (results, markers, manifest,
#     ledger; create-only writes are plain PutObject with If-None-Match),
#   - use the bucket's KMS key, only through S3.
# The AWS SDKs pick the credentials up from the environment Pod Identity injects
# (AWS_CONTAINER_CREDENTIALS_FULL_URI); no annotation on the service account is needed.

data "aws_iam_policy_document" "ray_trust" {
  statement {
    sid     = "EksPodIdentityForBatchinferRayPods"
    effect  = "Allow"
    actions = ["sts:AssumeRole", "sts:TagSession"]

    principals {
      type        = "Service"
      identifiers = ["pods.eks.amazonaws.com"]
    }

    # Session tags that Pod Identity sets on every request: without these conditions any
    # Pod Identity association in the account could hand this role to any pod. With them,
    # only this cluster (its ARN names the account too), namespace and service account.
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/eks-cluster-arn"
      values   = [module.eks.cluster_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/kubernetes-namespace"
      values   = [var.ray_namespace]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/kubernetes-service-account"
      values   = [var.ray_service_account]
    }
  }
}

resource "aws_iam_role" "ray" {
  name                 = "${local.name}-ray-pods"
  description          = "batchinfer Ray pods (${var.ray_namespace}/${var.ray_service_account}): read ${var.input_prefix}/, read-write ${var.output_prefix}/ in ${local.bucket_name}"
  assume_role_policy   = data.aws_iam_policy_document.ray_trust.json
  max_session_duration = 3600
}

data "aws_iam_policy_document" "ray_bucket" {
  statement {
    sid       = "ListOnlyTheJobPrefixes"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.data.arn]

    # The prefix itself (s3fs asks for "inputs" and "inputs/" when it checks a folder
    # exists) and everything under it.
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values = [
        var.input_prefix, "${var.input_prefix}/", "${var.input_prefix}/*",
        var.output_prefix, "${var.output_prefix}/", "${var.output_prefix}/*",
      ]
    }
  }

  statement {
    sid       = "ReadInputs"
    effect    = "Allow"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.data.arn}/${var.input_prefix}/*"]
  }

  statement {
    sid    = "ReadWriteOutputs"
    effect = "Allow"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload", # large Parquet parts go up in parts; a failed upload is cleaned up
    ]
    resources = ["${aws_s3_bucket.data.arn}/${var.output_prefix}/*"]
  }

  statement {
    sid       = "UseTheBucketKeyThroughS3Only"
    effect    = "Allow"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.data.arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${var.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_policy" "ray_bucket" {
  name        = "${local.name}-ray-bucket"
  description = "batchinfer Ray pods: list ${var.input_prefix}/ and ${var.output_prefix}/, read inputs, read-write outputs in ${local.bucket_name}"
  policy      = data.aws_iam_policy_document.ray_bucket.json

  # Fails the plan first if the prefixes overlap (main.tf).
  depends_on = [terraform_data.input_checks]
}

resource "aws_iam_role_policy_attachment" "ray_bucket" {
  role       = aws_iam_role.ray.name
  policy_arn = aws_iam_policy.ray_bucket.arn
}

resource "aws_eks_pod_identity_association" "ray" {
  cluster_name    = module.eks.cluster_name
  namespace       = kubernetes_namespace_v1.ray.metadata[0].name
  service_account = kubernetes_service_account_v1.ray.metadata[0].name
  role_arn        = aws_iam_role.ray.arn
}
