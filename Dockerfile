# syntax=docker/dockerfile:1
# Three images from one file (build context: the repository root), all on one Python (3.11, as the tests):
#   docker build --target runtime  -t ghcr.io/piggyback-dev/piggyback-runtime:0.1.0 .   # `piggyback serve`, CUDA torch
#   docker build --target router   -t ghcr.io/piggyback-dev/piggyback-router:0.1.0 .    # `piggyback router`, no torch
#   docker build --target operator -t ghcr.io/piggyback-dev/piggyback-operator:0.1.0 .  # `piggyback-operator run`
# Compilers live only in the *-build stages; the final stages copy a finished virtualenv out of them.
# Base images are pinned by exact tag; add @sha256 digests where the registry is reachable when releasing.
#
# No CUDA base image: the CUDA torch wheels bring the CUDA user-space libraries as pip packages (nvidia-*-cu12:
# cudart, cuBLAS, cuDNN, NCCL, nvrtc...) and Triton's wheel brings ptxas and the CUDA headers; the driver
# (libcuda) comes from the node through the NVIDIA container runtime. So a slim Python base suffices.
# Platforms: router and operator need only pure-Python packages and wheels published for amd64 and arm64
# (pydantic-core), so `docker buildx build --platform linux/amd64,linux/arm64` builds them; the runtime is
# linux/amd64 only (its prebuilt CPU attention kernels are x86 AVX2/AVX-512 builds).

ARG PYTHON_TAG=3.11.13-slim-bookworm
ARG VERSION=0.1.0

# ---------------------------------------------------------------------------------------------------------
# Runtime build: CUDA torch + Triton, the project, and the CPU attention kernel compiled for each x86 level.
FROM python:${PYTHON_TAG} AS runtime-build
ARG TORCH_VERSION=2.13.0
ARG TRITON_VERSION=3.9.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Distribution packages go unpinned (DL3008): the archive drops superseded versions, so a pin breaks the
# build within weeks; the base image's exact tag fixes the release they come from.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ libgomp1 \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, pinned, from the CUDA index: anything that depends on torch installed before it would pull
# another build. The CUDA torch wheel brings its CUDA libraries as pip packages.
RUN pip install --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple \
      "torch==${TORCH_VERSION}" "triton==${TRITON_VERSION}"
WORKDIR /src
COPY docker/requirements-runtime.txt docker/
RUN pip install --requirement docker/requirements-runtime.txt
COPY pyproject.toml README.md ./
COPY runtime ./runtime
COPY operator ./operator
RUN pip install --no-deps . \
 && python -m piggyback_runtime.attention.prebuilt /opt/piggyback/cpu-attention
# Triton compiles a C helper (cuda_utils) at first GPU use; compile it here. It links against libcuda, whose
# symbols resolve at load time from the node's driver: an empty stub with the driver's soname stands in for it
# (no CUDA toolkit needed). TRITON_LIBCUDA_PATH is part of Triton's cache key, so the runtime stage sets the
# same string.
ENV TRITON_LIBCUDA_PATH=/opt/piggyback/libcuda-stub
RUN mkdir -p "$TRITON_LIBCUDA_PATH" \
 && gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$TRITON_LIBCUDA_PATH/libcuda.so.1" -x c /dev/null \
 && ln -s libcuda.so.1 "$TRITON_LIBCUDA_PATH/libcuda.so" \
 && python -m piggyback_runtime.attention.triton_cache /opt/piggyback/triton-cache

# ---------------------------------------------------------------------------------------------------------
# Runtime: slim Python, the virtualenv (torch with its CUDA libraries) and the prebuilt kernels.
FROM python:${PYTHON_TAG} AS runtime
ARG VERSION
LABEL org.opencontainers.image.title="piggyback-runtime" \
      org.opencontainers.image.description="Piggyback node-local runtime: LS and BE LLM services on one accelerator" \
      org.opencontainers.image.source="https://github.com/piggyback-dev/piggyback" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
ENV DEBIAN_FRONTEND=noninteractive
# libgomp1: the prebuilt CPU attention kernels are OpenMP builds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=runtime-build /opt/venv /opt/venv
COPY --from=runtime-build /opt/piggyback/cpu-attention /opt/piggyback/cpu-attention
COPY --from=runtime-build /opt/piggyback/triton-cache /opt/piggyback/triton-cache
# PIGGYBACK_CPU_ATTENTION_PREBUILT: the kernels above are loaded before any JIT build is tried; the JIT
# build (which needs a compiler, absent here) and then the pure-torch path stay the fallbacks.
# TRITON_CACHE_MANAGER: Triton's writable cache (under HOME) first, then the prebuilt cuda_utils.
# NVIDIA_DRIVER_CAPABILITIES: what the NVIDIA container runtime mounts from the node's driver (the CUDA base
# images set it; without it only `utility`, no libcuda, is mounted). The GPUs themselves come from the pod's
# nvidia.com/gpu request (the device plugin sets NVIDIA_VISIBLE_DEVICES).
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp \
    PIGGYBACK_CPU_ATTENTION_PREBUILT=/opt/piggyback/cpu-attention \
    PIGGYBACK_TRITON_PREBUILT=/opt/piggyback/triton-cache \
    TRITON_CACHE_MANAGER=piggyback_runtime.attention.triton_cache:PrebuiltFirstCacheManager \
    TRITON_LIBCUDA_PATH=/opt/piggyback/libcuda-stub \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# uid/gid 10001: the pods' securityContext (operator/piggyback_operator/pools.py RUNTIME_UID).
RUN groupadd --gid 10001 piggyback && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp piggyback
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
ENTRYPOINT ["piggyback"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------------------
# Router build: no torch, no numpy. `piggyback router` imports piggyback_runtime.router and the modules it
# reads (config, metrics, the latency model, the OpenAI protocol), none of which import torch or numpy
# (tests/operator/test_images.py), so the project goes in with --no-deps.
FROM python:${PYTHON_TAG} AS router-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY docker/requirements-router.txt docker/
RUN pip install --requirement docker/requirements-router.txt
COPY pyproject.toml README.md ./
COPY runtime ./runtime
COPY operator ./operator
RUN pip install --no-deps .

# ---------------------------------------------------------------------------------------------------------
# Router: the pool router the operator deploys in front of a pool of several replicas.
FROM python:${PYTHON_TAG} AS router
ARG VERSION
LABEL org.opencontainers.image.title="piggyback-router" \
      org.opencontainers.image.description="Piggyback pool router: length-aware routing and live migration" \
      org.opencontainers.image.source="https://github.com/piggyback-dev/piggyback" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=router-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp
# uid/gid 10001: the router pods' securityContext (operator/piggyback_operator/pools.py RUNTIME_UID).
RUN groupadd --gid 10001 piggyback && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp piggyback
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
ENTRYPOINT ["piggyback"]
CMD ["router", "--help"]

# ---------------------------------------------------------------------------------------------------------
# Operator build: no torch. The operator imports piggyback_runtime.config and .metrics only, which import
# neither torch nor numpy (tests/operator/test_images.py), so the project goes in with --no-deps.
FROM python:${PYTHON_TAG} AS operator-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY docker/requirements-operator.txt docker/
RUN pip install --requirement docker/requirements-operator.txt
COPY pyproject.toml README.md ./
COPY runtime ./runtime
COPY operator ./operator
RUN pip install --no-deps .

# ---------------------------------------------------------------------------------------------------------
# Operator: the last stage, so a plain `docker build .` gives the small image.
FROM python:${PYTHON_TAG} AS operator
ARG VERSION
LABEL org.opencontainers.image.title="piggyback-operator" \
      org.opencontainers.image.description="Piggyback Kubernetes operator for LLMService resources" \
      org.opencontainers.image.source="https://github.com/piggyback-dev/piggyback" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=operator-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp
# uid/gid 10001: manifests/base/deployment.yaml's securityContext.
RUN groupadd --gid 10001 piggyback && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp piggyback
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 9090
ENTRYPOINT ["piggyback-operator"]
CMD ["run"]
