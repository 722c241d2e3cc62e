# What Airflow needs from AWS to run batchinfer's operator against this cluster: read access to
# the output prefix, and nothing else. The task reads the finished run's _MANIFEST.json and
# ledger.json for its XCom value (the manifest's URI and the ledger's totals); the job itself
# runs on the Ray cluster with the Ray pods' role (access.tf), so Airflow never writes to the
# bucket and never reads inputs.
#
# The policy is standalone, to attach to whatever identity Airflow's workers have:
#   - Amazon MWAA: its execution role (aws iam attach-role-policy, or in the MWAA module);
#   - Airflow in this EKS cluster: set airflow_service_account and this file also creates a role
#     bound to that service account through EKS Pod Identity, with the policy attached.

data "aws_iam_policy_document" "airflow_outputs_read" {
  statement {
    sid       = "ListOnlyTheOutputPrefix"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.data.arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = [var.output_prefix, "${var.output_prefix}/", "${var.output_prefix}/*"]
    }
  }

  statement {
    sid       = "ReadOutputs"
    effect    = "Allow"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.data.arn}/${var.output_prefix}/*"]
  }

  statement {
    sid       = "DecryptTheBucketKeyThroughS3Only"
    effect    = "Allow"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.data.arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${var.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_policy" "airflow_outputs_read" {
  name        = "${local.name}-airflow-outputs-read"
  description = "Airflow (batchinfer operator): list and read ${var.output_prefix}/ in ${local.bucket_name}, for the XCom result; nothing else"
  policy      = data.aws_iam_policy_document.airflow_outputs_read.json
}

locals {
  airflow_in_cluster = var.airflow_service_account != ""
}

data "aws_iam_policy_document" "airflow_trust" {
  statement {
    sid     = "EksPodIdentityForAirflowWorkers"
    effect  = "Allow"
    actions = ["sts:AssumeRole", "sts:TagSession"]

    principals {
      type        = "Service"
      identifiers = ["pods.eks.amazonaws.com"]
    }

    # As for the Ray pods' role: only this cluster, namespace and service account.
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/eks-cluster-arn"
      values   = [module.eks.cluster_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/kubernetes-namespace"
      values   = [var.airflow_namespace]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/kubernetes-service-account"
      values   = [var.airflow_service_account]
    }
  }
}

resource "aws_iam_role" "airflow" {
  count = local.airflow_in_cluster ? 1 : 0

  name                 = "${local.name}-airflow"
  description          = "Airflow workers (${var.airflow_namespace}/${var.airflow_service_account}) running batchinfer: read ${var.output_prefix}/ in ${local.bucket_name}"
  assume_role_policy   = data.aws_iam_policy_document.airflow_trust.json
  max_session_duration = 3600
}

resource "aws_iam_role_policy_attachment" "airflow_outputs_read" {
  count = local.airflow_in_cluster ? 1 : 0

  role       = aws_iam_role.airflow[0].name
  policy_arn = aws_iam_policy.airflow_outputs_read.arn
}

resource "aws_eks_pod_identity_association" "airflow" {
  count = local.airflow_in_cluster ? 1 : 0

  cluster_name    = module.eks.cluster_name
  namespace       = var.airflow_namespace
  service_account = var.airflow_service_account
  role_arn        = aws_iam_role.airflow[0].arn
}
